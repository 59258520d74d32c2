"""CTC on both backends vs F.ctc_loss and float64 references (path enumeration, alpha DP)."""
import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import DEVICE, assert_close
from tests.reference import ctc as ref
from tri_losses.ctc import CTCLoss, ctc_best_path, ctc_greedy_decode, ctc_loss, ctc_posteriors


def _batch(T=16, B=4, C=7, S=5, blank=0):
    x = torch.randn(T, B, C, device=DEVICE) * 2
    labels = [c for c in range(C) if c != blank]
    tg = torch.tensor(labels, device=DEVICE)[torch.randint(0, len(labels), (B, S), device=DEVICE)]
    tg[0, 1] = tg[0, 0]  # a repeated label
    il = torch.tensor([T, T - 3, T - 5, 6][:B], device=DEVICE)
    tl = torch.tensor([S, 3, 0, 2][:B], device=DEVICE)
    return x, tg, il, tl


def _grad(fn, x, up=None):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    (g,) = torch.autograd.grad(out, x, torch.ones_like(out) if up is None else up)
    return out.detach(), g


@pytest.mark.parametrize("blank_last", [False, True], ids=["blank0", "blankC-1"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_ctc_matches_torch(backend, blank_last, reduction):
    C = 7
    blank = C - 1 if blank_last else 0
    x, tg, il, tl = _batch(C=C, blank=blank)
    up = torch.randn(4, device=DEVICE) if reduction == "none" else None
    got, g = _grad(lambda t: ctc_loss(t.log_softmax(-1), tg, il, tl, blank=blank if not blank_last else -1,
                                      reduction=reduction, backend=backend), x, up)
    exp, ge = _grad(lambda t: F.ctc_loss(t.log_softmax(-1), tg, il, tl, blank=blank, reduction=reduction), x, up)
    assert_close(got, exp, atol=1e-4, rtol=1e-5)
    assert_close(g, ge, atol=1e-5, rtol=1e-4)
    # fused log-softmax: same loss, same gradient w.r.t. the logits
    got2, g2 = _grad(lambda t: ctc_loss(t, tg, il, tl, blank=blank, reduction=reduction, input_type="logits",
                                        backend=backend), x, up)
    assert_close(got2, exp, atol=1e-4, rtol=1e-5)
    assert_close(g2, ge, atol=1e-5, rtol=1e-4)


def test_ctc_layouts_concatenated_targets_int_lengths_batch_first(backend):
    x, tg, il, tl = _batch()
    lp = x.log_softmax(-1)
    exp = F.ctc_loss(lp, tg, il, tl, reduction="none")
    cat = torch.cat([tg[b, :int(tl[b])] for b in range(4)])
    got = ctc_loss(lp, cat, il.tolist(), tl.tolist(), reduction="none", backend=backend)
    assert_close(got, exp, atol=1e-4, rtol=1e-5)
    got = ctc_loss(lp.transpose(0, 1), tg, il.cpu(), tl.cpu(), reduction="none", batch_first=True, backend=backend)
    assert_close(got, exp, atol=1e-4, rtol=1e-5)
    mod = CTCLoss(reduction="sum", backend=backend)
    assert_close(mod(lp, tg, il, tl), exp.sum(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("label_loop", [True, False], ids=["loop", "rna"])
def test_ctc_matches_path_enumeration(backend, label_loop):
    T, B, C = 5, 3, 4
    lp = torch.randn(T, B, C, device=DEVICE, dtype=torch.float64).log_softmax(-1)
    tg = torch.tensor([[1, 1, 0], [2, 3, 0], [3, 0, 0]], device=DEVICE)
    tl = torch.tensor([2, 2, 1], device=DEVICE)
    il = torch.tensor([5, 4, 3], device=DEVICE)
    x = lp.float()
    up = torch.randn(B, device=DEVICE)
    got, g = _grad(lambda t: ctc_loss(t, tg, il, tl, reduction="none", label_loop=label_loop, backend=backend), x, up)
    post = ctc_posteriors(x, tg, il, tl, label_loop=label_loop, backend=backend)
    vit, gv = _grad(lambda t: ctc_loss(t, tg, il, tl, reduction="none", label_loop=label_loop, max_approx=True,
                                       backend=backend), x, up)
    path, score = ctc_best_path(x, tg, il, tl, label_loop=label_loop, backend=backend)
    for b in range(B):
        Tb = int(il[b])
        logz, gam, best, best_path = ref.enumerate_paths(lp[:Tb, b].cpu(), tg[b, :int(tl[b])].tolist(), 0, label_loop)
        assert got[b].item() == pytest.approx(-logz, rel=1e-5)
        # log-probs input: the true gradient -gamma (times the upstream), 0 on padded frames
        assert_close(g[:Tb, b], -gam * up[b].item(), atol=1e-5, rtol=1e-4)
        assert (g[Tb:, b] == 0).all()
        assert_close(post[:Tb, b], gam, atol=1e-5, rtol=1e-4)
        assert (post[Tb:, b] == 0).all()
        assert vit[b].item() == pytest.approx(-best, rel=1e-5)
        assert score[b].item() == pytest.approx(best, rel=1e-5)
        assert path[b, :Tb].tolist() == best_path and (path[b, Tb:] == 0).all()
        onehot = F.one_hot(torch.tensor(best_path), C).double()
        assert_close(gv[:Tb, b], -onehot * up[b].item(), atol=1e-6)


def test_ctc_long_sequence_matches_alpha_dp(backend):
    T, C, S = 160, 9, 50
    lp = torch.randn(T, 2, C, device=DEVICE, dtype=torch.float64).log_softmax(-1)
    tg = torch.randint(1, C, (2, S), device=DEVICE)
    il = torch.tensor([T, T - 17], device=DEVICE)
    tl = torch.tensor([S, S - 9], device=DEVICE)
    got = ctc_loss(lp.float(), tg, il, tl, reduction="none", backend=backend)
    for b in range(2):
        exp = -ref.forward_backward(lp[:int(il[b]), b].cpu(), tg[b, :int(tl[b])].tolist(), 0)[0]
        assert got[b].item() == pytest.approx(exp, rel=2e-5)


@pytest.mark.parametrize("label_loop", [True, False], ids=["loop", "rna"])
def test_torch_backend_own_recursions_match_references(monkeypatch, label_loop):
    """The torch backend's own alpha/beta recursions (CUDA's torch backend, and on the CPU everything but the
    full-sum with label loops, which takes PyTorch's native recursions; forced here for that case too):
    loss, gradient, posteriors, Viterbi loss and best path against path enumeration and F.ctc_loss; NaN
    logits on the frames past each sequence's end (which the recursions run through, masked afterwards)
    change nothing."""
    import tri_losses._torch.ctc as tctc
    monkeypatch.setattr(tctc, "native_path", lambda *a: False)
    test_ctc_matches_path_enumeration("torch", label_loop)
    if label_loop:
        test_ctc_matches_torch("torch", False, "none")
        test_ctc_matches_torch("torch", True, "mean")
    x, tg, il, tl = _batch(C=6)
    x = x.cpu()
    padded = x.clone()
    for b in range(x.shape[1]):
        padded[int(il[b]):, b] = math.nan
    for max_approx in (False, True):
        kw = dict(reduction="none", input_type="logits", label_loop=label_loop, max_approx=max_approx,
                  backend="torch")
        up = torch.randn(x.shape[1])
        exp, ge = _grad(lambda t: ctc_loss(t, tg.cpu(), il.cpu(), tl.cpu(), **kw), x, up)
        got, g = _grad(lambda t: ctc_loss(t, tg.cpu(), il.cpu(), tl.cpu(), **kw), padded, up)
        assert torch.equal(got, exp) and torch.equal(g, ge)
        path, score = ctc_best_path(padded, tg.cpu(), il.cpu(), tl.cpu(), input_type="logits",
                                    label_loop=label_loop, backend="torch")
        assert torch.equal(path, ctc_best_path(x, tg.cpu(), il.cpu(), tl.cpu(), input_type="logits",
                                               label_loop=label_loop, backend="torch")[0])


@pytest.mark.parametrize("zero_infinity", [False, True])
def test_ctc_infeasible_sequences(backend, zero_infinity):
    T, C = 6, 5
    x = torch.randn(T, 3, C, device=DEVICE)
    tg = torch.tensor([[1, 1, 1, 1], [1, 2, 3, 4], [2, 2, 0, 0]], device=DEVICE)
    il = torch.tensor([6, 3, 3], device=DEVICE)  # seq 0 needs 7 frames, seq 1 needs 4; seq 2 needs 3: feasible
    tl = torch.tensor([4, 4, 2], device=DEVICE)
    got, g = _grad(lambda t: ctc_loss(t, tg, il, tl, reduction="none", zero_infinity=zero_infinity,
                                      input_type="logits", backend=backend), x)
    exp = F.ctc_loss(x.log_softmax(-1), tg, il, tl, reduction="none", zero_infinity=zero_infinity)
    assert_close(got, exp, atol=1e-5, rtol=1e-5)
    assert not torch.isnan(g).any()
    assert (g[:, :2] == 0).all() and (g[:3, 2] != 0).any()
    path, score = ctc_best_path(x, tg, il, tl, input_type="logits", backend=backend)
    assert score[0] == -math.inf and (path[0] == 0).all()
    assert (ctc_posteriors(x, tg, il, tl, input_type="logits", backend=backend)[:, :2] == 0).all()


def test_ctc_minus_inf_log_probs_and_padded_frames(backend):
    x, tg, il, tl = _batch(C=6)
    lp = x.log_softmax(-1)
    lp[:, :, 5] = -math.inf  # a class never emitted
    tg = torch.where(tg == 5, 1, tg)
    got, g = _grad(lambda t: ctc_loss(t, tg, il, tl, reduction="sum", backend=backend), lp)
    exp = F.ctc_loss(lp, tg, il, tl, reduction="sum")
    assert_close(got, exp, atol=1e-4, rtol=1e-5)
    assert torch.isfinite(g).all()
    for b in range(4):
        assert (g[int(il[b]):, b] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ctc_half_precision_vs_float64_truth(backend, dtype):
    x, tg, il, tl = _batch()
    xh = x.to(dtype)
    truth, gt = _grad(lambda t: F.ctc_loss(t.double().log_softmax(-1), tg, il, tl, reduction="none"), xh)
    got, g = _grad(lambda t: ctc_loss(t, tg, il, tl, reduction="none", input_type="logits", backend=backend), xh)
    assert got.dtype == torch.float32 and g.dtype == dtype
    assert_close(got, truth, atol=1e-4, rtol=1e-4)  # fp32 math on the exactly-upcast inputs
    eps = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11
    assert (g.double() - gt.double()).abs().max() <= eps  # one rounding of a value in [-1, 1]


def test_ctc_deterministic_bitwise(backend):
    x, tg, il, tl = _batch()
    a = _grad(lambda t: ctc_loss(t, tg, il, tl, input_type="logits", backend=backend), x)
    b = _grad(lambda t: ctc_loss(t, tg, il, tl, input_type="logits", backend=backend), x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_ctc_greedy_decode_matches_loop():
    x = torch.randn(12, 3, 5)
    il = torch.tensor([12, 7, 0])
    labels, lengths = ctc_greedy_decode(x, il, blank=4)
    for b in range(3):
        best = x[:int(il[b]), b].argmax(-1).tolist()
        exp = ref.collapse(best, 4)
        assert lengths[b].item() == len(exp) and labels[b, :len(exp)].tolist() == exp
    lab2, len2 = ctc_greedy_decode(x.transpose(0, 1), il, blank=-1, batch_first=True)
    assert torch.equal(lab2, labels) and torch.equal(len2, lengths)
    lab3, len3 = ctc_greedy_decode(x, il, blank=4, backend="torch")
    assert torch.equal(lab3, labels) and torch.equal(len3, lengths)
    with pytest.raises(RuntimeError, match="backend"):
        ctc_greedy_decode(x, il, blank=4, backend="triton")
    with pytest.raises(TypeError, match="blank"):
        ctc_greedy_decode(x, il, blank=1.5)


def test_ctc_concatenated_targets_without_host_lengths(backend, monkeypatch):
    """CUDA lengths (or tracing): no host read, so concatenated targets are padded to min(numel, T)
    columns; a target longer than T is infeasible (+inf, gradient 0), as PyTorch's."""
    from tri_losses import ctc as M
    T, B, C = 6, 3, 5
    x = torch.randn(T, B, C, device=DEVICE).log_softmax(-1)
    tl = torch.tensor([2, 7, 3], device=DEVICE)  # sequence 1 is longer than T
    tg = torch.randint(1, C, (int(tl.sum()),), device=DEVICE)
    il = torch.tensor([6, 6, 5], device=DEVICE)
    exp = F.ctc_loss(x, tg, il, tl, reduction="none")
    _, gexp = _grad(lambda t: ctc_loss(t, tg, il, tl, reduction="none", backend=backend), x)  # host lengths
    monkeypatch.setattr(M, "_host", lambda lengths, validate: None)
    got, g = _grad(lambda t: ctc_loss(t, tg, il, tl, reduction="none", backend=backend), x)
    assert got[1] == math.inf and exp[1] == math.inf and (g[:, 1] == 0).all()
    assert_close(got[[0, 2]], exp[[0, 2]], atol=1e-4, rtol=1e-5)
    assert_close(g, gexp, atol=1e-6, rtol=1e-6)
    zi = ctc_loss(x, tg, il, tl, reduction="none", zero_infinity=True, backend=backend)
    assert zi[1] == 0


def test_ctc_gradcheck_float64_torch_backend():
    T, B, C = 6, 2, 4
    x = torch.randn(T, B, C, dtype=torch.float64, requires_grad=True)
    tg = torch.tensor([[1, 2], [3, 3]])
    il, tl = torch.tensor([6, 5]), torch.tensor([2, 2])
    for kw in (dict(input_type="logits"), dict(input_type="logits", label_loop=False)):
        assert torch.autograd.gradcheck(lambda t: ctc_loss(t, tg, il, tl, reduction="none", backend="torch", **kw), (x,))
    assert torch.autograd.gradcheck(
        lambda t: ctc_loss(t.log_softmax(-1), tg, il, tl, reduction="none", backend="torch"), (x,))


def _ragged(T=24, B=3, C=6, S=6, blank=0):
    """Random log-probs (T, B, C) float64 and padded targets with repeats, variable lengths (one 0)."""
    lp = (torch.randn(T, B, C, dtype=torch.float64, device=DEVICE) * 2).log_softmax(-1)
    labels = torch.tensor([c for c in range(C) if c != blank], device=DEVICE)
    tg = labels[torch.randint(0, len(labels), (B, S), device=DEVICE)]
    tg[0, 2] = tg[0, 1]  # adjacent repeats
    if S > 4:
        tg[0, 4] = tg[0, 3]
    il = torch.tensor([T, T - 5, 9][:B], device=DEVICE)
    tl = torch.tensor([S, S - 2, 0][:B], device=DEVICE)
    return lp, tg, il, tl


@pytest.mark.parametrize("label_loop", [True, False], ids=["loop", "rna"])
@pytest.mark.parametrize("input_type", ["log_probs", "logits"])
def test_ctc_matches_alpha_beta_and_viterbi_reference(backend, label_loop, input_type):
    lp, tg, il, tl = _ragged(blank=5)
    B, C = lp.shape[1], lp.shape[2]
    # logits input: the same log-probs shifted per frame (the fused log-softmax removes the shift)
    x = (lp + torch.randn(lp.shape[:2], dtype=torch.float64, device=DEVICE)[..., None] * 3 if input_type == "logits"
         else lp).float()
    kw = dict(blank=-1, input_type=input_type, label_loop=label_loop, backend=backend)
    up = torch.randn(B, device=DEVICE)
    loss, g = _grad(lambda t: ctc_loss(t, tg, il, tl, reduction="none", **kw), x, up)
    post = ctc_posteriors(x, tg, il, tl, **kw)
    vloss, vg = _grad(lambda t: ctc_loss(t, tg, il, tl, reduction="none", max_approx=True, **kw), x, up)
    path, score = ctc_best_path(x, tg, il, tl, **kw)
    assert post.dtype == torch.float32 and path.dtype == torch.int64 and path.shape == (B, lp.shape[0])
    p = x.double().softmax(-1) if input_type == "logits" else torch.zeros_like(lp)
    for b in range(B):
        Tb, tgt = int(il[b]), tg[b, :int(tl[b])].tolist()
        logz, gam = ref.forward_backward(lp[:Tb, b].cpu(), tgt, C - 1, label_loop)
        assert math.isfinite(logz)
        assert loss[b].item() == pytest.approx(-logz, rel=2e-5)
        assert_close(g[:Tb, b], (p[:Tb, b].cpu() - gam) * up[b].item(), atol=2e-5, rtol=1e-4)
        assert (g[Tb:, b] == 0).all()
        assert_close(post[:Tb, b], gam, atol=2e-5, rtol=1e-4)
        assert_close(post[:Tb, b].sum(-1), torch.ones(Tb), atol=2e-5, rtol=0)
        assert (post[Tb:, b] == 0).all()
        best, best_path = ref.viterbi(lp[:Tb, b].cpu(), tgt, C - 1, label_loop)
        assert vloss[b].item() == pytest.approx(-best, rel=2e-5)
        assert score[b].item() == pytest.approx(best, rel=2e-5)
        assert path[b, :Tb].tolist() == best_path and (path[b, Tb:] == C - 1).all()
        onehot = F.one_hot(torch.tensor(best_path), C).double()
        assert_close(vg[:Tb, b], (p[:Tb, b].cpu() - onehot) * up[b].item(), atol=2e-5, rtol=1e-4)
        assert (vg[Tb:, b] == 0).all()


@pytest.mark.parametrize("label_loop", [True, False], ids=["loop", "rna"])
def test_ctc_viterbi_ties_as_returnn(backend, label_loop):
    """Exact ties (integer-valued log-probs: every path sum is exact; all-equal logits, an untrained zero-init
    output layer) are broken as RETURNN's FastViterbiOp breaks them on RETURNN's CTC automaton (the reference
    transcribes both): ctc_best_path's alignment, its score and max_approx's one-hot gradient. All-equal logits,
    target [0, 1], 5 frames: blanks first, [2, 2, 2, 0, 1], as rf.ctc_best_path returns."""
    x = torch.zeros(5, 1, 3, device=DEVICE)
    path, _ = ctc_best_path(x, torch.tensor([[0, 1]], device=DEVICE), [5], [2], blank=2, input_type="logits",
                            label_loop=label_loop, backend=backend)
    assert path.tolist() == [[2, 2, 2, 0, 1]]
    g = torch.Generator().manual_seed(5)
    T, B, C = 7, 6, 4
    for trial in range(4):
        blank = (0, C - 1)[trial % 2]
        labels = [c for c in range(C) if c != blank]
        tg = torch.tensor(labels, device=DEVICE)[torch.randint(0, C - 1, (B, 3), generator=g).to(DEVICE)]
        tg[0, 1] = tg[0, 0]  # a repeat
        tl = torch.tensor([3, 2, 1, 0, 3, 2], device=DEVICE)
        il = torch.tensor([7, 6, 3, 4, 5, 7], device=DEVICE)
        if trial < 2:  # integer log-probs in {-2, -1, 0}: many equal path sums, exact in fp32 and fp64
            lp = torch.randint(-2, 1, (T, B, C), generator=g).double().to(DEVICE)
            kw = dict(input_type="log_probs")
        else:  # all-equal logits per frame (any shift): every path has the same score
            lp = torch.full((T, B, C), -math.log(C), dtype=torch.float64, device=DEVICE)
            kw = dict(input_type="logits")
        x = (lp + 3.0 * trial if trial >= 2 else lp).float()
        kw.update(blank=blank, label_loop=label_loop, backend=backend)
        path, score = ctc_best_path(x, tg, il, tl, **kw)
        up = torch.randn(B, device=DEVICE)
        vloss, vg = _grad(lambda t: ctc_loss(t, tg, il, tl, reduction="none", max_approx=True, **kw), x, up)
        p = x.double().softmax(-1) if kw["input_type"] == "logits" else torch.zeros_like(lp)
        for b in range(B):
            Tb = int(il[b])
            best, best_path = ref.viterbi(lp[:Tb, b].cpu(), tg[b, :int(tl[b])].tolist(), blank, label_loop)
            if best_path is None:  # infeasible (a repeat needs a blank between): blank everywhere, -inf
                assert (path[b] == blank).all() and score[b].item() == -math.inf and (vg[:, b] == 0).all()
                continue
            assert path[b, :Tb].tolist() == best_path, (trial, b)
            assert (path[b, Tb:] == blank).all()
            assert score[b].item() == pytest.approx(best, rel=1e-6, abs=1e-6)
            onehot = F.one_hot(torch.tensor(best_path), C).double()
            assert_close(vg[:Tb, b], (p[:Tb, b].cpu() - onehot) * up[b].item(), atol=2e-6, rtol=1e-5)
            assert (vg[Tb:, b] == 0).all()


def test_ctc_kernel_state_class_and_label_chunks(monkeypatch):
    """The chunked kernels (targets longer than the register path holds: 2S+1 > REG_MAX_L) with blocks smaller
    than 2S+1, C and S (their chunk loops: on a GPU for S > 2047, C > 4096), the gradient-row pass's too (a
    label's run spanning its label steps, runs starting at a step's start)."""
    from tri_losses.kernels import ctc as K
    monkeypatch.setattr(K, "_blocks", lambda L, C: (8, 8))
    monkeypatch.setattr(K, "_frame_blocks", lambda L, S: (8, 4))
    monkeypatch.setattr(K, "REG_MAX_L", 0)
    lp, tg, il, tl = _ragged(T=20, C=11, S=9)
    tg[1, :] = 3  # a label repeated across label chunks (one class segment spanning BLOCK_S chunks)
    x = lp.float()
    # max_approx against the torch backend (logits and label_loop=False: against the float64 DPs below)
    got, g = _grad(lambda t: ctc_loss(t, tg, il, tl, reduction="none", backend="triton", max_approx=True), x)
    exp, ge = _grad(lambda t: ctc_loss(t, tg, il, tl, reduction="none", backend="torch", max_approx=True), x)
    assert_close(got, exp, atol=1e-4, rtol=1e-5)
    assert_close(g, ge, atol=2e-5, rtol=1e-4)
    path, score = ctc_best_path(x, tg, il, tl, backend="triton")
    path2, score2 = ctc_best_path(x, tg, il, tl, backend="torch")
    assert torch.equal(path, path2)
    assert_close(score, score2, atol=1e-4, rtol=1e-5)
    # and an independent float64 truth (the direct alpha/beta and Viterbi DPs), random upstream gradients
    up = torch.randn(3, device=DEVICE)
    for label_loop in (True, False):
        got, g = _grad(lambda t: ctc_loss(t, tg, il, tl, reduction="none", input_type="logits",
                                          label_loop=label_loop, backend="triton"), x, up)
        p = lp.softmax(-1)
        for b in range(3):
            Tb, tgt = int(il[b]), tg[b, :int(tl[b])].tolist()
            logz, gam = ref.forward_backward(lp[:Tb, b].cpu(), tgt, 0, label_loop)
            assert got[b].item() == pytest.approx(-logz, rel=2e-5)
            assert_close(g[:Tb, b], (p[:Tb, b].cpu() - gam) * up[b].item(), atol=2e-5, rtol=1e-4)
            assert (g[Tb:, b] == 0).all()
            if label_loop:
                best, best_path = ref.viterbi(lp[:Tb, b].cpu(), tgt, 0)
                assert score[b].item() == pytest.approx(best, rel=2e-5) and path[b, :Tb].tolist() == best_path


def test_ctc_minus_inf_on_a_target_class_gives_finite_gradient(backend):
    lp, tg, il, tl = _ragged(T=14, B=2, C=5, S=3)
    tg[0] = torch.tensor([1, 2, 3], device=DEVICE)
    lp[3:6, :, 1] = -math.inf  # label 1 impossible on frames 3..5 (still feasible)
    lp[:, :, 4] = -math.inf
    lp = lp.log_softmax(-1)
    x = lp.float()
    loss, g = _grad(lambda t: ctc_loss(t, tg, il, tl, reduction="none", backend=backend), x)
    loss2, g2 = _grad(lambda t: ctc_loss(t, tg, il, tl, reduction="none", input_type="logits", backend=backend), x)
    for b in range(2):
        Tb = int(il[b])
        logz, gam = ref.forward_backward(lp[:Tb, b].cpu(), tg[b, :int(tl[b])].tolist(), 0)
        assert loss[b].item() == pytest.approx(-logz, rel=2e-5)
        assert_close(g[:Tb, b], -gam, atol=2e-5, rtol=1e-4)
        assert_close(g2[:Tb, b], lp[:Tb, b].exp().cpu() - gam, atol=2e-5, rtol=1e-4)
    assert torch.isfinite(g).all() and torch.isfinite(g2).all()
    assert (g[3:6, 0, 1] == 0).all() and (g2[:, :, 4] == 0).all()


def test_ctc_unchecked_out_of_range_ids_and_lengths_never_read_out_of_bounds(backend):
    """The custom op itself (what CUDA runs without validate=True): bad ids make the sequence
    infeasible (loss +inf, gradient 0), never an out-of-bounds access."""
    from tri_losses import ctc as M
    x = torch.randn(6, 3, 5, device=DEVICE, requires_grad=True)
    tg = torch.tensor([[1, 9, 2], [1, -4, 2], [1, 2, 3]], device=DEVICE)
    il = torch.tensor([6, 6, 6], device=DEVICE)
    tl = torch.tensor([3, 3, 3], device=DEVICE)
    loss, _, _ = M._ctc_fwd(x, tg, il, tl, 0, True, False, True, backend == "triton")
    (g,) = torch.autograd.grad(loss[torch.isfinite(loss)].sum() + 0 * loss.sum(), x)
    assert loss[0] == math.inf and loss[1] == math.inf and math.isfinite(loss[2].item())
    assert (g[:, :2] == 0).all() and not torch.isnan(g).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ctc_half_precision_no_worse_than_pytorch(backend, dtype):
    """Confident (peaked) and extreme logits in 16 bits vs the fp64 truth; PyTorch's comparable recipe
    (its CTC has no 16-bit kernel): log_softmax in 16 bits, then F.ctc_loss in fp32."""
    T, B, C = 20, 3, 8
    x = torch.randn(T, B, C, device=DEVICE) * 2
    tg = torch.randint(1, C, (B, 4), device=DEVICE)
    il, tl = torch.tensor([T, 15, 11], device=DEVICE), torch.tensor([4, 3, 2], device=DEVICE)
    for b in range(B):  # p ~ 0.999 on an alignment of the target
        for t in range(int(il[b])):
            k = t * int(tl[b]) // int(il[b])
            x[t, b, tg[b, k]] += 9.0
    x[:, 1] *= 1e3 if dtype == torch.bfloat16 else 5e2  # extreme logits (|x| up to ~1e4)
    xh = x.to(dtype)
    truth, gt = _grad(lambda t: F.ctc_loss(t.double().log_softmax(-1), tg, il, tl, reduction="none"), xh)
    got, g = _grad(lambda t: ctc_loss(t, tg, il, tl, reduction="none", input_type="logits", backend=backend), xh)
    pt, gp = _grad(lambda t: F.ctc_loss(t.log_softmax(-1).float(), tg, il, tl, reduction="none"), xh)
    assert got.dtype == torch.float32 and g.dtype == dtype
    fin = torch.isfinite(truth)
    err, err_pt = (got - truth).abs()[fin], (pt - truth).abs()[fin]
    assert (err <= err_pt * 1.01 + 1e-3 * truth.abs()[fin].clamp(min=1)).all()
    assert (g.double() - gt).abs().max() <= (gp.double() - gt).abs().max() + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_ctc_unnormalised_log_probs_gradient_and_posteriors_are_gamma(backend, dtype):
    """Log-probs that are not normalised (large positive scores): the gradient is still -gamma and the
    posteriors gamma (a per-frame shift of the scores leaves them unchanged). The torch backend took gamma
    as exp(e) - (exp(e) - gamma) from PyTorch's native CTC backward, which cancels: e.g. fp32 posteriors
    [0.333252, 0.666748] for [1/3, 2/3] at scores of 8, fp64 [0.5, 0.5] at 36."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton backend takes 16/32-bit floats")
    gen = torch.Generator().manual_seed(3)
    T, C, blank = 9, 5, 0
    tg = torch.tensor([[1, 3, 3], [2, 4, 0], [4, 0, 0]])
    il, tl = torch.tensor([9, 7, 2]), torch.tensor([3, 2, 1])
    # scores of ~8 (fp32) / ~30 (fp64): exp(e) - r lost gamma's digits there without failing a sum-to-1 check
    shift = 8.0 if dtype == torch.float32 else 30.0
    lp64 = (torch.randn(T, 3, C, generator=gen, dtype=torch.float64).log_softmax(-1)
            + torch.rand(T, 3, 1, generator=gen, dtype=torch.float64) + shift)
    x = lp64.to(dtype).to(DEVICE)
    up = torch.tensor([0.5, -1.0, 2.0], dtype=dtype, device=DEVICE)
    loss, g = _grad(lambda t: ctc_loss(t, tg.to(DEVICE), il, tl, reduction="none", backend=backend), x, up)
    post = ctc_posteriors(x, tg.to(DEVICE), il, tl, backend=backend)
    tol = 3e-6 if dtype == torch.float32 else 1e-10
    for b in range(3):
        logz, gamma = ref.forward_backward(x[:il[b], b].double().cpu(), tg[b, :tl[b]].tolist(), blank)
        assert_close(loss[b].double().cpu(), torch.tensor(-logz, dtype=torch.float64), rtol=tol, atol=0)
        assert_close(g[:il[b], b].double().cpu(), -float(up[b]) * gamma, atol=tol, rtol=0)
        assert_close(post[:il[b], b].double().cpu(), gamma, atol=tol, rtol=0)


def test_ctc_posteriors_and_best_path_batch_first_layout(backend):
    lp, tg, il, tl = _ragged(T=12, C=5, S=3)
    x = lp.float()
    post = ctc_posteriors(x, tg, il, tl, backend=backend)
    post_bf = ctc_posteriors(x.transpose(0, 1), tg, il, tl, batch_first=True, backend=backend)
    assert post_bf.shape == (3, 12, 5) and torch.equal(post_bf, post.transpose(0, 1))
    path, score = ctc_best_path(x, tg, il, tl, backend=backend)
    path_bf, score_bf = ctc_best_path(x.transpose(0, 1), tg, il, tl, batch_first=True, backend=backend)
    assert torch.equal(path, path_bf) and torch.equal(score, score_bf)


BAD = [
    (dict(targets=torch.tensor([[1, 0, 2]])), ValueError, "blank"),
    (dict(targets=torch.tensor([[1, 7, 2]])), ValueError, "targets"),
    (dict(input_lengths=[9]), ValueError, "input_lengths"),
    (dict(input_lengths=[-1]), ValueError, "input_lengths"),
    (dict(target_lengths=[4]), ValueError, "target_lengths"),
    (dict(target_lengths=[-2]), ValueError, "target_lengths"),
    (dict(blank=5), ValueError, "blank"),
    (dict(blank=-6), ValueError, "blank"),
    (dict(log_probs=torch.randn(8, 1, 5, 1)), ValueError, "log_probs"),
    (dict(log_probs=torch.randn(0, 1, 5)), ValueError, "log_probs"),  # empty: PyTorch raises too
    (dict(log_probs=torch.randn(8, 1, 0)), ValueError, "log_probs"),
    (dict(log_probs=torch.randn(8, 5).log_softmax(-1), targets=torch.tensor([[1, 2, 3], [1, 2, 3]]), input_lengths=8,
          target_lengths=3), ValueError, "targets"),  # unbatched with (2, S) targets
    (dict(log_probs=torch.randn(8, 5).log_softmax(-1), targets=torch.tensor([1, 2, 3, 4]), input_lengths=8,
          target_lengths=3), ValueError, "targets"),  # unbatched 1-D targets are concatenated (PyTorch): 4 != 3
    (dict(input_lengths=[8.0]), TypeError, "input_lengths"),
    (dict(input_lengths=[torch.tensor(8.0)]), TypeError, "input_lengths"),
    (dict(input_lengths=[True]), TypeError, "input_lengths"),
    (dict(targets=torch.ones(1, 3)), TypeError, "targets"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(input_type="probs"), ValueError, "input_type"),
    (dict(input_lengths=[8, 8]), ValueError, "input_lengths"),
    (dict(targets=torch.ones(1, 3, 1, dtype=torch.long)), ValueError, "targets"),
    (dict(targets=torch.tensor([1, 2])), ValueError, "targets"),  # concatenated: 2 entries, lengths sum to 3
    (dict(targets=torch.tensor([[1, 2, 3], [1, 2, 3]])), ValueError, "targets"),
    (dict(target_lengths=torch.tensor([3.0])), TypeError, "target_lengths"),
    (dict(blank=1.0), TypeError, "blank"),
    (dict(validate=True, targets=torch.tensor([[1, 2, -1]])), ValueError, "targets"),
    (dict(backend="cuda"), ValueError, "backend"),
]


@pytest.mark.parametrize("kw,exc,name", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_ctc_bad_input_raises_naming_argument(kw, exc, name):
    args = dict(log_probs=torch.randn(8, 1, 5).log_softmax(-1), targets=torch.tensor([[1, 2, 3]]), input_lengths=[8],
                target_lengths=[3])
    args.update(kw)
    with pytest.raises(exc, match=name):
        ctc_loss(args.pop("log_probs"), args.pop("targets"), args.pop("input_lengths"), args.pop("target_lengths"),
                 **args)


def test_ctc_torch_compile_fullgraph(backend):
    x, tg, il, tl = _batch()

    def f(t):
        return ctc_loss(t, tg, il, tl, input_type="logits", backend=backend)

    torch._dynamo.reset()
    got, g = _grad(torch.compile(f, fullgraph=True), x)
    exp, ge = _grad(f, x)
    assert_close(got, exp)
    assert_close(g, ge)


@pytest.mark.gpu
def test_ctc_long_gpu():
    T, B, C, S = 10000, 2, 50, 1024
    x = torch.randn(T, B, C, device="cuda")
    tg = torch.randint(1, C, (B, S), device="cuda")
    il = torch.full((B,), T, device="cuda")
    tl = torch.full((B,), S, device="cuda")
    got, g = _grad(lambda t: ctc_loss(t, tg, il, tl, reduction="none", input_type="logits", backend="triton"), x)
    exp, ge = _grad(lambda t: F.ctc_loss(t.log_softmax(-1), tg, il, tl, reduction="none"), x)
    assert_close(got, exp, atol=1e-2, rtol=1e-5)
    assert_close(g, ge, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("input_type", ["logits", "log_probs"])
def test_ctc_extreme_logits_fp32_gradient_matches_float64(backend, input_type):
    """|x| ~ 1e4 (spread, or offset so that x - (m + log s) would round): fp32 gradient within 1e-5 of the
    float64 truth (per-frame normalised posteriors, log-softmax formed from the row maximum); 1e30:
    finite."""
    T, B, C = 12, 3, 6
    tg = torch.randint(1, C, (B, 3), device=DEVICE)
    il, tl = torch.tensor([12, 10, 8], device=DEVICE), torch.tensor([3, 2, 3], device=DEVICE)
    up = torch.randn(B, device=DEVICE)
    for x, bound in ((torch.randn(T, B, C, device=DEVICE) * 1e4, 1e-5),
                     (torch.randn(T, B, C, device=DEVICE) * 3 + 1e4, 1e-5),
                     (torch.randn(T, B, C, device=DEVICE) * 1e30, None)):
        xin = x if input_type == "logits" else x.double().log_softmax(-1).float()
        got, g = _grad(lambda t: ctc_loss(t, tg, il, tl, reduction="none", input_type=input_type,
                                          backend=backend), xin, up)
        assert torch.isfinite(g).all()
        if bound is None:
            continue
        # float64 truth on the same fp32 inputs: gamma from F.ctc_loss's log-probs gradient p - gamma
        xd = xin.double().requires_grad_(True)
        lp = xd.log_softmax(-1) if input_type == "logits" else xd
        truth = F.ctc_loss(lp, tg, il, tl, reduction="none")
        (gt,) = torch.autograd.grad(truth, xd, up.double())
        if input_type == "log_probs":  # the true gradient -gamma: remove PyTorch's p term
            frames = (torch.arange(T, device=DEVICE)[:, None] < il[None, :])[..., None]
            gt = gt - torch.where(frames, xd.detach().exp() * up.double()[None, :, None], 0.0)
        assert (g.double() - gt).abs().max() <= bound


def test_ctc_torch_compile_fullgraph_python_list_lengths(backend):
    """README's call style (Python-list lengths) traces without host reads: loss, posteriors, best path."""
    x, tg, il, tl = _batch()
    il_l, tl_l = il.tolist(), tl.tolist()
    fns = (lambda t: ctc_loss(t, tg, il_l, tl_l, input_type="logits", backend=backend),
           lambda t: ctc_posteriors(t, tg, il_l, tl_l, input_type="logits", backend=backend),
           lambda t: ctc_best_path(t, tg, il_l, tl_l, input_type="logits", backend=backend))
    for f in fns:
        torch._dynamo.reset()
        got = torch.compile(f, fullgraph=True)(x)
        exp = f(x)
        for u, v in zip(got if isinstance(got, tuple) else (got,), exp if isinstance(exp, tuple) else (exp,)):
            assert_close(u, v)


def test_ctc_unbatched_input_matches_pytorch(backend):
    """PyTorch's unbatched form: (T, C) log-probs, (S,) targets, scalar lengths (int or 0-d tensor)."""
    T, C = 10, 5
    x = torch.randn(T, C, device=DEVICE).log_softmax(-1)
    tg = torch.tensor([1, 3, 3], device=DEVICE)
    for il, tl in ((8, 3), (torch.tensor(8), torch.tensor(3)), ((8,), (3,))):
        for reduction in ("none", "sum", "mean"):
            got, g = _grad(lambda t: ctc_loss(t, tg, il, tl, reduction=reduction, backend=backend), x)
            exp, ge = _grad(lambda t: F.ctc_loss(t, tg, torch.as_tensor(il).reshape(()),
                                                 torch.as_tensor(tl).reshape(()), reduction=reduction), x)
            assert got.shape == exp.shape == ()
            assert_close(got, exp, atol=1e-5, rtol=1e-5)
            k = 1 / 3 if reduction == "mean" else 1.0  # the upstream gradient of the one sequence
            frames = (torch.arange(T, device=DEVICE) < 8)[:, None]
            assert_close(g, ge - torch.where(frames, x.exp() * k, 0.0), atol=1e-5, rtol=1e-4)
    # a (1, S) target is padded (longer than its length), as PyTorch's unbatched form reads it
    tg2 = torch.tensor([[1, 3, 3, 2]], device=DEVICE)
    got = ctc_loss(x, tg2, 8, 3, reduction="none", backend=backend)
    assert_close(got, F.ctc_loss(x, tg2, torch.tensor(8), torch.tensor(3), reduction="none"), atol=1e-5, rtol=1e-5)


def test_ctc_lengths_as_sequences_of_integer_scalars(backend):
    """Lengths given as a list of NumPy integers or 0-d integer tensors, as F.ctc_loss takes them."""
    import numpy as np
    x = torch.randn(6, 2, 5, device=DEVICE).log_softmax(-1)
    tg = torch.tensor([[1, 2], [3, 3]], device=DEVICE)
    exp = F.ctc_loss(x, tg, [6, 5], [2, 2], reduction="none")
    for il, tl in (([np.int64(6), np.int32(5)], [2, np.int64(2)]), ([torch.tensor(6), torch.tensor(5)], (2, 2))):
        assert_close(ctc_loss(x, tg, il, tl, reduction="none", backend=backend), exp, atol=1e-5, rtol=1e-5)


def test_ctc_empty_batch_same_on_both_backends(backend):
    """B = 0 (PyTorch's CPU op raises on it): an empty loss, sum 0, mean NaN (0/0), an empty gradient, on
    both backends alike."""
    x = torch.randn(6, 0, 5, device=DEVICE).log_softmax(-1).requires_grad_(True)
    tg = torch.zeros(0, 2, dtype=torch.long, device=DEVICE)
    none = ctc_loss(x, tg, [], [], reduction="none", backend=backend)
    assert none.shape == (0,)
    assert ctc_loss(x, tg, [], [], reduction="sum", backend=backend).item() == 0
    mean = ctc_loss(x, tg, [], [], reduction="mean", backend=backend)
    assert torch.isnan(mean)
    (g,) = torch.autograd.grad(ctc_loss(x, tg, [], [], reduction="sum", backend=backend), x)
    assert g.shape == x.shape


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.gpu)])
def test_ctc_long_target_s1024_matches_pytorch_float64(backend):
    """S = 1024 labels (2049 states: more than one block of states per sequence on a GPU) vs PyTorch in
    float64, loss and logits gradient with a random upstream. No adjacent repeats (other tests cover them), so
    that T = 1060 frames hold all 1024 labels; the second sequence is shorter in both lengths. The Triton case
    is a big shape for the interpreter (~160 s): it runs on a GPU; on the CPU the Triton kernels' several
    state blocks per sequence are covered by test_ctc_kernel_state_class_and_label_chunks (small blocks)."""
    T, B, C, S = 1060, 2, 6, 1024
    x = torch.randn(T, B, C, device=DEVICE)
    steps = torch.randint(1, C - 1, (B, S), device=DEVICE)  # in [1, C - 2]: never 0 mod C - 1
    tg = steps.cumsum(1) % (C - 1) + 1
    il, tl = torch.tensor([T, 500], device=DEVICE), torch.tensor([S, 400], device=DEVICE)
    up = torch.rand(B, device=DEVICE) + 0.5
    got, g = _grad(lambda t: ctc_loss(t, tg, il, tl, reduction="none", input_type="logits", backend=backend), x, up)
    exp, ge = _grad(lambda t: F.ctc_loss(t.double().log_softmax(-1), tg, il, tl, reduction="none"), x, up)
    pt, gp = _grad(lambda t: F.ctc_loss(t.log_softmax(-1), tg, il, tl, reduction="none"), x, up)  # fp32 peer
    assert torch.isfinite(exp).all()
    assert_close(got.double(), exp, atol=0, rtol=2e-5)
    # fp32 log-space sums over 1300 frames: within 2x PyTorch's own fp32 gradient error (and 1e-3)
    err, err_pt = (g.double() - ge).abs().max().item(), (gp.double() - ge).abs().max().item()
    assert err <= max(2 * err_pt, 2e-5) and err <= 1e-3


def test_ctc_one_frame_and_empty_targets_match_pytorch(backend):
    """T = 1 (a single frame: blank, or the one label) and S = 0 (padded (B, 0) targets: all blanks)."""
    up = torch.randn(3, device=DEVICE)
    x1 = torch.randn(1, 3, 4, device=DEVICE)
    tg1, tl1 = torch.tensor([[2], [1], [3]], device=DEVICE), torch.tensor([1, 0, 1], device=DEVICE)
    x0 = torch.randn(5, 3, 4, device=DEVICE)
    tg0, tl0 = torch.zeros(3, 0, dtype=torch.long, device=DEVICE), torch.zeros(3, dtype=torch.long, device=DEVICE)
    for x, tg, il, tl in ((x1, tg1, torch.tensor([1, 1, 0], device=DEVICE), tl1),
                          (x0, tg0, torch.tensor([5, 2, 0], device=DEVICE), tl0)):
        got, g = _grad(lambda t: ctc_loss(t, tg, il, tl, reduction="none", input_type="logits", backend=backend),
                       x, up)
        exp, ge = _grad(lambda t: F.ctc_loss(t.double().log_softmax(-1), tg.reshape(-1)[:0] if tg.numel() == 0
                                             else tg, il, tl, reduction="none"), x, up)
        assert_close(got.double(), exp, atol=1e-5, rtol=1e-5)
        assert_close(g.double(), torch.where(torch.isfinite(exp)[None, :, None], ge, 0.0), atol=1e-5, rtol=1e-4)
        path, score = ctc_best_path(x, tg, il, tl, input_type="logits", backend=backend)
        assert path.shape == (3, x.shape[0]) and score.shape == (3,)


def test_ctc_batch_first_input_without_the_flag_gets_a_hint():
    """(B, T, C) input without batch_first=True: the error says so (the lengths count B = 3, T = 12)."""
    lp, tg, il, tl = _ragged(T=12, C=5, S=3)
    with pytest.raises(ValueError, match="batch_first=True"):
        ctc_loss(lp.transpose(0, 1), tg, il, tl)
    with pytest.raises(ValueError, match="batch_first=True"):
        ctc_loss(lp.transpose(0, 1), tg, il.tolist(), tl.tolist())  # lengths as Python lists
    ctc_loss(lp.transpose(0, 1), tg, il, tl, batch_first=True)  # the hint's fix works


@pytest.mark.parametrize("input_type", ["logits", "log_probs"])
def test_ctc_gradient_at_a_longer_shape_no_worse_than_pytorch_fp32(backend, input_type):
    """T = 120 (log Z ~ -360: fp32 rounding of the log-scores is visible), repeated labels, ragged lengths, one
    infeasible sequence, random upstream: loss and gradient vs the float64 truth, no worse than PyTorch's own
    fp32 (the torch backend runs PyTorch's native recursions in fp32 and normalises each frame's posteriors)."""
    T, B, C, S = 120, 4, 30, 40
    x = torch.randn(T, B, C, device=DEVICE) * 2
    tg = torch.randint(1, C, (B, S), device=DEVICE)
    tg[:, 5] = tg[:, 4]  # adjacent and distant repeats of one class
    tg[:, 20] = tg[:, 4]
    il, tl = torch.tensor([T, 100, 70, 30], device=DEVICE), torch.tensor([S, 33, 0, S], device=DEVICE)
    up = torch.randn(B, device=DEVICE)
    xin = x if input_type == "logits" else x.log_softmax(-1)
    got, g = _grad(lambda t: ctc_loss(t, tg, il, tl, reduction="none", input_type=input_type, backend=backend),
                   xin, up)
    xd = xin.double().requires_grad_(True)
    truth = F.ctc_loss(xd.log_softmax(-1) if input_type == "logits" else xd, tg, il, tl, reduction="none")
    # gradients of PyTorch's with zero_infinity=True (its infeasible gradient is NaN otherwise)
    truth_z = F.ctc_loss(xd.log_softmax(-1) if input_type == "logits" else xd, tg, il, tl, reduction="none",
                         zero_infinity=True)
    (gt,) = torch.autograd.grad(truth_z, xd, up.double())
    pt, gp = _grad(lambda t: F.ctc_loss(t.log_softmax(-1) if input_type == "logits" else t, tg, il, tl,
                                        reduction="none", zero_infinity=True), xin, up)
    if input_type == "log_probs":  # the true gradient -gamma: remove PyTorch's p term on valid frames
        keep = ((torch.arange(T, device=DEVICE)[:, None] < il[None, :]) & torch.isfinite(truth)[None, :])[..., None]
        p = torch.where(keep, xin.double().exp() * up.double()[None, :, None], 0.0)
        gt, gp = gt - p, gp.double() - p
    assert truth[3] == math.inf and got[3] == math.inf and (g[:, 3] == 0).all()
    fin = torch.isfinite(truth)
    assert_close(got[fin].double(), truth[fin], atol=0, rtol=2e-6)
    err, err_pt = (g.double() - gt).abs().max().item(), (gp.double() - gt).abs().max().item()
    assert err <= max(err_pt, 2e-6)


@pytest.mark.parametrize("path", ["register", "chunked"])
def test_ctc_launches_and_state_buffers_per_pass(monkeypatch, path):
    """Logits input. The register path: the forward is two launches (the frames' lse pairs formed in the
    emissions pass, alpha written over the emissions) with one (T, B, 2S+1) fp32 buffer (alpha, kept for the
    backward); the backward three (emissions, beta, gradient rows) with one more such buffer (its emissions,
    overwritten by the posteriors). The chunked path (longer targets): lse pass and alpha; beta and the same
    gradient-row pass, one such buffer each. Loss and gradient (random upstream) as the torch backend."""
    from tri_losses.kernels import ctc as K
    if path == "chunked":
        monkeypatch.setattr(K, "REG_MAX_L", 0)
    T, B, C, S = 12, 3, 6, 5
    x, tg, il, tl = _batch(T, B, C, S)
    up = torch.rand(B, device=DEVICE) + 0.5
    log, empty = [], torch.empty

    def counting(*size, **kw):
        t = empty(*size, **kw)
        if t.numel() >= T * B * (2 * S + 1):
            log.append((tuple(t.shape), t.dtype))
        return t

    class Launches:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            log.append(self.name)
            return self.kernel[grid]

    for name in [n for n in vars(K) if n.endswith("_kernel")]:
        monkeypatch.setattr(K, name, Launches(name, getattr(K, name)))
    x = x.detach().clone().requires_grad_(True)
    monkeypatch.setattr(torch, "empty", counting)
    loss = ctc_loss(x, tg, il, tl, reduction="none", input_type="logits", backend="triton")
    fwd, log[:] = list(log), []
    (g,) = torch.autograd.grad(loss, x, up)
    monkeypatch.undo()
    state = ((T, B, 2 * S + 1), torch.float32)
    if path == "register":
        assert fwd == [state, "_ctc_emit_kernel", "_ctc_alpha_reg_kernel"]
        assert log == [state, "_ctc_emit_kernel", "_ctc_beta_reg_kernel", "_ctc_grad_frame_kernel"]
    else:
        assert fwd == [state, "_row_lse_kernel", "_ctc_alpha_kernel"]
        assert log == [state, "_ctc_beta_kernel", "_ctc_grad_frame_kernel"]
    exp, ge = _grad(lambda t: ctc_loss(t, tg, il, tl, reduction="none", input_type="logits", backend="torch"), x, up)
    assert_close(loss.detach(), exp, atol=1e-5, rtol=1e-5)
    assert_close(g, ge, atol=1e-5, rtol=1e-4)


def _recursion_path(backend, path, monkeypatch):
    """Force one of the recursions: "torch-own" (the torch backend's own, not PyTorch's native CTC),
    "triton-chunked" (the Triton kernels for targets longer than the register path holds); skip the case
    for the other backend."""
    if path == "torch-own":
        if backend != "torch":
            pytest.skip("the torch backend's own recursions")
        import tri_losses._torch.ctc as tctc
        monkeypatch.setattr(tctc, "native_path", lambda *a: False)
    if path == "triton-chunked":
        if backend != "triton":
            pytest.skip("the Triton backend's chunked kernels")
        from tri_losses.kernels import ctc as K
        monkeypatch.setattr(K, "_blocks", lambda L, C: (4, 8))
        monkeypatch.setattr(K, "REG_MAX_L", 0)


@pytest.mark.parametrize("path", ["default", "torch-own", "triton-chunked"])
def test_ctc_nan_input_propagates_as_pytorch(backend, path, monkeypatch):
    """A NaN score on a valid frame of one sequence: that sequence's loss is NaN (also with zero_infinity, which
    zeroes only infinite losses, and with max_approx) and its gradient NaN on its valid frames and 0 past its
    end, as F.ctc_loss; the other sequences are untouched. On every recursion path of both backends (each
    input type with one zero_infinity setting)."""
    _recursion_path(backend, path, monkeypatch)
    x, tg, il, tl = _batch(C=6)
    x[2, 0, 3] = math.nan  # sequence 0, a valid frame (il[0] = T)
    x[14, 3, 1] = math.nan  # sequence 3, past its end (il[3] = 6): never read
    up = torch.randn(4, device=DEVICE)
    for input_type, zero_infinity in (("logits", False), ("log_probs", True)):
        prep = (lambda t: t) if input_type == "logits" else (lambda t: t.log_softmax(-1))
        got, g = _grad(lambda t: ctc_loss(prep(t), tg, il, tl, reduction="none", zero_infinity=zero_infinity,
                                          input_type=input_type, backend=backend), x, up)
        exp, ge = _grad(lambda t: F.ctc_loss(t.log_softmax(-1), tg, il, tl, reduction="none",
                                             zero_infinity=zero_infinity), x, up)
        assert torch.isnan(got[0]) and torch.isnan(exp[0])
        assert_close(got[1:], exp[1:], atol=1e-4, rtol=1e-5)
        assert torch.isnan(g[:, 0]).all() and torch.isnan(ge[:, 0]).all()
        if input_type == "logits":  # (log_probs: this op's -gamma against PyTorch's p - gamma)
            # (not sequence 3's NaN frame past its end: PyTorch's log_softmax backward turns its 0 into NaN)
            assert_close(g[:, 1:3], ge[:, 1:3], atol=1e-5, rtol=1e-4)
            assert_close(g[:6, 3], ge[:6, 3], atol=1e-5, rtol=1e-4)
        assert torch.isfinite(g[:, 1:3]).all() and torch.isfinite(g[:6, 3]).all()
        if input_type == "logits":  # (log_probs: the NaN row's log_softmax backward is NaN)
            assert (g[6:, 3] == 0).all()
        if path == "default":  # (the mean of the losses above: the same on every recursion path)
            mean = ctc_loss(prep(x), tg, il, tl, zero_infinity=zero_infinity, input_type=input_type,
                            backend=backend)
            assert torch.isnan(mean)
    got = ctc_loss(x, tg, il, tl, reduction="none", input_type="logits", max_approx=True, backend=backend)
    assert torch.isnan(got[0]) and torch.isfinite(got[1:]).all()


@pytest.mark.parametrize("path", ["default", "torch-own", "triton-chunked"])
def test_ctc_nan_on_a_state_no_path_uses_changes_nothing(backend, path, monkeypatch):
    """A NaN log-prob on a (frame, class) cell that no complete path of its sequence uses (PyTorch's CTC never
    visits it): loss and posteriors as F.ctc_loss, finite, on every recursion path; one on a used cell: NaN."""
    _recursion_path(backend, path, monkeypatch)
    g = torch.Generator().manual_seed(0)
    T_, C = 6, 6
    tg = torch.tensor([[1, 2, 3], [4, 4, 0]], device=DEVICE)
    il, tl = torch.tensor([6, 5], device=DEVICE), torch.tensor([3, 2], device=DEVICE)
    lp0 = torch.randn(T_, 2, C, generator=g).log_softmax(-1).to(DEVICE)
    # cells no path uses: label 3 (state 5) at frame 0; label 1 at the last frame of sequence 0; class 5 anywhere
    for t, b, c, used in ((0, 0, 3, False), (5, 0, 1, False), (2, 1, 5, False), (0, 0, 1, True), (3, 1, 4, True)):
        lp = lp0.clone()
        lp[t, b, c] = math.nan
        got, gr = _grad(lambda x: ctc_loss(x, tg, il, tl, reduction="none", backend=backend), lp)
        exp, ge = _grad(lambda x: F.ctc_loss(x, tg, il, tl, reduction="none"), lp)
        assert bool(torch.isnan(got[b])) == used and bool(torch.isnan(exp[b])) == used
        assert_close(got[1 - b], exp[1 - b], atol=1e-5, rtol=1e-5)
        if not used:
            assert_close(got, exp, atol=1e-5, rtol=1e-5)
            gamma_pt = torch.exp(lp) - ge  # PyTorch's log-probs gradient is p - gamma; this op's is -gamma
            frames = (torch.arange(T_, device=DEVICE)[:, None] < il[None, :])[..., None]
            assert torch.isfinite(gr).all() and gr[torch.isnan(lp)].eq(0).all()
            ok = ~torch.isnan(lp) & frames  # (PyTorch's p - gamma is p past a sequence's end)
            assert_close(-gr[ok], gamma_pt[ok], atol=1e-5, rtol=1e-4)
        mx = ctc_loss(lp, tg, il, tl, reduction="none", max_approx=True, backend=backend)
        assert bool(torch.isnan(mx[b])) == used



@pytest.mark.parametrize("path", ["default", "torch-own", "triton-chunked"])
def test_ctc_non_finite_upstream_is_upstream_times_local_derivative(backend, path, monkeypatch):
    """An upstream gradient of inf, -inf or NaN (a loss scaler's overflow) for one sequence: its gradient is the
    upstream times the op's local derivative (the gradient for an upstream of 1), elementwise as IEEE
    multiplies, with log-probs input's zeros (classes and states of posterior 0) kept 0 and 0 on padded frames;
    the rule on every recursion path of each backend (whose gradients for an upstream of 1 agree with each
    other and PyTorch's by the tests above; the backends disagreed here: NaN against -inf or 0). Logits,
    log-probs, the RNA topology and max_approx."""
    _recursion_path(backend, path, monkeypatch)
    x, tg, il, tl = _batch(C=6)
    tg[1, :2] = torch.tensor([3, 3])  # a class on two states of one sequence
    for kw in (dict(input_type="logits"), dict(input_type="log_probs"), dict(input_type="logits", label_loop=False),
               dict(input_type="log_probs", max_approx=True)):
        xin = x if kw["input_type"] == "logits" else x.log_softmax(-1)
        fn = lambda t: ctc_loss(t, tg, il, tl, reduction="none", backend=backend, **kw)  # noqa: E731
        _, local = _grad(fn, xin, torch.ones(4, device=DEVICE))
        for bad in (math.inf, -math.inf, math.nan):
            up = torch.tensor([1.5, bad, -0.5, bad], device=DEVICE)
            _, g = _grad(fn, xin, up)
            exp = local * up[None, :, None]
            if kw["input_type"] == "log_probs":
                exp = torch.where(local != 0, exp, 0.0)
            frames = (torch.arange(x.shape[0], device=DEVICE)[:, None] < il[None, :])[..., None]
            exp = torch.where(frames, exp, 0.0)
            assert torch.equal(torch.isnan(g), torch.isnan(exp)), (kw, bad)
            inf = torch.isinf(exp)
            assert torch.equal(g[inf], exp[inf]) and torch.equal(inf, torch.isinf(g)), (kw, bad)
            fin = torch.isfinite(exp)  # (finite: rounded where the upstream is applied, not exactly the product)
            assert_close(g[fin], exp[fin], atol=1e-6, rtol=1e-5)
            assert not torch.isfinite(g[:, 1][frames[:, 1, 0]]).all()  # the overflow shows in the gradient

def test_ctc_logits_gradient_on_confident_frames_is_as_accurate_as_pytorch(backend):
    """Confident frames (the aligned class ~14 above the rest), fp32 logits: the gradient softmax - gamma has entries
    of 1e-12 .. 1e-5. The torch backend forms it from PyTorch's native exp(e) - gamma (formed in double there) as
    (r - p S) / (1 - S), never as the difference of two fp32 numbers near 1, which left ~1e-7 absolute errors
    (100% on entries of 1e-7); it is as accurate as F.ctc_loss through F.log_softmax in fp32 (both against float64).
    The Triton kernel forms softmax - gamma per element in fp32: within a few ulps of 1."""
    T, C = 12, 4
    lab = torch.tensor([0, 1, 1, 0, 0, 2, 2, 0, 0, 3, 3, 0])
    x = torch.randn(T, 1, C, dtype=torch.float64)
    x[torch.arange(T), 0, lab] += 14.0
    x = x.float().to(DEVICE)
    tgt, il, tl = torch.tensor([[1, 2, 3]]), torch.tensor([T]), torch.tensor([3])
    grads = {}
    for who in ("ours", "torch", "ref"):
        xi = (x.double() if who == "ref" else x.clone()).requires_grad_(True)
        if who == "ours":
            loss = ctc_loss(xi, tgt, il, tl, input_type="logits", reduction="sum", backend=backend)
        else:
            loss = F.ctc_loss(F.log_softmax(xi, -1).cpu(), tgt, il, tl, reduction="sum")
        (grads[who],) = torch.autograd.grad(loss, xi)
    err = {k: float((grads[k].double().cpu() - grads["ref"].cpu()).abs().max()) for k in ("ours", "torch")}
    assert err["ours"] <= (2 * err["torch"] + 1e-11 if backend == "torch" else 5e-7), err
