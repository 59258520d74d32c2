"""Results: the markdown table, JSON and plot of benchmark rows, the goals evaluated on them, the summary.

``write_results(rows, meta, out_dir, name)`` writes ``<name>.md``, ``<name>.json`` (rows, environment,
goals) and ``<name>.png`` (when matplotlib is installed). ``evaluate_goals(rows)`` checks the open issues'
goals on whatever rows exist (``no data`` otherwise). ``summary_markdown`` is the short table that
``bench/gpu_check.py`` prints last. Nothing here imports torch.
"""
from __future__ import annotations

import datetime
import json
import math
import pathlib
import platform
import subprocess

from _common import COLUMNS


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def environment() -> dict:
    """Versions and device of this process, for the results' header."""
    import importlib.metadata as md

    import torch
    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or "cpu"}
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        env["triton"] = "not importable"
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:  # noqa: BLE001
            env["driver"] = "unknown"
    else:
        import os
        env["device"] = f"CPU ({os.cpu_count()} cores)"
        env["load"] = f"{os.getloadavg()[0]:.1f} (1-minute load average at the end; a shared machine is noisy)"
    for dist in ("liger-kernel", "cut-cross-entropy", "quack-kernels", "flash-attn"):
        try:
            env[dist] = md.version(dist)
        except Exception:  # noqa: BLE001
            env[dist] = "not installed"
    return env


def _fmt(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


# ------------------------------------------------------------------------------------------------ goals
def _pick(rows, **kw):
    return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]


def _ms(rows, provider, **kw):
    """{case: fwdbwd_ms} of a provider's rows matching ``kw``."""
    return {r["case"]: r["fwdbwd_ms"] for r in _pick(rows, provider=provider, **kw) if _num(r.get("fwdbwd_ms"))}


def _ratio_by_case(num, den):
    """[num[case] / den[case]] over the cases both have."""
    return [num[c] / den[c] for c in num if c in den and den[c]]


def _field(rows, field, provider, **kw):
    return [r[field] for r in _pick(rows, provider=provider, **kw) if _num(r.get(field))]


def _extra_ratio(rows, mine, theirs, **kw):
    a = {r["case"]: r["extra_mb"] for r in _pick(rows, provider=mine, **kw) if _num(r.get("extra_mb"))}
    b = {r["case"]: r["extra_mb"] for r in _pick(rows, provider=theirs, **kw) if _num(r.get("extra_mb"))}
    return _ratio_by_case(a, b)


def _goal_specs():
    ce = dict(family="cross_entropy", dtype="bfloat16", variant="mean", goal_shape=True)
    lce = dict(family="linear_cross_entropy", variant="mean", goal_shape=True)
    ctc = dict(family="ctc", variant="mean", goal_shape=True)
    ew = dict(family="elementwise", dtype="bfloat16", variant="mean", goal_shape=True)
    sm = dict(family="sampled", variant="mean", goal_shape=True)
    lce_first = dict(lce, case="N=4096,D=4096,V=128256")
    tp = dict(family="distributed", variant="none, per-row g", goal_shape=True)
    # (id, text, target, ">=" or "<=", figures(rows) -> list; the worst one is the goal's figure)
    return [
        ("ce-floor", "CE bf16 fwd+bwd, % of the 2R+1W floor (N=16384, V=32k/128k/256k)", 90, ">=",
         lambda R: _field(R, "floor_pct", "tri_losses", **ce)),
        ("ce-1r1w", "CE fwd+bwd time / 1R+1W floor time (best tri_losses path)", 1.15, "<=",
         lambda R: [min(v) for v in _by_case(R, "ratio_1r1w", ("tri_losses", "tri_losses inplace_backward"), ce)]),
        ("ce-eager", "CE speed-up over eager PyTorch", 2.5, ">=",
         lambda R: _ratio_by_case(_ms(R, "torch-eager", **ce), _ms(R, "tri_losses", **ce))),
        ("ce-liger", "CE speed-up over Liger (in place, no clone), every V", 1.0, ">=",
         lambda R: _ratio_by_case(_ms(R, "liger", **ce), _ms(R, "tri_losses", **ce))),
        ("ce-liger-big", "CE speed-up over Liger at V >= 128k", 1.3, ">=",
         lambda R: _ratio_by_case({c: v for c, v in _ms(R, "liger", **ce).items() if "V=32768" not in c},
                                  _ms(R, "tri_losses", **ce))),
        ("lce-tflops", "LCE TFLOP/s at 4096x4096x128256 (FLOPs the kernels do)", 550, ">=",
         lambda R: _field(R, "tflops", "tri_losses", **lce_first)),
        ("lce-peers", "LCE speed-up over CCE (both modes) and Liger, all shapes", 1.0, ">=",
         lambda R: sum((_ratio_by_case(_ms(R, p, **lce), _ms(R, "tri_losses", **lce))
                        for p in ("CCE (default filter)", "CCE exact (filter_eps=None)", "liger FLCE")), [])),
        ("lce-memory", "LCE peak extra memory / CCE's", 1.0, "<=",
         lambda R: _extra_ratio(R, "tri_losses", "CCE (default filter)", **lce)),
        ("ctc-native", "CTC fwd+bwd speed-up over PyTorch native, every shape", 3.0, ">=",
         lambda R: _ratio_by_case(_ms(R, "torch-native", **ctc, dtype="float32"), _ms(R, "tri_losses", **ctc,
                                                                                      dtype="float32"))
         + _ratio_by_case(_ms(R, "torch-native", **ctc, dtype="bfloat16"), _ms(R, "tri_losses", **ctc,
                                                                                dtype="bfloat16"))),
        ("ctc-memory", "CTC peak extra memory / PyTorch native's", 1.0, "<=",
         lambda R: _extra_ratio(R, "tri_losses", "torch-native", **ctc, dtype="float32")
         + _extra_ratio(R, "tri_losses", "torch-native", **ctc, dtype="bfloat16")),
        ("fsa-ctc", "fsa_loss(ctc_fsa) time / ctc_loss time", 1.5, "<=",
         lambda R: _ratio_by_case(_ms(R, "fsa_loss(ctc_fsa)", **ctc, dtype="float32"),
                                  _ms(R, "tri_losses", **ctc, dtype="float32"))),
        ("elementwise-floor", "BCE/MSE/L1 bf16 fwd+bwd, % of the byte floor", 85, ">=",
         lambda R: _field(R, "floor_pct", "tri_losses", **ew)),
        ("sampled-dense", "sampled softmax speed-up over the composite, dense weight grad", 2.0, ">=",
         lambda R: _ratio_by_case(_ms(R, "torch composite dense", **sm), _ms(R, "tri_losses dense", **sm))),
        ("sampled-sparse", "sampled softmax speed-up over the composite, sparse weight grad", 3.0, ">=",
         lambda R: _ratio_by_case(_ms(R, "torch composite sparse", **sm), _ms(R, "tri_losses sparse", **sm))),
        ("edit-distance", "edit distance speed-up over a Python loop (B=256, L=1000)", 50, ">=",
         lambda R: [r["speedup"] for r in _pick(R, family="text", goal_shape=True) if _num(r.get("speedup"))]),
        ("tp-overhead", "process-group path at world size 1 / plain call (same kernels: reduction='none')", 1.05,
         "<=", lambda R: _ratio_by_case(_ms(R, "process_group (world size 1)", **tp), _ms(R, "plain", **tp))),
        ("cpu-lce", "CPU: LCE torch backend / eager (N=1024, D=512, V=32000 fp32, mean and per-row g)", 1.4, "<=",
         lambda R: sum((_ratio_by_case(_ms(R, "tri_losses (torch backend)", family="linear_cross_entropy",
                                           cpu_fallback=True, variant=v),
                                       _ms(R, "torch-eager", family="linear_cross_entropy", cpu_fallback=True,
                                           variant=v)) for v in ("mean", "none, per-row g")), [])),
        ("cpu-ctc", "CPU: CTC torch backend / F.ctc_loss (T=300, B=8, C=500, S=60)", 1.3, "<=",
         lambda R: _ratio_by_case(_ms(R, "tri_losses (torch backend)", family="ctc", cpu_fallback=True),
                                  _ms(R, "torch-native", family="ctc", cpu_fallback=True))),
        ("cpu-ce", "CPU: CE torch backend / F.cross_entropy (N=2048, V=32000 fp32, mean and per-row g; "
         "the project's own target)", 1.3, "<=",
         lambda R: _ratio_by_case(_ms(R, "tri_losses (torch backend)", family="cross_entropy", cpu_fallback=True,
                                      variant="mean"),
                                  _ms(R, "torch-eager", family="cross_entropy", cpu_fallback=True, variant="mean"))
         + _ratio_by_case(_ms(R, "tri_losses (torch backend)", family="cross_entropy", cpu_fallback=True,
                              variant="none, per-row g"),
                          _ms(R, "torch-eager", family="cross_entropy", cpu_fallback=True, variant="none, per-row g"))),
        ("cpu-elementwise", "CPU: BCE/MSE/L1 torch backend / PyTorch (4096x4096 fp32; the project's own target)",
         1.5, "<=",
         lambda R: _ratio_by_case(_ms(R, "tri_losses (torch backend)", family="elementwise", cpu_fallback=True),
                                  _ms(R, "torch-eager", family="elementwise", cpu_fallback=True))),
        ("cpu-beam", "CPU: CTC beam search speed-up over a Python prefix beam search (T=500, C=1000, width 100; "
         "a lower bound)", 100, ">=",
         lambda R: [r["speedup"] for r in _pick(R, family="text", beam=True) if _num(r.get("speedup"))]),
    ]


def _by_case(rows, field, providers, match):
    """Per case, the list of ``field`` over ``providers`` (cases where at least one has it)."""
    out = {}
    for r in rows:
        if r.get("provider") in providers and all(r.get(k) == v for k, v in match.items()) and _num(r.get(field)):
            out.setdefault(r["case"], []).append(r[field])
    return list(out.values())


def evaluate_goals(rows) -> list[dict]:
    """Each goal's figure (its worst shape), target, ratio (>= 1 means met) and status."""
    out = []
    for gid, text, target, op, figures in _goal_specs():
        try:
            vals = [v for v in figures(rows) if _num(v)]
        except Exception as e:  # noqa: BLE001 - a goal that cannot be evaluated says why
            out.append(dict(id=gid, goal=text, target=f"{op} {target}", figure=None, ratio=None,
                            status=f"error: {type(e).__name__}"))
            continue
        if not vals:
            out.append(dict(id=gid, goal=text, target=f"{op} {target}", figure=None, ratio=None, status="no data"))
            continue
        fig = min(vals) if op == ">=" else max(vals)
        ratio = fig / target if op == ">=" else (target / fig if fig else math.inf)
        out.append(dict(id=gid, goal=text, target=f"{op} {target}", figure=fig, ratio=ratio,
                        status="met" if ratio >= 1 else "not met", shapes=len(vals)))
    return out


# ------------------------------------------------------------------------------------------------ writers
def results_markdown(rows, meta) -> str:
    env = meta.get("env", {})
    lines = [f"# tri_losses benchmarks on {env.get('device', meta.get('name', '?'))}", ""]
    for k in ("date", "device", "load", "driver", "cuda", "torch", "triton", "python", "liger-kernel",
              "cut-cross-entropy", "quack-kernels", "flash-attn"):
        if k in env:
            lines.append(f"- {k}: {env[k]}")
    if _num(meta.get("copy_gbs")):
        lines.append(f"- measured copy bandwidth: {meta['copy_gbs']:.0f} GB/s (read + write); "
                     "floor_pct = byte-floor time at that bandwidth / median time")
    lines += [f"- mode: {meta.get('mode', '?')}", "- times: median ms (p20-p80 in the note); "
              "peak_mb / extra_mb: peak allocated during one fwd+bwd, absolute / minus the memory before", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |")
    goals = meta.get("goals") or evaluate_goals(rows)
    lines += ["", "## Goals", "", goals_markdown(goals)]
    return "\n".join(lines) + "\n"


def goals_markdown(goals) -> str:
    lines = ["| goal | figure (worst shape) | target | ratio | status |", "|---|---|---|---|---|"]
    for g in goals:
        lines.append(f"| {g['goal']} | {_fmt(g['figure'])} | {g['target']} | {_fmt(g['ratio'])} | {g['status']} |")
    return "\n".join(lines)


def write_results(rows, meta, out_dir, name) -> list[pathlib.Path]:
    """``<name>.md``, ``.json`` and ``.png`` (if matplotlib is there) under ``out_dir``; returns the paths."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta, goals=evaluate_goals(rows))
    paths = [out / f"{name}.md", out / f"{name}.json"]
    paths[0].write_text(results_markdown(rows, meta))
    paths[1].write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str, allow_nan=True))
    png = out / f"{name}.png"
    if plot(rows, png, meta.get("env", {}).get("device", name)):
        paths.append(png)
    else:
        png.unlink(missing_ok=True)  # no matplotlib here: never leave an older run's plot beside new figures
    return paths


def plot(rows, path, title) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return False
    rows = [r for r in rows if _num(r.get("fwdbwd_ms"))]
    if not rows:
        return False
    families = list(dict.fromkeys(r["family"] for r in rows))
    fig, axes = plt.subplots(len(families), 1, figsize=(11, 2.6 * len(families)), squeeze=False)
    for ax, fam in zip(axes[:, 0], families):  # one panel per family: cases on x, a bar per provider
        fr = [r for r in rows if r["family"] == fam]
        labels = [f"{r['case']} {r['dtype']} {r.get('variant', '')}".strip() for r in fr]
        cases = list(dict.fromkeys(labels))
        providers = list(dict.fromkeys(r["provider"] for r in fr))
        w = 0.8 / len(providers)
        for k, p in enumerate(providers):
            pts = [(cases.index(lab) + k * w, float(r["fwdbwd_ms"])) for r, lab in zip(fr, labels)
                   if r["provider"] == p]
            ax.bar([x for x, _ in pts], [y for _, y in pts], width=w, label=p)
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(cases))])
        ax.set_xticklabels(cases, fontsize=6, rotation=15, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("fwd+bwd ms", fontsize=7)
        ax.set_title(f"{fam} on {title}", fontsize=8)
        ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


def summary_markdown(steps, goals, env=None) -> str:
    """The short table printed last: each step's status, time and test counts, then each goal."""
    lines = []
    if env:
        keys = ("device", "driver", "torch", "triton", "cuda")
        lines.append("environment: " + ", ".join(f"{k} {env[k]}" for k in keys if k in env))
        lines.append("")
    lines += ["| step | status | seconds | detail |", "|---|---|---|---|"]
    for s in steps:
        lines.append(f"| {s['name']} | {s['status']} | {s.get('seconds', 0):.0f} | {s.get('detail', '')} |")
    if goals:
        lines += ["", goals_markdown(goals)]
    return "\n".join(lines) + "\n"
