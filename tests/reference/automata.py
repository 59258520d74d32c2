"""Float64 automaton references by explicit path enumeration over the edge list (tiny T)."""
import math


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
