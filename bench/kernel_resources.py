"""Registers, spills and shared memory per thread/block of every Triton launch a workload makes, compiled
for sm_90 without a GPU (the tests' launch recorder with the JIT's alignment hints + ``cuobjdump``).

    python bench/kernel_resources.py [--family linear_cross_entropy] [--triton-path /tmp/t36] [--procs 2]

The workload is the compile test's (``tests/test_kernels_compile.py``: the family's public ops in fp32
and bf16 with every flag). Each distinct launch is compiled in a subprocess (the given Triton first on
the path, if any) and the resource usage read from its cubin with the ``cuobjdump`` that Triton ships.
Prints one Markdown table row per launch: kernel, dtype, the constexprs that differ between its launches,
warps/stages, registers per thread and stack (spill) bytes per thread for each Triton, shared memory
per block.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_WORKER = r"""
import json, os, re, subprocess, sys, tempfile
sys.path.insert(0, sys.argv[1])
import triton
from tests.aot import compile_job
tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
for line in sys.stdin:
    job = json.loads(line)
    try:
        k = compile_job(job)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"]); f.flush()
            out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        res = dict(re.findall(r"(REG|STACK|SHARED):(\d+)", out))
        res.update(triton=triton.__version__, shared_meta=k.metadata.shared)
    except Exception as e:
        res = dict(error=repr(e)[-300:], triton=triton.__version__)
    print("RES " + json.dumps(res), flush=True)
"""


def record(family):
    os.environ["TRITON_INTERPRET"] = "1"
    import tri_losses as tl_
    from tests import aot
    from tests.test_kernels_compile import FAMILIES
    with aot.record_launches(hints=True) as jobs:
        FAMILIES[family](tl_)
    return list(jobs.values())


def usage(jobs, triton_path=None, procs=2):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if triton_path:
        env["PYTHONPATH"] = triton_path + os.pathsep + env.get("PYTHONPATH", "")
    parts = [list(range(i, len(jobs), procs)) for i in range(procs)]
    ps = [subprocess.Popen([sys.executable, "-c", _WORKER, ROOT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True, env=env, cwd=ROOT) for _ in parts]
    out = [None] * len(jobs)
    for p, idx in zip(ps, parts):
        text, _ = p.communicate("".join(json.dumps(jobs[i]) + "\n" for i in idx))
        res = [json.loads(ln[4:]) for ln in text.splitlines() if ln.startswith("RES ")]
        for i, r in zip(idx, res):
            out[i] = r
    return out


def _dtype(job):
    sig = job["signature"]
    return next((sig[a][1:] for a in ("x", "dz", "part") if a in sig), "?")


def table(jobs, results, versions):
    """One row per distinct (kernel, dtype, flags, warps/stages) with each Triton's registers / stack
    (spill) bytes / shared bytes; launches that differ only in argument specialisation share a row when
    their figures agree."""
    varying = {}
    for j in jobs:
        for k, v in j["constexprs"].items():
            varying.setdefault((j["kernel"], k), set()).add(json.dumps(v))
    head = " | ".join(f"regs {v} | stack B {v}" for v in versions)
    rows = [f"| kernel | dtype | flags | warps/stages | {head} | shared B |",
            "|---" * (5 + 2 * len(versions)) + "|"]
    seen = set()
    for j, rs in zip(jobs, results):
        cx = " ".join(f"{k}={v}" for k, v in sorted(j["constexprs"].items())
                      if len(varying[(j["kernel"], k)]) > 1 and k.isupper() and v not in (False, 0, None))
        figs = " | ".join(f"{r.get('REG')} | {r.get('STACK')}" if r and "error" not in r else
                          f"ERROR {r and r.get('error')} |" for r in rs)
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
