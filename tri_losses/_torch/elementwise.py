"""Pure-PyTorch element-wise losses with the kernel's semantics (broadcast, per-block partial sums).

Large element-wise passes are memory-bound, and on CPU a fresh output costs about as much again in page
faults: every formula below allocates one or two full-size buffers and works in place on them."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import compute_dtype

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
    # (a 0-dim input's pos_weight arrives as (1,), the kernels' layout)
    qv = (pw.reshape(()) if not shape else pw).to(ct).expand(shape) if pw is not None else None
    return xv, tv, wv, qv


def frame_mask(lens, shape, device):
    """(B, T, 1) bool: frame t of sequence b is valid (t < lens[b]); ``shape`` is (B, T, F)."""
    return (torch.arange(shape[1], device=device) < lens.to(device).unsqueeze(1)).unsqueeze(-1)


def elementwise(kind, x, t, w, pw, onehot, shape, lens=None):
    """The loss per element, a contiguous tensor of ``shape`` in the compute dtype.

    BCE: ``(1 - t) * softplus(x) + pw * t * softplus(-x)``, both terms formed without cancellation."""
    xv, tv, wv, qv = _operands(x, t, w, pw, onehot, shape)
    if kind == KIND_BCE:
        # softplus(x); F.softplus returns x past its threshold: exact in fp32 past 20 (exp(-20) is 1e-10 of x),
        # 2e-9 off in fp64 there, where 40 makes it exact (one fused pass; -logsigmoid(-x) takes three, 1.3x BCE)
        l = F.softplus(xv, threshold=40.0 if xv.dtype == torch.float64 else 20.0).contiguous().mul_(
            torch.rsub(tv, 1.0))
        neg = F.logsigmoid(xv).mul_(tv)  # -t * softplus(-x)
        l.sub_(neg.mul_(qv) if qv is not None else neg)
    elif kind == KIND_MSE:
        l = torch.sub(xv, tv).contiguous().square_()
    else:
        l = torch.sub(xv, tv).contiguous().abs_()
    if wv is not None:
        l.mul_(wv)
    return l.masked_fill_(~frame_mask(lens, shape, x.device), 0.0) if lens is not None else l


def block_sums(l):
    """Sums of consecutive ``BLOCK``-element blocks of ``l`` (flattened), the last one partial."""
    flat = l.reshape(-1)
    n = flat.numel()
    nb = n // BLOCK
    full = flat[:nb * BLOCK].view(nb, BLOCK).sum(1)
    return torch.cat((full, flat[nb * BLOCK:].sum().reshape(1))) if n > nb * BLOCK else full


def _scale(d, g, wv, mask):
    """``d * w * g`` in place (``g``: per element, or a scalar), 0 on masked-out frames."""
    if wv is not None:
        d.mul_(wv)
    d.mul_(g)
    return d.masked_fill_(~mask, 0.0) if mask is not None else d


def grads(kind, g, x, t, w, pw, onehot, shape, need_dt, lens=None):
    """``(d/dx, d/dt or None)`` of the loss times the upstream ``g``: per element (broadcastable to
    ``shape``), or a scalar (the upstream of the reduced loss)."""
    xv, tv, wv, qv = _operands(x, t, w, pw, onehot, shape)
    g = g.to(xv.dtype)
    mask = frame_mask(lens, shape, x.device) if lens is not None else None
    gt = None
    if kind == KIND_BCE:
        sig = torch.sigmoid(xv).contiguous()
        if need_dt:  # pw * softplus(-x) - softplus(x): from x < -1 as is; above, (pw - 1) * softplus(-x) - x, which
            # cancels neither at x ~ 0 (pw ~ 1) nor, this way round, where softplus(-x) ~ -x (x << 0, small pw)
            if qv is None:
                gt = -xv
            else:
                ls = F.logsigmoid(xv)  # (= -softplus(-x); no threshold)
                gt = torch.where(xv < -1.0, F.logsigmoid(-xv) - qv * ls, ls.mul_(1.0 - qv).sub_(xv))
            gt = _scale(gt.contiguous(), g, wv, mask)
        if qv is None:
            gx = sig.sub_(tv)  # (1 - t) * sig - t * (1 - sig)
        else:
            rest = torch.rsub(sig, 1.0).mul_(qv).mul_(tv)  # pw * t * (1 - sig)
            gx = sig.mul_(torch.rsub(tv, 1.0)).sub_(rest)
    elif kind == KIND_MSE:
        gx = torch.sub(xv, tv).contiguous().mul_(2.0)
    else:
        gx = torch.sub(xv, tv).contiguous().sign_()
    gx = _scale(gx, g, wv, mask)
    if need_dt and kind != KIND_BCE:
        gt = gx.neg()
    return gx, gt
