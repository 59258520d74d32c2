"""Float64 sampled-softmax / NCE reference, written from TF's _compute_sampled_logits definition."""
import math


def sampled_logits(x, W, b, labels, sampled, true_ec, sampled_ec, *, remove_hits=True, subtract_log_q=True,
                   hit_policy="tf"):
    """x (N, D), labels[i] list of T ids, sampled (m,) ids for every row -> list of (logits, kept) per row."""
    N = len(labels)
    out = []
    for i in range(N):
        T = len(labels[i])
        z, kept = [], []
        for t, y in enumerate(labels[i]):
            v = sum(float(x[i, d]) * float(W[y, d]) for d in range(x.shape[1])) + (float(b[y]) if b is not None else 0)
            if subtract_log_q:
                v -= math.log(float(true_ec[i][t]))
            z.append(v)
            kept.append(True)
        last = {}
        for j, s in enumerate(sampled):
            last[int(s)] = j  # TF's position map: the last position wins
        for j, s in enumerate(sampled):
            s = int(s)
            v = sum(float(x[i, d]) * float(W[s, d]) for d in range(x.shape[1])) + (float(b[s]) if b is not None else 0)
            if subtract_log_q:
                v -= math.log(float(sampled_ec[j]))
            hit = s in labels[i] and (hit_policy == "all" or last[s] == j)
            z.append(v)
            kept.append(not (remove_hits and hit))
        out.append((z, kept, T))
    return out


def softmax_loss(rows):
    res = []
    for z, kept, T in rows:
        zs = [v for v, k in zip(z, kept) if k]
        m = max(zs)
        lse = m + math.log(sum(math.exp(v - m) for v in zs))
        res.append(-sum(z[t] - lse for t in range(T)) / T)
    return res


def nce_loss(rows, log_norm_term=0.0):
    sp = lambda v: max(v, 0) + math.log1p(math.exp(-abs(v)))  # noqa: E731
    res = []
    for z, kept, T in rows:
        zz = [v - log_norm_term for v in z]
        loss = sum((1 / T) * sp(-zz[t]) + (1 - 1 / T) * sp(zz[t]) for t in range(T))
        loss += sum(sp(v) for v, k in zip(zz[T:], kept[T:]) if k)
        res.append(loss)
    return res
