"""Deep clustering, triplet, expected loss, custom error signals, label-smoothed gradient."""
import pytest
import torch

from tests.conftest import DEVICE, assert_close
from tests.reference import catalogue as ref
from tri_losses.misc import (deep_clustering_loss, expected_loss, label_smoothed_log_prob_gradient,
                             loss_with_gradient, triplet_loss)


def test_deep_clustering_matches_affinity_formula_and_gradient():
    B, T, F, E, S = 2, 5, 3, 4, 2
    emb = torch.randn(B, T, F, E, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    src = torch.randint(0, S, (B, T, F))
    Y = torch.nn.functional.one_hot(src, S).double().to(DEVICE)
    lens = torch.tensor([5, 3], device=DEVICE)
    got = deep_clustering_loss(emb, Y, lens, reduction="none")
    for b in range(B):
        Vb = emb[b, :lens[b]].reshape(-1, E)
        Yb = Y[b, :lens[b]].reshape(-1, S)
        assert got[b].item() == pytest.approx(ref.deep_clustering(Vb, Yb).item(), rel=1e-5)
    # flat RETURNN layout, and the analytic gradient 4 (V (V^T V) - Y (Y^T V)) on valid frames
    flat = deep_clustering_loss(emb.reshape(B, T, F * E), Y.reshape(B, T, F * S), lens, embedding_dim=E,
                                num_sources=S, reduction="sum")
    assert flat.item() == pytest.approx(got.sum().item(), rel=1e-6)
    (g,) = torch.autograd.grad(deep_clustering_loss(emb, Y, lens, reduction="sum"), emb)
    V0 = emb[0].detach().reshape(-1, E)
    Y0 = Y[0].reshape(-1, S)
    assert_close(g[0].reshape(-1, E), 4 * (V0 @ (V0.t() @ V0) - Y0 @ (Y0.t() @ V0)), atol=1e-4, rtol=1e-5)
    assert (g[1, 3:] == 0).all()


def test_triplet_spec_values_and_loop():
    out = torch.tensor([[1, 0, 1, 0.1, 0, 1], [0, 1, 0.2, 1, 1, 0]], device=DEVICE)
    assert triplet_loss(out, torch.tensor([[1, 1, 2], [2, 2, 1]], device=DEVICE),
                        margin=0.5).item() == pytest.approx(0.0487643, abs=1e-6)
    assert triplet_loss(out, torch.tensor([[0, 0, 2], [2, 2, 0]], device=DEVICE),
                        margin=0.5).item() == pytest.approx(4.106787, abs=1e-5)
    x = torch.randn(4, 3 * 5)  # the loop references run on these CPU tensors
    t = torch.randint(0, 3, (4, 3))
    E = torch.cat([x[:, :5], x[:, 5:10], x[:, 10:]])
    lab = torch.cat([t[:, 0], t[:, 1], t[:, 2]])
    assert triplet_loss(x.to(DEVICE), t.to(DEVICE), margin=0.3).item() == pytest.approx(ref.triplet_loop(E, lab, 0.3),
                                                                                        rel=1e-5)
    x6 = torch.randn(4, 6 * 5)
    ch = [x6[:, k * 5:(k + 1) * 5] for k in range(6)]
    exp = (ref.triplet_loop(torch.cat([ch[0], ch[4], ch[5]]), lab, 0.3)
           + ref.triplet_loop(torch.cat([ch[1], ch[4], ch[2]]), lab, 0.3))
    assert triplet_loss(x6.to(DEVICE), t.to(DEVICE), margin=0.3, multi_view=True).item() == pytest.approx(exp,
                                                                                                          rel=1e-5)


def test_expected_loss_spec_values_and_gradients():
    s = torch.log(torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64, device=DEVICE)).requires_grad_(True)
    L = torch.tensor([[1.0, 2.0, 4.0]], dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert expected_loss(L, s).item() == pytest.approx(-0.144444, abs=1e-6)
    assert expected_loss(L, s, loss_correction_grad_only=True).item() == pytest.approx(0.633333, abs=1e-6)
    assert expected_loss(L, s, subtract_average_loss=False).item() == pytest.approx(0.633333, abs=1e-6)
    assert expected_loss(L, s, divide_beam_size=False).item() == pytest.approx(-0.433333, abs=1e-6)
    gs, gL = torch.autograd.grad(expected_loss(L, s), [s, L])
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    Lp = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64) - 7 / 3
    assert_close(gs[0], w * Lp / 3)          # lse detached: no softmax Jacobian
    assert_close(gL[0], w / 3)
    gs2, = torch.autograd.grad(expected_loss(L, s, norm_scores_stop_gradient=False), [s])
    assert_close(gs2[0], w * (Lp - (w * Lp).sum()) / 3)


def test_loss_with_gradient_spec_values():
    x = torch.tensor(2.0, device=DEVICE, requires_grad=True)
    v = loss_with_gradient(1.0, x, 3.0)
    v.backward()
    assert v.item() == 1.0 and x.grad.item() == 3.0
    x.grad = None
    v = 2 * loss_with_gradient(2.0, x, 3.0)
    v.backward()
    assert v.item() == 4.0 and x.grad.item() == 6.0
    xs = torch.randn(3, 4).to(DEVICE).requires_grad_(True)
    gx = torch.randn(3, 4).to(DEVICE)
    vals = loss_with_gradient(torch.ones(3, device=DEVICE), xs, gx)
    up = torch.tensor([1.0, 2.0, 3.0], device=DEVICE)
    (vals * up).sum().backward()
    assert_close(xs.grad, gx * up[:, None])
    with pytest.raises(ValueError, match="value"):
        loss_with_gradient(torch.ones(4), xs, gx)


def test_label_smoothed_log_prob_gradient_formula():
    V = 6
    lp = torch.randn(2, V).log_softmax(-1).to(DEVICE).requires_grad_(True)
    out = label_smoothed_log_prob_gradient(lp, 0.1)
    assert torch.equal(out, lp)
    post = torch.softmax(torch.randn(2, V), -1).to(DEVICE)
    (g,) = torch.autograd.grad(out, lp, -post)
    floor = 0.1 / (V - 1)
    assert_close(g, -((1 - V * floor) * post + floor))  # minus the smoothed posterior
    (g2,) = torch.autograd.grad(label_smoothed_log_prob_gradient(lp, 0.1, exclude_labels=[0]), lp, -post)
    fl = 0.1 / (V - 2)
    exp = -((1 - (V - 1) * fl) * post + fl)
    exp[:, 0] = -post[:, 0]
    assert_close(g2, exp)
    (g3,) = torch.autograd.grad(label_smoothed_log_prob_gradient(lp, 0.1), lp, torch.zeros(2, V, device=DEVICE))
    assert (g3 == 0).all()
    with pytest.raises(RuntimeError, match="triton"):
        label_smoothed_log_prob_gradient(lp, 0.1, backend="triton")


def test_label_smoothed_log_prob_gradient_counts_exclude_labels_as_returnn():
    """RETURNN's constants use len(exclude_labels): a repeated id counts each time (floor = s / (V - E - 1) with
    E = 3 for [1, 4, 1]); the excluded labels are 1 and 4. float64 formula."""
    V, s = 7, 0.2
    lp = torch.randn(3, V, dtype=torch.float64, device=DEVICE, requires_grad=True)
    g = torch.randn(3, V, dtype=torch.float64, device=DEVICE)
    (out,) = torch.autograd.grad(label_smoothed_log_prob_gradient(lp, s, exclude_labels=[1, 4, 1]), lp, g)
    fl = s / (V - 3 - 1)
    factor = torch.full((V,), 1 - (V - 3) * fl, dtype=torch.float64, device=DEVICE)
    floor = torch.full((V,), fl, dtype=torch.float64, device=DEVICE)
    factor[[1, 4]], floor[[1, 4]] = 1.0, 0.0
    assert_close(out, factor * g - floor * g.abs().sum(-1, keepdim=True), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_label_smoothed_log_prob_gradient_half_is_computed_in_fp32_and_cast_once(dtype):
    V = 300
    lp = torch.randn(16, V).to(dtype).to(DEVICE).requires_grad_(True)
    g = (torch.randn(16, V) * 3).to(dtype)
    (out,) = torch.autograd.grad(label_smoothed_log_prob_gradient(lp, 0.3, exclude_labels=[0]), lp, g.to(DEVICE))
    assert out.dtype == dtype
    out = out.cpu()
    gd = g.double()
    fl = 0.3 / (V - 2)
    factor = torch.full((V,), 1 - (V - 1) * fl, dtype=torch.float64)
    floor = torch.full((V,), fl, dtype=torch.float64)
    factor[0], floor[0] = 1.0, 0.0
    ref = factor * gd - floor * gd.abs().sum(-1, keepdim=True)
    # one rounding of the float64 value (a fp32 intermediate may double-round a rare tie)
    err = (out.double() - ref).abs()
    once = (ref.to(dtype).double() - ref).abs()
    assert (err > once * (1 + 1e-6) + 1e-30).float().mean() < 0.01


_x4 = torch.randn(2, 3, 4, 5)
_BAD = [
    (lambda: deep_clustering_loss(_x4.reshape(2, 3, 20), torch.ones(2, 3, 8)), ValueError, "embedding_dim"),
    (lambda: deep_clustering_loss(_x4.reshape(2, 3, 20), torch.ones(2, 3, 8), embedding_dim=3), ValueError,
     "embeddings"),
    (lambda: deep_clustering_loss(_x4, torch.ones(2, 3, 5, 2)), ValueError, "targets"),
    (lambda: deep_clustering_loss(_x4, torch.ones(2, 3, 4, 2), reduction="avg"), ValueError, "reduction"),
    (lambda: triplet_loss(torch.randn(4, 7), torch.zeros(4, 3, dtype=torch.long), margin=1.0), ValueError, "output"),
    (lambda: triplet_loss(torch.randn(4, 6), torch.zeros(4, 2, dtype=torch.long), margin=1.0), ValueError, "target"),
    (lambda: triplet_loss(torch.randn(4, 6), torch.zeros(4, 3, dtype=torch.long), margin="1"), TypeError, "margin"),
    (lambda: expected_loss(torch.randn(2, 3), torch.randn(2, 4)), ValueError, "scores"),
    (lambda: expected_loss(torch.randint(0, 3, (2, 3)), torch.randn(2, 3)), TypeError, "losses"),
    (lambda: loss_with_gradient(torch.ones(5), torch.randn(2, 3), torch.randn(2, 3)), ValueError, "value"),
    (lambda: loss_with_gradient(torch.ones(2), torch.randn(2, 3), torch.randn(4, 3)), ValueError, "grad_x"),
    (lambda: label_smoothed_log_prob_gradient(torch.randn(2, 5), 1.5), ValueError, "smoothing"),
    (lambda: label_smoothed_log_prob_gradient(torch.randn(2, 5), 0.1, exclude_labels=[7]), ValueError,
     "exclude_labels"),
    (lambda: label_smoothed_log_prob_gradient(torch.randn(2, 5).long(), 0.1), TypeError, "log_prob"),
]


@pytest.mark.parametrize("call,exc,name", _BAD, ids=[b[2] + str(i) for i, b in enumerate(_BAD)])
def test_misc_bad_input_raises_naming_argument(call, exc, name):
    with pytest.raises(exc, match=name):
        call()


def test_segment_sum_sorted_path_matches_scatter_add():
    """The atomics-free segment sum (the CUDA path of the torch backend) vs scatter_add_, exactly in fp64."""
    from tri_losses._torch import segment_sum, sorted_segment_sum
    src = torch.randn(4, 3, 60, dtype=torch.float64)
    idx = torch.randint(0, 9, (3, 60))
    exp = torch.zeros(4, 3, 9, dtype=torch.float64).scatter_add_(-1, idx.expand(4, 3, 60), src)  # on the CPU
    src, idx = src.to(DEVICE), idx.to(DEVICE)
    torch.testing.assert_close(sorted_segment_sum(src, idx, 9).cpu(), exp, atol=1e-13, rtol=0)
    # segment_sum: on CPU scatter_add_ itself (exact), elsewhere the sorted path
    torch.testing.assert_close(segment_sum(src, idx, 9).cpu(), exp, atol=0 if DEVICE.type == "cpu" else 1e-13, rtol=0)
    one = sorted_segment_sum(src[0, 0], idx[0], 12)  # 1-D, ids never used -> 0
    assert one.shape == (12,) and (one[9:] == 0).all()


def test_loss_with_gradient_keeps_value_precision_and_broadcasts_grad():
    from tri_losses.misc import loss_with_gradient
    x = torch.randn(2, 3, dtype=torch.float16).to(DEVICE).requires_grad_(True)
    v = loss_with_gradient(torch.tensor(70000.0, device=DEVICE), x, torch.full((3,), 0.5, device=DEVICE))  # (3,) broadcasts to x (2, 3)
    assert v.dtype == torch.float32 and v.item() == 70000.0  # no fp16 overflow
    v.backward()
    assert x.grad.dtype == torch.float16 and x.grad.shape == (2, 3) and (x.grad == 0.5).all()
    with pytest.raises(ValueError, match="grad_x"):
        loss_with_gradient(1.0, torch.randn(3), torch.ones(2, 3))  # broadcasts beyond x's shape


def test_misc_dtypes_and_dim_checks():
    from tri_losses.misc import deep_clustering_loss, expected_loss, label_smoothed_log_prob_gradient, triplet_loss
    emb = torch.randn(2, 3, 4, 2, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    tgt = torch.nn.functional.one_hot(torch.randint(0, 2, (2, 3, 4)), 2).double().to(DEVICE)
    assert torch.autograd.gradcheck(lambda e: deep_clustering_loss(e, tgt, reduction="sum"), (emb,))
    out = triplet_loss(torch.randn(2, 6).half().to(DEVICE), torch.tensor([[1, 1, 2], [2, 2, 1]], device=DEVICE),
                       margin=0.5)
    assert out.dtype == torch.float32
    assert expected_loss(torch.rand(2, 3).half().to(DEVICE), torch.randn(2, 3).half().to(DEVICE)).dtype == torch.float32
    with pytest.raises(ValueError, match="dim"):
        label_smoothed_log_prob_gradient(torch.randn(2, 3).to(DEVICE), 0.1, dim=5)


def test_row_segment_sum_matches_index_add():
    from tri_losses._torch import row_segment_sum
    rows = torch.randn(37, 5, dtype=torch.float64)
    ids = torch.randint(0, 6, (37,))
    key, sums, last = (t.cpu() for t in row_segment_sum(rows.to(DEVICE), ids.to(DEVICE)))
    exp = torch.zeros(6, 5, dtype=torch.float64).index_add_(0, ids, rows)
    assert torch.equal(key, torch.sort(ids).values)
    torch.testing.assert_close(sums, exp[key], atol=1e-13, rtol=0)  # every position holds its run's sum
    assert torch.equal(key[last], torch.unique(ids))


def test_deep_clustering_nan_in_padded_frames_does_not_leak():
    B, T, F, E, S = 2, 5, 3, 4, 2
    emb = torch.randn(B, T, F, E, dtype=torch.float64)
    Y = torch.nn.functional.one_hot(torch.randint(0, S, (B, T, F)), S).double()
    lens = torch.tensor([5, 3])
    dirty, ydirty = emb.clone(), Y.clone()
    dirty[1, 3:] = float("nan")
    dirty[1, 4, 0, 0] = float("inf")
    ydirty[1, 3:] = float("nan")
    x = dirty.to(DEVICE).requires_grad_()
    got = deep_clustering_loss(x, ydirty.to(DEVICE), lens.to(DEVICE), reduction="none")
    up = torch.tensor([0.3, -1.7], dtype=torch.float64)
    (g,) = torch.autograd.grad(got, x, up.to(DEVICE))
    got, g = got.detach().cpu(), g.cpu()  # the float64 references below run on the CPU
    for b in range(B):
        Vb, Yb = emb[b, :lens[b]].reshape(-1, E), Y[b, :lens[b]].reshape(-1, S)
        assert got[b].item() == pytest.approx(ref.deep_clustering(Vb, Yb).item(), rel=1e-10)
        assert torch.allclose(g[b, :lens[b]].reshape(-1, E), up[b] * 4 * (Vb @ (Vb.T @ Vb) - Yb @ (Yb.T @ Vb)))
    assert torch.equal(g[1, 3:], torch.zeros_like(g[1, 3:]))


def test_deep_clustering_empty_batch():
    for emb, tgt, kw in ((torch.randn(0, 3, 4, 2), torch.ones(0, 3, 4, 2), {}),
                         (torch.randn(0, 3, 8), torch.ones(0, 3, 8), dict(embedding_dim=2, num_sources=2))):
        emb, tgt = emb.to(DEVICE), tgt.to(DEVICE)
        assert deep_clustering_loss(emb, tgt, reduction="none", **kw).shape == (0,)
        assert deep_clustering_loss(emb, tgt, reduction="sum", **kw).item() == 0.0
