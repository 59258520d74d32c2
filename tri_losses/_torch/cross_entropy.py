"""Pure-PyTorch cross-entropy (the "torch" backend), with the kernel's exact semantics.

Both backends reduce one row of logits to the same per-row quantities:

* ``a_c``: the target weight of class c (class weight x smoothed target distribution),
  ``A = sum_c a_c``;
* ``lse``: log-sum-exp of the (soft-capped) logits, computed as ``m + log(s)`` with ``m`` the row
  max and ``s = sum_c exp(x_c - m)``; every probability is formed from ``x - m`` (never ``x - lse``,
  which loses ulp(lse) of relative precision when |x| is large);
* the row loss ``L = sum_c a_c * (lse - t_c) = A*log(s) - sum_c a_c (t_c - m)`` (``t = x`` for
  logits and log-probs, ``t = log(max(x, 1e-20))`` for probs; ``lse = 0`` and ``m = 0`` unless logits);
* three backward coefficients so that ``dL_total/dx_j = c1*p_j - c2*a_j - c3*[j == y]``
  (``a_j / max(x_j, eps)`` for probs), times the soft-cap derivative and the upstream gradient.

With focal factor ``F = (1 - p_y)^gamma`` and ``G = gamma * (1 - p_y)^(gamma-1) * p_y * L``
(``p_y`` = softmax for logits, ``exp(x_y)`` for log-probs, ``x_y`` for probs; for probs ``G`` drops
the ``p_y`` factor since dp_y/dx_y = 1):

* logits:    ``c1 = F*A + G + 2*z*lse``, ``c2 = F``, ``c3 = G``;
* log-probs: ``c1 = 0``, ``c2 = F``, ``c3 = G``;
* probs:     ``c1 = 0``, ``c2 = F``, ``c3 = G``.

The forward value is ``min(F*L + z*lse^2, upper_bound)``; ignored rows give 0 and zero coefficients;
rows whose target is outside ``[0, C)`` (and not ``ignore_index``) give NaN.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import compute_dtype

# label_smoothing_mode codes shared with tri_losses/kernels/cross_entropy.py
SMOOTH_NONE, SMOOTH_TORCH, SMOOTH_OTHERS, SMOOTH_GAUSSIAN = 0, 1, 2, 3
# input_type codes
IN_LOGITS, IN_LOG_PROBS, IN_PROBS = 0, 1, 2


class CEOptions(NamedTuple):
    """The per-row options of one cross-entropy call, validated and built once by the public function.

    Both backends (and the Triton launchers) take this one value; the custom ops take its fields flat
    (``*opts``), in this order, because an op schema has no structured types."""
    dense: bool  # probability targets (else class ids)
    ignore_index: int
    smoothing: float  # label smoothing epsilon
    smooth_mode: int  # SMOOTH_* (SMOOTH_NONE when smoothing == 0)
    input_type: int  # IN_*
    gamma: float  # focal exponent (0: none)
    z_loss: float  # 0: none
    softcap: float  # 0: none
    upper_bound: float  # fake upper bound of the row loss (inf: none)
    # vocab-parallel: this input holds classes [class_offset, class_offset + C) of num_classes in all
    # (0: the input holds every class); target ids are global, smoothing is over num_classes
    class_offset: int = 0
    num_classes: int = 0


def total_classes(opts: CEOptions, C: int) -> int:
    """The class count of the whole problem: ``num_classes``, or the local ``C`` when not sharded."""
    return opts.num_classes if opts.num_classes > 0 else C
PROB_EPS = 1e-20
_CHUNK_ELEMS = 1 << 22  # rows per chunk = max(1, _CHUNK_ELEMS // C): bounded fp32 temporaries


def target_weights(target, weight, dense, C, smoothing, smooth_mode, ct, ignore_index, class_offset=0, V=0):
    """``a`` of shape (n, C) for a chunk: class weight times the (smoothed) target distribution.

    Columns are classes ``class_offset + [0, C)`` of ``V`` (0: ``C``) in all; ``target`` holds global ids."""
    mode = smooth_mode
    V = V or C
    if dense:
        q = target.to(ct)
        if mode == SMOOTH_TORCH:
            q = (1.0 - smoothing) * q + smoothing / V
    else:
        n = target.shape[0]
        cols = torch.arange(C, device=target.device) + class_offset
        hit = cols[None, :] == target[:, None]
        if mode == SMOOTH_NONE:
            q = hit.to(ct)
        elif mode == SMOOTH_TORCH:
            q = torch.where(hit, 1.0 - smoothing + smoothing / V, smoothing / V).to(ct)
        elif mode == SMOOTH_OTHERS:
            q = torch.where(hit, 1.0 - smoothing, smoothing / (V - 1)).to(ct)
        else:  # gaussian, sigma = 1 - smoothing, not renormalised
            sigma = 1.0 - smoothing
            d = (cols[None, :] - target[:, None]).to(ct)
            q = torch.exp(-(d * d) / (2.0 * sigma * sigma)) / (sigma * math.sqrt(2.0 * math.pi))
        q = q.expand(n, C)
        q = torch.where((target == ignore_index)[:, None], 0.0, q)
    if weight is not None:
        w = weight.to(ct)[None, :]
        # class ids: w_c only where the target puts mass (a NaN/inf w_c reaches only those rows, as in
        # PyTorch); probability targets: sum_c w_c q_c log p_c, as PyTorch forms it
        q = q * w if dense else torch.where(q != 0, q * w, 0.0)
    return q


class _Targets:
    """The target weights of a chunk, ``a_c = u * w_c + h * [c == y]`` (uniform + one hit) for class
    ids with no/torch/others smoothing, or a full (n, C) matrix (dense targets, Gaussian smoothing).
    The structured form keeps the common cases at gather/mat-vec cost, without an (n, C) temporary."""

    def __init__(self, target, weight, C, opts: CEOptions, ct):
        self.full = None
        eps = opts.smoothing
        V = total_classes(opts, C)
        if not opts.dense:
            local = target - opts.class_offset
            self.owned = (local >= 0) & (local < C)  # the target class is one of this input's columns
            self.y = local.clamp(0, max(C - 1, 0))[:, None]
        if opts.dense or opts.smooth_mode == SMOOTH_GAUSSIAN:
            self.full = target_weights(target, weight, opts.dense, C, eps, opts.smooth_mode, ct, opts.ignore_index,
                                       opts.class_offset, V)
            return
        valid = (target != opts.ignore_index).to(ct)
        u, h = {SMOOTH_NONE: (0.0, 1.0), SMOOTH_TORCH: (eps / V, 1.0 - eps),
                SMOOTH_OTHERS: (eps / max(V - 1, 1), 1.0 - eps - eps / max(V - 1, 1))}[opts.smooth_mode]
        self.w = weight.to(ct) if weight is not None else None
        w_y = self.w[self.y[:, 0]] if self.w is not None else torch.ones_like(valid)
        self.u = u * valid  # (n,)
        self.hit = (valid != 0) & self.owned
        self.h = torch.where(self.hit, h * w_y, 0.0)  # (n,); a NaN/inf w_y: only its rows
        self.uniform = u != 0.0
        # "others": the target's weight u w_y + h = (1 - eps) w_y >= 0 has h < 0 for eps > 1 - u, so its two
        # terms are summed first (sum_at): a -inf target logit then gives -inf, or nothing where eps = 1
        self.others = opts.smooth_mode == SMOOTH_OTHERS and self.uniform
        self.w_y, self.eps = w_y, eps
        self.A = self.u * (self.w.sum() if self.w is not None else float(C)) + self.h if self.uniform else self.h

    def sum_a(self):
        return self.full.sum(1) if self.full is not None else self.A

    def sum_at(self, t):
        """sum_c a_c * t_c, skipping a_c == 0 (so -inf entries with zero weight do not give NaN)."""
        if self.full is not None:
            return torch.where(self.full != 0, self.full * t, 0.0).sum(1)
        if self.others:
            return self._others_sum_at(t)
        out = self.h * t.gather(1, self.y)[:, 0]
        out = torch.where(self.h != 0, out, 0.0)
        if self.uniform:
            out = out + torch.where(self.u != 0, self.u * self._weighted_sum(t), 0.0)
        return out

    def _weighted_sum(self, t):
        """sum_c w_c t_c per row (zero weights skipped: a -inf t_c of weight 0 adds nothing)."""
        return torch.where(self.w != 0, t * self.w, 0.0).sum(1) if self.w is not None else t.sum(1)

    def _others_sum_at(self, t):
        """:meth:`sum_at` for "others" smoothing: ``u * (sum over the other classes of w_c t_c) + a_y t_y`` with
        ``a_y = u w_y + h`` (0 where eps = 1), skipping zero weights: no ``u w_y (-inf) + h (+inf)`` = NaN."""
        t_y = t.gather(1, self.y)[:, 0]
        if self.eps == 1.0:  # a_y = 0 (exactly): the other classes only, their sum without column y
            t = t.scatter(1, self.y, torch.where(self.hit, 0.0, t_y)[:, None])
            return torch.where(self.u != 0, self.u * self._weighted_sum(t), 0.0)
        a_y = torch.where(self.hit, self.u * self.w_y + self.h, 0.0)
        own = self.hit & (self.w_y != 0)  # (a zero w_y: column y is not in the weighted sum)
        tw = self._weighted_sum(t) - torch.where(own, self.w_y * t_y, 0.0)
        out = torch.where(self.u != 0, self.u * tw, 0.0) + torch.where(a_y != 0, a_y * t_y, 0.0)
        return torch.where(own & (t_y == -math.inf), -math.inf, out)  # (tw - (-inf)); a_y > 0: the sum is -inf

    def minus_scaled(self, d, c2, denom=None):
        """d - c2 * a (/ denom elementwise, for probs), in place on ``d`` (n, C)."""
        if self.full is not None:
            a = self.full if denom is None else self.full / denom
            return d.sub_(c2 * a)
        if self.uniform:
            a = self.u[:, None] * (self.w[None, :] if self.w is not None else 1.0)
            a = torch.where(self.u[:, None] != 0, a, 0.0).expand_as(d)  # ignored rows: no NaN/inf w_c
            d.sub_(c2 * (a if denom is None else a / denom))
        # (another input's target class: 0, also where c2 is not finite, e.g. a weighted mean over no weight)
        hit = torch.where(self.owned, c2[:, 0] * self.h, 0.0)
        if denom is not None:
            hit = hit / denom.gather(1, self.y)[:, 0]
        return d.scatter_add_(1, self.y, -hit[:, None])


def _softcap(x, softcap):
    return softcap * torch.tanh(x / softcap) if softcap > 0 else x


def ce_partial(logits, target, weight, opts: CEOptions):
    """Per-row sums over this input's columns, ``(N, 5)`` in the compute dtype: ``m`` (the row max, 0
    for an all -inf row or with no columns; 0 unless logits), ``s = sum_c exp(t_c - m)`` (logits; else
    0), ``A = sum_c a_c``, ``B = sum_c a_c (t_c - m)`` and ``t_y - m`` (0 where the target class is not
    a column here; ``t_y = x_y`` for probs). :func:`ce_finish` turns them into the row loss; with the
    classes split over inputs (``opts.class_offset``/``num_classes``) the sums of the parts combine."""
    N, C = logits.shape
    ct = compute_dtype(logits)
    part = torch.zeros(N, 5, dtype=ct, device=logits.device)
    if C == 0:  # no columns here (an empty shard): every sum is 0
        return part
    step = max(1, _CHUNK_ELEMS // C)
    buf = logits.new_empty(min(N, step), C, dtype=ct) if opts.input_type == IN_LOGITS else None
    for r0 in range(0, N, step):
        sl = slice(r0, min(N, r0 + step))
        a = _Targets(target[sl], weight, C, opts, ct)
        part[sl] = _partial_rows(_softcap(logits[sl].to(ct), opts.softcap), a, opts, buf)
    return part


def _partial_rows(x, a, opts, buf=None):
    """:func:`ce_partial`'s sums for one chunk of rows ``x`` (at least one column) with target weights
    ``a``; logits: ``buf`` (at least the chunk's size, may be x itself) is left holding ``exp(x - m)``."""
    A = a.sum_a()
    zero = torch.zeros_like(A)
    m, s = zero, zero
    if opts.input_type == IN_LOGITS:
        # everything relative to the row max m: t = x - m keeps fp32 precision at |x| ~ 1e4
        m = x.amax(1)
        m = torch.where(m == -math.inf, 0.0, m)
        t = torch.sub(x, m[:, None], out=buf[:x.shape[0]]) if buf is not None else x - m[:, None]
    else:
        t = torch.log(torch.clamp(x, min=PROB_EPS)) if opts.input_type == IN_PROBS else x
    B = a.sum_at(t)
    t_y = zero
    if opts.gamma != 0.0 and not opts.dense:
        t_y = torch.gather(t if opts.input_type != IN_PROBS else x, 1, a.y)[:, 0]
        t_y = torch.where(a.owned, t_y, 0.0)
    if opts.input_type == IN_LOGITS:
        s = (t.exp_() if buf is not None else torch.exp(t)).sum(1)  # t is used up
    return torch.stack((m, s, A, B, t_y), 1)


def ce_finish(A, B, m, log_s, t_ym, ignored, bad, opts: CEOptions):
    """The row loss and backward coefficients from the whole row's sums (see :func:`ce_partial`;
    ``log_s = log s``): ``(loss, lse, c1, c2, c3)``, 0 on ``ignored`` rows and NaN on ``bad`` ones."""
    input_type, gamma, z_loss, upper_bound = opts.input_type, opts.gamma, opts.z_loss, opts.upper_bound
    if input_type == IN_LOGITS:
        lse = m + log_s
        L = A * log_s - B
    else:
        lse = torch.zeros_like(A)
        L = -B
    c1 = torch.zeros_like(A)
    F = torch.ones_like(A)
    G = torch.zeros_like(A)
    if gamma != 0.0 and not opts.dense:
        if input_type == IN_LOGITS:
            log_py = t_ym - log_s  # t_ym is x_y - m
            one_m = -torch.expm1(log_py)
            py = torch.exp(log_py)
        elif input_type == IN_LOG_PROBS:
            one_m = -torch.expm1(t_ym)
            py = torch.exp(t_ym)
        else:
            one_m = 1.0 - t_ym
            py = torch.ones_like(t_ym)  # dp_y/dx_y = 1 for probs
        F = torch.pow(one_m, gamma)
        pyL = torch.where(py == 0, 0.0, py * L)  # (p_y = 0 at a -inf target: p_y L -> 0, not 0 * inf)
        G = torch.where(one_m > 0, gamma * torch.pow(one_m, gamma - 1.0) * pyL, 0.0)
        if gamma == 1.0:  # at p_y = 1, (1 - p_y)^0 = 1: the focal factor's gradient -L stays (0 above gamma 1)
            G = torch.where(one_m == 0, pyL, G)
    total = F * L
    if input_type == IN_LOGITS:
        c1 = F * A + G
        if z_loss != 0.0:
            total = total + z_loss * lse * lse
            c1 = c1 + 2.0 * z_loss * lse
    total = torch.clamp(total, max=upper_bound) if upper_bound < math.inf else total
    zero = torch.zeros_like(A)
    nan = torch.full_like(A, math.nan)
    return tuple(torch.where(ignored, zero, torch.where(bad, nan, v)) if k != 1 else v
                 for k, v in enumerate((total, lse, c1, F, G)))


def row_status(target, opts: CEOptions, C):
    """``(ignored, bad)`` rows: the ignore_index, and class ids outside ``[0, V)`` (NaN rows)."""
    if opts.dense:
        ignored = torch.zeros(target.shape[0], dtype=torch.bool, device=target.device)
        return ignored, ignored
    ignored = target == opts.ignore_index
    return ignored, ((target < 0) | (target >= total_classes(opts, C))) & ~ignored


def ce_fwd(logits, target, weight, opts: CEOptions, stats=False):
    """Per-row ``(loss, lse, coef (N, 3))`` in the compute dtype (see the module docstring); ``stats``: also
    the row statistics ``(N, 2) = (m, log s)`` (logits: the row max of the soft-capped logits, 0 for an
    all -inf row, and ``log sum exp(x - m)``)."""
    C = logits.shape[1]
    m, s, A, B, t_ym = ce_partial(logits, target, weight, opts).unbind(1)
    log_s = torch.log(s) if opts.input_type == IN_LOGITS else s
    loss, lse, c1, c2, c3 = ce_finish(A, B, m, log_s, t_ym, *row_status(target, opts, C), opts)
    if stats:
        return loss, lse, torch.stack((c1, c2, c3), 1), torch.stack((m, log_s), 1)
    return loss, lse, torch.stack((c1, c2, c3), 1)


def ce_bwd(grad_loss, grad_lse, logits, target, weight, lse, coef, opts: CEOptions, out=None):
    """Gradient w.r.t. the logits; writes into ``out`` (may be ``logits`` itself) when given. ``lse`` is
    not needed: p is re-formed from the row max (``exp(x - lse)`` loses ulp(lse) at large |x|), the
    local one, or the whole row's ``(m, log s)`` in ``coef[:, 3:5]`` when the classes are split."""
    input_type, softcap = opts.input_type, opts.softcap
    N, C = logits.shape
    ct = compute_dtype(logits)
    if out is None:
        out = torch.empty_like(logits)
    if C == 0:
        return out
    step = max(1, _CHUNK_ELEMS // max(C, 1))
    for r0 in range(0, N, step):
        sl = slice(r0, min(N, r0 + step))
        xr = logits[sl].to(ct)
        x = _softcap(xr, softcap)
        tgt = target[sl]
        a = _Targets(tgt, weight, C, opts, ct)
        g = grad_loss[sl].to(ct)
        ign = None if opts.dense else tgt == opts.ignore_index
        if ign is not None:  # ignored rows: no loss gradient (even where p is NaN or g is inf)
            g = torch.where(ign, 0.0, g)
        c1, c2, c3 = (coef[sl, k] * g for k in range(3))  # upstream folded into the row scalars
        c3 = torch.where(coef[sl, 2] == 0, 0.0, c3)  # (no such term: none for an inf upstream either, 0 * inf)
        if input_type == IN_LOGITS:
            if grad_lse is not None:
                c1 = c1 + grad_lse[sl].to(ct)
            # p in the output's own rows when they are in the compute dtype (x may be those rows: the
            # in-place backward; x is not read again once p is formed, unless soft-capped, when it is a
            # temporary of its own)
            d = out[sl] if out.dtype == ct else torch.empty_like(x)
            if coef.shape[1] == 5:  # classes split over inputs: the whole row's max and log-sum
                torch.sub(x, coef[sl, 3:4].to(ct), out=d).sub_(coef[sl, 4:5].to(ct)).exp_().mul_(c1[:, None])
            else:  # from the row max (exp(x - lse) loses ulp(lse) at large |x|), as softmax forms it
                m = x.amax(1, keepdim=True)
                m = torch.where(m == -math.inf, 0.0, m)  # an all -inf row: exp(-inf) = 0, not NaN
                s = torch.sub(x, m, out=d).exp_().sum(1)
                d.mul_((c1 / s)[:, None])  # (an all -inf row: 0 / 0, NaN as softmax; ignored rows are zeroed below)
        else:
            d = torch.zeros_like(x)
        # ignored rows: 0 even where their logits are NaN, unless the lse's gradient reaches them
        d = _zero_rows(_grad_terms(d, x, a, c2, c3, opts), ign if grad_lse is None else None)
        if input_type == IN_PROBS:  # -a/max(p, eps) at p = 0 overflows 16-bit outputs: saturate
            big = torch.finfo(out.dtype).max
            d = d.clamp(-big, big)
        if input_type != IN_LOGITS or out.dtype != ct:
            out[sl] = d.to(out.dtype)
    return out


def _zero_rows(d, rows):
    """``d`` with the given rows set to 0 (an ignored row's gradient is 0 even where its logits are NaN,
    as the kernels give: the scale by 0 leaves NaN * 0). On the host only the ignored rows are written
    (found with a host read, free there); on a device every row is masked, with no sync."""
    if rows is None:
        return d
    if d.device.type == "cpu":
        idx = rows.nonzero().squeeze(1)
        return d.index_fill_(0, idx, 0.0) if idx.numel() else d
    return d.masked_fill_(rows[:, None], 0.0)


def _grad_terms(d, x, a, c2, c3, opts):
    """The gradient's target terms, in place on ``d`` (n, C) holding ``c1 * p`` (0 for log-probs/probs):
    ``d - c2 * a_c - c3 * [c == y]`` (``a_c / max(x_c, eps)`` for probs), times the soft-cap derivative."""
    d = a.minus_scaled(d, c2[:, None], torch.clamp(x, min=PROB_EPS) if opts.input_type == IN_PROBS else None)
    if not opts.dense:
        d.scatter_add_(1, a.y, -torch.where(a.owned, c3, 0.0)[:, None])
    if opts.softcap > 0:
        d.mul_(1.0 - (x / opts.softcap) ** 2)
    return d


def ce_fwd_grad(logits, target, weight, denom, opts: CEOptions, out):
    """The training fast path: per-row losses, and in ``out`` (may be ``logits`` itself) the gradient of
    ``loss.sum() / denom`` for an upstream of 1 (``denom``: a 0-dim device tensor, never read on the host).

    Logits with class ids (the common case) take one pass per chunk of rows: ``exp(x - m)`` is formed once,
    in the output's own rows where it has the compute dtype, and serves the row sums and then, scaled in
    place, the gradient (the same quantities as :func:`ce_fwd` then :func:`ce_bwd`)."""
    N, C = logits.shape
    if opts.dense or opts.input_type != IN_LOGITS or opts.num_classes > 0 or C == 0:
        loss, lse, coef = ce_fwd(logits, target, weight, opts)
        per_row = (1.0 / denom.to(loss.dtype)).expand(N)
        ce_bwd(per_row, None, logits, target, weight, lse, coef, opts, out=out)
        return loss
    ct = compute_dtype(logits)
    loss = torch.empty(N, dtype=ct, device=logits.device)
    ignored, bad = row_status(target, opts, C)
    g_row = torch.where(ignored, 0.0, 1.0 / denom.to(ct))
    step = max(1, _CHUNK_ELEMS // C)
    for r0 in range(0, N, step):
        sl = slice(r0, min(N, r0 + step))
        x = _softcap(logits[sl].to(ct), opts.softcap)
        # exp(x - m) in the output's rows when it is in the compute dtype (x may be those same rows: the
        # in-place path; each element is read before it is written, and x is not needed again unless
        # soft-capped, when x is a temporary of its own)
        d = out[sl] if out.dtype == ct else torch.empty_like(x)
        a = _Targets(target[sl], weight, C, opts, ct)
        m, s, A, B, t_ym = _partial_rows(x, a, opts, d).unbind(1)  # d: exp(x - m)
        total, _, c1, c2, c3 = ce_finish(A, B, m, torch.log(s), t_ym, ignored[sl], bad[sl], opts)
        loss[sl] = total
        g = g_row[sl]
        d = _grad_terms(d.mul_((c1 * g / s)[:, None]), x, a, c2 * g, c3 * g, opts)  # from p * c1
        d = _zero_rows(d, ignored[sl])
        if out.dtype != ct:
            out[sl] = d.to(out.dtype)
    return loss


def ce_scale(src, dst, g):
    """``dst = src * g`` (``dst`` may be ``src``) in the compute dtype with one rounding, exact zeros kept (an
    ignored row's gradient is 0 whatever the upstream, NaN or inf included); ``g`` is a 0-dim device tensor
    (no host read off the CPU)."""
    ct = compute_dtype(src)
    g = g.to(ct)
    if src.dtype == ct and src.device.type == "cpu" and bool(torch.isfinite(g)):  # (a free read on the CPU)
        torch.mul(src, g, out=dst)
        return dst
    step = max(1, _CHUNK_ELEMS // max(src.shape[1], 1))
    for r0 in range(0, src.shape[0], step):
        sl = slice(r0, min(src.shape[0], r0 + step))
        s = src[sl].to(ct)
        dst[sl] = torch.where(s == 0, 0.0, s * g).to(dst.dtype)
    return dst
