"""cross_entropy / CrossEntropyLoss / frame_error on both backends.

References: torch.nn.functional.cross_entropy for the torch-compatible options, and the float64
formulas of tests/reference/ce.py (gradients by autograd) for the extensions.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import DEVICE, HAS_CUDA, TOL, assert_close, assert_same_rounding, poison_allocations
from tests.reference import ce as ref
from tri_losses.cross_entropy import CrossEntropyLoss, cross_entropy, frame_error


def _sparse_target(shape, C, ignore_frac=0.25, ignore_index=-100):
    y = torch.randint(0, C, shape, device=DEVICE)
    if ignore_frac:
        y = torch.where(torch.rand(shape, device=DEVICE) < ignore_frac, torch.full_like(y, ignore_index), y)
    return y


def _run(fn, x, upstream=None):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    if isinstance(out, tuple):
        out = out[0]
    g = torch.ones_like(out) if upstream is None else upstream
    (grad,) = torch.autograd.grad(out, x, g)
    return out.detach(), grad


# ------------------------------------------------------------------------------------------------
# against torch.nn.functional.cross_entropy
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(37,), (13, 37), (3, 37, 2, 3)], ids=["C", "NC", "NCd1d2"])
@pytest.mark.parametrize("dense", [False, True], ids=["ids", "probs"])
@pytest.mark.parametrize("weighted", [False, True], ids=["nowt", "wt"])
@pytest.mark.parametrize("smoothing", [0.0, 0.15])
def test_ce_matches_torch(backend, shape, dense, weighted, smoothing):
    C = shape[0] if len(shape) == 1 else shape[1]
    x = torch.randn(shape, device=DEVICE) * 3
    if dense:
        target = torch.softmax(torch.randn(shape, device=DEVICE), dim=0 if len(shape) == 1 else 1)
    else:
        tshape = () if len(shape) == 1 else (shape[0],) + shape[2:]
        target = _sparse_target(tshape, C, ignore_frac=0.0 if len(shape) == 1 else 0.25)
        if len(shape) > 1:
            target.view(-1)[0] = 1  # at least one valid row
    w = torch.rand(C, device=DEVICE) + 0.5 if weighted else None
    for reduction in ("none", "mean", "sum"):
        up = torch.randn(x.shape[:1] + x.shape[2:], device=DEVICE) if (reduction == "none" and len(shape) > 1) else None
        got, g = _run(lambda t: cross_entropy(t, target, w, reduction=reduction, label_smoothing=smoothing,
                                              backend=backend), x, up)
        exp, ge = _run(lambda t: F.cross_entropy(t, target, w, reduction=reduction, label_smoothing=smoothing), x, up)
        assert got.dtype == torch.float32
        assert_close(got, exp, msg=f"value {reduction}")
        assert_close(g, ge, msg=f"grad {reduction}")


def test_ce_all_rows_ignored_mean_is_nan_and_grad_zero(backend):
    x = torch.randn(5, 11, device=DEVICE)
    y = torch.full((5,), -100, device=DEVICE)
    got, g = _run(lambda t: cross_entropy(t, y, backend=backend), x)
    exp, ge = _run(lambda t: F.cross_entropy(t, y), x)
    assert math.isnan(got.item()) and math.isnan(exp.item())
    torch.testing.assert_close(g, ge, equal_nan=True)
    s, gs = _run(lambda t: cross_entropy(t, y, reduction="sum", backend=backend), x)
    assert s.item() == 0.0 and (gs == 0).all()


def test_ce_ignored_rows_get_zero_grad(backend):
    x = torch.randn(6, 19, device=DEVICE)
    y = _sparse_target((6,), 19, ignore_frac=0.0)
    y[::2] = 7
    y[1] = -5
    _, g = _run(lambda t: cross_entropy(t, y, ignore_index=-5, label_smoothing=0.1, z_loss=1e-3, backend=backend), x)
    assert (g[1] == 0).all() and (g[0] != 0).any()


def test_ce_module_is_a_dropin(backend):
    x = torch.randn(9, 23, device=DEVICE)
    y = _sparse_target((9,), 23)
    y[0] = 3
    w = torch.rand(23, device=DEVICE)
    mine = CrossEntropyLoss(weight=w, label_smoothing=0.05, backend=backend)
    theirs = torch.nn.CrossEntropyLoss(weight=w, label_smoothing=0.05)
    assert_close(mine(x, y), theirs(x, y))
    assert "weight" in dict(mine.named_buffers())


# ------------------------------------------------------------------------------------------------
# against the float64 reference (extensions)
# ------------------------------------------------------------------------------------------------
EXT_CASES = {
    "focal2": dict(focal_gamma=2.0),
    "focal0.5_smooth": dict(focal_gamma=0.5, label_smoothing=0.1),
    "focal_others_wt": dict(focal_gamma=1.5, label_smoothing=0.2, label_smoothing_mode="others", weighted=True),
    "others": dict(label_smoothing=0.2, label_smoothing_mode="others"),
    "gaussian": dict(label_smoothing=0.3, label_smoothing_mode="gaussian"),
    "gaussian_wt": dict(label_smoothing=0.5, label_smoothing_mode="gaussian", weighted=True),
    "z_loss": dict(z_loss=1e-2),
    "z_loss_wt_smooth": dict(z_loss=5e-2, label_smoothing=0.1, weighted=True),
    "z_loss_others": dict(z_loss=1e-2, label_smoothing=0.2, label_smoothing_mode="others"),
    "z_loss_gaussian_wt": dict(z_loss=2e-2, label_smoothing=0.3, label_smoothing_mode="gaussian", weighted=True),
    "z_loss_focal": dict(z_loss=0.1, focal_gamma=2.0),
    "z_loss_softcap_big": dict(z_loss=0.5, softcap=1.5),
    "softcap": dict(softcap=2.5),
    "softcap_z_focal_smooth": dict(softcap=4.0, z_loss=1e-3, focal_gamma=1.0, label_smoothing=0.1),
    "log_probs": dict(input_type="log_probs"),
    "log_probs_focal_smooth": dict(input_type="log_probs", focal_gamma=2.0, label_smoothing=0.1),
    "probs": dict(input_type="probs"),
    "probs_focal_others": dict(input_type="probs", focal_gamma=2.0, label_smoothing=0.1,
                               label_smoothing_mode="others"),
}


def _ext_input(kind, N, C):
    x = torch.randn(N, C, device=DEVICE) * 2
    if kind == "log_probs":
        return torch.log_softmax(x, 1)
    if kind == "probs":
        p = torch.softmax(x, 1)
        p[0, :3] = 0.0  # exact zeros (incl. possibly the target): finite loss, finite gradient
        return p
    return x


@pytest.mark.parametrize("case", list(EXT_CASES))
def test_ce_extensions_match_float64_reference(backend, case):
    kw = dict(EXT_CASES[case])
    weighted = kw.pop("weighted", False)
    N, C = 12, 29
    x = _ext_input(kw.get("input_type", "logits"), N, C)
    y = _sparse_target((N,), C)
    y[0] = 1
    w = torch.rand(C, device=DEVICE) + 0.5 if weighted else None
    up = torch.randn(N, device=DEVICE)
    got, g = _run(lambda t: cross_entropy(t, y, w, reduction="none", backend=backend, **kw), x, up)
    rkw = dict(eps=kw.get("label_smoothing", 0.0), mode=kw.get("label_smoothing_mode", "torch"),
               input_type=kw.get("input_type", "logits"), gamma=kw.get("focal_gamma", 0.0),
               z_loss=kw.get("z_loss", 0.0), softcap=kw.get("softcap"))
    exp, ge = _run(lambda t: ref.ce_rows(t, y.cpu(), w.cpu() if w is not None else None, **rkw)[0], x.cpu(), up.cpu())
    assert torch.isfinite(got).all() and torch.isfinite(g).all()
    assert_close(got, exp, atol=1e-5, rtol=1e-5)
    assert_close(g, ge, atol=1e-5, rtol=1e-5)
    # mean reduction: same normalisation as PyTorch (sum w_y over valid rows)
    m = cross_entropy(x, y, w, backend=backend, **kw)
    rows, valid = ref.ce_rows(x.cpu(), y.cpu(), w.cpu() if w is not None else None, **rkw)
    assert_close(m, ref.reduce(rows, valid, y.cpu(), w.cpu() if w is not None else None, "mean", False),
                 atol=1e-5, rtol=1e-5)


def test_ce_dense_targets_with_smoothing_and_weights_match_reference(backend):
    x = torch.randn(8, 17, device=DEVICE)
    q = torch.softmax(torch.randn(8, 17, device=DEVICE) * 2, 1)
    w = torch.rand(17, device=DEVICE) + 0.1
    up = torch.randn(8, device=DEVICE)
    got, g = _run(lambda t: cross_entropy(t, q, w, label_smoothing=0.2, reduction="none", backend=backend), x, up)
    exp, ge = _run(lambda t: ref.ce_rows(t, q.cpu(), w.cpu(), eps=0.2)[0], x.cpu(), up.cpu())
    assert_close(got, exp)
    assert_close(g, ge)


def test_ce_probability_target_gets_its_gradient(backend):
    """Soft targets that require grad (distillation): d loss / d q and d loss / d x, with a random
    per-row upstream gradient, against PyTorch (logits, with smoothing and weights) and the float64
    reference (log-probs input); a mean reduction too; and only the target requiring grad."""
    N, C = 6, 11
    x = torch.randn(N, C, device=DEVICE)
    q = torch.softmax(torch.randn(N, C, device=DEVICE), 1)
    w = torch.rand(C, device=DEVICE) + 0.2
    up = torch.randn(N, device=DEVICE)

    def grads(fn, xs, red_up):
        xg, qg = xs.clone().requires_grad_(True), q.clone().requires_grad_(True)
        out = fn(xg, qg)
        return torch.autograd.grad(out, (xg, qg), red_up if out.dim() else None)

    for kw in (dict(label_smoothing=0.3, weight=w), dict(), dict(weight=w)):
        got = grads(lambda t, tq: cross_entropy(t, tq, reduction="none", backend=backend, **kw), x, up)
        exp = grads(lambda t, tq: F.cross_entropy(t, tq, reduction="none", **kw), x, up)
        assert_close(got[0], exp[0], msg=f"dx {kw.keys()}")
        assert_close(got[1], exp[1], msg=f"dq {kw.keys()}")
    got = grads(lambda t, tq: cross_entropy(t, tq, weight=w, label_smoothing=0.1, backend=backend), x, None)
    exp = grads(lambda t, tq: F.cross_entropy(t, tq, weight=w, label_smoothing=0.1), x, None)
    assert_close(got[0], exp[0])
    assert_close(got[1], exp[1])
    lp = x.log_softmax(1)
    got = grads(lambda t, tq: cross_entropy(t, tq, reduction="none", input_type="log_probs", backend=backend), lp, up)
    xr, qr = lp.cpu().clone().requires_grad_(True), q.cpu().clone().requires_grad_(True)
    exp = torch.autograd.grad(ref.ce_rows(xr, qr, input_type="log_probs")[0], (xr, qr), up.cpu().double())
    assert_close(got[0], exp[0])
    assert_close(got[1], exp[1])
    # only the target requires grad
    qg = q.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(cross_entropy(x, qg, reduction="none", backend=backend), qg, up)
    assert_close(g, -x.log_softmax(1) * up[:, None])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ce_fp32_probability_targets_with_16bit_logits_keep_their_precision(backend, dtype):
    """fp32 soft targets with 16-bit logits are read in fp32, not rounded to the logits' dtype: loss and
    target gradient against float64 on the same (rounded) logits, both backends alike."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 9, generator=g) * 2).to(dtype)
    q = torch.softmax(torch.randn(8, 9, generator=g), 1)
    up = torch.randn(8, generator=g)
    xr, qr = x.double().requires_grad_(True), q.double().requires_grad_(True)
    er = F.cross_entropy(xr, qr, reduction="none")
    exp = torch.autograd.grad(er, (xr, qr), up.double())
    xg, qg = x.to(DEVICE).requires_grad_(True), q.to(DEVICE).requires_grad_(True)
    out = cross_entropy(xg, qg, reduction="none", backend=backend)
    got = torch.autograd.grad(out, (xg, qg), up.to(DEVICE))
    assert out.dtype == torch.float32 and got[1].dtype == torch.float32
    assert_close(out.cpu().double(), er.detach(), atol=1e-6, rtol=1e-6)
    assert_close(got[1].cpu().double(), exp[1], atol=1e-6, rtol=1e-6)
    assert_close(got[0].cpu().double(), exp[0], atol=1e-2, rtol=1e-2)  # in the logits' dtype


def test_ce_zero_classes_like_pytorch(backend):
    x = torch.randn(3, 0, device=DEVICE, requires_grad=True)
    y = torch.full((3,), -100, device=DEVICE)
    assert torch.isnan(cross_entropy(x, y, backend=backend))  # mean over no rows: 0/0
    out = cross_entropy(x, y, reduction="sum", backend=backend)
    assert out.item() == 0 == F.cross_entropy(x, y, reduction="sum").item()
    out.backward()
    assert x.grad.shape == (3, 0)
    # probability targets over no classes: PyTorch's mean divides by numel / C = 0 / 0
    q = torch.zeros(3, 0, device=DEVICE)
    for red in ("mean", "sum", "none"):
        exp = F.cross_entropy(x.detach(), q, reduction=red)
        assert_close(cross_entropy(x.detach(), q, reduction=red, backend=backend), exp)


def test_ce_label_smoothing_as_a_zero_dim_tensor_like_pytorch(backend):
    """PyTorch's float arguments take a 0-dim tensor without grad (float or int dtype): label_smoothing as one
    gives PyTorch's value and gradient, for the function, the module and linear_cross_entropy; one that requires
    grad, or has a dim, raises TypeError naming it, as PyTorch refuses it."""
    from tri_losses.linear_cross_entropy import linear_cross_entropy
    x = torch.randn(6, 9, device=DEVICE)
    y = torch.randint(0, 9, (6,), device=DEVICE)
    h, W = torch.randn(6, 5, device=DEVICE), torch.randn(9, 5, device=DEVICE)
    up = torch.rand(6, device=DEVICE)

    def _grad(fn, t):
        t = t.clone().requires_grad_(True)
        out = fn(t)
        return out.detach(), torch.autograd.grad(out, t, up)[0]

    for ls in (torch.tensor(0.2), torch.tensor(0.2, dtype=torch.float64), torch.tensor(1)):
        exp, ge = _grad(lambda t: F.cross_entropy(t, y, reduction="none", label_smoothing=ls), x)
        for fn in (lambda t: cross_entropy(t, y, reduction="none", label_smoothing=ls, backend=backend),
                   lambda t: CrossEntropyLoss(reduction="none", label_smoothing=ls)(t, y)):
            got, g = _grad(fn, x)
            assert_close(got, exp)
            assert_close(g, ge)
        assert_close(linear_cross_entropy(h, W, y, label_smoothing=ls, backend=backend),
                     F.cross_entropy(h @ W.t(), y, label_smoothing=ls))  # (F.linear_cross_entropy: torch >= 2.12)
    for bad in (torch.tensor(0.2, requires_grad=True), torch.tensor([0.2])):
        with pytest.raises(TypeError, match="label_smoothing: expected a number, got Tensor"):
            cross_entropy(x, y, label_smoothing=bad, backend=backend)
        with pytest.raises(TypeError, match="label_smoothing: expected a number, got Tensor"):
            linear_cross_entropy(h, W, y, label_smoothing=bad, backend=backend)


def test_ce_probability_targets_take_a_negative_ignore_index_as_pytorch(backend):
    """PyTorch rejects ignore_index >= 0 with probability targets and accepts a negative one (it has no
    effect): the same here, value and gradient."""
    x = torch.randn(4, 5, device=DEVICE, requires_grad=True)
    q = torch.rand(4, 5, device=DEVICE).softmax(-1)
    for ii in (-1, -7, -100):
        got = torch.autograd.grad(cross_entropy(x, q, ignore_index=ii, backend=backend), x)[0]
        exp = torch.autograd.grad(F.cross_entropy(x, q, ignore_index=ii), x)[0]
        assert_close(got, exp)
    for ii in (0, 3):
        with pytest.raises(RuntimeError):
            F.cross_entropy(x, q, ignore_index=ii)
        with pytest.raises(ValueError, match="ignore_index: not supported for probability targets"):
            cross_entropy(x, q, ignore_index=ii, backend=backend)


def test_ce_int64_ids_beyond_int32_are_not_truncated(backend):
    """The custom op itself (unchecked, as on CUDA without validate=True): an id that would wrap to a
    valid class (2**32 + 1) or to ignore_index gives a NaN row, never another class's loss."""
    import importlib
    M = importlib.import_module("tri_losses.cross_entropy")
    x = torch.randn(3, 7, device=DEVICE)
    y = torch.tensor([2**32 + 1, 2**32 - 100, 3], device=DEVICE)
    loss, _, _ = M._ce_fwd(x, y, None, False, -100, 0.0, 0, 0, 0.0, 0.0, 0.0, math.inf, 0, 0, False, backend == "triton")
    assert torch.isnan(loss[:2]).all()
    assert_close(loss[2], F.cross_entropy(x[2:], y[2:]))


def test_ce_probs_input_zero_probability_gradient_matches_reference_in_half(backend):
    """Target probability exactly 0: value -log(1e-20) and gradient -g/1e-20 (RETURNN's safe_log),
    saturated to the dtype's largest finite value (16-bit), against the float64 reference."""
    p = torch.softmax(torch.randn(4, 9, device=DEVICE), 1)
    y = torch.tensor([1, 2, 3, 4], device=DEVICE)
    p[torch.arange(1, 4), y[1:]] = 0.0  # rows 1-3: the target has probability exactly 0
    p[0, 5] = 0.0  # row 0: a zero off the target (gradient there: 0)
    up = torch.randn(4, device=DEVICE)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        pd = p.to(dt)
        got, g = _run(lambda t: cross_entropy(t, y, input_type="probs", reduction="none", backend=backend), pd, up)
        exp, ge = _run(lambda t: ref.ce_rows(t, y.cpu(), input_type="probs")[0], pd.double().cpu(), up.double().cpu())
        big = torch.finfo(dt).max
        assert g.dtype == dt
        assert_close(got, exp, dtype=dt)
        assert_close(g, ge.clamp(-big, big), dtype=dt)


def test_ce_fake_upper_bound_clips_value_keeps_gradient(backend):
    x = torch.randn(10, 15, device=DEVICE) * 4
    y = _sparse_target((10,), 15, ignore_frac=0.0)
    up = torch.randn(10, device=DEVICE)
    raw, graw = _run(lambda t: ref.ce_rows(t, y.cpu())[0], x.cpu(), up.cpu())
    U = float(raw.median())
    got, g = _run(lambda t: cross_entropy(t, y, reduction="none", fake_upper_bound=U, backend=backend), x, up)
    assert (raw > U).any() and (raw < U).any()
    assert_close(got, torch.clamp(raw, max=U))
    assert_close(g, graw)


def test_ce_return_lse_and_its_gradient(backend):
    x = torch.randn(7, 33, device=DEVICE)
    y = _sparse_target((7,), 33)
    xr = x.clone().requires_grad_(True)
    loss, lse = cross_entropy(xr, y, reduction="sum", return_lse=True, backend=backend)
    assert_close(lse, torch.logsumexp(x, 1))
    gl = torch.randn(7, device=DEVICE)
    (g,) = torch.autograd.grad(loss + (lse * gl).sum(), xr)
    xe = x.clone().requires_grad_(True)
    (ge,) = torch.autograd.grad(F.cross_entropy(xe, y, reduction="sum") + (torch.logsumexp(xe, 1) * gl).sum(), xe)
    assert_close(g, ge)


def test_ce_stride0_upstream_grad(backend):
    x = torch.randn(6, 21, device=DEVICE)
    y = _sparse_target((6,), 21)
    y[0] = 2
    up = torch.full((), 0.7, device=DEVICE).expand(6)
    _, g = _run(lambda t: cross_entropy(t, y, reduction="none", backend=backend), x, up)
    _, ge = _run(lambda t: F.cross_entropy(t, y, reduction="none"), x, up)
    assert_close(g, ge)


@pytest.mark.parametrize("dtype", [torch.float64])
def test_ce_gradcheck_float64_torch_backend(dtype):
    N, C = 4, 7
    y = torch.tensor([1, 3, -100, 6])
    w = torch.rand(C, dtype=dtype) + 0.5
    for kw in (dict(), dict(weight=w, label_smoothing=0.2), dict(focal_gamma=1.5, z_loss=0.1, softcap=3.0),
               dict(label_smoothing=0.3, label_smoothing_mode="gaussian", focal_gamma=2.0),
               dict(label_smoothing=0.1, label_smoothing_mode="others", weight=w)):
        x = torch.randn(N, C, dtype=dtype, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: cross_entropy(t, y, reduction="none", backend="torch", **kw), (x,))
    lp = torch.log_softmax(torch.randn(N, C, dtype=dtype), 1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: cross_entropy(t, y, reduction="none", input_type="log_probs",
                                                            focal_gamma=2.0, backend="torch"), (lp,))
    p = (torch.softmax(torch.randn(N, C, dtype=dtype), 1) * 0.9 + 0.01).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: cross_entropy(t, y, reduction="none", input_type="probs",
                                                            focal_gamma=2.0, backend="torch"), (p,))


# ------------------------------------------------------------------------------------------------
# half precision: no worse than PyTorch against float64 truth
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ce_half_precision_no_worse_than_torch(backend, dtype):
    N, C = 24, 200
    x = torch.randn(N, C, device=DEVICE) * 3
    y = torch.randint(0, C, (N,), device=DEVICE)
    ar = torch.arange(N, device=DEVICE)
    x[:8, :] = torch.randn(8, C, device=DEVICE)
    x[ar[:8], y[:8]] = 12.0  # confident rows, p_y ~ 0.999
    big = 1e4 if dtype == torch.bfloat16 else 6e4
    x[8:12] = torch.randn(4, C, device=DEVICE).sign() * big * torch.rand(4, C, device=DEVICE)  # extreme logits
    x[12:16, ::3] = -math.inf  # masked vocabulary
    x[ar[12:16], y[12:16]] = 0.5
    xh = x.to(dtype)
    up = torch.randn(N, device=DEVICE)
    truth, gt = _run(lambda t: F.cross_entropy(t, y, reduction="none"), xh.double(), up.double())
    mine, gm = _run(lambda t: cross_entropy(t, y, reduction="none", backend=backend), xh, up)
    theirs, gth = _run(lambda t: F.cross_entropy(t, y, reduction="none"), xh, up.to(dtype))
    assert torch.isfinite(mine).all()
    err_m = (mine.double() - truth).abs()
    err_t = (theirs.double() - truth).abs()
    assert (err_m <= err_t + 1e-6 * (1 + truth.abs())).all(), (err_m.max(), err_t.max())
    gerr_m = (gm.double() - gt).abs().max()
    gerr_t = (gth.double() - gt).abs().max()
    assert gerr_m <= gerr_t * 1.01 + 1e-6, (gerr_m, gerr_t)
    assert gm.dtype == dtype


# ------------------------------------------------------------------------------------------------
# shapes, layout, memory semantics
# ------------------------------------------------------------------------------------------------
def test_ce_empty_batch(backend):
    x = torch.randn(0, 13, device=DEVICE, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long, device=DEVICE)
    s = cross_entropy(x, y, reduction="sum", backend=backend)
    assert s.item() == 0.0
    assert math.isnan(cross_entropy(x, y, backend=backend).item())  # 0/0 as in PyTorch
    s.backward()
    assert x.grad.shape == (0, 13)
    assert cross_entropy(x, y, reduction="none", backend=backend).shape == (0,)


def test_ce_non_contiguous_input(backend):
    base = torch.randn(40, 9, device=DEVICE)
    x = base.t()[:, ::2]  # (9, 20) with stride (1, 18): column-major
    y = _sparse_target((9,), 20)
    y[0] = 4
    got, g = _run(lambda t: cross_entropy(t, y, backend=backend), x)
    exp, ge = _run(lambda t: F.cross_entropy(t, y), x)
    assert_close(got, exp)
    assert_close(g, ge)
    rows = torch.randn(12, 50, device=DEVICE)[::3]  # strided rows, contiguous within a row
    y2 = torch.randint(0, 50, (4,), device=DEVICE)
    assert_close(cross_entropy(rows, y2, backend=backend), F.cross_entropy(rows, y2))


def test_ce_vocab_spanning_several_blocks(backend):
    C = 8192 + 173  # > the forward block (8192) and > 2 backward tiles (4096), not a multiple
    x = torch.randn(3, C, device=DEVICE) * 2
    y = torch.tensor([0, C - 1, 4099], device=DEVICE)
    up = torch.randn(3, device=DEVICE)
    got, g = _run(lambda t: cross_entropy(t, y, reduction="none", label_smoothing=0.1, backend=backend), x, up)
    exp, ge = _run(lambda t: F.cross_entropy(t, y, reduction="none", label_smoothing=0.1), x, up)
    assert_close(got, exp)
    assert_close(g, ge)


@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "inplace"])
def test_ce_small_blocks_multi_tile_backward(backend, monkeypatch, inplace):
    """Blocks shrunk so that the forward streams several blocks per row and each backward program
    loops over 2 tiles, with several programs per row, a partial tile and a fully masked one."""
    from tri_losses.kernels import cross_entropy as K
    monkeypatch.setattr(K, "_blocks", lambda C, es: (64, 16, 4, 4, 2))
    N, C = 5, 135  # backward: 5 programs of 32 columns per row; the last: columns 128-143, 144-159
    x = torch.randn(N, C, device=DEVICE) * 2
    y = _sparse_target((N,), C)
    y[0] = C - 1
    w = torch.rand(C, device=DEVICE) + 0.5
    up, up_lse = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)

    def run(fn, **kw):
        xg = x.clone().requires_grad_(True)
        out, lse = fn(xg * 1.0, **kw)
        (g,) = torch.autograd.grad((out * up).sum() + (lse * up_lse).sum(), xg)
        return out, lse, g

    got = run(lambda t: cross_entropy(t, y, w, reduction="none", label_smoothing=0.1, return_lse=True,
                                      inplace_backward=inplace, backend=backend))
    exp = run(lambda t: (F.cross_entropy(t, y, w, reduction="none", label_smoothing=0.1), torch.logsumexp(t, 1)))
    for a, b in zip(got, exp):
        assert_close(a, b)


def test_ce_inplace_backward_flag(backend):
    x0 = torch.randn(5, 31, device=DEVICE)
    y = _sparse_target((5,), 31, ignore_frac=0.0)
    x = x0.clone().requires_grad_(True)
    cross_entropy(x, y, backend=backend).backward()
    assert torch.equal(x.detach(), x0), "inplace_backward=False must leave the input alone"
    ge = x.grad.clone()
    xi = x0.clone().requires_grad_(True)
    cross_entropy(xi, y, inplace_backward=True, backend=backend).backward()
    assert_close(xi.grad, ge)
    assert_close(xi.detach(), ge)


def test_ce_deterministic_bitwise(backend):
    x = torch.randn(16, 300, device=DEVICE)
    y = _sparse_target((16,), 300)
    y[0] = 0
    a = _run(lambda t: cross_entropy(t, y, label_smoothing=0.1, focal_gamma=1.0, backend=backend), x)
    b = _run(lambda t: cross_entropy(t, y, label_smoothing=0.1, focal_gamma=1.0, backend=backend), x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_ce_unchecked_out_of_range_ids_give_nan_rows_not_garbage(backend):
    # Calls the op directly (the public wrapper always checks CPU targets).
    x = torch.randn(4, 9, device=DEVICE)
    y = torch.tensor([1, 9, -3, -100], device=DEVICE)
    loss, lse, coef = torch.ops.tri_losses.ce_fwd(x, y, None, False, -100, 0.0, 0, 0, 0.0, 0.0, 0.0, math.inf, 0, 0,
                                                  False, backend == "triton")
    assert_close(loss[0], F.cross_entropy(x[0], y[0]))
    assert torch.isnan(loss[1]) and torch.isnan(loss[2]) and loss[3] == 0
    assert_close(lse, torch.logsumexp(x, 1))


@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "inplace"])
def test_ce_outputs_fully_written(backend, monkeypatch, inplace):
    """Every allocation the op makes (torch.empty, empty_like, new_empty) starts as NaN: loss, lse and
    gradient must still equal PyTorch's everywhere (ignored rows, a vocabulary of several blocks)."""
    N, C = 5, 8192 + 37
    x = torch.randn(N, C, device=DEVICE) * 2
    y = _sparse_target((N,), C, ignore_frac=0.0)
    y[1] = y[3] = -100
    up = torch.randn(N, device=DEVICE)
    exp, ge = _run(lambda t: F.cross_entropy(t, y, reduction="none"), x, up)
    poison_allocations(monkeypatch)
    assert torch.isnan(torch.empty(2)).all() and torch.isnan(x.new_empty(2)).all()
    xg = x.clone().requires_grad_(True)
    out, lse = cross_entropy(xg * 1.0, y, reduction="none", return_lse=True, inplace_backward=inplace,
                             backend=backend)
    (g,) = torch.autograd.grad(out, xg, up)
    monkeypatch.undo()
    assert_close(out, exp)
    assert_close(lse, torch.logsumexp(x, 1))
    assert_close(g, ge)


# ------------------------------------------------------------------------------------------------
# training fast path: one scalar upstream gradient (mean/sum, input requiring grad); the gradient is
# formed in the forward and the backward scales it by the upstream, read on device
# ------------------------------------------------------------------------------------------------
FAST_CASES = {
    "plain": dict(),
    "wt_smooth": dict(weighted=True, label_smoothing=0.1),
    "others_focal": dict(label_smoothing=0.2, label_smoothing_mode="others", focal_gamma=2.0),
    "gauss_z_softcap_bound": dict(label_smoothing=0.3, label_smoothing_mode="gaussian", z_loss=1e-2, softcap=3.0,
                                  fake_upper_bound=3.5),
    "log_probs_wt": dict(input_type="log_probs", weighted=True),
    "probs_focal": dict(input_type="probs", focal_gamma=1.0),
    "dense_wt_smooth": dict(dense=True, weighted=True, label_smoothing=0.1),
}


def _fast_case(case, N, C, dtype):
    kw = dict(FAST_CASES[case])
    weighted, dense = kw.pop("weighted", False), kw.pop("dense", False)
    x = _ext_input(kw.get("input_type", "logits"), N, C).to(dtype)
    if dense:
        y = torch.softmax(torch.randn(N, C, device=DEVICE) * 2, 1).to(dtype)  # exact for the reference
    else:
        y = _sparse_target((N,), C)
        y[0] = 1
    w = torch.rand(C, device=DEVICE) + 0.5 if weighted else None
    return x, y, w, kw


def _reference_reduced(x, y, w, kw, reduction):
    """The float64 reference (tests/reference/ce.py): the reduced loss as a function of x."""
    rkw = dict(eps=kw.get("label_smoothing", 0.0), mode=kw.get("label_smoothing_mode", "torch"),
               input_type=kw.get("input_type", "logits"), gamma=kw.get("focal_gamma", 0.0),
               z_loss=kw.get("z_loss", 0.0), softcap=kw.get("softcap"))
    wc = w.cpu() if w is not None else None
    rows, valid = ref.ce_rows(x, y.cpu(), wc, **rkw)
    if "fake_upper_bound" in kw:  # forward value min(row, U); the gradient of the unbounded row
        rows = rows - (rows - rows.clamp(max=kw["fake_upper_bound"])).detach()
    return ref.reduce(rows, valid, y.cpu(), wc, reduction, y.dtype.is_floating_point)


def _exact_reduced(x, y, w, kw, reduction, backend):
    """The exact path on identical inputs: per-row losses (``reduction="none"``), reduced as the public
    op reduces them (the mean over non-ignored rows or sum w_y), so autograd hands each row its own
    upstream gradient."""
    rows = cross_entropy(x, y, w, reduction="none", backend=backend, **kw)
    if reduction == "sum":
        return rows.sum()
    if y.dtype.is_floating_point:
        return rows.sum() / rows.shape[0]
    valid = y != -100
    wy = w[y.clamp(min=0)] if w is not None else torch.ones(y.shape, device=DEVICE)
    return rows.sum() / torch.where(valid, wy, 0.0).sum()


@pytest.mark.parametrize("case", list(FAST_CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "inplace"])
def test_ce_fast_path_matches_exact_path_and_reference(backend, case, reduction, dtype, inplace):
    """The fast path against the exact path (per-row upstream) on identical inputs and against the
    float64 reference, with an upstream scalar of 3.7 (the backward's scale) and of 1 (the in-place
    no-op): the value is the exact path's bit for bit, the gradient for an upstream of 1 too; the
    caller's logits are untouched unless inplace_backward=True, and then hold the gradient."""
    N, C = 7, 45  # 7 rows over 4 programs in the interpreter: programs take 2 rows each
    x, y, w, kw = _fast_case(case, N, C, dtype)
    for g in (3.7, 1.0):
        x0 = x.clone()
        xf = x.clone().requires_grad_(True)
        loss = cross_entropy(xf, y, w, reduction=reduction, inplace_backward=inplace, backend=backend, **kw)
        assert loss.grad_fn.name() != "DivBackward0" and "Sum" not in loss.grad_fn.name(), "not the fast path"
        if not inplace:
            assert torch.equal(xf.detach(), x0), "the fast path must not write the caller's logits"
        (loss * g).backward()
        xe = x.clone().requires_grad_(True)
        exact = _exact_reduced(xe, y, w, kw, reduction, backend)
        (exact * g).backward()
        assert_same_rounding(loss.detach(), exact.detach(), backend=backend, msg="loss")
        if g == 1.0:
            assert_same_rounding(xf.grad, xe.grad, backend=backend, msg="upstream 1: the exact path's gradient")
            if inplace:
                assert_same_rounding(xf.detach(), xe.grad, backend=backend,
                                     msg="inplace_backward: the logits hold the gradient")
        else:
            assert_close(xf.grad, xe.grad, dtype=dtype, msg="fast vs exact")
        xr = x.double().cpu().requires_grad_(True)
        r = _reference_reduced(xr, y, w, kw, reduction)
        (r * g).backward()
        assert_close(loss, r, atol=1e-5, rtol=1e-5)
        assert_close(xf.grad, xr.grad, dtype=dtype, msg="fast vs float64 reference")


@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "inplace"])
def test_ce_fast_path_matches_torch_half(backend, inplace):
    """fp16/bf16 logits with ignored rows: value and gradient against F.cross_entropy in float64."""
    for dtype in (torch.float16, torch.bfloat16):
        x = (torch.randn(9, 70, device=DEVICE) * 3).to(dtype)
        y = _sparse_target((9,), 70, ignore_frac=0.4)
        y[0] = 5
        xf = x.clone().requires_grad_(True)
        loss = cross_entropy(xf, y, label_smoothing=0.1, inplace_backward=inplace, backend=backend)
        (loss * -0.25).backward()
        xr = x.double().requires_grad_(True)
        r = F.cross_entropy(xr, y, label_smoothing=0.1)
        (r * -0.25).backward()
        assert xf.grad.dtype == dtype
        assert_close(loss, r, atol=1e-5, rtol=1e-5)
        assert_close(xf.grad, xr.grad, dtype=dtype)
        assert (xf.grad[y == -100] == 0).all()


@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "inplace"])
def test_ce_fast_path_retain_graph_and_accumulated_grads(backend, inplace):
    """retain_graph=True: each backward adds the gradient once more (into a .grad that already holds
    values), with different upstream scalars; a gradient autograd handed out earlier (torch.autograd.grad)
    is never written by a later backward."""
    N, C = 6, 33
    x = torch.randn(N, C, device=DEVICE) * 2
    y = _sparse_target((N,), C)
    y[0] = 2
    xr = x.double().requires_grad_(True)
    (gref,) = torch.autograd.grad(F.cross_entropy(xr, y), xr)
    leaf = x.clone().requires_grad_(True)
    leaf.grad = torch.randn(N, C, device=DEVICE)
    before = leaf.grad.clone()
    h = leaf * 1.0  # the logits the loss may overwrite (inplace_backward); the leaf stays intact
    loss = cross_entropy(h, y, inplace_backward=inplace, backend=backend)
    (first,) = torch.autograd.grad(loss, h, torch.tensor(2.0, device=DEVICE), retain_graph=True)
    kept = first.clone()
    (loss * 3.7).backward(retain_graph=True)
    loss.backward()  # upstream 1, the graph released now
    assert torch.equal(first, kept), "a gradient handed out by an earlier backward was written"
    assert_close(first, 2.0 * gref)
    assert_close(leaf.grad, before + 4.7 * gref)


@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "inplace"])
def test_ce_fast_path_memory(backend, monkeypatch, inplace):
    """No more memory than the exact path: the graph keeps the gradient, not the logits (dropped by the
    caller, they are freed after the forward); the backward hands autograd that same buffer (the
    logits' own storage with inplace_backward), allocating none; with retain_graph a copy instead."""
    import weakref
    N, C = 5, 40
    y = _sparse_target((N,), C)
    y[0] = 3
    buffers = []
    real = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: buffers.append(real(*a, **k)) or buffers[-1])
    for retain in (False, True):
        leaf = torch.randn(N, C, device=DEVICE, requires_grad=True)
        h = leaf * 2.0
        seen = []
        h.register_hook(lambda g: seen.append(g))
        logits_ptr = h.data_ptr()
        buffers.clear()
        loss = cross_entropy(h, y, inplace_backward=inplace, backend=backend)
        grad_ptrs = [b.data_ptr() for b in buffers if b.shape == (N, C)]
        assert len(grad_ptrs) == (0 if inplace else 1)
        alive = weakref.ref(h)
        del h
        assert (alive() is not None) == inplace, "the fast path keeps the gradient, not the logits"
        buffers.clear()
        (loss * 1.5).backward(retain_graph=retain)
        fresh = [b.data_ptr() for b in buffers if b.shape == (N, C)]
        expect = logits_ptr if inplace else grad_ptrs[0]
        if retain:
            assert fresh and seen[0].data_ptr() == fresh[0] != expect
        else:
            assert not fresh and seen[0].data_ptr() == expect


def test_ce_fast_path_multi_tile_rows_several_per_program(backend, monkeypatch):
    """Blocks shrunk so that each row's forward pass streams 3 blocks and its gradient pass 9 tiles
    (a partial last one), and 2 programs take 5 rows; weights and smoothing read per tile."""
    from tri_losses.kernels import cross_entropy as K
    monkeypatch.setattr(K, "_blocks", lambda C, es: (64, 16, 4, 4, 2))
    monkeypatch.setattr(K, "rows_in_flight", lambda logits: 2)
    N, C = 5, 135
    x = torch.randn(N, C, device=DEVICE) * 2
    y = _sparse_target((N,), C)
    y[0] = C - 1
    w = torch.rand(C, device=DEVICE) + 0.5
    xf = x.clone().requires_grad_(True)
    loss = cross_entropy(xf, y, w, label_smoothing=0.1, focal_gamma=1.0, backend=backend)
    (loss * 0.3).backward()
    xe = x.clone().requires_grad_(True)
    exact = _exact_reduced(xe, y, w, dict(label_smoothing=0.1, focal_gamma=1.0), "mean", backend)
    (exact * 0.3).backward()
    assert_same_rounding(loss.detach(), exact.detach(), backend=backend)
    assert_close(xf.grad, xe.grad)


@pytest.mark.parametrize("case", ["plain", "wt_smooth", "others_focal", "gauss_z_softcap_bound"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "inplace"])
def test_ce_fast_path_split_rows_match_exact_path_and_reference(monkeypatch, case, dtype, inplace):
    """The fast path's split kernel for long rows (each row in pieces over several programs, the last
    to finish combining the pieces' sums and writing the row's gradient), forced on at 45 classes in
    pieces of 16 (3 pieces, the last short): loss and gradient against the exact path and the float64
    reference, with the target in every piece, an ignored row, a piece of -inf logits (masked
    vocabulary), and upstreams 3.7 and 1; deterministic (bitwise repeat)."""
    from tri_losses.kernels import cross_entropy as K
    monkeypatch.setattr(K, "SPLIT_ROW_BYTES", 1)
    monkeypatch.setattr(K, "SPLIT_PIECE", 16)
    assert K.split_pieces(45, 4, False, 0) == 3
    launched = []
    real = K._ce_fwd_grad_split_kernel
    monkeypatch.setattr(K, "_ce_fwd_grad_split_kernel", _Spy(real, launched))
    N, C = 7, 45
    x, y, w, kw = _fast_case(case, N, C, dtype)
    y[:4] = torch.tensor([1, 20, 44, -100])
    x[2, 16:32] = float("-inf")  # a whole piece masked (row 2's target is in another piece)
    for g in (3.7, 1.0):
        xf = x.clone().requires_grad_(True)
        loss = cross_entropy(xf, y, w, inplace_backward=inplace, backend="triton", **kw)
        (loss * g).backward()
        xe = x.clone().requires_grad_(True)
        (_exact_reduced(xe, y, w, kw, "mean", "triton") * g).backward()
        assert_close(loss, xe.new_tensor(0) + _exact_reduced(x.clone(), y, w, kw, "mean", "triton"), atol=1e-6,
                     rtol=1e-6)
        assert_close(xf.grad, xe.grad, dtype=dtype, msg="split vs exact")
        xr = x.double().cpu().requires_grad_(True)
        (_reference_reduced(xr, y, w, kw, "mean") * g).backward()
        assert_close(loss, _reference_reduced(x.double().cpu(), y, w, kw, "mean"), atol=1e-5, rtol=1e-5)
        assert_close(xf.grad, xr.grad, dtype=dtype, msg="split vs float64 reference")
        xg = x.clone().requires_grad_(True)
        again = cross_entropy(xg, y, w, inplace_backward=inplace, backend="triton", **kw)
        (again * g).backward()
        torch.testing.assert_close(again, loss, rtol=0, atol=0, equal_nan=True, msg="not deterministic")
        torch.testing.assert_close(xg.grad, xf.grad, rtol=0, atol=0, equal_nan=True, msg="not deterministic")
    assert len(launched) == 4
    assert K.split_pieces(45, 4, True, 0) == K.split_pieces(45, 4, False, 1) == 0  # dense / non-logits: per row
    monkeypatch.setattr(K, "SPLIT_ROW_BYTES", 0)
    assert K.split_pieces(45, 4, False, 0) == 0


class _Spy:
    """A Triton kernel's stand-in that records its launches and runs it."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(grid)
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_ce_fast_path_routing():
    """Which calls take the fast path (the autograd node of the reduced loss tells): mean/sum with an
    input requiring grad; not reduction="none", return_lse, probability targets requiring grad, a
    frozen input, or no_grad."""
    x = torch.randn(4, 9, device=DEVICE, requires_grad=True)
    y = torch.tensor([1, 2, -100, 8], device=DEVICE)
    q = torch.softmax(torch.randn(4, 9, device=DEVICE), 1)
    fast = "ce_fwd_grad"

    def node(out):
        out = out[0] if isinstance(out, tuple) else out
        return out.grad_fn.name() if out.grad_fn is not None else None

    assert fast in node(cross_entropy(x, y))
    assert fast in node(cross_entropy(x, q, reduction="sum"))
    assert node(cross_entropy(x, y, inplace_backward=True)) == "_FastInplaceCEBackward"
    assert fast not in node(cross_entropy(x, y, reduction="none"))
    assert fast not in node(cross_entropy(x, y, return_lse=True))
    assert fast not in node(cross_entropy(x, q.requires_grad_(True)))
    assert node(cross_entropy(x.detach(), y)) is None
    with torch.no_grad():
        assert node(cross_entropy(x, y)) is None


# ------------------------------------------------------------------------------------------------
# frame_error
# ------------------------------------------------------------------------------------------------
def test_frame_error_counts_argmax_mismatches():
    x = torch.randn(20, 6)
    y = torch.randint(0, 6, (20,))
    y[:3] = -100
    manual = sum(1 for i in range(3, 20) if int(x[i].argmax()) != int(y[i]))
    assert frame_error(x, y).item() == manual
    assert frame_error(x, y, reduction="mean").item() == pytest.approx(manual / 17)
    assert frame_error(x, y, reduction="none").sum().item() == manual
    with pytest.raises(RuntimeError, match="triton"):
        frame_error(x, y, backend="triton")


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
BAD = [
    (dict(input=torch.randn(3, 5).long()), TypeError, "input"),
    (dict(target=torch.randn(3, 4)), ValueError, "target"),
    (dict(target=torch.zeros(4, dtype=torch.long)), ValueError, "target"),
    (dict(target=torch.tensor([0, 5, 1])), ValueError, "target"),
    (dict(target=torch.tensor([0, -2, 1])), ValueError, "target"),
    (dict(weight=torch.ones(4)), ValueError, "weight"),
    (dict(weight=torch.ones(5, dtype=torch.long)), TypeError, "weight"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(label_smoothing=1.0001), ValueError, "label_smoothing"),
    (dict(label_smoothing=1.0, label_smoothing_mode="gaussian"), ValueError, "label_smoothing"),
    (dict(target=torch.rand(3, 5), ignore_index=2), ValueError, "ignore_index"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(label_smoothing_mode="uniform"), ValueError, "label_smoothing_mode"),
    (dict(input_type="prob"), ValueError, "input_type"),
    (dict(focal_gamma=-1.0), ValueError, "focal_gamma"),
    (dict(focal_gamma=math.inf), ValueError, "focal_gamma"),  # was a loss of 0 with NaN gradients
    (dict(z_loss=-1.0), ValueError, "z_loss"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(softcap="big"), TypeError, "softcap"),
    (dict(input_type="log_probs", z_loss=0.1), ValueError, "z_loss"),
    (dict(input_type="probs", softcap=3.0), ValueError, "softcap"),
    (dict(target=torch.rand(3, 5), focal_gamma=2.0), ValueError, "focal_gamma"),
    (dict(target=torch.rand(3, 5), label_smoothing=0.1, label_smoothing_mode="others"), ValueError,
     "label_smoothing_mode"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(input=torch.tensor(1.0)), ValueError, "input"),
]


@pytest.mark.parametrize("kw,exc,name", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_ce_bad_input_raises_naming_argument(kw, exc, name):
    args = dict(input=torch.randn(3, 5), target=torch.tensor([0, 4, -100]))
    args.update(kw)
    inp, tgt = args.pop("input"), args.pop("target")
    with pytest.raises(exc, match=name):
        cross_entropy(inp, tgt, **args)


def test_ce_forced_triton_errors_are_clear(monkeypatch):
    with pytest.raises(TypeError, match="float64"):
        cross_entropy(torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, 1]), backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), backend="triton")


# ------------------------------------------------------------------------------------------------
# torch.library / compile
# ------------------------------------------------------------------------------------------------
def test_ce_opcheck(backend):
    x = torch.randn(5, 12, device=DEVICE, requires_grad=True)
    y = torch.tensor([0, 3, -100, 11, 2], device=DEVICE)
    args = (x, y, torch.rand(12, device=DEVICE), False, -100, 0.1, 1, 0, 1.0, 1e-3, 0.0, math.inf, 0, 0, False,
            backend == "triton")
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.tri_losses.ce_fwd.default, args, test_utils=checks)
    # the training fast path's ops: forward + gradient (functional; in place over the logits), the scale
    fast = (args[0], args[1], args[2], torch.tensor(4.0, device=DEVICE), *args[3:-2], args[-1])
    torch.library.opcheck(torch.ops.tri_losses.ce_fwd_grad.default, fast, test_utils=checks)
    torch.library.opcheck(torch.ops.tri_losses.ce_fwd_grad_inplace.default, (x.detach().clone(), *fast[1:]),
                          test_utils=checks)
    g = torch.tensor(-1.5, device=DEVICE)
    for op in (torch.ops.tri_losses.ce_scale.default, torch.ops.tri_losses.ce_scale_.default):
        torch.library.opcheck(op, (torch.randn(5, 12, device=DEVICE), g, backend == "triton"), test_utils=checks)


def test_ce_torch_compile_fullgraph(backend):
    x = torch.randn(6, 40, device=DEVICE)
    y = _sparse_target((6,), 40)
    y[0] = 1

    def f(t):
        return cross_entropy(t, y, label_smoothing=0.1, z_loss=1e-3, backend=backend)

    torch._dynamo.reset()
    got, g = _run(torch.compile(f, fullgraph=True), x)
    exp, ge = _run(f, x)
    assert_close(got, exp)
    assert_close(g, ge)
    # the training fast path's op and its backward's scale, with an upstream scalar that is not 1
    up = torch.tensor(3.7, device=DEVICE)
    got, g = _run(torch.compile(f, fullgraph=True), x, up)
    exp, ge = _run(lambda t: cross_entropy(t, y, label_smoothing=0.1, z_loss=1e-3, reduction="none",
                                           backend=backend).sum() / (y != -100).sum(), x, up)
    assert_close(got, exp)
    assert_close(g, ge)


# ------------------------------------------------------------------------------------------------
# big shapes (GPU only)
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("V", [131072, 262144])
def test_ce_large_vocab_gpu(V):
    x = torch.randn(64, V, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(0, V, (64,), device="cuda")
    got, g = _run(lambda t: cross_entropy(t, y, reduction="none", backend="triton"), x)
    exp, ge = _run(lambda t: F.cross_entropy(t.float(), y, reduction="none"), x)
    assert_close(got, exp, atol=1e-4, rtol=1e-4)
    assert_close(g.float(), ge.float(), dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("V", [32768, 262144])
def test_ce_fast_path_large_vocab_gpu(V, monkeypatch):
    """The fast path's GPU kernels: the split kernel for long rows (256k), one program per row, and a
    persistent grid of fewer programs than rows (each program takes several rows); mean with upstreams 1
    and 2.5, sum, against PyTorch in fp32."""
    import tri_losses.kernels.cross_entropy as K
    x = torch.randn(300, V, device="cuda", dtype=torch.bfloat16)
    y = _sparse_target((300,), V)
    for grid in ("split", None, 7):  # the split kernel (rows of 128 KiB and more, by default), then per row
        if grid != "split":
            monkeypatch.setattr(K, "SPLIT_ROW_BYTES", 0)
        elif not K.split_pieces(V, 2, False, 0):
            continue
        if grid not in ("split", None):
            monkeypatch.setattr(K, "rows_in_flight", lambda logits, _g=grid: _g)
        for red, up in (("mean", 1.0), ("mean", 2.5), ("sum", 1.0)):
            got, g = _run(lambda t: cross_entropy(t, y, reduction=red, backend="triton"), x,
                          torch.tensor(up, device="cuda"))
            exp, ge = _run(lambda t: F.cross_entropy(t.float(), y, reduction=red), x,
                           torch.tensor(up, device="cuda"))
            assert_close(got, exp, atol=1e-4, rtol=1e-4)
            assert_close(g.float(), ge.float(), dtype=torch.bfloat16)


@pytest.mark.gpu
def test_ce_more_than_2pow31_elements_gpu():
    N, V = 8200, 262144  # N*V = 2.15e9 > 2^31
    x = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(0, V, (N,), device="cuda")
    rows = torch.tensor([0, N // 2, N - 1], device="cuda")
    loss = cross_entropy(x, y, reduction="none", backend="triton")
    exp = F.cross_entropy(x[rows].float(), y[rows], reduction="none")
    assert_close(loss[rows], exp, atol=1e-4, rtol=1e-4)
    # the fast path (forward + gradient, in place: no second 4 GB buffer): int64 offsets in the
    # persistent row loop, rows past element 2^31 included
    xr = x[rows].float().requires_grad_(True)
    (ge,) = torch.autograd.grad(F.cross_entropy(xr, y[rows], reduction="sum"), xr)
    x.requires_grad_(True)
    cross_entropy(x, y, reduction="sum", inplace_backward=True, backend="triton").backward()
    assert_close(x.detach()[rows].float(), ge, dtype=torch.bfloat16)


def test_ce_nan_and_inf_propagate_like_torch(backend):
    x = torch.randn(4, 9, device=DEVICE)
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    y = torch.tensor([0, 1, 2, 3], device=DEVICE)
    got = cross_entropy(x, y, reduction="none", backend=backend)
    exp = F.cross_entropy(x, y, reduction="none")
    assert torch.isfinite(got[0]) and torch.isfinite(got[3])
    assert torch.isnan(got[1]) == torch.isnan(exp[1]) and torch.isnan(got[2]) == torch.isnan(exp[2])
    assert_close(got[[0, 3]], exp[[0, 3]])


# ------------------------------------------------------------------------------------------------
# precision at extreme logits
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(), dict(focal_gamma=2.0, label_smoothing=0.1), dict(return_lse=True)],
                         ids=["plain", "focal_smooth", "lse_grad"])
def test_ce_fp32_gradient_at_extreme_logits_matches_float64(backend, kw):
    """|x| ~ 1e4 with a non-degenerate softmax: p formed as exp(x - lse) loses ulp(lse) ~ 1e-3 of
    relative precision; formed from the row max it keeps fp32 precision (as PyTorch)."""
    N, C = 8, 50
    sign = torch.where(torch.arange(N, device=DEVICE) % 2 == 0, 1.0, -1.0)[:, None]
    x = (sign * 1e4 + torch.randn(N, C, device=DEVICE) * 3).float()
    y = torch.randint(0, C, (N,), device=DEVICE)
    up = torch.randn(N, device=DEVICE)
    up_lse = torch.randn(N, device=DEVICE)

    def f(t, be):
        out = cross_entropy(t, y, reduction="none", backend=be, **kw)
        if isinstance(out, tuple):
            return (out[0] * up.to(t.dtype)).sum() + (out[1] * up_lse.to(t.dtype)).sum()
        return (out * up.to(t.dtype)).sum()

    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(xg, backend), xg)
    x64 = x.double().requires_grad_(True)
    (g64,) = torch.autograd.grad(f(x64, "torch"), x64)
    torch.testing.assert_close(g.double().cpu(), g64.cpu(), rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# bad-input defects (issue: PyTorch parity on weights, in-place, caps; error kinds and hints)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ce_weight_requiring_grad_raises_as_pytorch(backend, reduction):
    x = torch.randn(3, 5, device=DEVICE, requires_grad=True)
    y = torch.tensor([0, 1, 2], device=DEVICE)
    w = torch.rand(5, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="weight"):
        F.cross_entropy(x, y, w, reduction=reduction)
    with pytest.raises(RuntimeError, match="weight"):
        cross_entropy(x, y, w, reduction=reduction, backend=backend)
    with pytest.raises(ValueError, match="weight"):
        CrossEntropyLoss(weight=w, reduction=reduction, backend=backend)(x, y)
    with torch.no_grad():  # no graph: nothing to differentiate, as PyTorch
        assert_close(cross_entropy(x, y, w, reduction=reduction, backend=backend),
                     F.cross_entropy(x, y, w, reduction=reduction))


def test_ce_inplace_backward_on_expanded_rows_is_correct(backend):
    """Rows that share memory (stride 0) cannot hold their own gradients: a fresh gradient is
    allocated (documented), the caller's base tensor is left alone, and the gradient is PyTorch's."""
    C = 23
    base0 = torch.randn(1, C, device=DEVICE)
    y = torch.tensor([0, 5, 9, 22], device=DEVICE)
    up = torch.randn(4, device=DEVICE)
    base = base0.clone().requires_grad_(True)
    out = cross_entropy(base.expand(4, C), y, reduction="none", inplace_backward=True, backend=backend)
    (g,) = torch.autograd.grad(out, base, up)
    be = base0.clone().requires_grad_(True)
    (ge,) = torch.autograd.grad(F.cross_entropy(be.expand(4, C), y, reduction="none"), be, up)
    assert_close(g, ge)
    assert torch.equal(base.detach(), base0)
    # a non-leaf expanded input: its gradient too
    h = (base0 * 1.0).requires_grad_(True)
    xe = (h * 2.0).expand(4, C)
    (g2,) = torch.autograd.grad(cross_entropy(xe, y, reduction="none", inplace_backward=True, backend=backend), h, up)
    he = base0.clone().requires_grad_(True)
    (ge2,) = torch.autograd.grad(F.cross_entropy((he * 2.0).expand(4, C), y, reduction="none"), he, up)
    assert_close(g2, ge2)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_ce_inplace_backward_with_targets_or_weights_in_the_logits_memory(backend, reduction):
    """Probability targets or class weights that lie in the logits' memory (the logits themselves, a
    detached alias, a row of them) are still read after the in-place backward would overwrite them: the
    gradient goes to fresh memory instead, and loss and gradient are PyTorch's (the torch backend read
    targets already overwritten with p, the Triton one weights already overwritten with gradients)."""
    torch.manual_seed(0)
    x0 = torch.rand(4, 5, device=DEVICE)
    y = torch.tensor([0, 3, 4, 1], device=DEVICE)
    cases = {"target is the input": lambda x: (x, None),
             "target is a detached alias": lambda x: (x.detach(), None),
             "weight is a row of the logits": lambda x: (y, x.detach()[0])}
    for name, make in cases.items():
        x = x0.clone().requires_grad_(True)
        loss = cross_entropy(x, *make(x), reduction=reduction, inplace_backward=True, backend=backend)
        up = torch.linspace(0.5, 1.5, loss.numel(), device=DEVICE).reshape(loss.shape)
        (g,) = torch.autograd.grad(loss, x, up)
        xr = x0.clone().requires_grad_(True)
        lr = F.cross_entropy(xr, *make(xr), reduction=reduction)
        (gr,) = torch.autograd.grad(lr, xr, up)
        assert_close(loss.detach(), lr.detach(), msg=name)
        assert_close(g, gr, msg=name)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_ce_nonfinite_class_weight_reaches_rows_as_pytorch(backend, bad, smoothing):
    """A NaN/inf class weight: PyTorch makes only the rows targeting that class non-finite (all rows
    once label smoothing spreads mass over every class); values and gradients match elementwise."""
    N, C = 6, 7
    x = torch.randn(N, C, device=DEVICE)
    y = torch.tensor([0, 3, 1, 3, 6, -100], device=DEVICE)
    w = torch.rand(C, device=DEVICE) + 0.5
    w[3] = bad
    up = torch.randn(N, device=DEVICE)
    got, g = _run(lambda t: cross_entropy(t, y, w, reduction="none", label_smoothing=smoothing, backend=backend), x, up)
    exp, ge = _run(lambda t: F.cross_entropy(t, y, w, reduction="none", label_smoothing=smoothing), x, up)
    fin = torch.isfinite(exp)
    assert torch.equal(torch.isfinite(got), fin)  # inf may come out as NaN (inf - inf), never finite
    assert fin.tolist() == ([True, False, True, False, True, True] if smoothing == 0.0 else [False] * 5 + [True])
    assert_close(got[fin], exp[fin])
    rows = torch.isfinite(ge).all(1)[:5]  # row 5 is ignored: gradient 0 here (PyTorch: NaN with smoothing)
    assert torch.equal(torch.isfinite(g).all(1)[:5], rows) and (g[5] == 0).all()
    assert_close(g[:5][rows], ge[:5][rows])


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("input_type", ["logits", "log_probs", "softcap", "return_lse"])
def test_ce_ignored_row_with_nan_logits_gets_gradient_0_on_both_backends(backend, reduction, input_type):
    """An ignored row's gradient is 0 even when its logits hold a NaN (padding positions of a model
    whose masked rows come out NaN): the torch backend gave NaN there (0 * NaN), the kernels 0 (NaN with
    a softcap). The other rows match PyTorch; PyTorch's own gradient of that row is NaN (documented
    difference). With return_lse the lse's gradient reaches every row: NaN there, as in PyTorch."""
    x = torch.randn(6, 5, device=DEVICE)
    if input_type == "log_probs":
        x = torch.log_softmax(x, -1)
    x[1, 2] = math.nan
    x[4] = math.nan
    y = torch.tensor([0, -100, 3, 1, -100, 4], device=DEVICE)
    up = torch.randn(6, device=DEVICE) if reduction == "none" else None
    kw = dict(softcap=4.0) if input_type == "softcap" else {}
    it = "log_probs" if input_type == "log_probs" else "logits"
    gl = torch.randn(6, device=DEVICE)

    def ours(t):
        out = cross_entropy(t, y, reduction=reduction, input_type=it, backend=backend,
                            return_lse=input_type == "return_lse", **kw)
        return out[0] + (out[1] * gl).sum() if input_type == "return_lse" else out

    def theirs(t):
        if input_type == "log_probs":
            return F.nll_loss(t, y, reduction=reduction)
        z = 4.0 * torch.tanh(t / 4.0) if input_type == "softcap" else t
        out = F.cross_entropy(z, y, reduction=reduction)
        return out + (torch.logsumexp(t, 1) * gl).sum() if input_type == "return_lse" else out

    got, g = _run(ours, x, up)
    exp, ge = _run(theirs, x, up)
    assert_close(got, exp)
    if input_type == "return_lse":
        assert g[[1, 4]].isnan().all()
    else:
        assert (g[[1, 4]] == 0).all()
    keep = [0, 2, 3, 5]
    assert_close(g[keep], ge[keep])


@pytest.mark.parametrize("cap", [30.0, 1e3, 1e6])
def test_ce_and_lce_softcap_far_above_the_logits_keep_fp32_accuracy(backend, cap):
    """softcap c far above the logits: c * tanh(x / c) is about x, and cross-entropy's tanh must not cancel for
    small x / c (its (1 - e) / (1 + e) form lost c * 6e-8 absolute: a loss error of 3e-2 at c = 1e6)."""
    from tri_losses import linear_cross_entropy
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 7, generator=gen).to(DEVICE) * 3
    t = torch.tensor([0, 3, 6, 2], device=DEVICE)
    up = torch.rand(4, generator=gen).to(DEVICE)
    xx = x.clone().requires_grad_(True)
    loss = cross_entropy(xx, t, softcap=cap, reduction="none", backend=backend)
    (g,) = torch.autograd.grad(loss, xx, up)
    xd = x.double().requires_grad_(True)
    ref = F.cross_entropy(cap * torch.tanh(xd / cap), t, reduction="none")
    (gd,) = torch.autograd.grad(ref, xd, up.double())
    assert_close(loss, ref, atol=2e-6, rtol=1e-6)
    assert_close(g, gd, atol=1e-6, rtol=1e-6)
    if cap <= 30:  # (linear CE's Triton logit tiles keep tanh's short form: an error of cap * 6e-8, see tanh)
        h, w = torch.randn(4, 5, generator=gen).to(DEVICE), torch.randn(7, 5, generator=gen).to(DEVICE)
        got = linear_cross_entropy(h, w, t, softcap=cap, reduction="none", backend=backend)
        z = h.double() @ w.double().t()
        assert_close(got, F.cross_entropy(cap * torch.tanh(z / cap), t, reduction="none"), atol=4e-6, rtol=2e-6)


def test_ce_inplace_backward_under_fake_tensors_reads_no_storage():
    """Under FakeTensorMode (shape-only tracing) the in-place check compares no data pointers (fake tensors
    have none: PyTorch warns that reading one is deprecated and will error)."""
    import warnings
    from torch._subclasses.fake_tensor import FakeTensorMode
    x, y = torch.randn(4, 6, requires_grad=True), torch.tensor([0, 5, 2, 1])
    with FakeTensorMode() as mode, warnings.catch_warnings():
        warnings.simplefilter("error")
        xf, yf = mode.from_tensor(x), mode.from_tensor(y)
        assert cross_entropy(xf, yf, inplace_backward=True, backend="torch").shape == ()


@pytest.mark.parametrize("up", [math.nan, math.inf, -math.inf])
def test_ce_and_lce_training_path_ignored_rows_get_zero_gradient_for_any_upstream(backend, up):
    """The fast path scales a saved gradient by the upstream scalar: an ignored row's zeros times a NaN or
    infinite upstream were NaN; PyTorch's ignored rows get 0 whatever the upstream (and the other rows'
    non-target entries PyTorch's non-finite values)."""
    from tri_losses import linear_cross_entropy
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, 5, generator=gen).to(DEVICE)
    t = torch.tensor([1, -100, 3], device=DEVICE)
    h, w = torch.randn(3, 4, generator=gen).to(DEVICE), torch.randn(5, 4, generator=gen).to(DEVICE)
    for red in ("mean", "sum"):
        for inplace in (False, True):
            xx = x.clone().requires_grad_(True)
            cross_entropy(xx, t, reduction=red, inplace_backward=inplace, backend=backend).backward(
                torch.tensor(up, device=DEVICE))
            xr = x.clone().requires_grad_(True)
            F.cross_entropy(xr, t, reduction=red).backward(torch.tensor(up, device=DEVICE))
            assert torch.equal(xx.grad[1], torch.zeros(5, device=DEVICE))
            off = torch.ones_like(x, dtype=torch.bool)
            off[[0, 2], [1, 3]] = False  # (target entries: PyTorch's p g - g is inf - inf = NaN, ours (p - 1) g)
            torch.testing.assert_close(xx.grad[off], xr.grad[off], equal_nan=True)
        hh = h.clone().requires_grad_(True)
        linear_cross_entropy(hh, w, t, reduction=red, backend=backend).backward(torch.tensor(up, device=DEVICE))
        assert torch.equal(hh.grad[1], torch.zeros(4, device=DEVICE))


@pytest.mark.parametrize("input_type", ["log_probs", "probs"])
def test_ce_log_probs_non_finite_upstream_reaches_only_the_target_column_as_nll_loss(backend, input_type):
    """Log-probability / probability inputs, class weights (class 2 weighs 0): as F.nll_loss, a non-finite
    per-row upstream (NaN, inf) and a weighted mean over no weight (upstream 1 / 0) reach each row's target
    column only, -w_y * g (NaN at a zero-weight target; for probabilities saturated to finite values), every
    other column keeps 0; so does a NaN class weight. The Triton backend made whole rows NaN, the torch backend an infinite upstream's
    target NaN (0 * inf from a term it does not have). (Not covered: a non-finite upstream of mean/sum, whose saved gradient is scaled
    keeping exact zeros on both backends: 0 at a zero-weight target where PyTorch has NaN.)"""
    gen = torch.Generator().manual_seed(5)
    lp = torch.randn(4, 6, generator=gen, dtype=torch.float64).log_softmax(-1)
    x = (lp if input_type == "log_probs" else lp.exp()).float().to(DEVICE)
    w = (torch.rand(6, generator=gen) + 0.5).to(DEVICE)
    w[2] = 0.0
    w_nan = w.clone()
    w_nan[2] = math.nan  # a NaN weight: its rows' target columns NaN, the other columns 0
    cases = ((torch.tensor([2, 2, -100, 2]), "mean", torch.tensor(1.0), w),
             (torch.tensor([2, 4, -100, 1]), "none", torch.tensor([math.nan, math.inf, math.nan, 2.0]), w),
             (torch.tensor([0, 2, 5, 1]), "none", torch.tensor([-math.inf, math.inf, 1.0, math.nan]), w),
             (torch.tensor([0, 2, 5, 2]), "none", torch.tensor([1.0, -2.0, 3.0, 0.5]), w_nan),
             (torch.tensor([0, 2, -100, 1]), "mean", torch.tensor(1.0), w_nan))
    for t, red, up, w in cases:
        t, up = t.to(DEVICE), up.to(DEVICE)
        xx = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(cross_entropy(xx, t, w, reduction=red, input_type=input_type, backend=backend),
                                   xx, up)
        xr = x.double().requires_grad_(True)
        ref = F.nll_loss(xr if input_type == "log_probs" else xr.log(), t, w.double(), reduction=red)
        (gr,) = torch.autograd.grad(ref, xr, up.double())
        if input_type == "probs":  # the gradient saturates at the output dtype's largest finite value
            gr = gr.clamp(-torch.finfo(g.dtype).max, torch.finfo(g.dtype).max)
        torch.testing.assert_close(g.double(), gr, equal_nan=True)


@pytest.mark.parametrize("case", ["plain", "smooth", "weight", "weight_smooth", "dense"])
def test_ce_logits_non_finite_per_row_upstream_and_all_minus_inf_rows_match_pytorch(backend, case):
    """Logits, reduction="none": a non-finite per-row upstream g reaches the gradient as autograd's chain
    forms it, p g - a g (inf - inf = NaN at an infinite upstream's target column, 0 * inf = NaN where p
    underflows or a class without weight gets smoothing mass), not (p - a) g (the Triton backend gave -inf
    there); a row of -inf logits has a NaN gradient (softmax 0 / 0) also when its target weighs 0 or its
    upstream is 0 (the torch backend gave 0). Ignored rows keep 0. Linear CE's gradients likewise."""
    from tri_losses import linear_cross_entropy
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(6, 5, generator=gen)
    x[2, 1] = -3e4  # p underflows to 0
    x[4] = -math.inf
    x[5] = -math.inf
    x = x.to(DEVICE)
    t = torch.tensor([2, 3, 4, -100, 3, 0], device=DEVICE)
    up = torch.tensor([math.inf, -math.inf, math.inf, math.inf, 1.0, 0.0], device=DEVICE)
    kw = dict(label_smoothing=0.1) if "smooth" in case else {}
    if "weight" in case:
        kw["weight"] = torch.tensor([1.0, 0.5, 2.0, 0.0, 1.5], device=DEVICE)
    if case == "dense":  # (no ignored rows with class probabilities: row 3's upstream reaches it)
        t = torch.rand(6, 5, generator=gen).to(DEVICE)
        t[:, 1] = 0.0
        t = t / t.sum(1, keepdim=True)
    xx = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(cross_entropy(xx, t, reduction="none", backend=backend, **kw), xx, up)

    def ref(z, **k):
        k = {n: v.double() if torch.is_tensor(v) else v for n, v in dict(kw, **k).items()}
        return F.cross_entropy(z, t.double() if case == "dense" else t, reduction="none", **k)

    xr = x.double().requires_grad_(True)
    (gr,) = torch.autograd.grad(ref(xr), xr, up.double())
    torch.testing.assert_close(g.double(), gr, equal_nan=True)
    if case != "dense":
        h = torch.randn(6, 4, generator=gen).to(DEVICE)
        w = torch.randn(5, 4, generator=gen).to(DEVICE)
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        got = torch.autograd.grad(linear_cross_entropy(hh, ww, t, reduction="none", backend=backend, **kw),
                                  (hh, ww), up)
        hr, wr = h.double().requires_grad_(True), w.double().requires_grad_(True)
        exp = torch.autograd.grad(ref(hr @ wr.t()), (hr, wr), up.double())
        for a, b in zip(got, exp):
            torch.testing.assert_close(a.double(), b, equal_nan=True)


@pytest.mark.parametrize("input_type", ["logits", "log_probs", "probs"])
def test_ce_focal_gamma_1_keeps_the_focal_factors_gradient_at_p_y_1(backend, input_type):
    """focal_gamma = 1 on a row whose target probability is 1 (exactly, or rounded to 1 in fp32): the gradient
    of (1 - p_y) L is -L dp_y, finite; it was 0 (the focal term was dropped where 1 - p_y = 0). vs float64."""
    if input_type == "logits":
        x = torch.tensor([[0.0, 40.0, -3.0], [1.0, 2.0, 0.5]])
    elif input_type == "log_probs":
        x = torch.tensor([[0.0, 20.0, -3.0], [1.0, 2.0, 0.5]]).log_softmax(1)  # row 0: [-20, 0, -23] exactly
    else:
        x = torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.5, 0.3]])
    y = torch.tensor([1, 0])
    up = torch.tensor([1.5, -0.5])
    xx = x.to(DEVICE).requires_grad_(True)
    (g,) = torch.autograd.grad(cross_entropy(xx, y.to(DEVICE), input_type=input_type, focal_gamma=1.0,
                                             label_smoothing=0.1, reduction="none", backend=backend), xx, up.to(DEVICE))
    x64 = x.double().requires_grad_(True)
    # probs: log max(p, eps) with the spec's gradient 1 / max(p, eps) (also below eps)
    lp = {"logits": lambda v: v.log_softmax(1), "log_probs": lambda v: v,
          "probs": lambda v: v.detach().clamp(min=1e-20).log() + (v - v.detach()) / v.detach().clamp(min=1e-20)}[input_type](x64)
    a = torch.full((2, 3), 0.1 / 3, dtype=torch.float64)
    a[torch.arange(2), y] += 0.9
    p_y = lp.gather(1, y[:, None])[:, 0].exp() if input_type != "probs" else x64.gather(1, y[:, None])[:, 0]
    (e,) = torch.autograd.grad((1 - p_y) * -(a * lp).sum(1), x64, up.double())
    assert torch.isfinite(g).all()
    assert_close(g.double().cpu(), e, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("input_type", ["logits", "log_probs"])
def test_ce_focal_at_a_minus_inf_target_has_the_limit_gradient(backend, input_type):
    """A -inf target logit (log-probability) with focal_gamma: the loss is inf and the gradient its limit,
    the gradient without focal (p_y L -> 0 in the focal factor's term), not a NaN row (0 * inf)."""
    x = torch.tensor([[-math.inf, 1.0, 2.0], [0.5, -1.0, 0.3]], device=DEVICE)
    if input_type == "log_probs":
        x = x.log_softmax(1)
    y = torch.tensor([0, 2], device=DEVICE)
    for kw in (dict(), dict(label_smoothing=0.1)):
        xx = x.clone().requires_grad_(True)
        loss = cross_entropy(xx, y, input_type=input_type, focal_gamma=2.0, reduction="none", backend=backend, **kw)
        (g,) = torch.autograd.grad(loss[0], xx)
        xr = x.clone().requires_grad_(True)
        ref = cross_entropy(xr, y, input_type=input_type, reduction="none", backend=backend, **kw)
        (gr,) = torch.autograd.grad(ref[0], xr)
        assert loss[0].item() == math.inf and torch.isfinite(g).all()
        assert_close(g, gr)


@pytest.mark.parametrize("eps", [1.0, 0.9, 0.3])
def test_ce_others_smoothing_at_a_minus_inf_target_logit(backend, eps):
    """"others" smoothing (target weight 1 - eps, eps / (V - 1) on each other class) with the target's logit
    -inf: the loss is inf where the target keeps weight, and with eps = 1 (weight 0) the other classes' loss,
    finite (a class of weight 0 adds nothing); also with class weights and a row whose only finite logit is
    not the target. The torch backend gave NaN (the target's weight in two terms of opposite sign for eps
    near 1: -inf + inf). Reference: the dense float64 target, zero weights skipped; gradients as Triton's."""
    x = torch.randn(4, 6, device=DEVICE)
    y = torch.tensor([2, 3, 4, 1], device=DEVICE)
    x[0, 2] = -math.inf
    x[3, 1:] = -math.inf
    x[3, 5] = 1.0
    for w in (None, torch.rand(6, device=DEVICE) + 0.1):
        xx = x.clone().requires_grad_(True)
        loss = cross_entropy(xx, y, weight=w, reduction="none", label_smoothing=eps, label_smoothing_mode="others",
                             backend=backend)
        a = torch.full((4, 6), eps / 5, dtype=torch.float64, device=DEVICE)
        a[torch.arange(4), y] = 1 - eps
        if w is not None:
            a = a * w.double()
        lp = torch.log_softmax(x.double(), 1)
        exp = -torch.where(a != 0, a * lp, 0.0).sum(1)
        assert torch.equal(torch.isinf(loss), torch.isinf(exp)) and not torch.isnan(loss).any()
        fin = torch.isfinite(exp)
        assert_close(loss[fin].double(), exp[fin], atol=1e-6, rtol=1e-5)
        (g,) = torch.autograd.grad(loss[fin].sum(), xx)
        xr = x.double().requires_grad_(True)
        lpr = torch.log_softmax(xr, 1)
        (ge,) = torch.autograd.grad(-torch.where(a != 0, a * lpr, 0.0).sum(1)[fin].sum(), xr)
        assert_close(g.double(), torch.nan_to_num(ge, nan=0.0), atol=1e-6, rtol=1e-5)

def test_ce_softcap_inf_is_no_cap_and_z_loss_inf_raises(backend):
    x = torch.randn(5, 9, device=DEVICE) * 3
    y = torch.tensor([0, 8, 3, -100, 4], device=DEVICE)
    up = torch.randn(5, device=DEVICE)
    got, g = _run(lambda t: cross_entropy(t, y, reduction="none", softcap=math.inf, backend=backend), x, up)
    exp, ge = _run(lambda t: F.cross_entropy(t, y, reduction="none"), x, up)
    assert_close(got, exp)
    assert_close(g, ge)
    with pytest.raises(ValueError, match="z_loss"):
        cross_entropy(x, y, z_loss=math.inf, backend=backend)


def test_ce_input_errors_are_also_runtime_errors():
    """PyTorch raises RuntimeError for many bad inputs: every input error here is both kinds."""
    from tri_losses._validate import InputError, InputTypeError
    assert issubclass(InputError, ValueError) and issubclass(InputError, RuntimeError)
    assert issubclass(InputTypeError, TypeError) and issubclass(InputTypeError, RuntimeError)
    for kw, exc, name in BAD:
        args = dict(input=torch.randn(3, 5), target=torch.tensor([0, 4, -100]))
        args.update(kw)
        inp, tgt = args.pop("input"), args.pop("target")
        with pytest.raises(RuntimeError, match=name):
            cross_entropy(inp, tgt, **args)
        with pytest.raises(exc, match=name):
            cross_entropy(inp, tgt, **args)


def test_ce_error_hints_for_common_slips(backend):
    x = torch.randn(2, 4, 10, device=DEVICE)
    with pytest.raises(ValueError, match=r"target\.long\(\)"):
        cross_entropy(x.flatten(0, 1), torch.randint(0, 10, (8,), device=DEVICE).float(), backend=backend)
    with pytest.raises(ValueError, match=r"flatten.*or put the classes in dim 1"):
        cross_entropy(x, torch.randint(0, 10, (2, 4), device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match=r"ignore_index: expected an int64"):
        cross_entropy(x.flatten(0, 1), torch.randint(0, 10, (8,), device=DEVICE), ignore_index=2**63, backend=backend)


def test_frame_error_bad_input_names_argument():
    with pytest.raises(ValueError, match=r"input: expected at least one class"):
        frame_error(torch.randn(3, 0), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"target: expected a tensor on cpu"):
        frame_error(torch.randn(3, 4), torch.zeros(3, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match=r"ignore_index: expected an int64"):
        frame_error(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), ignore_index=-2**63 - 1)
    for bad in (7, -3):  # out-of-range ids raise on the CPU, as cross_entropy's (they counted as errors)
        with pytest.raises(IndexError, match=rf"frame_error: target: expected ids in \[0, 5\).*got {bad}"):
            frame_error(torch.randn(3, 5), torch.tensor([0, bad, 1]))
    assert frame_error(torch.randn(3, 5), torch.tensor([0, -100, 1]), reduction="none")[1] == 0  # ignored


def test_frame_error_unchecked_bad_ids_are_nan_and_validate_checks_them(monkeypatch):
    """Where ids are not read on the host (CUDA without validate=True, emulated here, and torch.compile), an
    out-of-range id makes its row NaN, as cross_entropy's (it counted as an ordinary error: a silently
    inflated count); validate=True checks them (it was refused as an unknown keyword)."""
    from tri_losses import _validate
    x = torch.randn(4, 5)
    t = torch.tensor([0, 9, -100, 2])
    with pytest.raises(IndexError, match=r"frame_error: target: expected ids in \[0, 5\)"):
        frame_error(x, t, validate=True)
    with pytest.raises(TypeError, match="validate: expected a bool"):
        frame_error(x, t, validate="yes")
    exp = (x.argmax(1) != t).float()
    for run in (lambda: frame_error(x, t, reduction="none"),
                lambda: torch.compile(lambda a, b: frame_error(a, b, reduction="none"), fullgraph=True,
                                      backend="aot_eager")(x, t)):
        with monkeypatch.context() as m:
            m.setattr(_validate, "host_readable", lambda *a, **k: False)
            rows = run()
        assert torch.isnan(rows[1]) and rows[2] == 0 and rows[[0, 3]].tolist() == exp[[0, 3]].tolist()
    with monkeypatch.context() as m:
        m.setattr(_validate, "host_readable", lambda *a, **k: False)
        assert torch.isnan(frame_error(x, t)) and torch.isnan(frame_error(x, t, reduction="mean"))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ce_fp16_gradient_with_a_loss_scalers_upstream(backend, reduction):
    """fp16 logits with GradScaler's default upstream 2**16: the gradient is as accurate as one rounding of
    the scaled fp32 gradient allows (what autocast's fp32 cross-entropy gives), against float64; it lost the
    entries below fp16's normal range when the gradient for an upstream of 1 was held in fp16."""
    g = torch.Generator().manual_seed(0)
    N, C = 16, 40
    x = (torch.randn(N, C, generator=g) * 4).half()
    y = torch.randint(0, C, (N,), generator=g)
    up = 2.0 ** 16 if reduction == "mean" else 2.0 ** 12  # (the sum's gradient entries reach the upstream itself)
    x64 = x.double().requires_grad_(True)
    (exp,) = torch.autograd.grad(F.cross_entropy(x64, y, reduction=reduction), x64,
                                 torch.tensor(up, dtype=torch.float64))
    xs = x.to(DEVICE).requires_grad_(True)
    loss = cross_entropy(xs, y.to(DEVICE), reduction=reduction, backend=backend)
    (got,) = torch.autograd.grad(loss, xs, torch.tensor(up, device=DEVICE))
    assert got.dtype == torch.float16
    big = exp.abs() > 1e-2  # normal in fp16 once scaled; most were below its normal range for an upstream of 1
    rel = ((got.double().cpu() - exp).abs() / exp.abs())[big]
    assert float(rel.max()) < 1e-3, float(rel.max())


def test_ce_out_of_range_class_id_is_an_index_error_as_in_pytorch():
    """PyTorch raises IndexError for a class id out of bounds; so do cross_entropy and linear_cross_entropy
    (the error is also a ValueError and a RuntimeError, as the package's other argument errors)."""
    from tri_losses import linear_cross_entropy
    x, y = torch.randn(3, 4), torch.tensor([0, 4, 1])
    with pytest.raises(IndexError):
        F.cross_entropy(x, y)
    for call in (lambda: cross_entropy(x, y), lambda: linear_cross_entropy(torch.randn(3, 5), torch.randn(4, 5), y)):
        with pytest.raises(IndexError, match="target: expected ids in \\[0, 4\\)") as e:
            call()
        assert isinstance(e.value, ValueError) and isinstance(e.value, RuntimeError)
