"""Linear cross-entropy: forward and forward+backward time, TFLOP/s, peak extra memory.

Inputs are realistic, not tiny random weights (which let gradient filtering skip most of the backward):
the head is scaled so that the median over rows of the largest softmax probability is about 0.5 (it is
reported; 0.1-0.9 is the aim), and targets are drawn from the model's own distribution (Gumbel-max).
TFLOP/s count the FLOPs each provider does, labelled: ``6NVD`` forms the gradients in the forward
(2NVD logits + 2NVD dX + 2NVD dW) or keeps the logits (eager); ``8NVD`` recomputes the logits in the
backward. ``6NVD useful`` in the metric column is the same count for every provider.
Providers: tri_losses exact (the default) and with ``filter_eps="auto"`` (its opt-in block filtering at
the threshold CCE's default uses, eps(dtype) / 32 = 2**-12 for bf16, so CCE's default row has a
like-for-like tri_losses row),
eager PyTorch (materialised logits), ``torch.compile`` of it (once per shape),
``F.linear_cross_entropy`` when this torch has it, Liger's fused linear CE, Cut Cross-Entropy with its
default filtering and exact (``filter_eps=None``). tri_losses with ``return_argmax=True`` (the rows' argmax
for a token accuracy; mean only): its cost over the plain row; with ``return_entropy=True`` (the rows' entropy as
a logged metric, no upstream for it; mean only): its cost (the recomputing backward, the Triton GEMM forward). On CUDA two diagnostic rows (mean only): tri_losses with
bf16's GEMMs in its Triton kernels (``BLAS`` off; cuBLAS's by default), and the default path's cuBLAS GEMMs
alone (its chunks, no softmax passes: that path's floor).
CPU row: tri_losses' torch backend vs eager at N=1024, D=512, V=32000 fp32 (the CPU fallback goal).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from _common import (MODE, Provider, active, agreement, case_failed, check, compiled, free, measure, outputs, swapped,
                     try_import)

import tri_losses

FAMILY = "linear_cross_entropy"
# FLOPs per N*V*D of one forward+backward as tri_losses does it, by (backend, reduction); update with the op.
# The torch backend's scalar-upstream path forms the gradients from the forward's logit chunks (6); the Triton
# backend recomputes the logits for dz on both paths (the dz kernel, or cuBLAS's fp32 chunk with BLAS; 8: for a
# scalar upstream the backward runs right after the forward, inside it). (The first GPU run counted 6 for
# Triton's mean rows: its TFLOP/s there are 3/4 of the kernels' throughput.)
TRI_FLOPS_NVD = {("torch", "mean"): (6, "6NVD: gradients formed in the forward"),
                 ("torch", "none"): (8, "8NVD: logits recomputed in the backward"),
                 ("triton", "mean"): (8, "8NVD: backward kernels run in the forward, logits recomputed"),
                 ("triton", "none"): (8, "8NVD: logits recomputed in the backward")}
FILTER_NAME = " filter_eps=auto"  # the tri_losses filtered row (CCE's default threshold)
GEMM_FLOOR_NAME = "cuBLAS GEMMs alone"  # the default bf16 path's GEMMs without its softmax passes: its floor
TRITON_GEMMS_NAME = " Triton GEMMs"  # the tri_losses row with no BLAS stage (bf16's GEMMs in the Triton kernels)
ARGMAX_NAME = " return_argmax"  # the tri_losses row that also returns the rows' argmax (token accuracy)
ENTROPY_NAME = " return_entropy"  # the tri_losses row that also returns the rows' entropy (a logged metric)


def realistic_head(N, D, V, dtype, device, target_pmax=0.5, probe_rows=256):
    """(x, w, y, median max-probability): a head scaled so rows' top softmax probability is ~target_pmax."""
    x = torch.randn(N, D, device=device, dtype=dtype)
    w = torch.randn(V, D, device=device, dtype=dtype)
    xp = x[:probe_rows].float()
    wf = w.float()
    lo, hi = 1e-4, 10.0
    for _ in range(14):  # bisection on a log scale
        mid = (lo * hi) ** 0.5
        pmax = torch.softmax(mid * (xp @ wf.t()), -1).amax(-1).median()
        lo, hi = (mid, hi) if pmax < target_pmax else (lo, mid)
    scale = (lo * hi) ** 0.5
    w = (wf * scale).to(dtype)
    del wf
    y = torch.empty(N, dtype=torch.long, device=device)
    for i in range(0, N, 1024):  # sample targets from the model: argmax(z + Gumbel), chunked
        z = (x[i:i + 1024] @ w.t()).float()
        y[i:i + 1024] = (z - torch.empty_like(z).exponential_().log()).argmax(-1)
        del z
    pm = torch.softmax((xp @ w.float().t()), -1).amax(-1).median().item()
    return x, w, y, pm


def fp32_reference(x, w, y, rows=2048):
    """``[loss, dL/dx, dL/dw]`` of the mean cross-entropy of ``x @ w.T`` in fp32 from the (16-bit) inputs, in
    chunks of ``rows`` (never an fp32 N x V): the independent reference of the agreement check. The GEMMs
    may use TF32: a bf16 value is exact in TF32, so the logits carry fp32 accumulation error only (PyTorch's
    eager path rounds them to bf16 first, an error of about 2**-9 of their size); dz's TF32 rounding
    (2**-11 relative) is far below a 16-bit result's."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        N = x.shape[0]
        wf = w.float()
        dx = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        dw = torch.zeros_like(wf)
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        for i in range(0, N, rows):
            xc, yc = x[i:i + rows].float(), y[i:i + rows]
            z = xc @ wf.t()
            lse = torch.logsumexp(z, -1)
            total += (lse - z.gather(1, yc[:, None])[:, 0]).double().sum()
            p = z.sub_(lse[:, None]).exp_()
            p[torch.arange(len(yc), device=x.device), yc] -= 1.0
            p /= N
            dx[i:i + rows] = p @ wf
            dw += p.t() @ xc
            del z, p
        return [(total / N).float(), dx, dw]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def _eager(x, w, y, reduction="mean"):
    return F.cross_entropy((x @ w.t()).float(), y, reduction=reduction)


def _tri_triton_gemms(backend):
    """tri_losses with bf16's GEMMs in the Triton kernels (no ``BLAS`` stage; by default they are cuBLAS's).
    The mean path forms its gradients in the forward, inside this call, so the switch covers them; the
    per-row rows skip it."""
    from tri_losses._backend import kernels

    def fn(x, w, y, r):
        with swapped(kernels("linear_cross_entropy"), "BLAS", ()):
            return tri_losses.linear_cross_entropy(x, w, y, reduction=r, backend=backend)
    return fn


class _GemmFloor(torch.autograd.Function):
    """The GEMMs the default bf16 path runs (``BLAS``: fp32 logits per chunk forward and backward, dW_c in
    bf16, dX accumulated in fp32), with its chunk widths, and nothing else: no softmax pass, dz a zero
    buffer. Its time is the floor of that path; the gap to the tri_losses row is the softmax passes' cost."""

    @staticmethod
    def forward(ctx, x, w):
        from tri_losses._backend import kernels
        K = kernels("linear_cross_entropy")
        N, V = x.shape[0], w.shape[0]
        VC = K.chunk_classes(N, V, 128, 4)
        buf = torch.empty(N * min(VC, V), dtype=torch.float32, device=x.device)
        for c0 in range(0, V, VC):
            vc = min(VC, V - c0)
            K._mm_f32(x, w[c0:c0 + vc].t(), buf[:N * vc].view(N, vc), False)
        ctx.save_for_backward(x, w)
        return buf[:1].sum()

    @staticmethod
    def backward(ctx, g):
        from tri_losses._backend import kernels
        K = kernels("linear_cross_entropy")
        x, w = ctx.saved_tensors
        (N, D), V = x.shape, w.shape[0]
        VC = K.chunk_classes(N, V, K._DZ_TILES["16b"][1], x.element_size() + 4)
        buf = torch.empty(N * min(VC, V), dtype=torch.float32, device=x.device)
        dz = torch.zeros(N, VC, dtype=x.dtype, device=x.device)
        dw = torch.empty_like(w)
        acc = torch.empty(N, D, dtype=torch.float32, device=x.device)
        for c0 in range(0, V, VC):
            vc = min(VC, V - c0)
            K._mm_f32(x, w[c0:c0 + vc].t(), buf[:N * vc].view(N, vc), False)
            torch.mm(dz[:, :vc].t(), x, out=dw[c0:c0 + vc])
            K._mm_f32(dz[:, :vc], w[c0:c0 + vc], acc, c0 > 0)
        return acc.to(x.dtype), dw


def _no_blas():
    """Why this torch has no cuBLAS path (bf16 x bf16 -> fp32 mm needs torch >= 2.10), or None."""
    from tri_losses._backend import kernels
    return None if kernels("linear_cross_entropy")._torch_at_least(2, 10) else f"torch {torch.__version__} < 2.10"


def _providers(device, backend="auto"):
    comp = compiled(_eager)
    cuda_only = None if device.type == "cuda" else "needs CUDA"
    blas_missing = cuda_only or _no_blas()
    tri = "tri_losses" if backend == "auto" else f"tri_losses ({backend} backend)"
    out = [Provider(tri, lambda x, w, y, r: tri_losses.linear_cross_entropy(x, w, y, reduction=r, backend=backend),
                    jit=True),
           Provider(tri + FILTER_NAME,
                    lambda x, w, y, r: tri_losses.linear_cross_entropy(x, w, y, reduction=r, backend=backend,
                                                                       filter_eps="auto"),
                    jit=True, note="FLOPs nominal, filtered blocks' dW/dX skipped (Triton)"),
           Provider(tri + ARGMAX_NAME,
                    lambda x, w, y, r: tri_losses.linear_cross_entropy(x, w, y, reduction=r, backend=backend,
                                                                       return_argmax=True)[0],
                    jit=True, note="also the rows' argmax (token accuracy): its cost over the plain row; mean rows "
                                   "only"),
           Provider(tri + ENTROPY_NAME,
                    lambda x, w, y, r: tri_losses.linear_cross_entropy(x, w, y, reduction=r, backend=backend,
                                                                       return_entropy=True)[0],
                    jit=True, note="also the rows' entropy (a logged metric: no upstream for it); the backward "
                                   "recomputes the logits, bf16 takes the Triton GEMM forward; mean rows only"),
           Provider(tri + TRITON_GEMMS_NAME, _tri_triton_gemms(backend), jit=True, missing=blas_missing,
                    note="GEMMs in the Triton kernels (BLAS off), 8NVD; mean rows only"),
           Provider(GEMM_FLOOR_NAME, lambda x, w, y, r: _GemmFloor.apply(x, w), jit=False, missing=blas_missing,
                    note="the default bf16 path's cuBLAS GEMMs alone (its chunks, no softmax passes): its floor, "
                         "8NVD; mean rows only, no loss"),
           Provider("torch-eager", _eager, note="materialised logits, fp32 CE"),
           Provider("torch-compile", comp)]
    out.append(Provider("F.linear_cross_entropy",
                        lambda x, w, y, r: F.linear_cross_entropy(x, w, y, reduction=r),
                        missing=None if hasattr(F, "linear_cross_entropy") else f"not in torch {torch.__version__}"))
    liger, why = try_import("liger_kernel.transformers")
    out.append(Provider("liger FLCE", lambda x, w, y, r: liger.LigerFusedLinearCrossEntropyLoss(reduction=r)(w, x, y),
                        jit=True, missing=why or cuda_only, note="gradients formed in the forward"))
    cce, why = try_import("cut_cross_entropy")
    out.append(Provider("CCE (default filter)", lambda x, w, y, r: cce.linear_cross_entropy(x, w, y, reduction=r),
                        jit=True, missing=why or cuda_only, note="skips gradient blocks below its threshold"))
    out.append(Provider("CCE exact (filter_eps=None)",
                        lambda x, w, y, r: cce.linear_cross_entropy(x, w, y, reduction=r, filter_eps=None),
                        jit=True, missing=why or cuda_only))
    return out


_FLOPS = {"torch-eager": (6, "6NVD"), "torch-compile": (6, "6NVD"),
          "F.linear_cross_entropy": (8, "8NVD"), "liger FLCE": (6, "6NVD"),
          "CCE (default filter)": (8, "8NVD nominal, filtered blocks skipped"),
          "CCE exact (filter_eps=None)": (8, "8NVD"), GEMM_FLOOR_NAME: (8, "8NVD")}


def cases(device, smoke):
    """(N, D, V, dtype, is goal shape)."""
    if device.type != "cuda":
        out = [(64, 64, 512, torch.float32, False)]
        if not MODE["goal"]:
            out.append((1024, 512, 32000, torch.float32, False))  # the CPU fallback's shape
        return out
    out = [(4096, 4096, 128256, torch.bfloat16, True), (8192, 2304, 256000, torch.bfloat16, True),
           (16384, 2048, 248320, torch.bfloat16, True)]
    return out[:1] if MODE["quick"] else out


def run(device: torch.device, smoke: bool) -> list[dict]:
    rows = []
    for (N, D, V, dtype, goal) in cases(device, smoke):
        case = f"N={N},D={D},V={V}"
        try:
            _run_case(device, smoke, N, D, V, dtype, goal, case, rows)
        except Exception as e:  # noqa: BLE001 - one case failing must not lose the others' rows
            rows.append(case_failed(FAMILY, case, dtype, e))
        free(device)
    return rows


def _run_case(device, smoke, N, D, V, dtype, goal, case, rows):
    x0, w0, y, pm = realistic_head(N, D, V, dtype, device)
    g = torch.rand(N, device=device)
    cpu_fallback = device.type == "cpu" and (N, D, V) == (1024, 512, 32000)
    provs = _providers(device, "torch" if device.type == "cpu" else "auto")
    if cpu_fallback:
        provs = [p for p in provs if p.name == provs[0].name or p.name == "torch-eager"]
    ref = {}  # the fp32 reference and PyTorch eager's error against it, made once per case

    def reference():
        if not ref:
            ref["ref"] = fp32_reference(x0, w0, y)
            xr, wr = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
            probe = agreement(dict(fwdbwd_ms=0.0), outputs(lambda: _eager(xr, wr, y, "mean"), [xr, wr]),
                              ref["ref"], "fp32", 1.0)
            ref["eager"] = probe["check"]
        return ref["ref"]

    for variant, red in (("mean", "mean"), ("none, per-row g", "none")):
        if variant != "mean" and (MODE["quick"] or MODE["goal"] and N > 4096):
            continue  # per-row rows at the first goal shape (and the CPU fallback's) only (time)
        for p in active(provs, FAMILY, case, dtype, rows if variant == "mean" else [], variant):
            if (p.name.endswith((TRITON_GEMMS_NAME, ARGMAX_NAME, ENTROPY_NAME)) or p.name == GEMM_FLOOR_NAME) \
                    and variant != "mean":
                continue
            if p.name == "torch-compile" and (MODE["quick"] or variant != "mean"
                                              or device.type == "cuda" and dtype != torch.bfloat16):
                continue  # inductor compiles cost the window: bf16, mean, fwd+bwd only
            x = x0.clone().requires_grad_(True)
            w = w0.clone().requires_grad_(True)

            def step(fn=p.fn, x=x, w=w, red=red):
                # as in training: the hidden states an op's output (a view here), the head a leaf parameter
                loss = fn(x.view(x.shape), w, y, red)
                loss.backward() if red == "mean" else loss.backward(g.to(loss.dtype))

            tri_key = ("torch" if device.type == "cpu" else "triton", red)
            nvd, label = TRI_FLOPS_NVD[tri_key] if p.name.startswith("tri") else _FLOPS.get(p.name, (8, "8NVD"))
            timed_fwd = p.name != "torch-compile" and not cpu_fallback  # the goals are fwd+bwd
            fwd = (lambda fn=p.fn: fn(x0, w0, y, red)) if timed_fwd else None
            row = measure(FAMILY, case, dtype, p, device, smoke, fwd=fwd,
                          step=step, grads=[x, w], variant=variant, flops=(nvd * N * V * D, label),
                          note=f"median max softmax prob {pm:.2f}")
            del x, w, step
            free(device)
            if row.get("fwdbwd_ms"):
                row["metric"] += f", {6 * N * V * D / (row['fwdbwd_ms'] * 1e-3) / 1e12:.3g} TFLOP/s (6NVD useful)"
            if red == "mean" and p.name != GEMM_FLOOR_NAME:  # (the floor computes no loss)
                def got(fn=p.fn):
                    xc, wc = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
                    return outputs(lambda: fn(xc, wc, y, "mean"), [xc, wc])
                # checked against the fp32 reference with the tolerance the format allows, or 1.25x PyTorch
                # eager's own error where that is larger (the goal: no worse than PyTorch's materialised path)
                tol = 1e-3 if dtype == torch.float32 else 2e-2
                if "fwdbwd_ms" in row and not MODE["record"]:
                    try:
                        reference()
                        tol = max(tol, 1.25 * ref["eager"])
                    except Exception:  # noqa: BLE001 - check() reports the reference's failure in the row
                        pass
                check(row, got, reference, f"the fp32 reference (PyTorch eager's error {ref.get('eager', -1):.1e})",
                      tol)
            row["goal_shape"] = goal
            row["cpu_fallback"] = cpu_fallback
            rows.append(row)
            free(device)
