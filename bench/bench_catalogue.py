"""Element-wise losses: binary cross-entropy with logits at 8192 x 32768 vs PyTorch (GB/s).

Byte model: forward reads input + target (2 * n * s); forward+backward reads them twice more plus the
upstream and writes d/dinput: 5 * n * s (+ target grad when it requires grad; not here).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from _common import peak_mb, time_ms

import tri_losses


def bce_rows(device: torch.device, smoke: bool) -> list[dict]:
    """Binary CE with logits: tri_losses vs PyTorch eager, fp32 and bf16 (fp32 only when smoke)."""
    rows = []
    shape = (64, 1024) if smoke else (8192, 32768)
    for dtype in ([torch.float32] if smoke else [torch.float32, torch.bfloat16]):
        x0 = torch.randn(shape, device=device, dtype=dtype)
        t = torch.rand(shape, device=device, dtype=dtype)
        n = x0.numel()
        s = x0.element_size()
        for name, fn in {"tri_losses": tri_losses.binary_cross_entropy_with_logits,
                         "torch-eager": F.binary_cross_entropy_with_logits}.items():
            x = x0.clone().requires_grad_(True)
            fwd = time_ms(lambda: fn(x0, t), device, smoke=smoke)
            fb = time_ms(lambda: fn(x, t).backward(), device, grad_to_none=[x], smoke=smoke)
            peak, extra = peak_mb(lambda: fn(x, t).backward(), device)
            rows.append(dict(family="catalogue", case=f"bce {shape[0]}x{shape[1]}", dtype=str(dtype)[6:],
                             provider=name, fwd_ms=fwd[0], fwdbwd_ms=fb[0], peak_mb=peak, extra_mb=extra,
                             metric=f"{2 * n * s / (fwd[0] * 1e-3) / 1e9:.0f} GB/s fwd, "
                                    f"{5 * n * s / (fb[0] * 1e-3) / 1e9:.0f} GB/s fwd+bwd"))
    return rows


ROW_FUNCTIONS = [bce_rows]  # other catalogue rows (edit distance, BLEU, ...) are appended as functions


def run(device: torch.device, smoke: bool) -> list[dict]:
    rows = []
    for fn in ROW_FUNCTIONS:
        rows += fn(device, smoke)
    return rows
