"""Pure-PyTorch CTC: log-space alpha/beta recursions vectorised over batch and states (loop over time).

Layout (shared with ``tri_losses/kernels/ctc.py``): time-major emissions ``lp (T, B, C)`` (log-probs, or logits
with their per-frame log-sum-exp ``lse (T, B, 2)`` = (row max m, log sum exp(x - m)) subtracted on the fly as
``(x - m) - log s``: exact for large |x|, where ``x - (m + log s)`` would lose ulp(m)), padded targets ``(B, S)``,
extended state sequence ``blank, l1, blank, ..., lS, blank`` (2S+1 states; state s emits ``ext[s]``).

Transitions into state s at frame t (``label_loop=True``, standard CTC): from s (stay), s-1, and s-2
when s is a label state whose label differs from the one at s-2. ``label_loop=False`` (RNA-like):
label states have no self-loop and may always be entered from s-2 (repeats need no blank).
Viterbi (``max_approx``) replaces log-sum-exp by max. Its path is backtracked with the tie rule of RETURNN's
``FastViterbiOp`` on RETURNN's CTC automaton (whose edges into a state are ordered s-2, s-1, s and whose end
state is entered from the last label before the final blank, the lowest edge winning a tie): at each frame the
predecessor whose score plus the state's emission, rounded as the forward adds them, is largest, ties to s-2,
then s-1, then s; at the end the last label state over the final blank.

On the CPU the full-sum with label loops takes its alpha and beta recursions from PyTorch's native CTC
(see :func:`native_path`); posteriors are always normalised per frame.
"""
from __future__ import annotations


import math

import torch

from . import compute_dtype, logsumexp0, segment_sum

NEG = float("-inf")


def extended(targets: torch.Tensor, target_lengths: torch.Tensor, blank: int, num_classes: int | None = None):
    """(ext (B, 2S+1) class ids, valid (B, 2S+1) states inside 2*len+1, skip (B, 2S+1) s-2 allowed).

    With ``num_classes``, a label outside ``[0, num_classes)`` or equal to the blank (unchecked device
    input) becomes an invalid state (its sequence then has no path: loss +inf, gradient 0) and ``ext`` stays in range.
    """
    B, S = targets.shape
    L = 2 * S + 1
    ext = torch.full((B, L), blank, dtype=torch.int64, device=targets.device)
    s_idx = torch.arange(L, device=targets.device)
    valid = s_idx[None, :] < (2 * target_lengths[:, None] + 1)
    if S:
        if num_classes is not None:
            ok = (targets >= 0) & (targets < num_classes) & (targets != blank)
            ext[:, 1::2] = torch.where(ok, targets, blank)
            valid[:, 1::2] &= ok
        else:
            ext[:, 1::2] = targets
    skip = torch.zeros(B, L, dtype=torch.bool, device=targets.device)
    if S > 1:
        skip[:, 3::2] = targets[:, 1:] != targets[:, :-1]
    return ext, valid, skip



def frame_lse(x):
    """Per-frame (row max m, log sum exp(x - m)) (T, B, 2) in the compute dtype (m = 0 for all -inf rows)."""
    xc = x.to(compute_dtype(x))
    m = xc.amax(-1) if x.shape[-1] else xc.new_zeros(x.shape[:-1])
    m = torch.where(torch.isfinite(m), m, torch.where(m == NEG, 0.0, m))
    return torch.stack([m, (xc - m[..., None]).exp_().sum(-1).log_()], -1)


def log_softmax_at(v, lse):
    """log-softmax values of logits ``v (T, B, k)`` of each frame: ``(v - m) - log s``."""
    return (v - lse[..., :1].to(v.dtype)) - lse[..., 1:].to(v.dtype)


def emissions(lp, lse, ext):
    """All frames' state emissions (T, B, 2S+1) in one gather (the log-softmax applied on the fly)."""
    T = lp.shape[0]
    e = lp.to(compute_dtype(lp)).gather(2, ext[None].expand(T, -1, -1))
    return log_softmax_at(e, lse) if lse is not None else e


def _combine(*terms, viterbi=False):
    """log-sum-exp (max with ``viterbi``) of a few same-shaped tensors of log-scores."""
    v = torch.stack(terms)
    return v.amax(0) if viterbi else logsumexp0(v)


def _frames_of(T, input_lengths, device):
    """(T, B) bool: frame t is inside sequence b."""
    return torch.arange(T, device=device)[:, None] < input_lengths[None, :]


def forward(lp, lse, targets, input_lengths, target_lengths, blank, label_loop, viterbi):
    """alpha (T, B, 2S+1) fp32 and log Z (B,) (best path score with ``viterbi``).

    Each frame runs on every sequence (a few ops on (B, 2S+1), the s-1 and s-2 shifts views of a buffer with
    two -inf columns in front); the frames past a sequence's end are masked once at the end."""
    T, B, _ = lp.shape
    ext, valid, skip = extended(targets, target_lengths, blank, lp.shape[-1])
    L = ext.shape[1]
    is_label = (torch.arange(L, device=lp.device) % 2 == 1)[None, :]
    ct = compute_dtype(lp)
    if T == 0:
        alpha = torch.full((T, B, L), NEG, dtype=ct, device=lp.device)
        return alpha, torch.where(target_lengths == 0, 0.0, NEG).to(ct), ext, valid, skip
    E = emissions(lp, lse, ext).unbind(0)
    alpha = torch.empty(T, B, L, dtype=ct, device=lp.device)
    buf = torch.full((B, L + 2), NEG, dtype=ct, device=lp.device)  # alpha_{t-1} behind two -inf columns
    a, neg, out = buf[:, 2:], buf.new_full((), NEG), alpha.unbind(0)
    a[:, :2] = 0.0
    # a state no path reaches stays -inf whatever its emission (a NaN score there cannot spread: PyTorch's
    # CTC never visits such states); a NaN sum of incoming paths stays NaN
    torch.where(valid & (a != NEG), a + E[0], neg, out=a)
    out[0].copy_(a)
    skip_ok = skip if label_loop else is_label.expand(B, L)
    for t in range(1, T):
        stay = a if label_loop else torch.where(is_label, NEG, a)
        nxt = _combine(stay, buf[:, 1:-1], torch.where(skip_ok, buf[:, :-2], NEG), viterbi=viterbi)
        reached = valid & (nxt != NEG)
        torch.where(reached, nxt.add_(E[t]), neg, out=a)
        out[t].copy_(a)
    a = alpha[(input_lengths - 1).clamp(0, T - 1), torch.arange(B, device=lp.device)]  # each one's last frame
    alpha.masked_fill_(~_frames_of(T, input_lengths, lp.device)[..., None], NEG)
    last = 2 * target_lengths
    fin_blank = a.gather(1, last[:, None])[:, 0]
    fin_label = torch.where(target_lengths > 0, a.gather(1, (last - 1).clamp(min=0)[:, None])[:, 0], NEG)
    logz = _combine(fin_blank, fin_label, viterbi=viterbi)
    logz = torch.where(input_lengths == 0, torch.where(target_lengths == 0, 0.0, NEG), logz)
    return alpha, logz, ext, valid, skip


def posteriors(lp, lse, alpha, logz, ext, valid, skip, input_lengths, target_lengths, label_loop):
    """State posteriors gamma (T, B, 2S+1) = exp(alpha + beta - e - logZ), 0 where infeasible/padded.

    beta runs over every frame of every sequence (the s+1 and s+2 shifts views of a buffer with two -inf
    columns behind), restarted at each sequence's last frame; each frame's beta without its emission is kept
    in the output, then turned into posteriors for blocks of frames at once."""
    T, B, L = alpha.shape
    ct = compute_dtype(lp)
    is_label = (torch.arange(L, device=lp.device) % 2 == 1)[None, :]
    last = 2 * target_lengths
    s_idx = torch.arange(L, device=lp.device)[None, :]
    skip_next = torch.zeros_like(skip)  # transition s -> s+2 allowed
    skip_ok = skip if label_loop else is_label.expand(B, L)
    if L > 2:
        skip_next[:, :-2] = skip_ok[:, 2:]
    # beta at a sequence's last frame (without its emission): 0 in the final blank and the last label
    init = torch.where((s_idx == last[:, None]) | ((s_idx == last[:, None] - 1) & (target_lengths[:, None] > 0)),
                       0.0, NEG).to(ct)
    E = emissions(lp, lse, ext).unbind(0)
    at_end = (torch.arange(T, device=lp.device)[:, None] == (input_lengths - 1)[None, :])[..., None].unbind(0)
    gam = torch.empty(T, B, L, dtype=ct, device=lp.device)
    rest = gam.unbind(0)  # beta without frame t's emission, turned into gamma below
    buf = torch.full((B, L + 2), NEG, dtype=ct, device=lp.device)  # beta with frame t's emission
    b, neg = buf[:, :L], buf.new_full((), NEG)
    for t in range(T - 1, -1, -1):
        stay = b if label_loop else torch.where(is_label, NEG, b)
        nb = _combine(stay, buf[:, 1:-1], torch.where(skip_next, buf[:, 2:], NEG))
        torch.where(at_end[t], init, nb, out=rest[t])
        torch.where(valid & (rest[t] != NEG), rest[t] + E[t], neg, out=b)  # (as alpha: unreached stays -inf)
    live = _frames_of(T, input_lengths, lp.device)[..., None] & valid[None] & torch.isfinite(logz)[None, :, None]
    step = max(1, (1 << 22) // max(B * L, 1))
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        a, r = alpha[t0:t1], gam[t0:t1]  # a state on no complete path: posterior 0 even beside a NaN
        gam[t0:t1] = frame_posteriors(torch.where(live[t0:t1] & (a != NEG) & (r != NEG), a + r, NEG))
    return gam


def frame_posteriors(v):
    """gamma_t(s) = exp(v(s)) / sum_s exp(v(s)) for v = log(alpha_t beta_t) without frame t's emission
    (-inf on dead states; frames without a live state get 0): each frame's states normalised by their own
    sum (= Z up to rounding) from their maximum, so the rounding of large log-scores (|x| ~ 1e4 and up)
    neither leaks into the posteriors nor overflows."""
    m = v.amax(-1, keepdim=True)
    w = (v - torch.where(m > NEG, m, 0.0)).exp_()
    return w.div_(w.sum(-1, keepdim=True).clamp_(min=1.0))  # the maximum's term is 1: the sum is >= 1


def viterbi_path(alpha, E, ext, skip, input_lengths, target_lengths, label_loop, blank):
    """Best state path by backtracking the Viterbi alpha (``E``: the forward's emissions, :func:`emissions`):
    class ids (B, T) (blank on padded frames); ties as the module docstring says."""
    T, B, L = alpha.shape
    dev = alpha.device
    path = torch.full((B, T), blank, dtype=torch.int64, device=dev)
    if T == 0:
        return path
    s_idx = torch.arange(L, device=dev)[None, :]
    is_label = (s_idx % 2 == 1).expand(B, L)
    skip_ok = skip if label_loop else is_label
    bidx = torch.arange(B, device=dev)
    last = 2 * target_lengths
    tl_ = (input_lengths - 1).clamp(min=0)
    a_last = alpha[tl_, bidx]
    fb = a_last.gather(1, last[:, None])[:, 0]
    fl = torch.where(target_lengths > 0, a_last.gather(1, (last - 1).clamp(min=0)[:, None])[:, 0], NEG)
    final = torch.where((target_lengths > 0) & (fl >= fb), last - 1, last)  # ties: the last label
    # each state's three predecessors s-2, s-1, s (that order: a tie goes to the first) and whether they may
    # precede it
    offs = torch.tensor([2, 1, 0], device=dev)
    allowed = torch.stack([(s_idx >= 2) & skip_ok, (s_idx >= 1).expand(B, L),
                           torch.ones_like(skip_ok) if label_loop else ~is_label], -1)  # (B, L, 3)
    at_end = (torch.arange(T, device=dev)[:, None] == (input_lengths - 1)[None, :]).unbind(0)
    active = (torch.arange(T, device=dev)[:, None] < input_lengths[None, :]).unbind(0)
    E = E.unbind(0)
    s = final
    for t in range(T - 1, -1, -1):
        s = torch.where(at_end[t], final, s)
        path[:, t] = torch.where(active[t], ext.gather(1, s[:, None])[:, 0], blank)
        if t == 0:
            break
        e = E[t].gather(1, s[:, None])  # the candidates' sums as the forward rounded them
        cand = alpha[t - 1].gather(1, (s[:, None] - offs).clamp_(min=0)).add_(e)
        best, k = torch.where(allowed[bidx, s], cand, NEG).max(1)  # max: the first of ties
        s = torch.where(active[t] & (best > NEG), s - 2 + k, s)  # (no path: stay, any index stays in range)
    return path


def class_posteriors(gam, ext, C):
    """Sum state posteriors per class: (T, B, C), deterministically."""
    return segment_sum(gam, ext[None], C)


# ------------------------------------------------------------------------------------------------
# the op bodies of the torch backend (tri_losses/ctc.py's custom ops)
# ------------------------------------------------------------------------------------------------
def native_path(x, label_loop, viterbi):
    """Whether the full-sum recursions run in PyTorch's native CTC (CPU, label loops, not Viterbi): its
    forward (alpha) and backward (beta and the per-class posteriors) on the (T, B, S+1) emissions of the
    blank and each label, in the compute dtype. Everything else (the per-frame normalisation of the
    posteriors, the -gamma log-probs gradient, the softmax term, infeasible and out-of-range handling)
    stays this module's own."""
    return x.device.type == "cpu" and bool(label_loop) and not viterbi and x.shape[1] > 0  # native rejects B = 0


def _compact(x, lse, targets, target_lengths, blank):
    """(E (T, B, S'+1) emissions in the compute dtype: column 0 the blank, column 1 + j label j's class;
    compact targets (B, S') into those columns, a repeated class pointing at its first occurrence's column
    (so that equal labels stay equal; the later occurrences' own columns are unused and emit -inf); the
    class of each column (B, S'+1); the columns in use (B, S'+1), bool; S' = max(S, 1)). An out-of-range
    label (or the blank) emits -inf: no path."""
    T, B, C = x.shape
    S = targets.shape[1]
    ok = (targets >= 0) & (targets < C) & (targets != blank)
    cls = torch.cat([torch.full((B, 1), blank, dtype=torch.int64, device=x.device), torch.where(ok, targets, blank)], 1)
    e = x.gather(2, cls[None].expand(T, -1, -1)).to(compute_dtype(x))
    if lse is not None:
        e.sub_(lse[..., :1].to(e.dtype)).sub_(lse[..., 1:].to(e.dtype))  # log_softmax_at, in place
    # column of each label: that of its class's first occurrence in the target (stable sort + run starts)
    pos = torch.arange(S, device=x.device)
    key, order = torch.sort(torch.where(ok, targets, -1 - pos[None, :]), dim=1, stable=True)
    start = torch.ones_like(key, dtype=torch.bool)
    start[:, 1:] = key[:, 1:] != key[:, :-1]
    first_sorted = torch.cummax(torch.where(start, pos[None, :].expand(B, S), 0), 1).values
    first = torch.empty_like(order).scatter_(1, order, order.gather(1, first_sorted))
    tgt = 1 + first
    live = ok & (first == pos[None, :])
    e[:, :, 1:].masked_fill_(~live[None], NEG)
    used = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=x.device), live], 1)
    if S == 0:
        tgt = torch.ones(B, 1, dtype=torch.int64, device=x.device)
        e = torch.cat([e, torch.full_like(e[:, :, :1], NEG)], 2)
        cls = torch.cat([cls, cls], 1)
        used = torch.cat([used, torch.zeros_like(used)], 1)
    return e, tgt, cls, used


def _native_alpha(e, tgt, input_lengths, target_lengths):
    """PyTorch's CTC alpha (T, B, 2S'+1) (a transposed view of its (B, T, .) buffer) and log Z (B,)
    of compact emissions (blank = column 0). PyTorch leaves the frames past a sequence's length and the
    states past its 2 S_b + 1 unwritten: they are set to -inf here, so that the op's output is defined."""
    nll, la = torch._ctc_loss(e, tgt, input_lengths, target_lengths, 0, False)
    B, T, L = la.shape
    unwritten = (torch.arange(T, device=la.device)[None, :, None] >= input_lengths[:, None, None]) | \
        (torch.arange(L, device=la.device)[None, None, :] >= 2 * target_lengths[:, None, None] + 1)
    return la.masked_fill_(unwritten, NEG).transpose(0, 1), -nll


def native_alpha_like(x, S):
    """An empty tensor laid out as the native path's alpha (for the ops' fake implementations)."""
    T, B, _ = x.shape
    return x.new_empty(B, T, 2 * S + 1, dtype=compute_dtype(x)).transpose(0, 1)


def loss_forward(x, targets, input_lengths, target_lengths, blank, is_logits, viterbi, label_loop):
    """(alpha (T, B, 2S+1), log Z (B,), lse pair (T, B, 2) for logits else None), in the compute dtype."""
    lse = frame_lse(x) if is_logits else None
    if native_path(x, label_loop, viterbi):
        e, tgt, _, _ = _compact(x, lse, targets, target_lengths, blank)
        a, logz = _native_alpha(e, tgt, input_lengths, target_lengths)
        logz = torch.where(input_lengths == 0, torch.where(target_lengths == 0, 0.0, NEG), logz)
        # PyTorch sizes its alpha by the longest target (2 max(S_b) + 1 states): pad to the 2S + 1 columns
        L = 2 * targets.shape[1] + 1
        if a.shape[2] != L:
            alpha = native_alpha_like(x, targets.shape[1]).fill_(NEG)
            k = min(L, a.shape[2])
            alpha[:, :, :k] = a[:, :, :k]
            a = alpha
        return a, logz.to(compute_dtype(x)), lse
    alpha, logz, *_ = forward(x, lse, targets, input_lengths, target_lengths, blank, label_loop, viterbi)
    return alpha, logz, lse


def _native_class_posteriors(x, lse, targets, input_lengths, target_lengths, blank, alpha, loss, ok):
    """Class posteriors of the compact columns ``(T, B, S'+1)`` (compute dtype; 0 on padded frames, dead
    columns and impossible emissions; not yet normalised), each frame's normaliser ``(T, B, 1)`` and each
    column's class ``(B, S'+1)``; ``ok (T, B)``: the valid frames of feasible sequences. From PyTorch's
    native CTC backward on the compact emissions with the saved alpha: it returns ``exp(e) - gamma`` per column, with
    gamma = exp(alpha + beta - e + nll). Each frame is to be normalised by its own sum: the rounding of a
    large -log Z (fp32: ulp(1700) ~ 1e-4 at T = 300) scales a frame's posteriors uniformly, and the
    normalisation removes it (PyTorch's own fp32 gradient keeps it: ~1e-3 there). None where an emission
    exceeds 1 (unnormalised log-probs: gamma <= 1 is lost next to exp(e)) or a valid frame of a feasible
    sequence sums to more than 10% off 1 (log-scores near 1e30): the caller then takes the per-frame
    normalised recursion of this module."""
    B = x.shape[1]
    e, tgt, cls, used = _compact(x, lse, targets, target_lengths, blank)
    if bool((e > 1.0).any()):  # unnormalised log-probs: exp(e) - r would cancel gamma away (fp32 from e ~ 8)
        return None
    # the Tensor-lengths overload named: the packet would try the int-list one first and format the error
    r = torch.ops.aten._ctc_loss_backward.Tensor(e.new_ones(B), e, tgt, input_lengths, target_lengths, loss.to(e.dtype),
                                                 alpha.transpose(0, 1), 0, False)
    # native forms exp(res + nll - lp) with lp = -inf (an impossible emission, an unused column) as NaN: 0;
    # rounding below 0: 0
    gam = e.exp().sub_(r)
    torch.fmax(gam, gam.new_zeros(()), out=gam)  # fmax: NaN -> 0 too
    if not bool(ok.all()):  # padded frames (native: r = 0 there) and infeasible sequences: 0
        gam.masked_fill_(~ok[..., None], 0.0)
    tot = gam.sum(-1, keepdim=True)
    if not bool(torch.where(ok, (tot[..., 0] - 1).abs() <= 0.1, True).all()):
        return None
    # native's own exp(e) - gamma per column, formed in double there: the logits gradient is built from it (small
    # numbers throughout); 0 where a column emits nothing (-inf: NaN from native)
    return gam, torch.where(tot > 0, tot, 1.0), cls, torch.where(torch.isfinite(r), r, 0.0), used


def best_path(x, lse, alpha, targets, input_lengths, target_lengths, blank, label_loop):
    """The Viterbi alignment (B, T) from the Viterbi alpha of ``x`` (``lse``: logits; blank on padded frames)."""
    ext, _, skip = extended(targets, target_lengths, blank, x.shape[-1])
    return viterbi_path(alpha, emissions(x, lse, ext), ext, skip, input_lengths, target_lengths, bool(label_loop),
                        blank)


def loss_grad(grad_loss, x, lse, targets, input_lengths, target_lengths, alpha, loss, blank, viterbi, label_loop,
              softmax, out_dtype):
    """``grad_loss[b] * (softmax - gamma)`` (``softmax``) or ``-grad_loss[b] * gamma``, 0 on padded frames
    and infeasible sequences, in ``out_dtype`` (formed in the compute dtype, rounded once)."""
    T, B, C = x.shape
    logz = -loss
    ct = compute_dtype(x)
    frames = torch.arange(T, device=x.device)[:, None] < input_lengths[None, :]
    ok = frames & torch.isfinite(logz)[None, :]
    nan_frames = frames & torch.isnan(logz)[None, :]  # a NaN loss (NaN input): NaN throughout, as PyTorch's CTC
    native = native_path(x, label_loop, viterbi) and _native_class_posteriors(
        x, lse, targets, input_lengths, target_lengths, blank, alpha, loss, ok)
    if native:
        # few passes over (T, B, C): the softmax (or zeros), its sum with the target's classes zeroed, the scale,
        # the mask where a frame is off; the target's classes (S' + 1 columns per frame) added on their own
        gam, tot, cls, r, used = native
        g = torch.where(ok, grad_loss.to(ct)[None, :], 0.0)[..., None]
        idx = cls[None].expand(T, -1, -1)
        if softmax:
            # softmax - gamma / tot without forming two numbers near 1: with r_c = p_c - gamma_c (native's value on
            # the target's classes, p_c on the others) and S = sum_c r_c = 1 - tot, the gradient is
            # (r_c - p_c S) / (1 - S): log_softmax's backward of r, divided by the frame's posterior sum (which
            # removes the rounding of a large -log Z, as the normalisation of gamma does); p_c on the other classes.
            # The target's classes are zeroed (an unused column zeroes its class's twin too) and get their value
            # added (0 from an unused column)
            # (g multiplies the finished row: a non-finite upstream gives g times the local derivative, as the
            # Triton backend's)
            d = torch.softmax(x.to(ct), -1)
            p_cols = d.gather(2, idx)
            S = d.scatter_(2, idx, 0.0).sum(-1, keepdim=True).add_(r.sum(-1, keepdim=True))
            val = p_cols.mul_(S).neg_().add_(r).mul_(used[None].to(ct)).div_(1.0 - S)
            d.scatter_add_(2, idx, val).mul_(g)
        else:
            # a state of gamma 0 adds 0 whatever g (as the Triton backend's: -g * gamma only where gamma > 0)
            d = torch.zeros(T, B, C, dtype=ct, device=x.device)
            d.scatter_add_(2, idx, torch.where(gam != 0, gam * (-g / tot), 0.0))
        if softmax and not bool(ok.all()):
            d.masked_fill_(~ok[..., None], 0.0)
        if bool(nan_frames.any()):  # (the native path runs on the CPU: a free host read)
            d.masked_fill_(nan_frames[..., None], math.nan)
        return d.to(out_dtype)
    ext, valid, skip = extended(targets, target_lengths, blank, C)
    if viterbi:
        path = viterbi_path(alpha, emissions(x, lse, ext), ext, skip, input_lengths, target_lengths, label_loop,
                            blank)
        gam = torch.nn.functional.one_hot(path.t(), C).to(ct)
    else:
        gam = class_posteriors(posteriors(x, lse, alpha, logz, ext, valid, skip, input_lengths, target_lengths,
                                          label_loop), ext, C)
    d = torch.exp(log_softmax_at(x.to(ct), lse)) - gam if softmax else -gam
    off = torch.where(nan_frames, math.nan, 0.0).to(ct)[..., None]
    # log-probs: 0 where gamma is 0 whatever the upstream (as the Triton backend's and the CPU path's)
    keep = ok[..., None] if softmax else ok[..., None] & (gam != 0)
    return torch.where(keep, d * grad_loss.to(ct)[None, :, None], off).to(out_dtype)
