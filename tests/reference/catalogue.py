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


def _lse(a, b):
    """log(exp(a) + exp(b)) of two floats, -inf as the zero."""
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log1p(math.exp(min(a, b) - m))


def tf_beam_search(lp, blank, beam_width, with_score=False):
    """TensorFlow's ``CTCBeamSearchDecoder`` top-1 on one (T, C) list of rows, transcribed step by step.

    Each frame is log-softmax normalised. Per frame: the beam (sorted by probability, best first) is
    carried over (blank, repeated last label, the parent's extension while the parent is in the beam);
    then each beam whose previous probability beats the current bottom is extended by every non-blank
    class in class order. A new prefix (not currently in the beam) enters if it beats the bottom, which
    is then dropped with its probabilities cleared; one that does not enter has its probabilities,
    previous ones included, cleared (so a beam dropped earlier in the frame and re-created that way is
    not extended later in the frame). ``with_score``: also the top prefix's log-probability.

    The beam is a plain list (the bottom: the first minimum), which gives TF's result whenever the
    probabilities are finite; with -inf entries TF's result can depend on the order inside its container
    (tests/data holds TF's own results for those)."""
    neg, lse = -math.inf, _lse

    class Node:
        def __init__(self, parent, label):
            self.parent, self.label, self.kids = parent, label, {}
            self.new = [neg, neg, neg]  # total, ending in blank, ending in a label
            self.old = [neg, neg, neg]

    root = Node(None, -1)
    root.new = [0.0, 0.0, neg]
    leaves = [root]
    for row in lp:
        mx = max(row)
        lz = mx + math.log(sum(math.exp(v - mx) for v in row))
        row = [v - lz for v in row]
        branches = sorted(leaves, key=lambda e: -e.new[0])
        leaves = []
        for b in branches:
            b.old = list(b.new)
        for b in branches:
            if b.parent is not None:
                p = b.parent
                if p.new[0] != neg:
                    b.new[2] = lse(b.new[2], p.old[1] if b.label == p.label else p.old[0])
                b.new[2] += row[b.label]
            b.new[1] = b.old[0] + row[blank]
            b.new[0] = lse(b.new[1], b.new[2])
            leaves.append(b)

        def candidate(total):
            return total > neg and (len(leaves) < beam_width or total > min(e.new[0] for e in leaves))

        for b in branches:
            if not candidate(b.old[0]):
                continue
            for c in range(len(row)):
                if c == blank:
                    continue
                kid = b.kids.setdefault(c, Node(b, c))
                if kid.new[0] != neg:
                    continue
                v = row[c] + (b.old[1] if c == b.label else b.old[0])
                kid.new = [v, neg, v]
                if candidate(v):
                    if len(leaves) == beam_width:
                        bottom = min(leaves, key=lambda e: e.new[0])
                        bottom.new = [neg, neg, neg]
                        leaves.remove(bottom)
                    leaves.append(kid)
                else:
                    kid.new = [neg, neg, neg]
                    kid.old = [neg, neg, neg]
    best = max(leaves, key=lambda e: e.new[0])
    score, out = best.new[0], []
    while best.parent is not None:
        out.append(best.label)
        best = best.parent
    return (out[::-1], score) if with_score else out[::-1]


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


def textbook_beam_search(lp, blank, beam_width):
    """The textbook CTC prefix beam search top-1 ``(labels, log-probability)`` on one (T, C) list of
    log-softmax rows: per frame, each kept prefix passes its probability to itself (a blank, ending in a
    blank; its last label again, ending in a label) and to each one-label extension (the blank-ending part
    only when the label repeats the last one); the ``beam_width`` most probable prefixes are kept."""
    neg, lse = -math.inf, _lse

    beam = {(): (0.0, neg)}  # prefix -> (log P ending in a blank, log P ending in a label)
    for row in lp:
        nxt = {}

        def add(prefix, b, nb):
            ob, onb = nxt.get(prefix, (neg, neg))
            nxt[prefix] = (lse(ob, b), lse(onb, nb))

        for prefix, (pb, pnb) in beam.items():
            tot = lse(pb, pnb)
            add(prefix, tot + row[blank], neg)
            if prefix:
                add(prefix, neg, pnb + row[prefix[-1]])
            for c in range(len(row)):
                if c != blank:
                    add(prefix + (c,), neg, (pb if prefix and prefix[-1] == c else tot) + row[c])
        beam = dict(sorted(nxt.items(), key=lambda kv: -lse(*kv[1]))[:beam_width])
    best = max(beam, key=lambda k: lse(*beam[k]))
    return list(best), lse(*beam[best])


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
