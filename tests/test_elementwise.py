"""Element-wise losses vs PyTorch on both backends (values, reductions, broadcast weights, target gradients)."""
import contextlib
import warnings

import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import DEVICE, assert_close
from tri_losses.elementwise import (BCEWithLogitsLoss, L1Loss, MSELoss, binary_cross_entropy_with_logits,
                                    generic_ce_loss, l1_loss, mse_loss)


def _grads(fn, tensors, up):
    ts = [t.detach().clone().requires_grad_(t.dtype.is_floating_point) for t in tensors]
    out = fn(*ts)
    gs = torch.autograd.grad(out, [t for t in ts if t.requires_grad], up)
    return out.detach(), gs


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("wshape", [None, (5, 1), (3, 5, 7)], ids=["now", "w51", "wfull"])
@pytest.mark.parametrize("pos", [False, True], ids=["nopw", "pw"])
def test_bce_with_logits_matches_torch(backend, reduction, wshape, pos):
    x = torch.randn(3, 5, 7, device=DEVICE) * 3
    t = torch.rand(3, 5, 7, device=DEVICE)
    w = torch.rand(wshape, device=DEVICE) if wshape else None
    pw = torch.rand(7, device=DEVICE) * 2 if pos else None
    up = torch.randn(3, 5, 7, device=DEVICE) if reduction == "none" else torch.tensor(0.7, device=DEVICE)
    got, g = _grads(lambda a, b: binary_cross_entropy_with_logits(a, b, w, pos_weight=pw, reduction=reduction,
                                                                  backend=backend), [x, t], up)
    exp, ge = _grads(lambda a, b: F.binary_cross_entropy_with_logits(a, b, w, pos_weight=pw, reduction=reduction),
                     [x, t], up)
    assert_close(got, exp)
    assert_close(g[0], ge[0], msg="input grad")
    assert_close(g[1], ge[1], msg="target grad")


def test_broadcast_shape_matches_torch():
    """The argument checks' broadcast (``_validate.broadcast_shape``) against ``torch.broadcast_shapes`` on
    random shapes of 0-4 dims with sizes 0-3, two or three at once (None where torch raises)."""
    from tri_losses._validate import broadcast_shape
    g = torch.Generator().manual_seed(0)
    for _ in range(3000):
        shapes = [tuple(int(d) for d in torch.tensor([0, 1, 1, 2, 3])[torch.randint(0, 5, (int(n),), generator=g)])
                  for n in torch.randint(0, 5, (int(torch.randint(2, 4, (1,), generator=g)),), generator=g)]
        try:
            expected = tuple(torch.broadcast_shapes(*shapes))
        except RuntimeError:
            expected = None
        assert broadcast_shape(*shapes) == expected, shapes


@pytest.mark.parametrize("fn,ref", [(mse_loss, F.mse_loss), (l1_loss, F.l1_loss)], ids=["mse", "l1"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_mse_l1_match_torch_with_broadcast_target(backend, fn, ref, reduction):
    x = torch.randn(4, 6, 9, device=DEVICE)
    t = torch.randn(6, 9, device=DEVICE)
    t[0, :3] = x[0, 0, :3]  # exact ties: L1's gradient is 0 there
    up = torch.randn(4, 6, 9, device=DEVICE) if reduction == "none" else None
    got, g = _grads(lambda a, b: fn(a, b, reduction=reduction, backend=backend), [x, t], up)
    exp, ge = _grads(lambda a, b: ref(a, b.expand(4, 6, 9), reduction=reduction), [x, t], up)
    assert_close(got, exp)
    assert_close(g[0], ge[0])
    assert_close(g[1], ge[1])


@pytest.mark.parametrize("fn,ref", [(mse_loss, F.mse_loss), (l1_loss, F.l1_loss)], ids=["mse", "l1"])
def test_mse_l1_integer_target_is_one_hot(backend, fn, ref):
    x = torch.randn(5, 3, 8, device=DEVICE)
    y = torch.randint(0, 8, (5, 3), device=DEVICE)
    got, g = _grads(lambda a: fn(a, y, backend=backend), [x], None)
    exp, ge = _grads(lambda a: ref(a, F.one_hot(y, 8).float()), [x], None)
    assert_close(got, exp)
    assert_close(g[0], ge[0])



@pytest.mark.parametrize("fn,ref", [(mse_loss, F.mse_loss), (l1_loss, F.l1_loss)], ids=["mse", "l1"])
def test_mse_l1_integer_target_of_another_shape_is_values_as_pytorch(backend, fn, ref):
    """Only an integer target of shape input.shape[:-1] is one-hot; PyTorch reads any other integer (and
    MSE a bool) target as values by type promotion: the same here, value and gradient."""
    x = torch.randn(5, 3, 8, device=DEVICE)
    up = torch.rand(5, 3, 8, device=DEVICE)
    targets = [torch.randint(-3, 4, (5, 3, 8), device=DEVICE), torch.randint(0, 4, (3, 8), device=DEVICE,
                                                                             dtype=torch.int32),
               torch.randint(0, 4, (8,), device=DEVICE)]
    if fn is mse_loss:
        targets.append(torch.rand(5, 1, 8, device=DEVICE) > 0.5)
    for y in targets:
        for red in ("mean", "none"):
            u = up if red == "none" else None
            got, g = _grads(lambda a: fn(a, y, reduction=red, backend=backend), [x], u)
            # PyTorch's value with the integer target itself; its gradient through the float target (torch 2.11's
            # mse backward rejects an integer target)
            exp, ge = _grads(lambda a: ref(a, y.to(a.dtype), reduction=red), [x], u)
            assert_close(exp, ref(x, y, reduction=red))
            assert_close(got, exp, msg=f"{y.dtype} {tuple(y.shape)} {red}")
            assert_close(g[0], ge[0], msg=f"{y.dtype} {tuple(y.shape)} {red}")


@pytest.mark.parametrize("fn,ref", [(mse_loss, F.mse_loss), (l1_loss, F.l1_loss)], ids=["mse", "l1"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_mse_l1_weight_matches_float64_formula_and_torch(backend, fn, ref, reduction):
    """``weight=`` (torch >= 2.13's mse_loss/l1_loss): weight * l, mean = sum(weight * l) / sum(weight); gradients
    to input, target and weight vs a float64 formula, and vs PyTorch where its functions take ``weight``."""
    import inspect
    x, t = torch.randn(3, 5, device=DEVICE), torch.randn(3, 5, device=DEVICE)
    w = torch.rand(3, 5, device=DEVICE) + 0.1
    up = torch.rand(3, 5, device=DEVICE) if reduction == "none" else None
    got, g = _grads(lambda a, b, c: fn(a, b, weight=c, reduction=reduction, backend=backend), [x, t, w], up)

    def formula(a, b, c):
        d = (a - b) ** 2 if fn is mse_loss else (a - b).abs()
        r = c * d
        return r if reduction == "none" else (r.sum() if reduction == "sum" else r.sum() / c.sum())
    exp, ge = _grads(formula, [x.double(), t.double(), w.double()], None if up is None else up.double())
    assert_close(got, exp)
    for a, b in zip(g, ge):
        assert_close(a, b)
    if "weight" in inspect.signature(ref).parameters:
        assert_close(got, ref(x, t, weight=w, reduction=reduction))
    with pytest.raises(ValueError, match="weight: expected the input's shape"):
        fn(x, t, weight=w[0], backend=backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bce_half_precision_no_worse_than_torch(backend, dtype):
    x = (torch.randn(64, 33, device=DEVICE) * 8).to(dtype)
    t = torch.rand(64, 33, device=DEVICE).to(dtype)
    truth = F.binary_cross_entropy_with_logits(x.double(), t.double(), reduction="none")
    mine = binary_cross_entropy_with_logits(x, t, reduction="none", backend=backend)
    theirs = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    assert (mine.double() - truth).abs().max() <= (theirs.double() - truth).abs().max() + 1e-7


@pytest.mark.parametrize("fn", [mse_loss, binary_cross_entropy_with_logits], ids=["mse", "bce"])
def test_bf16_gradients_are_the_rounded_exact_gradients(backend, fn):
    # the gradient in bf16 is the float64 gradient rounded to nearest, for the input and the target
    # (the interpreter's own fp32 -> bf16 cast truncates: the kernel rounds there by hand)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, generator=g).bfloat16()
    t = torch.rand(2048, generator=g).bfloat16()
    up = torch.randn(2048, generator=g).bfloat16()
    xr, tr = x.double().requires_grad_(True), t.double().requires_grad_(True)
    exp = torch.autograd.grad(fn(xr, tr, reduction="none", backend="torch"), (xr, tr), up.double())
    xg, tg = x.to(DEVICE).requires_grad_(True), t.to(DEVICE).requires_grad_(True)
    got = torch.autograd.grad(fn(xg, tg, reduction="none", backend=backend), (xg, tg), up.to(DEVICE))
    for a, e in zip(got, exp):
        assert a.dtype == torch.bfloat16
        # one fp32 rounding before the bf16 one: allow the rare double-rounding tie, nothing more
        assert (a.cpu() != e.to(torch.bfloat16)).sum() <= 2


def test_elementwise_modules_and_gradcheck():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    pw = torch.rand(4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: binary_cross_entropy_with_logits(a, b, pos_weight=pw,
                                                                                  backend="torch"), (x, t))
    assert torch.autograd.gradcheck(lambda a, b: mse_loss(a, b, reduction="sum", backend="torch"), (x, t))
    xf, tf = torch.randn(4, 5), torch.rand(4, 5)
    assert_close(BCEWithLogitsLoss(pos_weight=torch.ones(5) * 2)(xf, tf),
                 torch.nn.BCEWithLogitsLoss(pos_weight=torch.ones(5) * 2)(xf, tf))
    assert_close(MSELoss(reduction="sum")(xf, tf), torch.nn.MSELoss(reduction="sum")(xf, tf))
    assert_close(L1Loss()(xf, tf), torch.nn.L1Loss()(xf, tf))


def test_generic_ce_exp_is_softmax_ce_and_sigmoid_by_hand():
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (6,))
    got, g = _grads(lambda a: generic_ce_loss(a, y, "exp", reduction="sum"), [x], None)
    exp, ge = _grads(lambda a: F.cross_entropy(a, y, reduction="sum"), [x], None)
    assert_close(got, exp)
    assert_close(g[0], ge[0])
    got, g = _grads(lambda a: generic_ce_loss(a, y, "sigmoid", reduction="none"), [x], torch.ones(6, dtype=x.dtype))
    s = torch.sigmoid(x.detach())
    yh = s / s.sum(-1, keepdim=True)
    assert_close(got, -torch.log(yh[torch.arange(6), y]))
    assert_close(g[0], (1 - s) * (yh - F.one_hot(y, 5)))  # f'/f = 1 - sigmoid



@pytest.mark.parametrize("act", ["exp", "sigmoid", "tanh", "relu"])
def test_generic_ce_clamp_is_exact_for_masked_zero_and_negative_targets(act):
    """The value is -log(clamp(y_t, 1e-20, 1e20)) with y = f(x)/sum f(x), in float64 by hand, also for a
    target logit masked with -1e9, finfo.min or -inf, f(x_t) = 0 (relu) and a negative y_t (tanh): it
    was NaN, 0 or 64. The gradient is (f'/f)(y - onehot), passed through the clamp (0 on the target's own
    entry where f(x_t) = 0; the other entries were 0 too)."""
    f = {"exp": torch.exp, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu}[act]
    x0 = torch.tensor([[-1e9, 0.5, 2.0], [torch.finfo(torch.float32).min, 0.1, -1.0], [-math.inf, 0.3, 1.0],
                       [-0.3, 0.5, 2.0], [0.7, -0.2, 1.5]])
    t = torch.tensor([0, 0, 0, 0, 2])
    x = x0.clone().requires_grad_(True)
    rows = generic_ce_loss(x, t, act if act in ("exp", "sigmoid") else f, reduction="none")
    up = torch.tensor([0.5, -2.0, 1.5, 3.0, 0.25])
    rows.backward(up)
    xd = x0.double()
    fx = f(xd)
    S = fx.sum(-1, keepdim=True)
    y = fx / S
    yt = y[torch.arange(5), t]
    assert_close(rows.double(), -torch.log(yt.clamp(1e-20, 1e20)), atol=1e-5, rtol=1e-6)
    xg = xd.clone().requires_grad_(True)
    (df,) = torch.autograd.grad(f(xg).sum(), xg)
    if act == "exp":  # f'/f = 1, y from the log-space softmax (the float64 exp overflows nothing here)
        y, dlogf = torch.softmax(xd, -1), torch.ones_like(xd)
    elif act == "sigmoid":
        dlogf = torch.sigmoid(-xd)
    else:
        dlogf = df / fx
    grad = dlogf * (y - F.one_hot(t, 3).double()) * up[:, None].double()
    # f(x_t) = 0 (exp/sigmoid work in log space: only a logit of -inf): the target's own entry gets 0 (the
    # formula's -f'/f is -1 or 0/0 there), the others keep (f'/f) y
    zero = torch.isinf(xd[torch.arange(5), t]) if act in ("exp", "sigmoid") else yt == 0
    grad[zero, t[zero]] = 0.0
    assert torch.isfinite(x.grad).all()
    assert_close(x.grad.double(), torch.nan_to_num(grad, nan=0.0), atol=1e-5, rtol=1e-5)


BAD = [
    (lambda: binary_cross_entropy_with_logits(torch.randn(3, 4), torch.rand(3, 5)), ValueError, "target"),
    (lambda: binary_cross_entropy_with_logits(torch.randn(3, 4), torch.rand(3, 4), torch.rand(5)), ValueError,
     "weight"),
    (lambda: binary_cross_entropy_with_logits(torch.randn(3, 4), torch.rand(3, 4), pos_weight=torch.rand(3)),
     ValueError, "pos_weight"),
    (lambda: mse_loss(torch.randn(3, 4), torch.rand(2, 4)), ValueError, "target"),
    (lambda: l1_loss(torch.randn(3, 4), torch.zeros(3, 4, dtype=torch.bool)), TypeError, "target"),  # as PyTorch
    (lambda: l1_loss(torch.randn(3, 4), torch.rand(3, 4), reduction="avg"), ValueError, "reduction"),
    (lambda: mse_loss(torch.randn(3, 4).long(), torch.rand(3, 4)), TypeError, "input"),
    (lambda: generic_ce_loss(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), "relu"), ValueError, "activation"),
]


@pytest.mark.parametrize("call,exc,name", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_elementwise_bad_input_raises_naming_argument(call, exc, name):
    with pytest.raises(exc, match=name):
        call()


@pytest.mark.parametrize("ours,theirs,args", [
    (mse_loss, F.mse_loss, (torch.randn(3, 4), torch.rand(2, 4))),
    (l1_loss, F.l1_loss, (torch.randn(3, 4), torch.rand(3, 5))),
    (mse_loss, F.mse_loss, (torch.randn(3, 4), torch.rand(3, 4), "avg")),
    (binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits,
     (torch.randn(3, 4), torch.rand(3, 4), torch.rand(3, 5))),
])
def test_elementwise_bad_input_raises_what_pytorch_raises_too(ours, theirs, args):
    """A drop-in: code catching PyTorch's exception type for the same bad input (RuntimeError here) catches
    ours too, which is also a ValueError naming the argument."""
    kw = {"reduction": args[2]} if isinstance(args[-1], str) else {}
    pos = args[:2] if kw else args
    with pytest.raises(Exception) as theirs_err:
        theirs(*pos, **kw)
    with pytest.raises(theirs_err.type):
        ours(*pos, **kw)
    with pytest.raises(ValueError):
        ours(*pos, **kw)


def test_elementwise_torch_compile_fullgraph(backend):
    x = torch.randn(4, 9, device=DEVICE)
    t = torch.rand(4, 9, device=DEVICE)
    pw = torch.rand(9, device=DEVICE)

    y = torch.randint(0, 9, (4,), device=DEVICE)

    def f(a):
        return (binary_cross_entropy_with_logits(a, t, pos_weight=pw, backend=backend) + mse_loss(a, t, backend=backend)
                + generic_ce_loss(a, y, "sigmoid", backend="torch")
                # a broadcast target: PyTorch's size warning is skipped while compiling (it broke the graph)
                + mse_loss(a, t[0], backend=backend) + l1_loss(a, t[:1], backend=backend))

    torch._dynamo.reset()
    got, g = _grads(torch.compile(f, fullgraph=True), [x], None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager warns about the broadcast target, as PyTorch does
        exp, ge = _grads(f, [x], None)
    assert_close(got, exp)
    assert_close(g[0], ge[0])


@pytest.mark.parametrize("kind", ["bce", "mse", "l1"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_frame_losses_masked(backend, kind, reduction):
    from tri_losses.elementwise import frame_losses
    B, T, Fd = 3, 5, 4
    x = torch.randn(B, T, Fd, device=DEVICE, dtype=torch.float64).float()
    t = torch.rand(B, T, Fd, device=DEVICE) if kind == "bce" else torch.randn(B, T, Fd, device=DEVICE)
    lengths = torch.tensor([5, 2, 0], device=DEVICE)
    xr = x.detach().clone().requires_grad_(True)
    got = frame_losses(kind, xr, t, lengths, mean_over_features=kind != "l1", reduction=reduction, backend=backend)
    xd = x.double().requires_grad_(True)
    ref = {"bce": F.binary_cross_entropy_with_logits, "mse": F.mse_loss, "l1": F.l1_loss}[kind]
    el = ref(xd, t.double(), reduction="none")
    rows = el.mean(-1) if kind != "l1" else el.sum(-1)
    mask = torch.arange(T, device=DEVICE) < lengths[:, None]
    rows = rows * mask
    exp = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / mask.sum()}[reduction]
    assert_close(got.double(), exp, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(exp)
    (gx,) = torch.autograd.grad(got, xr, g.float())
    (ge,) = torch.autograd.grad(exp, xd, g)
    assert_close(gx.double(), ge, atol=1e-5, rtol=1e-5)
    assert torch.all(gx[1, 2:] == 0) and torch.all(gx[2] == 0)


def test_frame_losses_onehot_and_bad_input(backend):
    from tri_losses.elementwise import frame_losses
    x = torch.randn(2, 3, 4, device=DEVICE)
    ids = torch.randint(0, 4, (2, 3), device=DEVICE)
    got = frame_losses("mse", x, ids, torch.tensor([3, 1], device=DEVICE), mean_over_features=True, backend=backend)
    exp = ((x - F.one_hot(ids, 4).float()) ** 2).mean(-1) * torch.tensor([[1, 1, 1], [1, 0, 0]], device=DEVICE)
    assert_close(got, exp)
    with pytest.raises(ValueError, match="kind"):
        frame_losses("hinge", x, x, backend=backend)
    with pytest.raises(ValueError, match="lengths"):
        frame_losses("l1", x, x, torch.tensor([1, 2, 3], device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="pos_weight"):
        frame_losses("mse", x, x, pos_weight=torch.ones(4, device=DEVICE), backend=backend)


def test_frame_losses_padding_nan_does_not_leak(backend):
    from tri_losses.elementwise import frame_losses
    x = torch.randn(2, 4, 3, device=DEVICE)
    x[1, 2:] = float("nan")
    t = torch.rand(2, 4, 3, device=DEVICE)
    lengths = torch.tensor([4, 2], device=DEVICE)
    xr = x.clone().requires_grad_(True)
    loss = frame_losses("bce", xr, t, lengths, mean_over_features=True, reduction="sum", backend=backend)
    loss.backward()
    exp = F.binary_cross_entropy_with_logits(x[0], t[0], reduction="none").mean(-1).sum() + \
        F.binary_cross_entropy_with_logits(x[1, :2], t[1, :2], reduction="none").mean(-1).sum()
    assert_close(loss, exp)
    assert torch.isfinite(xr.grad).all() and torch.all(xr.grad[1, 2:] == 0)


def test_elementwise_pytorch_argument_rules(backend):
    """PyTorch's rules: pos_weight broadcasts with the input (any shape); weight/pos_weight are not
    differentiable; one-hot ids out of range and lengths beyond T are errors (CPU)."""
    from tri_losses.elementwise import frame_losses
    x = torch.randn(3, 5, device=DEVICE, requires_grad=True)
    t = torch.rand(3, 5, device=DEVICE)
    pw = torch.rand(3, 5, device=DEVICE) + 0.5
    if backend == "triton":  # the kernel reads pos_weight along the last dim: forcing it is an error
        with pytest.raises(ValueError, match="pos_weight"):
            binary_cross_entropy_with_logits(x, t, pos_weight=pw, backend="triton")
    got, g = _grads(lambda a: binary_cross_entropy_with_logits(a, t, pos_weight=pw,
                                                               backend="auto" if backend == "triton" else backend),
                    [x], None)
    exp, ge = _grads(lambda a: F.binary_cross_entropy_with_logits(a, t, pos_weight=pw), [x], None)
    assert_close(got, exp)
    assert_close(g[0], ge[0])
    for kw in (dict(weight=torch.rand(5, device=DEVICE, requires_grad=True)),
               dict(pos_weight=torch.rand(5, device=DEVICE, requires_grad=True))):
        with pytest.raises(ValueError, match="differentiable"):
            binary_cross_entropy_with_logits(x, t, backend=backend, **kw)
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match="target"):
            mse_loss(x, torch.tensor([0, 7, 1]), backend=backend)
        with pytest.raises(ValueError, match="lengths"):
            frame_losses("mse", torch.randn(2, 4, 3), torch.randn(2, 4, 3), torch.tensor([5, 3]), backend=backend)


def test_generic_ce_out_of_range_target_names_argument():
    x = torch.randn(3, 4, device=DEVICE)
    for bad in (7, -1, 4):
        t = torch.tensor([0, bad, 1], device=DEVICE)
        if DEVICE.type == "cpu":
            with pytest.raises(ValueError, match="generic_ce_loss: target: expected ids in"):
                generic_ce_loss(x, t)
        else:  # no host sync on CUDA: that row is NaN, the others exact
            rows = generic_ce_loss(x, t, reduction="none")
            assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()


def test_generic_ce_validate_checks_ids_and_unchecked_rows_are_nan(monkeypatch):
    """validate=True checks class ids (the CUDA opt-in; it was refused as an unknown keyword); unchecked
    (emulated: no host read) an out-of-range id gives that row NaN and leaves the others exact."""
    from tri_losses import _validate
    x = torch.randn(3, 4, device=DEVICE)
    t = torch.tensor([0, 7, 1], device=DEVICE)
    with pytest.raises(ValueError, match="generic_ce_loss: target: expected ids in"):
        generic_ce_loss(x, t, validate=True)
    with pytest.raises(TypeError, match="validate: expected a bool"):
        generic_ce_loss(x, t, validate=1)
    monkeypatch.setattr(_validate, "host_readable", lambda *a, **k: False)
    rows = generic_ce_loss(x, t, reduction="none")
    exp = F.cross_entropy(x, torch.tensor([0, 0, 1], device=DEVICE), reduction="none")
    assert torch.isnan(rows[1]) and torch.allclose(rows[[0, 2]], exp[[0, 2]], atol=1e-6)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_l1_complex_input_matches_torch(backend, reduction):
    x = torch.randn(4, 5, dtype=torch.complex64, device=DEVICE)
    t = torch.randn(5, dtype=torch.complex64, device=DEVICE)  # broadcast target
    if backend == "triton":  # the Triton template is real-only: forcing it on complex input raises
        with pytest.raises(RuntimeError, match="l1_loss: backend='triton'"):
            l1_loss(x, t, reduction=reduction, backend=backend)
        return
    up = torch.randn(4, 5, device=DEVICE) if reduction == "none" else torch.tensor(0.3, device=DEVICE)
    xr = x.clone().requires_grad_()
    got = l1_loss(xr, t, reduction=reduction, backend=backend)
    (g,) = torch.autograd.grad(got, xr, up)
    xe = x.clone().requires_grad_()
    exp = F.l1_loss(xe, t, reduction=reduction)
    (ge,) = torch.autograd.grad(exp, xe, up)
    assert got.dtype == exp.dtype == torch.float32
    assert_close(got, exp)
    torch.testing.assert_close(g, ge)
    with pytest.raises(TypeError, match="mse_loss: input"):  # PyTorch has no complex MSE either
        mse_loss(x, t, backend=backend)


@pytest.mark.parametrize("call", [
    lambda a, b, be: mse_loss(a, b, backend=be),
    lambda a, b, be: l1_loss(a, b, reduction="none", backend=be),
    lambda a, b, be: binary_cross_entropy_with_logits(a, b.sigmoid(), backend=be),
], ids=["mse", "l1", "bce"])
def test_forward_mode_ad_raises_instead_of_dropping_the_tangent(backend, call):
    import torch.autograd.forward_ad as fwAD
    x, t, v = (torch.randn(3, 4, device=DEVICE) for _ in range(3))
    with fwAD.dual_level():
        for args in ((fwAD.make_dual(x, v), t), (x, fwAD.make_dual(t, v))):  # a tangent on input or target
            with pytest.raises(NotImplementedError, match="forward-mode AD is not supported"):
                call(*args, backend)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):  # torch.func.jvp opens a dual level too
        torch.func.jvp(lambda a: call(a, t, backend), (x,), (v,))
    call(x, t, backend)  # outside a dual level: no effect
    # a plain-torch op (no custom op) keeps forward-mode AD: generic_ce with exp is softmax CE
    y = torch.randint(0, 4, (3,), device=DEVICE)
    _, tan = torch.func.jvp(lambda a: generic_ce_loss(a, y), (x,), (v,))
    _, tan_ref = torch.func.jvp(lambda a: F.cross_entropy(a, y), (x,), (v,))
    assert_close(tan, tan_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_contiguous_and_strided_paths_match_torch_and_grads_keep_input_dtype(backend, dtype):
    """The contiguous fast path (no index division) and the strided path give PyTorch's values and
    gradients; a full-shape input's gradient comes out of the op in its own dtype (no fp32 + cast)."""
    xc = torch.randn(6, 40, device=DEVICE).to(dtype)
    xs = torch.randn(40, 6, device=DEVICE).to(dtype).t()  # same shape, strided
    t = torch.rand(6, 40, device=DEVICE).to(dtype)
    up = torch.randn(6, 40, device=DEVICE)
    for x in (xc, xs):
        for fn, ref in ((mse_loss, F.mse_loss), (l1_loss, F.l1_loss),
                        (binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits)):
            got, g = _grads(lambda a, b: fn(a, b, reduction="none", backend=backend), [x, t], up)
            exp, ge = _grads(lambda a, b: ref(a.float(), b.float(), reduction="none"), [x, t], up)
            assert g[0].dtype == g[1].dtype == dtype
            tol = dict(atol=1e-2, rtol=1e-2) if dtype == torch.bfloat16 else {}
            assert_close(got, exp, **tol)
            assert_close(g[0], ge[0].to(dtype), **tol)
            assert_close(g[1], ge[1].to(dtype), **tol)
    dx, dt = torch.ops.tri_losses.ew_bwd(torch.ones((), device=DEVICE), xc, t, None, None, [6, 40], 1, False,
                                         True, True, backend == "triton")
    assert dx.dtype == dt.dtype == dtype


def test_strided_upstream_reaching_past_int32_on_the_contiguous_path(backend):
    """A per-element upstream gradient with a large stride (a loss concatenated beside other columns keeps
    its stride in the backward) on contiguous inputs: the backward op reads it at element ``i`` times its
    stride, past 2**31 elements from its start here although the inputs have 3 elements (the contiguous
    path's int32 index wrapped and read the value planted at the wrapped address). The upstream lies in an
    8 GiB fp16 buffer of which only a few pages are written (on the CPU the rest is never touched)."""
    from tri_losses._torch import elementwise as tew
    sg, pre = 2 ** 30, 2 ** 31  # element 2 of the upstream sits at pre + 2 * sg = 2**32 elements
    base = torch.empty(pre + 2 * sg + 1, dtype=torch.float16, device=DEVICE)
    up = base.as_strided((3,), (sg,), pre)
    up.copy_(torch.tensor([1.5, -2.0, 3.0]))
    base[pre + 2 * sg - 2 ** 32] = -7.0  # what an int32 offset of element 2 would read
    x = torch.tensor([0.5, 1.0, -1.0], device=DEVICE)
    t = torch.tensor([0.0, 0.25, 1.0], device=DEVICE)
    for kind, ref in ((tew.KIND_MSE, F.mse_loss), (tew.KIND_L1, F.l1_loss)):
        dx, _ = torch.ops.tri_losses.ew_bwd(up, x, t, None, None, [3], kind, False, False, False,
                                            backend == "triton")
        xd = x.double().requires_grad_()
        exp = torch.autograd.grad(ref(xd, t.double(), reduction="none"), xd, up.double())[0]
        assert_close(dx, exp.float())


def test_bce_pos_weight_target_gradient_without_cancellation(backend):
    """d/dt of BCE-with-logits with pos_weight, q softplus(-x) - softplus(x), for very negative logits and a small
    pos_weight: the form (q - 1) softplus(-x) - x cancelled there (10 came out 8 at x = -1e8, q = 1e-7, and 0
    instead of 1 at x = -1e30, q = 1e-30); float64 reference of the formula, fp32 inputs."""
    def sp(v):  # softplus in float64 without a threshold
        return v.clamp(min=0) + torch.log1p(torch.exp(-v.abs()))
    x = torch.tensor([-1e8, -1e30, -40.0, -5.0, -1.5, -0.5, 0.0, 1e-3, 0.5, 5.0, 1e4], device=DEVICE)
    q = torch.tensor([1e-7, 1e-30, 1e-3, 0.5, 1.0, 1.0, 1.0, 1.0, 2.0, 3.0, 0.25], device=DEVICE)
    t = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE).requires_grad_(True)
    up = torch.rand(x.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    binary_cross_entropy_with_logits(x, t, pos_weight=q, reduction="none", backend=backend).backward(up)
    xd, qd = x.double(), q.double()
    exp = (qd * sp(-xd) - sp(xd)) * up.double()
    assert_close(t.grad, exp, atol=1e-30, rtol=2e-6)
    if backend == "torch":  # float64 (torch backend): no softplus threshold shortcut (x in (-37, -20))
        xd = torch.tensor([-21.5, -25.0, -30.0, -5.0], dtype=torch.float64, device=DEVICE)
        td = torch.rand(4, dtype=torch.float64, device=DEVICE).requires_grad_(True)
        qd = torch.full((4,), 0.3, dtype=torch.float64, device=DEVICE)
        binary_cross_entropy_with_logits(xd, td, pos_weight=qd, reduction="sum", backend=backend).backward()
        torch.testing.assert_close(td.grad, qd * sp(-xd) - sp(xd), rtol=1e-14, atol=0)


def test_mse_l1_warn_on_broadcast_targets_as_pytorch(backend):
    """A target of another size broadcasts with PyTorch's warning (same text, at the caller's line);
    equal shapes and the one-hot class-id extension do not warn."""
    import warnings
    x = torch.randn(3, 4, device=DEVICE)
    t = torch.randn(4, device=DEVICE)
    for fn, ref in ((mse_loss, F.mse_loss), (l1_loss, F.l1_loss)):
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            out = fn(x, t, backend=backend)
        with warnings.catch_warnings(record=True) as exp:
            warnings.simplefilter("always")
            expected = ref(x, t)
        assert_close(out, expected)
        mine = [str(w.message) for w in got if issubclass(w.category, UserWarning)]
        assert mine == [str(w.message) for w in exp if issubclass(w.category, UserWarning)] and len(mine) == 1
        assert [w.filename for w in got] == [__file__]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fn(x, t.expand(3, 4).clone(), backend=backend)
            fn(x, torch.tensor([0, 3, 1], device=DEVICE), backend=backend)  # one-hot class ids


def test_modules_take_pytorchs_positional_arguments(backend):
    """The modules' constructors follow torch.nn's signatures, the deprecated size_average/reduce flags
    included (mapped as torch.nn maps them)."""
    import inspect
    import warnings
    x = torch.randn(3, 4, device=DEVICE)
    t = torch.rand(3, 4, device=DEVICE)
    w, pw = torch.rand(4, device=DEVICE), torch.rand(4, device=DEVICE)
    mods = ((MSELoss, torch.nn.MSELoss, ()), (L1Loss, torch.nn.L1Loss, ()),
            (BCEWithLogitsLoss, torch.nn.BCEWithLogitsLoss, (w,)))
    for mine, ref, lead in mods:
        names = list(inspect.signature(ref.__init__).parameters)[1:]
        assert list(inspect.signature(mine.__init__).parameters)[1:len(names) + 1] == names
        for flags in ((None, None, "sum"), (None, None, "none"), (False, None, "mean"), (None, False, "mean"),
                      (True, True, "none")):
            args = lead + flags + ((pw,) if ref is torch.nn.BCEWithLogitsLoss else ())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the deprecation warning of the legacy flags
                got = mine(*args, backend=backend)(x, t)
                exp = ref(*args)(x, t)
            assert_close(got, exp)


def test_modules_share_pytorchs_base_classes_and_attributes():
    """Every loss module is an instance of the torch.nn base class its PyTorch counterpart derives from
    (_Loss, or _WeightedLoss for the class-weighted ones), so isinstance checks in training code hold, with
    the same state_dict keys; LinearCrossEntropyLoss has PyTorch's attributes and repr."""
    from torch.nn.modules.loss import _Loss, _WeightedLoss

    import tri_losses as T
    w = torch.rand(3)
    pairs = ((T.CrossEntropyLoss(w), torch.nn.CrossEntropyLoss(w)), (T.CTCLoss(), torch.nn.CTCLoss()),
             (T.BCEWithLogitsLoss(pos_weight=w), torch.nn.BCEWithLogitsLoss(pos_weight=w)),
             (T.MSELoss(reduction="sum"), torch.nn.MSELoss(reduction="sum")), (T.L1Loss(), torch.nn.L1Loss()))
    for mine, ref in pairs:
        assert isinstance(mine, _Loss) and isinstance(mine, _WeightedLoss) == isinstance(ref, _WeightedLoss)
        assert mine.reduction == ref.reduction and list(mine.state_dict()) == list(ref.state_dict())
    mine = T.LinearCrossEntropyLoss(4, 3, weight=w)
    assert isinstance(mine, _WeightedLoss) and list(mine.state_dict()) == ["weight", "linear.weight"]
    if not hasattr(torch.nn, "LinearCrossEntropyLoss"):  # PyTorch < 2.13
        return
    ref = torch.nn.LinearCrossEntropyLoss(4, 3, weight=w)
    assert isinstance(ref, _WeightedLoss) and list(mine.state_dict()) == list(ref.state_dict())
    assert (mine.num_classes, mine.out_features) == (ref.num_classes, ref.out_features)
    assert repr(mine) == repr(ref)


def test_bce_zero_dim_input_and_integer_weights_as_pytorch(backend):
    """A 0-dim input with a 0-dim pos_weight, and integer (or bool) weight / integer pos_weight, which PyTorch
    promotes to the input's dtype: the same loss and input gradient as PyTorch; a bool pos_weight raises."""
    x = torch.tensor(0.3, device=DEVICE, requires_grad=True)
    t = torch.tensor(1.0, device=DEVICE)
    pw = torch.tensor(2.0, device=DEVICE)
    for reduction in ("none", "mean", "sum"):
        want = F.binary_cross_entropy_with_logits(x, t, pos_weight=pw, reduction=reduction)
        got = binary_cross_entropy_with_logits(x, t, pos_weight=pw, reduction=reduction, backend=backend)
        assert got.shape == want.shape
        assert_close(got, want)
        assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])
    x = torch.randn(3, 4, device=DEVICE, requires_grad=True)
    t = torch.rand(3, 4, device=DEVICE)
    for kw in (dict(pos_weight=torch.tensor([2, 1, 0, 3], device=DEVICE)),
               dict(weight=torch.tensor([2, 1, 1, 3], device=DEVICE)),
               dict(weight=torch.tensor([True, False, True, True], device=DEVICE))):
        want = F.binary_cross_entropy_with_logits(x, t, **kw)
        got = binary_cross_entropy_with_logits(x, t, backend=backend, **kw)
        assert_close(got, want)
        assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])
        assert_close(BCEWithLogitsLoss(**kw)(x, t), want)
    with pytest.raises(TypeError, match="pos_weight"):
        binary_cross_entropy_with_logits(x, t, pos_weight=torch.ones(4, dtype=torch.bool, device=DEVICE),
                                         backend=backend)


def test_bce_target_gradient_at_infinite_logits(backend):
    """d/dt of BCE-with-logits at logits of +-inf without pos_weight is -x (+-inf), as PyTorch gives it; the
    Triton kernel's pos_weight form (q - 1) * softplus(-x) - x made it 0 * inf = NaN at -inf."""
    x = torch.tensor([float("inf"), -float("inf"), -float("inf"), 3.0], device=DEVICE)
    t0 = torch.tensor([1.0, 0.0, 0.5, 0.2], device=DEVICE)
    grads = []
    for fn in (F.binary_cross_entropy_with_logits,
               lambda a, b, **k: binary_cross_entropy_with_logits(a, b, backend=backend, **k)):
        t = t0.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(fn(x, t, reduction="sum"), t)[0])
    assert torch.equal(grads[1], grads[0]), grads


def test_functional_forms_take_pytorchs_positional_and_legacy_arguments(backend):
    """The functional forms take PyTorch's argument order, its deprecated size_average/reduce included (mapped
    as PyTorch maps them, with its warning): the same values as torch.nn.functional."""
    from tri_losses import cross_entropy
    g = torch.Generator().manual_seed(4)
    x, t, w = torch.randn(4, 5, generator=g), torch.rand(4, 5, generator=g), torch.rand(5, generator=g)
    y, pw = torch.tensor([0, 1, 2, 2]), torch.rand(5, generator=g) + 0.5
    x, t, w, y, pw = (v.to(DEVICE) for v in (x, t, w, y, pw))
    calls = [(cross_entropy, F.cross_entropy, (x, y, w, None, 2, None, "sum", 0.1), {}),
             (cross_entropy, F.cross_entropy, (x, y), dict(reduce=False)),
             (cross_entropy, F.cross_entropy, (x, y, w), dict(size_average=False)),
             (binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, (x, t, w, None, None, "sum", pw),
              {}),
             (binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, (x, t), dict(reduce=False)),
             (mse_loss, F.mse_loss, (x, t, None, None, "sum"), {}),
             (l1_loss, F.l1_loss, (x, t), dict(size_average=False)),
             (l1_loss, F.l1_loss, (x, t, True, False), {})]
    for ours, theirs, args, kw in calls:
        with pytest.warns(UserWarning) if "reduce" in kw or "size_average" in kw else contextlib.nullcontext():
            got = ours(*args, backend=backend, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exp = theirs(*args, **kw)
        assert_close(got, exp, msg=theirs.__name__)


def test_elementwise_mean_is_pytorchs_deprecated_mean(backend):
    """reduction="elementwise_mean", PyTorch's deprecated spelling of "mean", which every one of its losses still
    takes (with a deprecation warning), is read as "mean" by each drop-in, function and module (it raised)."""
    import tri_losses as T
    g = torch.Generator().manual_seed(5)
    x, t, y = torch.randn(4, 5, generator=g), torch.rand(4, 5, generator=g), torch.tensor([0, 1, 2, 2])
    head = torch.randn(5, 5, generator=g)
    lp = torch.randn(6, 2, 5, generator=g).log_softmax(-1)
    tg, il, tl = torch.tensor([[1, 2], [3, 3]]), torch.tensor([6, 5]), torch.tensor([2, 2])
    x, t, y, head, lp, tg, il, tl = (v.to(DEVICE) for v in (x, t, y, head, lp, tg, il, tl))
    calls = [(lambda r: T.cross_entropy(x, y, reduction=r, backend=backend), lambda: F.cross_entropy(x, y)),
             (lambda r: T.CrossEntropyLoss(reduction=r, backend=backend)(x, y), lambda: F.cross_entropy(x, y)),
             (lambda r: T.linear_cross_entropy(x, head, y, reduction=r, backend=backend),
              lambda: F.cross_entropy(x @ head.T, y)),
             (lambda r: T.ctc_loss(lp, tg, il, tl, reduction=r, backend=backend), lambda: F.ctc_loss(lp, tg, il, tl)),
             (lambda r: T.CTCLoss(reduction=r, backend=backend)(lp, tg, il, tl), lambda: F.ctc_loss(lp, tg, il, tl)),
             (lambda r: T.binary_cross_entropy_with_logits(x, t, reduction=r, backend=backend),
              lambda: F.binary_cross_entropy_with_logits(x, t)),
             (lambda r: T.BCEWithLogitsLoss(reduction=r, backend=backend)(x, t),
              lambda: F.binary_cross_entropy_with_logits(x, t)),
             (lambda r: T.mse_loss(x, t, reduction=r, backend=backend), lambda: F.mse_loss(x, t)),
             (lambda r: T.MSELoss(reduction=r, backend=backend)(x, t), lambda: F.mse_loss(x, t)),
             (lambda r: T.l1_loss(x, t, reduction=r, backend=backend), lambda: F.l1_loss(x, t)),
             (lambda r: T.L1Loss(reduction=r, backend=backend)(x, t), lambda: F.l1_loss(x, t))]
    for k, (ours, ref) in enumerate(calls):
        with pytest.warns(UserWarning, match="elementwise_mean"):
            got = ours("elementwise_mean")
        assert_close(got, ref().float(), msg=str(k))
        assert torch.equal(got, ours("mean")), k


def test_legacy_arguments_compile_fullgraph():
    """The deprecated size_average/reduce mapping is plain Python, so torch.compile(fullgraph=True) traces a call
    that passes them (torch's own helper, called from here, is an opaque torch.* call that returns a str)."""
    from tri_losses import cross_entropy
    x, t, y = torch.randn(4, 5), torch.rand(4, 5), torch.tensor([0, 1, 2, 3])
    for fn, ref in ((lambda: cross_entropy(x, y, None, False), lambda: F.cross_entropy(x, y, reduction="sum")),
                    (lambda: mse_loss(x, t, None, False), lambda: F.mse_loss(x, t, reduction="none")),
                    (lambda: binary_cross_entropy_with_logits(x, t, None, None, False),
                     lambda: F.binary_cross_entropy_with_logits(x, t, reduction="none"))):
        torch._dynamo.reset()
        assert_close(torch.compile(fn, backend="aot_eager", fullgraph=True)(), ref())


@pytest.mark.parametrize("pos_weight", [None, 2.0, 0.0])
def test_bce_with_logits_non_finite_grid_matches_pytorch_but_for_the_documented_limit(backend, pos_weight):
    """x in {-inf, inf, nan, finite} x t in {0, 0.3, 1, nan}: loss and gradient equal PyTorch's, except the
    documented case x = -inf with t != 0 (pos_weight not 0), whose loss is its limit, +inf for t > 0 and
    -inf for t < 0, where PyTorch's formula gives NaN; the gradient is PyTorch's there too."""
    xs, ts = [-math.inf, math.inf, math.nan, 0.0, 1.5, -2.0], [0.0, 0.3, 1.0, math.nan, -0.5]
    x = torch.tensor([a for a in xs for _ in ts], device=DEVICE)
    t = torch.tensor([b for _ in xs for b in ts], device=DEVICE)
    pw = None if pos_weight is None else torch.tensor([pos_weight], device=DEVICE)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got = binary_cross_entropy_with_logits(xa, t, reduction="none", pos_weight=pw, backend=backend)
    exp = F.binary_cross_entropy_with_logits(xb, t, reduction="none", pos_weight=pw)
    got.sum().backward()
    exp.sum().backward()
    limit = (x == -math.inf) & (t != 0) & ~t.isnan() & (pos_weight != 0.0)
    assert torch.equal(got[limit], torch.where(t[limit] > 0, math.inf, -math.inf)) and exp[limit].isnan().all()
    assert_close(got[~limit], exp[~limit].detach())  # (NaN where PyTorch's is NaN)
    assert_close(xa.grad, xb.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_broadcast_16bit_operand_gradient_is_summed_before_rounding_beyond_4_dims(backend, dtype):
    """A 16-bit operand broadcast over the others (5-D here: the Triton path folds leading dims into a copy)
    gets its gradient summed in fp32 and rounded once, as PyTorch's float64 result rounded; the Triton path
    rounded each copy's gradient to 16 bits first (0 for 1.0001e-4 - 1e-4 in fp16)."""
    gen = torch.Generator().manual_seed(4)
    for fn in (l1_loss, mse_loss):
        for shape, tshape in (((2, 1, 1, 1, 1), (1,)), ((3, 2, 4, 2, 5), (1, 2, 1, 2, 1)), ((2, 3, 2, 2, 2, 3), (3,))):
            x = (torch.randn(shape, generator=gen) * 3).to(dtype).to(DEVICE)
            t = torch.randn(tshape, generator=gen).to(dtype).to(DEVICE)
            up = (torch.randn(shape, generator=gen) + 1e-4).to(DEVICE)
            ctx = pytest.warns(UserWarning) if tshape != shape else contextlib.nullcontext()
            with ctx:
                _, (gx, gt) = _grads(lambda a, b: fn(a, b, reduction="none", backend=backend), (x, t), up)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, (ex, et) = _grads(lambda a, b: getattr(F, fn.__name__)(a, b, reduction="none"),
                                     (x.double(), t.double()), up.double())
            assert_close(gx, ex.to(dtype), atol=0, rtol=0)
            assert_close(gt, et.to(dtype), atol=0, rtol=0)


@pytest.mark.parametrize("fn", [mse_loss, l1_loss], ids=["mse", "l1"])
def test_mse_l1_16bit_weight_mean_divides_by_an_fp32_sum(backend, fn):
    """weight= with reduction="mean": sum(w l) / sum(w) with the weight's sum in fp32, not in the weight's
    16-bit dtype (bf16: 1.0039 for 1.0), and a weight gradient formed in fp32 (fp16: inf - inf = NaN where it
    is 0)."""
    x = torch.zeros(3, dtype=torch.bfloat16, device=DEVICE)
    t = torch.ones(3, dtype=torch.bfloat16, device=DEVICE)
    w = torch.tensor([1.0, 2 ** -9, 2 ** -9], dtype=torch.bfloat16, device=DEVICE)
    assert fn(x, t, weight=w, backend=backend).item() == 1.0
    x = torch.tensor([300.0, 2.0], dtype=torch.float16, device=DEVICE)
    w = torch.tensor([1.0, 0.0], dtype=torch.float16, device=DEVICE, requires_grad=True)
    (g,) = torch.autograd.grad(fn(x, torch.zeros_like(x), weight=w, backend=backend), w)
    w64 = w.detach().double().requires_grad_(True)
    l64 = (x.double() ** 2 if fn is mse_loss else x.double().abs())
    (e,) = torch.autograd.grad((l64 * w64).sum() / w64.sum(), w64)
    assert_close(g, e.to(torch.float16), atol=0, rtol=0)


def test_bce_float64_is_exact_above_the_softplus_threshold():
    """fp64 (torch backend): softplus(x) for x > 20 is not x (F.softplus's default threshold gave 25 for
    25.000000000013888)."""
    x = torch.tensor([25.0, 30.0, -25.0, 60.0], dtype=torch.float64)
    t = torch.tensor([0.0, 0.3, 1.0, 0.9], dtype=torch.float64)
    got = binary_cross_entropy_with_logits(x, t, reduction="none", backend="torch")
    exact = (1 - t) * (x + torch.log1p(torch.exp(-x))) + t * torch.log1p(torch.exp(-x))
    torch.testing.assert_close(got, exact, rtol=1e-15, atol=0)
    torch.testing.assert_close(got, F.binary_cross_entropy_with_logits(x, t, reduction="none"), rtol=1e-15, atol=0)


@pytest.mark.parametrize("fn", [mse_loss, l1_loss], ids=["mse", "l1"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_mse_l1_integer_and_bool_weights_as_pytorch(backend, fn, reduction):
    """An integer or bool ``weight=`` is read as PyTorch's type promotion reads it (it raised a TypeError)."""
    x = torch.randn(3, 4, device=DEVICE, requires_grad=True)
    t = torch.randn(3, 4, device=DEVICE)
    for w in (torch.randint(0, 4, (3, 4), device=DEVICE), torch.rand(3, 4, device=DEVICE) > 0.3):
        (got, (g,)), (exp, (e,)) = (_grads(lambda a: f(a, t, reduction=reduction, weight=w, **kw), (x,),
                                           torch.ones(()) if reduction != "none" else torch.ones(3, 4))
                                    for f, kw in ((fn, dict(backend=backend)), (getattr(F, fn.__name__), {})))
        assert_close(got, exp)
        assert_close(g, e)


@pytest.mark.parametrize("fn", [mse_loss, l1_loss, binary_cross_entropy_with_logits], ids=["mse", "l1", "bce"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_float64_target_promotes_the_loss_as_pytorch(backend, fn, dtype, reduction):
    """A float64 target with a lower-precision input computes in float64, as PyTorch's type promotion does: loss
    float64, the input's gradient in its own dtype, the target's in float64 (the target was rounded to float32,
    so ``|1 - (1 + 1e-9)|`` gave loss 0 and gradient 0). Compared with the float64 formula on ``input.double()``
    (PyTorch's own BCE forms ``log_sigmoid`` in the input's dtype first); a forced Triton backend raises naming
    the target."""
    x = torch.randn(3, 4, device=DEVICE).to(dtype)
    t = torch.rand(3, 4, device=DEVICE, dtype=torch.float64)
    if fn is not binary_cross_entropy_with_logits:
        t[0, 0] = x[0, 0].double() + 1e-9  # below float32's resolution near x: rounding t loses it
    up = torch.rand(3, 4, device=DEVICE, dtype=torch.float64) if reduction == "none" else torch.tensor(
        1.7, device=DEVICE, dtype=torch.float64)
    if backend == "triton":
        with pytest.raises(TypeError, match="target: a float64 target"):
            fn(x, t, reduction=reduction, backend=backend)
        return
    got, (gx, gt) = _grads(lambda a, b: fn(a, b, reduction=reduction, backend=backend), (x, t), up)
    exp, (ex, et) = _grads(lambda a, b: getattr(F, fn.__name__)(a, b, reduction=reduction), (x.double(), t), up)
    assert got.dtype == torch.float64 and gx.dtype == dtype and gt.dtype == torch.float64
    torch.testing.assert_close(got, exp, rtol=1e-12, atol=0)
    torch.testing.assert_close(gx, ex.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(gt, et, rtol=1e-12, atol=0)
    if fn is not binary_cross_entropy_with_logits and reduction == "none":
        assert float(got[0, 0]) > 0 and float(gt[0, 0]) != 0
