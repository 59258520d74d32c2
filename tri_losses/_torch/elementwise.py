"""Pure-PyTorch element-wise losses with the kernel's semantics (broadcast, per-block partial sums)."""
from __future__ import annotations

import torch

from . import compute_dtype
import torch.nn.functional as F

BLOCK = 1024  # partial-sum block, the same as tri_losses/kernels/elementwise.py
KIND_BCE, KIND_MSE, KIND_L1 = 0, 1, 2



def _operands(x, t, w, pw, onehot, shape):
    ct = compute_dtype(x)
    xv = x.to(ct).expand(shape)
    if onehot:
        tv = (t.unsqueeze(-1) == torch.arange(shape[-1], device=x.device)).to(ct).expand(shape)
    else:
        tv = t.to(ct).expand(shape)
    wv = w.to(ct).expand(shape) if w is not None else None
    qv = pw.to(ct).expand(shape) if pw is not None else None
    return xv, tv, wv, qv


def frame_mask(lens, shape, device):
    """(B, T, 1) bool: frame t of sequence b is valid (t < lens[b]); ``shape`` is (B, T, F)."""
    return (torch.arange(shape[1], device=device) < lens.to(device).unsqueeze(1)).unsqueeze(-1)


def elementwise(kind, x, t, w, pw, onehot, shape, lens=None):
    xv, tv, wv, qv = _operands(x, t, w, pw, onehot, shape)
    if kind == KIND_BCE:
        q = qv if qv is not None else 1.0
        l = q * tv * F.softplus(-xv) + (1.0 - tv) * F.softplus(xv)
    elif kind == KIND_MSE:
        l = (xv - tv) ** 2
    else:
        l = (xv - tv).abs()
    l = l * wv if wv is not None else l
    return torch.where(frame_mask(lens, shape, x.device), l, 0.0) if lens is not None else l


def block_sums(l):
    flat = l.reshape(-1)
    n = flat.numel()
    P = (n + BLOCK - 1) // BLOCK
    return torch.nn.functional.pad(flat, (0, P * BLOCK - n)).view(P, BLOCK).sum(1)


def grads(kind, g, x, t, w, pw, onehot, shape, need_dt, lens=None):
    xv, tv, wv, qv = _operands(x, t, w, pw, onehot, shape)
    g = g * wv if wv is not None else g
    if kind == KIND_BCE:
        q = qv if qv is not None else 1.0
        sig = torch.sigmoid(xv)
        gx = (1.0 - tv) * sig - q * tv * (1.0 - sig)
        gt = q * F.softplus(-xv) - F.softplus(xv)
    elif kind == KIND_MSE:
        gx = 2.0 * (xv - tv)
        gt = -gx
    else:
        gx = torch.sign(xv - tv)
        gt = -gx
    gx, gt = gx * g, (gt * g if need_dt else None)
    if lens is not None:
        m = frame_mask(lens, shape, x.device)
        gx = torch.where(m, gx, 0.0)
        gt = torch.where(m, gt, 0.0) if gt is not None else None
    return gx, gt
