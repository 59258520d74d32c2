"""Pure-PyTorch CTC: log-space alpha/beta recursions vectorised over batch and states (loop over time).

Layout (shared with ``tri_losses/kernels/ctc.py``): time-major emissions ``lp (T, B, C)`` (log-probs, or logits
with their per-frame log-sum-exp ``lse (T, B, 2)`` = (row max m, log sum exp(x - m)) subtracted on the fly as
``(x - m) - log s``: exact for large |x|, where ``x - (m + log s)`` would lose ulp(m)), padded targets ``(B, S)``,
extended state sequence ``blank, l1, blank, ..., lS, blank`` (2S+1 states; state s emits ``ext[s]``).

Transitions into state s at frame t (``label_loop=True``, standard CTC): from s (stay), s-1, and s-2
when s is a label state whose label differs from the one at s-2. ``label_loop=False`` (RNA-like):
label states have no self-loop and may always be entered from s-2 (repeats need no blank).
Viterbi (``max_approx``) replaces log-sum-exp by max; ties go to the stay transition, then s-1,
then s-2, and at the end to the final blank state over the last label state.
"""
from __future__ import annotations

import torch

from . import compute_dtype, segment_sum

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
    return torch.stack([m, torch.log(torch.exp(xc - m[..., None]).sum(-1))], -1)


def log_softmax_at(v, lse):
    """log-softmax values of logits ``v (T, B, k)`` of each frame: ``(v - m) - log s``."""
    return (v - lse[..., :1].to(v.dtype)) - lse[..., 1:].to(v.dtype)


def emissions(lp, lse, ext):
    """All frames' state emissions (T, B, 2S+1) in one gather (the log-softmax applied on the fly)."""
    T = lp.shape[0]
    e = lp.to(compute_dtype(lp)).gather(2, ext[None].expand(T, -1, -1))
    return log_softmax_at(e, lse) if lse is not None else e


def _combine(a, b, c, viterbi):
    if viterbi:
        return torch.maximum(torch.maximum(a, b), c)
    m = torch.maximum(torch.maximum(a, b), c)
    ms = torch.where(m == NEG, 0.0, m)
    return ms + torch.log(torch.exp(a - ms) + torch.exp(b - ms) + torch.exp(c - ms))


def _shift(x, k):
    out = torch.full_like(x, NEG)
    if k < x.shape[1]:
        out[:, k:] = x[:, :-k]
    return out


def forward(lp, lse, targets, input_lengths, target_lengths, blank, label_loop, viterbi):
    """alpha (T, B, 2S+1) fp32 and log Z (B,) (best path score with ``viterbi``)."""
    T, B, _ = lp.shape
    ext, valid, skip = extended(targets, target_lengths, blank, lp.shape[-1])
    L = ext.shape[1]
    is_label = (torch.arange(L, device=lp.device) % 2 == 1)[None, :]
    ct = compute_dtype(lp)
    alpha = torch.full((T, B, L), NEG, dtype=ct, device=lp.device)
    if T == 0:
        return alpha, torch.where(target_lengths == 0, 0.0, NEG).to(ct), ext, valid, skip
    E = emissions(lp, lse, ext)
    a = torch.full((B, L), NEG, dtype=ct, device=lp.device)
    a[:, 0] = 0.0
    if L > 1:
        a[:, 1] = 0.0
    a = torch.where(valid, a + E[0], NEG)
    alpha[0] = a
    skip_ok = skip if label_loop else is_label.expand(B, L)
    for t in range(1, T):
        stay = a if label_loop else torch.where(is_label, NEG, a)
        nxt = _combine(stay, _shift(a, 1), torch.where(skip_ok, _shift(a, 2), NEG), viterbi)
        nxt = torch.where(valid, nxt + E[t], NEG)
        live = (t < input_lengths)[:, None]
        a = torch.where(live, nxt, a)
        alpha[t] = torch.where(live, nxt, NEG)
    last = 2 * target_lengths
    fin_blank = a.gather(1, last[:, None])[:, 0]
    fin_label = torch.where(target_lengths > 0, a.gather(1, (last - 1).clamp(min=0)[:, None])[:, 0], NEG)
    if viterbi:
        logz = torch.maximum(fin_blank, fin_label)
    else:
        logz = _combine(fin_blank, fin_label, torch.full_like(fin_blank, NEG), False)
    logz = torch.where(input_lengths == 0, torch.where(target_lengths == 0, 0.0, NEG), logz)
    return alpha, logz, ext, valid, skip


def posteriors(lp, lse, alpha, logz, ext, valid, skip, input_lengths, target_lengths, label_loop):
    """State posteriors gamma (T, B, 2S+1) = exp(alpha + beta - e - logZ), 0 where infeasible/padded."""
    T, B, L = alpha.shape
    is_label = (torch.arange(L, device=lp.device) % 2 == 1)[None, :]
    gam = torch.zeros(T, B, L, dtype=compute_dtype(lp), device=lp.device)
    last = 2 * target_lengths
    s_idx = torch.arange(L, device=lp.device)[None, :]
    b = torch.full((B, L), NEG, dtype=compute_dtype(lp), device=lp.device)
    skip_next = torch.zeros_like(skip)  # transition s -> s+2 allowed
    skip_ok = skip if label_loop else is_label.expand(B, L)
    if L > 2:
        skip_next[:, :-2] = skip_ok[:, 2:]
    feasible = torch.isfinite(logz)
    E = emissions(lp, lse, ext)
    for t in range(T - 1, -1, -1):
        e = E[t]
        is_last = (t == input_lengths - 1)[:, None]
        init = torch.where((s_idx == last[:, None]) | ((s_idx == last[:, None] - 1) & (target_lengths[:, None] > 0)),
                           0.0, NEG)
        stay = b if label_loop else torch.where(is_label, NEG, b)
        nb = _combine(stay, _shift_left(b, 1), torch.where(skip_next, _shift_left(b, 2), NEG), False)
        rest = torch.where(is_last, init, nb)  # beta without frame t's emission
        live = valid & (t < input_lengths)[:, None]
        b = torch.where(live, rest + e, NEG)
        gam[t] = frame_posteriors(torch.where(live, alpha[t] + rest, NEG), live & feasible[:, None])
    return gam


def frame_posteriors(v, live):
    """gamma_t(s) = exp(v(s)) / sum_s exp(v(s)) for v = alpha_t + beta_t without frame t's emission,
    0 where not ``live`` (or the frame has no path): one frame's states normalised by their own sum
    (= Z up to rounding) from their maximum, so the rounding of large log-scores (|x| ~ 1e4 and up)
    neither leaks into the posteriors nor overflows."""
    m = v.amax(-1, keepdim=True)
    ok = live & (m > NEG)
    w = torch.exp(v - torch.where(ok, m, 0.0))
    w = torch.where(ok, w, 0.0)
    return w / w.sum(-1, keepdim=True).clamp(min=1.0)  # the maximum's term is 1: the sum is >= 1


def _shift_left(x, k):
    out = torch.full_like(x, NEG)
    if k < x.shape[1]:
        out[:, :-k] = x[:, k:]
    return out


def viterbi_path(alpha, ext, skip, input_lengths, target_lengths, label_loop, blank):
    """Best state path by backtracking the Viterbi alpha: class ids (B, T) (blank on padded frames)."""
    T, B, L = alpha.shape
    dev = alpha.device
    path = torch.full((B, T), blank, dtype=torch.int64, device=dev)
    if T == 0:
        return path
    is_label = (torch.arange(L, device=dev) % 2 == 1)[None, :].expand(B, L)
    skip_ok = skip if label_loop else is_label
    bidx = torch.arange(B, device=dev)
    last = 2 * target_lengths
    tl_ = (input_lengths - 1).clamp(min=0)
    a_last = alpha[tl_, bidx]
    fb = a_last.gather(1, last[:, None])[:, 0]
    fl = torch.where(target_lengths > 0, a_last.gather(1, (last - 1).clamp(min=0)[:, None])[:, 0], NEG)
    s = torch.where(fb >= fl, last, last - 1)
    for t in range(T - 1, -1, -1):
        active = t < input_lengths
        at_end = t == input_lengths - 1
        s = torch.where(at_end, torch.where(fb >= fl, last, last - 1), s)
        path[:, t] = torch.where(active, ext.gather(1, s[:, None])[:, 0], blank)
        if t == 0:
            break
        prev = alpha[t - 1]
        c0 = prev.gather(1, s[:, None])[:, 0]
        if not label_loop:
            c0 = torch.where(is_label.gather(1, s[:, None])[:, 0], NEG, c0)
        c1 = torch.where(s >= 1, prev.gather(1, (s - 1).clamp(min=0)[:, None])[:, 0], NEG)
        c2 = torch.where((s >= 2) & skip_ok.gather(1, s[:, None])[:, 0],
                         prev.gather(1, (s - 2).clamp(min=0)[:, None])[:, 0], NEG)
        step = torch.where(c0 >= torch.maximum(c1, c2), 0, torch.where(c1 >= c2, 1, 2))
        s = torch.where(active & (t < input_lengths), s - step, s)
    return path


def class_posteriors(gam, ext, C):
    """Sum state posteriors per class: (T, B, C), deterministically."""
    return segment_sum(gam, ext[None], C)


# ------------------------------------------------------------------------------------------------
# the op bodies of the torch backend (tri_losses/ctc.py's custom ops)
# ------------------------------------------------------------------------------------------------
def loss_forward(x, targets, input_lengths, target_lengths, blank, is_logits, viterbi, label_loop):
    """(alpha (T, B, 2S+1), log Z (B,), lse pair (T, B, 2) for logits else None), compute dtype."""
    lse = frame_lse(x) if is_logits else None
    alpha, logz, *_ = forward(x, lse, targets, input_lengths, target_lengths, blank, label_loop, viterbi)
    return alpha, logz, lse


def best_path(alpha, targets, input_lengths, target_lengths, blank, label_loop):
    """The Viterbi alignment (B, T) from the Viterbi alpha (blank on padded frames)."""
    ext, _, skip = extended(targets, target_lengths, blank)
    return viterbi_path(alpha, ext, skip, input_lengths, target_lengths, bool(label_loop), blank)


def loss_grad(grad_loss, x, lse, targets, input_lengths, target_lengths, alpha, loss, blank, viterbi, label_loop,
              softmax, out_dtype):
    """``grad_loss[b] * (softmax - gamma)`` (``softmax``) or ``-grad_loss[b] * gamma``, 0 on padded frames
    and infeasible sequences, in ``out_dtype`` (formed in the compute dtype, rounded once)."""
    T, B, C = x.shape
    logz = -loss
    ext, valid, skip = extended(targets, target_lengths, blank, C)
    frames = torch.arange(T, device=x.device)[:, None] < input_lengths[None, :]
    if viterbi:
        path = viterbi_path(alpha, ext, skip, input_lengths, target_lengths, label_loop, blank)
        gam = torch.nn.functional.one_hot(path.t(), C).to(alpha.dtype)
    else:
        gam = class_posteriors(posteriors(x, lse, alpha, logz, ext, valid, skip, input_lengths, target_lengths,
                                          label_loop), ext, C)
    d = torch.exp(log_softmax_at(x.to(gam.dtype), lse)) - gam if softmax else -gam
    ok = (frames & torch.isfinite(logz)[None, :])[..., None]
    return torch.where(ok, d * grad_loss.to(gam.dtype)[None, :, None], 0.0).to(out_dtype)
