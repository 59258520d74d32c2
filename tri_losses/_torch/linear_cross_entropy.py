"""Pure-PyTorch linear cross-entropy in row chunks: the ``N x V`` logits are never materialised.

Rows are processed ``n_c = max(1, chunk // V)`` at a time (``chunk``: the options' ``chunk_size`` in
logits, else ``CHUNK_BYTES`` of fp32 logits), so the extra memory is O(N*D + V*D + chunk). For each chunk
the logits ``z = x_c @ W.T + b`` (soft-capped: ``x = softcap(z)``) give, per row,

* the loss and the three backward coefficients ``(c1, c2, c3)`` of :mod:`tri_losses._torch.cross_entropy`
  (one semantics for both ops): ``dL/dz_j = g * (c1*p_j - c2*a_j - c3*[j == y]) * softcap'(z_j)``;
* the row statistics ``m = max_j x_j`` and ``log s = log sum_j exp(x_j - m)`` (the Triton backward
  reads them; this one recomputes the softmax with ``torch.softmax``).

The softmax is always formed from the row maximum, ``p_j = exp(x_j - m) / s``, never as
``exp(x_j - lse)``: with ``|x| ~ 1e4`` the rounding of ``lse = m + log s`` alone would cost ~5e-4 of
relative precision in fp32.

Two ways to get the gradients:

* :func:`lce_fwd` then :func:`lce_bwd` (any upstream gradient, e.g. per token after
  ``reduction="none"``): the backward recomputes each chunk's logits, 4 GEMMs of ``2*N*V*D`` FLOPs in all;
* :func:`lce_fwd_grad` for a scalar upstream (``"mean"``/``"sum"``): the gradients are formed in the
  forward pass from the chunk's logits while they are at hand (3 GEMMs, the FLOPs of eager PyTorch),
  for an upstream gradient of 1; the autograd backward then only scales them by the actual scalar.

Accumulation in fp32 (fp64 for fp64 inputs), chunks in order: deterministic. With ``filter_eps > 0``
(opt-in; exact by default), dz is zeroed per ``FILTER_BLOCK`` block of (rows, head classes) as the
Triton backend does (:func:`_filter_mask`); the row chunks then start on the block grid.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import compute_dtype
from . import cross_entropy as _tce

CHUNK_BYTES = 1 << 26  # default budget for one chunk of fp32 logits (64 MiB)
# filter_eps's block of dz: (rows, classes), on a grid from row 0 and the head's class 0; the Triton
# backend's FILTER_ROWS, FILTER_COLS (tri_losses/kernels/linear_cross_entropy.py) are the same
FILTER_BLOCK = (16, 32)


class LceOptions(NamedTuple):
    """The options of one ``linear_cross_entropy`` call, built once by the public function (the custom
    ops carry them as flat scalars in this order)."""
    ignore_index: int = -100
    smoothing: float = 0.0
    smooth_mode: int = _tce.SMOOTH_NONE  # a label_smoothing_mode code of _torch.cross_entropy
    focal_gamma: float = 0.0
    z_loss: float = 0.0
    softcap: float = 0.0  # 0: no soft-capping
    chunk_size: int = 0  # logits per chunk; 0: from the default memory budget
    filter_eps: float = 0.0  # 0: exact gradients
    # vocab-parallel: the head holds classes [class_offset, class_offset + V_r) of num_classes in all
    # (0: the whole vocabulary); target ids are global, smoothing is over num_classes
    class_offset: int = 0
    num_classes: int = 0


def chunk_rows(V: int, o: LceOptions, ct: torch.dtype = torch.float32) -> int:
    """Rows per chunk: ``chunk_size`` logits, or ``CHUNK_BYTES`` of them in ``ct``; with filtering a
    multiple of the filter block's rows (at least one block)."""
    elems = o.chunk_size if o.chunk_size > 0 else CHUNK_BYTES * 8 // torch.finfo(ct).bits
    rows = max(1, elems // max(V, 1))
    return max(FILTER_BLOCK[0], rows // FILTER_BLOCK[0] * FILTER_BLOCK[0]) if o.filter_eps > 0 else rows


def ce_options(o: LceOptions) -> _tce.CEOptions:
    """The per-row cross-entropy options of a linear-CE call (class-id targets, logits)."""
    return _tce.CEOptions(False, o.ignore_index, o.smoothing, o.smooth_mode, _tce.IN_LOGITS, o.focal_gamma,
                          o.z_loss, o.softcap, math.inf, o.class_offset, o.num_classes)


def _logits(xc, w, b, ct):
    z = xc.to(ct) @ w.to(ct).t()
    return z.add_(b.to(ct)) if b is not None else z


def _probs(x, stats, o: LceOptions):
    """The softmax of a chunk's (soft-capped) logits ``x``, from the row maximum: ``torch.softmax``, or,
    when the head holds a shard of the classes, ``exp((x - m) - log s)`` with the whole row's
    ``stats = (m, log s)``."""
    if o.num_classes > 0:
        return torch.exp((x - stats[:, 0:1].to(x.dtype)) - stats[:, 1:2].to(x.dtype))
    return torch.softmax(x, 1)


def _filter_mask(p, target, a, o: LceOptions):
    """filter_eps: the (n, V) entries of a chunk (rows from a multiple of the block's rows) whose
    ``FILTER_BLOCK`` block is dropped: every softmax entry of the block's live (not ignored) rows is below
    ``filter_eps`` and no live row of the block has its target among the block's classes (``a``: the
    chunk's ``_Targets``, whose ``owned`` / ``y`` place the target among the head's classes)."""
    (FR, FC), (n, V) = FILTER_BLOCK, p.shape
    nb, vb = -(-n // FR), -(-V // FC)
    live = target != o.ignore_index
    crit = torch.nn.functional.pad(torch.where(live[:, None], p, 0.0), (0, vb * FC - V, 0, nb * FR - n))
    drop = crit.reshape(nb, FR, vb, FC).amax((1, 3)) < o.filter_eps
    own = live & a.owned
    blk = torch.arange(n, device=p.device) // FR * vb + torch.where(own, a.y[:, 0], 0) // FC  # no host sync
    drop &= torch.zeros(nb * vb, dtype=torch.int32, device=p.device).index_add_(0, blk, own.int()).view(nb, vb) == 0
    return drop.repeat_interleave(FR, 0)[:n].repeat_interleave(FC, 1)[:, :V]


def _dz(p, x, target, cw, c, o: LceOptions, extra=None):
    """dL/dz of a chunk, in place on the softmax ``p`` (:func:`_probs`): ``c1*p - c2*a - c3*onehot(y)``
    (the one-hot only where the target class is a column here) plus ``extra`` (if given: the entropy's
    term), then the soft-cap derivative; ``c`` (n, 3) holds the coefficients times the upstream gradient.
    With ``filter_eps``, 0 on the dropped blocks (:func:`_filter_mask`)."""
    a = _tce._Targets(target, cw, p.shape[1], ce_options(o), p.dtype)
    drop = _filter_mask(p, target, a, o) if o.filter_eps > 0 else None
    d = p.mul_(c[:, 0:1])
    d = a.minus_scaled(d, c[:, 1:2])
    d.scatter_add_(1, a.y, -torch.where(a.owned, c[:, 2], 0.0)[:, None])
    if extra is not None:
        d.add_(extra)
    if o.softcap > 0:
        d.mul_(1.0 - (x / o.softcap) ** 2)
    return d.masked_fill_(drop, 0.0) if drop is not None else d


def _row_scale(coef, target, g, o):
    """coef (n, 3) times the per-row upstream ``g`` (None: 1); ignored rows get 0 (even where g is inf/NaN)."""
    if g is None:
        return coef.masked_fill((target == o.ignore_index)[:, None], 0.0)
    g = torch.where(target == o.ignore_index, 0.0, g.to(coef.dtype))
    return coef * g[:, None]


def _chunks(x, w, b, target, cw, o):
    """Yield ``(rows, x_capped, loss, coef, stats)`` per row chunk: the (soft-capped) logits and the forward
    outputs of :func:`tri_losses._torch.cross_entropy.ce_fwd` (one semantics for both ops), its row
    statistics ``(m, log s)`` included."""
    N = x.shape[0]
    ct = compute_dtype(x)
    step = chunk_rows(w.shape[0], o, ct)
    for r0 in range(0, N, step):
        sl = slice(r0, min(N, r0 + step))
        z = _logits(x[sl], w, b, ct)
        loss, _, coef, stats = _tce.ce_fwd(z, target[sl], cw, ce_options(o), stats=True)
        yield sl, _tce._softcap(z, o.softcap), loss, coef, stats


def _accumulate(d, x_rows, w, sl, dx, dw, db, first):
    """dx[rows] = d @ W; dw (+)= d.T @ x_rows; db (+)= column sums of d (fp32/fp64)."""
    if dx is not None:
        torch.mm(d, w, out=dx[sl])
    if dw is not None:
        if first:
            torch.mm(d.t(), x_rows, out=dw)
        else:
            dw.addmm_(d.t(), x_rows)
    if db is not None:
        if first:
            torch.sum(d, 0, out=db)
        else:
            db += d.sum(0)


def _grad_buffers(x, w, b, need_dx, need_dw):
    ct = compute_dtype(x)
    alloc = torch.empty if x.shape[0] else torch.zeros  # the first chunk writes dw/db whole
    # a head with no rows (a vocab-parallel rank holding no classes) contributes 0 to dx
    dx = (torch.empty if w.shape[0] else torch.zeros)(x.shape, dtype=ct, device=x.device) if need_dx else None
    dw = alloc(w.shape, dtype=ct, device=x.device) if need_dw else None
    db = alloc(w.shape[0], dtype=ct, device=x.device) if (need_dw and b is not None) else None
    return dx, dw, db


def _cast(t, like):
    return t.to(like.dtype) if t is not None else None


def finite_rows_only(val, lse, fill=-1):
    """``val`` (the rows' argmax, or entropy), ``fill`` where the row's log-sum-exp is not finite: a NaN or
    +inf logit, or none finite (no class is the prediction there, no distribution)."""
    return torch.where(torch.isfinite(lse), val, fill)


def exp_moments(x, m):
    """``(s, q)`` per row of the (soft-capped) logits ``x`` relative to ``m`` (the row max, 0 for a row with
    no finite logit): ``s = sum_j exp(x_j - m)`` and ``q = sum_j exp(x_j - m) (x_j - m)``, a -inf logit adding
    0 to both. The row's softmax entropy is ``log s - q / s`` (``q / s`` is the mean logit's distance from m)."""
    t = (x - m[:, None]).clamp_(min=torch.finfo(x.dtype).min)  # (-inf: exp 0 times a finite t)
    e = torch.exp(t)
    return e.sum(1), (e * t).sum(1)


def lce_fwd(x, w, b, target, cw, o: LceOptions, pred=None, ent=None):
    """Per-row ``loss`` (N,), row statistics ``stats`` (N, 2) = (m, log s), ``coef`` (N, 3); ``pred``
    (int64 (N,)): each row's first maximum of its (soft-capped) logits goes there as a global class id;
    ``ent`` ((N,), the compute dtype): each row's softmax entropy goes there (:func:`exp_moments`)."""
    N = x.shape[0]
    ct = compute_dtype(x)
    loss = torch.empty(N, dtype=ct, device=x.device)
    stats = torch.empty(N, 2, dtype=ct, device=x.device)
    coef = torch.empty(N, 3, dtype=ct, device=x.device)
    for sl, xc, l_c, c_c, s_c in _chunks(x, w, b, target, cw, o):
        loss[sl], coef[sl], stats[sl] = l_c, c_c, s_c  # (the statistics of the loss's own pass)
        if pred is not None:
            pred[sl] = xc.argmax(1) + o.class_offset
        if ent is not None:
            s, q = exp_moments(xc, s_c[:, 0])
            ent[sl] = torch.log(s) - q / s
    return loss, stats, coef


def lce_partial(x, w, b, target, cw, o: LceOptions, pred=None, entropy=False):
    """Vocab-parallel forward's local half: the per-row sums ``(N, 5)`` of
    :func:`tri_losses._torch.cross_entropy.ce_partial` over this head's classes (``o.class_offset`` of
    ``o.num_classes``), chunk by chunk; they combine over the shards of the head. ``pred``: each row's first
    maximum of this head's (soft-capped) logits goes there (a global class id). ``entropy``: ``(N, 6)``, the
    sixth column :func:`exp_moments`'s ``q`` relative to the first (m)."""
    N = x.shape[0]
    ct = compute_dtype(x)
    part = torch.zeros(N, 6 if entropy else 5, dtype=ct, device=x.device)
    step = chunk_rows(w.shape[0], o, ct)
    for r0 in range(0, N if w.shape[0] else 0, step):
        sl = slice(r0, min(N, r0 + step))
        z = _logits(x[sl], w, b, ct)
        part[sl, :5] = _tce.ce_partial(z, target[sl], cw, ce_options(o))
        if pred is not None or entropy:
            xc = _tce._softcap(z, o.softcap)
            if pred is not None:
                pred[sl] = xc.argmax(1) + o.class_offset
            if entropy:
                part[sl, 5] = exp_moments(xc, part[sl, 0])[1]
    return part


def lce_bwd(grad_loss, x, w, b, target, cw, stats, coef, o: LceOptions, need_dx=True, need_dw=True, grad_lse=None,
            grad_ent=None, ent=None):
    """(dx, dw, db) in the inputs' dtypes for a per-row upstream ``grad_loss`` (and ``grad_lse``, the row
    log-sum-exp's, ignored rows included: d lse / dz = p; and ``grad_ent``, the row entropy ``ent``'s:
    d H / dz_j = p_j ((log s - H) - (z_j - m))); None where not needed."""
    N = x.shape[0]
    ct = compute_dtype(x)
    dx, dw, db = _grad_buffers(x, w, b, need_dx, need_dw)
    wc = w.to(ct)
    step = chunk_rows(w.shape[0], o, ct)
    for r0 in range(0, N if w.shape[0] else 0, step):
        sl = slice(r0, min(N, r0 + step))
        xc = _tce._softcap(_logits(x[sl], w, b, ct), o.softcap)
        c = _row_scale(coef[sl], target[sl], grad_loss[sl], o)
        if grad_lse is not None:
            c[:, 0] += grad_lse[sl].to(ct)
        p = _probs(xc, stats[sl], o)
        extra = None
        if grad_ent is not None:  # dH/dz = p ((log s - H) - (z - m)): the row part joins c1 (as the lse's), the
            # rest -g * p * (z - m) in one temporary formed before _dz uses p up
            g_ent = grad_ent[sl].to(ct)
            c[:, 0] += g_ent * (stats[sl, 1] - ent[sl].to(ct))
            extra = (xc - stats[sl, 0:1]).clamp_(min=torch.finfo(ct).min).mul_(p).mul_(-g_ent[:, None])
        d = _dz(p, xc, target[sl], cw, c, o, extra)
        _accumulate(d, x[sl].to(ct), wc, sl, dx, dw, db, r0 == 0)
    return _cast(dx, x), _cast(dw, w), _cast(db, b)


def lce_fwd_grad(x, w, b, target, cw, denom, o: LceOptions, need_dx=True, need_dw=True, pred=None,
                 stats_out=None):
    """Scalar-upstream path: ``(loss.sum() / denom, dx, dw, db)`` (``denom`` None: the sum) with the
    gradients of that reduced loss (upstream 1) formed chunk by chunk in the forward (3 GEMMs, no
    recomputed logits); ``pred``, ``stats_out``: the rows' argmax and statistics go there, as
    :func:`lce_fwd` gives them."""
    N = x.shape[0]
    ct = compute_dtype(x)
    loss = torch.empty(N, dtype=ct, device=x.device)
    dx, dw, db = _grad_buffers(x, w, b, need_dx, need_dw)
    wc = w.to(ct)
    g = (1.0 / denom.to(ct)).expand(N) if denom is not None else None
    for sl, xc, l_c, c_c, s_c in _chunks(x, w, b, target, cw, o):
        loss[sl] = l_c
        if pred is not None:
            pred[sl], stats_out[sl] = xc.argmax(1) + o.class_offset, s_c
        if dx is None and dw is None:
            continue
        d = _dz(torch.softmax(xc, 1), xc, target[sl], cw, _row_scale(c_c, target[sl], g[sl] if g is not None else None,
                                                                     o), o)
        _accumulate(d, x[sl].to(ct), wc, sl, dx, dw, db, sl.start == 0)
    total = loss.sum()
    return (total / denom.to(ct) if denom is not None else total), _cast(dx, x), _cast(dw, w), _cast(db, b)
