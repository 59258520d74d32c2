"""Element-wise losses (BCE with logits, MSE, L1) at 8192 x 32768 vs PyTorch: time and % of the byte floor.

Byte floor with a scalar upstream gradient and a target that needs no gradient: forward reads input and
target (``2*n*s``); forward+backward reads them again and writes d/dinput (``5*n*s``). The ``none, per-elem
g`` variant (``reduction="none"`` and a random upstream gradient of the input's shape; not in --quick) also
writes the loss and reads the upstream (``3*n*s``; ``7*n*s``), counted in the input's dtype (tri_losses
returns an fp32 loss, PyTorch one in the input's dtype: tri_losses is charged its extra bytes).

CPU rows: tri_losses' torch backend vs PyTorch at 4096 x 4096 fp32 (the CPU fallback).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from _common import MODE, Provider, active, free, measure

import tri_losses

FAMILY = "elementwise"
LOSSES = {"bce": (tri_losses.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits),
          "mse": (tri_losses.mse_loss, F.mse_loss), "l1": (tri_losses.l1_loss, F.l1_loss)}


def elementwise_rows(device: torch.device, smoke: bool) -> list[dict]:
    rows = []
    shape = (64, 1024) if smoke else (8192, 32768)
    dtypes = [torch.float32] if smoke else [torch.bfloat16] if MODE["goal"] else [torch.bfloat16, torch.float32]
    configs = [(shape, dtype) for dtype in dtypes]
    if device.type == "cpu" and not MODE["goal"]:
        configs.append(((4096, 4096), torch.float32))  # the CPU fallback
    name = "tri_losses" if device.type == "cuda" else "tri_losses (torch backend)"  # auto = torch on CPU
    for shape, dtype in configs:
        x0 = torch.randn(shape, device=device, dtype=dtype)
        t = torch.rand(shape, device=device, dtype=dtype)
        n, s = x0.numel(), x0.element_size()
        g = torch.rand(shape, device=device, dtype=torch.float32)  # random per-element upstream gradient
        ups = {torch.float32: g, dtype: g.to(dtype)}  # in each loss's dtype, cast outside the timed step
        variants = (("mean", "mean", (2 * n * s, 5 * n * s)), ("none, per-elem g", "none", (3 * n * s, 7 * n * s)))
        for kind, (mine, theirs) in LOSSES.items():
            case = f"{kind} {shape[0]}x{shape[1]}"
            fallback = device.type == "cpu" and shape == (4096, 4096)  # (its goal is the mean's)
            for variant, red, floor in variants[:1 if MODE["quick"] or fallback else 2]:
                for p in active([Provider(name, mine, jit=True), Provider("torch-eager", theirs)],
                                FAMILY, case, dtype, rows, variant):
                    x = x0.clone().requires_grad_(True)

                    def step(fn=p.fn, red=red):
                        out = fn(x, t, reduction=red)
                        out.backward(ups[out.dtype] if red == "none" else None)

                    row = measure(FAMILY, case, dtype, p, device, smoke,
                                  fwd=lambda fn=p.fn, red=red: fn(x0, t, reduction=red), step=step, grads=[x],
                                  variant=variant, floor=floor)
                    row["goal_shape"] = not smoke
                    row["cpu_fallback"] = fallback
                    rows.append(row)
                    del x
                    free(device)
    return rows


ROW_FUNCTIONS = [elementwise_rows]  # other catalogue rows are appended as functions


def run(device: torch.device, smoke: bool) -> list[dict]:
    rows = []
    for fn in ROW_FUNCTIONS:
        rows += fn(device, smoke)
    return rows
