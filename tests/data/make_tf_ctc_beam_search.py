"""Regenerates ``tf_ctc_beam_search.json``: TensorFlow's ``tf.nn.ctc_beam_search_decoder`` top-1 on seeded
random frames, for ``tests/test_text.py``. Needs TensorFlow (not a test dependency); run it as
``python tests/data/make_tf_ctc_beam_search.py`` in an environment that has it (the file was made with
TensorFlow 2.21 on CPU). TF decodes in float32, so its log-probabilities agree to about 1e-6.

The file holds 60 random sequences at widths 1, 2, 3, 4 and 8; sequences where TF's top-1 differs from
the textbook prefix beam search (every beam extended by every class, the best ``width`` kept), which TF's
pruning order makes happen on a few percent of random inputs at small widths; and 60 sequences with
-inf entries (random ones, and the log of a float32 softmax that underflows), where which beam entry TF
drops depends on its container's layout; among them, sequences where TF's beam ends up holding one
prefix twice (its top-2 paths are equal: a beam entry whose total is -inf re-created as a child while
still held), the case that needs TF's container reproduced step for step; and 30 or more sequences with
-inf entries and more classes than the beam holds (C = 12-32, widths 4 and 8), among them at least 6 whose
beam holds a prefix twice; and exact ties (every single frame with logits in {0, 1, 2} for C = 3 and 4, and
all-equal frames), which TF's container order alone decides.
"""
import json
import math
import os

import numpy as np
import tensorflow as tf


def tf_top1(x, width):
    dec, lp = tf.nn.ctc_beam_search_decoder(tf.constant(x[:, None, :]), np.array([len(x)], np.int32),
                                            beam_width=width, top_paths=1)
    labels = [int(v) for v in tf.sparse.to_dense(dec[0], default_value=-1).numpy()[0] if v >= 0]
    return {"labels": labels, "log_probability": float(lp.numpy()[0, 0])}


def tf_top2_equal(x, width):
    dec, _ = tf.nn.ctc_beam_search_decoder(tf.constant(x[:, None, :]), np.array([len(x)], np.int32),
                                           beam_width=width, top_paths=2)
    p = [[int(v) for v in tf.sparse.to_dense(d, default_value=-1).numpy()[0] if v >= 0] for d in dec]
    return p[0] == p[1]


def tf_near_tie(x, width):
    """Whether TF's two best prefixes differ and score within 1e-4 (float32 rounding could order them)."""
    dec, lp = tf.nn.ctc_beam_search_decoder(tf.constant(x[:, None, :]), np.array([len(x)], np.int32),
                                            beam_width=width, top_paths=2)
    p = [[int(v) for v in tf.sparse.to_dense(d, default_value=-1).numpy()[0] if v >= 0] for d in dec]
    lp = lp.numpy()[0]
    return p[0] != p[1] and abs(float(lp[0]) - float(lp[1])) < 1e-4


def textbook_top1(x, width):
    """The textbook prefix beam search (blank = the last class), only to pick the telling cases."""
    def lse(a, b):
        m = max(a, b)
        return m if m == -math.inf else m + math.log(math.exp(a - m) + math.exp(b - m))

    blank = x.shape[1] - 1
    beams = {(): (0.0, -math.inf)}
    for row in x.tolist():
        new = {}
        for pre, (pb, pl) in beams.items():
            tot = lse(pb, pl)
            ob, ol = new.get(pre, (-math.inf, -math.inf))
            new[pre] = (lse(ob, tot + row[blank]), ol if not pre else lse(ol, pl + row[pre[-1]]))
            for c in range(blank):
                src = pb if pre and pre[-1] == c else tot
                eb, el = new.get(pre + (c,), (-math.inf, -math.inf))
                new[pre + (c,)] = (eb, lse(el, src + row[c]))
        beams = dict(sorted(new.items(), key=lambda kv: -lse(*kv[1]))[:width])
    return list(max(beams.items(), key=lambda kv: lse(*kv[1]))[0])


def frames(rng, i):
    T, C = int(rng.integers(1, 11)), int(rng.integers(3, 9))
    x = rng.normal(size=(T, C)) * [0.5, 1.0, 2.0, 4.0][i % 4]
    return x.astype(np.float32).astype(np.float64)  # exactly what TF's float32 decoder sees


def main():
    rng = np.random.default_rng(2026)
    widths = (1, 2, 3, 4, 8)
    cases = [{"x": x.tolist(), "blank": x.shape[1] - 1, "top1": {str(w): tf_top1(x, w) for w in widths}}
             for x in (frames(rng, i) for i in range(60))]
    telling, i = 0, 0
    while telling < 25:
        x, i = frames(rng, i), i + 1
        found = {str(w): tf_top1(x, w) for w in (2, 3)}
        found = {w: r for w, r in found.items() if r["labels"] != textbook_top1(x, int(w))}
        if found:
            cases.append({"x": x.tolist(), "blank": x.shape[1] - 1, "top1": found, "differs_from_textbook": True})
            telling += len(found)
    for i in range(60):
        x = frames(rng, i)
        if i % 2 == 0:  # random -inf entries, never a whole frame
            x[rng.random(size=x.shape) < 0.3] = -np.inf
            x[np.isinf(x).all(1), -1] = 0.0
        else:  # log(softmax) of confident float32 logits: exact zeros become -inf
            z = (x * 30).astype(np.float32)
            p = np.exp(z - z.max(1, keepdims=True))
            with np.errstate(divide="ignore"):
                x = np.log(p / p.sum(1, keepdims=True)).astype(np.float64)
        cases.append({"x": x.tolist(), "blank": x.shape[1] - 1, "top1": {str(w): tf_top1(x, w) for w in widths},
                      "neg_inf": True})
    held_twice = 0
    while held_twice < 20:
        x = frames(rng, 1)
        x[rng.random(size=x.shape) < 0.3] = -np.inf
        x[np.isinf(x).all(1), -1] = 0.0
        found = {str(w): tf_top1(x, w) for w in (2, 3, 4) if len(x) > 1 and tf_top2_equal(x, w)}
        if found:
            cases.append({"x": x.tolist(), "blank": x.shape[1] - 1, "top1": found, "neg_inf": True,
                          "held_twice": True})
            held_twice += len(found)
    # more classes than the beam can take (C = 12-32 at widths 4 and 8, T = 4-8), with -inf entries: the
    # decoder's class selection is active; rows whose top two TF scores are within 1e-4 are left out (float32
    # rounding decides those), and sequences whose beam ends up holding one prefix twice are looked for too
    wide, wide_twice = 0, 0
    while wide < 30 or wide_twice < 6:
        T, C = int(rng.integers(4, 9)), int(rng.integers(12, 33))
        x = (rng.normal(size=(T, C)) * [1.0, 3.0][wide % 2]).astype(np.float32).astype(np.float64)
        x[rng.random(size=x.shape) < [0.3, 0.6][wide % 2]] = -np.inf
        x[np.isinf(x).all(1), -1] = 0.0
        found = {str(w): tf_top1(x, w) for w in (4, 8) if not tf_near_tie(x, w)}
        twice = any(tf_top2_equal(x, w) for w in (4, 8))
        if found and (wide < 30 or twice):
            cases.append({"x": x.tolist(), "blank": C - 1, "top1": found, "neg_inf": True, "wide": True,
                          **({"held_twice": True} if twice else {})})
            wide += 1
            wide_twice += twice
    # exact ties, which only TF's container order decides (its top path read in the container's order, as its
    # op's TopPaths does): every single frame with logits in {0, 1, 2} (C = 3, 4) and all-equal frames (T = 1-4,
    # C = 3-5); the tied scores are equal in float32 and float64 alike
    import itertools
    for C in (3, 4):
        for v in itertools.product((0.0, 1.0, 2.0), repeat=C):
            x = np.array([v], dtype=np.float64)
            cases.append({"x": x.tolist(), "blank": C - 1, "top1": {str(w): tf_top1(x, w) for w in (1, 2, 3)},
                          "tie": True})
    for T in (1, 2, 3, 4):
        for C in (3, 4, 5):
            x = np.zeros((T, C))
            cases.append({"x": x.tolist(), "blank": C - 1, "top1": {str(w): tf_top1(x, w) for w in (1, 2, 3, 4)},
                          "tie": True})
    meta = {"tensorflow": tf.__version__, "op": "tf.nn.ctc_beam_search_decoder(top_paths=1)", "cases": cases}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tf_ctc_beam_search.json")
    with open(path, "w") as f:
        json.dump(meta, f, separators=(",", ":"))


if __name__ == "__main__":
    main()
