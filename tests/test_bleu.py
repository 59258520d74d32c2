"""bleu: the integer n-gram statistics vs Counter, RETURNN mode (values, quirks, corpus, use_bp, orders),
sacrebleu mode vs a transcription of sacrebleu's formula and vs sacrebleu itself (every smoothing,
smooth_value, effective_order, sentence and corpus), bad input. Both backends."""
import itertools

import pytest
import torch

from tests.conftest import DEVICE
from tests.reference import catalogue_b as R
from tri_losses.text import bleu


def pad(seqs, width=None):
    W = max([len(s) for s in seqs] + [0]) if width is None else width
    t = torch.randint(50, 60, (len(seqs), W))  # garbage padding: must never be counted
    for i, s in enumerate(seqs):
        t[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return t.to(DEVICE), torch.tensor([len(s) for s in seqs], device=DEVICE)


def corpus(seed, n, maxlen, vocab, long=()):
    """Random pairs; refs are noisy copies of hyps so that higher-order n-grams match too."""
    g = torch.Generator().manual_seed(seed)
    H, Rf = [], []
    for k in range(n):
        L = int(torch.randint(0, maxlen + 1, (1,), generator=g)) if k not in long else long[k]
        h = torch.randint(0, vocab, (L,), generator=g).tolist()
        r = [x if torch.rand(1, generator=g) < 0.7 else int(torch.randint(0, vocab, (1,), generator=g)) for x in h]
        r = r[int(torch.randint(0, 3, (1,), generator=g)):] + torch.randint(0, vocab, (int(torch.randint(0, 4, (1,), generator=g)),), generator=g).tolist()
        H.append(h)
        Rf.append(r)
    return H, Rf


@pytest.fixture(scope="module")
def data():
    # 40-long pairs span two interpreter tiles (32 wide); empty hyp, empty ref, both empty
    H, Rf = corpus(3, 12, 14, 4, long={0: 40})
    H[1], Rf[2], H[3], Rf[3] = [], [], [], []
    return H, Rf


def test_stats_kernel_vs_counter(backend, data):
    H, Rf = data
    h, hl = pad(H)
    r, rl = pad(Rf)
    for N in (1, 4, 5):
        st = torch.ops.tri_losses.bleu_stats(h, hl, r, rl, N, backend == "triton")
        assert st.dtype == torch.int32 and st.shape == (len(H), 2 * N + 2)
        assert st.tolist() == [R.bleu_stats(a, b, N) for a, b in zip(H, Rf)]


def test_returnn_values_and_quirks(backend):
    H = [[1, 2, 3], [], [1, 2, 3], [1, 2], [1], [1, 2, 3]]
    Rf = [[2, 3], [1, 2], [1, 2, 3, 4, 5], [1, 2], [2], []]
    h, hl = pad(H)
    r, rl = pad(Rf)
    got = bleu(h, hl, r, rl, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (6,)
    # empty ref: RETURNN divides by zero; here r = inf, BP = 1, and no n-gram matches: geo = 0.5**(1/4)...
    exp_empty_ref = R.returnn_compute_bleu([[]], [[1, 2, 3]])
    assert got.tolist() == pytest.approx([0.6389431, 0.0, 0.5134171, 1.0, 0.8408964, exp_empty_ref], abs=1e-6)


def test_returnn_random_sentence_corpus_orders_bp(backend, data):
    H, Rf = data
    h, hl = pad(H)
    r, rl = pad(Rf)
    for N, use_bp in ((4, True), (2, False), (5, True)):
        got = bleu(h, hl, r, rl, max_order=N, use_bp=use_bp, backend=backend)
        exp = [R.returnn_compute_bleu([b], [a], N, use_bp) for a, b in zip(H, Rf)]
        assert got.tolist() == pytest.approx(exp, abs=1e-6), (N, use_bp)
        c = bleu(h, hl, r, rl, max_order=N, use_bp=use_bp, aggregate="corpus", backend=backend)
        assert c.shape == () and c.item() == pytest.approx(R.returnn_compute_bleu(Rf, H, N, use_bp), abs=1e-6)


SACRE_CASES = [("exp", None), ("floor", None), ("floor", 0.3), ("add-k", None), ("add-k", 2), ("none", None)]


def subset(backend, combos):
    """The finishing formula is shared torch code; only the statistics differ by backend (and are checked
    exactly above), so the interpreter runs a few combinations and the torch backend all of them."""
    combos = list(combos)
    return combos if backend == "torch" else combos[::7]


def test_sacrebleu_mode_vs_formula(backend, data):
    H, Rf = data
    h, hl = pad(H)
    r, rl = pad(Rf)
    stats = [R.bleu_stats(a, b, 4) for a, b in zip(H, Rf)]
    total = [sum(col) for col in zip(*stats)]
    for (method, value), eff in subset(backend, itertools.product(SACRE_CASES, (None, True, False))):
        kw = dict(mode="sacrebleu", smooth_method=method, smooth_value=value, effective_order=eff)
        got = bleu(h, hl, r, rl, backend=backend, **kw)
        e_sent = True if eff is None else eff
        exp = [R.sacrebleu_score(s, 4, method, value, e_sent) for s in stats]
        assert got.tolist() == pytest.approx(exp, rel=1e-5, abs=1e-4), (method, value, eff)
        c = bleu(h, hl, r, rl, aggregate="corpus", backend=backend, **kw)
        exp_c = R.sacrebleu_score(total, 4, method, value, bool(eff))
        assert c.item() == pytest.approx(exp_c, rel=1e-5, abs=1e-4), (method, value, eff)


def test_sacrebleu_package(backend, data):
    sacrebleu = pytest.importorskip("sacrebleu")
    from sacrebleu.metrics import BLEU
    H, Rf = data
    h, hl = pad(H)
    r, rl = pad(Rf)
    toks = lambda s: " ".join(f"w{c}" for c in s)  # noqa: E731
    hs, rs = [toks(a) for a in H], [toks(b) for b in Rf]
    for (method, value), N in subset(backend, itertools.product(SACRE_CASES, (4, 2))):
        kw = dict(mode="sacrebleu", smooth_method=method, smooth_value=value, max_order=N, backend=backend)
        sent = BLEU(tokenize="none", smooth_method=method, smooth_value=value, max_ngram_order=N, effective_order=True)
        got = bleu(h, hl, r, rl, **kw)
        exp = [sent.sentence_score(a, [b]).score for a, b in zip(hs, rs)]
        assert got.tolist() == pytest.approx(exp, rel=1e-5, abs=1e-4), (method, value, N)
        for eff in (False, True):
            corp = BLEU(tokenize="none", smooth_method=method, smooth_value=value, max_ngram_order=N,
                        effective_order=eff)
            c = bleu(h, hl, r, rl, aggregate="corpus", effective_order=eff, **kw)
            assert c.item() == pytest.approx(corp.corpus_score(hs, [rs]).score, rel=1e-5, abs=1e-4), (method, N, eff)
    # the module-level helpers' defaults (sentence: effective order; corpus: not)
    got = bleu(h, hl, r, rl, mode="sacrebleu", backend=backend)
    assert got.tolist() == pytest.approx([sacrebleu.sentence_bleu(a, [b], tokenize="none").score
                                          for a, b in zip(hs, rs)], rel=1e-5, abs=1e-4)
    c = bleu(h, hl, r, rl, mode="sacrebleu", aggregate="corpus", backend=backend)
    assert c.item() == pytest.approx(sacrebleu.corpus_bleu(hs, [rs], tokenize="none").score, rel=1e-5, abs=1e-4)


def test_empty_batch(backend):
    z = torch.zeros(0, 3, dtype=torch.long, device=DEVICE)
    zl = torch.zeros(0, dtype=torch.long, device=DEVICE)
    assert bleu(z, zl, z, zl, backend=backend).shape == (0,)
    assert bleu(z, zl, z, zl, aggregate="corpus", mode="sacrebleu", backend=backend).item() == 0.0


def test_bad_input():
    h, hl = pad([[1, 2, 3], [4]])
    cases = [
        (ValueError, "mode", dict(mode="nist")),
        (ValueError, "aggregate", dict(aggregate="mean")),
        (ValueError, "smooth_method", dict(smooth_method="add-one")),
        (ValueError, "max_order", dict(max_order=0)),
        (ValueError, "max_order", dict(max_order=2.0)),
        (ValueError, "backend", dict(backend="gpu")),
        (ValueError, "smooth_value", dict(mode="sacrebleu", smooth_method="floor", smooth_value=-1)),
        (ValueError, "smooth_value", dict(mode="sacrebleu", smooth_method="add-k", smooth_value=float("nan"))),
        (ValueError, "smooth_value", dict(mode="sacrebleu", smooth_method="add-k", smooth_value=float("inf"))),
        (TypeError, "smooth_value", dict(mode="sacrebleu", smooth_method="floor", smooth_value="0.1")),
    ]
    for exc, name, kw in cases:
        with pytest.raises(exc, match=name):
            bleu(h, hl, h, hl, **kw)
    with pytest.raises(TypeError, match="hyp"):
        bleu(h.float(), hl, h, hl)
    with pytest.raises(TypeError, match="ref"):
        bleu(h, hl, h.double(), hl)
    with pytest.raises(ValueError, match="ref_lengths"):
        bleu(h, hl, h, [4, 1])
    with pytest.raises(ValueError, match="hyp_lengths"):
        bleu(h, [1, 1, 1], h, hl)
    with pytest.raises(ValueError, match="ref"):
        bleu(h, hl, h[:1], hl[:1])
