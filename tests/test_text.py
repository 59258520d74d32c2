"""edit_distance / error_rate / bleu / ctc_beam_search_decode vs direct references."""
import math

import pytest
import torch

from tests.conftest import DEVICE
from tests.reference import catalogue as ref
from tri_losses.text import bleu, ctc_beam_search_decode, edit_distance, error_rate


def _pad(seqs):
    L = max([len(s) for s in seqs] + [1])
    t = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        t[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return t.to(DEVICE), torch.tensor([len(s) for s in seqs], device=DEVICE)


def _random_pairs(n, maxlen, vocab):
    g = torch.Generator().manual_seed(n * 7 + maxlen)
    lens = torch.randint(0, maxlen + 1, (2, n), generator=g)
    return ([torch.randint(0, vocab, (int(k),), generator=g).tolist() for k in lens[0]],
            [torch.randint(0, vocab, (int(k),), generator=g).tolist() for k in lens[1]])


def test_edit_distance_returnn_values(backend):
    H = [[1, 2, 3, 3, 4, 5], [1, 2], [2, 2, 4, 4, 6, 6, 8, 8, 9, 10, 0, 0, 0], [], []]
    R = [[1, 2, 3, 4, 5], [3], [2, 2, 4, 4, 6, 6, 8, 8, 9, 10, 0], [4, 5], []]
    h, hl = _pad(H)
    r, rl = _pad(R)
    assert edit_distance(h, hl, r, rl, backend=backend).tolist() == [1, 2, 2, 2, 0]
    assert edit_distance(r, rl, h, hl, backend=backend).tolist() == [1, 2, 2, 2, 0]


def test_edit_distance_random_vs_dp_including_long_and_empty(backend):
    H, R = _random_pairs(5, 90, 5)  # references longer than the interpreter's 64-wide chunk
    H[0], R[1] = [], []
    h, hl = _pad(H)
    r, rl = _pad(R)
    got = edit_distance(h, hl, r, rl, backend=backend)
    assert got.dtype == torch.int32
    assert got.tolist() == [ref.levenshtein(a, b) for a, b in zip(H, R)]
    norm = edit_distance(h, hl, r, rl, normalize=True, backend=backend)
    for k, (a, b) in enumerate(zip(H, R)):
        d = ref.levenshtein(a, b)
        exp = d / len(b) if b else (0.0 if d == 0 else math.inf)
        assert norm[k].item() == pytest.approx(exp)
    er = error_rate(h, hl, r, rl, backend=backend)
    assert er.item() == pytest.approx(sum(ref.levenshtein(a, b) for a, b in zip(H, R)) / sum(len(b) for b in R))


def test_edit_distance_label_map(backend):
    H, R = [[1, 2, 3, 0, 2]], [[1, 3, 3]]
    h, hl = _pad(H)
    r, rl = _pad(R)
    m = {0: None, 1: 1, 2: 1, 3: 3}  # drop 0, merge 2 into 1
    got = edit_distance(h, hl, r, rl, label_map=m, backend=backend)
    assert got.item() == ref.levenshtein([1, 1, 3, 1], [1, 3, 3])
    table = torch.tensor([-1, 1, 1, 3])
    assert edit_distance(h, hl, r, rl, label_map=table, backend=backend).item() == got.item()
    with pytest.raises(ValueError, match="label_map"):
        edit_distance(h, hl, r, rl, label_map={1: 1, 2: 2}, backend=backend)


def test_bleu_returnn_values_and_random(backend):
    bh, bhl = _pad([[1, 2, 3], [], [1, 2, 3], [1, 2], [1]])
    br, brl = _pad([[2, 3], [1, 2], [1, 2, 3, 4, 5], [1, 2], [2]])
    got = bleu(bh, bhl, br, brl, backend=backend)
    assert got.tolist() == pytest.approx([0.6389431, 0.0, 0.5134171, 1.0, 0.8408964], abs=1e-6)
    H, R = _random_pairs(10, 40, 4)
    R[3] = []
    h, hl = _pad(H)
    r, rl = _pad(R)
    got = bleu(h, hl, r, rl, backend=backend)
    assert got.tolist() == pytest.approx([ref.returnn_bleu(a, b) for a, b in zip(H, R)], abs=1e-6)


@pytest.mark.parametrize("smooth", ["exp", "floor", "add-k", "none"])
def test_bleu_matches_sacrebleu(backend, smooth):
    sb = pytest.importorskip("sacrebleu")
    H, R = _random_pairs(8, 25, 4)
    H[2] = []
    h, hl = _pad(H)
    r, rl = _pad(R)
    toks = lambda s: " ".join(f"w{c}" for c in s)  # noqa: E731
    got = bleu(h, hl, r, rl, mode="sacrebleu", smooth_method=smooth, backend=backend)
    for k, (a, b) in enumerate(zip(H, R)):
        exp = sb.sentence_bleu(toks(a), [toks(b)], smooth_method=smooth, tokenize="none").score
        assert got[k].item() == pytest.approx(exp, abs=1e-4), (k, smooth)
    corpus = bleu(h, hl, r, rl, mode="sacrebleu", smooth_method=smooth, aggregate="corpus", backend=backend)
    exp = sb.corpus_bleu([toks(a) for a in H], [[toks(b) for b in R]], smooth_method=smooth, tokenize="none").score
    assert corpus.item() == pytest.approx(exp, abs=1e-4)


def test_ctc_beam_search_finds_most_probable_labelling():
    torch.manual_seed(3)
    for _ in range(3):
        lp = (torch.randn(2, 5, 3) * 2).log_softmax(-1)
        labels, lengths = ctc_beam_search_decode(lp, [5, 4], beam_width=50, blank=-1)
        for b, T in enumerate([5, 4]):
            probs = ref.prefix_probabilities(lp[b, :T], blank=2)
            best = max(probs, key=probs.get)
            assert labels[b, :lengths[b]].tolist() == list(best)
        # frames shifted by their max: logits and log-probs decode alike
        l2, n2 = ctc_beam_search_decode(lp + torch.randn(2, 5, 1) * 5, [5, 4], beam_width=50)
        assert torch.equal(l2, labels) and torch.equal(n2, lengths)


def test_text_bad_input_and_compile(backend):
    h, hl = _pad([[1, 2]])
    with pytest.raises(ValueError, match="hyp_lengths"):
        edit_distance(h, [3], h, [2], backend=backend)
    with pytest.raises(TypeError, match="hyp"):
        edit_distance(h.float(), [2], h, [2])
    with pytest.raises(ValueError, match="mode"):
        bleu(h, [2], h, [2], mode="nist")
    with pytest.raises(ValueError, match="max_order"):
        bleu(h, [2], h, [2], max_order=0)
    H, R = _random_pairs(4, 10, 3)
    hh, hhl = _pad(H)
    rr, rrl = _pad(R)
    torch._dynamo.reset()
    f = torch.compile(lambda a, al, b, bl: edit_distance(a, al, b, bl, backend=backend), fullgraph=True)
    assert f(hh, hhl, rr, rrl).tolist() == [ref.levenshtein(a, b) for a, b in zip(H, R)]
