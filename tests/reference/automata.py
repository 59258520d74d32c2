"""Float64 automaton references by explicit path enumeration over the edge list (tiny T)."""
import math

import torch


def enumerate_paths(scores, edges, start, end, T):
    """scores[t][e] = +log score of edge e at frame t. Returns (log Z, {(t, emission): posterior},
    best score, best emission sequence) over all edge paths start -> end of exactly T edges."""
    E = len(edges)
    out_edges = {}
    for e, (fr, to, em) in enumerate(edges):
        out_edges.setdefault(fr, []).append(e)
    paths = []

    def dfs(state, t, acc, seq):
        if t == T:
            if state == end:
                paths.append((acc, list(seq)))
            return
        for e in out_edges.get(state, []):
            v = scores[t][e]
            if v == -math.inf:
                continue
            seq.append(e)
            dfs(edges[e][1], t + 1, acc + v, seq)
            seq.pop()

    dfs(start, 0, 0.0, [])
    if not paths:
        return -math.inf, {}, -math.inf, None
    m = max(p[0] for p in paths)
    logz = m + math.log(sum(math.exp(p[0] - m) for p in paths))
    post = {}
    for v, seq in paths:
        w = math.exp(v - logz)
        for t, e in enumerate(seq):
            key = (t, edges[e][2])
            post[key] = post.get(key, 0.0) + w
    best = max(paths, key=lambda p: p[0])
    return logz, post, best[0], [edges[e][2] for e in best[1]]


def _lse(vals):
    vals = [v for v in vals if v != -math.inf]
    if not vals:
        return -math.inf
    m = max(vals)
    return m + math.log(sum(math.exp(v - m) for v in vals))


def forward_backward(scores, edges, start, end, T, log_post=False):
    """Direct float64 forward-backward over the edge list of one sequence (any T).

    scores[t][e]: +log score of edge e at frame t; edges: [(from, to, emission)]. A path takes exactly
    T edges from ``start`` and must end in ``end``. Returns (log Z, {(t, emission): posterior}), with
    ``log_post`` the log posteriors (summed in log space: exact however small).
    """
    states = {start, end} | {s for fr, to, _ in edges for s in (fr, to)}
    alpha = [{s: (0.0 if s == start else -math.inf) for s in states}]
    for t in range(T):
        alpha.append({s: _lse([alpha[t][fr] + scores[t][e] for e, (fr, to, _) in enumerate(edges) if to == s])
                      for s in states})
    logz = alpha[T][end]
    if logz == -math.inf:
        return logz, {}
    beta = [None] * (T + 1)
    beta[T] = {s: (0.0 if s == end else -math.inf) for s in states}
    for t in range(T - 1, -1, -1):
        beta[t] = {s: _lse([scores[t][e] + beta[t + 1][to] for e, (fr, to, _) in enumerate(edges) if fr == s])
                   for s in states}
    post = {}
    for t in range(T):
        for e, (fr, to, em) in enumerate(edges):
            v = alpha[t][fr] + scores[t][e] + beta[t + 1][to] - logz
            if v > -math.inf:
                post.setdefault((t, em), []).append(v)
    if log_post:
        return logz, {k: _lse(v) for k, v in post.items()}
    return logz, {k: sum(math.exp(x) for x in v) for k, v in post.items()}


def viterbi(scores, edges, start, end, T):
    """Direct float64 Viterbi of one sequence: (best score, best emission sequence) or (-inf, None)."""
    states = {start, end} | {s for fr, to, _ in edges for s in (fr, to)}
    best = {s: (0.0 if s == start else -math.inf) for s in states}
    back = []
    for t in range(T):
        nb, bp = {}, {}
        for s in states:
            cands = [(best[fr] + scores[t][e], e) for e, (fr, to, _) in enumerate(edges) if to == s]
            cands = [c for c in cands if c[0] > -math.inf]
            if cands:
                v, e = max(cands, key=lambda c: c[0])
                nb[s], bp[s] = v, e
            else:
                nb[s] = -math.inf
        best = nb
        back.append(bp)
    if best[end] == -math.inf:
        return -math.inf, None
    seq, s = [], end
    for t in range(T - 1, -1, -1):
        e = back[t][s]
        seq.append(edges[e][2])
        s = edges[e][0]
    return best[end], seq[::-1]


def rna_loss(lp, target, blank):
    """-log Z of the CTC topology without label loops (RNA: each label emitted exactly once, in order,
    blanks anywhere), a torch float64 DP over (frames, labels emitted); differentiable."""
    T, S = lp.shape[0], len(target)
    neg = torch.tensor(-1e30, dtype=lp.dtype)  # finite: keeps autograd NaN-free
    f = [torch.tensor(0.0, dtype=lp.dtype)] + [neg] * S  # f[k]: log-sum of prefixes that emitted k labels
    for t in range(T):
        g = [f[0] + lp[t, blank]]
        for k in range(1, S + 1):
            g.append(torch.logaddexp(f[k] + lp[t, blank], f[k - 1] + lp[t, target[k - 1]]))
        f = g
    return -f[S]
