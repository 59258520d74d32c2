"""CTC benchmark: forward+backward from logits to the logits gradient, and peak memory.

tri_losses (log-softmax fused, ``input_type="logits"``) vs PyTorch (``log_softmax`` + ``F.ctc_loss``,
native kernel; and the cuDNN path where its conditions hold: blank 0, fp32, int32 targets on the
CPU, all input lengths = T, target lengths < 256).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from _common import peak_mb, time_ms

import tri_losses


def run(device: torch.device, smoke: bool) -> list[dict]:
    rows = []
    if smoke:
        cases = [(50, 4, 20, 10)]
        dtypes = [torch.float32]
    else:
        cases = [(1000, 64, V, S) for V in (1000, 10000) for S in (100, 300)] + [(5000, 64, 1000, 1000)]
        dtypes = [torch.float32, torch.bfloat16]
    for (T, B, V, S) in cases:
        for dtype in dtypes:
            x0 = torch.randn(T, B, V, device=device).to(dtype)
            tg = torch.randint(1, V, (B, S), device=device)
            il = torch.full((B,), T, dtype=torch.long, device=device)
            tl = torch.full((B,), S, dtype=torch.long, device=device)
            provs = {
                "tri_losses": lambda x: tri_losses.ctc_loss(x, tg, il, tl, input_type="logits"),
                "torch-native": lambda x: F.ctc_loss(x.float().log_softmax(-1), tg, il, tl),
            }
            if device.type == "cuda" and dtype == torch.float32 and S < 256:
                tgc, ilc, tlc = tg.int().cpu(), il.int().cpu(), tl.int().cpu()
                provs["torch-cudnn"] = lambda x: F.ctc_loss(x.log_softmax(-1), tgc, ilc, tlc)
            for name, fn in provs.items():
                x = x0.clone().requires_grad_(True)

                def step():
                    fn(x).backward()

                try:
                    fwd = time_ms(lambda: fn(x0), device, smoke=smoke)
                    fb = time_ms(step, device, grad_to_none=[x], smoke=smoke)
                    peak, extra = peak_mb(step, device)
                except Exception as e:
                    rows.append(dict(family="ctc", case=f"T={T},B={B},V={V},S={S}", dtype=str(dtype)[6:],
                                     provider=name, note=f"failed: {type(e).__name__}: {str(e)[:60]}"))
                    continue
                rows.append(dict(family="ctc", case=f"T={T},B={B},V={V},S={S}", dtype=str(dtype)[6:], provider=name,
                                 fwd_ms=fwd[0], fwdbwd_ms=fb[0], peak_mb=peak, extra_mb=extra,
                                 note=f"p20-p80 {fb[1]:.3g}-{fb[2]:.3g} ms"))
    return rows
