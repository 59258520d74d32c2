"""One-command GPU check: ``bench/gpu_check.sh OUT [--quick] [--dry-run] [--wheels DIR] [--budget SECONDS]``.

Run from the repository root on the GPU machine. Steps, in the order that matters when time is short
(``--steps`` runs some of them: the setup steps first, then the others in the order named), each a
subprocess with its own timeout (its process group is killed when it runs over), all within a global budget
(default 420 s, ``--quick`` 180 s; a step that no longer fits is reported as skipped):

  env           versions (python, torch, triton, CUDA, driver) and the device
  install       peers' wheels from ``.whl/`` (or ``--wheels``) into a temporary site, offline
                (``pip install --no-index --no-deps --target``, on PYTHONPATH for the later steps), each
                failure reported; the project with ``pip install --no-deps --no-build-isolation -e .``
  precompile    the goal-shape benchmarks and the AOT test's workloads run once on the GPU with every
                Triton launch recorded instead of run (``tests/aot.py``), in parallel processes; each
                distinct launch is compiled by a pool of processes (one per core) into Triton's
                on-disk cache, where the later JIT launches find it (same key: see tests/aot.py)
  bench-ce      cross-entropy goal shapes (bf16 and fp32)
  bench-lce     linear cross-entropy goal shapes
  bench-ctc     CTC goal shapes, fsa_loss(ctc_fsa), the HMM row
  tests-subset  a CUDA pass over each family's tests (bench/gpu_subset.py; --quick: a smaller subset), on
                8 pytest-xdist workers when xdist is importable (or carried as a wheel in ``.whl/``)
  tests-gpu     the ``gpu``-marked tests (big shapes)                       (not in --quick)
  graphs        CUDA-graph capture of CE / linear CE / CTC forward+backward with host syncs as errors
  bench-rest    world-size-1 process-group, sampled, element-wise and text rows   (not in --quick)
  tune          only when named in ``--steps``: the launch-table sweep ``bench/tune.py`` (candidate tiles,
                blocks and warps timed at the goal shapes), written as ``tune.json``/``tune.md``

After every step the benchmark rows so far and a provisional ``summary.md`` are written into OUT, so a run
stopped from outside keeps what finished; on SIGTERM/SIGINT/SIGHUP the running step's process group is
killed and the final report written at once. Everything lands in OUT: ``summary.md`` (the table printed
last: step status and time, test counts, each goal's figure and ratio), ``<device>.md/.json/.png`` (the
benchmark rows of every bench step, the environment and the goals; commit them as
``bench/results/<device>.*``), ``gpu_check.log`` (all output) and ``logs.tar.gz`` (each step's log, junit
XML, the recorded compile jobs and failures), and with the tune step ``tune.json``/``tune.md``. Eight files
at most, so they all come back from a device tool that returns a handful.

``--dry-run`` runs the same machinery on a CPU machine in about a minute: installs the wheels into a
temporary folder, skips the editable install and the GPU-only recording, runs the benchmarks' smoke
shapes, collects (does not run) the tests, and writes the same outputs.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable

# name: (timeout s in a full run, timeout s in --quick or None when not in --quick)
STEPS = {
    "env": (60, 60),
    "install": (120, 90),
    "precompile": (150, 75),
    "bench-ce": (120, 45),
    "bench-lce": (150, 60),
    "bench-ctc": (90, 30),
    "tests-subset": (180, 75),
    "tests-gpu": (90, None),
    "graphs": (60, 45),
    "bench-rest": (120, None),
    "tune": (240, 100),
}
OPTIONAL = {"tune"}  # run only when named in --steps
BENCH_FAMILIES = {"bench-ce": "cross_entropy", "bench-lce": "linear_cross_entropy", "bench-ctc": "ctc",
                  "bench-rest": "distributed,sampled,catalogue,text"}  # the open issues' rows first
PEERS = {"liger_kernel.transformers": "liger-kernel", "cut_cross_entropy": "cut-cross-entropy"}
_PEER_PROBE = """import importlib, sys
for m in sys.argv[1:]:
    try:
        importlib.import_module(m)
        print("PEER", m, "ok")
    except Exception as e:
        print("PEER", m, type(e).__name__, str(e).splitlines()[0][:80] if str(e) else "")
"""
MIN_STEP_S = 15      # a step is not started with less time than this left
RESERVE_S = 10       # kept for the final report


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # (gpu_check.sh reads
    # the options by their full names to make their paths absolute: no abbreviations)
    ap.add_argument("out", help="output folder (created; everything is written under it)")
    ap.add_argument("--quick", action="store_true", help="a re-run after a fix: fewer steps and shapes (<= 3 min)")
    ap.add_argument("--dry-run", action="store_true", help="exercise the steps on a CPU machine, fast")
    ap.add_argument("--wheels", default=str(ROOT / ".whl"), help="folder of peer wheels (default: .whl/)")
    ap.add_argument("--budget", type=float, default=None, help="global time budget in s (420; --quick 180)")
    ap.add_argument("--steps", default=None, help="comma-separated steps to run, in this order after "
                    "env/install/precompile: " + ",".join(STEPS))
    # internal entry points of the step subprocesses
    ap.add_argument("--_precompile", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_record_aot", nargs=2, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_env", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.out:
        ap.error("out: expected an output folder, got an empty string")
    if args.budget is None:
        args.budget = 180.0 if args.quick else 420.0
    if not (0 < args.budget < float("inf")):  # (NaN fails every comparison: it would switch the budget off)
        ap.error(f"--budget: expected a positive, finite number of seconds, got {args.budget}")
    if args.steps:
        bad = [s for s in args.steps.split(",") if s not in STEPS]
        if bad:
            ap.error(f"--steps: unknown {bad}; expected some of {list(STEPS)}")
    return args


SETUP = ("env", "install", "precompile")  # run first, in this order, whatever --steps says


def plan(args) -> list[tuple[str, float]]:
    """The (step, timeout) list this run will try, in order: the setup steps, then the others in the order
    ``--steps`` names them (STEPS' order without ``--steps``), so a short window can put first the
    figures it lacks."""
    chosen = list(dict.fromkeys(args.steps.split(","))) if args.steps else list(STEPS)
    out = []
    for name in [n for n in SETUP if n in chosen] + [n for n in chosen if n not in SETUP]:
        full, quick = STEPS[name]
        t = quick if args.quick else full
        if t is not None and (name not in OPTIONAL or args.steps):
            out.append((name, float(t)))
    return out


# ------------------------------------------------------------------------------------------------ runner
class Stopped(BaseException):
    """The check itself got SIGTERM/SIGINT/SIGHUP (a device tool's timeout, a lease ending): the running
    step's process group is killed and the report is written with what finished. A BaseException, as
    KeyboardInterrupt, so that no ``except Exception`` in a step swallows it."""


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _on_stop_signal(signum, frame):
    for sig in _STOP_SIGNALS:  # a second signal must not interrupt the kill of the running step
        signal.signal(sig, signal.SIG_IGN)
    raise Stopped(signal.Signals(signum).name)


def _kill_group(p, term_wait=5.0):
    """SIGTERM to ``p``'s process group (a bench step writes its rows then), SIGKILL ``term_wait`` s later."""
    for sig, wait in ((signal.SIGTERM, term_wait), (signal.SIGKILL, 30)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            break
        try:
            p.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def run_with_timeout(cmd, timeout, log_path, env=None, cwd=ROOT):
    """Run ``cmd`` in its own process group, output appended to ``log_path``; past ``timeout`` seconds the
    whole group gets SIGTERM, then SIGKILL 5 s later. Returns (returncode, seconds, timed_out). When the
    wait is interrupted (``Stopped``), the group is killed the same way (2 s grace) before the exception
    goes on: a step never outlives the check (each runs in its own session, out of reach of a group kill
    aimed at the check)."""
    t0 = time.monotonic()
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(map(str, cmd))}\n".encode())
        log.flush()
        p = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                             start_new_session=True)
        try:
            rc, timed_out = p.wait(timeout=max(timeout, 0.1)), False
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(p)
            rc = p.returncode
            log.write(f"\n[gpu_check] killed after {timeout:.0f} s\n".encode())
        except BaseException:
            _kill_group(p, term_wait=2.0)
            log.write(b"\n[gpu_check] killed: the check was stopped\n")
            raise
    return rc, time.monotonic() - t0, timed_out


class Check:
    """State of one run: folders, the children's environment, step results."""

    def __init__(self, args):
        self.args = args
        self.out = pathlib.Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = pathlib.Path(tempfile.mkdtemp(prefix="tri_losses_gpu_check_"))
        self.logs = self.work / "logs"
        self.logs.mkdir()
        self.site = self.work / "site"
        self.site.mkdir()
        self.cache = self.work / "triton-cache"
        self.cache.mkdir()
        self.t0 = time.monotonic()
        self.steps: list[dict] = []
        self.env_info: dict = {}
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join([str(self.site), str(ROOT), str(HERE)]
                                            + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.update(TRITON_CACHE_DIR=str(self.cache), PYTHONUNBUFFERED="1", CCE_AUTOTUNE="0",
                   TRI_LOSSES_TEST_SUBSET="quick" if args.quick else "full")
        self.env = env

    def remaining(self):
        return self.args.budget - (time.monotonic() - self.t0) - RESERVE_S

    def sh(self, name, cmd, timeout):
        return run_with_timeout(cmd, timeout, self.logs / f"{name}.log", env=self.env)

    def cache_entries(self):
        return sum(1 for p in self.cache.iterdir() if p.is_dir())

    def say(self, msg):
        with open(self.out / "gpu_check.log", "a") as f:
            f.write(msg + "\n")
        try:
            print(msg, flush=True)
        except OSError:  # the reader of stdout is gone (a closed session: SIGHUP): the log file has it
            pass


# ------------------------------------------------------------------------------------------------ steps
def step_env(c: Check, timeout):
    rc, _, _ = c.sh("env", [PY, HERE / "gpu_check.py", c.out, "--_env"], timeout)
    text = (c.logs / "env.log").read_text()
    line = [ln for ln in text.splitlines() if ln.startswith("ENV ")]
    if rc != 0 or not line:
        return "failed", "could not import torch/triton: see logs/env.log"
    c.env_info = json.loads(line[-1][4:])
    c.say("\n".join(f"  {k}: {v}" for k, v in c.env_info.items()))
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        c.say("  TRITON_INTERPRET was set: it is removed for every step")
    return "ok", ", ".join(f"{k} {c.env_info[k]}" for k in ("device", "torch", "triton", "cuda") if k in c.env_info)


def step_install(c: Check, timeout):
    wheels = sorted(glob.glob(os.path.join(c.args.wheels, "*.whl")))
    notes, failed = [], []
    end = time.monotonic() + timeout  # the sub-calls share the step's time: none runs past its end

    def left(share):
        return max(1.0, min(share, end - time.monotonic()))

    for w in wheels:
        rc, _, to = c.sh("install", [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                                     "--target", c.site, w], left(max(10, timeout / max(1, len(wheels) + 2))))
        (failed if rc or to else notes).append(os.path.basename(w).split("-")[0] + (" (timed out)" if to else ""))
    detail = [f"wheels {len(notes)}/{len(wheels)} installed" + (f" (failed: {', '.join(failed)})" if failed else "")
              if wheels else f"no wheels in {c.args.wheels} (peers appear as rows saying so)"]
    if c.args.dry_run:
        detail.append("editable install skipped (dry run)")
    else:
        rc, _, to = c.sh("install", [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                     "--no-build-isolation", "-e", ROOT], left(max(20, timeout / 2)))
        ok = rc == 0 and not to
        detail.append("pip install -e . ok" if ok else "pip install -e . " + ("timed out" if to else "FAILED")
                      + " (the checkout is on PYTHONPATH)")
        if not ok:
            failed.append("-e .")
    mark = (c.logs / "install.log").stat().st_size if (c.logs / "install.log").exists() else 0
    c.sh("install", [PY, "-c", _PEER_PROBE, *PEERS], left(60))
    with open(c.logs / "install.log", "rb") as f:  # this probe's lines only
        f.seek(mark)
        lines = f.read().decode(errors="replace").splitlines()
    got = {ln.split()[1]: ln[5:] for ln in lines if ln.startswith("PEER ") and len(ln.split()) > 2}
    peers = [got.get(m, f"{m} no result (the import hung past the step's time, or crashed)") for m in PEERS]
    if any(m not in got for m in PEERS):
        failed.append("peer imports")
    detail.append("imports: " + "; ".join(peers))
    return ("ok" if not failed else "partial"), "; ".join(detail)


def step_precompile(c: Check, timeout):
    if c.args.dry_run:
        return "skipped", "recording needs a GPU (dry run)"
    res = c.work / "precompile.json"
    rc, secs, to = c.sh("precompile", [PY, HERE / "gpu_check.py", c.out, "--_precompile", c.work, "--budget",
                                       str(timeout)] + (["--quick"] if c.args.quick else []), timeout)
    if not res.exists():
        return ("timeout" if to else "failed"), f"no result (rc {rc}); see logs/precompile.log"
    r = json.loads(res.read_text())
    detail = (f"{r['recorded']} launches recorded by {r['workloads']} workloads "
              f"({len(r['record_failures'])} failed), {r['compiled']} compiled, {len(r['compile_failures'])} failed, "
              f"{r['not_compiled']} left to the JIT (deadline), "
              f"record {r['record_s']:.0f} s + compile {r['compile_s']:.0f} s on {r['procs']} processes")
    ok = rc == 0 and not r["compile_failures"] and not r["not_compiled"] and not to
    return ("ok" if ok else "timeout" if to else "partial"), detail


def failed_rows(rows) -> int:
    """Benchmark rows that report a failure: a provider's run, a whole case or a whole family."""
    return sum(1 for r in rows if str(r.get("note", "")).startswith(("failed", "case failed", "family failed")))


def _bench(c: Check, name, timeout):
    rows_path = c.work / f"{name}.json"
    before = c.cache_entries()
    cmd = [PY, HERE / "run.py", "--goal", "--families", BENCH_FAMILIES[name], "--rows", rows_path, "--rep", 100,
           "--warmup", 10] + (["--quick"] if c.args.quick else []) + (["--no-compile"] if c.args.dry_run else [])
    rc, _, to = c.sh(name, cmd, timeout)
    if not rows_path.exists():
        return ("timeout" if to else "failed"), f"no rows (rc {rc}); see logs/{name}.log"
    rows = json.loads(rows_path.read_text())["rows"]
    bad = failed_rows(rows)
    # a tri_losses row whose loss/gradients differ from the reference run at that shape (bench/_common.agreement)
    wrong = [f"{r['provider']} {r['case']} {r['dtype']} (rel {r['check']:.1e})" for r in rows
             if r.get("check_ok") is False and str(r.get("provider", "")).startswith("tri_losses")]
    return ("ok" if rc == 0 and not bad and not wrong else "partial"), \
        f"{len(rows)} rows, {bad} failed" + (f", WRONG RESULTS: {'; '.join(wrong)}" if wrong else "") + \
        f"; new Triton cache entries {c.cache_entries() - before} " \
        "(JIT misses after the precompile, torch.compile's kernels included)"


def has_module(c: Check, name: str) -> bool:
    """Whether the steps' Python can import ``name``: installed in this Python, or put into the temporary
    site by the install step (wheels carried in ``.whl/``: pytest-xdist, execnet, pytest-timeout)."""
    import importlib.util
    return importlib.util.find_spec(name) is not None or (c.site / name).is_dir() \
        or (c.site / f"{name}.py").is_file()


def _xdist(c: Check) -> bool:
    return has_module(c, "xdist") and has_module(c, "execnet")


def _pytest_flags(c: Check):
    return ["--timeout", "120"] if has_module(c, "pytest_timeout") else []


def _junit_counts(path):
    """{tests, failures, errors, skipped} summed over a junit XML's test suites."""
    counts = dict(tests=0, failures=0, errors=0, skipped=0)
    root = ET.parse(path).getroot()
    for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
        for k in counts:
            counts[k] += int(suite.get(k, 0))
    return counts


def failed_tests(log: str) -> list:
    """The test ids that ``bench/gpu_subset.py`` reported failed in a step's log (its
    ``[subset] FAILED (<phase>) <test id>: <message>`` lines), in order."""
    return [ln.split(") ", 1)[-1].split(": ", 1)[0] for ln in log.splitlines() if ln.startswith("[subset] FAILED")]


def _tests(c: Check, name, timeout, extra):
    xml = c.work / f"{name}.xml"
    cmd = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", xml] + extra + _pytest_flags(c)
    if c.args.dry_run:
        cmd = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only"] + extra
    rc, _, to = c.sh(name, cmd + ["tests"], timeout)
    if c.args.dry_run:
        tail = [ln for ln in (c.logs / f"{name}.log").read_text().splitlines() if "collected" in ln or "selected" in ln]
        return ("ok" if rc in (0, 5) else "failed"), "collected only (dry run): " + (tail[-1] if tail else f"rc {rc}")
    if not xml.exists():
        log = (c.logs / f"{name}.log").read_text(errors="replace") if (c.logs / f"{name}.log").exists() else ""
        fails = failed_tests(log)
        seen = f"; {len(fails)} failed before that: {', '.join(fails[:6])}{' ...' if len(fails) > 6 else ''}" \
            if fails else ""
        return ("timeout" if to else "failed"), f"no junit XML (rc {rc}){seen}; see logs/{name}.log"
    n = _junit_counts(xml)
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    status = "timeout" if to else "ok" if rc in (0, 5) and not n["failures"] and not n["errors"] else "failed"
    return status, f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"


def step_tests_gpu(c, timeout):
    return _tests(c, "tests-gpu", timeout, ["-m", "gpu"])


def step_tests_subset(c, timeout):
    xdist = ["-n", "8"] if _xdist(c) and not c.args.dry_run else []
    return _tests(c, "tests-subset", timeout, ["-p", "gpu_subset", "-m", "not gpu"] + xdist)


def step_graphs(c: Check, timeout):
    res = c.work / "graphs.json"
    rc, _, to = c.sh("graphs", [PY, HERE / "cuda_graphs.py", res], timeout)
    if not res.exists():
        return ("timeout" if to else "failed"), f"no result (rc {rc}); see logs/graphs.log"
    r = json.loads(res.read_text())
    status = "skipped" if all(x["status"] == "skipped" for x in r) else \
        "ok" if all(x["status"] == "ok" for x in r) else "failed"
    return status, "; ".join(f"{x['op']} {x['status']}"
                             + (f" ({x['detail'][:70]})" if x["detail"] and x["status"] != "skipped" else "")
                             for x in r)


def step_tune(c: Check, timeout):
    res = c.work / "tune.json"
    cmd = [PY, HERE / "tune.py", res, "--budget", max(10.0, timeout - 30)] + (["--quick"] if c.args.quick else []) \
        + (["--smoke"] if c.args.dry_run else [])
    env = dict(c.env, TRITON_INTERPRET="1") if c.args.dry_run else None
    rc, _, to = (run_with_timeout(cmd, timeout, c.logs / "tune.log", env=env) if env else c.sh("tune", cmd, timeout))
    if not res.exists():
        return ("timeout" if to else "failed"), f"no result (rc {rc}); see logs/tune.log"
    for p in (res, res.with_suffix(".md")):
        shutil.copy(p, c.out / p.name)
    d = json.loads(res.read_text())
    wins = [b for b in d["best"] if b["speedup"] == b["speedup"] and b["speedup"] > 1.05]
    return "ok" if rc == 0 else "partial", \
        f"{len(d['rows'])} timings, {len(wins)} entries with a candidate > 5% faster; tune.md" + \
        (f"; targets left out of time: {','.join(d['meta']['skipped_targets'])}" if d["meta"]["skipped_targets"] else "")


STEP_FNS = {"env": step_env, "install": step_install, "precompile": step_precompile,
            "tests-gpu": step_tests_gpu, "tests-subset": step_tests_subset, "graphs": step_graphs, "tune": step_tune}


# ------------------------------------------------------------------------------------------------ report
def merge_rows(work: pathlib.Path):
    rows, meta = [], {}
    for name in BENCH_FAMILIES:
        p = work / f"{name}.json"
        if p.exists():
            d = json.loads(p.read_text())
            rows += d["rows"]
            meta = meta or d["meta"]
    return rows, meta


def write_report(c: Check, final: bool = False) -> str:
    """Results and summary into OUT from the steps done so far: after every step (a run killed from outside,
    beyond the reach of any handler, still leaves what finished) and, ``final``, with the logs."""
    if str(HERE) not in sys.path:
        sys.path[:0] = [str(HERE), str(ROOT)]
    import report
    rows, meta = merge_rows(c.work)
    meta = dict(meta, mode=("quick" if c.args.quick else "goal shapes") + (" (dry run)" if c.args.dry_run else ""))
    env = meta.get("env") or c.env_info
    name = report.slug(env.get("device", "unknown")) if not c.args.dry_run else "dry-run"
    goals = report.evaluate_goals(rows)
    written = report.write_results(rows, dict(meta, env=env, steps=c.steps), c.out, name) if rows else []
    summary = report.summary_markdown(c.steps, goals if rows else [], env)
    total = time.monotonic() - c.t0
    summary = f"# tri_losses GPU check ({'quick' if c.args.quick else 'full'}), {total:.0f} s\n\n" + summary
    if (c.out / "tune.md").exists():
        summary += "\n" + (c.out / "tune.md").read_text()
    summary += f"\nresults: {', '.join(p.name for p in written) or 'none'}; " \
        + ("logs: logs.tar.gz\n" if final else "(written after a step; the run had not finished: see gpu_check.log)\n")
    (c.out / "summary.md").write_text(summary)
    if final:
        with tarfile.open(c.out / "logs.tar.gz", "w:gz") as tar:
            for p in sorted(c.work.iterdir()):
                if p.name not in ("site", "triton-cache"):
                    tar.add(p, arcname=p.name)
        c.say("\n" + summary)
        shutil.rmtree(c.work, ignore_errors=True)
    return summary


def finish(c: Check):
    """Results, summary and logs into OUT; the summary printed last."""
    return write_report(c, final=True)


def main(argv=None):
    args = parse_args(argv)
    if args._env:
        return internal_env()
    if args._precompile:
        return internal_precompile(pathlib.Path(args._precompile), args.quick, args.budget)
    if args._record_aot:
        return internal_record_aot(*args._record_aot)
    c = Check(args)
    (c.out / "gpu_check.log").write_text("")
    c.say(f"[gpu_check] {'quick' if args.quick else 'full'}{' dry run' if args.dry_run else ''}, budget "
          f"{args.budget:.0f} s, output {c.out}")
    for sig in _STOP_SIGNALS:
        signal.signal(sig, _on_stop_signal)
    stopped = None
    try:
        stopped = _run_steps(c, args)
    except Stopped as e:  # between steps or while one was reported
        stopped = str(e)
    finally:
        for sig in _STOP_SIGNALS:  # the final report is not interrupted
            signal.signal(sig, signal.SIG_IGN)
        finish(c)
    return 128 + signal.Signals[stopped].value if stopped else 0


def _run_steps(c: Check, args):
    """Run the planned steps; return the name of the stop signal that ended the run early, or None."""
    stopped = None
    for name, timeout in plan(args):
        if stopped:
            c.steps.append(dict(name=name, status="skipped", seconds=0, detail=f"the check got {stopped}"))
            continue
        left = c.remaining()
        if left < MIN_STEP_S:
            c.steps.append(dict(name=name, status="skipped", seconds=0, detail="out of time"))
            c.say(f"[gpu_check] {name}: skipped (out of time)")
            continue
        t = min(timeout, left)
        c.say(f"[gpu_check] {name} (timeout {t:.0f} s) ...")
        t0 = time.monotonic()
        try:
            fn = STEP_FNS.get(name) or (lambda c_, t_, n=name: _bench(c_, n, t_))
            status, detail = fn(c, t)
        except Stopped as e:
            stopped = str(e)
            status, detail = "killed", f"the check got {stopped} during this step"
        except Exception as e:  # noqa: BLE001 - a broken step is reported and the run goes on
            status, detail = "error", f"{type(e).__name__}: {e}"
        c.steps.append(dict(name=name, status=status, seconds=time.monotonic() - t0, detail=detail))
        c.say(f"[gpu_check] {name}: {status} in {time.monotonic() - t0:.0f} s: {detail}")
        if status not in ("ok", "skipped"):
            log = c.logs / f"{name}.log"
            if log.exists():
                c.say("  " + "\n  ".join(log.read_text(errors="replace").splitlines()[-12:]))
        if not stopped:
            try:
                write_report(c)
            except Exception as e:  # noqa: BLE001 - the provisional report must not end the run
                c.say(f"[gpu_check] provisional report failed: {type(e).__name__}: {e}")
    return stopped


# ------------------------------------------------------------------------------------------------ internals
def internal_env():
    sys.path[:0] = [str(HERE), str(ROOT)]
    import report
    env = report.environment()
    env["cpus"] = os.cpu_count()
    print("ENV " + json.dumps(env), flush=True)
    return 0


def internal_record_aot(family, path):
    """Record the AOT compile test's workload ``family`` on the GPU (its tensors made on CUDA)."""
    sys.path[:0] = [str(ROOT)]
    import torch

    import tri_losses
    from tests import aot
    from tests.test_kernels_compile import FAMILIES
    torch.set_default_device("cuda")
    failed = []
    with aot.record_jit_launches() as jobs:
        try:
            FAMILIES[family](tri_losses)
        except Exception as e:  # noqa: BLE001 - the launches before the failure still count
            failed.append(f"{family}: {type(e).__name__}: {e}")
    pathlib.Path(path).write_text(json.dumps(dict(jobs=list(jobs.values()), failed=failed)))
    return 0


def internal_precompile(work: pathlib.Path, quick: bool, budget: float):
    """Record in parallel processes (one per workload), then compile every distinct launch in a pool. The
    recording gets half of the step's ``budget`` (a workload still running then is killed: its launches
    are JIT-compiled later, the others' are compiled here), the compile the rest: kernels compiled before
    the step's own timeout stay in Triton's cache (the first GPU run spent all 150 s recording and compiled
    nothing)."""
    sys.path[:0] = [str(ROOT)]
    from tests import aot
    rec = work / "recorded"
    rec.mkdir(exist_ok=True)
    workloads = [[PY, HERE / "run.py", "--record", rec / f"bench-{f}.json", "--goal", "--families", f]
                 + (["--quick"] if quick else [])
                 for f in (["cross_entropy", "linear_cross_entropy", "ctc"]
                           + ([] if quick else ["catalogue", "sampled", "text"]))]
    if not quick:
        from tests.test_kernels_compile import FAMILIES
        workloads += [[PY, HERE / "gpu_check.py", work, "--_record_aot", f, rec / f"aot-{f}.json"] for f in FAMILIES]
    t0 = t_start = time.monotonic()
    procs = [subprocess.Popen([str(x) for x in w], cwd=ROOT) for w in workloads]
    for p in procs:
        try:
            p.wait(timeout=max(1.0, 0.5 * budget - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    record_s = time.monotonic() - t0
    jobs, record_failures = {}, []
    for f in sorted(rec.glob("*.json")):
        d = json.loads(f.read_text())
        record_failures += d["failed"]
        for j in d["jobs"]:
            jobs.setdefault(json.dumps([j["module"], j["kernel"], j["spec"]]), j)
    record_failures += [f"workload {' '.join(map(str, w[1:]))}: exit {p.returncode}"
                        for w, p in zip(workloads, procs) if p.returncode]
    n = os.cpu_count() or 4
    t0 = time.monotonic()
    # the compile stops 10 s before the step's timeout, so that what it did is written and reported
    left = max(5.0, budget - (t0 - t_start) - 10)
    failures = aot.compile_all(list(jobs.values()), procs=n, timeout=left)
    late = [f for f in failures if f[2].startswith(aot.DEADLINE)]
    failures = [f for f in failures if not f[2].startswith(aot.DEADLINE)]
    res = dict(workloads=len(workloads), recorded=len(jobs), record_failures=record_failures, record_s=record_s,
               compiled=len(jobs) - len(failures) - len(late), not_compiled=len(late),
               compile_failures=[list(f) for f in failures], compile_s=time.monotonic() - t0, procs=n)
    (work / "precompile.json").write_text(json.dumps(res, default=str))
    print(json.dumps({k: v for k, v in res.items() if k != "compile_failures"}, default=str))
    for k, cx, e in failures:
        print(f"compile failure {k} {cx}:\n{e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
