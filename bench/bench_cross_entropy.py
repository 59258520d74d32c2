"""Cross-entropy: forward and forward+backward time, peak memory, % of the byte floor.

Byte floor (the same for every provider): forward ``N*V*s`` (read the logits once); forward+backward
``3*N*V*s`` (2R+1W: the forward's read, the backward's read and gradient write; per-row vectors
ignored). Variants: ``mean`` (one scalar upstream gradient, ``loss.backward()``: tri_losses's training
fast path, which forms the gradient in the forward and reads the logits from memory once, so its floor
is 1R+1W, ``2*N*V*s``, and its rows also give their time over that) and ``none, per-row g``
(``reduction="none"`` with a random per-row upstream gradient: tri_losses's exact path, a forward then a
backward that reads the logits again, 2R+1W). Both variants time every provider on the same 2R+1W floor.
Providers: tri_losses (also ``inplace_backward=True``), PyTorch eager (native dtype), ``torch.compile``
of it (built once per shape), Liger-Kernel (in place, as in training: its forward overwrites logits that
require grad with the gradient; no clone is charged), flash-attn's and QuACK's CE when importable (a row
says so when not). Every provider gets the logits as a view of a leaf, an op's output as in training, so
that a gradient handed back in the logits' own storage (the in-place providers) is not copied by autograd
into a new ``.grad``.

CPU row: tri_losses' torch backend vs ``F.cross_entropy`` at N=2048, V=32000 fp32 (the CPU fallback).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from _common import (MODE, Provider, active, case_failed, check, compiled, free, measure, outputs, swapped, too_big,
                     try_import)

import tri_losses

FAMILY = "cross_entropy"


def _eager(x, y, reduction="mean", smoothing=0.0, gamma=0.0):
    if gamma:
        lp = torch.log_softmax(x.float(), -1)
        lpy = lp.gather(1, y[:, None])[:, 0]
        loss = -(1 - lpy.exp()) ** gamma * lpy
        return loss.mean() if reduction == "mean" else loss
    return F.cross_entropy(x, y, label_smoothing=smoothing, reduction=reduction)


PER_ROW_NAME = " per-row kernel"  # the fast path with its split kernel off (SPLIT_ROW_BYTES = 0)


def _per_row(fn):
    """``fn`` with the training fast path's split kernel off: one program per row at every length. The
    mean's gradient is formed in the forward, inside this call, so the switch covers it."""
    from tri_losses._backend import kernels

    def run(x, y, r):
        with swapped(kernels("cross_entropy"), "SPLIT_ROW_BYTES", 0):
            return fn(x, y, r)
    return run


def _providers(device, smoothing, gamma):
    backend = "torch" if device.type == "cpu" else "auto"  # the bench never runs the interpreter

    def tri(inplace):
        return lambda x, y, r: tri_losses.cross_entropy(x, y, reduction=r, label_smoothing=smoothing,
                                                        focal_gamma=gamma, inplace_backward=inplace, backend=backend)

    comp = compiled(_eager)
    name = "tri_losses" if backend == "auto" else f"tri_losses ({backend} backend)"
    out = [Provider(name, tri(False), jit=True),
           Provider(name + " inplace_backward", tri(True), jit=True,
                    note="inplace_backward=True: the gradient may overwrite the logits"),
           Provider(name + PER_ROW_NAME, _per_row(tri(False)), jit=True,
                    missing=None if device.type == "cuda" else "needs CUDA",
                    note="the fast path's one-program-per-row kernel where long rows take the split kernel; "
                         "mean rows only"),
           Provider("torch-eager", lambda x, y, r: _eager(x, y, r, smoothing, gamma)),
           Provider("torch-compile", lambda x, y, r: comp(x, y, r, smoothing, gamma))]
    cuda_only = None if device.type == "cuda" else "needs CUDA"
    liger, why = try_import("liger_kernel.transformers")
    losses = {}

    def liger_fn(x, y, r):
        if r not in losses:
            losses[r] = liger.LigerCrossEntropyLoss(label_smoothing=smoothing, reduction=r)
        return losses[r](x, y)

    out.append(Provider("liger", liger_fn, jit=True, missing=why or cuda_only or ("no focal loss" if gamma else None),
                        note="in place: overwrites the logits with the gradient, as in training (no clone)"))
    flash, why = try_import("flash_attn.losses.cross_entropy")
    out.append(Provider("flash-attn", lambda x, y, r: flash.CrossEntropyLoss(label_smoothing=smoothing,
                                                                              reduction=r)(x, y),
                        jit=True, missing=why or cuda_only or ("no focal loss" if gamma else None)))
    quack, why = try_import("quack.cross_entropy")
    out.append(Provider("quack", lambda x, y, r: quack.cross_entropy(x, y, reduction=r), jit=True,
                        missing=why or cuda_only or ("no smoothing/focal" if smoothing or gamma else None)))
    return out


def cases(device, smoke):
    """(N, V, dtype, variant) to run: the goal shapes (bf16 and fp32) plus option variants at V=128k."""
    if smoke:
        return [(64, 4096, torch.float32, "plain")] + ([] if MODE["goal"] or device.type != "cpu" else
                                                       [(2048, 32000, torch.float32, "plain")])  # CPU fallback
    dtypes = (torch.bfloat16,) if MODE["quick"] else (torch.bfloat16, torch.float32)
    # recording the launches (the GPU check's precompile) needs the kernels' compile keys, not the data: the
    # row count enters them only as an int divisible by 16, so 256 rows record what 16384 launch (the goal
    # shapes' logits would take up to 17 GB a copy, in several recording processes at once)
    N = 256 if MODE["record"] else 16384
    out = [(N, V, dt, "plain") for dt in dtypes for V in (32768, 131072, 262144)]  # every bf16 goal shape first
    if not MODE["goal"]:
        out += [(N, 131072, torch.bfloat16, v) for v in ("smooth0.1", "focal2")]
    return out


def _splits(x):
    """Whether the fast path takes its split kernel for logits ``x`` (class ids, no options that change it)."""
    from tri_losses._backend import kernels
    return bool(kernels("cross_entropy").split_pieces(x.shape[1], x.element_size(), False, 0))


def run(device: torch.device, smoke: bool) -> list[dict]:
    rows = []
    for (N, V, dtype, opt) in cases(device, smoke):
        case = f"N={N},V={V}" + ("" if opt == "plain" else f",{opt}")
        # x, the reference gradient, a provider's input and gradient, the check's input and gradient, and
        # a provider's N x V temporaries
        big = too_big(FAMILY, case, dtype, device, 7 * N * V * torch.finfo(dtype).bits // 8)
        if big:
            rows.append(big)
            continue
        try:
            _run_case(device, smoke, N, V, dtype, opt, case, rows)
        except Exception as e:  # noqa: BLE001 - one case failing must not lose the others' rows
            rows.append(case_failed(FAMILY, case, dtype, e))
        free(device)
    return rows


def _run_case(device, smoke, N, V, dtype, opt, case, rows):
    smoothing = 0.1 if opt == "smooth0.1" else 0.0
    gamma = 2.0 if opt == "focal2" else 0.0
    x = torch.randn(N, V, device=device, dtype=dtype)
    y = torch.randint(0, V, (N,), device=device)
    g = torch.rand(N, device=device, dtype=torch.float32)  # random per-row upstream gradient
    s = x.element_size()
    floor = (N * V * s, 3 * N * V * s)
    providers = _providers(device, smoothing, gamma)
    cpu_fallback = device.type == "cpu" and (N, V) == (2048, 32000)
    if cpu_fallback:
        providers = [p for p in providers if p.name in ("tri_losses (torch backend)", "torch-eager")]
    ref = []  # torch-eager's loss and gradient (mean), made once per case for the agreement check

    def reference():
        if not ref:
            xr = x.clone().requires_grad_(True)
            ref.extend(outputs(lambda: _eager(xr, y, "mean", smoothing, gamma), [xr]))
        return ref

    for variant, red in (("mean", "mean"), ("none, per-row g", "none"))[:1 if MODE["quick"] else 2]:
        for p in active(providers, FAMILY, case, dtype, rows if variant == "mean" else [], variant):
            if p.name.endswith(PER_ROW_NAME) and (variant != "mean" or not _splits(x)):
                continue  # only where the default takes the split kernel
            if p.name == "torch-compile" and (MODE["quick"] or variant != "mean"
                                              or device.type == "cuda" and dtype != torch.bfloat16):
                continue  # inductor compiles cost the window: bf16, mean, fwd+bwd only
            xg = x.clone().requires_grad_(True)

            def step(fn=p.fn, xg=xg, red=red):
                # the logits as training has them, the output of an op (a view here): a gradient handed
                # back in the logits' own storage (in-place providers) is then kept as is; a leaf would
                # make autograd copy it (a copy no training step pays)
                loss = fn(xg.view(xg.shape), y, red)
                loss.backward() if red == "mean" else loss.backward(g.to(loss.dtype))

            fwd = None if p.name == "torch-compile" else (lambda fn=p.fn: fn(x, y, red))
            tri = p.name.startswith("tri_losses")
            path = ("fast path: gradient formed in the forward (1R+1W)" if red == "mean" else
                    "exact path: the backward reads the logits again (2R+1W)") if tri else ""
            row = measure(FAMILY, case, dtype, p, device, smoke, fwd=fwd,
                          step=step, grads=[xg], variant=variant, floor=floor, note=path)
            del xg, step
            free(device)
            if tri and red == "mean" and row.get("fwdbwd_ms") and "floor_pct" in row:
                row["ratio_1r1w"] = row["floor_pct"] and 150.0 / row["floor_pct"]  # time / (2NVs / copy)
                row["metric"] += f", {row['ratio_1r1w']:.2f}x the 1R+1W time"
            if red == "mean" and p.name != "torch-eager":
                def got(fn=p.fn):
                    xc = x.clone().requires_grad_(True)  # fresh: an in-place provider has overwritten xg
                    return outputs(lambda: fn(xc, y, "mean"), [xc])
                check(row, got, reference, "torch-eager", 1e-3 if dtype == torch.float32 else 2e-2)
            row["goal_shape"] = opt == "plain" and N == 16384
            row["cpu_fallback"] = cpu_fallback
            rows.append(row)
            free(device)
