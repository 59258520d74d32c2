"""The GPU check's CPU-side parts: arguments and step plan, the step-timeout runner, the test subset, the
results/goals/summary writers on synthetic rows, a short dry run, and that a launch recorded through
Triton's JIT hook and precompiled by ``tests/aot.py`` is a cache hit for the later JIT launch."""
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from tests import aot

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402
import gpu_subset  # noqa: E402
import report  # noqa: E402


def _env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


# ------------------------------------------------------------------------------------------------ arguments
def test_gpu_check_arguments_defaults_and_errors():
    a = gpu_check.parse_args(["out"])
    assert (a.out, a.quick, a.dry_run, a.budget) == ("out", False, False, 420.0)
    assert gpu_check.parse_args(["out", "--quick"]).budget == 180.0
    assert gpu_check.parse_args(["out", "--budget", "99"]).budget == 99.0
    for bad in ([], ["out", "--steps", "env,nope"], ["out", "--budget", "0"], ["out", "--budget", "x"],
                ["out", "--budget", "nan"], ["out", "--budget", "inf"],  # (NaN switched the budget off)
                [""], ["out", "--bud", "5"]):  # (abbreviations would bypass gpu_check.sh's path rewriting)
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)


def test_bench_runner_arguments():
    import run as bench_run
    a = bench_run.parse_args(["--quick", "--families", "ctc,cross_entropy"])
    assert a.quick and a.families == "ctc,cross_entropy" and a.rows is None and a.record is None
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--families", "ctc,nope"])


def test_peer_import_survives_a_lazy_module_getattr(tmp_path, monkeypatch):
    """A peer whose module ``__getattr__`` raises ImportError for names it lacks (Liger without
    transformers) still imports; a missing or broken peer is a reason, not an exception."""
    import _common
    (tmp_path / "lazy_peer.py").write_text("X = 1\n\ndef __getattr__(name):\n    raise ImportError(name)\n")
    (tmp_path / "broken_peer.py").write_text("raise RuntimeError('no device')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mod, why = _common.try_import("lazy_peer")
    assert why is None and mod.X == 1
    assert _common.try_import("broken_peer") == (None, "RuntimeError: no device")
    mod, why = _common.try_import("no_such_peer_module")
    assert mod is None and why.startswith("ModuleNotFoundError")


def test_forced_triton_on_cpu_tensors_is_skipped_on_a_cuda_machine(tmp_path):
    """On a CUDA machine (faked here: conftest's HAS_CUDA set, no interpreter) a test forcing the Triton
    backend on CPU tensors is reported as skipped; any other error still fails."""
    (tmp_path / "fake_cuda.py").write_text("import tests.conftest as c\nc.HAS_CUDA = True\n")
    (tmp_path / "test_probe.py").write_text(
        "import torch\nimport tri_losses\n\n\ndef test_forced_triton_on_cpu():\n"
        "    tri_losses.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), backend='triton')\n\n\n"
        "def test_other_error():\n    raise RuntimeError('boom')\n")
    env = dict(_env(), TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                        "-p", "fake_cuda", "-rs", str(tmp_path / "test_probe.py")],
                       capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert "1 failed, 1 skipped" in r.stdout and "needs TRITON_INTERPRET=1" in r.stdout, r.stdout[-3000:] + r.stderr


def test_gpu_check_plan_order_and_quick_subset():
    full = [n for n, _ in gpu_check.plan(gpu_check.parse_args(["o"]))]
    quick = gpu_check.plan(gpu_check.parse_args(["o", "--quick"]))
    assert full[:3] == ["env", "install", "precompile"]
    # when time is short: versions+install, CE, LCE and CTC goal shapes, the test subset, the rest
    assert full.index("bench-ce") < full.index("bench-lce") < full.index("bench-ctc") < full.index("tests-subset")
    assert full.index("tests-subset") < full.index("tests-gpu") < full.index("graphs") < full.index("bench-rest")
    qn = [n for n, _ in quick]
    assert set(qn) < set(full) and "bench-rest" not in qn and "tests-gpu" not in qn
    fullt = dict(gpu_check.plan(gpu_check.parse_args(["o"])))
    assert all(t <= fullt[n] for n, t in quick)
    # --steps: the setup steps first, the others in the order named (a repeat runs once)
    named = ["o", "--steps", "bench-rest,graphs,env,precompile,bench-ce,graphs,install"]
    assert [n for n, _ in gpu_check.plan(gpu_check.parse_args(named))] == [
        "env", "install", "precompile", "bench-rest", "graphs", "bench-ce"]


# ------------------------------------------------------------------------------------------------ runner
def test_step_runner_returns_code_and_output(tmp_path):
    log = tmp_path / "s.log"
    rc, secs, to = gpu_check.run_with_timeout([sys.executable, "-c", "print('hello'); raise SystemExit(3)"], 60, log,
                                              env=_env())
    assert (rc, to) == (3, False)
    assert "hello" in log.read_text()


def test_step_runner_kills_the_whole_process_group_on_timeout(tmp_path):
    marker = tmp_path / "grandchild-survived"
    child = ("import subprocess, sys, time\n"
             "subprocess.Popen([sys.executable, '-c', 'import sys, time; time.sleep(3); open(sys.argv[1], \"w\")',"
             " sys.argv[1]])\n"
             "time.sleep(60)\n")
    t0 = time.monotonic()
    rc, secs, to = gpu_check.run_with_timeout([sys.executable, "-c", child, marker], 1.5, tmp_path / "s.log",
                                              env=_env())
    assert to and rc != 0 and secs < 15 and time.monotonic() - t0 < 15, (rc, secs, to)
    time.sleep(4)
    assert not marker.exists(), "a grandchild of a timed-out step kept running"
    assert "killed after" in (tmp_path / "s.log").read_text()


# ------------------------------------------------------------------------------------------------ test subset
class _Item:
    def __init__(self, path, name, **params):
        self.fspath, self.name, self.nodeid, self.params = path, name, f"{path}::{name}", params


def test_quick_selects_a_subset_of_the_full_selection():
    items = [_Item("tests/test_cross_entropy.py", f"test_ce_values[{b}-{d}-{i}]", backend=b, dtype=d)
             for b in ("triton", "torch") for d in ("torch.float32", "torch.bfloat16", "torch.float16") for i in (0, 1)]
    items += [_Item("tests/test_cross_entropy.py", "test_ce_bad_input"),
              _Item("tests/test_cross_entropy.py", "test_ce_torch_compile[triton]", backend="triton"),
              _Item("tests/test_sampled.py", "test_sampled_values[triton]", backend="triton"),
              _Item("tests/test_kernels_compile.py", "test_every_kernel_compiles_for_sm90")]
    items += [_Item("tests/test_ctc.py", f"test_ctc_many[{i}]", backend="triton") for i in range(12)]
    full, dropped = gpu_subset.select(items, "full")
    assert {i.name for i in dropped} == {"test_ce_torch_compile[triton]", "test_every_kernel_compiles_for_sm90"} | {
        f"test_ce_values[{b}-torch.float16-{i}]" for b in ("triton", "torch") for i in (0, 1)} | {
        f"test_ctc_many[{i}]" for i in range(gpu_subset.FULL_PER_FUNCTION, 12)}
    assert sum(i.params.get("backend") == "torch" for i in full) == 4  # both backends in the full subset
    quick, _ = gpu_subset.select(items, "quick")
    assert set(quick) < set(full)
    names = [i.name for i in quick]
    assert "test_ce_bad_input" in names and "test_sampled_values[triton]" not in names
    assert all(i.params.get("backend", "triton") == "triton" for i in quick)
    assert not any("float16" in n and "bfloat16" not in n for n in names)
    assert sum(n.startswith("test_ce_values") for n in names) == gpu_subset.QUICK_PER_FUNCTION
    with pytest.raises(ValueError, match="TRI_LOSSES_TEST_SUBSET"):
        gpu_subset.select(items, "fast")


def test_full_subset_spreads_over_parameter_values():
    """A (path x family) grid larger than the cap keeps both paths and as many families as fit, in
    collection order (the first FULL_PER_FUNCTION collected would all be one path)."""
    fams = [f"fam{k:02d}" for k in range(12)]
    items = [_Item("tests/test_hf.py", f"test_family[{b}-{p}-{f}]", backend=b, fused=p, model_type=f)
             for b in ("triton", "torch") for p in (False, True) for f in fams]
    full, dropped = gpu_subset.select(items, "full")
    assert len(full) == 2 * gpu_subset.FULL_PER_FUNCTION and len(dropped) == len(items) - len(full)
    for b in ("triton", "torch"):
        mine = [i for i in full if i.params["backend"] == b]
        assert {i.params["fused"] for i in mine} == {False, True}
        assert len({i.params["model_type"] for i in mine}) == gpu_subset.FULL_PER_FUNCTION
    assert [i for i in items if i in full] == full  # collection order kept
    # parameter values shown with an address (lambdas, objects) select the same in every process
    calls = [_Item("tests/test_misc.py", f"test_bad[{k}]", call=lambda: None, what=str(k)) for k in range(12)]
    kept, _ = gpu_subset.select(calls, "full")
    assert [i.name for i in kept] == [f"test_bad[{k}]" for k in range(gpu_subset.FULL_PER_FUNCTION)]


# ------------------------------------------------------------------------------------------------ report
def _rows():
    ce = dict(family="cross_entropy", dtype="bfloat16", variant="mean", goal_shape=True)
    rows = []
    for V, pct, ms, liger, eager in ((32768, 95.0, 1.0, 1.2, 3.0), (262144, 80.0, 8.0, 12.0, 16.0)):
        case = f"N=16384,V={V}"
        rows += [dict(ce, case=case, provider="tri_losses", fwdbwd_ms=ms, floor_pct=pct, ratio_1r1w=150 / pct),
                 dict(ce, case=case, provider="tri_losses inplace_backward", fwdbwd_ms=ms, ratio_1r1w=1.1),
                 dict(ce, case=case, provider="liger", fwdbwd_ms=liger),
                 dict(ce, case=case, provider="torch-eager", fwdbwd_ms=eager)]
    rows.append(dict(family="cross_entropy", case="N=16384,V=32768", dtype="bfloat16", provider="quack",
                     variant="mean", note="not run: ModuleNotFoundError"))
    lce = dict(family="linear_cross_entropy", case="N=1024,D=512,V=32000", dtype="float32", variant="mean",
               cpu_fallback=True)
    rows += [dict(lce, provider="tri_losses (torch backend)", fwdbwd_ms=130.0),
             dict(lce, provider="torch-eager", fwdbwd_ms=100.0)]
    return rows


def test_goals_take_the_worst_shape_and_say_met_or_not():
    goals = {g["id"]: g for g in report.evaluate_goals(_rows())}
    g = goals["ce-floor"]
    assert (g["figure"], g["status"], g["shapes"]) == (80.0, "not met", 2)
    assert math.isclose(g["ratio"], 80 / 90)
    assert math.isclose(goals["ce-eager"]["figure"], 2.0)  # 16 / 8 at V=256k beats 3 / 1 at V=32k
    assert math.isclose(goals["ce-liger"]["figure"], 1.2) and goals["ce-liger"]["status"] == "met"
    assert math.isclose(goals["ce-liger-big"]["figure"], 1.5)  # V=32k excluded
    assert goals["ce-1r1w"]["figure"] == 1.1 and goals["ce-1r1w"]["status"] == "met"  # best path per shape
    assert math.isclose(goals["cpu-lce"]["figure"], 1.3) and math.isclose(goals["cpu-lce"]["ratio"], 1.4 / 1.3)
    assert goals["lce-tflops"]["status"] == goals["ctc-native"]["status"] == "no data"


def test_results_and_summary_writers(tmp_path):
    rows = _rows()
    meta = dict(env=dict(device="NVIDIA H200", torch="2.11", triton="3.6.0"), copy_gbs=4300.0, mode="goal shapes")
    paths = report.write_results(rows, meta, tmp_path, report.slug("NVIDIA H200"))
    assert paths[0].name == "nvidia-h200.md" and paths[1].name == "nvidia-h200.json"
    md = paths[0].read_text()
    assert "NVIDIA H200" in md and "4300 GB/s" in md and "not run: ModuleNotFoundError" in md
    assert md.count("| cross_entropy |") == 9
    data = json.loads(paths[1].read_text())
    assert data["rows"] == json.loads(json.dumps(rows)) and data["meta"]["env"]["device"] == "NVIDIA H200"
    assert {g["id"] for g in data["meta"]["goals"]} >= {"ce-floor", "lce-tflops", "ctc-native", "cpu-ctc"}
    steps = [dict(name="env", status="ok", seconds=3.2, detail="torch 2.11"),
             dict(name="tests-subset", status="failed", seconds=100, detail="90 passed, 2 failed")]
    s = report.summary_markdown(steps, report.evaluate_goals(rows), meta["env"])
    assert "| tests-subset | failed | 100 | 90 passed, 2 failed |" in s
    assert "| CE bf16 fwd+bwd, % of the 2R+1W floor (N=16384, V=32k/128k/256k) | 80 | >= 90 | 0.8889 | not met |" in s


_STOPPED_CHECK = r"""
import json, sys
sys.path[:0] = [sys.argv[1] + "/bench", sys.argv[1]]
import gpu_check
out, marker = sys.argv[2], sys.argv[3]
ROW = dict(family="cross_entropy", case="N=16384,V=32768", dtype="bfloat16", provider="tri_losses",
           variant="mean", fwdbwd_ms=1.0)

def finished_bench(c, t):
    (c.work / "bench-ce.json").write_text(json.dumps(dict(rows=[ROW], meta={})))
    return "ok", "1 rows"

def hung_step(c, t):  # a step whose child ignores SIGTERM and would write the marker 6 s in, if left running
    c.sh("bench-lce", [sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGTERM, "
                       "signal.SIG_IGN); print('child up', flush=True); time.sleep(6); open(sys.argv[1], 'w')",
                       marker], t)
    return "ok", ""

gpu_check.STEP_FNS.update({"bench-ce": finished_bench, "bench-lce": hung_step})
sys.exit(gpu_check.main([out, "--dry-run", "--steps", "bench-ce,bench-lce,graphs", "--budget", "200"]))
"""


@pytest.mark.parametrize("how", ["sigterm_twice", "sighup_reader_gone"])
def test_a_stopped_check_kills_its_step_and_keeps_what_finished(tmp_path, how):
    """SIGTERM to the check (a device tool's timeout) while a step runs, or SIGHUP once the reader of its output
    has gone (a closed session): the step's process group (its own session) is killed, also when a second
    signal comes during the kill, the later steps are reported as skipped, and OUT holds the finished step's
    rows, the summary and the logs; after each step the rows and a provisional summary were already in OUT
    (a SIGKILL, which no handler sees, keeps those). The exit status says which signal stopped it."""
    import signal
    out, marker = tmp_path / "out", tmp_path / "child-survived"
    p = subprocess.Popen([sys.executable, "-c", _STOPPED_CHECK, str(ROOT), str(out), str(marker)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=tmp_path)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:
        log = out / "gpu_check.log"
        if log.exists() and "bench-lce (timeout" in log.read_text():
            break
        time.sleep(0.2)
    provisional = (out / "summary.md").read_text()  # written after bench-ce, before bench-lce started
    assert "| bench-ce | ok |" in provisional and "had not finished" in provisional
    assert json.loads((out / "dry-run.json").read_text())["rows"][0]["fwdbwd_ms"] == 1.0
    time.sleep(1.0)
    if how == "sigterm_twice":
        p.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        p.send_signal(signal.SIGTERM)  # a second signal during the kill changes nothing
        text = p.communicate(timeout=60)[0]
        sig = signal.SIGTERM
    else:
        p.stdout.close()  # the check's next print fails: its log file still gets everything
        p.send_signal(signal.SIGHUP)
        p.wait(timeout=60)
        text, sig = (out / "gpu_check.log").read_text(), signal.SIGHUP
    assert p.returncode == 128 + sig, text[-3000:]  # the check says it was stopped
    time.sleep(7)
    assert not marker.exists(), "the running step's child outlived the stopped check"
    summary = (out / "summary.md").read_text()
    assert "| bench-ce | ok |" in summary and "| bench-lce | killed |" in summary, summary
    assert "| graphs | skipped |" in summary and sig.name in summary and "logs.tar.gz" in summary
    assert json.loads((out / "dry-run.json").read_text())["rows"][0]["provider"] == "tri_losses"
    with tarfile.open(out / "logs.tar.gz") as t:
        assert "logs/bench-lce.log" in t.getnames()


def test_pytest_plugins_are_found_in_the_install_steps_site(tmp_path):
    """pytest-xdist / pytest-timeout carried as wheels are installed into the temporary site, which only the
    steps' PYTHONPATH has: the check looks there too."""
    c = gpu_check.Check(gpu_check.parse_args([str(tmp_path / "out"), "--dry-run"]))
    assert not gpu_check.has_module(c, "no_such_module_here")
    (c.site / "no_such_module_here").mkdir()
    (c.site / "no_such_plugin.py").write_text("")
    assert gpu_check.has_module(c, "no_such_module_here") and gpu_check.has_module(c, "no_such_plugin")
    assert gpu_check.has_module(c, "json")
    import shutil
    shutil.rmtree(c.work)


def test_graph_replay_comparison_bitwise_rounding_or_fail():
    """The graphs step's verdict: bitwise is ok; a replay off by rounding (cuBLAS may pick another algorithm
    on the capture's stream) is ok and says so; more, or another NaN pattern, fails."""
    import torch
    import cuda_graphs
    a = torch.randn(64, dtype=torch.float32)
    g = torch.randn(8, 16).to(torch.bfloat16)
    assert cuda_graphs.compare([a, g], [a.clone(), g.clone()]) == dict(status="ok", detail="")
    r = cuda_graphs.compare([a * (1 + 2e-7), g], [a, g])
    assert r["status"] == "ok" and "not bitwise" in r["detail"]
    assert cuda_graphs.compare([a, g * 1.01], [a, g])["status"] == "ok"  # a bf16 ulp or two
    assert cuda_graphs.compare([a * 1.001, g], [a, g])["status"] == "FAIL"
    nan = a.clone()
    nan[3] = float("nan")
    assert "NaN" in cuda_graphs.compare([nan, g], [a, g])["detail"]
    inf = a.clone()
    inf[5] = float("inf")
    near = inf.clone()
    near[0] = near[0] * (1 + 2e-7)
    assert cuda_graphs.compare([near, g], [inf, g])["status"] == "ok"  # the same infinity, rounding elsewhere
    near[5] = -near[5]
    assert "infinities" in cuda_graphs.compare([near, g], [inf, g])["detail"]


def test_junit_counts_sum_suites(tmp_path):
    p = tmp_path / "j.xml"
    p.write_text('<testsuites><testsuite tests="5" failures="1" errors="0" skipped="2"/>'
                 '<testsuite tests="3" failures="0" errors="1" skipped="0"/></testsuites>')
    assert gpu_check._junit_counts(p) == dict(tests=8, failures=1, errors=1, skipped=2)


def test_dry_run_writes_summary_and_logs(tmp_path):
    """(Called from another directory with relative OUT and --wheels: they are the caller's, not the
    checkout's, paths.)"""
    out = tmp_path / "out"
    r = subprocess.run([str(ROOT / "bench" / "gpu_check.sh"), "out", "--dry-run", "--steps", "env,graphs",
                        "--wheels", "."], capture_output=True, text=True, env=_env(), timeout=300, cwd=tmp_path)
    assert not (ROOT / "out").exists()
    assert r.returncode == 0, r.stdout + r.stderr
    summary = (out / "summary.md").read_text()
    assert "| env | ok |" in summary and "| graphs | skipped |" in summary
    assert r.stdout.rstrip().endswith(summary.rstrip())  # the summary is printed last
    with tarfile.open(out / "logs.tar.gz") as t:
        assert {"logs/env.log", "logs/graphs.log"} <= set(t.getnames())


def test_bench_families_write_floor_and_per_row_rows_on_cpu(monkeypatch):
    """The bench harness at smoke shapes (goal mode, no torch.compile): the copy-bandwidth probe gives a finite
    rate and floor_pct follows it; CE, element-wise and sampled rows come in the scalar-upstream ("mean") and
    the random per-row / per-element upstream ("none") variants, the memory-bound ones with a % of the byte
    floor; peers that cannot run (Liger, flash-attn and QuACK need CUDA or are absent) are rows saying so,
    Liger's saying it runs in place without a clone; tri_losses' CE rows agree with eager PyTorch."""
    import math

    import _common
    import bench_catalogue
    import bench_cross_entropy
    import bench_sampled
    import torch
    cpu = torch.device("cpu")
    monkeypatch.setitem(_common.MODE, "goal", True)
    monkeypatch.setitem(_common.MODE, "no_compile", True)
    bw = _common.copy_bandwidth(cpu)
    assert bw > 0 and math.isfinite(bw)
    assert _common.floor_pct(bw * 1e9 * 1e-3, 2.0, cpu) == pytest.approx(50.0)  # 1 ms of bytes in 2 ms
    import tri_losses
    with tri_losses.use_backend("torch"):  # (the rows' name: the interpreter that conftest enables is not timed)
        ce = bench_cross_entropy.run(cpu, True)
        ew = bench_catalogue.elementwise_rows(cpu, True)
        sm = bench_sampled.run(cpu, True)
    variants = {(r["provider"], r.get("variant")) for r in ce if r.get("fwdbwd_ms")}
    assert {("tri_losses (torch backend)", "mean"), ("tri_losses (torch backend)", "none, per-row g"),
            ("torch-eager", "mean"), ("torch-eager", "none, per-row g")} <= variants, variants
    tri = [r for r in ce if r["provider"] == "tri_losses (torch backend)"]
    assert all(r["floor_pct"] > 0 for r in tri)
    assert all(r["check_ok"] for r in tri if r["variant"] == "mean")
    notes = {r["provider"]: r.get("note", "") for r in ce}
    assert all(notes[p].startswith("not run:") for p in ("liger", "flash-attn", "quack")), notes
    assert "no clone" in [p for p in bench_cross_entropy._providers(cpu, 0.0, 0.0) if p.name == "liger"][0].note
    assert {r["variant"] for r in ew} == {"mean", "none, per-elem g"}
    assert all(r["floor_pct"] > 0 for r in ew)
    per_row = {r["provider"] for r in sm if r.get("variant") == "none, per-row g" and r.get("fwdbwd_ms")}
    assert per_row == {"tri_losses dense", "torch composite dense"}, per_row


def test_failed_rows_count_failed_cases_and_families():
    """A row whose whole case failed (e.g. out of memory making its data) counts as a failure (the step said
    "ok" for it), as a failed provider run or family does; notes such as "not run" do not."""
    rows = [{"note": "case failed: OutOfMemoryError"}, {"note": "failed: RuntimeError"},
            {"note": "family failed: ImportError"}, {"note": "not run: ModuleNotFoundError"}, {"note": ""}, {}]
    assert gpu_check.failed_rows(rows) == 3


def test_install_step_keeps_to_its_timeout_and_names_a_hung_peer_import(tmp_path, monkeypatch):
    """The install step's sub-calls share its time (a hung peer import ran its own 60 s past the step's
    timeout) and a peer whose import gave no result is reported as such, the step partial (it vanished
    from the report and the step said ok)."""
    (tmp_path / "hang_peer.py").write_text("import time\ntime.sleep(60)\n")
    (tmp_path / "fine_peer.py").write_text("")
    args = gpu_check.parse_args([str(tmp_path / "out"), "--dry-run", "--wheels", str(tmp_path / "none")])
    c = gpu_check.Check(args)
    c.env["PYTHONPATH"] = str(tmp_path) + os.pathsep + c.env["PYTHONPATH"]
    monkeypatch.setattr(gpu_check, "PEERS", {"fine_peer": "fine", "hang_peer": "hang"})
    t0 = time.monotonic()
    status, detail = gpu_check.step_install(c, 6)
    assert time.monotonic() - t0 < 20, detail
    assert status == "partial"
    assert "fine_peer ok" in detail and "hang_peer no result" in detail, detail


def test_steps_that_no_longer_fit_the_budget_are_skipped(tmp_path):
    r = subprocess.run([str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "out"), "--dry-run", "--budget", "1"],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert all(f"| {n} | skipped | 0 | out of time |" in summary for n in gpu_check.STEPS
               if n not in gpu_check.OPTIONAL)
    assert "| tune |" not in summary  # optional: only when named in --steps


# ------------------------------------------------------------------------------------------------ tune
def test_tune_step_only_when_named():
    for argv in (["o"], ["o", "--quick"]):
        assert "tune" not in [n for n, _ in gpu_check.plan(gpu_check.parse_args(argv))]
    assert [n for n, _ in gpu_check.plan(gpu_check.parse_args(["o", "--steps", "env,tune"]))] == ["env", "tune"]
    import tune
    a = tune.parse_args(["x.json"])
    assert a.budget == 240.0 and a.targets.split(",") == list(tune.TARGETS)
    assert tune.parse_args(["x.json", "--quick"]).budget == 100.0
    for bad in (["x.json", "--targets", "lce-fwd,nope"], ["x.json", "--budget", "-1"]):
        with pytest.raises(SystemExit):
            tune.parse_args(bad)


def test_tune_best_table_skips_wrong_and_failed_candidates():
    import tune
    base = dict(target="t", case="c", variant="v")
    rows = [dict(base, value=1, current=True, ms=2.0, grad_norm=10.0),
            dict(base, value=2, current=False, ms=1.5, grad_norm=10.0 * (1 + 1e-4)),
            dict(base, value=3, current=False, ms=0.5, grad_norm=11.0),     # fast but wrong
            dict(base, value=4, current=False, error="OutOfResources: shared memory")]
    assert [r["value"] for r in tune.mismatched(rows)] == [3]
    (b,) = tune.best_table(rows)
    assert (b["current"], b["best"], b["current_ms"], b["best_ms"]) == (1, 2, 2.0, 1.5)
    assert b["speedup"] == pytest.approx(2.0 / 1.5)
    md = tune.markdown(rows, dict(device="X", mode="full", seconds=3))
    assert "| t | c | v | 1 | 2.000 | 2 | 1.500 | 1.33x |" in md and "OutOfResources" in md and "11" in md


def test_tune_table_swap_is_restored_and_smoke_run_writes_results(tmp_path):
    import types

    import tune
    m = types.SimpleNamespace(T={"a": 1})
    with tune.swapped(m, "T", {"a": 2}):
        assert m.T == {"a": 2}
    assert m.T == {"a": 1}
    out = tmp_path / "tune.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "tune.py"), str(out), "--smoke", "--targets",
                        "ce-rows,ctc-warps"], capture_output=True, text=True,
                       env=dict(_env(), TRITON_INTERPRET="1"), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    d = json.loads(out.read_text())
    assert {row["target"] for row in d["rows"]} == {"ce-rows", "ctc-warps"}
    assert all("ms" in row and row["grad_norm"] > 0 for row in d["rows"])
    assert sum(row["current"] for row in d["rows"]) == 2  # one current entry per target
    assert not tune.mismatched(d["rows"])  # every candidate computes the same gradients
    assert "| ce-rows |" in out.with_suffix(".md").read_text()


def test_tune_keeps_its_timings_when_stopped(tmp_path):
    """The GPU check stops a step at its timeout with SIGTERM: tune.py writes its results after each target
    and, when stopped, what it measured so far with a note (it wrote them only at the end: the step's
    timings were all lost)."""
    out = tmp_path / "tune.json"
    p = subprocess.Popen([sys.executable, str(ROOT / "bench" / "tune.py"), str(out), "--smoke", "--targets",
                          "ce-rows," + ",".join(["ctc-warps"] * 40)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=dict(_env(), TRITON_INTERPRET="1"))
    try:
        t0 = time.monotonic()
        while not out.exists() and p.poll() is None and time.monotonic() - t0 < 200:
            time.sleep(0.05)
        assert p.poll() is None, "tune.py ended before it was stopped"
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        p.kill()
    d = json.loads(out.read_text())
    assert d["meta"]["note"].startswith("killed at the step's timeout during ")
    assert "ce-rows" in {row["target"] for row in d["rows"]}
    assert d["meta"]["note"] in out.with_suffix(".md").read_text()


# ------------------------------------------------------------------------------------------------ precompile
_BARRIER = r"""
import json, os, sys, time
d = os.environ["AOT_BARRIER_DIR"]
jobs = [json.loads(ln) for ln in sys.stdin if ln.strip()]  # (the compiler's loop reads its jobs the same way)
open(os.path.join(d, str(os.getpid())), "w").close()
t0 = time.monotonic()
while len(os.listdir(d)) < int(os.environ["AOT_BARRIER_N"]) and time.monotonic() - t0 < 30:
    time.sleep(0.05)
together = len(os.listdir(d)) >= int(os.environ["AOT_BARRIER_N"])
for j in jobs:
    print("RES " + json.dumps(dict(SHARED=0, ROWS=[], job=j["kernel"]) if together else dict(error="ran alone")))
"""


def test_compile_processes_run_at_the_same_time(tmp_path, monkeypatch):
    """``aot.compile_jobs`` (the GPU check's precompile, the sm_90 compile test) hands every process its jobs
    at once: each stand-in compiler here waits (up to 30 s) until all of them have started on their jobs.
    Fed one after another (each process's input only once the previous one had exited), they ran one at a
    time: the GPU check's 16 precompile processes did the work of one."""
    monkeypatch.setattr(aot, "_SCRIPT", _BARRIER)
    monkeypatch.setenv("AOT_BARRIER_DIR", str(tmp_path))
    monkeypatch.setenv("AOT_BARRIER_N", "3")
    jobs = [dict(kernel=f"k{i}") for i in range(7)]
    t0 = time.monotonic()
    res = aot.compile_jobs(jobs, procs=3)
    assert [r.get("job") for r in res] == [j["kernel"] for j in jobs], res
    assert time.monotonic() - t0 < 25
    assert aot.compile_failures(jobs, res, check_rows=True) == []



_SLOW = r"""
import json, sys, time
for n, ln in enumerate(sys.stdin.read().splitlines()):
    if n:  # the first job compiles at once, the next one never finishes
        time.sleep(60)
    print("RES " + json.dumps(dict(SHARED=0, ROWS=[], job=json.loads(ln)["kernel"])), flush=True)
"""


def test_compile_deadline_keeps_the_finished_jobs(monkeypatch):
    """At its ``timeout`` ``aot.compile_jobs`` stops the processes still compiling; the jobs they finished keep
    their results and the others say they were left out (the GPU check's precompile reports them as left to
    the JIT). Before, the timeout raised out of it and every result was lost with the step's report."""
    monkeypatch.setattr(aot, "_SCRIPT", _SLOW)
    jobs = [dict(kernel=f"k{i}") for i in range(4)]
    t0 = time.monotonic()
    res = aot.compile_jobs(jobs, procs=2, timeout=3)
    assert time.monotonic() - t0 < 30
    assert [r.get("job") for r in res] == ["k0", "k1", None, None], res
    assert all(r["late"] and r["error"].startswith(aot.DEADLINE) for r in res[2:]), res
    assert [f[0] for f in aot.compile_failures(jobs, res)] == ["k2", "k3"]

_PROBE_KERNEL = '''
import triton
import triton.language as tl


@triton.jit
def probe_kernel(x_ptr, y_ptr, n, one, stride, scale, FLAG: tl.constexpr, DT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    m = offs < n * one
    v = tl.load(x_ptr + offs * stride, mask=m).to(DT)
    if FLAG:
        v = v * scale
    tl.store(y_ptr + offs, v, mask=m)


@triton.heuristics({"BLOCK": lambda args: 64})
@triton.jit
def wrapped_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)
'''

# Just enough of a CUDA driver for the JIT to reach its compile step (and the recorder's cache hook)
# without a GPU; pasted into the subprocess scripts below.
_FAKE_DRIVER = """
class FakeDriver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


driver.set_active(FakeDriver())
"""

_PROBE = r'''
import json, os, sys
sys.path[:0] = sys.argv[1:3]
import torch, triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from tests import aot
import aot_probe


FAKE_DRIVER
args = (torch.randn(64), torch.empty(65)[1:], 32, 1, 3, 0.5)  # aligned / misaligned pointers, int 1, %16 int
kw = dict(FLAG=True, DT=triton.language.float32, BLOCK=64, num_warps=2)
jobs = {}
knobs.runtime.jit_cache_hook = aot.record_hook(jobs, ("cuda", 90, 32))
skipped = aot_probe.probe_kernel.run(*args, grid=(1,), warmup=False, **kw)
knobs.runtime.jit_cache_hook = None
(job,) = jobs.values()
job = json.loads(json.dumps(job))  # as it travels between processes
pre = aot.compile_job(job)
entries = len(os.listdir(knobs.cache.dir))
jit = aot_probe.probe_kernel.run(*args, grid=(1,), warmup=True, **kw)  # the real JIT path, no launch
spec = json.loads(job["spec"])
spec["attrs_vals"] = [[] for _ in spec["attrs_vals"]]  # a lost divisibility attr must change the key
lost = aot.compile_job(dict(job, spec=json.dumps(spec)))
knobs.runtime.jit_cache_hook = aot.record_hook(jobs, ("cuda", 90, 32))
aot_probe.wrapped_kernel.run(args[0], args[1], 32, grid=(1,), warmup=False)  # a heuristics-wrapped kernel
knobs.runtime.jit_cache_hook = None
(wjob,) = [j for j in jobs.values() if j["kernel"] == "wrapped_kernel"]
wpre = aot.compile_job(json.loads(json.dumps(wjob)))
wjit = aot_probe.wrapped_kernel.run(args[0], args[1], 32, grid=(1,), warmup=True)
print("RESULT " + json.dumps(dict(skipped=skipped is None, pre=pre.hash, jit=jit.hash, lost=lost.hash,
                                  new_entries=len(os.listdir(knobs.cache.dir)) - entries,
                                  wrapped=[wpre.hash, wjit.hash])))
'''


@pytest.mark.parametrize("other_triton", [False, True], ids=["installed", "TRI_LOSSES_AOT_TRITON_PATH"])
def test_precompiled_launch_is_a_jit_cache_hit(tmp_path, other_triton):
    path = os.environ.get("TRI_LOSSES_AOT_TRITON_PATH")
    if other_triton and not path:
        pytest.skip("set TRI_LOSSES_AOT_TRITON_PATH to check a second Triton too")
    if not aot.cuda_target_available():
        pytest.skip("this Triton has no NVIDIA backend to compile with")
    (tmp_path / "aot_probe.py").write_text(_PROBE_KERNEL)
    env = _env()
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    if other_triton:
        env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _PROBE.replace("FAKE_DRIVER", _FAKE_DRIVER), str(ROOT), str(tmp_path)],
                       capture_output=True, text=True,
                       env=env, timeout=600, cwd=tmp_path)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and line, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(line[-1][7:])
    assert res["skipped"], "the recording hook must skip the compile and the launch"
    assert res["pre"] == res["jit"], "the precompiled kernel and the JIT's differ: the cache key logic broke"
    assert res["lost"] != res["pre"]
    # the JIT compiled nothing again: the new entries are the 'lost' variant and the wrapped kernel's precompile
    assert res["new_entries"] == 2, "the JIT compiled again instead of hitting the cache"
    assert res["wrapped"][0] == res["wrapped"][1], "a kernel under triton.heuristics is precompiled under another key"


_RECORD_WORKLOADS = r'''
import json, os, sys
sys.path[:0] = [sys.argv[1]]
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver


FAKE_DRIVER
import tri_losses
import tri_losses._backend as backend
from tests import aot
aot.kernel_modules()  # real JIT functions (imported before the test module's conftest sets TRITON_INTERPRET)
from tests.test_kernels_compile import FAMILIES
os.environ.pop("TRITON_INTERPRET", None)
backend.triton_can_run = lambda device: True  # CPU tensors take the Triton path: only launches are recorded
with aot.record_jit_launches() as jobs:
    for run in FAMILIES.values():
        run(tri_losses)
print("RESULT " + json.dumps(sorted({(j["module"], j["kernel"]) for j in jobs.values()})))
'''


def test_jit_hook_records_every_kernel_of_the_compile_workloads():
    """The GPU recorder (Triton's JIT hook) on the AOT test's workloads, on CPU: it sees every kernel the
    package defines, with no workload failing on the skipped launches' unwritten outputs."""
    if not aot.cuda_target_available():
        pytest.skip("this Triton has no NVIDIA backend")
    r = subprocess.run([sys.executable, "-c", _RECORD_WORKLOADS.replace("FAKE_DRIVER", _FAKE_DRIVER), str(ROOT)],
                       capture_output=True, text=True,
                       env=_env(), timeout=600, cwd=ROOT)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and line, r.stdout[-3000:] + r.stderr[-3000:]
    recorded = {tuple(k) for k in json.loads(line[-1][7:])}
    defined = aot.defined_kernels()
    assert defined and defined <= recorded, sorted(defined - recorded)


# ------------------------------------------------------------------------------------------------ agreement
def test_bench_agreement_check_flags_wrong_results():
    import torch

    import _common
    ref = [torch.tensor(2.0), torch.tensor([[1.0, -4.0], [0.5, 0.0]])]
    row = _common.agreement(dict(fwdbwd_ms=1.0, note="x"), [torch.tensor(2.0), ref[1] * (1 + 1e-5)], ref, "eager",
                            1e-3)
    assert row["check_ok"] and row["check"] == pytest.approx(1e-5, rel=0.05) and "agrees with eager" in row["note"]
    bad = ref[1].clone()
    bad[0, 0] += 0.1  # 0.1 / max|ref| = 2.5%
    row = _common.agreement(dict(fwdbwd_ms=1.0), [torch.tensor(2.0), bad], ref, "eager", 1e-2)
    assert not row["check_ok"] and row["check"] == pytest.approx(0.025) and "DIFFERS from eager" in row["note"]
    nan = ref[1].clone()
    nan[1, 1] = float("nan")
    assert _common.agreement(dict(fwdbwd_ms=1.0), [torch.tensor(2.0), nan], ref, "eager", 1)["check"] == math.inf
    assert _common.agreement(dict(fwdbwd_ms=1.0), [torch.tensor(2.0), None], ref, "eager", 1)["check"] == math.inf
    assert "check" not in _common.agreement(dict(note="failed: X"), ref, ref, "eager", 1)  # a failed row stays so
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    loss, grad = _common.outputs(lambda: (x * x).sum(), [x])
    assert loss.item() == 5.0 and grad.tolist() == [2.0, 4.0] and x.grad is None


def test_subset_failures_are_printed_as_they_happen_and_named_when_killed(tmp_path):
    """A test subset killed at its timeout leaves no junit XML: the plugin's one-line failure reports, printed
    at once, name the failed tests, and the step's summary lists their ids (not just their files)."""
    (tmp_path / "test_two.py").write_text("import pytest\n\n@pytest.mark.parametrize('v', [1, 2])\n"
                                          "def test_v(v):\n    assert v == 1, 'boom: v'\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(gpu_check.HERE), os.environ.get("PYTHONPATH", "")]),
               TRI_LOSSES_TEST_SUBSET="full")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "gpu_subset", "-p", "no:cacheprovider",
                          str(tmp_path / "test_two.py")], capture_output=True, text=True, env=env, cwd=tmp_path)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("[subset] FAILED")]
    assert len(lines) == 1 and "boom: v" in lines[0], out.stdout
    assert gpu_check.failed_tests(out.stdout) == ["test_two.py::test_v[2]"]


_KILLED_BENCH = r"""
import sys, time, types
sys.path[:0] = [sys.argv[1] + "/bench", sys.argv[1]]
import _common, run
fake = types.ModuleType("bench_fake")
def fake_run(device, smoke):
    _common.MEASURED.append(dict(family="fake", case="c1", dtype="float32", provider="p", fwdbwd_ms=1.0))
    print("[fake] measured", flush=True)
    time.sleep(120)
    return []
fake.run = fake_run
sys.modules["bench_fake"] = fake
run.FAMILIES = run.FAMILIES + ("fake",)
run.main(["--families", "catalogue,fake", "--rows", sys.argv[2], "--smoke", "--rep", "1", "--warmup", "1"])
"""


def test_bench_run_killed_at_its_timeout_keeps_the_rows_so_far(tmp_path):
    """A bench step killed at its timeout (SIGTERM, as the GPU check's step timeout sends) still writes its
    rows file: the finished families' rows, the running family's measured rows, and a row saying where it
    was killed (a killed step used to report no rows at all)."""
    import signal
    import time
    out = tmp_path / "rows.json"
    p = subprocess.Popen([sys.executable, "-c", _KILLED_BENCH, str(ROOT), str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=_env(), cwd=ROOT)
    seen = []
    t0 = time.monotonic()
    for line in p.stdout:
        seen.append(line)
        if line.startswith("[fake] measured") or time.monotonic() - t0 > 300:
            break
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, "".join(seen)[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) > 2 and rows[0]["family"] != "fake"  # the finished family's (catalogue's) rows
    assert rows[-2]["case"] == "c1" and "killed at the step's timeout during fake" in rows[-1]["note"]
