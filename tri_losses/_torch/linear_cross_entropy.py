"""Pure-PyTorch linear cross-entropy in row chunks: peak extra memory ``chunk x V`` (fp32), never N x V.

Each chunk's logits ``x_c @ W.T + b`` go through the cross-entropy torch backend
(:mod:`tri_losses._torch.cross_entropy`), so both ops share one semantics; the backward recomputes
each chunk's logits, forms dz with ``ce_bwd`` and accumulates ``dz @ W``, ``dz.T @ x_c`` and
``dz.sum(0)`` in fp32 (fp64 for fp64 inputs), in chunk order (deterministic).
"""
from __future__ import annotations

import torch

from . import compute_dtype

from . import cross_entropy as _tce

CHUNK_ELEMS = 1 << 22  # rows per chunk = max(1, CHUNK_ELEMS // V)


def chunk_rows(V: int) -> int:
    return max(1, CHUNK_ELEMS // max(V, 1))



def _logits(xc, w, b, ct):
    z = xc.to(ct) @ w.to(ct).t()
    return z + b.to(ct) if b is not None else z


def lce_fwd(x, w, b, target, cw, ignore_index, smoothing, smooth, gamma, z_loss, softcap):
    N = x.shape[0]
    ct = compute_dtype(x)
    loss = torch.empty(N, dtype=ct, device=x.device)
    lse = torch.empty(N, dtype=ct, device=x.device)
    coef = torch.empty(N, 3, dtype=ct, device=x.device)
    step = chunk_rows(w.shape[0])
    for r0 in range(0, N, step):
        sl = slice(r0, min(N, r0 + step))
        z = _logits(x[sl], w, b, ct)
        loss[sl], lse[sl], coef[sl] = _tce.ce_fwd(z, target[sl], cw, _tce.CEOptions(
            False, ignore_index, smoothing, smooth, _tce.IN_LOGITS, gamma, z_loss, softcap, float("inf")))
    return loss, lse, coef


def lce_bwd(grad_loss, x, w, b, target, cw, lse, coef, ignore_index, smoothing, smooth, softcap, need_dx=True,
            need_dw=True):
    """(dx, dw, db); ``dx``/``dw`` (and ``db``) are None when not needed (e.g. a frozen head)."""
    N, D = x.shape
    ct = compute_dtype(x)
    dx = torch.zeros(N, D, dtype=ct, device=x.device) if need_dx else None
    dw = torch.zeros(w.shape, dtype=ct, device=x.device) if need_dw else None
    db = torch.zeros(w.shape[0], dtype=ct, device=x.device) if (b is not None and need_dw) else None
    wc = w.to(ct)
    step = chunk_rows(w.shape[0])
    for r0 in range(0, N, step):
        sl = slice(r0, min(N, r0 + step))
        z = _logits(x[sl], w, b, ct)
        dz = _tce.ce_bwd(grad_loss[sl], None, z, target[sl], cw, lse[sl], coef[sl], _tce.CEOptions(
            False, ignore_index, smoothing, smooth, _tce.IN_LOGITS, 0.0, 0.0, softcap, float("inf")), out=z)
        if dx is not None:
            dx[sl] = dz @ wc
        if dw is not None:
            dw.addmm_(dz.t(), x[sl].to(ct))
        if db is not None:
            db += dz.sum(0)
    return dx, dw, db
