"""Cross-entropy benchmark: forward and forward+backward time, peak memory, GB/s vs the byte floor.

Byte floor (the same for every provider): read the N*V logits once, write the N*V gradient once,
plus 2R on a forward+backward that cannot keep a row on chip between the two calls:
``fwd = N*V*s``, ``fwd+bwd = 2*N*V*s (reads) + N*V*s (grad write)``; small per-row vectors ignored.
Providers: tri_losses, PyTorch eager, torch.compile'd PyTorch, Liger-Kernel (if importable; its
forward overwrites the logits, so it gets a fresh clone per call, timed), flash-attn's Triton CE
(if importable).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from _common import peak_mb, time_ms, try_import

import tri_losses


def _providers(device, variant):
    smoothing = 0.1 if variant == "smooth0.1" else 0.0
    gamma = 2.0 if variant == "focal2" else 0.0

    def eager(x, y):
        if gamma:
            lp = torch.log_softmax(x.float(), -1)
            lpy = lp.gather(1, y[:, None])[:, 0]
            return (-(1 - lpy.exp()) ** gamma * lpy).mean()
        return F.cross_entropy(x.float() if x.dtype != torch.float32 else x, y, label_smoothing=smoothing)

    out = {
        "tri_losses": lambda x, y: tri_losses.cross_entropy(x, y, label_smoothing=smoothing, focal_gamma=gamma),
        "torch-eager": eager,
        "torch-compile": torch.compile(eager, dynamic=False),
    }
    liger = try_import("liger_kernel.transformers")
    if liger is not None and device.type == "cuda" and not gamma:
        loss = liger.LigerCrossEntropyLoss(label_smoothing=smoothing)
        out["liger"] = lambda x, y: loss(x.clone() if x.requires_grad else x, y)
    flash = try_import("flash_attn.losses.cross_entropy")
    if flash is not None and device.type == "cuda" and not gamma:
        floss = flash.CrossEntropyLoss(label_smoothing=smoothing)
        out["flash-attn"] = lambda x, y: floss(x, y)
    return out


def run(device: torch.device, smoke: bool) -> list[dict]:
    rows = []
    if smoke:
        shapes = [(64, 4096)]
        dtypes = [torch.float32]
        variants = ["plain"]
    else:
        shapes = [(16384, 32768), (16384, 131072), (16384, 262144)]
        dtypes = [torch.bfloat16, torch.float32]
        variants = ["plain", "smooth0.1", "focal2"]
    for (N, V) in shapes:
        for dtype in dtypes:
            for variant in variants:
                if variant != "plain" and V != 131072 and not smoke:
                    continue
                x = torch.randn(N, V, device=device, dtype=dtype)
                y = torch.randint(0, V, (N,), device=device)
                s = x.element_size()
                for name, fn in _providers(device, variant).items():
                    try:
                        fwd = time_ms(lambda: fn(x, y), device, smoke=smoke)
                        xg = x.clone().requires_grad_(True)

                        def step():
                            fn(xg, y).backward()

                        fb = time_ms(step, device, grad_to_none=[xg], smoke=smoke)
                        peak, extra = peak_mb(step, device)
                        del xg
                    except Exception as e:  # a peer failing is reported, not fatal
                        rows.append(dict(family="cross_entropy", case=f"N={N},V={V},{variant}", dtype=str(dtype)[6:],
                                         provider=name, note=f"failed: {type(e).__name__}: {str(e)[:60]}"))
                        continue
                    gbs = 3 * N * V * s / (fb[0] * 1e-3) / 1e9
                    rows.append(dict(family="cross_entropy", case=f"N={N},V={V},{variant}", dtype=str(dtype)[6:],
                                     provider=name, fwd_ms=fwd[0], fwdbwd_ms=fb[0], peak_mb=peak, extra_mb=extra,
                                     metric=f"{gbs:.0f} GB/s (2R+1W)",
                                     note=f"p20-p80 {fb[1]:.3g}-{fb[2]:.3g} ms"))
                del x
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows
