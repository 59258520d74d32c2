"""Sampled softmax: N = 8192, D = 1024, V = 793,471, m samples: forward+backward time and peak memory vs a
PyTorch composite (gather, matmul, log-Q, accidental-hit mask, cat, cross-entropy) with dense weight
gradients and with sparse ones (``F.embedding(sparse=True)``), and the full softmax (linear_cross_entropy)
outside goal mode; sampler time in the note. Goal shape: m = 8192, bf16. Variants: ``mean`` (every provider)
and ``none, per-row g`` (``reduction="none"`` with a random per-row upstream gradient: the dense tri_losses
row and the dense composite; not in --quick)."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from _common import MODE, Provider, active, free, measure, swapped

import tri_losses
from tri_losses._backend import kernels
from tri_losses.samplers import LogUniformSampler

FAMILY = "sampled"
TRITON_GEMMS = " (Triton GEMMs)"  # the row with bf16's backward GEMMs in the Triton kernels (cuBLAS by default)


def _composite(x, W, y, sampled, true_ec, samp_ec, sparse, reduction="mean"):
    ws = F.embedding(sampled, W, sparse=sparse)
    zs = x @ ws.t() - torch.log(samp_ec)
    zs = zs.masked_fill(sampled[None, :] == y[:, None], -math.inf)
    zt = (x * F.embedding(y, W, sparse=sparse)).sum(-1, keepdim=True) - torch.log(true_ec)[:, None]
    return F.cross_entropy(torch.cat([zt, zs], 1).float(), torch.zeros_like(y), reduction=reduction)


def run(device: torch.device, smoke: bool) -> list[dict]:
    from _common import time_ms
    N, D, V = (64, 32, 5000) if smoke else (8192, 1024, 793471)
    ms = [64] if smoke else [8192] if MODE["goal"] else [1024, 4096, 8192]
    dtypes = [torch.float32] if smoke else [torch.bfloat16] if MODE["goal"] else [torch.bfloat16, torch.float32]
    rows = []
    smp = LogUniformSampler(V).to(device)
    for m in ms:
        for dtype in dtypes:
            case = f"N={N},D={D},V={V},m={m}"
            x0 = torch.randn(N, D, device=device, dtype=dtype)
            W0 = (torch.randn(V, D, device=device) * 0.02).to(dtype)
            y = torch.randint(0, V, (N,), device=device)
            st = time_ms(lambda: smp.sample(m, y[:, None], unique=True), device, smoke=smoke)
            s, tec, sec, _ = smp.sample(m, y[:, None], unique=True)
            sv = (s[0], tec[:, 0], sec[0])
            provs = [
                Provider("tri_losses dense",
                         lambda x, W, red="mean": tri_losses.sampled_softmax_loss(x, W, y, m, sampled_values=sv,
                                                                                 reduction=red),
                         jit=True, note="weight_grad=dense"),
                Provider("tri_losses sparse", lambda x, W: tri_losses.sampled_softmax_loss(
                    x, W, y, m, sampled_values=sv, weight_grad="sparse"), jit=True, note="weight_grad=sparse"),
                Provider("tri_losses dense" + TRITON_GEMMS, lambda x, W: tri_losses.sampled_softmax_loss(
                    x, W, y, m, sampled_values=sv), jit=True,
                    missing="needs CUDA" if device.type != "cuda" else None if dtype == torch.bfloat16
                    and kernels("linear_cross_entropy")._torch_at_least(2, 10) else "bf16, torch >= 2.10 only",
                         note="weight_grad=dense; backward dW/dX GEMMs in the Triton kernels (BLAS off)"),
                Provider("torch composite dense",
                         lambda x, W, red="mean": _composite(x, W, y, s[0], tec[:, 0], sec[0], False, red)),
                Provider("torch composite sparse", lambda x, W: _composite(x, W, y, s[0], tec[:, 0], sec[0], True)),
            ]
            if not MODE["goal"]:
                provs.append(Provider("full softmax (linear_cross_entropy)",
                                      lambda x, W: tri_losses.linear_cross_entropy(x, W, y), jit=True))
            g = torch.rand(N, device=device)  # random per-row upstream gradient
            per_row = {"tri_losses dense", "torch composite dense"}
            for variant, red in (("mean", "mean"), ("none, per-row g", "none"))[:1 if MODE["quick"] else 2]:
                for p in active([p for p in provs if red == "mean" or p.name in per_row], FAMILY, case, dtype, rows,
                                variant):
                    x = x0.clone().requires_grad_(True)
                    W = W0.clone().requires_grad_(True)
                    ctx = (lambda: swapped(kernels("linear_cross_entropy"), "BLAS", ())) \
                        if p.name.endswith(TRITON_GEMMS) else contextlib.nullcontext

                    def step(fn=p.fn, ctx=ctx, red=red):
                        with ctx():
                            if red == "mean":
                                fn(x, W).backward()
                            else:
                                fn(x, W, red).backward(g)
                    row = measure(FAMILY, case, dtype, p, device, smoke, fwd=None,
                                  step=step, grads=[x, W], variant=variant,
                                  flops=(6 * N * m * D, "6NmD"), note=f"sampler {st[0]:.3g} ms")
                    row["goal_shape"] = m == 8192 and dtype == torch.bfloat16
                    rows.append(row)
                    del x, W
                    free(device)
    return rows
