#!/usr/bin/env python3
"""Global loads that a PDL kernel issues before its griddepcontrol.wait, by kernel parameter.

ptxas treats a non-coherent load (`ld.global.nc`, what a `const __restrict__` pointer becomes)
as free to move above `griddepcontrol.wait` (`ACQBULK` in SASS): the twenty-seventh session found
the position's load of `k_topk1_1` there (bench/RESULTS.md). Such a load may only read what no
kernel of the decode graph writes (weights, tables, the position the host copies before the
graph); an earlier kernel's output read there could be stale. Run this on the module after a
PDL kernel's reads change, and check that every parameter it lists is one of those.

    nvdisasm -c "$DS4_CUDA_CACHE"/<key>.cubin > all.sass      # the module ds4 compiled
    bench/pdl_audit.py all.sass                               # every kernel with a wait
    bench/pdl_audit.py all.sass k_topk1_1 k_hc_pre1           # some of them

Parameter names come from the kernel signatures in crates/ds4/src/backend/cuda/kernels/*.cu
(kernels defined through a macro show their byte offset only). A load whose address is not
traced back to a parameter (a `__device__` table, a shared-memory address) says so.
"""
import glob
import os
import re
import sys

PARAM_BASE = 0x210  # sm_90: kernel parameters start at c[0x0][0x210]
SIZES = {"int": 4, "float": 4, "unsigned": 4, "u32": 4, "i64": 8, "long long": 8, "double": 8}


def layout(params):
    """[(offset, name)] of a kernel's parameter list (natural alignment)."""
    off, out = 0, []
    for p in (x.strip() for x in params.replace("\\", " ").split(",") if x.strip()):
        words = p.replace("__restrict__", "").replace("const", "").split()
        ty = " ".join(words[:-1])
        size = 8 if "*" in p else SIZES.get(ty, 8)
        off = (off + size - 1) // size * size
        out.append((off, words[-1].lstrip("*"), "*" in p))
        off += size
    return out


def signatures(src_dir):
    """{kernel: [(offset, name)]} for the kernels in the sources, those a macro defines included
    (`#define M(NAME, ...)` with a kernel `NAME(...)` or `k_x_##ARG(...)`, instantiated as M(...))."""
    sig = {}
    kern = re.compile(
        r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?\\?\s*'
        r'([\w#]+)\s*\(([^)]*)\)', re.S)
    for path in glob.glob(os.path.join(src_dir, "*.cu")):
        text = open(path).read()
        for m in kern.finditer(text):
            name, params = m.group(1), m.group(2)
            if "\\" not in params and "#" not in name:
                sig[name] = layout(params)
        for d in re.finditer(r"#define\s+(\w+)\(([^)]*)\)((?:[^\n]*\\\n)+[^\n]*)", text):
            macro, args, body = d.group(1), [a.strip() for a in d.group(2).split(",")], d.group(3)
            m = kern.search(body)
            if not m:
                continue
            for use in re.finditer(r"^" + macro + r"\(([^)]*)\)", text, re.M):
                vals = dict(zip(args, (v.strip() for v in use.group(1).split(","))))
                name = m.group(1)
                for a, v in vals.items():
                    name = name.replace("##" + a, v)
                name = vals.get(name, name)
                sig[name] = layout(m.group(2))
    return sig


def kernels(listing):
    """{kernel: [instruction text]} from an `nvdisasm -c` listing."""
    out, cur = {}, None
    for line in open(listing):
        m = re.match(r"\s*\.section\s+\.text\.(\w+),", line)
        if m:
            cur = out.setdefault(m.group(1), [])
            continue
        ins = re.search(r"\*/\s+(.*?)\s*;", line)
        if cur is not None and ins:
            cur.append(ins.group(1))
    return out


def dest_and_srcs(ins):
    body = re.sub(r"^@!?U?P\w+\s+", "", ins)
    parts = body.split(None, 1)
    if len(parts) < 2:
        return parts[0] if parts else "", None, []
    args = [a.strip() for a in parts[1].split(",")]
    return parts[0], args[0], args[1:]


def params_of(code, at, reg, depth=0):
    """The 64-bit parameters (offsets) the register `reg` was formed from before instruction
    `at` (pointers are 64-bit; so are i64 strides, which the caller tells apart)."""
    if depth > 6:
        return set()
    for i in range(at - 1, -1, -1):
        op, dst, srcs = dest_and_srcs(code[i])
        if dst is None or not re.fullmatch(re.escape(reg) + r"(\.64)?", dst.split()[0]):
            continue
        m = re.search(r"^(?:@!?U?P\w+\s+)?U?LDC\.64 .*c\[0x0\]\[(0x[0-9a-f]+)\]", code[i])
        if m and int(m.group(1), 16) >= PARAM_BASE:
            return {int(m.group(1), 16) - PARAM_BASE}
        found = set()
        for s in srcs:
            r = re.match(r"-?(U?R\d+)", s)
            if r and r.group(1) not in ("RZ", "URZ"):
                found |= params_of(code, i, r.group(1), depth + 1)
        return found
    return set()


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    here = os.path.dirname(os.path.abspath(__file__))
    sig = signatures(os.path.join(here, "..", "crates", "ds4", "src", "backend", "cuda", "kernels"))
    want = set(sys.argv[2:])
    for name, code in sorted(kernels(sys.argv[1]).items()):
        if want and name not in want:
            continue
        waits = [i for i, ins in enumerate(code) if ins.startswith("ACQBULK")]
        if not waits:
            continue
        names = {off: (n, ptr) for off, n, ptr in sig.get(name, [])}
        parts = []
        # Several waits (a kernel that waits on one of two paths): the loads between one wait
        # and the next in address order are listed under the later one; read the SASS to see
        # which path each load is on.
        for w, (lo, hi) in enumerate(zip([0] + waits[:-1], waits)):
            counts = {}
            for i in range(lo, hi):
                if "LDG" not in code[i]:
                    continue
                base = re.search(r"desc\[[^\]]*\]\[(U?R\d+)", code[i])
                offs = params_of(code, i, base.group(1)) if base else set()
                # A known signature: its pointers only (an i64 stride is not the base).
                if names:
                    offs = {o for o in offs if names.get(o, ("", True))[1]}
                what = (", ".join(sorted(names.get(o, (f"param +0x{o:x}",))[0] for o in offs))
                        or "no parameter (a __device__ table or a computed address)")
                counts[what] = counts.get(what, 0) + 1
            listed = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) or "none"
            parts.append(listed if len(waits) == 1 else f"[wait {w + 1}] {listed}")
        if want or any(not p.endswith("none") for p in parts):
            print(f"{name}: loads before the wait: " + "; ".join(parts))

if __name__ == "__main__":
    main()
