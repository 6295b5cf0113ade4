#!/usr/bin/env python3
"""Where a decode step's time goes, from a bench/kernel_trace.c trace of `ds4 cuda model`.

For every site (each layer's attention and FFN, which begin with a `k_hc_pre1`), prints when
each of its kernels ends, in µs after the site's `k_hc_pre1` ends, averaged over the decode
graph launches (the first two skipped), and `_span`: when the next site's `k_hc_pre1` ends.
A kernel that ends after the one waiting for it delays the path; the site's critical chain
is read off the end times (bench/RESULTS.md, twenty-ninth session).

    bench/trace_layers.py trace.csv [--token N]   # --token: one launch's raw timeline instead
    bench/trace_layers.py trace.csv --steps       # the GPU's idle time around each step

`--steps`: for each decode graph launch, its span (first kernel's start to last kernel's end),
the idle time until the next launch's first kernel (the narrowing, `k_sample_mb`, in a step of
`ds4 cuda model` or `ds4 bench`), that launch's duration, and the idle time until the next
graph's first kernel: the host's share of a step (bench/RESULTS.md, thirty-fourth session).
Under the tracer the last gap includes the tracer's own buffer work.
"""
import argparse
import collections


def graph_launches(path, plain=False):
    """Kernels of each graph launch (by correlation id), in launch order, sorted by start;
    `plain`: the launches outside graphs too, one kernel each."""
    by = collections.defaultdict(list)
    with open(path) as f:
        for line in f:
            r = line.rstrip("\n").split(",", 8)
            if len(r) == 9 and (plain or r[4] != "0"):
                by[r[3]].append((int(r[0]), int(r[1]), r[2], int(r[6]), int(r[7]), r[8]))
    runs = [sorted(v) for v in by.values()]
    return sorted(runs, key=lambda ks: ks[0][0])


def steps(runs):
    """The span of each graph launch and the idle gaps around the launch that follows it."""
    print("graph_us,gap_to_next_us,next_kernel,next_us,gap_to_graph_us")
    big = [i for i, ks in enumerate(runs) if len(ks) >= 32]
    for i, j in zip(big, big[1:]):
        g, nxt, g2 = runs[i], runs[i + 1], runs[j]
        g_end = max(k[1] for k in g)
        n_end = max(k[1] for k in nxt)
        print(f"{(g_end - g[0][0]) / 1e3:.1f},{(nxt[0][0] - g_end) / 1e3:.1f},{nxt[0][5][:24]},"
              f"{(n_end - nxt[0][0]) / 1e3:.1f},{(g2[0][0] - n_end) / 1e3:.1f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--token", type=int, help="print this graph launch's kernels")
    ap.add_argument("--steps", action="store_true", help="the idle time around each step")
    a = ap.parse_args()
    runs = graph_launches(a.trace, plain=a.steps)
    if a.steps:
        steps(runs)
        return
    if a.token is not None:
        ks = runs[a.token]
        t0 = ks[0][0]
        for s, e, st, gx, gy, name in ks:
            print(f"{(s - t0) / 1e3:8.2f} {(e - t0) / 1e3:8.2f} {(e - s) / 1e3:6.2f} "
                  f"stream {st:>3} {gx:>5}x{gy:<3} {name[:40]}")
        return
    agg = collections.defaultdict(list)
    for ks in runs[2:]:
        pre = [i for i, k in enumerate(ks) if k[5].startswith("k_hc_pre1")]
        for si, a0 in enumerate(pre):
            b0 = pre[si + 1] if si + 1 < len(pre) else len(ks)
            t0 = ks[a0][1]
            site = (si // 2, "attn" if si % 2 == 0 else "ffn")
            ends = {}
            for s, e, st, gx, gy, name in ks[a0:b0]:
                key = f"{name[:24]}/{gx}x{gy}"
                ends[key] = max(ends.get(key, -1e9), (e - t0) / 1e3)
            if b0 < len(ks):
                ends["_span"] = (ks[b0][1] - t0) / 1e3
            for key, v in ends.items():
                agg[site + (key,)].append(v)
    for site in sorted({k[:2] for k in agg}):
        items = sorted(((k[2], sum(v) / len(v)) for k, v in agg.items() if k[:2] == site),
                       key=lambda x: x[1])
        print(f"layer {site[0]} {site[1]}: " + " ".join(f"{n} {t:.1f}" for n, t in items))


if __name__ == "__main__":
    main()
