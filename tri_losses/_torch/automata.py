"""Pure-PyTorch forward-backward and Viterbi over general automata (RETURNN ``fast_baum_welch`` conventions).

Every edge ``(from, to, emission, seq)`` consumes one frame: with scores in +log space
``score_t(e) = -w_e - am[t, seq_e, emission_e]`` (``fast_baum_welch``: am in -log space) or
``am[t, seq_e, emission_e] - w_e`` (``fast_viterbi``: am in +log space),
    alpha_t(s) = logsumexp_{e: to_e = s} alpha_{t-1}(from_e) + score_t(e),  alpha_{-1} = [s == start_b],
and a path must sit in ``end_b`` right after the sequence's last valid frame. Loops over time,
vectorised over edges (deterministic segment reductions by destination).
"""
from __future__ import annotations

import torch

from . import compute_dtype, segment_sum

NEG = float("-inf")


def _state_seq(edges, start_end, num_states):
    """Sequence id of every state (from the edges and the start/end states)."""
    seq = torch.zeros(num_states, dtype=torch.int64, device=edges.device)
    seq.scatter_(0, edges[0], edges[3])
    seq.scatter_(0, edges[1], edges[3])
    B = start_end.shape[1]
    b = torch.arange(B, device=edges.device)
    seq.scatter_(0, start_end[0], b)
    seq.scatter_(0, start_end[1], b)
    return seq


def _seg_logsumexp(vals, idx, n, viterbi):
    """Per-destination log-sum-exp (or max) of edge values along the last dim (leading dims: a batch)."""
    idx = idx.expand_as(vals)
    m = torch.full((*vals.shape[:-1], n), NEG, dtype=vals.dtype, device=vals.device).scatter_reduce(
        -1, idx, vals, "amax")
    if viterbi:
        return m
    ms = torch.where(m == NEG, 0.0, m)
    s = segment_sum(torch.exp(vals - ms.gather(-1, idx)), idx, n)
    return ms + torch.log(s)


def forward(scores_fn, T, edges, start_end, frame_valid, num_states, ct, viterbi=False):
    """alpha (T, num_states) and the per-sequence log Z (B,). ``scores_fn(t)`` gives edge scores (E,)."""
    dev = edges.device
    B = start_end.shape[1]
    sseq = _state_seq(edges, start_end, num_states)
    a = torch.full((num_states,), NEG, dtype=ct, device=dev)
    a[start_end[0]] = 0.0
    alpha = torch.full((T, num_states), NEG, dtype=ct, device=dev)
    for t in range(T):
        vals = a[edges[0]] + scores_fn(t)
        nxt = _seg_logsumexp(vals, edges[1], num_states, viterbi)
        live = frame_valid[t][sseq]
        a = torch.where(live, nxt, a)
        alpha[t] = a
    logz = a[start_end[1]]
    no_frames = ~frame_valid.any(0) if T else torch.ones(B, dtype=torch.bool, device=dev)
    logz = torch.where(no_frames, torch.where(start_end[0] == start_end[1], 0.0, NEG), logz)
    return alpha, logz


def edge_posteriors(scores_fn, T, edges, start_end, frame_valid, alpha, logz, num_states, ct):
    """Yields (t0, t1, log p (t1 - t0, E)): the log edge posteriors of frames t0 .. t1-1, normalised per
    frame to sum to 1 per valid (sequence, frame) (-inf on invalid frames and without a path). beta runs
    frame by frame (T-1 down to 0) and is kept per frame (like alpha); the posteriors are then formed for
    chunks of frames at once."""
    dev = edges.device
    sseq = _state_seq(edges, start_end, num_states)
    B = start_end.shape[1]
    E = edges.shape[1]
    lengths = frame_valid.sum(0)
    beta = torch.full((num_states,), NEG, dtype=ct, device=dev)
    betas = torch.empty(T, num_states, dtype=ct, device=dev)
    for t in range(T - 1, -1, -1):
        is_last = (lengths - 1 == t)
        init = torch.full((num_states,), NEG, dtype=ct, device=dev)
        init[start_end[1]] = torch.where(is_last, 0.0, NEG).to(ct)
        beta = torch.where(is_last[sseq], init, beta)  # beta_t(s) after frame t (0 at the end state)
        betas[t] = beta
        # beta_{t-1}(s) = logsumexp over edges out of s of score_t(e) + beta_t(to)
        nb = _seg_logsumexp(scores_fn(t) + beta[edges[1]], edges[0], num_states, False)
        beta = torch.where(frame_valid[t][sseq], nb, beta)
    eseq = edges[3]
    a0 = torch.where(edges[0] == start_end[0][eseq], 0.0, NEG).to(ct)  # alpha_{-1} at the edges' sources
    ok_z = torch.isfinite(logz[eseq])
    chunk = max(1, (1 << 22) // max(E, 1))
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        a_prev = alpha[max(t0 - 1, 0):t1 - 1].index_select(1, edges[0])
        if t0 == 0:
            a_prev = torch.cat([a0[None, :], a_prev], 0)
        lp = a_prev + scores_fn(slice(t0, t1)) + betas[t0:t1].index_select(1, edges[1])
        # per-frame normalisation (RETURNN): divide by this frame's total sum_e, which is Z up to rounding
        norm = _seg_logsumexp(lp, eseq, B, False).index_select(1, eseq)
        ok = frame_valid[t0:t1].index_select(1, eseq) & ok_z & torch.isfinite(norm)
        yield t0, t1, torch.where(ok, lp - torch.where(ok, norm, 0.0), NEG)


def viterbi_backtrack(scores_fn, T, edges, start_end, frame_valid, alpha, num_states, mask_idx):
    """Best emission sequence (T, B) by backtracking alpha; ties: the lowest edge index."""
    dev = edges.device
    B = start_end.shape[1]
    lengths = frame_valid.sum(0)
    out = torch.full((T, B), mask_idx, dtype=torch.int64, device=dev)
    state = start_end[1].clone()
    E = edges.shape[1]
    if E == 0:  # no edges: no path through any frame
        return out
    eidx = torch.arange(E, device=dev)
    for t in range(T - 1, -1, -1):
        active = t < lengths
        a_prev = alpha[t - 1][edges[0]] if t > 0 else torch.where(
            edges[0] == start_end[0][edges[3]], 0.0, NEG).to(alpha.dtype)
        v = a_prev + scores_fn(t)
        cand = (edges[1] == state[edges[3]]) & torch.isfinite(v)
        v = torch.where(cand, v, NEG)
        best = torch.full((B,), NEG, dtype=v.dtype, device=dev).scatter_reduce(0, edges[3], v, "amax")
        is_best = cand & (v == best[edges[3]])
        first = torch.full((B,), E, dtype=torch.int64, device=dev).scatter_reduce(
            0, edges[3], torch.where(is_best, eidx, E), "amin")
        found = first < E
        fe = first.clamp(max=E - 1)
        out[t] = torch.where(active & found, edges[2][fe], out[t])
        state = torch.where(active & found, edges[0][fe], state)
    return out


# ------------------------------------------------------------------------------------------------
# the op bodies of the torch backend (tri_losses/automata.py's custom ops)
# ------------------------------------------------------------------------------------------------
IMPOSSIBLE = 1e32  # RETURNN's -log of an impossible posterior


def scores_fn(lp, edges, weights):
    """Edge scores at frame t: ``lp[t, seq_e, emission_e] - w_e`` (+log space), gathered from the flattened
    frame (one ``index_select``: much cheaper per frame than two-tensor advanced indexing). A NaN edge cost
    is a dead edge (+inf)."""
    flat = edges[3] * lp.shape[2] + edges[2]
    weights = torch.where(torch.isnan(weights), float("inf"), weights)

    def f(t):
        """``t`` an int: (E,); a slice of frames: (frames, E)."""
        if isinstance(t, slice):
            return lp[t].reshape(t.stop - t.start, -1).index_select(1, flat) - weights
        return lp[t].reshape(-1).index_select(0, flat) - weights

    return f


def _frames(T, lengths):
    return torch.arange(T, device=lengths.device)[:, None] < lengths[None, :]


def class_gamma(f, T, edges, se, valid, alpha, logz, num_states, ct, B, D, log=False):
    """Emission posteriors gamma (T, B, D), summed over edges deterministically; ``log``: log gamma, summed
    in log space (exact however small gamma is)."""
    gam = torch.full((T, B * D), NEG if log else 0.0, dtype=ct, device=edges.device)
    slot = edges[3] * D + edges[2]
    for t0, t1, lq in edge_posteriors(f, T, edges, se, valid, alpha, logz, num_states, ct):
        gam[t0:t1] = _seg_logsumexp(lq, slot, B * D, False) if log else segment_sum(torch.exp(lq), slot, B * D)
    return gam.view(T, B, D)


def _log_probs(x, is_logits):
    ct = compute_dtype(x)
    return torch.log_softmax(x.to(ct), -1) if is_logits else x.to(ct)


def loss_forward(x, input_lengths, edges, weights, se, num_states, is_logits, viterbi):
    """(-log Z (B,), alpha (T, num_states)) of logits/log-probs ``x (T, B, D)``."""
    lp = _log_probs(x, is_logits)
    alpha, logz = forward(scores_fn(lp, edges, weights.to(lp.dtype)), x.shape[0], edges, se,
                          _frames(x.shape[0], input_lengths), num_states, lp.dtype, viterbi)
    return -logz, alpha


def loss_grad(grad_loss, x, input_lengths, edges, weights, se, num_states, is_logits, viterbi, alpha, logz):
    """``grad_loss[b] * (softmax - gamma)`` (logits) or ``-grad_loss[b] * gamma``, 0 on padded frames
    (gamma: emission posteriors, the one-hot best path with ``viterbi``; 0 for a sequence without a path,
    ``logz`` = -inf), in x's dtype."""
    lp = _log_probs(x, is_logits)
    ct = lp.dtype
    T, B, D = x.shape
    valid = _frames(T, input_lengths)
    f = scores_fn(lp, edges, weights.to(ct))
    if viterbi:
        path = viterbi_backtrack(f, T, edges, se, valid, alpha, num_states, 0)
        ok = valid & torch.isfinite(logz)[None, :]
        gam = torch.where(ok[..., None], torch.nn.functional.one_hot(path, D).to(ct), 0.0)
    else:
        gam = class_gamma(f, T, edges, se, valid, alpha, logz, num_states, ct, B, D)
    d = (torch.exp(lp) - gam) if is_logits else -gam
    d = d * grad_loss.to(ct)[None, :, None]
    return torch.where(valid[..., None], d, 0.0).to(x.dtype)


def baum_welch(am, lengths, edges, weights, se, num_states):
    """RETURNN's fast_baum_welch: (fwdbwd (T, B, D) = -log gamma (1e32 where impossible, padded or no path),
    obs (T, B) = -log Z on valid frames, 0 elsewhere), in the compute dtype."""
    T, B, D = am.shape
    ct = compute_dtype(am)
    valid = _frames(T, lengths)
    f = scores_fn(-am.to(ct), edges, weights.to(ct))
    alpha, logz = forward(f, T, edges, se, valid, num_states, ct)
    ok = valid & torch.isfinite(logz)[None, :]
    lg = class_gamma(f, T, edges, se, valid, alpha, logz, num_states, ct, B, D, log=True)
    out = torch.where(ok[..., None] & (lg > NEG), -lg, IMPOSSIBLE)
    obs = torch.where(ok, -logz[None, :].expand(T, B), 0.0).to(ct)
    return out, obs


def viterbi_align(am, lengths, edges, weights, se, num_states, mask_idx, alpha=None, best=None):
    """RETURNN's fast_viterbi: (alignment (T, B) emission ids, best score (B,)) with am in +log space and
    -log edge costs; backtracks a given Viterbi ``alpha`` (states in the original numbering) and ``best``
    (the Triton path's), or computes them."""
    T = am.shape[0]
    ct = alpha.dtype if alpha is not None else compute_dtype(am)
    valid = _frames(T, lengths)
    f = scores_fn(am.to(ct), edges, weights.to(ct))
    if alpha is None:
        alpha, best = forward(f, T, edges, se, valid, num_states, ct, viterbi=True)
    align = viterbi_backtrack(f, T, edges, se, valid, alpha, num_states, mask_idx)
    return torch.where(torch.isfinite(best)[None, :], align, mask_idx), best
