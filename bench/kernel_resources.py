"""Registers, spills and shared memory per thread/block of every Triton launch a workload makes, compiled
for sm_90 without a GPU (the tests' launch recorder with the JIT's alignment hints + ``cuobjdump``).

    python bench/kernel_resources.py [--family linear_cross_entropy] [--triton-path /tmp/t36] [--procs 2]

The workload is the compile test's (``tests/test_kernels_compile.py``: the family's public ops in fp32
and bf16 with every flag). Each distinct launch is compiled in a subprocess (the given Triton first on
the path, if any) and the resource usage read from its cubin with the ``cuobjdump`` that Triton ships.
Prints one Markdown table row per launch: kernel, dtype, the constexprs that differ between its launches,
warps/stages; for each Triton the registers and stack (spill) bytes per thread and the tiles the TTGIR
stores to shared memory from registers (loads the software pipeliner left synchronous, e.g. under a
branch); the shared memory the launch asks for per block (the larger of the Tritons').
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

def record(family):
    os.environ["TRITON_INTERPRET"] = "1"
    import tri_losses as tl_
    from tests import aot
    from tests.test_kernels_compile import FAMILIES
    with aot.record_launches(hints=True) as jobs:
        FAMILIES[family](tl_)
    return list(jobs.values())


def usage(jobs, triton_path=None, procs=2):
    from tests import aot
    return aot.compile_jobs(jobs, python_path=triton_path, procs=procs, usage=True)


def _dtype(job):
    sig = job["signature"]
    return next((sig[a][1:] for a in ("x", "dz", "part") if a in sig), "?")


def table(jobs, results, versions):
    """One row per distinct (kernel, dtype, flags, warps/stages) with each Triton's registers / stack
    (spill) bytes / tiles stored to shared memory from registers (synchronous loads), and shared bytes;
    launches that differ only in argument specialisation share a row when their figures agree."""
    varying = {}
    for j in jobs:
        for k, v in j["constexprs"].items():
            varying.setdefault((j["kernel"], k), set()).add(json.dumps(v))
    head = " | ".join(f"regs {v} | stack B {v} | sync tiles {v}" for v in versions)
    rows = [f"| kernel | dtype | flags | warps/stages | {head} | shared B |",
            "|---" * (5 + 3 * len(versions)) + "|"]
    seen = set()
    for j, rs in zip(jobs, results):
        cx = " ".join(f"{k}={v}" for k, v in sorted(j["constexprs"].items())
                      if len(varying[(j["kernel"], k)]) > 1 and k.isupper() and v not in (False, 0, None))
        figs = " | ".join(f"{r.get('REG')} | {r.get('STACK')} | {r.get('SYNC_SMEM')}" if r and "error" not in r else
                          f"ERROR {r and r.get('error')} | |" for r in rs)
        shared = max(int(r.get("SHARED", 0)) for r in rs if r and "error" not in r) if any(
            r and "error" not in r for r in rs) else ""
        row = (f"| {j['kernel']} | {_dtype(j)} | {cx} | {j['options'].get('num_warps')}/"
               f"{j['options'].get('num_stages')} | {figs} | {shared} |")
        if row not in seen:
            seen.add(row)
            rows.append(row)
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="linear_cross_entropy")
    ap.add_argument("--triton-path", action="append", default=[],
                    help="another Triton to compile with as well (a pip --target folder); repeatable")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--kernel", default="", help="only kernels whose name contains this")
    a = ap.parse_args()
    jobs = [j for j in record(a.family) if a.kernel in j["kernel"]]
    jobs.sort(key=lambda j: (j["kernel"], _dtype(j), json.dumps(j["constexprs"], sort_keys=True)))
    results = [usage(jobs, None, a.procs)] + [usage(jobs, p, a.procs) for p in a.triton_path]
    versions = [next((r["triton"] for r in res if r), "?") for res in results]
    print(table(jobs, list(zip(*results)), versions))


if __name__ == "__main__":
    main()
