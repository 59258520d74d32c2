"""Float64 CTC references: brute-force path enumeration (tiny T) and direct alpha/beta and Viterbi DPs (longer T)."""
import itertools
import math

import torch

from .automata import _lse  # one float64 log-sum-exp for the reference DPs


def collapse(path, blank, label_loop=True):
    out, prev = [], None
    for c in path:
        if c != blank and (not label_loop or c != prev):
            out.append(c)
        prev = c
    return out


def enumerate_paths(lp, target, blank, label_loop=True):
    """lp (T, C) float64 log-probs of one sequence -> (log Z, gamma (T, C), best score, best path).

    Sums/maximises over every path in C^T whose collapse equals ``target``. With label_loop=False
    (RNA topology) a path collapses by dropping blanks only (repeats are separate labels).
    """
    T, C = lp.shape
    target = list(target)
    logs, paths = [], []
    for path in itertools.product(range(C), repeat=T):
        if collapse(path, blank, label_loop) == target:
            logs.append(sum(float(lp[t, c]) for t, c in enumerate(path)))
            paths.append(path)
    gamma = torch.zeros(T, C, dtype=torch.float64)
    if not logs:
        return -math.inf, gamma, -math.inf, None
    m = max(logs)
    logz = m + math.log(sum(math.exp(v - m) for v in logs))
    for v, path in zip(logs, paths):
        w = math.exp(v - logz)
        for t, c in enumerate(path):
            gamma[t, c] += w
    best = max(range(len(logs)), key=lambda i: logs[i])
    return logz, gamma, logs[best], list(paths[best])

# ------------------------------------------------------------------------------------------------
# direct float64 DPs over the extended state sequence (one sequence, plain Python loops)
# ------------------------------------------------------------------------------------------------


def _topology(target, blank, label_loop):
    """Extended states, per state its predecessors (stay, s-1, s-2 where allowed), and the final states."""
    ext = [blank]
    for c in target:
        ext += [c, blank]
    preds = []
    for s, c in enumerate(ext):
        p = []
        if c == blank or label_loop:
            p.append(s)  # stay (labels have no self-loop in the RNA topology)
        if s >= 1:
            p.append(s - 1)
        if s >= 2 and c != blank and (not label_loop or c != ext[s - 2]):
            p.append(s - 2)
        preds.append(p)
    finals = [len(ext) - 1] + ([len(ext) - 2] if target else [])
    return ext, preds, finals


def forward_backward(lp, target, blank, label_loop=True):
    """lp (T, C) float64 log-probs of the valid frames -> (log Z, gamma (T, C)) by alpha and beta."""
    T, C = lp.shape
    ext, preds, finals = _topology(target, blank, label_loop)
    L = len(ext)
    gamma = torch.zeros(T, C, dtype=torch.float64)
    if T == 0:
        return (0.0 if not target else -math.inf), gamma
    e = [[float(lp[t, ext[s]]) for s in range(L)] for t in range(T)]
    alpha = [[-math.inf] * L for _ in range(T)]
    for s in range(min(2, L)):
        alpha[0][s] = e[0][s]
    for t in range(1, T):
        for s in range(L):
            alpha[t][s] = _lse([alpha[t - 1][p] for p in preds[s]]) + e[t][s]
    logz = _lse([alpha[T - 1][s] for s in finals])
    if logz == -math.inf:
        return logz, gamma
    succ = [[s for s in range(L) if r in preds[s]] for r in range(L)]
    beta = [[-math.inf] * L for _ in range(T)]  # beta_t(s) includes frame t's emission
    for s in finals:
        beta[T - 1][s] = e[T - 1][s]
    for t in range(T - 2, -1, -1):
        for s in range(L):
            beta[t][s] = _lse([beta[t + 1][n] for n in succ[s]]) + e[t][s]
    for t in range(T):
        for s in range(L):
            if alpha[t][s] != -math.inf and beta[t][s] != -math.inf:
                gamma[t, ext[s]] += math.exp(alpha[t][s] + beta[t][s] - e[t][s] - logz)
    return logz, gamma


def returnn_ctc_edges(target, blank, label_loop=True):
    """RETURNN's CTC automaton for one target (its ``GetCtcFsaFastBwOp``), as its ordered edge list
    ``[(from, to, emission)]`` and the end state. States: 0 blank (also the start), 1 l1, 2 blank, ...,
    2S blank, then the end state, entered by the last frame's edge. Edges come state by state: a blank's
    (stay, next label), a label's (stay, next blank, skip to the next label when allowed); the edges into
    the end state are the skip from the label before the last, the last blank but one's (stay, last
    label, end by the last label), the last label's (stay, next blank, end by itself, end by a blank)
    and the last blank's (stay, end). Edges RETURNN routes to its dead dummy state are left out."""
    S, b = len(target), blank
    end = 2 * S + 1
    if S == 0:
        return [(0, 0, b), (0, end, b)], end
    edges = []
    for i in range(S - 1):  # the blank before label i and label i, up to the label before the last
        lab, nxt = target[i], target[i + 1]
        edges += [(2 * i, 2 * i, b), (2 * i, 2 * i + 1, lab)]
        if label_loop:
            edges.append((2 * i + 1, 2 * i + 1, lab))
        edges.append((2 * i + 1, 2 * i + 2, b))
        if nxt != lab or not label_loop:
            edges.append((2 * i + 1, 2 * i + 3, nxt))
    last = target[-1]
    if S >= 2 and (last != target[-2] or not label_loop):
        edges.append((2 * S - 3, end, last))  # the skip into the end state
    edges += [(2 * S - 2, 2 * S - 2, b), (2 * S - 2, 2 * S - 1, last), (2 * S - 2, end, last)]
    if label_loop:
        edges.append((2 * S - 1, 2 * S - 1, last))
    edges.append((2 * S - 1, 2 * S, b))
    if label_loop:
        edges.append((2 * S - 1, end, last))
    edges += [(2 * S - 1, end, b), (2 * S, 2 * S, b), (2 * S, end, b)]
    return edges, end


def viterbi(lp, target, blank, label_loop=True):
    """Best path (score, class id per frame) as RETURNN's ``FastViterbiOp`` finds it on RETURNN's CTC
    automaton (:func:`returnn_ctc_edges`): per frame every edge in order offers ``score(from) +
    lp[t, emission]`` to its target state, which keeps the largest (the lowest edge on ties); the path is
    backtracked from the end state. ``(-inf, None)`` when there is no path."""
    T = lp.shape[0]
    edges, end = returnn_ctc_edges(list(target), blank, label_loop)
    if T == 0:
        return (0.0 if not target else -math.inf), []
    score = {0: 0.0}
    back = []
    for t in range(T):
        new, arg = {}, {}
        for k, (fr, to, em) in enumerate(edges):
            if score.get(fr, -math.inf) == -math.inf:
                continue
            v = score[fr] + float(lp[t, em])
            if v > new.get(to, -math.inf):  # edges in order: a tie keeps the lower edge
                new[to], arg[to] = v, k
        score = new
        back.append(arg)
    if score.get(end, -math.inf) == -math.inf:
        return -math.inf, None
    path, s = [0] * T, end
    for t in range(T - 1, -1, -1):
        fr, _, em = edges[back[t][s]]
        path[t], s = em, fr
    return score[end], path
