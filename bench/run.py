"""Benchmark runner: ``python bench/run.py [--families ce,ctc,...] [--goal] [--quick] [--out DIR]``.

Runs each family module's ``run(device, smoke)`` on the device present and writes ``<device>.md``,
``.json`` and ``.png`` to ``--out`` (default ``bench/results/``). On a CPU-only machine it runs a small
smoke configuration (plus the CPU-fallback rows the issues ask for) so the command always works; CPU
figures are for that machine only. ``--rows FILE`` writes the raw rows as JSON instead (the GPU check
merges several). ``--record FILE`` records every Triton launch the goal-shape providers would make and
writes them as compile jobs (GPU precompile; nothing is timed).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import signal
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
FAMILIES = ("cross_entropy", "linear_cross_entropy", "ctc", "catalogue", "sampled", "text", "distributed")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated, from: " + ", ".join(FAMILIES))
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for <device>.md/.json/.png")
    ap.add_argument("--rows", default=None, help="write the rows and environment as JSON here instead")
    ap.add_argument("--record", default=None, help="record the Triton launches as compile jobs into this file")
    ap.add_argument("--smoke", action="store_true", help="small shapes even on a GPU")
    ap.add_argument("--goal", action="store_true", help="only the shapes the goals name")
    ap.add_argument("--quick", action="store_true", help="a subset of the goal shapes (implies --goal)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers (a fast dry run)")
    ap.add_argument("--rep", type=int, default=200, help="do_bench rep in ms")
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warmup in ms")
    args = ap.parse_args(argv)
    bad = [f for f in args.families.split(",") if f not in FAMILIES]
    if bad:
        ap.error(f"--families: unknown {bad}; expected some of {list(FAMILIES)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("bench/run.py: refusing to run with TRITON_INTERPRET set (every Triton kernel would be interpreted)")
    sys.path[:0] = [str(HERE), str(ROOT)]
    import torch

    import _common
    import report
    _common.MODE.update(goal=args.goal or args.quick, quick=args.quick, rep=args.rep, warmup=args.warmup,
                        record=bool(args.record), no_compile=args.no_compile)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke or device.type != "cuda"
    if args.record:
        return record(args, device, smoke)
    copy_gbs = _common.copy_bandwidth(device)
    mode = ("quick" if args.quick else "goal shapes" if args.goal else "full") if not smoke else \
        "smoke (tiny shapes except the CPU-fallback rows; CPU times are for this machine only)"
    meta = dict(env=report.environment(), copy_gbs=copy_gbs, mode=mode, name=name_of(torch, smoke))
    rows = []
    state = dict(fam=None, first=0)  # the running family and where its measured rows start in _common.MEASURED
    if args.rows:
        def killed(signum, frame):  # the GPU check's step timeout: keep what was measured, then go
            part = _common.MEASURED[state["first"]:] if state["fam"] else []
            note = dict(family=state["fam"] or "", case="", dtype="", provider="",
                        note=f"killed at the step's timeout during {state['fam'] or 'the set-up'}: rows so far kept")
            write_rows(args.rows, meta, rows + part + [note])
            os._exit(128 + signum)
        signal.signal(signal.SIGTERM, killed)
    for fam in args.families.split(","):
        print(f"[bench] {fam} ...", flush=True)
        state.update(fam=fam, first=len(_common.MEASURED))
        torch.manual_seed(0)  # the same data as the precompile's recording run
        try:
            mod = importlib.import_module(f"bench_{fam}")
            rows += mod.run(device, smoke)
        except Exception as e:  # noqa: BLE001 - one family failing must not lose the others' rows
            rows.append(dict(family=fam, case="", dtype="", provider="",
                             note=f"family failed: {type(e).__name__}: {e}"))
            print(f"[bench] {fam} failed: {type(e).__name__}: {e}", flush=True)
        state["fam"] = None
        if args.rows:
            write_rows(args.rows, meta, rows)  # after each family: a later kill keeps these
    if args.rows:
        return rows
    paths = report.write_results(rows, meta, args.out, meta["name"])
    print(paths[0].read_text())
    return rows


def write_rows(path, meta, rows):
    """The ``--rows`` file: ``{meta, rows}`` as JSON (written whole each time, through a temporary file)."""
    tmp = pathlib.Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(dict(meta=meta, rows=rows), default=str))
    os.replace(tmp, path)


def name_of(torch, smoke):
    if torch.cuda.is_available():
        return __import__("report").slug(torch.cuda.get_device_name())
    return "cpu-smoke"


def record(args, device, smoke):
    """Run the families once with Triton launches recorded (tests/aot.py) and write the compile jobs."""
    import torch

    from tests import aot
    jobs, failed = {}, []
    with aot.record_jit_launches() as recorded:
        for fam in args.families.split(","):
            torch.manual_seed(0)
            try:
                importlib.import_module(f"bench_{fam}").run(device, smoke)
            except Exception as e:  # noqa: BLE001 - launches before the failure are still recorded
                failed.append(f"{fam}: {type(e).__name__}: {e}")
        jobs.update(recorded)
    pathlib.Path(args.record).write_text(json.dumps(dict(jobs=list(jobs.values()), failed=failed)))
    print(f"[record] {len(jobs)} launches recorded; failures: {failed or 'none'}")
    return jobs


if __name__ == "__main__":
    main()
