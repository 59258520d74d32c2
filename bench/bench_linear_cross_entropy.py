"""Linear cross-entropy benchmark: forward+backward time, peak memory and effective TFLOP/s.

Effective TFLOP/s = 8*N*V*D / time (forward 2NVD, backward 6NVD: the useful FLOPs, the same for
every provider, whatever it recomputes). Providers: tri_losses, eager PyTorch (materialised logits),
torch.compile of it, ``F.linear_cross_entropy`` if this torch has it, Liger-Kernel's fused linear CE
and Cut Cross-Entropy if importable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from _common import peak_mb, time_ms, try_import

import tri_losses


def _providers(device):
    def eager(x, w, y):
        return F.cross_entropy((x @ w.t()).float(), y)

    out = {"tri_losses": lambda x, w, y: tri_losses.linear_cross_entropy(x, w, y),
           "torch-eager": eager, "torch-compile": torch.compile(eager, dynamic=False)}
    if hasattr(F, "linear_cross_entropy"):
        out["F.linear_cross_entropy"] = lambda x, w, y: F.linear_cross_entropy(x, w, y)
    liger = try_import("liger_kernel.transformers")
    if liger is not None and device.type == "cuda":
        lf = liger.LigerFusedLinearCrossEntropyLoss()
        out["liger"] = lambda x, w, y: lf(w, x, y)
    cce = try_import("cut_cross_entropy")
    if cce is not None and device.type == "cuda":
        out["cut-cross-entropy"] = lambda x, w, y: cce.linear_cross_entropy(x, w, y)
    return out


def run(device: torch.device, smoke: bool) -> list[dict]:
    rows = []
    shapes = [(64, 512, 64)] if smoke else [(8192, 256000, 2304), (16384, 128256, 4096)]
    dtype = torch.float32 if smoke else torch.bfloat16
    for (N, V, D) in shapes:
        x0 = torch.randn(N, D, device=device, dtype=dtype)
        w0 = (torch.randn(V, D, device=device, dtype=dtype) * 0.02)
        y = torch.randint(0, V, (N,), device=device)
        for name, fn in _providers(device).items():
            x = x0.clone().requires_grad_(True)
            w = w0.clone().requires_grad_(True)

            def step():
                fn(x, w, y).backward()

            try:
                fwd = time_ms(lambda: fn(x0, w0, y), device, smoke=smoke)
                fb = time_ms(step, device, grad_to_none=[x, w], smoke=smoke)
                peak, extra = peak_mb(step, device)
            except Exception as e:
                rows.append(dict(family="linear_cross_entropy", case=f"N={N},V={V},D={D}", dtype=str(dtype)[6:],
                                 provider=name, note=f"failed: {type(e).__name__}: {str(e)[:60]}"))
                continue
            tflops = 8 * N * V * D / (fb[0] * 1e-3) / 1e12
            rows.append(dict(family="linear_cross_entropy", case=f"N={N},V={V},D={D}", dtype=str(dtype)[6:],
                             provider=name, fwd_ms=fwd[0], fwdbwd_ms=fb[0], peak_mb=peak, extra_mb=extra,
                             metric=f"{tflops:.1f} TFLOP/s (8NVD)", note=f"p20-p80 {fb[1]:.3g}-{fb[2]:.3g} ms"))
            del x, w
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows
