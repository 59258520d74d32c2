"""Pure-PyTorch forward-backward and Viterbi over general automata (RETURNN ``fast_baum_welch`` conventions).

Every edge ``(from, to, emission, seq)`` consumes one frame: with scores in +log space
``score_t(e) = -w_e - am[t, seq_e, emission_e]`` (``fast_baum_welch``: am in -log space) or
``am[t, seq_e, emission_e] - w_e`` (``fast_viterbi``: am in +log space),
    alpha_t(s) = logsumexp_{e: to_e = s} alpha_{t-1}(from_e) + score_t(e),  alpha_{-1} = [s == start_b],
and a path must sit in ``end_b`` right after the sequence's last valid frame. Loops over time,
vectorised over edges. On the CPU, where the widest state's edge count can be read for free, the live
edges into (out of, for beta) each state are laid out in a padded table of K slots per state, built once per
call: a frame is then a gather, an add and a log-sum-exp over the K slots (a dozen small ops whatever the
automaton), with the edge scores gathered into the table for blocks of frames at once. Elsewhere (no host
read on an accelerator), and for automata with a state far wider than the average (the table would be
mostly padding), deterministic segment reductions by destination.
"""
from __future__ import annotations

import copy
import math

import torch

from . import compute_dtype, logsumexp0, segment_sum

NEG = float("-inf")


def _per_state(frame_valid, edges, start_end, num_states):
    """(T, num_states) bool: frame t is inside the sequence owning state s (the sequence of its edges, or the
    one it starts or ends; never for a state of no sequence). ``frame_valid`` (T, B), any per-frame mask."""
    B = start_end.shape[1]
    seq = torch.full((num_states,), B, dtype=torch.int64, device=edges.device)
    seq.scatter_(0, edges[0], edges[3])
    seq.scatter_(0, edges[1], edges[3])
    b = torch.arange(B, device=edges.device)
    seq.scatter_(0, start_end[0], b)
    seq.scatter_(0, start_end[1], b)
    return torch.cat([frame_valid, frame_valid.new_zeros(frame_valid.shape[0], 1)], 1).index_select(1, seq)


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


PAD_LIMIT = 4  # a padded table may hold up to PAD_LIMIT x the edge count (plus one row of slack per state)
_BLOCK = 1 << 20  # elements of edge scores gathered at once (frames x edges): a few MB per block


def _padded(key, num_states):
    """``(tab (K * num_states,), K)``: slot ``k * num_states + s`` holds state s's k-th edge (``key`` the
    edges' destination or source; ascending edge order), or ``E`` (an edge of score -inf) past its last;
    ``None`` off the CPU or when the widest state would make the table over ``PAD_LIMIT`` x the edge list.
    (K, states) rather than (states, K): the reductions over K then run along contiguous rows of states."""
    E = key.shape[0]
    if key.device.type != "cpu" or not num_states:
        return None
    counts = torch.bincount(key, minlength=num_states)
    K = max(1, int(counts.max())) if E else 1
    if num_states * K > PAD_LIMIT * E + num_states:
        return None
    order = torch.sort(key, stable=True).indices
    start = torch.cumsum(counts, 0) - counts
    ks = key[order]
    tab = torch.full((num_states * K,), E, dtype=torch.int64, device=key.device)
    tab[(torch.arange(E, device=key.device) - start[ks]) * num_states + ks] = order
    return tab, K


def _slots(v, tab, fill):
    """Per-edge values ``v`` (E,) laid out in a padded table's slots (:func:`_padded`), ``fill`` in the padding."""
    return torch.cat([v, v.new_full((1,), fill)]).index_select(0, tab)


def _frame_blocks(T, width, reverse=False):
    """(t0, t1) blocks of frames whose gathered scores hold about ``_BLOCK`` elements, in time order."""
    step = max(1, _BLOCK // max(width, 1))
    blocks = [(t0, min(T, t0 + step)) for t0 in range(0, T, step)]
    return blocks[::-1] if reverse else blocks


def forward(scores, T, edges, start_end, frame_valid, num_states, ct, viterbi=False):
    """alpha (T, num_states) and the per-sequence log Z (B,) from the edge scores (an :class:`EdgeScores`
    over ``edges``)."""
    dev = edges.device
    B = start_end.shape[1]
    n = num_states
    live = _per_state(frame_valid, edges, start_end, n)
    padded = _padded(edges[1], n)
    if padded is None:
        a = torch.full((n,), NEG, dtype=ct, device=dev)
        a[start_end[0]] = 0.0
        alpha = torch.full((T, n), NEG, dtype=ct, device=dev)
        for t in range(T):
            vals = a[edges[0]] + scores(t)
            nxt = _seg_logsumexp(vals, edges[1], n, viterbi)
            a = torch.where(live[t], nxt, a)
            alpha[t] = a
    else:
        tab, K = padded
        src = _slots(edges[0], tab, n)  # padding: state n, -inf
        cur = torch.full((n + 1,), NEG, dtype=ct, device=dev)  # alpha_{t-1}, then a -inf slot
        cur[start_end[0]] = 0.0
        a = cur[:n]
        alpha = torch.empty(T, n, dtype=ct, device=dev)
        padded_scores = scores.padded(tab)
        out, lv = alpha.unbind(0), live.unbind(0)  # views, made once
        for t0, t1 in _frame_blocks(T, n * K):
            sc = padded_scores(slice(t0, t1)).view(t1 - t0, K, n).unbind(0)
            for t in range(t0, t1):
                v = cur.index_select(0, src).view(K, n).add_(sc[t - t0])
                torch.where(lv[t], v.amax(0) if viterbi else logsumexp0(v), a, out=a)
                out[t].copy_(a)
            del sc  # one block of scores alive at a time
    logz = a[start_end[1]]
    no_frames = ~frame_valid.any(0) if T else torch.ones(B, dtype=torch.bool, device=dev)
    logz = torch.where(no_frames, torch.where(start_end[0] == start_end[1], 0.0, NEG), logz)
    return alpha, logz


def _betas(scores, T, edges, start_end, frame_valid, num_states, ct):
    """beta (T, num_states): beta_t(s), the log-sum of the paths from state s after frame t to the end state
    after the sequence's last frame (0 there); left as it is on the frames after a sequence's end."""
    dev = edges.device
    n = num_states
    lengths = frame_valid.sum(0)
    betas = torch.empty(T, n, dtype=ct, device=dev)
    # a sequence's last frame: beta = 0 at its end state, -inf at its other states
    at_end = torch.full((n,), NEG, dtype=ct, device=dev)
    at_end[start_end[1]] = 0.0
    ends = torch.arange(T, device=dev)[:, None] == (lengths - 1)[None, :]
    both = _per_state(torch.cat([ends, frame_valid]), edges, start_end, n)
    last, live = both[:T], both[T:]
    padded = _padded(edges[0], n)
    if padded is None:
        beta = torch.full((n,), NEG, dtype=ct, device=dev)
        for t in range(T - 1, -1, -1):
            beta = torch.where(last[t], at_end, beta)  # beta_t(s) after frame t
            betas[t] = beta
            # beta_{t-1}(s) = logsumexp over edges out of s of score_t(e) + beta_t(to)
            nb = _seg_logsumexp(scores(t) + beta[edges[1]], edges[0], n, False)
            beta = torch.where(live[t], nb, beta)
        return betas
    tab, K = padded
    dst = _slots(edges[1], tab, n)
    cur = torch.full((n + 1,), NEG, dtype=ct, device=dev)  # beta after frame t, then a -inf slot
    padded_scores = scores.padded(tab)
    cur_n, last, live, out = cur[:n], last.unbind(0), live.unbind(0), betas.unbind(0)
    for t0, t1 in _frame_blocks(T, n * K, reverse=True):
        sc = padded_scores(slice(t0, t1)).view(t1 - t0, K, n).unbind(0)
        for t in range(t1 - 1, t0 - 1, -1):
            torch.where(last[t], at_end, cur_n, out=cur_n)
            out[t].copy_(cur_n)
            nb = logsumexp0(cur.index_select(0, dst).view(K, n).add_(sc[t - t0]))
            torch.where(live[t], nb, cur_n, out=cur_n)
        del sc
    return betas


def edge_posteriors(scores, T, edges, start_end, frame_valid, alpha, logz, num_states, ct):
    """Yields (t0, t1, log p (t1 - t0, E)): the log edge posteriors of frames t0 .. t1-1, normalised per
    frame to sum to 1 per valid (sequence, frame) (-inf on invalid frames and without a path). beta runs
    frame by frame (T-1 down to 0) and is kept per frame (like alpha); the posteriors are then formed for
    chunks of frames at once."""
    B = start_end.shape[1]
    E = edges.shape[1]
    betas = _betas(scores, T, edges, start_end, frame_valid, num_states, ct)
    eseq = edges[3]
    a0 = torch.where(edges[0] == start_end[0][eseq], 0.0, NEG).to(ct)  # alpha_{-1} at the edges' sources
    ok_z = torch.isfinite(logz[eseq])
    for t0, t1 in _frame_blocks(T, E):
        a_prev = alpha[max(t0 - 1, 0):t1 - 1].index_select(1, edges[0])
        if t0 == 0:
            a_prev = torch.cat([a0[None, :], a_prev], 0)
        lp = a_prev + scores(slice(t0, t1)) + betas[t0:t1].index_select(1, edges[1])
        # per-frame normalisation (RETURNN): divide by this frame's total sum_e, which is Z up to rounding
        norm = _seg_logsumexp(lp, eseq, B, False).index_select(1, eseq)
        ok = frame_valid[t0:t1].index_select(1, eseq) & ok_z & torch.isfinite(norm)
        yield t0, t1, torch.where(ok, lp - torch.where(ok, norm, 0.0), NEG)


def viterbi_backtrack(scores, T, edges, start_end, frame_valid, alpha, num_states, mask_idx):
    """Best emission sequence (T, B) by backtracking alpha; ties: the lowest edge index."""
    dev = edges.device
    B = start_end.shape[1]
    lengths = frame_valid.sum(0)
    out = torch.full((T, B), mask_idx, dtype=torch.int64, device=dev)
    state = start_end[1].clone()
    E = edges.shape[1]
    if E == 0:  # no edges: no path through any frame
        return out
    padded = _padded(edges[1], num_states)
    if padded is not None:  # each sequence's candidates: the K table slots of its current state
        tab, K = padded
        n = num_states
        src = _slots(edges[0], tab, 0).view(K, n)  # padding: masked below
        em = _slots(edges[2], tab, 0).view(K, n)
        a0 = torch.full((n,), NEG, dtype=alpha.dtype, device=dev)
        a0[start_end[0]] = 0.0  # alpha_{-1}
        padded_scores = scores.padded(tab)
        act = (torch.arange(T, device=dev)[:, None] < lengths[None, :]).unbind(0)
        for t0, t1 in _frame_blocks(T, n * K, reverse=True):
            sc = padded_scores(slice(t0, t1)).view(t1 - t0, K, n).unbind(0)
            for t in range(t1 - 1, t0 - 1, -1):
                a_prev = alpha[t - 1] if t > 0 else a0
                v = a_prev.index_select(0, src.index_select(1, state).view(-1)).view(K, B).add_(
                    sc[t - t0].index_select(1, state))
                best, k = torch.where(torch.isfinite(v), v, NEG).max(0)  # max: the first (lowest edge) of ties
                take = act[t] & (best > NEG)
                out[t] = torch.where(take, em[k, state], mask_idx)
                state = torch.where(take, src[k, state], state)
        return out
    eidx = torch.arange(E, device=dev)
    for t in range(T - 1, -1, -1):
        active = t < lengths
        a_prev = alpha[t - 1][edges[0]] if t > 0 else torch.where(
            edges[0] == start_end[0][edges[3]], 0.0, NEG).to(alpha.dtype)
        v = a_prev + scores(t)
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


class EdgeScores:
    """The automaton's live edges and their scores at frame t: ``lp[t, seq_e, emission_e] - w_e`` (+log
    space), gathered from the flattened frames (much cheaper than two-tensor advanced indexing). A NaN edge
    cost is a dead edge (+inf). ``edges``: on the CPU, the live edges alone (in their order: dead ones add
    work and no path); elsewhere all of them (dropping some would read their count on the host). Called
    with an int ``t``: (E,); with a slice of frames: (frames, E)."""

    pad = None  # the padded layout's empty slots (``padded``)

    def __init__(self, lp, edges, weights):
        weights = torch.where(torch.isnan(weights), float("inf"), weights.to(lp.dtype))
        if edges.device.type == "cpu":
            live = weights < float("inf")
            if not bool(live.all()):
                edges, weights = edges[:, live], weights[live]
        self.lp, self.edges, self.weights = lp, edges, weights
        self.flat = edges[3] * lp.shape[2] + edges[2]

    def padded(self, tab):
        """These scores in a padded table's layout (``_padded``): a slot past the edges is -inf whatever the
        frame holds (its gather reads class 0 of sequence 0, which may be NaN)."""
        p = copy.copy(self)
        p.flat, p.weights, p.pad = _slots(self.flat, tab, 0), _slots(self.weights, tab, 0), tab == self.flat.shape[0]
        return p

    def __call__(self, t):
        lp = self.lp
        shape = (t.stop - t.start, self.flat.shape[0]) if isinstance(t, slice) else self.flat.shape
        if self.pad is not None and not lp.shape[1] * lp.shape[2]:  # no class to gather: padding alone
            return lp.new_full(shape, NEG)
        if isinstance(t, slice):  # a gather with the index expanded: faster than index_select on the CPU
            out = torch.gather(lp[t].reshape(shape[0], -1), 1, self.flat.expand(shape))
        else:
            out = lp[t].reshape(-1).index_select(0, self.flat)
        out.sub_(self.weights)
        return out if self.pad is None else out.masked_fill_(self.pad, NEG)


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
    f = EdgeScores(_log_probs(x, is_logits), edges, weights)
    alpha, logz = forward(f, x.shape[0], f.edges, se, _frames(x.shape[0], input_lengths), num_states, f.lp.dtype,
                          viterbi)
    return -logz, alpha


def loss_grad(grad_loss, x, input_lengths, edges, weights, se, num_states, is_logits, viterbi, alpha, logz):
    """``grad_loss[b] * (softmax - gamma)`` (logits) or ``-grad_loss[b] * gamma``, 0 on padded frames
    (gamma: emission posteriors, the one-hot best path with ``viterbi``; 0 for a sequence without a path,
    ``logz`` = -inf), in x's dtype."""
    lp = _log_probs(x, is_logits)
    ct = lp.dtype
    T, B, D = x.shape
    valid = _frames(T, input_lengths)
    f = EdgeScores(lp, edges, weights)
    edges = f.edges
    if viterbi:
        path = viterbi_backtrack(f, T, edges, se, valid, alpha, num_states, 0)
        ok = valid & torch.isfinite(logz)[None, :]
        gam = torch.where(ok[..., None], torch.nn.functional.one_hot(path, D).to(ct), 0.0)
    else:
        gam = class_gamma(f, T, edges, se, valid, alpha, logz, num_states, ct, B, D)
    d = (torch.exp(lp) - gam) if is_logits else -gam
    d = d * grad_loss.to(ct)[None, :, None]
    d = torch.where((valid & torch.isnan(logz)[None, :])[..., None], math.nan, d)  # a NaN score on its paths
    return torch.where(valid[..., None], d, 0.0).to(x.dtype)


def baum_welch(am, lengths, edges, weights, se, num_states):
    """RETURNN's fast_baum_welch: (fwdbwd (T, B, D) = -log gamma (1e32 where impossible, padded or no path),
    obs (T, B) = -log Z on valid frames, 0 elsewhere), in the compute dtype."""
    T, B, D = am.shape
    ct = compute_dtype(am)
    valid = _frames(T, lengths)
    f = EdgeScores(-am.to(ct), edges, weights)
    edges = f.edges
    alpha, logz = forward(f, T, edges, se, valid, num_states, ct)
    ok = valid & torch.isfinite(logz)[None, :]
    lg = class_gamma(f, T, edges, se, valid, alpha, logz, num_states, ct, B, D, log=True)
    out = torch.where(ok[..., None] & (lg > NEG), -lg, IMPOSSIBLE)
    nan = valid & torch.isnan(logz)[None, :]  # a NaN score on the sequence's paths: NaN, not "no path"
    out = torch.where(nan[..., None], math.nan, out)
    obs = torch.where(ok | nan, -logz[None, :].expand(T, B), 0.0).to(ct)
    return out, obs


def viterbi_align(am, lengths, edges, weights, se, num_states, mask_idx, alpha=None, best=None):
    """RETURNN's fast_viterbi: (alignment (T, B) emission ids, best score (B,)) with am in +log space and
    -log edge costs; backtracks a given Viterbi ``alpha`` (states in the original numbering) and ``best``
    (the Triton path's), or computes them."""
    T = am.shape[0]
    ct = alpha.dtype if alpha is not None else compute_dtype(am)
    valid = _frames(T, lengths)
    f = EdgeScores(am.to(ct), edges, weights)
    edges = f.edges
    if alpha is None:
        alpha, best = forward(f, T, edges, se, valid, num_states, ct, viterbi=True)
    align = viterbi_backtrack(f, T, edges, se, valid, alpha, num_states, mask_idx)
    return torch.where(torch.isfinite(best)[None, :], align, mask_idx), best
