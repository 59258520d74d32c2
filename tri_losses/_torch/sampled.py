"""Pure-PyTorch sampled softmax / NCE (the "torch" backend of ``tri_losses::sampled_fwd`` / ``_bwd``).

The same per-row losses and analytic gradients as the Triton kernels, for any number G of sample groups
(row i uses the ids ``samp[group[i]]``), in :func:`compute_dtype` (fp64 for fp64 inputs, else fp32).
Memory: the (N, T) true and (N, m) sampled logits, the gathered rows (G*m + N*T, D), and for G > 1 the rows
laid out by group, (G, S, D) and (G, S, m) with S the largest group (batched matmuls: the work of one group
each), or where that padding would pass 8N rows (many small groups) N x G*m logits (G <= D) or N x m x D
gathered rows (G > D). The weight gradient is assembled by a stable sort of all row contributions by class
id and a fixed-order segmented sum (no atomics), cast once to the weight's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validate import host_readable
from . import compute_dtype, row_segment_sum


class _Layout:
    """The valid rows laid out by group for batched matmuls: row i at ``slot[i] = g * S + k`` (the k-th valid row
    of its group g, in row order), ignored rows at ``G * S`` (a zero row); ``S`` from :func:`_layout`. A row past
    ``S`` (only off the CPU, for a split not of the public functions' form) is ``lost``: its logits are NaN,
    never a silent zero."""

    def __init__(self, key, counts, G, S):
        N = key.shape[0]
        order = torch.argsort(key, stable=True)
        pos = torch.empty_like(key)
        pos[order] = torch.arange(N, device=key.device) - (torch.cumsum(counts, 0) - counts)[key[order]]
        self.G, self.S = G, S
        self.lost = (key < G) & (pos >= S)
        self.slot = torch.where((key < G) & (pos < S), key * S + pos, G * S)
        inv = torch.full((G * S + 1,), N, dtype=torch.int64, device=key.device)
        self.inv = inv.scatter_(0, self.slot, torch.arange(N, device=key.device))[:G * S]  # slot -> row (N: none)

    def rows(self, a):
        """(N, k) -> (G, S, k): each group's rows, zero-padded."""
        return torch.cat([a, a.new_zeros(1, a.shape[1])])[self.inv].view(self.G, self.S, a.shape[1])

    def back(self, y):
        """(G, S, k) -> (N, k): row i's entry (0 for an ignored row, NaN for a lost one)."""
        k = y.shape[2]
        out = torch.cat([y.reshape(self.G * self.S, k), y.new_zeros(1, k)])[self.slot]
        return torch.where(self.lost[:, None], torch.nan, out)


def _layout(group, valid, G, read_sizes=None):
    """A :class:`_Layout` of the rows by group, or None for one group or where the padding would pass 8N rows
    (many small groups: the per-row forms then). ``S``, the largest group: read on the host (``read_sizes``, by
    default on the CPU for real tensors outside traced code, where it is free); else bounded without a host
    read by the public functions' split (groups of floor(N'/G) valid rows, the last with the rest: at most
    N // G + G - 1; N when every row counts, ``valid`` None)."""
    N = group.shape[0]
    if G == 1 or N == 0:
        return None
    key = group if valid is None else torch.where(valid != 0, group, G)
    counts = torch.zeros(G + 1, dtype=torch.int64, device=group.device).scatter_add_(0, key, torch.ones_like(key))
    if read_sizes is None:  # (not in traced code or for fake tensors, e.g. compute_sampled_logits under make_fx)
        read_sizes = host_readable(group)
    if read_sizes:
        S = int(counts[:G].max())
    else:
        S = N if valid is None else min(N, N // G + G - 1)
    S = max(S, 1)
    return _Layout(key, counts, G, S) if G * S <= 8 * N else None


def _per_group(a, ws, group, to_classes, layout=None):
    """Row i against the rows ``ws[group[i]]`` ((G, m, D)) of its group: ``to_classes``: ``a (N, D) -> (N, m)``,
    ``a_i . ws_gj``; else ``a (N, m) -> (N, D)``, ``sum_j a_ij ws_gj``. ``layout``: the rows by group (one batched
    matmul); without it, for many small groups, the per-row forms below."""
    G, m, D = ws.shape
    N = a.shape[0]
    if G == 1:
        return a @ ws[0].t() if to_classes else a @ ws[0]
    if layout is not None:
        return layout.back(torch.bmm(layout.rows(a), ws.transpose(1, 2) if to_classes else ws))
    if G > D:  # many groups (e.g. per-row negatives): the gathered rows, (N, m, D)
        return torch.einsum("nd,nmd->nm" if to_classes else "nm,nmd->nd", a, ws[group])
    # every group's columns for every row, (N, G*m), with the other groups' entries unused / zero
    if to_classes:
        return (a @ ws.reshape(G * m, D).t()).view(N, G, m).gather(1, group[:, None, None].expand(N, 1, m))[:, 0]
    sel = F.one_hot(group, G).to(a.dtype)[:, :, None] * a[:, None, :]
    return sel.reshape(N, G * m) @ ws.reshape(G * m, D)


def _by_row(t, group):
    """Row i's entry of a per-group tensor ``t (G, ...)``: ``t[group]``, a broadcast view for one group."""
    return t.expand(group.shape[0], *t.shape[1:]) if t.shape[0] == 1 else t[group]


def _gathered(w, labels, samp, ct):
    """W's rows of the true labels (N, T, D) and of the sampled ids (G, m, D), in ``ct``."""
    D = w.shape[1]  # explicit: N = 0 rows leave a -1 ambiguous
    return (w[labels.reshape(-1)].to(ct).view(*labels.shape, D), w[samp.reshape(-1)].to(ct).view(*samp.shape, D))


def class_scores(x, w, b, labels, samp, group, ct, gathered=None, layout=None):
    """``s_c(x_i)`` of the row's true labels (N, T) and of its group's sampled ids (N, m), in ``ct``, without
    log Q (``gathered``: W's rows from :func:`_gathered`, if already at hand; ``layout``: the rows by group, from
    :func:`_layout`). Plain differentiable torch (also the debugging path ``compute_sampled_logits``)."""
    xc = x.to(ct)
    wt, ws = gathered if gathered is not None else _gathered(w, labels, samp, ct)
    z_true = (xc[:, None, :] * wt).sum(-1)
    z_samp = _per_group(xc, ws, group, True, layout)
    if b is not None:
        z_true = z_true + b[labels].to(ct)
        z_samp = z_samp + _by_row(b[samp].to(ct), group)
    return z_true, z_samp


def hits(labels, samp, last, group, all_hits):
    """(N, m) bool: the row's sampled id equals one of its labels (TF's policy: only at the id's last position
    in the group's draw, ``last`` (G, m) nonzero there; ``all_hits``: at every position)."""
    hit = (_by_row(samp, group)[:, :, None] == labels[:, None, :]).any(-1)
    return hit if all_hits else hit & (_by_row(last, group) != 0)


def _logits(x, w, b, labels, logq_t, samp, logq_s, last, group, remove_hits, all_hits, gathered=None, layout=None):
    """Log-Q-corrected true (N, T) and sampled (N, m) logits and the dropped hits (N, m)."""
    ct = compute_dtype(x)
    z_true, z_samp = class_scores(x, w, b, labels, samp, group, ct, gathered, layout)
    z_true = z_true - logq_t.to(ct)
    z_samp = z_samp - _by_row(logq_s.to(ct), group)
    drop = hits(labels, samp, last, group, all_hits) if remove_hits else torch.zeros_like(z_samp, dtype=torch.bool)
    return z_true, z_samp, drop


def fwd(x, w, b, labels, logq_t, samp, logq_s, last, group, valid, nce, remove_hits, all_hits, log_norm):
    """(per-row loss (N,), lse (N,)) in the compute dtype; 0 on invalid rows; lse is 0 for NCE."""
    z_true, z_samp, drop = _logits(x, w, b, labels, logq_t, samp, logq_s, last, group, remove_hits, all_hits,
                                   layout=_layout(group, valid, samp.shape[0]))
    T = z_true.shape[1]
    if nce:
        zt, zs = z_true - log_norm, z_samp - log_norm
        rows = ((1.0 / T) * F.softplus(-zt) + (1.0 - 1.0 / T) * F.softplus(zt)).sum(1)
        rows = rows + torch.where(drop, 0.0, F.softplus(torch.where(drop, 0.0, zs))).sum(1)
        lse = torch.zeros_like(rows)
    else:
        lse = torch.logsumexp(torch.cat([z_true, torch.where(drop, -torch.inf, z_samp)], 1), 1)
        rows = lse - z_true.mean(1)
    ok = valid != 0
    return torch.where(ok, rows, 0.0), torch.where(ok, lse, 0.0)


def _group_rows(dz, x, group, G, layout=None):
    """(G, m, D'): the sum over the rows i of group g of ``dz[i, j] * x_i``, in a fixed order (no atomics)."""
    N, m = dz.shape
    if G == 1:
        return (dz.t() @ x)[None]
    if layout is not None:
        return torch.bmm(layout.rows(dz).transpose(1, 2), layout.rows(x))
    if G <= x.shape[1]:  # (G*m, N) @ (N, D') with the other groups' entries zero
        sel = F.one_hot(group, G).to(dz.dtype)[:, :, None] * dz[:, None, :]
        return (sel.reshape(N, G * m).t() @ x).view(G, m, -1)
    Dx = x.shape[1]
    key, sums, _ = row_segment_sum((dz[:, :, None] * x[:, None, :]).reshape(N, m * Dx), group)
    out = torch.zeros(G, m * Dx, dtype=dz.dtype, device=dz.device)
    out[key] = sums  # duplicates in key carry the same run sum
    return out.view(G, m, Dx)


def bwd(grad, x, w, b, labels, logq_t, samp, logq_s, last, group, valid, lse, nce, remove_hits, all_hits, log_norm,
        sparse, need_dw=True):
    """``(dx, dw, db, keys, ends)``, gradients in the inputs' dtypes. Dense: ``dw (V, D)``, ``db (V,)`` (empty
    without a bias), ``keys``/``ends`` empty. ``sparse``: one entry per contribution (G*m sampled rows, then
    N*T true labels), sorted by class id: ``keys`` the ids, ``ends`` marking the last entry of each run of equal
    ids, where ``dw``/``db`` hold the run's sum (so do the run's other entries). Without ``need_dw``: ``dw``,
    ``db``, ``keys`` and ``ends`` empty and their work skipped. The per-class sums: on the CPU (dense) an
    index_add, sequential there and so deterministic; elsewhere a stable sort and a fixed-order segmented sum
    (no atomics)."""
    ct = compute_dtype(x)
    N, D = x.shape
    G, m = samp.shape
    wt, ws = _gathered(w, labels, samp, ct)
    layout = _layout(group, valid, G)
    z_true, z_samp, drop = _logits(x, w, b, labels, logq_t, samp, logq_s, last, group, remove_hits, all_hits,
                                   (wt, ws), layout)
    T = z_true.shape[1]
    g = torch.where(valid != 0, grad.to(ct).expand(N), 0.0)[:, None]
    if nce:
        # sigmoid(z') - 1/T as (1 - 1/T) - sigmoid(-z'): exact where sigmoid(z') rounds to 1 (T = 1: -sigmoid(-z'))
        dzt = ((1.0 - 1.0 / T) - torch.sigmoid(log_norm - z_true)) * g
        dzs = torch.sigmoid(z_samp - log_norm) * g
    else:
        dzt = (torch.exp(z_true - lse[:, None].to(ct)) - 1.0 / T) * g
        dzs = torch.exp(z_samp - lse[:, None].to(ct)) * g
    dzs = torch.where(drop, 0.0, dzs)
    xc = x.to(ct)
    dx = (dzt[:, :, None] * wt).sum(1) + _per_group(dzs, ws, group, False, layout)
    no_keys = (samp.new_empty(0), samp.new_empty(0, dtype=torch.bool))
    if not need_dw:
        return (dx.to(x.dtype), w.new_empty(0), x.new_empty(0)) + no_keys
    # every contribution to W's rows (and b's: a column of ones beside x), summed per class id in a fixed order
    xe = torch.cat([xc, xc.new_ones(N, 1)], 1) if b is not None else xc
    De = xe.shape[1]
    rows = torch.cat([_group_rows(dzs, xe, group, G, layout).reshape(G * m, De),
                      (dzt[:, :, None] * xe[:, None, :]).reshape(N * T, De)])
    # ignored rows' placeholder labels add exact zeros: put them on sampled ids (classes the result has
    # anyway), so that the sparse gradient lists only the classes a live row or a sample touches
    flat = samp.reshape(-1)  # (num_sampled >= 1: never empty)
    pad = flat[torch.arange(N * T, device=flat.device) % flat.numel()].view(N, T)
    ids = torch.cat([flat, torch.where((valid != 0)[:, None], labels, pad.to(labels.dtype)).reshape(-1)])
    if not sparse and x.device.type == "cpu":
        tot = torch.zeros(w.shape[0], rows.shape[1], dtype=ct, device=x.device).index_add_(0, ids, rows)
        if b is None:  # tot is dW: no copy unless a cast
            return (dx.to(x.dtype), tot.to(w.dtype), x.new_empty(0)) + no_keys
        # copies: the op's outputs may not alias each other
        return (dx.to(x.dtype), tot[:, :D].to(w.dtype, copy=True), tot[:, D].to(b.dtype, copy=True)) + no_keys
    key, sums, ends = row_segment_sum(rows, ids)
    # copies: the op's outputs may not alias each other
    dw_rows = sums[:, :D].to(w.dtype, copy=True)
    db_rows = sums[:, D].to(b.dtype, copy=True) if b is not None else x.new_empty(0)
    if sparse:
        return dx.to(x.dtype), dw_rows, db_rows, key, ends
    dw = torch.zeros(w.shape, dtype=w.dtype, device=w.device)
    dw[key] = dw_rows  # duplicates in key carry the same run sum
    db = x.new_empty(0)
    if b is not None:
        db = torch.zeros(b.shape, dtype=b.dtype, device=b.device)
        db[key] = db_rows
    return (dx.to(x.dtype), dw, db) + no_keys
