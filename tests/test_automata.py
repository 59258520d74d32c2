"""fast_baum_welch / fast_viterbi / fsa_loss / FSA builders vs float64 references (path enumeration, a
direct forward-backward / Viterbi DP over the edge list), F.ctc_loss and tri_losses.ctc_loss.

Data is made on the CPU (seeded: the same on every machine) and the ops run on ``DEVICE`` (CUDA when there
is one: the compiled kernels; else the CPU, the Triton cases in the interpreter); float64 references stay on
the CPU. Automata are passed as built: most on the CPU (the ops move them to the emissions' device), some
built on ``DEVICE`` from device targets."""
import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import DEVICE, assert_close
from tests.reference import automata as ref
from tri_losses.automata import Fsa, ctc_fsa, fast_baum_welch, fast_viterbi, fsa_loss, hmm_fsa
from tri_losses.ctc import ctc_loss


def _grad(fn, x):
    """(value, d sum(value * up) / dx) on ``DEVICE`` (x is copied there) for a random upstream ``up`` (the same
    one on every call, drawn on the CPU)."""
    xr = x.detach().to(DEVICE).clone().requires_grad_(True)
    out = fn(xr)
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.device)
    (g,) = torch.autograd.grad(out, xr, up)
    return out.detach(), g


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


def _random_fsa(B, D, seed, no_path=(), n_states=(5, 7)):
    """Random automata with loops, skips, random extra edges and dead (+inf) edges; the global state ids
    are a random permutation (a sequence's states are not contiguous). Sequences in ``no_path`` have an
    unreachable end state. Returns (edges, weights float64, se, [(from, to, emission, weight)] per seq)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [int(torch.randint(n_states[0], n_states[1] + 1, (1,), generator=g)) for _ in range(B)]
    perm = torch.randperm(sum(sizes), generator=g).tolist()
    rows, se, off = [], [], 0
    for b, n in enumerate(sizes):
        chain = [(i, i + 1) for i in range(n - 1)] + [(n - 1, n - 1)]  # never dead: a path exists
        local = chain + [(i, i) for i in range(n - 1) if torch.rand(1, generator=g) < 0.7]
        local += [(i, i + 2) for i in range(n - 2) if torch.rand(1, generator=g) < 0.5]
        local += [tuple(int(v) for v in torch.randint(0, n, (2,), generator=g)) for _ in range(3)]
        if b in no_path:
            local = [(fr, to) for fr, to in local if to != n - 1 and fr != n - 1]
        for fr, to in local:
            w = float(torch.rand(1, generator=g, dtype=torch.float64)) * 2
            if torch.rand(1, generator=g) < 0.15 and (fr, to) not in chain:
                w = math.inf
            rows.append((perm[off + fr], perm[off + to], int(torch.randint(0, D, (1,), generator=g)), b, w))
        se.append((perm[off], perm[off + n - 1]))
        off += n
    order = torch.randperm(len(rows), generator=g).tolist()  # edge order is arbitrary too
    rows = [rows[i] for i in order]
    edges = torch.tensor([r[:4] for r in rows]).t().contiguous()
    weights = torch.tensor([r[4] for r in rows], dtype=torch.float64)
    return edges, weights, torch.tensor(se).t().contiguous()


def _seq_edges(edges, weights, b):
    sel = (edges[3] == b).nonzero()[:, 0].tolist()
    return sel, [(int(edges[0, e]), int(edges[1, e]), int(edges[2, e])) for e in sel]


def test_fast_baum_welch_random_automata_match_dp(backend):
    T, B, D = 12, 4, 5
    edges, weights, se = _random_fsa(B, D, seed=3, no_path=(2,))
    am = torch.rand(T, B, D, dtype=torch.float64) * 4  # -log space
    am[:, 3, 1] = 1e4  # a near-impossible emission
    lens = [12, 7, 9, 10]
    mask = (torch.arange(T)[:, None] < torch.tensor(lens)[None, :]).float()
    dt = _dt(backend)
    fwdbwd, obs = fast_baum_welch(am.to(DEVICE, dt), edges, weights.to(dt), se, mask.to(DEVICE), backend=backend)
    assert fwdbwd.dtype == dt and obs.dtype == dt and fwdbwd.device == obs.device == DEVICE
    exp_fb = torch.full((T, B, D), 1e32, dtype=torch.float64)
    exp_obs = torch.zeros(T, B, dtype=torch.float64)
    n_path = 0
    for b in range(B):
        sel, ed = _seq_edges(edges, weights, b)
        scores = [[-float(weights[e]) - float(am[t, b, edges[2, e]]) for e in sel] for t in range(lens[b])]
        logz, post = ref.forward_backward(scores, ed, int(se[0, b]), int(se[1, b]), lens[b], log_post=True)
        if logz == -math.inf:
            continue
        n_path += 1
        exp_obs[:lens[b], b] = -logz
        for (t, d), lp in post.items():  # -log gamma: exact also for the near-impossible emission (~1e4)
            exp_fb[t, b, d] = -lp
    assert n_path == B - 1
    tol = 1e-9 if backend == "torch" else 5e-5
    assert_close(obs, exp_obs, atol=tol, rtol=tol)
    assert_close(fwdbwd, exp_fb, atol=tol, rtol=tol)
    # per-frame normalisation: the posteriors of every valid frame of a sequence with a path sum to 1
    ok = mask.bool() & (torch.arange(B) != 2)[None, :]
    sums = torch.exp(-fwdbwd.double().cpu()).sum(-1)
    assert_close(sums[ok], torch.ones_like(sums[ok]), atol=tol, rtol=tol)


def test_fast_viterbi_random_automata_match_dp(backend):
    T, B, D = 12, 4, 5
    edges, weights, se = _random_fsa(B, D, seed=4, no_path=(1,))
    am = torch.randn(T, B, D, dtype=torch.float64) * 2  # +log space, continuous: tie-free
    lens = torch.tensor([12, 9, 6, 11])
    dt = _dt(backend)
    # the same -log edge costs as fast_baum_welch (RETURNN's FastViterbiOp): path score = sum am - sum w
    logw = -weights
    align, score = fast_viterbi(am.to(DEVICE, dt), lens.to(DEVICE), edges, weights.to(dt), se, mask_idx=D + 1,
                                backend=backend)
    assert align.shape == (T, B) and score.shape == (B,)
    for b in range(B):
        sel, ed = _seq_edges(edges, weights, b)
        Tb = int(lens[b])
        scores = [[float(am[t, b, edges[2, e]]) + float(logw[e]) for e in sel] for t in range(Tb)]
        best, seq = ref.viterbi(scores, ed, int(se[0, b]), int(se[1, b]), Tb)
        if seq is None:
            assert b == 1 and score[b] == -math.inf and (align[:, b] == D + 1).all()
            continue
        assert score[b].item() == pytest.approx(best, **_tol(backend))
        assert align[:Tb, b].tolist() == seq and (align[Tb:, b] == D + 1).all()


def test_dp_reference_agrees_with_path_enumeration():
    edges, weights, se = _random_automaton(3, 4, seed=5)
    g = torch.Generator().manual_seed(0)
    for b in range(3):
        sel, ed = _seq_edges(edges, weights, b)
        scores = [[float(torch.randn(1, generator=g, dtype=torch.float64)) - float(weights[e]) for e in sel]
                  for _ in range(5)]
        z1, p1, best1, seq1 = ref.enumerate_paths(scores, ed, int(se[0, b]), int(se[1, b]), 5)
        z2, p2 = ref.forward_backward(scores, ed, int(se[0, b]), int(se[1, b]), 5)
        best2, seq2 = ref.viterbi(scores, ed, int(se[0, b]), int(se[1, b]), 5)
        assert z1 == pytest.approx(z2, rel=1e-12) and best1 == pytest.approx(best2, rel=1e-12) and seq1 == seq2
        assert p1.keys() == p2.keys() and all(p1[k] == pytest.approx(p2[k], rel=1e-10) for k in p1)


def test_fast_baum_welch_matches_path_enumeration(backend):
    T, B, D = 5, 3, 4
    edges, weights, se = _random_automaton(B, D)
    am = torch.rand(T, B, D, dtype=torch.float64) * 3  # -log space
    lens = [5, 3, 4]
    mask = (torch.arange(T)[:, None] < torch.tensor(lens)[None, :]).double()
    fwdbwd, obs = fast_baum_welch(am.to(DEVICE, _dt(backend)), edges, weights.to(_dt(backend)), se, mask.to(DEVICE),
                                  backend=backend)
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
    logw = -weights  # the path score subtracts the -log costs (the dead +inf edge scores -inf)
    align, score = fast_viterbi(am.to(DEVICE, _dt(backend)), lens.to(DEVICE), edges, weights.to(_dt(backend)), se,
                                mask_idx=-1, backend=backend)
    for b in range(B):
        sel = (edges[3] == b).nonzero()[:, 0].tolist()
        ed = [(int(edges[0, e]), int(edges[1, e]), int(edges[2, e])) for e in sel]
        scores = [[float(am[t, b, edges[2, e]]) + float(logw[e]) for e in sel] for t in range(int(lens[b]))]
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
    x = torch.randn(T, B, C, dtype=_dt(backend)).to(DEVICE).requires_grad_(True)
    labels = [c for c in range(C) if c != blank]
    tg = torch.tensor(labels)[torch.randint(0, len(labels), (B, S))]
    tg[0, 1] = tg[0, 0]
    il, tl = torch.tensor([9, 7, 4]), torch.tensor([3, 2, 0])
    up = torch.randn(B, dtype=_dt(backend))
    tg_d, il_d, tl_d, up_d = (t.to(DEVICE) for t in (tg, il, tl, up))  # the automaton built on the device
    for max_approx in (False, True):
        got = fsa_loss(x, il_d, ctc_fsa(tg_d, tl_d, blank, label_loop=label_loop), reduction="none",
                       max_approx=max_approx, backend=backend)
        (g,) = torch.autograd.grad(got, x, up_d)
        exp = ctc_loss(x, tg_d, il_d, tl_d, blank=blank, reduction="none", input_type="logits",
                       label_loop=label_loop, max_approx=max_approx, backend=backend)
        (ge,) = torch.autograd.grad(exp, x, up_d)
        tol = 1e-10 if backend == "torch" else 2e-5
        assert_close(got, exp, atol=tol, rtol=tol)
        assert_close(g, ge, atol=tol, rtol=tol)
        if not max_approx:
            full, g_full = got, g
    # independent float64 truth: PyTorch's CTC (label loops) / a direct RNA DP (no label loops)
    xd = x.detach().cpu().double().requires_grad_(True)
    lp = xd.log_softmax(-1)
    if label_loop:
        truth = F.ctc_loss(lp, tg, il, tl, blank=blank, reduction="none", zero_infinity=False)
    else:
        truth = torch.stack([ref.rna_loss(lp[:il[b], b], tg[b, :tl[b]].tolist(), blank) for b in range(B)])
    (gt,) = torch.autograd.grad(truth, xd, up.double())
    tol = 1e-10 if backend == "torch" else 2e-5
    assert_close(full, truth, atol=tol, rtol=tol)
    assert_close(g_full, gt, atol=tol, rtol=tol)


@pytest.mark.parametrize("path", ["tables", "table-blocks", "segments"])
def test_torch_backend_recursions_match_dp_on_every_path(monkeypatch, path):
    """The torch backend's alpha/beta recursions: per-state padded edge tables (the CPU default), the same
    with frame blocks of 5 frames (the scores gathered block by block), and the segment reductions (taken off
    the CPU and for automata with a state far wider than the average; forced here with ``PAD_LIMIT = 0``):
    fast_baum_welch, fast_viterbi and fsa_loss's gradient against the float64 DP and F.ctc_loss."""
    import tri_losses._torch.automata as ta
    if path == "segments":
        monkeypatch.setattr(ta, "PAD_LIMIT", 0)
    if path == "table-blocks":
        monkeypatch.setattr(ta, "_BLOCK", 5 * 48)  # 48 >= states x widest state of every automaton here
    taken = []
    padded = ta._padded
    monkeypatch.setattr(ta, "_padded", lambda *a: taken.append(padded(*a) is not None) or padded(*a))
    test_fast_baum_welch_random_automata_match_dp("torch")
    test_fast_viterbi_random_automata_match_dp("torch")
    T, B, C, S = 11, 3, 6, 4
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, B, C, generator=g, dtype=torch.float64)
    tg = torch.randint(1, C, (B, S), generator=g)
    tg[1, 2] = tg[1, 1]
    il, tl = torch.tensor([11, 8, 10]), torch.tensor([4, 3, 0])
    got, g_got = _grad(lambda z: fsa_loss(z, il, ctc_fsa(tg, tl, 0), reduction="none", backend="torch"), x)
    xd = x.clone().requires_grad_(True)
    exp = F.ctc_loss(xd.log_softmax(-1), tg, il, tl, reduction="none")
    (g_exp,) = torch.autograd.grad(exp, xd, torch.randn(B, generator=torch.Generator().manual_seed(0)).double())
    assert_close(got.cpu(), exp.detach(), atol=1e-10, rtol=1e-10)
    assert_close(g_got.cpu(), g_exp, atol=1e-10, rtol=1e-10)
    if DEVICE.type == "cpu":  # the path asked for is the one taken
        assert taken and all(taken) == (path != "segments") and any(taken) == (path != "segments")


def test_torch_backend_edge_tables_leave_wide_states_to_segments():
    """A state with far more incoming edges than the average (a hub) would make the padded table mostly
    padding: the torch backend's recursion falls back to segment reductions; a CTC automaton fits the tables."""
    import tri_losses._torch.automata as ta
    n = 40
    hub = torch.stack([torch.arange(n), torch.full((n,), n - 1), torch.zeros(n, dtype=torch.long),
                       torch.zeros(n, dtype=torch.long)])
    assert ta._padded(hub[1], n) is None
    tab, K = ta._padded(hub[0], n)  # one edge out of every state
    assert K == 1 and tab.tolist() == list(range(n))
    fsa = ctc_fsa(torch.randint(1, 5, (3, 6)), torch.tensor([6, 4, 2]), 0)
    live = fsa.weights < math.inf
    tab, K = ta._padded(fsa.edges[1][live], fsa.num_states)
    # K: the end state's 5 incoming edges (the last label's and the final blank's frames); every live edge
    # once in the table, the rest padding
    assert K == 5 and sorted(tab[tab < live.sum()].tolist()) == list(range(int(live.sum())))


def test_fsa_loss_no_path_gives_zero_loss_and_softmax_gradient(backend):
    x = torch.randn(4, 2, 3).to(DEVICE).requires_grad_(True)
    fsa = ctc_fsa(torch.tensor([[1, 1, 1], [1, 2, 0]]), torch.tensor([3, 2]), 0)  # seq 0 needs 5 frames
    loss = fsa_loss(x, [4, 3], fsa, reduction="none", backend=backend)
    assert loss[0].item() == 0 and loss[1].item() > 0
    (g,) = torch.autograd.grad(loss.sum(), x)
    assert_close(g[:, 0], torch.softmax(x.detach()[:, 0], -1))
    assert (g[3, 1] == 0).all()  # padded frame


def _live_edges(fsa):
    live = torch.isfinite(fsa.weights)
    return sorted(zip(fsa.edges[0][live].tolist(), fsa.edges[1][live].tolist(), fsa.edges[2][live].tolist(),
                      fsa.weights[live].tolist()))


def test_hmm_fsa_edges_by_hand():
    fsa = hmm_fsa(torch.tensor([[2, 1]]), [2], states_per_label=2, loop_cost=0.5, forward_cost=1.0)
    # states: 0 initial, 1..2 label 2 (emissions 4, 5), 3..4 label 1 (emissions 2, 3), 5 final
    exp = sorted([(0, 1, 4, 1.0), (1, 1, 4, 0.5), (1, 2, 5, 1.0), (2, 2, 5, 0.5), (2, 3, 2, 1.0), (3, 3, 2, 0.5),
                  (3, 4, 3, 1.0), (4, 4, 3, 0.5), (3, 5, 3, 1.0), (4, 5, 3, 0.5)])
    assert _live_edges(fsa) == exp
    assert fsa.start_end_states.tolist() == [[0], [5]] and fsa.num_states == 6


def test_hmm_fsa_edges_by_hand_with_skip_and_silence():
    # one label (id 1), 3 states (emissions 3, 4, 5), skips 0->2; silence id 9 before and after
    fsa = hmm_fsa(torch.tensor([[1]]), [1], states_per_label=3, loop_cost=0.25, forward_cost=0.5, skip_cost=2.0,
                  silence=9)
    # states: 0 initial, 1..3 label states, 4 silence before, 5 silence after, 6 final
    exp = sorted([(0, 1, 3, 0.5), (1, 1, 3, 0.25), (1, 2, 4, 0.5), (1, 3, 5, 2.0), (2, 2, 4, 0.25),
                  (2, 3, 5, 0.5), (3, 3, 5, 0.25),
                  (0, 4, 9, 0.5), (4, 4, 9, 0.25), (4, 1, 3, 0.5), (3, 5, 9, 0.5), (5, 5, 9, 0.25),
                  # copies into the final state: edges reaching the last label state or the trailing silence
                  (1, 6, 5, 2.0), (2, 6, 5, 0.5), (3, 6, 5, 0.25), (3, 6, 9, 0.5), (5, 6, 9, 0.25)])
    assert _live_edges(fsa) == exp
    assert fsa.start_end_states.tolist() == [[0], [6]] and fsa.num_states == 7


def test_hmm_fsa_full_sum_matches_dp(backend):
    T, D = 10, 12
    tg, tl = torch.tensor([[1, 2, 3], [3, 0, 0], [2, 2, 0]]), torch.tensor([3, 1, 2])
    kw = dict(states_per_label=2, loop_cost=0.3, forward_cost=0.9, skip_cost=1.5, silence=11)
    fsa = hmm_fsa(tg, tl, **kw)  # on the CPU, for the reference
    il = [10, 6, 8]
    x = torch.randn(T, 3, D, dtype=torch.float64)
    xt = x.to(DEVICE, _dt(backend)).clone().requires_grad_(True)
    got = fsa_loss(xt, il, hmm_fsa(tg.to(DEVICE), tl.to(DEVICE), **kw), reduction="none", backend=backend)
    up = torch.randn(3, dtype=torch.float64)  # a different upstream gradient per sequence
    (g,) = torch.autograd.grad(got, xt, up.to(DEVICE, _dt(backend)))
    lp = torch.log_softmax(x, -1)
    exp_g = torch.softmax(x, -1)
    for b, Tb in enumerate(il):
        sel, ed = _seq_edges(fsa.edges, fsa.weights, b)
        scores = [[float(lp[t, b, fsa.edges[2, e]]) - float(fsa.weights[e]) for e in sel] for t in range(Tb)]
        logz, post = ref.forward_backward(scores, ed, int(fsa.start_end_states[0, b]),
                                          int(fsa.start_end_states[1, b]), Tb)
        assert got[b].item() == pytest.approx(-logz, **_tol(backend))
        for (t, d), p in post.items():
            exp_g[t, b, d] -= p
        exp_g[Tb:, b] = 0
        exp_g[:, b] *= up[b]
    tol = 1e-9 if backend == "torch" else 2e-5
    assert_close(g, exp_g, atol=tol, rtol=tol)


def test_automata_deterministic_gradcheck_and_compile():
    x = torch.randn(6, 2, 4, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    fsa = ctc_fsa(torch.tensor([[1, 2], [3, 3]]), [2, 2], 0)
    assert torch.autograd.gradcheck(lambda t: fsa_loss(t, [6, 5], fsa, reduction="none"), (x,))
    a = torch.autograd.grad(fsa_loss(x, [6, 5], fsa), x)[0]
    b = torch.autograd.grad(fsa_loss(x, [6, 5], fsa), x)[0]
    assert torch.equal(a, b)
    xf = x.detach().float()
    torch._dynamo.reset()
    f = torch.compile(lambda t: fsa_loss(t, torch.tensor([6, 5]), fsa), fullgraph=True)
    assert_close(f(xf), fsa_loss(xf, [6, 5], fsa))


@pytest.mark.parametrize("layout", ["batch_first", "transposed_view"])
@pytest.mark.parametrize("max_approx", [False, True], ids=["full_sum", "viterbi"])
def test_fsa_loss_compiles_for_non_contiguous_input(backend, layout, max_approx):
    """torch.compile through the forward and backward of fsa_loss with strided input (batch_first, or a
    time-major view of a batch-major output): the gradient's layout is the same in the fake and the real op."""
    fsa = ctc_fsa(torch.tensor([[1, 2], [3, 3]]), [2, 2], 0)
    il = torch.tensor([6, 5])
    xb = torch.randn(2, 6, 4, device=DEVICE)

    def f(t):
        if layout == "batch_first":
            return fsa_loss(t, il, fsa, batch_first=True, max_approx=max_approx, backend=backend)
        return fsa_loss(t.transpose(0, 1), il, fsa, max_approx=max_approx, backend=backend)

    torch._dynamo.reset()
    x1, x2 = xb.clone().requires_grad_(True), xb.clone().requires_grad_(True)
    got = torch.compile(f, fullgraph=True)(x1)
    got.backward()
    exp = f(x2)
    exp.backward()
    assert_close(got, exp)
    assert_close(x1.grad, x2.grad)


def test_automata_deterministic_both_backends(backend):
    T, B, D = 8, 3, 5
    edges, weights, se = _random_fsa(B, D, seed=6)
    am = (torch.rand(T, B, D) * 3).to(DEVICE)
    mask = torch.ones(T, B).to(DEVICE)
    a1 = fast_baum_welch(am, edges, weights.float(), se, mask, backend=backend)
    a2 = fast_baum_welch(am, edges, weights.float(), se, mask, backend=backend)
    assert all(torch.equal(u, v) for u, v in zip(a1, a2))
    x = torch.randn(T, B, D).to(DEVICE).requires_grad_(True)
    fsa = (edges, weights.float(), se)
    g1 = torch.autograd.grad(fsa_loss(x, [8, 6, 7], fsa, backend=backend), x)[0]
    g2 = torch.autograd.grad(fsa_loss(x, [8, 6, 7], fsa, backend=backend), x)[0]
    assert torch.equal(g1, g2)


def _bad_cases():
    edges, weights, se = _random_automaton()  # on the CPU: checked there whatever the emissions' device
    am, mask = torch.rand(4, 3, 4).to(DEVICE), torch.ones(4, 3).to(DEVICE)
    x = torch.randn(4, 3, 4).to(DEVICE)
    fsa = (edges, weights.float(), se)

    def with_edge(r, c, v):
        e = edges.clone()
        e[r, c] = v
        return e

    fbw = lambda **kw: lambda: fast_baum_welch(**{**dict(am_scores=am, edges=edges, weights=weights.float(),  # noqa
                                                          start_end_states=se, mask=mask), **kw})
    fv = lambda **kw: lambda: fast_viterbi(**{**dict(am_scores=am, am_seq_len=[4, 4, 4], edges=edges,  # noqa
                                                     weights=weights.float(), start_end_states=se), **kw})
    fl = lambda **kw: lambda: fsa_loss(**{**dict(logits=x, input_lengths=[4, 4, 4], fsa=fsa), **kw})  # noqa
    se_bad = se.clone()
    se_bad[1, 0] = 7  # the end state of sequence 0 is a state of sequence 1
    return [
        ("emission_idx", fbw(edges=with_edge(2, 0, 9))),
        ("sequence_idx", fbw(edges=with_edge(3, 0, 3))),
        ("edges", fbw(edges=with_edge(0, 0, -1))),
        ("edges", fbw(edges=with_edge(1, 0, 5))),  # a state of sequence 1 used by an edge of sequence 0
        ("start_end_states", fbw(start_end_states=se_bad)),
        ("start_end_states", fbw(start_end_states=se[:, :2])),
        ("num_states", fbw(num_states=5)),
        ("edges", fbw(edges=edges[:3])),
        ("edges", fbw(edges=edges.float())),
        ("weights", fbw(weights=weights.float()[:-1])),
        ("weights", fbw(weights=weights.long())),
        ("mask", fbw(mask=torch.ones(3, 3, device=DEVICE))),
        ("am_scores", fbw(am_scores=am[0])),
        ("am_seq_len", fv(am_seq_len=[4, 5, 4])),
        ("am_seq_len", fv(am_seq_len=[4, 4])),
        ("mask_idx", fv(mask_idx=0.5)),
        ("mask_idx", fv(mask_idx=True)),
        ("emission_idx", fv(am_scores=am[..., :2])),
        ("logits", fl(logits=x[0])),
        ("input_lengths", fl(input_lengths=[4, 4, 9])),
        ("input_type", fl(input_type="probs")),
        ("reduction", fl(reduction="avg")),
        ("fsa", fl(fsa=edges)),
        ("backend", fl(backend="cuda")),
        ("float64", fl(logits=x.double(), backend="triton")),
        ("targets", lambda: ctc_fsa(torch.tensor([1, 2]), [2], 0)),
        ("target_lengths", lambda: ctc_fsa(torch.tensor([[1, 2]]), [3], 0)),
        ("blank", lambda: ctc_fsa(torch.tensor([[1, 2]]), [2], -1)),
        ("states_per_label", lambda: hmm_fsa(torch.tensor([[1, 2]]), [2], states_per_label=0)),
        ("silence", lambda: hmm_fsa(torch.tensor([[1, 2]]), [2], silence=-2)),
        ("loop_cost", lambda: hmm_fsa(torch.tensor([[1, 2]]), [2], loop_cost="x")),
        ("forward_cost: expected a finite cost or \\+inf",  # (-inf: a dead edge, so no path: loss 0)
         lambda: hmm_fsa(torch.tensor([[1, 2]]), [2], forward_cost=-math.inf)),
        ("skip_cost", lambda: hmm_fsa(torch.tensor([[1, 2]]), [2], skip_cost=math.nan)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_automata_bad_input_names_the_argument(case):
    name, call = _bad_cases()[case]
    with pytest.raises((ValueError, TypeError), match=name):
        call()


def test_automata_strided_class_dim_matches_contiguous(backend):
    """Inputs whose class dim is not unit-stride (a permuted view) give the contiguous input's results."""
    T, B, D = 7, 2, 5
    tg = torch.tensor([[1, 2, 2], [3, 0, 0]])
    tl_ = torch.tensor([3, 1])
    fsa = ctc_fsa(tg, tl_, 0)
    base = torch.randn(D, T, B).to(DEVICE)
    x = base.permute(1, 2, 0)  # (T, B, D) with strides (B, 1, T*B)
    assert x.stride(-1) != 1
    xc = x.contiguous()
    il = torch.tensor([7, 5])
    mask = (torch.arange(T)[:, None] < il[None, :]).float().to(DEVICE)
    il = il.to(DEVICE)
    for f in (lambda a: fast_baum_welch(-a.log_softmax(-1), *fsa[:3], mask, num_states=fsa[3], backend=backend),
              lambda a: fast_viterbi(a, il, *fsa[:3], num_states=fsa[3], backend=backend),
              lambda a: (fsa_loss(a, il, fsa, reduction="none", backend=backend),)):
        for u, v in zip(f(x), f(xc)):
            assert torch.equal(u, v)


@pytest.mark.parametrize("path", ["register", "general"])
def test_fast_baum_welch_tiny_posteriors_exact(backend, path, monkeypatch):
    """fwdbwd = -log gamma stays exact however small gamma is (RETURNN sums the posteriors in log space): one state
    per sequence with self-loops emitting class 0 (cost 0) and class 1 (three edges, costs 0, 1, 2: an emission
    run that crosses the general path's edge chunks when they hold 2 edges); class 1's -log gamma up to 200
    (gamma ~ 1e-87, below float32's range), vs the float64 closed form; class 2 (no edge) 1e32."""
    if backend == "torch" and path == "general":
        pytest.skip("one torch path")
    if path == "general":
        from tri_losses.kernels import automata as K
        monkeypatch.setattr(K, "_blocks", lambda p, D, B, nw: (8, 4, 2))
        monkeypatch.setattr(K, "REG_MAX_STATES", 0)
    c = torch.tensor([[50.0, 95.0, 104.0, 150.0, 200.0], [0.5, 120.0, 88.0, 0.0, 0.0]], dtype=torch.float64)  # (B, T)
    B, T = c.shape
    am = torch.stack([torch.zeros(B, T, dtype=torch.float64), c, torch.full((B, T), 5.0, dtype=torch.float64)], -1)
    edges, weights = [], []
    for b in range(B):
        for em, w in ((0, 0.0), (1, 0.0), (1, 1.0), (1, 2.0)):
            edges.append([b, b, em, b])
            weights.append(w)
    edges = torch.tensor(edges).t().contiguous().to(DEVICE)
    weights = torch.tensor(weights, device=DEVICE)
    se = torch.tensor([[0, 1], [0, 1]], device=DEVICE)
    lens = [5, 3]
    mask = (torch.arange(T)[:, None] < torch.tensor(lens)[None, :]).float().to(DEVICE)
    out, obs = fast_baum_welch(am.transpose(0, 1).float().to(DEVICE), edges, weights, se, mask, backend=backend)
    s1 = math.log(1 + math.exp(-1) + math.exp(-2))  # log of class 1's edge sum at cost 0
    lz = torch.logaddexp(torch.zeros_like(c), -c + s1)  # per frame log Z_t
    exp1 = (c - s1 + lz).t()
    exp0 = lz.t()
    valid = mask.bool().cpu()
    assert torch.all(torch.where(valid, out[..., 2].cpu(), 1e32) == 1e32)
    assert_close(out[..., 1].cpu()[valid].double(), exp1[valid], atol=1e-5, rtol=1e-6)
    assert_close(out[..., 0].cpu()[valid].double(), exp0[valid], atol=1e-5, rtol=1e-6)
    assert torch.all(out.cpu()[~valid] == 1e32)
    logz = torch.where(valid, lz.t(), 0.0).sum(0)  # the path sum: the frames are independent
    assert_close(obs.cpu().double(), torch.where(valid, -logz[None, :], 0.0), atol=1e-4, rtol=1e-6)


def test_fast_baum_welch_returns_float32_for_half_inputs(backend):
    T, B, D = 6, 2, 4
    fsa = ctc_fsa(torch.tensor([[1, 2], [3, 0]]), [2, 1], 0)
    am = -torch.randn(T, B, D).log_softmax(-1).to(DEVICE)
    mask = (torch.arange(T)[:, None] < torch.tensor([6, 4])[None, :]).float().to(DEVICE)
    ref32 = fast_baum_welch(am.half().float(), *fsa[:3], mask, num_states=fsa[3], backend=backend)
    got = fast_baum_welch(am.half(), *fsa[:3], mask, num_states=fsa[3], backend=backend)
    for g, r in zip(got, ref32):
        assert g.dtype == torch.float32
        assert_close(g, r, atol=1e-4, rtol=1e-5)
    assert (got[0][4:, 1] == 1e32).all()  # 1e32 (not inf) on padded frames


def test_automata_empty_batch(backend):
    fsa = ctc_fsa(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, dtype=torch.long), 0)
    x = torch.randn(5, 0, 4).to(DEVICE).requires_grad_(True)
    loss = fsa_loss(x, torch.zeros(0, dtype=torch.long), fsa, reduction="none", backend=backend)
    assert loss.shape == (0,)
    loss.sum().backward()
    fb, obs = fast_baum_welch(x.detach(), *fsa[:3], torch.zeros(5, 0, device=DEVICE), num_states=fsa[3],
                              backend=backend)
    assert fb.shape == (5, 0, 4) and obs.shape == (5, 0)
    al, sc = fast_viterbi(x.detach(), torch.zeros(0, dtype=torch.long), *fsa[:3], num_states=fsa[3], backend=backend)
    assert al.shape == (5, 0) and sc.shape == (0,)


@pytest.mark.parametrize("case", ["no classes", "states without a sequence"])
def test_automata_without_classes_or_sequences(backend, case):
    """Frames with no emission classes (D = 0: no edge can exist; a sequence whose start is its end has the
    empty path), and a batch of none whose automaton still declares states: results, no crash."""
    e0, w0 = torch.zeros(4, 0, dtype=torch.long), torch.zeros(0)
    T, B, D, se = (3, 2, 0, torch.tensor([[0, 2], [1, 2]])) if case == "no classes" else \
        (3, 0, 4, torch.zeros(2, 0, dtype=torch.long))
    x = torch.randn(T, B, D).to(DEVICE)
    il = torch.full((B,), T)
    loss = fsa_loss(x, il, Fsa(e0, w0, se, 3), reduction="none", backend=backend)
    fb, obs = fast_baum_welch(x, e0, w0, se, torch.ones(T, B, device=DEVICE), num_states=3, backend=backend)
    al, sc = fast_viterbi(x, il, e0, w0, se, num_states=3, backend=backend)
    assert loss.shape == (B,) and fb.shape == (T, B, D) and obs.shape == (T, B) and al.shape == (T, B)
    if B:  # sequence 0 has no path (start != end, no edges): loss 0; sequence 1 (start == end) neither, T > 0
        assert loss.tolist() == [0.0, 0.0] and (obs == 0).all() and sc.tolist() == [-math.inf, -math.inf]


def test_fast_viterbi_subtracts_minus_log_edge_costs(backend):
    """RETURNN's FastViterbiOp: weights are -log costs (as fast_baum_welch's): a path scores
    sum(am) - sum(weights), +inf (or NaN) edges are skipped. Raising one of two competing edges' cost
    makes the other emission win."""
    # one sequence, one frame, two edges start -> end emitting 0 and 1
    edges = torch.tensor([[0, 0], [1, 1], [0, 1], [0, 0]])
    se = torch.tensor([[0], [1]])
    am = torch.tensor([[[0.0, 1.0]]]).to(DEVICE)
    for w, exp_em, exp_score in (([0.0, 0.0], 1, 1.0), ([0.0, 2.0], 0, 0.0), ([-2.0, 0.0], 0, 2.0),
                                 ([0.0, math.inf], 0, 0.0), ([0.0, math.nan], 0, 0.0)):
        al, sc = fast_viterbi(am, [1], edges, torch.tensor(w), se, num_states=2, backend=backend)
        assert al.tolist() == [[exp_em]] and sc.item() == pytest.approx(exp_score)


def test_fast_viterbi_edge_costs_change_the_best_path_float64_dp(backend):
    """A float64 Viterbi DP over the edge list with scores am - w: on an HMM automaton whose costs are
    large enough to change the best path (checked: the zero-cost best path differs)."""
    T, B, D = 10, 6, 12
    tg, tl_ = torch.tensor([[1, 2, 3], [2, 1, 0]] * 3), torch.tensor([3, 2] * 3)
    fsa = hmm_fsa(tg, tl_, states_per_label=3, loop_cost=0.2, forward_cost=0.1, skip_cost=3.0)
    am = torch.randn(T, B, D, dtype=torch.float64) * 2
    lens = torch.tensor([10, 7, 9, 6, 10, 8])
    dt = _dt(backend)
    align, score = fast_viterbi(am.to(DEVICE, dt), lens.to(DEVICE), *fsa[:3], num_states=fsa[3], mask_idx=-1,
                                backend=backend)
    changed = False
    for b in range(B):
        sel, ed = _seq_edges(fsa.edges, fsa.weights, b)
        Tb = int(lens[b])
        s0, s1 = int(fsa.start_end_states[0, b]), int(fsa.start_end_states[1, b])
        scores = [[float(am[t, b, fsa.edges[2, e]]) - float(fsa.weights[e]) for e in sel] for t in range(Tb)]
        best, seq = ref.viterbi(scores, ed, s0, s1, Tb)
        assert score[b].item() == pytest.approx(best, **_tol(backend))
        assert align[:Tb, b].tolist() == seq and (align[Tb:, b] == -1).all()
        free = [[float(am[t, b, fsa.edges[2, e]]) if math.isfinite(float(fsa.weights[e])) else -math.inf
                 for e in sel] for t in range(Tb)]
        changed |= ref.viterbi(free, ed, s0, s1, Tb)[1] != seq
    assert changed


def test_nan_edge_weight_is_a_dead_edge_on_both_backends(backend):
    """One rule: a NaN edge cost counts as +inf (a dead edge) in fast_baum_welch, fast_viterbi, fsa_loss."""
    T, B, D = 8, 3, 5
    edges, weights, se = _random_fsa(B, D, seed=7)
    weights = weights.float()
    dead = torch.isinf(weights)
    assert dead.any()
    w_nan = torch.where(dead, math.nan, weights)
    am = (torch.rand(T, B, D) * 3).to(DEVICE)
    mask = torch.ones(T, B).to(DEVICE)
    for u, v in zip(fast_baum_welch(am, edges, w_nan, se, mask, backend=backend),
                    fast_baum_welch(am, edges, weights, se, mask, backend=backend)):
        assert torch.equal(u, v)
    for u, v in zip(fast_viterbi(-am, [8, 6, 7], edges, w_nan, se, backend=backend),
                    fast_viterbi(-am, [8, 6, 7], edges, weights, se, backend=backend)):
        assert torch.equal(u, v)
    x = torch.randn(T, B, D)
    a = _grad(lambda t: fsa_loss(t, [8, 6, 7], (edges, w_nan, se), reduction="none", backend=backend), x)
    b = _grad(lambda t: fsa_loss(t, [8, 6, 7], (edges, weights, se), reduction="none", backend=backend), x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.isfinite(a[1]).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_fsa_loss_nonfinite_logits_on_padded_frames_do_not_reach_the_gradient(backend, bad):
    """Padded frames are never read: NaN/inf there gives the clean input's loss and gradient (also for a
    sequence with no path, whose surrogate gradient is the softmax of its valid frames)."""
    T, B, D = 7, 3, 4
    fsa = ctc_fsa(torch.tensor([[1, 2], [3, 3], [1, 1]]), [2, 2, 2], 0)
    il = [7, 4, 2]  # sequence 2 needs 3 frames: no path
    x = torch.randn(T, B, D)
    xb = x.clone()
    xb[4:, 1] = bad
    xb[2:, 2] = bad
    for kw in (dict(), dict(input_type="log_probs")):
        xx, xxb = (x, xb) if not kw else (x.log_softmax(-1), torch.where(torch.isfinite(xb), x.log_softmax(-1), xb))
        got, g = _grad(lambda t: fsa_loss(t, il, fsa, reduction="none", backend=backend, **kw), xxb)
        exp, ge = _grad(lambda t: fsa_loss(t, il, fsa, reduction="none", backend=backend, **kw), xx)
        assert torch.equal(got, exp) and not torch.isnan(g).any()
        assert_close(g, ge, atol=0, rtol=0)


@pytest.mark.parametrize("label_loop", [True, False], ids=["loop", "rna"])
def test_fast_viterbi_over_ctc_fsa_breaks_ties_as_returnn(backend, label_loop):
    """ctc_fsa orders its edges as RETURNN's CTC automaton does (by source state), so fast_viterbi over it breaks
    exact ties (integer log-probs, all-equal scores) as RETURNN's FastViterbiOp over RETURNN's automaton: the
    reference transcribes both (and ctc_best_path agrees)."""
    from tests.reference import ctc as ref_ctc
    g = torch.Generator().manual_seed(11)
    T, B, D, blank = 6, 5, 4, 0
    tg = torch.randint(1, D, (B, 3), generator=g)
    tg[0, 1] = tg[0, 0]
    tl_ = torch.tensor([3, 2, 1, 0, 2])
    il = [6, 5, 4, 3, 6]
    for lp in (torch.randint(-2, 1, (T, B, D), generator=g).double(), torch.full((T, B, D), -math.log(D),
                                                                                     dtype=torch.float64)):
        fsa = ctc_fsa(tg.to(DEVICE), tl_.to(DEVICE), blank, label_loop=label_loop)
        ali, score = fast_viterbi(lp.float().to(DEVICE), il, *fsa[:3], mask_idx=blank, num_states=fsa.num_states,
                                  backend=backend)
        for b in range(B):
            best, path = ref_ctc.viterbi(lp[:il[b], b], tg[b, :int(tl_[b])].tolist(), blank, label_loop)
            if path is None:
                assert score[b].item() == -math.inf
                continue
            assert ali[:il[b], b].tolist() == path, b
            assert score[b].item() == pytest.approx(best, abs=1e-6)


def test_ctc_fsa_rejects_blank_in_targets_and_pads_dead_edges_in_range(backend):
    with pytest.raises(ValueError, match="targets"):
        ctc_fsa(torch.tensor([[1, 0]]), [2], 0)
    # padding beyond the lengths may hold any value (here 999 >= D): never used as an emission id
    tg = torch.tensor([[1, 2, 999], [2, 999, 999]]).to(DEVICE)
    fsa = ctc_fsa(tg, [2, 1], 0)
    x = torch.randn(6, 2, 4).to(DEVICE)
    got = fsa_loss(x, [6, 5], fsa, reduction="none", backend=backend)
    exp = ctc_loss(x.log_softmax(-1), torch.where(tg == 999, 1, tg), [6, 5], [2, 1], reduction="none")
    assert_close(got, exp, atol=1e-4, rtol=1e-5)


def test_automata_kernel_chunks_smaller_than_states_classes_and_edges(monkeypatch):
    """The general path with blocks smaller than a sequence's states, the classes and its edges: the kernels' chunk loops and
    the emission-run scan's carry across edge chunks (on a GPU: automata with > 1024 edges per sequence)."""
    from tri_losses.kernels import automata as K
    monkeypatch.setattr(K, "_blocks", lambda p, D, B, nw: (8, 4, 4))
    monkeypatch.setattr(K, "REG_MAX_STATES", 0)  # every sequence on the general (CSR) path
    T, B, D = 9, 2, 12  # emissions: label * 2 + k (labels 1..5), silence 0
    tg = torch.tensor([[1, 2, 2, 3], [4, 5, 0, 0]])
    fsa = hmm_fsa(tg, [4, 2], states_per_label=2, loop_cost=0.3, forward_cost=0.9, skip_cost=1.5, silence=0)
    x = torch.randn(T, B, D)
    il = torch.tensor([9, 7])
    mask = (torch.arange(T)[:, None] < il[None, :]).float().to(DEVICE)
    for kw in (dict(), dict(input_type="log_probs")):
        xx = x.log_softmax(-1) if kw else x
        got, g = _grad(lambda t: fsa_loss(t, il, fsa, reduction="none", backend="triton", **kw), xx)
        exp, ge = _grad(lambda t: fsa_loss(t, il, fsa, reduction="none", backend="torch", **kw), xx)
        assert_close(got, exp, atol=1e-4, rtol=1e-5)
        assert_close(g, ge, atol=2e-5, rtol=1e-4)
    am = -x.log_softmax(-1).to(DEVICE)
    a = fast_baum_welch(am, *fsa[:3], mask, num_states=fsa[3], backend="triton")
    e = fast_baum_welch(am, *fsa[:3], mask, num_states=fsa[3], backend="torch")
    for u, v in zip(a, e):
        assert_close(u, v, atol=1e-4, rtol=1e-5)
    # and an independent float64 truth: the direct forward-backward over the edge list
    got, g = _grad(lambda t: fsa_loss(t, il, fsa, reduction="none", backend="triton"), x)
    up = torch.randn(got.shape, generator=torch.Generator().manual_seed(0))  # _grad's upstream
    lp = x.double().log_softmax(-1)
    exp_g = lp.exp()
    for b in range(B):
        Tb = int(il[b])
        sel, ed = _seq_edges(fsa.edges, fsa.weights, b)
        scores = [[float(lp[t, b, fsa.edges[2, e]]) - float(fsa.weights[e]) for e in sel] for t in range(Tb)]
        logz, post = ref.forward_backward(scores, ed, int(fsa.start_end_states[0, b]),
                                          int(fsa.start_end_states[1, b]), Tb)
        assert got[b].item() == pytest.approx(-logz, rel=2e-5)
        for (t, d), p in post.items():
            exp_g[t, b, d] -= p
        exp_g[Tb:, b] = 0
        exp_g[:, b] *= up[b]
        for (t, d), p in post.items():
            assert a[0][t, b, d].item() == pytest.approx(-math.log(p), abs=5e-5, rel=5e-5)
    assert_close(g.double(), exp_g, atol=2e-5, rtol=1e-4)


def test_fast_baum_welch_and_viterbi_torch_compile_fullgraph(backend):
    """Both RETURNN operators go through custom ops: they trace with fullgraph=True."""
    T, B, D = 6, 2, 4
    fsa = ctc_fsa(torch.tensor([[1, 2], [3, 3]]), [2, 2], 0)
    am = -torch.randn(T, B, D).log_softmax(-1).to(DEVICE)
    mask = (torch.arange(T)[:, None] < torch.tensor([6, 5])[None, :]).float().to(DEVICE)

    def f(a):
        fb, obs = fast_baum_welch(a, *fsa[:3], mask, num_states=fsa[3], backend=backend)
        al, sc = fast_viterbi(-a, torch.tensor([6, 5]), *fsa[:3], num_states=fsa[3], backend=backend)
        return fb, obs, al, sc

    torch._dynamo.reset()
    for u, v in zip(torch.compile(f, fullgraph=True)(am), f(am)):
        assert torch.equal(u, v)
    # without num_states the count is read from the edges' values: a graph break under torch.compile (the
    # default compile matches eager; fullgraph=True fails naming the reading helper, where it was a
    # data-dependent-shape error) and, for meta tensors (none to read), a ValueError naming num_states
    # (it was a meta .item())
    torch._dynamo.reset()
    for u, v in zip(torch.compile(lambda a: fast_baum_welch(a, *fsa[:3], mask, backend=backend))(am),
                    fast_baum_welch(am, *fsa[:3], mask, backend=backend)):
        assert torch.equal(u, v)
    g = torch.compile(lambda a: fast_baum_welch(a, *fsa[:3], mask, backend=backend), fullgraph=True)
    with pytest.raises(Exception, match="num_states"):
        g(am)
    meta = [t.to("meta") for t in (am, *fsa[:3], mask)]
    with pytest.raises(ValueError, match="fast_baum_welch: num_states"):
        fast_baum_welch(*meta, backend="torch")
    with pytest.raises(ValueError, match="fast_viterbi: num_states"):
        fast_viterbi(meta[0], torch.tensor([6, 5]).to("meta"), *meta[1:4], backend="torch")
    assert fast_baum_welch(*meta, num_states=fsa[3], backend="torch")[0].device.type == "meta"


def _ref_loss_grad(x, il, fsa, up):
    """float64 (loss (B,), d sum(loss * up) / d logits) from the direct forward-backward over the edge list."""
    edges, weights, se = fsa[:3]
    lp = x.detach().cpu().double().log_softmax(-1)
    loss = torch.zeros(x.shape[1], dtype=torch.float64)
    g = lp.exp()
    for b in range(x.shape[1]):
        Tb = int(il[b])
        sel, ed = _seq_edges(edges, weights, b)
        scores = [[float(lp[t, b, edges[2, e]]) - float(weights[e]) for e in sel] for t in range(Tb)]
        logz, post = ref.forward_backward(scores, ed, int(se[0, b]), int(se[1, b]), Tb)
        loss[b] = -logz if logz > -math.inf else 0.0
        for (t, d), p in post.items():
            g[t, b, d] -= p
        g[Tb:, b] = 0
        g[:, b] *= up[b]
    return loss, g


def _mixed_paths_fsa(D=6):
    """Three sequences: 0 has a state with 9 incoming edges (more than the register path's 2 * 4), 1 has
    40 states (more than its BLOCK_S, the next power of two of the 20 states per sequence on average),
    2 a small automaton with loops, skips and states with 6 edges in / out (overflow columns): sequences 0
    and 1 take the general path, 2 the register path. State ids are randomly permuted."""
    rows = []
    # seq 0: 0 -> 1..9 -> 10 (loop on 10), states 0..10
    rows += [(0, i, i % D, 0, 0.1 * i) for i in range(1, 10)]
    rows += [(i, 10, (i + 2) % D, 0, 0.05 * i) for i in range(1, 10)] + [(10, 10, 1, 0, 0.2)]
    # seq 1: a 40-state chain with loops and skips, states 11..50
    o = 11
    rows += [(o + i, o + i + 1, (3 * i) % D, 1, 0.3) for i in range(39)]
    rows += [(o + i, o + i, (3 * i + 1) % D, 1, 0.1) for i in range(40)]
    rows += [(o + i, o + i + 2, (3 * i + 2) % D, 1, 1.2) for i in range(38)]
    # seq 2: 6 states 51..56, loops, skips, a dead edge
    o = 51
    rows += [(o + i, o + i + 1, i % D, 2, 0.2) for i in range(5)] + [(o + i, o + i, (i + 1) % D, 2, 0.4)
                                                                   for i in range(6)]
    rows += [(o + i, o + i + 2, (i + 3) % D, 2, 0.7) for i in range(4)] + [(o, o + 5, 0, 2, math.inf)]
    # 6 (> 4, the table depth) live edges out of state 51 and into state 56: overflow columns
    rows += [(o, o + 3, 1, 2, 0.9), (o, o + 4, 2, 2, 1.1), (o, o + 5, 4, 2, 1.3), (o + 1, o + 5, 5, 2, 0.6),
             (o + 2, o + 5, 3, 2, 0.8)]
    perm = torch.randperm(57, generator=torch.Generator().manual_seed(1))  # states in no particular order
    edges = torch.tensor([r[:4] for r in rows]).t().contiguous()
    edges[:2] = perm[edges[:2]]
    weights = torch.tensor([r[4] for r in rows])
    se = perm[torch.tensor([[0, 11, 51], [10, 50, 56]])]
    return Fsa(edges, weights, se, 57)


def test_automata_register_and_general_paths_in_one_batch_match_dp(backend):
    """A batch mixing sequences over and under the register path's limits (in-degree 8, BLOCK_S states):
    loss, gradient (random per-sequence upstream), fast_baum_welch and fast_viterbi against float64 DPs."""
    T, D = 30, 6
    fsa = _mixed_paths_fsa(D)
    if backend == "triton":  # both kernel paths run: the tables say which sequences fit
        from tri_losses._backend import kernels
        K = kernels("automata")
        tabs = K.prepare(*(t.to(DEVICE) for t in fsa[:3]), 57, 3, D)
        assert tabs.BS == 32 and tabs.fit.tolist() == [0, 0, 1]
        # sequence 2 uses an overflow column in both directions (a state with 6 > K = 4 live edges)
        assert tabs.K == 4 and (tabs.in_map.view(3, 32)[2] >> 16).max() > 0
        assert (tabs.out_map.view(3, 32)[2] >> 16).max() > 0
    il = torch.tensor([2, 30, 17])
    x = torch.randn(T, 3, D, dtype=_dt(backend)) * 2
    up = torch.randn(3, generator=torch.Generator().manual_seed(0)).double()  # _grad's upstream
    loss, g = _grad(lambda t: fsa_loss(t, il, fsa, reduction="none", backend=backend), x)
    exp_loss, exp_g = _ref_loss_grad(x, il, fsa, up)
    tol = 1e-9 if backend == "torch" else 3e-5
    assert (exp_loss > 0).all()
    assert_close(loss.double(), exp_loss, atol=tol, rtol=tol)
    assert_close(g.double(), exp_g, atol=tol, rtol=tol)
    am = -x.log_softmax(-1)
    mask = (torch.arange(T)[:, None] < il[None, :]).float()
    fb, obs = fast_baum_welch(am.to(DEVICE), *fsa[:3], mask.to(DEVICE), num_states=57, backend=backend)
    assert_close(obs[0].double(), exp_loss, atol=tol, rtol=tol)
    fb = fb.cpu()
    post = torch.where(fb < 1e30, torch.exp(-fb.double()), 0.0)
    gam = (x.double().softmax(-1) - exp_g / up[None, :, None]) * mask[..., None]
    assert_close(post, gam, atol=tol, rtol=tol)
    align, score = fast_viterbi(-am.to(DEVICE), il.to(DEVICE), *fsa[:3], num_states=57, mask_idx=-1,
                                backend=backend)
    for b in range(3):
        Tb = int(il[b])
        sel, ed = _seq_edges(fsa.edges, fsa.weights, b)
        scores = [[-float(am[t, b, fsa.edges[2, e]]) - float(fsa.weights[e]) for e in sel] for t in range(Tb)]
        best, seq = ref.viterbi(scores, ed, int(fsa.start_end_states[0, b]), int(fsa.start_end_states[1, b]), Tb)
        assert score[b].item() == pytest.approx(best, rel=tol, abs=tol)
        assert align[:Tb, b].tolist() == seq and (align[Tb:, b] == -1).all()


def test_fsa_loss_backward_reuses_the_forward_tables(monkeypatch):
    """The Triton path builds its edge tables and the row log-sum-exps once, in the forward; the backward
    reads them from the forward (saved by autograd) instead of rebuilding them. (The torch backend has no
    tables.)"""
    from tri_losses._backend import kernels
    K = kernels("automata")
    calls = {"prepare": 0, "emissions": 0}
    for name in calls:
        def counted(*a, _f=getattr(K, name), _n=name, **kw):
            calls[_n] += 1
            return _f(*a, **kw)
        monkeypatch.setattr(K, name, counted)
    x = torch.randn(7, 2, 5).to(DEVICE).requires_grad_(True)
    fsa = ctc_fsa(torch.tensor([[1, 2], [3, 0]]), [2, 1], 0)
    loss = fsa_loss(x, [7, 5], fsa, backend="triton")
    assert calls == {"prepare": 1, "emissions": 1}
    loss.backward()
    assert calls == {"prepare": 1, "emissions": 1}
    exp = ctc_loss(x.detach().cpu().double().log_softmax(-1), torch.tensor([[1, 2], [3, 0]]), [7, 5], [2, 1],
                   reduction="sum")
    assert loss.item() == pytest.approx(exp.item(), rel=1e-5)


@pytest.mark.parametrize("S", [1, 12], ids=["S1", "S12"])
def test_fsa_loss_over_ctc_fsa_matches_f_ctc_loss_bf16_and_fp32(backend, S):
    """ctc_fsa through fsa_loss vs PyTorch's CTC in float64 (random per-sequence upstream), fp32 and bf16
    logits (bf16: the gradient is the fp32 one rounded once)."""
    T, B, C = 30, 4, 9
    g = torch.Generator().manual_seed(S)
    tg = torch.randint(1, C, (B, S), generator=g)
    tl_ = torch.tensor([S, max(S - 1, 0), S // 2, 0])
    il = torch.tensor([30, 28, 20, 3])
    fsa = ctc_fsa(tg.to(DEVICE), tl_.to(DEVICE), 0)  # built on the device
    x = torch.randn(T, B, C, generator=g)
    up = torch.randn(B, generator=torch.Generator().manual_seed(0))
    xd = x.double().requires_grad_(True)
    truth = F.ctc_loss(xd.log_softmax(-1), tg, il, tl_, reduction="none", zero_infinity=True)
    (gt,) = torch.autograd.grad(truth, xd, up.double())
    for dt, tol in ((torch.float32, 3e-5), (torch.bfloat16, 1e-2)):
        got, gg = _grad(lambda t: fsa_loss(t, il.to(DEVICE), fsa, reduction="none", backend=backend), x.to(dt))
        assert gg.dtype == dt
        xr = x.to(dt).double()
        if dt == torch.bfloat16:  # the truth on the rounded input
            xr.requires_grad_(True)
            truth = F.ctc_loss(xr.log_softmax(-1), tg, il, tl_, reduction="none", zero_infinity=True)
            (gt,) = torch.autograd.grad(truth, xr, up.double())
        assert_close(got.double(), truth.detach(), atol=tol, rtol=tol)
        assert_close(gg.double(), gt, atol=tol, rtol=tol)


def test_automaton_without_edges_has_no_path(backend):
    """No edges: no sequence with frames has a path (loss 0, gradient softmax on its valid frames,
    fwdbwd 1e32, obs 0); a sequence without frames whose start is its end has log Z = 0."""
    T, B, D = 4, 3, 5
    fsa = Fsa(torch.zeros(4, 0, dtype=torch.long), torch.zeros(0), torch.tensor([[0, 1, 3], [0, 2, 3]]), 4)
    il = torch.tensor([4, 2, 0])
    x = torch.randn(T, B, D)
    loss, g = _grad(lambda t: fsa_loss(t, il, fsa, reduction="none", backend=backend), x)
    up = torch.randn(B, generator=torch.Generator().manual_seed(0))
    valid = (torch.arange(T)[:, None] < il[None, :])[..., None]
    assert loss.tolist() == [0.0, 0.0, 0.0]
    assert_close(g, torch.where(valid, x.softmax(-1) * up[None, :, None], 0.0))
    fb, obs = fast_baum_welch(-x.log_softmax(-1).to(DEVICE), *fsa[:3], valid[..., 0].float().to(DEVICE), num_states=4,
                              backend=backend)
    assert (fb == 1e32).all() and (obs == 0).all()
    al, sc = fast_viterbi(x.to(DEVICE), il.to(DEVICE), *fsa[:3], num_states=4, mask_idx=-1, backend=backend)
    assert (al == -1).all() and sc[:2].tolist() == [-math.inf, -math.inf] and sc[2].item() == 0.0


def test_automata_without_frames_and_with_one_frame(backend):
    """T = 0 (no frames: log Z = 0 where the start state is the end state, else no path) and T = 1, each with a
    sequence of length 0 too, by hand: loss, gradient, fast_baum_welch and fast_viterbi (the Triton alpha
    kernel forms log Z and the loss itself, T = 0 included)."""
    # seq 0: 0 -(emits 1, cost 0.5)-> 1; seq 1: start = end = 2, an edge 2 -> 3 it never needs
    fsa = Fsa(torch.tensor([[0, 2], [1, 3], [1, 2], [0, 1]]), torch.tensor([0.5, 0.25]), torch.tensor([[0, 2], [1, 2]]),
              4)
    for T, il in ((0, [0, 0]), (1, [1, 1]), (1, [1, 0])):
        x = torch.randn(T, 2, 3)
        loss, g = _grad(lambda t: fsa_loss(t, il, fsa, reduction="none", backend=backend), x)
        up = torch.randn(2, generator=torch.Generator().manual_seed(0))  # _grad's upstream
        lp = x.double().log_softmax(-1)
        exp_loss = [0.0, 0.0]  # seq 0 without frames has no path; seq 1 has log Z 0 without frames, no path with
        exp_g = torch.where((torch.arange(T)[:, None] < torch.tensor(il)[None, :])[..., None], lp.exp(), 0.0)
        if il[0] == 1:
            exp_loss[0] = 0.5 - float(lp[0, 0, 1])
            exp_g[0, 0, 1] -= 1.0
        assert loss.tolist() == pytest.approx(exp_loss, abs=1e-6)
        assert_close(g, exp_g * up[None, :, None], atol=2e-6, rtol=1e-5)
        mask = (torch.arange(T)[:, None] < torch.tensor(il)[None, :]).float()
        fb, obs = fast_baum_welch(-x.to(DEVICE), *fsa[:3], mask.to(DEVICE), num_states=4, backend=backend)
        exp_fb = torch.full((T, 2, 3), 1e32)
        exp_obs = torch.zeros(T, 2)
        if il[0] == 1:
            exp_fb[0, 0, 1] = 0.0  # -log 1
            exp_obs[0, 0] = 0.5 - float(x[0, 0, 1])  # am = -x: the path scores x - 0.5
        assert_close(fb, exp_fb, atol=1e-6, rtol=1e-6)
        assert_close(obs, exp_obs, atol=1e-6, rtol=1e-6)
        al, sc = fast_viterbi(x.to(DEVICE), il, *fsa[:3], num_states=4, mask_idx=-1, backend=backend)
        assert al.tolist() == ([[1, -1]] if il[0] == 1 else [[-1, -1]] * T)
        exp_sc = [float(x[0, 0, 1]) - 0.5 if il[0] == 1 else -math.inf, 0.0 if il[1] == 0 else -math.inf]
        assert sc.tolist() == pytest.approx(exp_sc, abs=1e-6)


class _DeviceReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that read a device (non-CPU) tensor's values on the host, and the CPU -> device copies
    made without ``non_blocking`` (a host sync on CUDA). On a machine without a GPU nothing is recorded."""

    READS = ("_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal")

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        out = func(*args, **kwargs)
        if name in self.READS and any(t.device.type != "cpu" for t in tensors):
            self.found.append(name)
        if name == "_to_copy" and args[0].device.type == "cpu" and out.device.type != "cpu" \
                and not kwargs.get("non_blocking", False):
            self.found.append("blocking copy to the device")
        return out


def test_automaton_built_on_the_cpu_runs_on_the_emissions_device(backend):
    """The builders make the automaton on their targets' device; the ops take one built on the CPU with
    emissions on another device (checked on the CPU and copied without a host sync: no device value read on
    the host, no blocking copy, around the custom ops; their bodies: the op-count test) and give the same
    results, on the emissions' device, as the automaton built there."""
    T, B, C = 9, 3, 12  # the HMM's emissions: label * 2 + k
    tg, tl_ = torch.tensor([[1, 2, 2], [3, 4, 0], [5, 0, 0]]), torch.tensor([3, 2, 1])
    il = torch.tensor([9, 7, 5]).to(DEVICE)
    x = torch.randn(T, B, C).to(DEVICE)
    mask = (torch.arange(T)[:, None] < torch.tensor([9, 7, 5])[None, :]).float().to(DEVICE)
    for build in (lambda t, n: ctc_fsa(t, n, 0), lambda t, n: hmm_fsa(t, n, states_per_label=2, silence=0)):
        on_cpu, on_dev = build(tg, tl_), build(tg.to(DEVICE), tl_.to(DEVICE))
        assert on_cpu.edges.device.type == "cpu" and on_dev.edges.device == DEVICE
        outs = []
        for fsa in (on_cpu, on_dev) if DEVICE.type != "cpu" else (on_cpu,):  # (on the CPU: the same automaton)
            xr = x.clone().requires_grad_(True)
            reads = _DeviceReads()
            with reads:
                loss = fsa_loss(xr, il, fsa, reduction="none", backend=backend)
                (g,) = torch.autograd.grad(loss, xr, torch.ones_like(loss))
                fb, obs = fast_baum_welch(-x.log_softmax(-1), *fsa[:3], mask, num_states=fsa[3], backend=backend)
                al, sc = fast_viterbi(x, il, *fsa[:3], num_states=fsa[3], backend=backend)
            assert reads.found == [], reads.found
            outs.append((loss, g, fb, obs, al, sc))
        for u, v in zip(outs[0], outs[-1]):
            assert u.device == DEVICE and torch.equal(u, v)


def test_automata_validate_checks_a_device_automaton(backend):
    """``validate=True`` checks the ids of an automaton on the device too (a host sync, asked for); without
    it a device automaton is not read (on the CPU, always checked)."""
    tg, tl_ = torch.tensor([[1, 2], [3, 0]]).to(DEVICE), torch.tensor([2, 1]).to(DEVICE)
    edges, weights, se, n = ctc_fsa(tg, tl_, 0)
    x = torch.randn(5, 2, 4).to(DEVICE)
    bad = edges.clone()
    bad[2, 0] = 7  # an emission id >= D
    for kw in (dict(fsa=(bad, weights, se, n)), dict(fsa=(edges, weights, se.flip(1), n))):
        with pytest.raises(ValueError, match="emission_idx|start_end_states"):
            fsa_loss(x, [5, 4], validate=True, backend=backend, **kw)
    assert torch.isfinite(fsa_loss(x, [5, 4], (edges, weights, se, n), validate=True, backend=backend))


class _CopyKinds(torch.utils._python_dispatch.TorchDispatchMode):
    """Records (destination device type, non_blocking) of every copy made under it."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.overloadpacket.__name__ == "_to_copy":
            self.copies.append((out.device.type, bool(kwargs.get("non_blocking", False))))
        return out


def test_copies_to_the_cpu_block_and_copies_to_a_device_do_not():
    """The one helper the ops move automata, masks and lengths with: a copy to the CPU must block (the host
    reads it next; a non-blocking device -> CPU copy lands in pinned memory after the host has read it), a
    copy to another device is queued. ``meta`` stands in for an accelerator on a machine without one."""
    from tri_losses import _validate
    t = torch.arange(4, dtype=torch.int32)
    with _CopyKinds() as rec:
        a = _validate.to_device(t, torch.device("cpu"), torch.int64)
        b = _validate.to_device(t, "meta")
        _validate.as_lengths(t, "lengths", "op", 4, torch.device("cpu"))
    assert rec.copies == [("cpu", False), ("meta", True), ("cpu", False)]
    assert a.tolist() == [0, 1, 2, 3] and b.device.type == "meta"


@pytest.mark.gpu
def test_device_automaton_with_cpu_emissions(backend):
    """An automaton, mask and lengths on the GPU with emissions on the CPU: moved to the CPU (blocking) and
    checked there, giving the results of the all-CPU call; bad ids raise there without ``validate``."""
    T, B, C = 9, 3, 12
    tg, tl_ = torch.tensor([[1, 2, 2], [3, 4, 0], [5, 0, 0]]), torch.tensor([3, 2, 1])
    il = torch.tensor([9, 7, 5])
    x = torch.randn(T, B, C)
    mask = (torch.arange(T)[:, None] < il[None, :]).float()
    outs = []
    for dev in ("cpu", "cuda"):
        fsa = ctc_fsa(tg.to(dev), tl_.to(dev), 0)
        assert fsa.edges.device.type == dev
        xr = x.clone().requires_grad_(True)
        loss = fsa_loss(xr, il.to(dev), fsa, reduction="none", backend=backend)
        (g,) = torch.autograd.grad(loss, xr, torch.ones_like(loss))
        fb, obs = fast_baum_welch(-x.log_softmax(-1), *fsa[:3], mask.to(dev), num_states=fsa[3], backend=backend)
        al, sc = fast_viterbi(x, il.to(dev), *fsa[:3], num_states=fsa[3], backend=backend)
        outs.append((loss, g, fb, obs, al, sc))
    for u, v in zip(*outs):
        assert u.device.type == "cpu" and torch.equal(u, v)
    edges, weights, se, n = ctc_fsa(tg.cuda(), tl_.cuda(), 0)
    bad = edges.clone()
    bad[2, 0] = C + 5  # an emission id >= D
    with pytest.raises(ValueError, match="emission_idx"):
        fsa_loss(x, il, (bad, weights, se, n), backend=backend)


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the torch ops (every aten call, views included) and the Triton launches made under it; the
    ops Triton's interpreter makes inside a launch are not counted (on a GPU a launch is one kernel)."""

    SYNCS = ("_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal")  # ops that read device values

    def __init__(self):
        super().__init__()
        self.ops = self.launches = 0
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func.overloadpacket.__name__ in self.SYNCS:
            self.syncs.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def op_counter(monkeypatch):
    from tri_losses.kernels import automata as K
    from torch.utils._python_dispatch import _disable_current_modes
    cls = type(K._fsa_emit_kernel)
    run = cls.run
    current = []

    def counted_run(self, *a, **kw):
        if current:
            current[-1].launches += 1
        with _disable_current_modes():
            return run(self, *a, **kw)

    monkeypatch.setattr(cls, "run", counted_run)

    def count(fn):
        c = _OpCounter()
        current.append(c)
        try:
            with c:
                out = fn()
        finally:
            current.pop()
        return out, (c.ops, c.launches, c.syncs)

    return count


def test_fsa_loss_over_ctc_fsa_op_count_is_small_and_independent_of_batch_and_length(op_counter):
    """Building a CTC (or HMM) automaton, the Triton forward (edge tables and recursion), its backward and
    fast_baum_welch each make a fixed, small number of torch ops and kernel launches whatever B and S (no
    Python loop over sequences, states or edges): on a GPU every op costs launch latency. The bounds leave
    some headroom over the counts when this was written (ctc_fsa 52 ops, 12 of them the CPU-only input
    checks; hmm_fsa 49 ops; forward 62 ops and 3 launches: the tables, the emission pre-pass and one alpha
    launch, which also writes log Z and the loss; backward 7 ops and 2 launches; fast_baum_welch 65 ops and 5
    launches; before: forward 66 ops and 4 launches with 4 torch kernels after the last launch, backward 3
    launches, fast_baum_welch 79 ops and 7 launches, the general path's kernels launched beside the register
    path's; earlier still 118, 457, 30 and 179 ops). The forward and backward read no device value on the
    host."""
    import tri_losses.automata as A
    seen = {}
    for B, S in ((2, 3), (3, 6)):
        g = torch.Generator().manual_seed(B)
        T, C = 2 * S + 4, 7
        tg = torch.randint(1, C, (B, S), generator=g)
        tl_ = torch.randint(1, S + 1, (B,), generator=g)
        il = torch.full((B,), T)
        x = torch.randn(T, B, C, generator=g)
        up = torch.randn(B, generator=g)
        tg_d, tl_d, il_d, x_d, up_d = (t.to(DEVICE) for t in (tg, tl_, il, x, up))
        ctc_fsa(tg_d, tl_d, 0)  # the per-S edge template is built on a first call, then cached
        fsa, n_fsa = op_counter(lambda: ctc_fsa(tg_d, tl_d, 0))
        e, w, se, n = A._check_fsa(fsa.edges, fsa.weights, fsa.start_end_states, B, C, "fsa_loss", fsa.num_states)
        fwd, n_fwd = op_counter(lambda: A._triton_loss_forward(x_d, il_d, e, w, se, n, True, False))
        loss, logz, alpha, lse, emb, itab, ftab = fwd
        grad, n_bwd = op_counter(lambda: A._triton_loss_grad(up_d, x_d, il_d, e, True, alpha, logz, lse, emb, itab,
                                                             ftab))
        am = -x_d.log_softmax(-1)
        (fb, obs), n_fbw = op_counter(lambda: A._triton_baum_welch(am, il_d, e, w, se, n))
        xd = x.double().requires_grad_(True)
        exp = F.ctc_loss(xd.log_softmax(-1), tg, il, tl_, reduction="none")
        (exp_g,) = torch.autograd.grad(exp, xd, up.double())
        assert_close(loss.double(), exp.detach(), atol=1e-4, rtol=1e-5)  # the counted calls did the work
        assert_close(logz.double(), -exp.detach(), atol=1e-4, rtol=1e-5)
        assert_close(grad.double(), exp_g, atol=1e-4, rtol=1e-5)
        assert_close(obs.double(), exp.detach()[None, :].expand(T, B), atol=1e-4, rtol=1e-5)
        assert_close(torch.exp(-fb.double()).sum(-1), torch.ones(T, B), atol=1e-4, rtol=1e-5)
        kw = dict(states_per_label=3, loop_cost=0.2, forward_cost=0.1, skip_cost=3.0, silence=0)
        hmm_fsa(tg_d, tl_d, **kw)
        _, n_hmm = op_counter(lambda: hmm_fsa(tg_d, tl_d, **kw))
        seen[B, S] = (n_fsa, n_fwd, n_bwd, n_fbw, n_hmm)
    a, b = seen.values()
    assert a == b, seen
    ((fsa_ops, _, _), (fwd_ops, fwd_launches, fwd_syncs), (bwd_ops, bwd_launches, bwd_syncs),
     (fbw_ops, fbw_launches, fbw_syncs), (hmm_ops, _, _)) = a
    assert fwd_syncs == bwd_syncs == fbw_syncs == [], a  # no host sync (ctc_fsa's come from checking CPU inputs only)
    assert fsa_ops <= 80 and fwd_ops <= 80 and fwd_launches <= 3 and bwd_ops <= 10 and bwd_launches <= 2, a
    assert fbw_ops <= 85 and fbw_launches <= 5 and hmm_ops <= 75, a


@pytest.mark.parametrize("general", [False, True], ids=["register", "general"])
def test_nan_input_makes_that_sequence_nan(backend, general, monkeypatch):
    """A NaN score on a valid frame of one sequence: its fsa_loss (full sum and max_approx) and its gradient on
    every valid frame, its fast_viterbi score, and fast_baum_welch's obs scores and fwdbwd on its valid frames
    are NaN (as PyTorch propagates NaN; not the "no path" answer) on both backends, and on each Triton path
    (the Viterbi max must not drop the NaN); the other sequence's results and gradients equal those of the
    clean input."""
    if general:
        if backend != "triton":
            pytest.skip("the Triton backend's general path")
        from tri_losses.kernels import automata as K
        monkeypatch.setattr(K, "REG_MAX_STATES", 0)
    tg, tl = torch.tensor([[1, 2], [3, 0]], device=DEVICE), torch.tensor([2, 1], device=DEVICE)
    fsa = ctc_fsa(tg, tl, 0)
    x = torch.randn(5, 2, 4, device=DEVICE)
    bad = x.clone()
    bad[1, 0, 1] = math.nan
    for max_approx in (False, True):
        for input_type in ("logits", "log_probs"):
            kw = dict(max_approx=max_approx, input_type=input_type, reduction="none", backend=backend)
            got, g = _grad(lambda t: fsa_loss(t, [5, 4], fsa, **kw), bad)
            exp, ge = _grad(lambda t: fsa_loss(t, [5, 4], fsa, **kw), x)
            assert torch.isnan(got[0]) and got[1] == exp[1]
            assert torch.isnan(g[:, 0]).all(), (max_approx, input_type)
            assert torch.equal(g[:, 1], ge[:, 1])
    am = -bad.log_softmax(-1)
    mask = (torch.arange(5, device=DEVICE)[:, None] < torch.tensor([5, 4], device=DEVICE)[None]).float()
    _, score = fast_viterbi(-am, [5, 4], *fsa[:3], backend=backend)
    assert torch.isnan(score[0]) and torch.isfinite(score[1])
    fb, obs = fast_baum_welch(am, *fsa[:3], mask, backend=backend)
    fb_c, obs_c = fast_baum_welch(-x.log_softmax(-1), *fsa[:3], mask, backend=backend)
    assert torch.equal(fb[:, 1], fb_c[:, 1]) and torch.equal(obs[:, 1], obs_c[:, 1])
    assert torch.isnan(obs[:, 0]).all() and torch.isnan(fb[:, 0]).all()
    bad_end = -x.log_softmax(-1)  # a NaN past sequence 1's end (frame 4) is never read
    bad_end[4, 1, 2] = math.nan
    fb_e, obs_e = fast_baum_welch(bad_end, *fsa[:3], mask, backend=backend)
    assert torch.equal(fb_e, fb_c) and torch.equal(obs_e, obs_c)


def test_fsa_loss_refuses_edge_weights_that_require_grad():
    """The edge weights are not differentiable (as in RETURNN): weights that require grad raise instead of
    silently getting no gradient; detached (or under no_grad) they are fine."""
    edges, weights, se, _ = ctc_fsa(torch.tensor([[1, 2]], device=DEVICE), torch.tensor([2], device=DEVICE), 0)
    x = torch.randn(5, 1, 4, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match="weights"):
        fsa_loss(x, [5], (edges, weights.clone().requires_grad_(True), se))
    want = fsa_loss(x, [5], (edges, weights, se))
    with torch.no_grad():
        got = fsa_loss(x, [5], (edges, weights.clone().requires_grad_(True), se))
    assert_close(got, want.detach())


def test_builders_default_to_one_state_per_label_and_take_backend():
    """hmm_fsa's default is one state per label emitting the label's id (its full-sum over a 1-state chain
    equals a left-to-right DP over the labels), and both builders take backend= as every public function:
    "auto"/"torch" build the same automaton, "triton" raises (no kernel)."""
    tg, tl = torch.tensor([[2, 1]]), torch.tensor([2])
    one = hmm_fsa(tg, tl)
    assert torch.equal(one.edges, hmm_fsa(tg, tl, states_per_label=1).edges)
    assert set(one.edges[2][torch.isfinite(one.weights)].tolist()) == {1, 2}  # live edges emit the label ids
    x = torch.randn(5, 1, 4, dtype=torch.float64)
    got = fsa_loss(x, [5], one, backend="torch")
    lp = x[:, 0].log_softmax(-1)
    # paths: label 2 for frames [0, k), label 1 for frames [k, 5), k = 1..4 (self-loops and forward edges cost 0)
    exp = -torch.logsumexp(torch.stack([lp[:k, 2].sum() + lp[k:, 1].sum() for k in range(1, 5)]), 0)
    assert_close(got, exp, dtype=torch.float64)
    for build in (lambda b: hmm_fsa(tg, tl, backend=b), lambda b: ctc_fsa(tg, tl, 0, backend=b)):
        assert all(torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v
                   for u, v in zip(build("auto"), build("torch")))
        with pytest.raises(RuntimeError, match="backend"):
            build("triton")


def test_minus_inf_edge_cost_is_a_dead_edge_as_returnn(backend):
    """RETURNN's native ops skip an edge whose cost is infinite of either sign; a -inf cost was kept live,
    so a path through a parallel -inf edge gave "no path" (obs 0, fwdbwd 1e32), a NaN Viterbi score and a
    NaN fsa_loss, and a -inf edge into a dead end lost the posteriors. Reference: the float64 sum along the
    only path (the edge dead), and the same automaton without that edge."""
    g = torch.Generator().manual_seed(0)
    am = torch.rand(3, 1, 2, generator=g).to(DEVICE)  # -log space emission costs
    E = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 2], [0, 1, 1, 0], [0, 0, 0, 0]], device=DEVICE)  # e3: 1 -> 2 dead end
    se = torch.tensor([[0], [1]], device=DEVICE)
    mask = torch.ones(3, 1, device=DEVICE)
    path = 0.5 + am[0, 0, 0].double() + 0.2 + am[1, 0, 1].double() + 0.2 + am[2, 0, 1].double()
    fb_ref, obs_ref = fast_baum_welch(am, E[:, [0, 2]], torch.tensor([0.5, 0.2], device=DEVICE), se, mask,
                                      num_states=3, backend=backend)
    for w1, w3 in ((-math.inf, math.inf), (math.inf, -math.inf), (-math.inf, -math.inf), (math.nan, -math.inf)):
        W = torch.tensor([0.5, w1, 0.2, w3], device=DEVICE)
        fb, obs = fast_baum_welch(am, E, W, se, mask, backend=backend)
        assert_close(obs[:, 0].double(), path.expand(3), atol=1e-5, rtol=1e-6)
        assert torch.equal(fb, fb_ref) and torch.equal(obs, obs_ref)
        al, sc = fast_viterbi(-am, [3], E, W, se, backend=backend)
        assert al[:, 0].tolist() == [0, 1, 1] and sc.item() == pytest.approx(-float(path), abs=1e-5)
        loss = fsa_loss(-am, [3], (E, W, se), input_type="log_probs", backend=backend)
        assert loss.item() == pytest.approx(float(path), abs=1e-5)
    assert torch.isinf(W).any()  # the caller's weights are untouched


def test_start_end_state_shared_by_two_sequences_is_refused(backend):
    """A start/end state that no edge touches could serve two sequences: the Triton backend then read another
    sequence's (uninitialised) alpha and a sequence without a path scored 0; refused as edges' states are."""
    am = torch.rand(2, 2, 3, device=DEVICE)
    E = torch.tensor([[1], [2], [0], [0]], device=DEVICE)  # sequence 0: 1 -> 2; sequence 1: no edges
    for se in (torch.tensor([[0, 0], [0, 0]]), torch.tensor([[1, 9], [9, 9]])):
        for call in (lambda: fast_baum_welch(am, E, torch.zeros(1, device=DEVICE), se.to(DEVICE), torch.ones(2, 2, device=DEVICE),
                                             backend=backend),
                     lambda: fast_viterbi(-am, [2, 0], E, torch.zeros(1, device=DEVICE), se.to(DEVICE), backend=backend)):
            with pytest.raises(ValueError, match="start_end_states: state [09] is a start/end state of sequences"):
                call()


def test_templates_are_not_cached_while_a_cuda_graph_is_captured(monkeypatch):
    """The CTC/HMM automaton templates are cached per shape and device, except while a CUDA graph is captured:
    tensors built then live in the graph's pool and are written only when it replays, so a cached one would
    hand later eager calls unwritten memory (the capture is simulated: no GPU needed)."""
    from tri_losses import automata as A
    targets, lengths = torch.randint(1, 5, (1, 37)), [37]  # a target length no other test uses
    monkeypatch.setattr(A, "_capturing", lambda device: True)
    n = A._ctc_template.cache_info().currsize
    fsa = A.ctc_fsa(targets, lengths, 0)
    assert A._ctc_template.cache_info().currsize == n
    monkeypatch.undo()
    again = A.ctc_fsa(targets, lengths, 0)
    assert A._ctc_template.cache_info().currsize == n + 1
    for a, b in zip(fsa[:3], again[:3]):
        assert torch.equal(a, b)


def test_ctc_fsa_empty_target_without_frames(backend):
    """ctc_fsa's documented exception: an empty target over zero frames has CTC's one empty path (ctc_loss 0,
    ctc_best_path score 0) but no path in the automaton, whose final state is entered only by an edge that
    takes a frame: fsa_loss gives 0 either way (a no-path sequence's loss), fast_viterbi -inf; a frame more and
    the automaton equals CTC again."""
    targets, tl_ = torch.tensor([[1]]), torch.tensor([0])
    fsa = ctc_fsa(targets, tl_, blank=0)
    for T in (0, 1):
        x = torch.randn(max(T, 1), 1, 3)[:T]
        il = torch.tensor([T])
        lp = x.log_softmax(-1)
        # CTC without frames: one empty path, log Z = 0 (F.ctc_loss refuses T = 0)
        want = torch.zeros(1) if T == 0 else F.ctc_loss(lp, targets, il, tl_, reduction="none")
        got = fsa_loss(x.to(DEVICE), il, fsa, reduction="none", backend=backend)
        assert_close(got, want, atol=1e-6, rtol=1e-6)
        _, score = fast_viterbi(x.to(DEVICE), il, *fsa[:3], num_states=fsa.num_states, backend=backend)
        assert score.tolist() == ([-math.inf] if T == 0 else pytest.approx([float(x[0, 0, 0])], abs=1e-6))  # raw scores


@pytest.mark.parametrize("mode", ["fake", "symbolic"])
def test_ctc_fsa_and_hmm_fsa_trace_with_make_fx(mode):
    """ctc_fsa read its targets' values for the blank check under FakeTensorMode (a data-dependent error) and
    cached its template by a symbolic S (unhashable SymInt) under make_fx: both trace now, and the traced graph
    builds the same automaton as the eager call (whose edges are checked against ctc_loss elsewhere)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    tg, tl = torch.tensor([[1, 2, 2], [3, 0, 0]]), torch.tensor([3, 1])
    for build in (lambda a, b: tuple(ctc_fsa(a, b, 0))[:3], lambda a, b: tuple(ctc_fsa(a, b, 4, label_loop=False))[:3],
                  lambda a, b: tuple(hmm_fsa(a, b, states_per_label=2))[:3]):
        eager = build(tg, tl)
        traced = make_fx(build, tracing_mode=mode)(tg, tl)(tg, tl)
        assert all(torch.equal(a, b) for a, b in zip(traced, eager))
    with FakeTensorMode() as fm:
        out = tuple(ctc_fsa(fm.from_tensor(tg), fm.from_tensor(tl), 0))[:3]
    assert [tuple(t.shape) for t in out] == [tuple(t.shape) for t in tuple(ctc_fsa(tg, tl, 0))[:3]]


def test_fsa_loss_and_ctc_list_lengths_compile_one_dynamic_graph():
    """Under torch.compile(dynamic=True) an automaton built in the graph (num_states = B (2S + 3), a symbolic size)
    keeps one graph for every batch size: its state count was read with operator.index, which pinned it, so each
    new B recompiled until fullgraph=True hit the recompile limit (at the 9th). ctc_loss with lengths given as
    Python lists likewise recompiled per distinct list; now the second call's graph is dynamic. Values and
    gradients vs eager."""
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    f = torch.compile(lambda x, tg, il, tl: fsa_loss(x, il, ctc_fsa(tg, tl, 0)), fullgraph=True, dynamic=True,
                      backend=count)
    for B in range(3, 12):  # 9 sizes, one past the recompile limit (from 3: a first B equal to another size would be pinned by duck sizing)
        x = torch.randn(7, B, 5).requires_grad_(True)
        tg, il, tl = torch.randint(1, 5, (B, 2)), torch.full((B,), 7), torch.full((B,), 2)
        got = f(x, tg, il, tl)
        (g,) = torch.autograd.grad(got, x)
        xe = x.detach().requires_grad_(True)
        exp = fsa_loss(xe, il, ctc_fsa(tg, tl, 0))
        (e,) = torch.autograd.grad(exp, xe)
        assert_close(got, exp)
        assert_close(g, e)
    assert len(graphs) == 1
    graphs.clear()
    torch._dynamo.reset()
    c = torch.compile(lambda x, tg, il, tl: ctc_loss(x, tg, il, tl, input_type="log_probs"), fullgraph=True,
                      backend=count)
    for k in range(9):
        x = torch.randn(12, 3, 6).log_softmax(-1)
        tg, il, tl = torch.randint(1, 6, (3, 2)), [12, 11 - k, 9], [2, 1, 2]
        assert_close(c(x, tg, il, tl), ctc_loss(x, tg, il, tl, input_type="log_probs"))
    assert len(graphs) <= 2
