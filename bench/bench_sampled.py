"""Sampled softmax: N = 8192, D = 1024, V = 793,471, m in {1024, 4096, 8192}: forward+backward time and peak
memory vs a plain PyTorch sampled softmax (index_select, matmul, log-Q, masked_fill, cat, cross-entropy) and
the full softmax (linear_cross_entropy) at the same V; sampler time; dense vs sparse weight gradient."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from _common import peak_mb, time_ms

import tri_losses
from tri_losses.samplers import LogUniformSampler


def _plain(x, W, y, sampled, true_ec, samp_ec):
    ws = W.index_select(0, sampled)
    zs = x @ ws.t() - torch.log(samp_ec)
    zs = zs.masked_fill(sampled[None, :] == y[:, None], -math.inf)
    zt = (x * W.index_select(0, y)).sum(-1, keepdim=True) - torch.log(true_ec)[:, None]
    return F.cross_entropy(torch.cat([zt, zs], 1).float(), torch.zeros_like(y))


def run(device: torch.device, smoke: bool) -> list[dict]:
    N, D, V = (64, 32, 5000) if smoke else (8192, 1024, 793471)
    rows = []
    smp = LogUniformSampler(V).to(device)
    for m in ([64] if smoke else [1024, 4096, 8192]):
        for dtype in ([torch.float32] if smoke else [torch.bfloat16, torch.float32]):
            x0 = torch.randn(N, D, device=device, dtype=dtype)
            W0 = (torch.randn(V, D, device=device) * 0.02).to(dtype)
            y = torch.randint(0, V, (N,), device=device)
            st = time_ms(lambda: smp.sample(m, y[:, None], unique=True), device, smoke=smoke)
            s, tec, sec, _ = smp.sample(m, y[:, None], unique=True)
            sv = (s[0], tec[:, 0], sec[0])
            provs = {
                "tri_losses dense": lambda x, W: tri_losses.sampled_softmax_loss(x, W, y, m, sampled_values=sv),
                "tri_losses sparse": lambda x, W: tri_losses.sampled_softmax_loss(x, W, y, m, sampled_values=sv,
                                                                                  weight_grad="sparse"),
                "torch plain": lambda x, W: _plain(x, W, y, s[0], tec[:, 0], sec[0]),
                "full softmax (linear_cross_entropy)": lambda x, W: tri_losses.linear_cross_entropy(x, W, y),
            }
            for name, fn in provs.items():
                x = x0.clone().requires_grad_(True)
                W = W0.clone().requires_grad_(True)
                try:
                    fb = time_ms(lambda: fn(x, W).backward(), device, grad_to_none=[x, W], smoke=smoke)
                    peak, extra = peak_mb(lambda: fn(x, W).backward(), device)
                except Exception as e:
                    rows.append(dict(family="sampled", case=f"N={N},D={D},V={V},m={m}", dtype=str(dtype)[6:],
                                     provider=name, note=f"failed: {type(e).__name__}"))
                    continue
                rows.append(dict(family="sampled", case=f"N={N},D={D},V={V},m={m}", dtype=str(dtype)[6:],
                                 provider=name, fwdbwd_ms=fb[0], peak_mb=peak, extra_mb=extra,
                                 metric=f"{6 * N * m * D / (fb[0] * 1e-3) / 1e12:.2f} TFLOP/s (6NmD)",
                                 note=f"sampler {st[0]:.3g} ms"))
    return rows
