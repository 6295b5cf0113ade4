#!/usr/bin/env python3
"""Warp-stall samples of one kernel launch, summed by region of its SASS.

Input: the CSV of `ncu -i REPORT --page source --print-source sass --csv` for a report taken
with `--section SourceCounters` (one block per profiled launch, each starting with a
"Kernel Name" row). bench/RESULTS.md (fifteenth session) shows how `k_att_tc`'s time was split
this way.

    ncu --section SourceCounters --section WarpStateStats -k regex:k_att_tc \\
        --launch-skip 4 --launch-count 3 -o att ds4 cuda model --layers 4 --ctx 4096 --decode 1
    ncu -i att.ncu-rep --page source --print-source sass --csv > source.csv
    bench/ncu_regions.py source.csv --launch 2                      # stall totals, hottest lines
    bench/ncu_regions.py source.csv --launch 2 --marks              # barriers, MUFU, async copies
    bench/ncu_regions.py source.csv --launch 2 \\
        --regions 0:prologue,4054:copies,4355:scores,4481:softmax,4602:output,4745:epilogue

A region runs from its first SASS line (the index printed by --marks or --top) to the next
region's first line.
"""
import argparse
import collections
import csv
import sys

SAMPLES = "Warp Stall Sampling (All Samples)"
MARKS = ("BAR", "EXIT", "MUFU", "LDGSTS", "DEPBAR", "HGMMA", "WARPSYNC")


def launches(path):
    """The per-launch tables of the CSV: (header, rows) each."""
    out, cur = [], None
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if row and row[0] == "Kernel Name":
                cur = []
                out.append(cur)
            elif cur is not None:
                cur.append(row)
    return [(t[0], t[1:]) for t in out if t]


def count(row, ix, name):
    try:
        return int(row[ix[name]] or 0)
    except (KeyError, ValueError, IndexError):
        return 0


def stalls(rows, ix, names):
    c = collections.Counter()
    for r in rows:
        for n in names:
            c[n] += count(r, ix, n)
    return c


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("--launch", type=int, default=0, help="which profiled launch (0-based)")
    ap.add_argument("--top", type=int, default=20, help="hottest SASS lines to print")
    ap.add_argument("--marks", action="store_true", help="list barriers, MUFU and async-copy lines")
    ap.add_argument("--regions", help="first-line:name,... (lines as numbered by --top / --marks)")
    a = ap.parse_args()

    tables = launches(a.csv)
    if not tables:
        sys.exit(f"{a.csv}: no 'Kernel Name' blocks (is it ncu --page source --csv output?)")
    if not 0 <= a.launch < len(tables):
        sys.exit(f"--launch {a.launch}: the file has {len(tables)} launches")
    hdr, rows = tables[a.launch]
    ix = {h: i for i, h in enumerate(hdr)}
    if SAMPLES not in ix:
        sys.exit("no warp-sampling column: profile with --section SourceCounters")
    names = [h for h in hdr if h.startswith("stall_") and "Not Issued" not in h]
    total = sum(count(r, ix, SAMPLES) for r in rows)
    print(f"launch {a.launch}: {len(rows)} SASS lines, {total} warp samples")
    for n, v in stalls(rows, ix, names).most_common(8):
        print(f"  {n[6:]:20s} {v:8d} {100 * v / max(total, 1):5.1f}%")

    if a.regions:
        bounds = []
        for part in a.regions.split(","):
            first, name = part.split(":", 1)
            bounds.append((int(first), name))
        bounds.sort()
        print("region               samples  share  main stall reasons")
        for i, (first, name) in enumerate(bounds):
            last = bounds[i + 1][0] if i + 1 < len(bounds) else len(rows)
            part = rows[first:last]
            v = sum(count(r, ix, SAMPLES) for r in part)
            why = ", ".join(f"{n[6:]} {c}" for n, c in stalls(part, ix, names).most_common(3))
            print(f"{name:20s} {v:8d} {100 * v / max(total, 1):5.1f}%  {why}")

    src = ix.get("Source")
    if a.marks and src is not None:
        print("marks (line, samples, running total, instruction)")
        run = 0
        for n, r in enumerate(rows):
            run += count(r, ix, SAMPLES)
            if any(m in r[src] for m in MARKS):
                print(f"{n:6d} {count(r, ix, SAMPLES):7d} {run:9d}  {r[src].strip()[:80]}")

    if a.top and src is not None:
        print(f"hottest {a.top} lines (line, samples, instruction)")
        hot = sorted(range(len(rows)), key=lambda n: -count(rows[n], ix, SAMPLES))[: a.top]
        for n in hot:
            print(f"{n:6d} {count(rows[n], ix, SAMPLES):7d}  {rows[n][src].strip()[:80]}")


if __name__ == "__main__":
    main()
