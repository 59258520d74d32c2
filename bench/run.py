"""Benchmark runner: ``python bench/run.py [--families ce,ctc,...] [--out DIR] [--smoke]``.

Runs every family module's ``run(device, smoke)`` on the device present and writes
``bench/results/<device>.md`` (+ ``.png`` when matplotlib is installed). On a CPU-only machine it
runs a small smoke configuration so the command always works.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import math
import os
import pathlib
import platform
import sys

FAMILIES = ("cross_entropy", "linear_cross_entropy", "ctc", "automata", "sampled", "catalogue", "text")


def _device_name(torch):
    if torch.cuda.is_available():
        n = torch.cuda.get_device_name().lower()
        return "".join(c if c.isalnum() else "-" for c in n).strip("-")
    return "cpu-smoke"


def _fmt(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--out", default=None, help="extra folder to copy the results into")
    ap.add_argument("--smoke", action="store_true", help="small shapes even on a GPU")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("bench/run.py: refusing to run with TRITON_INTERPRET set (every Triton kernel would be interpreted)")
    import torch
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from _common import COLUMNS

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke or device.type != "cuda"
    rows, skipped = [], []
    for fam in args.families.split(","):
        try:
            mod = importlib.import_module(f"bench_{fam}")
        except ModuleNotFoundError as e:
            skipped.append(f"{fam}: {e}")
            continue
        print(f"[bench] {fam} ...", flush=True)
        rows += mod.run(device, smoke)
    name = _device_name(torch)
    header = [f"# tri_losses benchmarks on {name}", "",
              f"- date: {datetime.date.today().isoformat()}",
              f"- device: {torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or 'cpu'}",
              f"- torch {torch.__version__}, python {platform.python_version()}"
              + (f", CUDA {torch.version.cuda}, driver via nvidia-smi" if device.type == "cuda" else ""),
              f"- mode: {'smoke (CPU, tiny shapes; times are not meaningful)' if smoke else 'full'}", ""]
    try:
        import triton
        header.insert(4, f"- triton {triton.__version__}")
    except Exception:
        pass
    lines = header + ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |")
    if skipped:
        lines += ["", "Skipped families: " + "; ".join(skipped)]
    text = "\n".join(lines) + "\n"
    res = pathlib.Path(__file__).resolve().parent / "results"
    res.mkdir(exist_ok=True)
    (res / f"{name}.md").write_text(text)
    _plot(rows, res / f"{name}.png")
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.md").write_text(text)
        _plot(rows, out / f"{name}.png")
    print(text)


def _plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    rows = [r for r in rows if r.get("fwdbwd_ms") not in (None, "") and not math.isnan(float(r["fwdbwd_ms"]))]
    if not rows:
        return
    labels = [f"{r['family']}/{r['case']}/{r['dtype']}" for r in rows]
    cases = list(dict.fromkeys(labels))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, len(cases) * 0.6), 4))
    w = 0.8 / max(1, len(providers))
    for k, p in enumerate(providers):
        xs, ys = [], []
        for r, lab in zip(rows, labels):
            if r["provider"] == p:
                xs.append(cases.index(lab) + k * w)
                ys.append(float(r["fwdbwd_ms"]))
        ax.bar(xs, ys, width=w, label=p)
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(cases))])
    ax.set_xticklabels(cases, rotation=60, ha="right", fontsize=6)
    ax.set_ylabel("forward+backward ms (median)")
    ax.set_yscale("log")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
