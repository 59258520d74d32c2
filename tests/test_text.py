"""Sequence metrics vs independent references (tests/reference/catalogue.py), both backends.

edit_distance / error_rate: RETURNN's values, a DP reference, label_map, normalize, empty and multi-chunk
sequences, bad input, torch.compile. bleu: the integer n-gram statistics vs Counter, RETURNN mode (values,
quirks, corpus, use_bp, orders), sacrebleu mode vs a transcription of sacrebleu's formula and vs sacrebleu
itself (every smoothing, smooth_value, effective_order, sentence and corpus). ctc_beam_search_decode: a
step-by-step transcription of TF's decoder (labels and scores), TF's own recorded results
(tests/data/tf_ctc_beam_search.json), -F.ctc_loss of the decoded labelling, greedy.
"""
import itertools
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import DEVICE
from tests.reference import catalogue as R
from tri_losses.ctc import ctc_greedy_decode
from tri_losses.text import bleu, ctc_beam_search_decode, edit_distance, error_rate


def pad(seqs, width=None, dtype=torch.long):
    """Padded (B, W) ids and lengths; garbage in the padding, which must never be read."""
    W = max([len(s) for s in seqs] + [0]) if width is None else width
    t = torch.randint(50, 60, (len(seqs), W), dtype=dtype)  # garbage in the padding: must never be read
    for i, s in enumerate(seqs):
        t[i, :len(s)] = torch.tensor(s, dtype=dtype)
    return t.to(DEVICE), torch.tensor([len(s) for s in seqs], device=DEVICE)


def rand_seqs(g, lengths, vocab):
    return [torch.randint(0, vocab, (int(n),), generator=g).tolist() for n in lengths]


def test_edit_distance_returnn_values_both_directions(backend):
    H = [[1, 2, 3, 3, 4, 5], [1, 2], [2, 2, 4, 4, 6, 6, 8, 8, 9, 10, 0, 0, 0], [], []]
    Rf = [[1, 2, 3, 4, 5], [3], [2, 2, 4, 4, 6, 6, 8, 8, 9, 10, 0], [4, 5], []]
    h, hl = pad(H)
    r, rl = pad(Rf)
    assert edit_distance(h, hl, r, rl, backend=backend).tolist() == [1, 2, 2, 2, 0]
    assert edit_distance(r, rl, h, hl, backend=backend).tolist() == [1, 2, 2, 2, 0]


def test_edit_distance_random_pairs_vs_dp_multichunk_and_empty(backend):
    g = torch.Generator().manual_seed(11)
    # lengths: empty on either or both sides, and references spanning 3 interpreter chunks (64 wide)
    hlen = [0, 0, 7, 1, 12, 20, 3]
    rlen = [0, 9, 0, 1, 13, 150, 5]
    H, Rf = rand_seqs(g, hlen, 3), rand_seqs(g, rlen, 3)
    h, hl = pad(H, dtype=torch.int32)
    r, rl = pad(Rf, width=160)
    got = edit_distance(h, hl, r, rl, backend=backend)
    assert got.dtype == torch.int32 and got.shape == (len(H),)
    exp = [R.levenshtein(a, b) for a, b in zip(H, Rf)]
    assert got.tolist() == exp
    # symmetric (the long side now the DP rows)
    assert edit_distance(r, rl, h, hl, backend=backend).tolist() == exp
    # non-contiguous inputs
    hs = torch.cat([h, h], 1)[:, ::2]
    assert hs.stride(1) == 2
    assert edit_distance(hs, hl, r, rl, backend=backend).tolist() == [
        R.levenshtein(hs[k, :n].tolist(), b) for k, (n, b) in enumerate(zip(hlen, Rf))]


def test_edit_distance_normalize_and_error_rate(backend):
    H = [[1, 2, 3], [], [4], [], [5, 5]]
    Rf = [[1, 3], [2, 2], [], [], [5, 5, 5, 5]]
    h, hl = pad(H)
    r, rl = pad(Rf)
    norm = edit_distance(h, hl, r, rl, normalize=True, backend=backend)
    assert norm.dtype == torch.float32
    d = [R.levenshtein(a, b) for a, b in zip(H, Rf)]
    exp = [x / len(b) if b else (0.0 if x == 0 else math.inf) for x, b in zip(d, Rf)]
    assert norm.tolist() == pytest.approx(exp)
    er = error_rate(h, hl, r, rl, backend=backend)
    assert er.dtype == torch.float32 and er.shape == ()
    assert er.item() == pytest.approx(sum(d) / sum(len(b) for b in Rf))


def test_edit_distance_label_map_dict_and_tensor(backend):
    g = torch.Generator().manual_seed(5)
    H, Rf = rand_seqs(g, [6, 0, 9, 4], 5), rand_seqs(g, [5, 3, 0, 8], 5)
    m = {0: None, 1: 1, 2: 1, 3: 3, 4: None}  # drop 0 and 4, merge 2 into 1
    h, hl = pad(H)
    r, rl = pad(Rf)
    exp = [R.levenshtein(R.apply_label_map(a, m), R.apply_label_map(b, m)) for a, b in zip(H, Rf)]
    got = edit_distance(h, hl, r, rl, label_map=m, backend=backend)
    assert got.tolist() == exp
    table = torch.tensor([-1, 1, 1, 3, -1], device=DEVICE)
    assert edit_distance(h, hl, r, rl, label_map=table, backend=backend).tolist() == exp
    # normalize divides by the mapped reference length; error_rate by the given ref_lengths (RETURNN)
    mapped_len = [len(R.apply_label_map(b, m)) for b in Rf]
    norm = edit_distance(h, hl, r, rl, label_map=m, normalize=True, backend=backend)
    assert norm.tolist() == pytest.approx([d / n if n else (0.0 if d == 0 else math.inf)
                                           for d, n in zip(exp, mapped_len)])
    er = error_rate(h, hl, r, rl, label_map=m, backend=backend)
    assert er.item() == pytest.approx(sum(exp) / sum(len(b) for b in Rf))
    # ids outside the map (either side) are an error where the ids are read on the host (CPU: a CUDA check
    # would sync); padding beyond the lengths is not looked at
    for bad in ({0: None, 1: 1, 2: 1, 3: 3}, torch.tensor([-1, 1, 1, 3], device=DEVICE)):
        if DEVICE.type != "cpu":
            break
        with pytest.raises(ValueError, match="label_map"):
            edit_distance(h, hl, r, rl, label_map=bad, backend=backend)


def test_edit_distance_empty_batch_and_zero_width(backend):
    z = torch.zeros(0, 4, dtype=torch.long, device=DEVICE)
    zl = torch.zeros(0, dtype=torch.long, device=DEVICE)
    assert edit_distance(z, zl, z, zl, backend=backend).shape == (0,)
    e = torch.zeros(2, 0, dtype=torch.long, device=DEVICE)
    r, rl = pad([[1, 2], [3]])
    assert edit_distance(e, [0, 0], r, rl, backend=backend).tolist() == [2, 1]
    assert edit_distance(r, rl, e, [0, 0], normalize=True, backend=backend).tolist() == [math.inf, math.inf]


def test_edit_distance_and_beam_search_bad_input_names_argument():
    h, hl = pad([[1, 2], [3, 4]])
    cases = [
        (TypeError, "hyp", lambda: edit_distance(h.float(), hl, h, hl)),
        (TypeError, "ref", lambda: edit_distance(h, hl, h.float(), hl)),
        (ValueError, "ref", lambda: edit_distance(h, hl, h[:1], hl[:1])),
        (ValueError, "ref", lambda: edit_distance(h[0], hl, h, hl)),
        (ValueError, "hyp_lengths", lambda: edit_distance(h, [3, 1], h, hl)),
        (ValueError, "ref_lengths", lambda: edit_distance(h, hl, h, [-1, 1])),
        (ValueError, "ref_lengths", lambda: edit_distance(h, hl, h, [1])),
        (TypeError, "hyp_lengths", lambda: edit_distance(h, hl.float(), h, hl)),
        (ValueError, "label_map", lambda: edit_distance(h, hl, h, hl, label_map={})),
        (TypeError, "label_map", lambda: edit_distance(h, hl, h, hl, label_map=torch.ones(5))),
        (ValueError, "backend", lambda: edit_distance(h, hl, h, hl, backend="cuda")),
        (TypeError, "hyp", lambda: error_rate(h.float(), hl, h, hl)),
    ]
    for exc, name, fn in cases:
        with pytest.raises(exc, match=name):
            fn()
    lg = torch.randn(2, 5, 4)
    beam_cases = [
        (ValueError, "logits", lambda: ctc_beam_search_decode(lg[0], [5])),
        (TypeError, "logits", lambda: ctc_beam_search_decode(lg.long(), [5, 5])),
        (ValueError, "blank", lambda: ctc_beam_search_decode(lg, [5, 5], blank=4)),
        (ValueError, "beam_width", lambda: ctc_beam_search_decode(lg, [5, 5], beam_width=0)),
        (ValueError, "input_lengths", lambda: ctc_beam_search_decode(lg, [6, 5])),
        (ValueError, "input_lengths", lambda: ctc_beam_search_decode(lg, [5])),
        (ValueError, "method", lambda: ctc_beam_search_decode(lg, [5, 5], method="greedy")),
    ]
    for exc, name, fn in beam_cases:
        with pytest.raises(exc, match=name):
            fn()


def test_edit_distance_compile_fullgraph(backend):
    g = torch.Generator().manual_seed(2)
    H, Rf = rand_seqs(g, [3, 0, 6], 3), rand_seqs(g, [4, 2, 0], 3)
    h, hl = pad(H)
    r, rl = pad(Rf)
    torch._dynamo.reset()
    lm = torch.arange(10, device=DEVICE)  # an identity tensor label_map: its CPU check must not break tracing
    f = torch.compile(lambda a, al, b, bl: edit_distance(a, al, b, bl, normalize=True, label_map=lm,
                                                         backend=backend), fullgraph=True)
    d = [R.levenshtein(a, b) for a, b in zip(H, Rf)]
    exp = [x / len(b) if b else (0.0 if x == 0 else math.inf) for x, b in zip(d, Rf)]
    assert f(h, hl, r, rl).tolist() == pytest.approx(exp)


# ---- ctc_beam_search_decode (TF's decoder, on the host) -------------------------------------------------

@pytest.mark.parametrize("method", ["tf", "batched"])
def test_beam_search_peaked_equals_greedy(method):
    # one class dominates every frame by a wide margin: the beam's top-1 is the best path, at any width
    B, T, C = 3, 9, 5
    ids = torch.randint(0, C, (B, T))
    logits = (torch.randn(B, T, C) + 12 * torch.nn.functional.one_hot(ids, C)).to(DEVICE)
    lens = [9, 4, 0]
    for blank in (-1, 0):
        for width in (1, 3, 16):
            lab, n = ctc_beam_search_decode(logits, lens, beam_width=width, blank=blank, method=method)
            g, gn = ctc_greedy_decode(logits, torch.tensor(lens), blank=blank % C, batch_first=True)
            assert lab.shape == (B, T) and lab.device == logits.device
            for b in range(B):
                exp = R.greedy_collapse(ids[b, :lens[b]].tolist(), blank % C)
                assert lab[b, :n[b]].tolist() == exp == g[b, :gn[b]].tolist()
                assert not lab[b, n[b]:].any()  # padded with 0
    assert n.dtype == torch.int64 and n.tolist()[2] == 0


@pytest.mark.parametrize("C,widths", [(4, (1, 2, 5)), (9, (1, 2, 3)), (40, (2, 6))])
def test_beam_search_vs_tf_transcription(C, widths):
    """Labels and scores of the top prefix vs the step-by-step transcription of TF's decoder on random
    frames of several batches, lengths and blanks; C > beam_width + 2 exercises the class selection."""
    g = torch.Generator().manual_seed(C)
    for trial in range(6):
        B, T = 4, int(torch.randint(1, 11, (1,), generator=g))
        logits = (torch.randn(B, T, C, generator=g, dtype=torch.float64) * (0.5 + 3 * trial / 5)).to(DEVICE)
        lens = torch.randint(0, T + 1, (B,), generator=g).tolist()
        blank = int(torch.randint(0, C, (1,), generator=g))
        for width in widths:
            lab, n, score = ctc_beam_search_decode(logits, lens, beam_width=width, blank=blank, return_scores=True)
            assert score.dtype == torch.float64 and score.shape == (B,)
            for b in range(B):
                exp, exp_score = R.tf_beam_search(logits[b, :lens[b]].tolist(), blank, width, with_score=True)
                assert lab[b, :n[b]].tolist() == exp, (trial, width, b)
                assert score[b].item() == pytest.approx(exp_score, rel=1e-12, abs=1e-12)


def test_beam_search_class_selection_is_exact_on_tied_frames():
    """Frames of tied class scores (all equal, or a few levels) over several frames, with more classes than the
    width: the class selection (which leaves out classes tied with the beam's bottom and selects again once a
    visit has replaced the whole beam) gives what visiting every class gives: the same labels and score
    (exact ties are ordered by TF's container, which the simpler transcription in tests/reference does not
    model; the recorded TF test covers single tied frames)."""
    from tri_losses._torch.text import _beam_search_one
    g = torch.Generator().manual_seed(7)
    C = 40
    for trial in range(6):
        T = 3 + trial
        x = torch.zeros(4, T, C, dtype=torch.float64)
        x[1] = torch.randint(0, 3, (T, C), generator=g).double()  # three levels: many ties
        x[2] = torch.randint(0, 2, (T, C), generator=g).double() * 4.0
        x[3] = torch.randint(0, 3, (T, C), generator=g).double()
        x[3, :, ::7] = -math.inf
        blank = int(torch.randint(0, C, (1,), generator=g))
        for width in (2, 6, 45):
            for b in range(4):
                lp = x[b].log_softmax(-1).numpy()
                fast, every = _beam_search_one(lp, blank, width), _beam_search_one(lp, blank, width, prune=False)
                assert fast == every, (trial, width, b)


def _tf_recorded():
    with open(os.path.join(os.path.dirname(__file__), "data", "tf_ctc_beam_search.json")) as f:
        return json.load(f)


def test_beam_search_vs_tensorflow_recorded():
    """TF's own top-1 (labels and log-probability), recorded by tests/data/make_tf_ctc_beam_search.py, at widths
    1-8: random sequences; rows where TF's pruning order gives another result than the textbook prefix beam
    search; sequences with -inf entries, among them rows where TF's beam holds one prefix twice (an entry with
    total -inf re-created while still held: which entry TF then drops depends on its container's layout),
    also with C = 12-32 classes at widths 4 and 8, where the decoder visits only the classes that can enter;
    exact ties, which TF's container order alone decides. TF decodes in float32: scores agree to 1e-5."""
    cases = _tf_recorded()["cases"]
    assert sum(len(c["top1"]) for c in cases if c.get("differs_from_textbook")) >= 20
    assert sum(len(c["top1"]) for c in cases if c.get("held_twice")) >= 20
    assert sum(len(c["top1"]) for c in cases if c.get("neg_inf")) >= 300
    # -inf entries with more classes than the beam takes (the decoder's class selection active)
    assert sum(len(c["top1"]) for c in cases if c.get("wide") and len(c["x"][0]) > 8 + 2) >= 60
    assert sum(1 for c in cases if c.get("wide") and c.get("held_twice")) >= 6
    # exact ties (single frames with logits in {0, 1, 2}, all-equal frames): TF's container order decides
    assert sum(len(c["top1"]) for c in cases if c.get("tie")) >= 300
    for width in (1, 2, 3, 4, 8):
        rows = [c for c in cases if str(width) in c["top1"]]
        T = max(len(c["x"]) for c in rows)
        C = max(len(c["x"][0]) for c in rows)
        for c in rows:  # one batch per class count (blank = the last class, as TF's decoder requires)
            assert c["blank"] == len(c["x"][0]) - 1
        for cc in sorted({len(c["x"][0]) for c in rows}):
            group = [c for c in rows if len(c["x"][0]) == cc]
            x = torch.full((len(group), T, cc), float("nan"), dtype=torch.float64)  # padding: never read
            for i, c in enumerate(group):
                x[i, :len(c["x"])] = torch.tensor(c["x"], dtype=torch.float64)
            lens = [len(c["x"]) for c in group]
            lab, n, score = ctc_beam_search_decode(x.to(DEVICE), lens, beam_width=width, blank=-1,
                                                   return_scores=True)
            for i, c in enumerate(group):
                exp = c["top1"][str(width)]
                assert lab[i, :n[i]].tolist() == exp["labels"], (width, i)
                assert score[i].item() == pytest.approx(exp["log_probability"], rel=1e-5, abs=1e-5)
        assert C >= 3


def test_beam_search_pruning_order_as_tf():
    """The case that shows TF's pruning order (blank = 2, width 2). At frame 3, while the beam [0] is extended,
    its child [0, 0] drops the beam [0, 1] from the beam; class 1 then re-creates [0, 1] as [0]'s child, which
    misses the beam, so [0, 1] loses its probabilities and is not extended: [0, 1, 0] (log P -1.2740) never
    forms and the result is [0, 0] (-1.4795), as TF 2.21 returns (checked with TF: the same labels and
    scores at widths 1, 2, 3 and 10). At width 3 the beam holds every prefix that matters."""
    x = torch.tensor([[[1.1230957253234448, -1.0223619967783004, -0.04724948795665983],
                       [-0.49380539171803445, 0.20580406313579092, 0.00029728685475789794],
                       [1.3111684135578021, -3.1658556101060586, -1.31326675611885]]], dtype=torch.float64)
    for width, labels in ((1, [0, 0]), (2, [0, 0]), (3, [0, 1, 0]), (10, [0])):
        lab, n, score = ctc_beam_search_decode(x.to(DEVICE), [3], beam_width=width, blank=2, return_scores=True)
        exp, exp_score = R.tf_beam_search(x[0].tolist(), 2, width, with_score=True)
        assert lab[0, :n[0]].tolist() == labels == exp
        assert score[0].item() == pytest.approx(exp_score, rel=1e-12)
        tgt = torch.tensor([labels])
        nll = F.ctc_loss(x[0].log_softmax(-1)[:, None], tgt, [3], [len(labels)], blank=2, reduction="sum")
        if width >= 3:  # the beam holds every prefix that matters: the score is the labelling's log P
            assert score[0].item() == pytest.approx(-nll.item(), rel=1e-9)


# ---- method="batched": the textbook prefix beam search, batched on the logits' device ----------------------

@pytest.mark.parametrize("C,widths", [(4, (1, 2, 5)), (9, (1, 2, 3)), (40, (2, 6))])
def test_beam_search_batched_vs_textbook(C, widths):
    """Labels and scores of method="batched" vs the textbook prefix beam search in plain Python (float64) on
    random frames of several batches, lengths (0 included) and blanks, some with classes at -inf."""
    g = torch.Generator().manual_seed(100 + C)
    for trial in range(6):
        B, T = 4, int(torch.randint(1, 11, (1,), generator=g))
        logits = torch.randn(B, T, C, generator=g, dtype=torch.float64) * (0.5 + 3 * trial / 5)
        if trial % 3 == 2:
            logits[..., 1::3] = -math.inf  # classes never seen (the blank may be one: every prefix still valid)
        lens = torch.randint(0, T + 1, (B,), generator=g).tolist()
        blank = int(torch.randint(0, C, (1,), generator=g))
        lp = logits.log_softmax(-1)
        for width in widths:
            lab, n, score = ctc_beam_search_decode(logits.to(DEVICE), lens, beam_width=width, blank=blank,
                                                   return_scores=True, method="batched")
            assert lab.device == score.device == n.device == torch.device(DEVICE) and score.dtype == torch.float64
            for b in range(B):
                exp, exp_score = R.textbook_beam_search(lp[b, :lens[b]].tolist(), blank, width)
                assert lab[b, :n[b]].tolist() == exp and not lab[b, n[b]:].any(), (trial, width, b)
                assert score[b].item() == pytest.approx(exp_score, rel=1e-12, abs=1e-12)


def test_beam_search_batched_vs_tensorflow_recorded():
    """method="batched" on TF's recorded rows: the textbook's result everywhere (labels, and the score to
    float64 rounding), which is TF's top-1 labelling except on the rows where TF's pruning order gives another
    (there TF's score can also lose the mass of a prefix it dropped)."""
    cases = [c for c in _tf_recorded()["cases"] if not (c.get("neg_inf") or c.get("tie"))]
    differs = agrees = 0
    for c in cases:
        x = torch.tensor([c["x"]], dtype=torch.float64)
        for width, exp in c["top1"].items():
            lab, n, score = ctc_beam_search_decode(x.to(DEVICE), [len(c["x"])], beam_width=int(width), blank=-1,
                                                   return_scores=True, method="batched")
            got = lab[0, :n[0]].tolist()
            ref, ref_score = R.textbook_beam_search(x[0].log_softmax(-1).tolist(), len(c["x"][0]) - 1, int(width))
            assert got == ref and score[0].item() == pytest.approx(ref_score, rel=1e-12), (c, width)
            if c.get("differs_from_textbook"):
                differs += got != exp["labels"]
            else:
                assert got == exp["labels"], (c, width)
                agrees += score[0].item() == pytest.approx(exp["log_probability"], rel=1e-5, abs=1e-5)
    assert differs >= 10 and agrees >= 50, (differs, agrees)


def test_beam_search_batched_ties_as_the_textbook_stable_order():
    """Frames of tied scores (a few levels, or all equal): method="batched" breaks ties as the textbook's stable
    sort (beams best first, each beam's own prefix before its extensions, a prefix in the beam at the first of
    its places), so it returns the reference's labels and score; one sequence per call (on a CPU a batch's
    vectorised float64 math can differ from the scalar one by an ulp, which can break an exact tie)."""
    g = torch.Generator().manual_seed(7)
    for trial in range(24):
        C, T = int(torch.randint(3, 12, (1,), generator=g)), int(torch.randint(1, 12, (1,), generator=g))
        x = torch.randint(0, 3, (3, T, C), generator=g).double()
        x[2] = 0
        blank = int(torch.randint(0, C, (1,), generator=g))
        for width in (1, 2, 3, 5, 8):
            for b in range(3):
                lab, n, score = ctc_beam_search_decode(x[b:b + 1].to(DEVICE), [T], beam_width=width, blank=blank,
                                                       return_scores=True, method="batched")
                exp, exp_score = R.textbook_beam_search(x[b].log_softmax(-1).tolist(), blank, width)
                assert lab[0, :n[0]].tolist() == exp, (trial, width, b)
                assert score[0].item() == pytest.approx(exp_score, rel=1e-12)


def test_beam_search_batched_unlimited_width_costs_what_the_shapes_need():
    """A width far above the number of label sequences the shapes allow (31 here) decodes as that number
    (the memory is quadratic in the width), the textbook's full-beam result, as method="tf"."""
    x = torch.randn(2, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    got = ctc_beam_search_decode(x, [4, 3], beam_width=10 ** 6, return_scores=True, method="batched")
    tf = ctc_beam_search_decode(x, [4, 3], beam_width=10 ** 6, return_scores=True)
    for b, n in enumerate((4, 3)):
        exp, exp_score = R.textbook_beam_search(x[b, :n].log_softmax(-1).tolist(), 2, 10 ** 6)
        assert got[0][b, :got[1][b]].tolist() == exp == tf[0][b, :tf[1][b]].tolist()
        assert got[2][b].item() == pytest.approx(exp_score, rel=1e-12)


def test_beam_search_batched_reads_nothing_on_the_host_and_keeps_nan_to_its_sequence():
    """method="batched" runs on meta tensors (so no value is read on the host: no sync on a GPU); a NaN in one
    sequence's frames makes that sequence's score NaN and leaves the others' results as without it."""
    lab, n, score = ctc_beam_search_decode(torch.randn(3, 6, 5, device="meta"), torch.tensor([6, 2, 0], device="meta"),
                                           beam_width=4, return_scores=True, method="batched")
    assert lab.device.type == "meta" and lab.shape == (3, 6) and n.shape == score.shape == (3,)
    x = torch.randn(3, 6, 5, dtype=torch.float64, device=DEVICE)
    lab, n, score = ctc_beam_search_decode(x, [6, 6, 3], beam_width=4, return_scores=True, method="batched")
    x[1, 2, 3] = math.nan
    x[2, 4, 0] = math.nan  # past sequence 2's length: never read
    lab2, n2, score2 = ctc_beam_search_decode(x, [6, 6, 3], beam_width=4, return_scores=True, method="batched")
    assert math.isnan(score2[1].item())
    for b in (0, 2):
        assert lab2[b].tolist() == lab[b].tolist() and n2[b] == n[b] and score2[b].item() == score[b].item()


@pytest.mark.parametrize("method", ["tf", "batched"])
def test_beam_search_score_is_the_labelling_log_probability(method):
    """With a beam wide enough to keep every prefix, the returned score is the top labelling's log-probability
    under the log-softmax of the frames (TF's ``log_probabilities``): -F.ctc_loss of that labelling."""
    g = torch.Generator().manual_seed(3)
    for T in (1, 3, 5):
        x = (torch.randn(2, T, 3, generator=g, dtype=torch.float64) * 2).to(DEVICE)
        lab, n, score = ctc_beam_search_decode(x, [T, T], beam_width=200, blank=2, return_scores=True,
                                               method=method)
        for b in range(2):
            tgt = lab[b, :n[b]].unsqueeze(0)
            exp = -F.ctc_loss(x[b].log_softmax(-1).unsqueeze(1), tgt, [T], [int(n[b])], blank=2, reduction="sum")
            assert score[b].item() == pytest.approx(exp.item(), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("method", ["tf", "batched"])
def test_beam_search_empty_shapes(method):
    lab, n = ctc_beam_search_decode(torch.randn(0, 3, 4, device=DEVICE), [], beam_width=2, method=method)
    assert lab.shape == (0, 3) and n.shape == (0,)
    lab, n = ctc_beam_search_decode(torch.randn(2, 0, 4, device=DEVICE), [0, 0], beam_width=2, method=method)
    assert lab.shape == (2, 0) and n.tolist() == [0, 0]
    only_blank = torch.randn(2, 4, 1, device=DEVICE)
    lab, n = ctc_beam_search_decode(only_blank, [4, 2], beam_width=3, method=method)
    assert n.tolist() == [0, 0] and not lab.any()


@pytest.mark.parametrize("method", ["tf", "batched"])
def test_beam_search_shift_invariance_and_dtypes(method):
    B, T, C = 3, 7, 4
    logits = (torch.randn(B, T, C, dtype=torch.float64) * 3).to(DEVICE)
    lens = [7, 6, 2]
    for width in (1, 2, 5):
        lab, n = ctc_beam_search_decode(logits, lens, beam_width=width, blank=1, method=method)
        # logits, log-probs and log(probs) decode alike (frames are log-softmax normalised), any float dtype
        for x in (logits.log_softmax(-1), logits.softmax(-1).clamp_min(1e-30).log(), logits.float()):
            lab2, n2 = ctc_beam_search_decode(x, lens, beam_width=width, blank=1, method=method)
            assert torch.equal(lab2, lab) and torch.equal(n2, n)


def test_beam_search_backend_option(backend):
    lg = torch.randn(2, 6, 5, device=DEVICE)
    if backend == "triton":  # plain torch by design: forcing the Triton backend is an error
        with pytest.raises(RuntimeError, match="no Triton kernel"):
            ctc_beam_search_decode(lg, [6, 3], beam_width=3, backend=backend)
        return
    got = ctc_beam_search_decode(lg, [6, 3], beam_width=3, backend=backend)
    exp = ctc_beam_search_decode(lg, [6, 3], beam_width=3)
    assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1])


@pytest.mark.gpu
def test_beam_search_cuda_input():
    lg = torch.randn(2, 30, 50, device="cuda")
    lens = torch.tensor([30, 11], device="cuda")
    lab, n, score = ctc_beam_search_decode(lg, lens, beam_width=8, return_scores=True)
    assert lab.device == n.device == score.device == lg.device
    for b in range(2):
        exp, exp_score = R.tf_beam_search(lg[b, :int(lens[b])].tolist(), 49, 8, with_score=True)
        assert lab[b, :n[b]].tolist() == exp and score[b].item() == pytest.approx(exp_score, rel=1e-6)
    lab, n, score = ctc_beam_search_decode(lg, lens, beam_width=8, return_scores=True, method="batched")
    assert lab.device == n.device == score.device == lg.device
    for b in range(2):
        exp, exp_score = R.textbook_beam_search(lg[b, :int(lens[b])].double().log_softmax(-1).tolist(), 49, 8)
        assert lab[b, :n[b]].tolist() == exp and score[b].item() == pytest.approx(exp_score, rel=1e-9)


def test_label_map_rejects_bad_entries():
    h, hl = pad([[1, 2], [3, 0]])
    # a dict is checked as it is read; a tensor map's entries where it is on the host (CPU)
    for bad in ({-1: 2, 0: 0, 1: 1, 2: 2, 3: 3}, {0: 0, 1: 1, 2: 2, 3: -5},
                *([torch.tensor([0, 1, 2, -7], device=DEVICE)] if DEVICE.type == "cpu" else [])):
        with pytest.raises(ValueError, match="label_map"):
            edit_distance(h, hl, h, hl, label_map=bad)
    with pytest.raises((TypeError, ValueError), match="beam_width"):
        ctc_beam_search_decode(torch.randn(1, 3, 4), [3], beam_width=2.5)


def test_ids_beyond_int32_are_compared_in_full(backend):
    from tri_losses.text import bleu
    big = 2 ** 33
    h = torch.tensor([[big + 1, 5], [big + 1, big + 2]], device=DEVICE)
    r = torch.tensor([[1, 5], [1, 2]], device=DEVICE)
    ln = torch.tensor([2, 2], device=DEVICE)
    assert edit_distance(h, ln, r, ln, backend=backend).tolist() == [1, 2]
    # no n-gram matches: the same score as any hypothesis of two unseen ids
    same = bleu(torch.tensor([[7, 8]], device=DEVICE), ln[1:], r[1:], ln[1:], backend=backend)
    assert bleu(h[1:], ln[1:], r[1:], ln[1:], backend=backend).item() == same.item() < 1.0


# ---- bleu ---------------------------------------------------------------------------------------------

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


def test_bleu_stats_kernel_vs_counter(backend, data):
    H, Rf = data
    h, hl = pad(H)
    r, rl = pad(Rf)
    for N in (1, 4, 5):
        st = torch.ops.tri_losses.bleu_stats(h, hl, r, rl, N, backend == "triton")
        assert st.dtype == torch.int32 and st.shape == (len(H), 2 * N + 2)
        assert st.tolist() == [R.bleu_stats(a, b, N) for a, b in zip(H, Rf)]


def test_bleu_returnn_values_and_quirks(backend):
    H = [[1, 2, 3], [], [1, 2, 3], [1, 2], [1], [1, 2, 3]]
    Rf = [[2, 3], [1, 2], [1, 2, 3, 4, 5], [1, 2], [2], []]
    h, hl = pad(H)
    r, rl = pad(Rf)
    got = bleu(h, hl, r, rl, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (6,)
    # empty ref: RETURNN divides by zero; here r = inf, BP = 1, and no n-gram matches: geo = 0.5**(1/4)...
    exp_empty_ref = R.returnn_compute_bleu([[]], [[1, 2, 3]])
    assert got.tolist() == pytest.approx([0.6389431, 0.0, 0.5134171, 1.0, 0.8408964, exp_empty_ref], abs=1e-6)


def test_bleu_returnn_random_sentence_corpus_orders_bp(backend, data):
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


def test_bleu_sacrebleu_mode_vs_formula(backend, data):
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


def test_bleu_sacrebleu_package(backend, data):
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


def test_bleu_empty_batch(backend):
    z = torch.zeros(0, 3, dtype=torch.long, device=DEVICE)
    zl = torch.zeros(0, dtype=torch.long, device=DEVICE)
    assert bleu(z, zl, z, zl, backend=backend).shape == (0,)
    assert bleu(z, zl, z, zl, aggregate="corpus", mode="sacrebleu", backend=backend).item() == 0.0


def test_bleu_bad_input_names_argument():
    h, hl = pad([[1, 2, 3], [4]])
    cases = [
        (ValueError, "mode", dict(mode="nist")),
        (ValueError, "aggregate", dict(aggregate="mean")),
        (ValueError, "smooth_method", dict(smooth_method="add-one")),
        (ValueError, "max_order", dict(max_order=0)),
        (TypeError, "max_order", dict(max_order=2.0)),
        (ValueError, "backend", dict(backend="gpu")),
        (ValueError, "smooth_value", dict(mode="sacrebleu", smooth_method="floor", smooth_value=-1)),
        (ValueError, "smooth_value", dict(mode="sacrebleu", smooth_method="add-k", smooth_value=float("nan"))),
        (ValueError, "smooth_value", dict(mode="sacrebleu", smooth_method="add-k", smooth_value=float("inf"))),
        (TypeError, "smooth_value", dict(mode="sacrebleu", smooth_method="floor", smooth_value="0.1")),
        # options of the other mode had no effect (use_bp=False in sacrebleu mode gave the same score as True)
        (ValueError, "use_bp: expected True with mode='sacrebleu'", dict(mode="sacrebleu", use_bp=False)),
        (ValueError, "smooth_method: a sacrebleu option", dict(smooth_method="floor")),
        (ValueError, "smooth_value: a sacrebleu option", dict(smooth_value=0.1)),
        (ValueError, "effective_order: a sacrebleu option", dict(effective_order=False)),
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


def test_beam_search_finds_the_most_probable_labelling():
    """A wide beam's top-1 is the labelling of highest total probability over all paths (enumerated)."""
    torch.manual_seed(3)
    for _ in range(3):
        lp = (torch.randn(2, 5, 3) * 2).log_softmax(-1).to(DEVICE)
        labels, lengths = ctc_beam_search_decode(lp, [5, 4], beam_width=50, blank=-1)
        for b, T in enumerate([5, 4]):
            probs = R.prefix_probabilities(lp[b, :T], blank=2)
            best = max(probs, key=probs.get)
            assert labels[b, :lengths[b]].tolist() == list(best)
        # frames log-softmax normalised: logits and log-probs decode alike
        l2, n2 = ctc_beam_search_decode(lp + torch.randn(2, 5, 1, device=DEVICE) * 5, [5, 4], beam_width=50)
        assert torch.equal(l2, labels) and torch.equal(n2, lengths)
