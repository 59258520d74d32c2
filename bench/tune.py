"""Launch-table sweep: ``python bench/tune.py OUT.json [--quick] [--budget S] [--targets a,b] [--smoke]``.

The kernels launch from fixed tables, never autotuned (a tuned tile would change the summation order
from one run to the next). Those tables were set by reading the compiler's output, not by timing. This
sweep times the public ops' forward+backward at the goal shapes with one table entry at a time swapped
for a candidate, in this process, and writes every timing (``OUT.json``, and ``OUT.md`` beside it) so the
tables can be set from measurements. Targets, in order (the sweep stops when its budget is spent):

  lce-blas   ``BLAS``: which GEMM stages of linear CE run on cuBLAS (torch.mm): all three (the default), none,
             the backward's dW/dX, dz + dW/dX, the forward
  ce-split   ``SPLIT_ROW_BYTES``/``SPLIT_PIECE``: the fast path's split kernel for long rows, on or off
  lce-chunk  ``CHUNK_CLASSES``: the chunk width (within the DZ_BYTES budget; 2**30: the budget only)
  lce-budget ``DZ_BYTES``: the chunk's memory budget (it binds at N=8192: each chunk adds one fp32 read-modify-
             write of the (N, D) dX accumulator)
  lce-fwd    ``kernels.linear_cross_entropy._FWD_TILES`` (BM, BN, BK, warps, stages) of the Triton forward
  lce-gemm   ``_GEMM_TILES``: the dW and dX GEMMs of the Triton backward
  lce-dz     ``_DZ_TILES``: the dz GEMM of the Triton backward (its tile width sets the chunk width)
  ce-blocks  ``kernels.cross_entropy._blocks``: forward/backward block, warps, backward tiles per program
  ce-rows    ``rows_in_flight``: the one-program-per-row fast path's grid (split kernel off)
  ctc-warps  ``kernels.ctc._reg_block``: warps of the register-path alpha/beta kernels
  lce-tma    ``FWD_TMA``: the Triton forward's X/W reads through tensor descriptors (TMA) or pointer loads
The Triton-kernel targets of linear CE (lce-fwd, lce-gemm, lce-dz, lce-tma) run with ``BLAS`` off (bf16's
GEMMs are otherwise cuBLAS's, and those tables would change nothing).

Runs on CUDA. ``--smoke`` runs tiny shapes with two candidates per target on whatever is present (on a
CPU set ``TRITON_INTERPRET=1`` so the Triton kernels run in the interpreter): it tests the machinery only.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import signal
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
TARGETS = ("lce-blas", "ce-split", "lce-chunk", "lce-budget", "lce-fwd", "lce-gemm", "lce-dz", "ce-blocks", "ce-rows",
           "ctc-warps", "lce-tma")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="bench/tune.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="results JSON (a markdown table is written beside it)")
    ap.add_argument("--quick", action="store_true", help="one shape per target, fewer candidates")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, two candidates per target (machinery test)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole sweep (240; --quick 100)")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, from: " + ", ".join(TARGETS))
    ap.add_argument("--rep", type=int, default=60, help="do_bench rep in ms")
    args = ap.parse_args(argv)
    if args.budget is None:
        args.budget = 100.0 if args.quick else 240.0
    if args.budget <= 0:
        ap.error(f"--budget: expected a positive number of seconds, got {args.budget}")
    bad = [t for t in args.targets.split(",") if t not in TARGETS]
    if bad:
        ap.error(f"--targets: unknown {bad}; expected some of {list(TARGETS)}")
    return args


def swapped(module, name, value):
    """``bench/_common.swapped`` (imported late: _common imports torch)."""
    import _common
    return _common.swapped(module, name, value)


def unique(seq):
    out = []
    for s in seq:
        if s not in out:
            out.append(s)
    return out


# ------------------------------------------------------------------------------------------------ workloads
def _lce_case(torch, tl, N, D, V, dtype, device):
    x = (torch.randn(N, D, device=device) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(V, D, device=device) / math.sqrt(D)).to(dtype).requires_grad_()
    y = torch.randint(0, V, (N,), device=device)
    g = torch.rand(N, device=device)

    def mean():
        tl.linear_cross_entropy(x, w, y, reduction="mean").backward()

    def per_row():
        tl.linear_cross_entropy(x, w, y, reduction="none").backward(g)
    return dict(mean=mean, none_g=per_row), (x, w), 8.0 * N * V * D


def _ce_case(torch, tl, N, V, dtype, device):
    x = torch.randn(N, V, device=device).to(dtype).requires_grad_()
    y = torch.randint(0, V, (N,), device=device)
    g = torch.rand(N, device=device)

    def mean():
        tl.cross_entropy(x, y, reduction="mean").backward()

    def per_row():
        tl.cross_entropy(x, y, reduction="none").backward(g)
    return dict(mean=mean, none_g=per_row), (x,), None


def _ctc_case(torch, tl, T, B, V, S, dtype, device):
    x = torch.randn(T, B, V, device=device).to(dtype).requires_grad_()
    tg = torch.randint(1, V, (B, S), device=device)
    il = torch.full((B,), T, device=device)
    tlen = torch.full((B,), S, device=device)

    def step():
        tl.ctc_loss(x, tg, il, tlen, input_type="logits", reduction="sum").backward()
    return dict(sum=step), (x,), None


def shapes(smoke, quick, device):
    import torch
    if smoke:
        return dict(lce=[(32, 32, 200)], ce=[(8, 300)], ce_rows=[(8, 300)], ctc=[(6, 2, 9, 3)],
                    dtype=torch.float32)
    return dict(lce=[(4096, 4096, 128256)] + ([] if quick else [(8192, 2304, 256000)]),
                ce=[(16384, 131072)] + ([] if quick else [(16384, 262144)]),
                ce_rows=[(16384, 262144)] + ([] if quick else [(16384, 131072)]),
                ctc=[(1000, 64, 1000, 300)] + ([] if quick else [(1000, 64, 1000, 100)]),
                dtype=torch.bfloat16)


# ------------------------------------------------------------------------------------------------ candidates
def lce_tile_candidates(current, smoke):
    if smoke:
        BM, BN, BK, nw, ns = current
        return unique([current, (BM, BN * 2, BK, nw, ns)])
    return unique([current, (128, 64, 64, 8, 3), (128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (128, 64, 64, 8, 4),
                   (64, 128, 64, 4, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (256, 64, 64, 8, 3),
                   (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 32, 8, 4)])


BLAS_CANDIDATES = [(), ("dwdx",), ("dz", "dwdx"), ("fwd",), ("fwd", "dz", "dwdx")]


def ce_block_candidates(cur, smoke):
    """Variants of the ``_blocks`` tuple (fwd, bwd, fwd warps, bwd warps, tiles), one field at a time."""
    fwd, bwd, wf, wb, tiles = cur
    if smoke:
        return unique([cur, (fwd, max(16, bwd // 2), wf, wb, tiles)])
    out = [cur]
    out += [(f, bwd, wf, wb, tiles) for f in (4096, 8192, 16384)]
    out += [(fwd, bwd, w, wb, tiles) for w in (4, 8, 16, 32)]
    out += [(fwd, b, wf, wb, tiles) for b in (1024, 2048, 4096, 8192)]
    out += [(fwd, bwd, wf, w, tiles) for w in (4, 8, 16)]
    out += [(fwd, bwd, wf, wb, t) for t in (1, 2, 4, 8)]
    return unique(out)


# ------------------------------------------------------------------------------------------------ sweep
class Sweep:
    def __init__(self, args):
        import torch
        self.torch = torch
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.t0 = time.monotonic()
        self.rows: list[dict] = []

    def left(self):
        return self.args.budget - (time.monotonic() - self.t0)

    def measure(self, target, case, param, value, current, fns, grads, flops):
        """Time every variant of one candidate (``_common.time_ms``); a failure (e.g. out of shared memory) is
        a row."""
        import _common
        for variant, fn in fns.items():
            if self.left() <= 0:
                return False
            row = dict(target=target, case=case, param=param, value=list(value) if isinstance(value, tuple)
                       else value, current=current, variant=variant)
            t1 = time.monotonic()
            try:
                ms, p20, p80 = _common.time_ms(fn, self.device, grad_to_none=grads, smoke=self.args.smoke)
                row.update(ms=ms, p20=p20, p80=p80)
                if flops:
                    row["tflops"] = flops / (ms * 1e-3) / 1e12
                for t in grads:
                    t.grad = None
                fn()  # a fingerprint of the gradients: a fast but wrong candidate must not win
                row["grad_norm"] = sum(float(t.grad.float().norm()) for t in grads if t.grad is not None)
            except Exception as e:  # noqa: BLE001 - a candidate that cannot launch is a result too
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            row["wall_s"] = time.monotonic() - t1
            self.rows.append(row)
            print(json.dumps(row), flush=True)
            for t in grads:
                t.grad = None
        return True


def sweep(sw: Sweep, target, case, param, cur, cands, swap, fns, grads, flops):
    """Time ``fns`` under each candidate (``swap(cand)``: the context that installs it), the current entry
    first; then free the case's tensors. False when the budget ran out."""
    try:
        for cand in unique([cur] + list(cands)):
            with swap(cand):
                if not sw.measure(target, case, param, cand, cand == cur, fns, grads, flops):
                    return False
        return True
    finally:
        fns.clear()
        _free(sw.torch, sw.device)


def run_lce(sw: Sweep, K, table, candidates_of, shapes_, smoke):
    import tri_losses
    tables = getattr(K, table)
    kind = K._kind(sw.torch.empty(0, dtype=shapes_["dtype"], device=sw.device))
    if kind + "-plain" in tables:  # the sweep's cases have no smoothing, weights or cap: the plain entry
        kind += "-plain"
    cur = tables[kind]
    with swapped(K, "BLAS", ()):
        for (N, D, V) in shapes_["lce"]:
            fns, grads, flops = _lce_case(sw.torch, tri_losses, N, D, V, shapes_["dtype"], sw.device)
            name = {"_FWD_TILES": "lce-fwd", "_GEMM_TILES": "lce-gemm", "_DZ_TILES": "lce-dz"}[table]
            if not sweep(sw, name, f"N={N},D={D},V={V}",
                         f"{table}[{kind!r}]", cur, candidates_of(cur, smoke),
                         lambda c: swapped(K, table, dict(tables, **{kind: c})), fns, grads, flops):
                return


def run_lce_triton_knob(sw: Sweep, K, target, name, candidates, shapes_):
    """``run_lce_knob`` with ``BLAS`` off: a setting of the Triton GEMM kernels."""
    with swapped(K, "BLAS", ()):
        run_lce_knob(sw, K, target, name, candidates, shapes_)


def run_lce_knob(sw: Sweep, K, target, name, candidates, shapes_, variants=None):
    """Time each value of the module setting ``K.name`` at the LCE shapes (``variants``: which of
    ``_lce_case``'s functions; all by default)."""
    import tri_losses
    cur = getattr(K, name)
    for (N, D, V) in shapes_["lce"]:
        fns, grads, flops = _lce_case(sw.torch, tri_losses, N, D, V, shapes_["dtype"], sw.device)
        fns = {k: f for k, f in fns.items() if variants is None or k in variants}
        if not sweep(sw, target, f"N={N},D={D},V={V}", name, cur, candidates, lambda c: swapped(K, name, c),
                     fns, grads, flops):
            return


def run_lce_budget(sw: Sweep, K, shapes_, smoke):
    cur = K.DZ_BYTES
    lce = shapes_["lce"][:1] if smoke else shapes_["lce"][1:]  # (N=8192; the quick sweep has no such shape)
    if lce:
        run_lce_knob(sw, K, "lce-budget", "DZ_BYTES", [cur // 2] if smoke else [cur * 2, cur * 4],
                     dict(shapes_, lce=lce), variants=("none_g",))


def run_lce_chunk(sw: Sweep, K, shapes_, smoke):
    cur = K.CHUNK_CLASSES
    run_lce_knob(sw, K, "lce-chunk", "CHUNK_CLASSES", [cur // 2] if smoke else [cur // 2, cur * 2, cur * 4, 1 << 30],
                 dict(shapes_, lce=shapes_["lce"][:1]), variants=("none_g",))


def run_ce_blocks(sw: Sweep, K, shapes_, smoke):
    import tri_losses
    orig = K._blocks
    for (N, V) in shapes_["ce"]:
        dtype = shapes_["dtype"]
        cur = orig(V, sw.torch.empty(0, dtype=dtype).element_size())
        fns, grads, _ = _ce_case(sw.torch, tri_losses, N, V, dtype, sw.device)
        if not sweep(sw, "ce-blocks", f"N={N},V={V}", "_blocks (fwd, bwd, fwd warps, bwd warps, tiles)", cur,
                     ce_block_candidates(cur, smoke),
                     lambda c: swapped(K, "_blocks", lambda C, es, _c=c, _V=V: _c if C == _V else orig(C, es)),
                     fns, grads, None):
            return


def run_ce_rows(sw: Sweep, K, shapes_, smoke):
    import tri_losses
    orig = K.rows_in_flight
    for (N, V) in shapes_["ce_rows"]:
        fns, grads, _ = _ce_case(sw.torch, tri_losses, N, V, shapes_["dtype"], sw.device)
        cur = orig(grads[0])
        cands = [max(1, cur // 2)] if smoke else [max(1, int(cur * f)) for f in (0.25, 0.5, 2, 4)] + [N]
        with swapped(K, "SPLIT_ROW_BYTES", 0):  # the one-program-per-row kernel at every row length
            if not sweep(sw, "ce-rows", f"N={N},V={V}", "rows_in_flight", cur, cands,
                         lambda c: swapped(K, "rows_in_flight", lambda _x, _c=c: _c), dict(mean=fns["mean"]), grads,
                         None):
                return


def run_ce_split(sw: Sweep, K, shapes_, smoke):
    """The fast path's split kernel: on (``SPLIT_PIECE`` columns a piece, each candidate) or off
    (``SPLIT_ROW_BYTES`` 0: one program per row)."""
    import tri_losses
    cur = (K.SPLIT_ROW_BYTES, K.SPLIT_PIECE)
    cands = [(cur[0], cur[1] // 2)] if smoke else [(0, cur[1])] + [(cur[0], p) for p in (8192, 16384, 65536, 131072)]
    if smoke:
        cur, cands = (1, 64), [(1, 32), (0, 64)]

    @contextlib.contextmanager
    def both(c):
        with swapped(K, "SPLIT_ROW_BYTES", c[0]), swapped(K, "SPLIT_PIECE", c[1]):
            yield

    for (N, V) in shapes_["ce_rows"]:
        fns, grads, _ = _ce_case(sw.torch, tri_losses, N, V, shapes_["dtype"], sw.device)
        if not sweep(sw, "ce-split", f"N={N},V={V}", "(SPLIT_ROW_BYTES, SPLIT_PIECE)", cur, cands, both,
                     dict(mean=fns["mean"]), grads, None):
            return


def run_ctc_warps(sw: Sweep, K, shapes_, smoke):
    import tri_losses
    orig = K._reg_block
    for (T, B, V, S) in shapes_["ctc"]:
        fns, grads, _ = _ctc_case(sw.torch, tri_losses, T, B, V, S, shapes_["dtype"], sw.device)
        cur = orig(2 * S + 1)[1]
        if not sweep(sw, "ctc-warps", f"T={T},B={B},V={V},S={S}", "_reg_block warps", cur,
                     [max(1, cur * 2)] if smoke else [1, 2, 4, 8, 16],
                     lambda c: swapped(K, "_reg_block", lambda L, _w=c: (orig(L)[0], _w)), fns, grads, None):
            return


def _free(torch, device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ report
def mismatched(rows):
    """Rows whose gradient fingerprint differs from the current entry's (same target, case, variant) by
    more than 1% (relative): a wrong result, never a candidate."""
    ref = {(r["target"], r["case"], r["variant"]): r.get("grad_norm") for r in rows if r.get("current")}
    out = []
    for r in rows:
        a, b = r.get("grad_norm"), ref.get((r["target"], r["case"], r["variant"]))
        if a is not None and b is not None and not abs(a - b) <= 1e-2 * max(abs(b), 1e-30):
            out.append(r)
    return out


def best_table(rows):
    """Per (target, case, variant): the current entry's time and the fastest correct candidate's."""
    out = []
    bad = [id(r) for r in mismatched(rows)]
    keys = unique([(r["target"], r["case"], r["variant"]) for r in rows])
    for k in keys:
        rs = [r for r in rows if (r["target"], r["case"], r["variant"]) == k and "ms" in r and id(r) not in bad]
        cur = [r for r in rs if r["current"]]
        if not rs:
            continue
        best = min(rs, key=lambda r: r["ms"])
        cur_ms = cur[0]["ms"] if cur else math.nan
        out.append(dict(target=k[0], case=k[1], variant=k[2], current=cur[0]["value"] if cur else None,
                        current_ms=cur_ms, best=best["value"], best_ms=best["ms"],
                        speedup=cur_ms / best["ms"] if cur and best["ms"] > 0 else math.nan))
    return out


def markdown(rows, meta):
    lines = [f"# Launch-table sweep on {meta.get('device', '?')} ({meta.get('mode', '')}, {meta.get('seconds', 0):.0f} s)",
             *([meta["note"]] if meta.get("note") else []),
             "", "| target | case | variant | current | current ms | best | best ms | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for b in best_table(rows):
        lines.append(f"| {b['target']} | {b['case']} | {b['variant']} | {b['current']} | {b['current_ms']:.3f} | "
                     f"{b['best']} | {b['best_ms']:.3f} | {b['speedup']:.2f}x |")
    wrong = mismatched(rows)
    if wrong:
        lines += ["", "Candidates whose gradients differ from the current entry's (excluded):", ""]
        lines += [f"- {r['target']} {r['case']} {r['variant']} {r['value']}: gradient norm {r['grad_norm']:.6g}"
                  for r in wrong]
    errs = [r for r in rows if "error" in r]
    if errs:
        lines += ["", "Candidates that failed:", ""]
        lines += [f"- {r['target']} {r['case']} {r['value']}: {r['error']}" for r in errs]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    sys.path[:0] = [str(HERE), str(ROOT)]
    import torch

    import _common
    _common.MODE.update(rep=args.rep, warmup=10)

    import tri_losses  # noqa: F401 - registers the ops
    from tri_losses._backend import kernels
    sw = Sweep(args)
    if sw.device.type != "cuda" and not args.smoke:
        sys.exit("bench/tune.py: needs a CUDA device (use --smoke to test the machinery)")
    torch.manual_seed(0)
    shp = shapes(args.smoke, args.quick, sw.device)
    runners = {
        "lce-fwd": lambda: run_lce(sw, kernels("linear_cross_entropy"), "_FWD_TILES", lce_tile_candidates, shp,
                                   args.smoke),
        "lce-gemm": lambda: run_lce(sw, kernels("linear_cross_entropy"), "_GEMM_TILES", lce_tile_candidates, shp,
                                    args.smoke),
        "lce-dz": lambda: run_lce(sw, kernels("linear_cross_entropy"), "_DZ_TILES", lce_tile_candidates, shp,
                                  args.smoke),
        "lce-blas": lambda: run_lce_knob(sw, kernels("linear_cross_entropy"), "lce-blas", "BLAS", BLAS_CANDIDATES,
                                         shp),
        "ce-blocks": lambda: run_ce_blocks(sw, kernels("cross_entropy"), shp, args.smoke),
        "ce-rows": lambda: run_ce_rows(sw, kernels("cross_entropy"), shp, args.smoke),
        "ce-split": lambda: run_ce_split(sw, kernels("cross_entropy"), shp, args.smoke),
        "ctc-warps": lambda: run_ctc_warps(sw, kernels("ctc"), shp, args.smoke),
        "lce-chunk": lambda: run_lce_chunk(sw, kernels("linear_cross_entropy"), shp, args.smoke),
        "lce-budget": lambda: run_lce_budget(sw, kernels("linear_cross_entropy"), shp, args.smoke),
        "lce-tma": lambda: run_lce_triton_knob(sw, kernels("linear_cross_entropy"), "lce-tma", "FWD_TMA",
                                               [False, True], shp),
    }
    skipped = []
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(note=None):
        """The JSON and Markdown results so far (after each target, and at the step's timeout: a SIGTERM)."""
        meta = dict(device=torch.cuda.get_device_name() if sw.device.type == "cuda" else "cpu",
                    torch=torch.__version__, mode="smoke" if args.smoke else "quick" if args.quick else "full",
                    seconds=time.monotonic() - sw.t0, budget=args.budget, skipped_targets=skipped)
        if note:
            meta["note"] = note
        try:
            import triton
            meta["triton"] = triton.__version__
        except ImportError:
            pass
        md = markdown(sw.rows, meta)
        for path, text in ((out, json.dumps(dict(meta=meta, rows=sw.rows, best=best_table(sw.rows)), indent=1,
                                            default=str)), (out.with_suffix(".md"), md)):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
        return md

    def killed(signum, frame):
        save(f"killed at the step's timeout during {running[0]}: timings so far kept")
        os._exit(128 + signum)

    running = ["the set-up"]
    signal.signal(signal.SIGTERM, killed)
    for t in args.targets.split(","):
        if sw.left() <= 0:
            skipped.append(t)
            continue
        running[0] = t
        try:
            runners[t]()
        except Exception as e:  # noqa: BLE001 - one target failing must not lose the others' rows
            sw.rows.append(dict(target=t, case="", param="", value=None, current=False, variant="",
                                error=f"target failed: {type(e).__name__}: {e}"))
        save()
    print(save())
    return 0


if __name__ == "__main__":
    sys.exit(main())
