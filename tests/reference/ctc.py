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
    """Extended states and, per state, its predecessors in tie order (stay, s-1, s-2)."""
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


def viterbi(lp, target, blank, label_loop=True):
    """Best path (score, class id per frame) by max-product DP; ties: stay, then s-1, then s-2;
    at the end the final blank over the last label."""
    T, C = lp.shape
    ext, preds, finals = _topology(target, blank, label_loop)
    L = len(ext)
    if T == 0:
        return (0.0 if not target else -math.inf), []
    delta = [[-math.inf] * L for _ in range(T)]
    back = [[-1] * L for _ in range(T)]
    for s in range(min(2, L)):
        delta[0][s] = float(lp[0, ext[s]])
    for t in range(1, T):
        for s in range(L):
            best, arg = -math.inf, -1
            for p in preds[s]:  # strict > keeps the earlier predecessor on ties
                if delta[t - 1][p] > best:
                    best, arg = delta[t - 1][p], p
            if arg >= 0:
                delta[t][s] = best + float(lp[t, ext[s]])
                back[t][s] = arg
    s = max(finals, key=lambda f: (delta[T - 1][f], f))  # ties: the final blank (higher index)
    score = delta[T - 1][s]
    if score == -math.inf:
        return score, None
    path = [0] * T
    for t in range(T - 1, -1, -1):
        path[t] = ext[s]
        s = back[t][s]
    return score, path
