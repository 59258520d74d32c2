"""fast_baum_welch / fast_viterbi / fsa_loss / FSA builders vs path enumeration and ctc_loss."""
import math

import pytest
import torch

from tests.conftest import assert_close
from tests.reference import automata as ref
from tri_losses.automata import Fsa, ctc_fsa, fast_baum_welch, fast_viterbi, fsa_loss, hmm_fsa
from tri_losses.ctc import ctc_loss


def _random_automaton(B=3, D=4, seed=0):
    """Per sequence 4 states (0 start, 3 end): forward edges, loops, skips, one dead edge; seq 2 has no path."""
    g = torch.Generator().manual_seed(seed)
    rows, se = [], []
    for b in range(B):
        o = 4 * b
        local = [(0, 1), (1, 1), (1, 2), (2, 2), (2, 3), (1, 3), (0, 2), (3, 3), (0, 0)]
        if b == 2:
            local = [(0, 1), (1, 1), (2, 3)]  # end unreachable
        for fr, to in local:
            rows.append((o + fr, o + to, int(torch.randint(0, D, (1,), generator=g)), b))
        se.append((o, o + 3))
    edges = torch.tensor(rows).t().contiguous()
    weights = torch.rand(edges.shape[1], generator=g, dtype=torch.float64) * 2
    weights[3] = math.inf  # a dead edge
    return edges, weights, torch.tensor(se).t().contiguous()


def _dt(backend):
    return torch.float64 if backend == "torch" else torch.float32


def _tol(backend):
    return dict(rel=1e-9, abs=1e-9) if backend == "torch" else dict(rel=2e-5, abs=2e-5)


def test_fast_baum_welch_matches_path_enumeration(backend):
    T, B, D = 5, 3, 4
    edges, weights, se = _random_automaton(B, D)
    am = torch.rand(T, B, D, dtype=torch.float64) * 3  # -log space
    lens = [5, 3, 4]
    mask = (torch.arange(T)[:, None] < torch.tensor(lens)[None, :]).double()
    fwdbwd, obs = fast_baum_welch(am.to(_dt(backend)), edges, weights.to(_dt(backend)), se, mask, backend=backend)
    for b in range(B):
        sel = (edges[3] == b).nonzero()[:, 0].tolist()
        ed = [(int(edges[0, e]), int(edges[1, e]), int(edges[2, e])) for e in sel]
        scores = [[-float(weights[e]) - float(am[t, b, edges[2, e]]) for e in sel] for t in range(lens[b])]
        logz, post, _, _ = ref.enumerate_paths(scores, ed, int(se[0, b]), int(se[1, b]), lens[b])
        if logz == -math.inf:
            assert (fwdbwd[:, b] == 1e32).all() and (obs[:, b] == 0).all()
            continue
        assert obs[:lens[b], b].tolist() == pytest.approx([-logz] * lens[b], **_tol(backend))
        assert (obs[lens[b]:, b] == 0).all() and (fwdbwd[lens[b]:, b] == 1e32).all()
        for t in range(lens[b]):
            for d in range(D):
                p = post.get((t, d), 0.0)
                exp = -math.log(p) if p > 0 else 1e32
                assert fwdbwd[t, b, d].item() == pytest.approx(exp, **_tol(backend))


def test_fast_viterbi_matches_enumeration(backend):
    T, B, D = 5, 3, 4
    edges, weights, se = _random_automaton(B, D, seed=1)
    am = torch.randn(T, B, D, dtype=torch.float64)  # +log space
    lens = torch.tensor([5, 4, 3])
    align, score = fast_viterbi(am.to(_dt(backend)), lens, edges, weights.to(_dt(backend)), se, mask_idx=-1,
                                backend=backend)
    for b in range(B):
        sel = (edges[3] == b).nonzero()[:, 0].tolist()
        ed = [(int(edges[0, e]), int(edges[1, e]), int(edges[2, e])) for e in sel]
        scores = [[float(am[t, b, edges[2, e]]) - float(weights[e]) for e in sel] for t in range(int(lens[b]))]
        _, _, best, best_seq = ref.enumerate_paths(scores, ed, int(se[0, b]), int(se[1, b]), int(lens[b]))
        if best_seq is None:
            assert score[b] == -math.inf and (align[:, b] == -1).all()
            continue
        assert score[b].item() == pytest.approx(best, **_tol(backend))
        assert align[:int(lens[b]), b].tolist() == best_seq and (align[int(lens[b]):, b] == -1).all()


@pytest.mark.parametrize("label_loop", [True, False], ids=["loop", "rna"])
@pytest.mark.parametrize("blank_last", [False, True], ids=["blank0", "blankC-1"])
def test_fsa_loss_over_ctc_fsa_equals_ctc_loss(backend, label_loop, blank_last):
    T, B, C, S = 9, 3, 5, 3
    blank = C - 1 if blank_last else 0
    x = torch.randn(T, B, C, dtype=_dt(backend), requires_grad=True)
    labels = [c for c in range(C) if c != blank]
    tg = torch.tensor(labels)[torch.randint(0, len(labels), (B, S))]
    tg[0, 1] = tg[0, 0]
    il, tl = torch.tensor([9, 7, 4]), torch.tensor([3, 2, 0])
    up = torch.randn(B, dtype=_dt(backend))
    for max_approx in (False, True):
        got = fsa_loss(x, il, ctc_fsa(tg, tl, blank, label_loop=label_loop), reduction="none", max_approx=max_approx,
                       backend=backend)
        (g,) = torch.autograd.grad(got, x, up)
        exp = ctc_loss(x, tg, il, tl, blank=blank, reduction="none", input_type="logits", label_loop=label_loop,
                       max_approx=max_approx, backend=backend)
        (ge,) = torch.autograd.grad(exp, x, up)
        tol = 1e-10 if backend == "torch" else 2e-5
        assert_close(got, exp, atol=tol, rtol=tol)
        assert_close(g, ge, atol=tol, rtol=tol)


def test_fsa_loss_no_path_gives_zero_loss_and_softmax_gradient(backend):
    x = torch.randn(4, 2, 3, requires_grad=True)
    fsa = ctc_fsa(torch.tensor([[1, 1, 1], [1, 2, 0]]), torch.tensor([3, 2]), 0)  # seq 0 needs 5 frames
    loss = fsa_loss(x, [4, 3], fsa, reduction="none", backend=backend)
    assert loss[0].item() == 0 and loss[1].item() > 0
    (g,) = torch.autograd.grad(loss.sum(), x)
    assert_close(g[:, 0], torch.softmax(x.detach()[:, 0], -1))
    assert (g[3, 1] == 0).all()  # padded frame


def test_hmm_fsa_edges_by_hand():
    fsa = hmm_fsa(torch.tensor([[2, 1]]), [2], states_per_label=2, loop_cost=0.5, forward_cost=1.0)
    live = torch.isfinite(fsa.weights)
    got = sorted(zip(fsa.edges[0][live].tolist(), fsa.edges[1][live].tolist(), fsa.edges[2][live].tolist(),
                     fsa.weights[live].tolist()))
    # states: 0 initial, 1..2 label 2 (emissions 4, 5), 3..4 label 1 (emissions 2, 3), 5 final
    exp = sorted([(0, 1, 4, 1.0), (1, 1, 4, 0.5), (1, 2, 5, 1.0), (2, 2, 5, 0.5), (2, 3, 2, 1.0), (3, 3, 2, 0.5),
                  (3, 4, 3, 1.0), (4, 4, 3, 0.5), (3, 5, 3, 1.0), (4, 5, 3, 0.5)])
    assert got == exp
    assert fsa.start_end_states.tolist() == [[0], [5]] and fsa.num_states == 6


def test_hmm_fsa_full_sum_matches_enumeration():
    T, D = 6, 8
    tg, tl = torch.tensor([[1, 2], [3, 0]]), torch.tensor([2, 1])
    fsa = hmm_fsa(tg, tl, states_per_label=2, loop_cost=0.3, forward_cost=0.9, skip_cost=1.5, silence=7)
    x = torch.randn(T, 2, D, dtype=torch.float64)
    got = fsa_loss(x, [6, 5], fsa, reduction="none")
    lp = torch.log_softmax(x, -1)
    for b, Tb in enumerate([6, 5]):
        sel = ((fsa.edges[3] == b) & torch.isfinite(fsa.weights)).nonzero()[:, 0].tolist()
        ed = [(int(fsa.edges[0, e]), int(fsa.edges[1, e]), int(fsa.edges[2, e])) for e in sel]
        scores = [[float(lp[t, b, fsa.edges[2, e]]) - float(fsa.weights[e]) for e in sel] for t in range(Tb)]
        logz, _, _, _ = ref.enumerate_paths(scores, ed, int(fsa.start_end_states[0, b]),
                                            int(fsa.start_end_states[1, b]), Tb)
        assert got[b].item() == pytest.approx(-logz, rel=1e-9)


def test_automata_deterministic_gradcheck_and_compile():
    x = torch.randn(6, 2, 4, dtype=torch.float64, requires_grad=True)
    fsa = ctc_fsa(torch.tensor([[1, 2], [3, 3]]), [2, 2], 0)
    assert torch.autograd.gradcheck(lambda t: fsa_loss(t, [6, 5], fsa, reduction="none"), (x,))
    a = torch.autograd.grad(fsa_loss(x, [6, 5], fsa), x)[0]
    b = torch.autograd.grad(fsa_loss(x, [6, 5], fsa), x)[0]
    assert torch.equal(a, b)
    xf = x.detach().float()
    torch._dynamo.reset()
    f = torch.compile(lambda t: fsa_loss(t, torch.tensor([6, 5]), fsa), fullgraph=True)
    assert_close(f(xf), fsa_loss(xf, [6, 5], fsa))


def test_automata_bad_input():
    edges, weights, se = _random_automaton()
    am = torch.rand(4, 3, 4)
    mask = torch.ones(4, 3)
    bad = edges.clone()
    bad[2, 0] = 9
    with pytest.raises(ValueError, match="emission_idx"):
        fast_baum_welch(am, bad, weights, se, mask)
    bad = edges.clone()
    bad[1, 0] = 5  # a state of sequence 1 used by an edge of sequence 0
    with pytest.raises(ValueError, match="two sequences"):
        fast_baum_welch(am, bad, weights, se, mask)
    with pytest.raises(ValueError, match="weights"):
        fast_baum_welch(am, edges, weights[:-1], se, mask)
    with pytest.raises(ValueError, match="mask"):
        fast_baum_welch(am, edges, weights, se, torch.ones(3, 3))
    with pytest.raises(ValueError, match="start_end_states"):
        fast_baum_welch(am, edges, weights, se[:, :2], mask)
    with pytest.raises(TypeError, match="float64"):
        fsa_loss(torch.randn(4, 3, 4, dtype=torch.float64), [4, 4, 4], Fsa(edges, weights, se), backend="triton")
