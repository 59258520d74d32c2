"""Float64 / plain-Python references for the catalogue losses and the sequence metrics, written for the
tests from the definitions (RETURNN's losses, TF's edit distance and CTC decoder, RETURNN's
``compute_bleu``, sacrebleu's ``BLEU.compute_bleu``), independently of tri_losses and of sacrebleu.
Sequences are Python lists of ids.
"""
from __future__ import annotations

import math
from collections import Counter



def apply_label_map(seq, mapping):
    """``mapping``: dict {id: id | None}; None drops the label. A missing id raises KeyError."""
    out = []
    for x in seq:
        y = mapping[x]
        if y is not None:
            out.append(y)
    return out


def levenshtein(a, b):
    """Two-row textbook DP with unit costs."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def ngram_counts(seq, n):
    return Counter(tuple(seq[i:i + n]) for i in range(len(seq) - n + 1))


def bleu_stats(hyp, ref, max_order):
    """[match_1..N, poss_1..N, |hyp|, |ref|] with Counter-clipped matches."""
    match, poss = [], []
    for n in range(1, max_order + 1):
        ch, cr = ngram_counts(hyp, n), ngram_counts(ref, n)
        match.append(sum(min(c, cr[g]) for g, c in ch.items()))
        poss.append(sum(ch.values()))
    return match + poss + [len(hyp), len(ref)]


def returnn_compute_bleu(ref_corpus, hyp_corpus, max_order=4, use_bp=True):
    """RETURNN's ``compute_bleu`` (tensor2tensor's), transcribed; an empty total reference gives BP = 1."""
    ref_len = hyp_len = 0
    matches = [0] * max_order
    possible = [0] * max_order
    for ref, hyp in zip(ref_corpus, hyp_corpus):
        ref_len += len(ref)
        hyp_len += len(hyp)
        for n in range(1, max_order + 1):
            ch, cr = ngram_counts(hyp, n), ngram_counts(ref, n)
            for g, c in cr.items():
                matches[n - 1] += min(c, ch[g])
            possible[n - 1] += sum(ch.values())
    precisions = [0.0] * max_order
    smooth = 1.0
    for i in range(max_order):
        if possible[i] > 0:
            if matches[i] > 0:
                precisions[i] = matches[i] / possible[i]
            else:
                smooth *= 2
                precisions[i] = 1.0 / (smooth * possible[i])
    geo = math.exp(sum(math.log(p) for p in precisions if p) / max_order) if max(precisions) > 0 else 0.0
    bp = 1.0
    if use_bp:
        ratio = hyp_len / ref_len if ref_len else math.inf
        if ratio < 1e-30:
            bp = 0.0
        elif ratio < 1.0:
            bp = math.exp(1 - 1.0 / ratio)
    return geo * bp


def sacrebleu_score(stats, max_order=4, smooth_method="exp", smooth_value=None, effective_order=False):
    """sacrebleu's ``BLEU.compute_bleu`` on summed ``bleu_stats`` (0..100)."""
    correct = [float(c) for c in stats[:max_order]]
    total = [float(t) for t in stats[max_order:2 * max_order]]
    sys_len, ref_len = stats[2 * max_order], stats[2 * max_order + 1]
    if smooth_value is None:
        smooth_value = {"floor": 0.1, "add-k": 1}.get(smooth_method)
    bp = 1.0
    if sys_len < ref_len:
        bp = math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0
    precisions = [0.0] * max_order
    if not any(correct):
        return 0.0
    smooth_mteval = 1.0
    eff = max_order
    for n in range(1, max_order + 1):
        if smooth_method == "add-k" and n > 1:
            correct[n - 1] += smooth_value
            total[n - 1] += smooth_value
        if total[n - 1] == 0:
            break
        if effective_order:
            eff = n
        if correct[n - 1] == 0:
            if smooth_method == "exp":
                smooth_mteval *= 2
                precisions[n - 1] = 100.0 / (smooth_mteval * total[n - 1])
            elif smooth_method == "floor":
                precisions[n - 1] = 100.0 * smooth_value / total[n - 1]
        else:
            precisions[n - 1] = 100.0 * correct[n - 1] / total[n - 1]
    logs = [math.log(p) if p > 0 else -9999999999 for p in precisions[:eff]]
    return bp * math.exp(sum(logs) / eff)


def greedy_collapse(frames, blank):
    """Best path: per-frame argmax ids -> collapse repeats -> drop blanks."""
    out, prev = [], None
    for c in frames:
        if c != blank and c != prev:
            out.append(c)
        prev = c
    return out


def prefix_beam_search(lp, blank, beam_width, with_score=False):
    """Textbook CTC prefix beam search top-1 on one (T, C) list of rows (each frame log-softmax
    normalised, as TF's decoder): every prefix in the beam extended by every class, the ``beam_width``
    most probable kept. ``with_score``: also the top prefix's log-probability."""
    def lse(a, b):
        m = max(a, b)
        return m if m == -math.inf else m + math.log(math.exp(a - m) + math.exp(b - m))

    beams = {(): (0.0, -math.inf)}  # prefix -> (log P ending in blank, log P ending in a label)
    for row in lp:
        mx = max(row)
        lz = mx + math.log(sum(math.exp(v - mx) for v in row))
        row = [v - lz for v in row]
        new = {}
        for pre, (pb, pl) in beams.items():
            tot = lse(pb, pl)
            ob, ol = new.get(pre, (-math.inf, -math.inf))
            ol2 = ol if not pre else lse(ol, pl + row[pre[-1]])
            new[pre] = (lse(ob, tot + row[blank]), ol2)
            for c in range(len(row)):
                if c == blank:
                    continue
                ext = pre + (c,)
                src = pb if pre and pre[-1] == c else tot
                eb, el = new.get(ext, (-math.inf, -math.inf))
                new[ext] = (eb, lse(el, src + row[c]))
        beams = dict(sorted(new.items(), key=lambda kv: -lse(*kv[1]))[:beam_width])
    best, (pb, pl) = max(beams.items(), key=lambda kv: lse(*kv[1]))
    return (list(best), lse(pb, pl)) if with_score else list(best)


def deep_clustering(V, Y):
    """||V V^T - Y Y^T||_F^2 through the explicit affinity matrices (float64)."""
    V, Y = V.double(), Y.double()
    return ((V @ V.t() - Y @ Y.t()) ** 2).sum()


def triplet_loop(E, labels, margin):
    n = E.shape[0]
    e = [E[i].double() / math.sqrt(max(float((E[i].double() ** 2).sum()), 1e-15)) for i in range(n)]
    total = 0.0
    for i in range(n):
        for j in range(n):
            d = 1.0 - float((e[i] * e[j]).sum())
            li, lj = int(labels[i]), int(labels[j])
            if lj * lj == li * lj:
                total += 0.5 * d
            else:
                total += 0.5 * max(margin - d, 0.0)
    return total


def prefix_probabilities(lp, blank):
    """log P(labelling) for every labelling of one sequence by enumerating all paths (tiny T)."""
    import itertools
    T, C = lp.shape
    out = {}
    for path in itertools.product(range(C), repeat=T):
        lab, prev = [], None
        for c in path:
            if c != blank and c != prev:
                lab.append(c)
            prev = c
        v = sum(float(lp[t, c]) for t, c in enumerate(path))
        k = tuple(lab)
        out[k] = v if k not in out else max(out[k], v) + math.log1p(math.exp(-abs(out[k] - v)))
    return out
