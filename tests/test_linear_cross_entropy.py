"""linear_cross_entropy on both backends vs a float64 reference: materialised logits + the
float64 cross-entropy formulas of tests/reference/ce.py (gradients by autograd)."""
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import DEVICE, assert_close, assert_same_rounding, blas_runs, poison_allocations
from tests.reference import ce as ref_ce
from tests.reference import linear_ce as lref
from tri_losses.cross_entropy import cross_entropy
from tri_losses.linear_cross_entropy import LinearCrossEntropyLoss, linear_cross_entropy

CASES = {
    "plain": dict(),
    "smooth_torch_z": dict(label_smoothing=0.1, z_loss=1e-3),
    "smooth_others_wt": dict(label_smoothing=0.2, label_smoothing_mode="others", weighted=True),
    "gaussian": dict(label_smoothing=0.3, label_smoothing_mode="gaussian"),
    "focal_softcap": dict(focal_gamma=2.0, softcap=3.0),
    "focal_smooth_wt": dict(focal_gamma=1.0, label_smoothing=0.1, weighted=True),
}


def _data(shape, D, V, bias, dtype=torch.float32):
    x = torch.randn(*shape, D, device=DEVICE, dtype=dtype)
    w = (torch.randn(V, D, device=DEVICE) * 0.4).to(dtype)
    b = torch.randn(V, device=DEVICE).to(dtype) if bias else None
    y = torch.randint(0, V, shape, device=DEVICE)
    y.view(-1)[::4] = -100
    return x, w, b, y


def _grads(fn, tensors, up):
    ts = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]
    out = fn(*ts)
    live = [t for t in ts if t is not None]
    gs = torch.autograd.grad(out, live, up)
    return out.detach(), gs


def _reduced_reference(kw, weight, y, reduction):
    """f(x, w, b) -> (the float64 reference loss of ``kw`` reduced as ``reduction``, the soft-capped logits)."""
    fref = _reference(kw, weight)
    live = y >= 0
    den = live.sum().double() if weight is None else weight[y[live]].double().sum().cpu()
    cap = kw.get("softcap")

    def f(x_, w_, b_):
        z = x_ @ w_.t() + b_
        loss = fref(x_, w_, b_, y.cpu())
        return loss.sum() / den if reduction == "mean" else loss, cap * torch.tanh(z / cap) if cap else z
    return f


def _reference(kw, weight, **extra):
    rkw = dict(eps=kw.get("label_smoothing", 0.0), mode=kw.get("label_smoothing_mode", "torch"),
               gamma=kw.get("focal_gamma", 0.0), z_loss=kw.get("z_loss", 0.0), softcap=kw.get("softcap"), **extra)

    def f(x, w, b, y):
        return lref.linear_ce(x, w, b, y, weight, **rkw)
    return f


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_lce_matches_float64_reference(backend, case, bias):
    kw = dict(CASES[case])
    weighted = kw.pop("weighted", False)
    V = 67  # not a multiple of any tile
    x, w, b, y = _data((2, 9), 20, V, bias)
    cw = torch.rand(V, device=DEVICE) + 0.5 if weighted else None
    up = torch.randn(2, 9, device=DEVICE)
    got, g = _grads(lambda x_, w_, b_: linear_cross_entropy(x_, w_, y, linear_bias=b_, weight=cw, reduction="none",
                                                            backend=backend, **kw), [x, w, b], up)
    fref = _reference(kw, cw)
    exp, ge = _grads(lambda x_, w_, b_: fref(x_.cpu(), w_.cpu(), b_.cpu() if b_ is not None else None, y),
                     [x.cpu(), w.cpu(), b.cpu() if b is not None else None], up.cpu().double())
    assert got.shape == (2, 9) and got.dtype == torch.float32
    assert_close(got, exp, atol=2e-5, rtol=2e-5)
    for a, e, name in zip(g, ge, ["input", "linear_weight", "linear_bias"]):
        assert_close(a, e, atol=2e-5, rtol=2e-5, msg=name)


@pytest.mark.parametrize("case,chunk_size", [("plain", None), ("smooth_torch_z", 7 * 13), ("focal_softcap", None),
                                             ("smooth_others_wt", 29)])
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lce_return_lse_value_and_gradient_match_float64(backend, case, chunk_size, reduction, dtype):
    """return_lse: (loss, lse) as cross_entropy on the materialised logits gives them, the lse of the
    soft-capped logits in the rows' shape; gradients with random upstreams on both, the lse's reaching the
    ignored rows too (every 4th row); chunk sizes that do not divide the rows or classes. bf16 on the
    Triton backend runs the cuBLAS stages in the interpreter (the dz from cross-entropy's backward kernel)."""
    kw = dict(CASES[case])
    V = 67
    cw = torch.rand(V, device=DEVICE) + 0.5 if kw.pop("weighted", False) else None
    x, w, b, y = _data((2, 9), 20, V, True, dtype)
    up = torch.randn(2, 9, device=DEVICE) if reduction == "none" else torch.tensor(0.7, device=DEVICE)
    up_lse = torch.randn(2, 9, device=DEVICE)

    def run(fn, ts, cast):
        ts = [t.detach().clone().requires_grad_(True) for t in ts]
        loss, lse = fn(*ts)
        torch.autograd.backward([loss, lse], [cast(up), cast(up_lse)])
        return loss.detach(), lse.detach(), [t.grad for t in ts]

    loss, lse, g = run(lambda x_, w_, b_: linear_cross_entropy(
        x_, w_, y, linear_bias=b_, weight=cw, reduction=reduction, chunk_size=chunk_size, return_lse=True,
        backend=backend, **kw), [x, w, b], lambda t: t)
    loss_and_logits = _reduced_reference(kw, cw, y, reduction)

    def ref(x_, w_, b_):
        loss_, zc = loss_and_logits(x_, w_, b_)
        return loss_, torch.logsumexp(zc, -1)

    exp, exp_lse, ge = run(ref, [x.cpu().double(), w.cpu().double(), b.cpu().double()], lambda t: t.cpu().double())
    assert lse.shape == (2, 9) and lse.dtype == loss.dtype == torch.float32
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    assert_close(loss, exp, **tol)
    assert_close(lse, exp_lse, **tol)
    for a, e, name in zip(g, ge, ["input", "linear_weight", "linear_bias"]):
        assert a.dtype == dtype, name
        assert_close(a.float(), e.float(), msg=name, **tol)


@pytest.mark.parametrize("case,chunk_size,extra", [
    ("plain", None, dict()), ("smooth_torch_z", 7 * 13, dict(return_lse=True)),
    ("focal_softcap", None, dict(return_argmax=True)), ("smooth_others_wt", 29, dict(return_lse=True,
                                                                                     return_argmax=True))])
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lce_return_entropy_value_and_gradient_match_float64(backend, case, chunk_size, extra, reduction, dtype):
    """return_entropy: each row's softmax entropy of its soft-capped logits (a masked class, bias -inf, adds
    nothing), differentiable: random upstreams on the loss, the entropy (ignored rows included) and the lse
    where asked for, against float64 autograd of tests/reference/ce.py's entropy; chunk sizes that do not
    divide the rows or classes; the outputs in the order loss, lse, argmax, entropy. bf16 on the Triton
    backend: the Triton GEMM forward (the cuBLAS stages are not used for it) and the Triton dz kernel beside
    the cuBLAS dW/dX stages in the interpreter."""
    kw = dict(CASES[case])
    V = 67
    cw = torch.rand(V, device=DEVICE) + 0.5 if kw.pop("weighted", False) else None
    x, w, b, y = _data((2, 9), 20, V, True, dtype)
    b[11] = float("-inf")
    y[y == 11] = 12
    up = torch.randn(2, 9, device=DEVICE) if reduction == "none" else torch.tensor(0.7, device=DEVICE)
    ups = [torch.randn(2, 9, device=DEVICE) for _ in range(2)]  # the lse's and the entropy's
    want_lse = extra.get("return_lse", False)

    def run(fn, ts, cast):
        ts = [t.detach().clone().requires_grad_(True) for t in ts]
        out = fn(*ts)
        loss, ent = out[0], out[-1]
        diff = [loss, ent] + ([out[1]] if want_lse else [])
        torch.autograd.backward(diff, [cast(up), cast(ups[1])] + ([cast(ups[0])] if want_lse else []))
        return [t.detach() for t in diff], [t.grad for t in ts], out

    got, g, out = run(lambda x_, w_, b_: linear_cross_entropy(
        x_, w_, y, linear_bias=b_, weight=cw, reduction=reduction, chunk_size=chunk_size, return_entropy=True,
        backend=backend, **extra, **kw), [x, w, b], lambda t: t)
    assert len(out) == 2 + len(extra) and out[-1].shape == (2, 9) and out[-1].dtype == torch.float32
    loss_and_logits = _reduced_reference(kw, cw, y, reduction)

    def ref(x_, w_, b_):  # (loss, lse, entropy) in the order of the op's outputs, lse where asked for
        loss_, zc = loss_and_logits(x_, w_, b_)
        return (loss_,) + ((torch.logsumexp(zc, -1),) if want_lse else ()) + (ref_ce.entropy(zc),)

    exp, ge, _ = run(ref, [x.cpu().double(), w.cpu().double(), b.cpu().double()], lambda t: t.cpu().double())
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for a, e, name in zip(got, exp, ["loss", "entropy", "lse"]):
        assert_close(a, e, msg=name, **tol)
    for a, e, name in zip(g, ge, ["input", "linear_weight", "linear_bias"]):
        assert a.dtype == dtype, name
        assert_close(a.float(), e.float(), msg=name, **tol)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_lce_return_entropy_as_a_metric_keeps_the_loss_and_gradients(backend, reduction):
    """return_entropy with no upstream for the entropy (a logged metric): the loss is the same bits as
    without it (fp32: the same row sums, one accumulator more) and the gradients equal the call without it
    (for "mean" that call takes the scalar-upstream path, this one the recomputing backward); the entropy of
    rows with a non-finite lse is NaN: a +inf or NaN logit, and a head with no classes."""
    x, w, b, y = _data((13,), 24, 50, True)
    b[3] = float("-inf")
    y[y == 3] = 4
    up = torch.randn(13, device=DEVICE) if reduction == "none" else None
    a, ga = _grads(lambda x_, w_, b_: linear_cross_entropy(x_, w_, y, linear_bias=b_, reduction=reduction,
                                                           backend=backend), [x, w, b], up)

    def with_entropy(x_, w_, b_):
        loss, ent = linear_cross_entropy(x_, w_, y, linear_bias=b_, reduction=reduction, return_entropy=True,
                                         backend=backend)
        with_entropy.ent = ent.detach()
        return loss
    e, ge = _grads(with_entropy, [x, w, b], up)
    assert torch.equal(a, e)
    for g1, g2, name in zip(ga, ge, ["input", "linear_weight", "linear_bias"]):
        assert_close(g1, g2, atol=1e-6, rtol=1e-6, msg=name)
    z = x.double() @ w.double().t() + b.double()
    assert_close(with_entropy.ent, ref_ce.entropy(z).float(), atol=2e-5, rtol=2e-5)
    bad = b.clone()
    bad[7] = float("inf")
    x2 = x.clone()
    x2[5, 0] = float("nan")
    _, ent = linear_cross_entropy(x2, w, y, linear_bias=bad, reduction="none", return_entropy=True, backend=backend)
    assert ent.isnan().all()
    _, ent = linear_cross_entropy(x, w[:0], y.clamp(max=-100), reduction="none", return_entropy=True, backend=backend)
    assert ent.shape == (13,) and ent.isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lce_return_entropy_gradient_with_a_finite_masking_logit(backend, dtype):
    """A class masked by a huge finite bias (float32's lowest, as masking code sets it): its probability is 0 and
    the entropy's gradient finite, with an upstream that is not a power of two (the Triton dz formed ge * (z - m)
    = inf there, times p = 0: NaN in every gradient)."""
    x, w, b, y = _data((3,), 8, 5, True, dtype)
    b[4] = torch.finfo(dtype).min
    y[:] = torch.tensor([0, 1, 2])
    ts = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    _, ent = linear_cross_entropy(*ts[:2], y, linear_bias=ts[2], return_entropy=True, backend=backend)
    up = torch.tensor([1 / 3, 1.5, 0.7], device=DEVICE)  # (the largest sets the scale: 1.5 / 1 overflowed)
    (ent * up).sum().backward()
    ds = [t.detach().double().requires_grad_() for t in (x, w, b)]
    exp = ref_ce.entropy(ds[0] @ ds[1].t() + ds[2])
    (exp * up.double()).sum().backward()
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    assert_close(ent.double(), exp, **tol)
    for a, e, name in zip(ts, ds, ["input", "linear_weight", "linear_bias"]):
        assert a.grad.isfinite().all(), name
        assert_close(a.grad.double(), e.grad, msg=name, **tol)


def test_lce_return_entropy_on_the_materialised_paths(backend):
    """Probability targets, input without features (D = 0) and PyTorch's K-dimensional heads compute on
    materialised logits: return_entropy there is the entropy of those logits (class dim 1), differentiable,
    after the loss, lse and argmax."""
    x, w, b, y = _data((6,), 10, 30, True)
    q = torch.rand(6, 30, device=DEVICE).softmax(-1)
    upe = torch.randn(6, device=DEVICE)
    for xs_, ws_, bs_, tg in ((x, w, b, q), (x[:, :0], w[:, :0], b, y)):
        xs, ws, bs = (t.detach().clone().requires_grad_() for t in (xs_, ws_, bs_))
        loss, pred, ent = linear_cross_entropy(xs, ws, tg, linear_bias=bs, reduction="none", softcap=2.0,
                                               return_argmax=True, return_entropy=True, backend=backend)
        (loss.sum() + (ent * upe).sum()).backward()
        xd, wd, bd = (t.detach().double().requires_grad_() for t in (xs_, ws_, bs_))
        zc = 2.0 * torch.tanh(F.linear(xd, wd, bd) / 2.0)
        exp = ref_ce.entropy(zc)
        exp_loss = F.cross_entropy(zc, tg.double() if tg.is_floating_point() else tg, reduction="none")
        (exp_loss.sum() + (exp * upe.double()).sum()).backward()
        assert torch.equal(pred, zc.argmax(-1))
        assert_close(ent, exp.float(), atol=2e-5, rtol=2e-5)
        for a, e in zip((xs, ws, bs), (xd, wd, bd)):
            assert_close(a.grad, e.grad.float(), atol=2e-5, rtol=2e-5)
    wk = torch.randn(4, 3, 10, device=DEVICE)  # a K-dimensional head (C=4, d1=3)
    yk = torch.randint(0, 4, (6, 3), device=DEVICE)
    loss, ent = linear_cross_entropy(x, wk, yk, reduction="none", return_entropy=True, backend=backend)
    zk = torch.einsum("nd,ckd->nck", x.double(), wk.double())
    assert ent.shape == (6, 3)
    assert_close(ent, ref_ce.entropy(zk.movedim(1, -1)).float(), atol=2e-5, rtol=2e-5)


def test_lce_return_lse_on_the_materialised_paths(backend):
    """Probability targets, a head without features (D = 0) and a K-dimensional head go through
    cross_entropy on the logits: return_lse gives its (loss, lse)."""
    x, w, b, _ = _data((5,), 6, 11, True)
    q = torch.rand(5, 11, device=DEVICE).softmax(-1)
    for xs, ws, bs in ((x, w, b), (x[:, :0], w[:, :0], b)):
        loss, lse = linear_cross_entropy(xs, ws, q, linear_bias=bs, reduction="none", return_lse=True,
                                         backend=backend)
        exp, exp_lse = cross_entropy(F.linear(xs, ws, bs), q, reduction="none", return_lse=True, backend="torch")
        assert_close(loss, exp)
        assert_close(lse, exp_lse)
    wk = torch.randn(11, 3, 6, device=DEVICE)  # (C, d1, D)
    yk = torch.randint(0, 11, (5, 3), device=DEVICE)
    loss, lse = linear_cross_entropy(x, wk, yk, reduction="none", return_lse=True, backend=backend)
    logits = F.linear(x, wk.reshape(33, 6)).reshape(5, 11, 3)
    exp, exp_lse = cross_entropy(logits, yk, reduction="none", return_lse=True, backend="torch")
    assert lse.shape == (5, 3)
    assert_close(loss, exp)
    assert_close(lse, exp_lse)
    # return_argmax there: the argmax of those logits (class dim), after the lse when both are asked for
    loss, lse, pred = linear_cross_entropy(x, wk, yk, reduction="none", return_lse=True, return_argmax=True,
                                           backend=backend)
    assert torch.equal(pred, logits.argmax(1)) and pred.shape == (5, 3)
    assert_close(lse, exp_lse)
    for xs, ws, bs in ((x, w, b), (x[:, :0], w[:, :0], b)):
        _, pred = linear_cross_entropy(xs, ws, q, linear_bias=bs, return_argmax=True, softcap=2.0, backend=backend)
        assert torch.equal(pred, F.linear(xs, ws, bs).argmax(-1))
    if backend == "torch":  # float64 logits keep their bits for the argmax (a gap below float32's resolution)
        b64 = torch.tensor([1.0, 1.0 + 1e-12, 0.0], dtype=torch.float64, device=DEVICE)
        q64 = torch.full((1, 3), 1 / 3, dtype=torch.float64, device=DEVICE)
        x0 = torch.zeros(1, 0, dtype=torch.float64, device=DEVICE)
        w0 = torch.zeros(3, 0, dtype=torch.float64, device=DEVICE)
        for cap in (None, 30.0):
            assert linear_cross_entropy(x0, w0, q64, linear_bias=b64, softcap=cap, return_argmax=True,
                                        backend=backend)[1].item() == 1


def test_lce_return_argmax_keeps_the_forward_tiles(monkeypatch):
    """The running argmax runs on the forward's own tiles for every input kind (else the vocab splits, and so
    the loss's summation order, would change with return_argmax on a GPU); only fp32's register cap differs."""
    from tri_losses._backend import kernels
    from tri_losses._torch.linear_cross_entropy import LceOptions
    K = kernels("linear_cross_entropy")
    x = torch.zeros(4, 8)
    for kind in ("fp32", "16b", "interp"):
        for o in (LceOptions(), LceOptions(smoothing=0.1, smooth_mode=1, softcap=5.0)):
            monkeypatch.setattr(K, "_kind", lambda _x, _k=kind: _k)
            plain, arg = K._flags(x, None, None, o), K._flags(x, None, None, o, True)
            assert {k: v for k, v in arg.items() if k != "maxnreg"} == {k: v for k, v in plain.items()
                                                                       if k != "maxnreg"}, (kind, o)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("softcap,chunk_size", [(None, None), (2.0, 9 * 23)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lce_return_argmax_is_the_first_maximum_of_the_logits(monkeypatch, backend, dtype, reduction, softcap,
                                                              chunk_size, splits):
    """return_argmax: each row's first maximum of its (soft-capped) logits, as argmax of the float64 logits
    gives it, for every row (ignored ones too): exact ties between classes 3, 40 and 66 (zero head rows and
    equal bias: the lowest id wins, across the forced vocab splits of the Triton GEMM path and the cuBLAS
    chunks of bf16), masked classes (-inf bias), -1 for rows with a NaN or +inf logit; the loss and the
    gradients are bitwise those of the call without it (the scalar-upstream fast path kept for the mean)."""
    from tri_losses._backend import kernels
    K = kernels("linear_cross_entropy")

    def plan(x_, rows, vocab):  # as split_plan: no empty split
        tps = -(-vocab // min(splits, vocab))
        return -(-vocab // tps), tps
    monkeypatch.setattr(K, "_num_splits", plan)
    V = 67
    x, w, b, y = _data((2, 9), 20, V, True, dtype)
    w[[3, 40, 66]] = 0.0  # logits of exactly 6 in any GEMM (identical rows of W need not give equal columns)
    b[3] = b[40] = b[66] = 6.0  # the tie wins most rows
    b[10] = b[50] = float("-inf")
    y = torch.where((y == 10) | (y == 50), 11, y)  # (a masked target's loss is inf)
    x[0, 1] = float("nan")
    x[1, 2, 0] = float("inf")
    up = torch.randn(2, 9, device=DEVICE) if reduction == "none" else torch.tensor(0.7, device=DEVICE)
    kw = dict(linear_bias=b, reduction=reduction, softcap=softcap, chunk_size=chunk_size, backend=backend)
    _, pred = linear_cross_entropy(x, w, y, return_argmax=True, **kw)
    # the loss and gradients are the same bits as without it (on the rows without NaN/inf: a NaN row makes
    # the whole head gradient and the mean NaN, which would compare equal whatever the rest)
    clean = x.clone()
    clean[0, 1], clean[1, 2] = 0.0, 0.0
    xs, ws = clean.clone().requires_grad_(), w.clone().requires_grad_()
    loss, _ = linear_cross_entropy(xs, ws, y, return_argmax=True, **kw)
    if reduction == "mean":
        assert "lce_fwd_grad" in loss.grad_fn.name()
    loss.backward(up)
    xr, wr = clean.clone().requires_grad_(), w.clone().requires_grad_()
    plain = linear_cross_entropy(xr, wr, y, **kw)
    plain.backward(up)
    assert loss.isfinite().all() and ws.grad.isfinite().all()
    assert torch.equal(loss, plain) and torch.equal(xs.grad, xr.grad) and torch.equal(ws.grad, wr.grad)
    z = F.linear(x.double(), w.double(), b.double())
    z = softcap * torch.tanh(z / softcap) if softcap else z
    exp = torch.where(torch.logsumexp(z, -1).isfinite(), z.argmax(-1), -1)
    assert pred.dtype == torch.int64 and pred.shape == (2, 9)
    assert torch.equal(pred.cpu(), exp.cpu()), (pred, exp)
    assert (exp == 3).sum() >= 3 and exp[0, 1] == -1 and exp[1, 2] == -1  # the cases are there


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_lce_strided_3d_custom_ignore_index_every_option_reduced(backend, reduction):
    # (B, T, D) input that is a non-contiguous view, a custom ignore_index that is a valid class id,
    # every option at once, class-weighted mean: matches the float64 reference value and gradients.
    V, D, ign = 45, 24, 7
    base = torch.randn(3, 2 * 7, D, device=DEVICE)
    w = torch.randn(V, D, device=DEVICE) * 0.4
    b = torch.randn(V, device=DEVICE)
    y = torch.randint(0, V, (3, 7), device=DEVICE)
    y[0, :4] = ign
    y[2, 5] = ign
    cw = torch.rand(V, device=DEVICE) + 0.5
    kw = dict(label_smoothing=0.15, label_smoothing_mode="gaussian", focal_gamma=0.5, z_loss=1e-2, softcap=4.0)

    def run(x_, w_, b_):
        x_ = x_[:, ::2]  # strided rows
        assert not x_.is_contiguous()
        return linear_cross_entropy(x_, w_, y, linear_bias=b_, weight=cw, reduction=reduction, ignore_index=ign,
                                    backend=backend, **kw)

    fref = _reference(kw, cw, ignore_index=ign, reduction=reduction)
    got, g = _grads(run, [base, w, b], None)
    exp, ge = _grads(lambda x_, w_, b_: fref(x_[:, ::2], w_, b_, y), [base.cpu(), w.cpu(), b.cpu()], None)
    assert_close(got, exp, atol=2e-5, rtol=2e-5)
    for a, e, name in zip(g, ge, ["input", "linear_weight", "linear_bias"]):
        assert_close(a, e, atol=2e-5, rtol=2e-5, msg=name)
    assert (g[0][0, 0:8:2] == 0).all()  # ignored rows get no input gradient


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_lce_reductions_equal_materialised_cross_entropy(backend, reduction):
    x, w, b, y = _data((13,), 16, 50, True)
    cw = torch.rand(50, device=DEVICE) + 0.2
    got = linear_cross_entropy(x, w, y, linear_bias=b, weight=cw, reduction=reduction, label_smoothing=0.1,
                               backend=backend)
    exp = F.cross_entropy(x @ w.t() + b, y, weight=cw, reduction=reduction, label_smoothing=0.1)
    assert_close(got, exp)
    mod = LinearCrossEntropyLoss(16, 50, bias=True, weight=cw, reduction=reduction, label_smoothing=0.1,
                                 backend=backend).to(DEVICE)
    with torch.no_grad():
        mod.linear.weight.copy_(w)
        mod.linear.bias.copy_(b)
    assert_close(mod(x, y), exp)


@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="torch without F.linear_cross_entropy")
def test_lce_is_a_dropin_for_torch_linear_cross_entropy(backend):
    x, w, b, y = _data((21,), 16, 45, True)  # torch's op takes (N, D) input; y holds -100 rows
    cw = torch.rand(45, device=DEVICE) + 0.3
    for kw in (dict(), dict(weight=cw, label_smoothing=0.1, reduction="sum"), dict(reduction="none"),
               dict(ignore_index=None, label_smoothing=1.0), dict(ignore_index=7, weight=cw)):
        yy = torch.where(y < 0, 7, y) if kw.get("ignore_index") == 7 else y
        got, g = _grads(lambda x_, w_, b_: linear_cross_entropy(x_, w_, yy, linear_bias=b_, backend=backend, **kw),
                        [x, w, b], None if kw.get("reduction") != "none" else torch.ones(21, device=DEVICE))
        exp, ge = _grads(lambda x_, w_, b_: F.linear_cross_entropy(x_, w_, yy, linear_bias=b_, **kw), [x, w, b],
                         None if kw.get("reduction") != "none" else torch.ones(21, device=DEVICE))
        assert_close(got, exp)
        for a, e in zip(g, ge):
            assert_close(a, e)
    # probability targets (materialised: the target is N x V itself), gradient to the target too
    q = torch.rand(21, 45, device=DEVICE).softmax(-1)
    got, g = _grads(lambda x_, q_: linear_cross_entropy(x_, w, q_, linear_bias=b, label_smoothing=0.2,
                                                        backend=backend), [x, q], None)
    exp, ge = _grads(lambda x_, q_: F.linear_cross_entropy(x_, w, q_, linear_bias=b, label_smoothing=0.2), [x, q],
                     None)
    assert_close(got, exp)
    for a, e in zip(g, ge):
        assert_close(a, e)


@pytest.mark.skipif(not hasattr(torch.nn, "LinearCrossEntropyLoss"), reason="torch without LinearCrossEntropyLoss")
def test_lce_k_dimensional_heads_as_pytorch(backend):
    """PyTorch's K-dimensional heads: linear_weight (C, d1, ..., dK, D), linear_bias (C, d1, ..., dK), input
    (N, D), class ids (N, d1, ..., dK) or probabilities (N, C, d1, ..., dK): the loss and every gradient as
    F.linear_cross_entropy in float64 (the reference), every reduction with a random upstream, ignored
    entries, class weights and smoothing; the module with out_features as torch.nn.LinearCrossEntropyLoss
    (both raised before). Unbatched input, filter_eps and a wrong target shape raise naming the argument."""
    g = torch.Generator().manual_seed(3)
    N, C, D = 6, 5, 7
    for dk in ((2,), (2, 3)):
        x = torch.randn(N, D, generator=g).to(DEVICE)
        w = torch.randn(C, *dk, D, generator=g).to(DEVICE)
        b = torch.randn(C, *dk, generator=g).to(DEVICE)
        y = torch.randint(0, C, (N, *dk), generator=g).to(DEVICE)
        y.view(-1)[::4] = -100
        q = torch.rand(N, C, *dk, generator=g).softmax(1).to(DEVICE)
        cw = (torch.rand(C, generator=g) + 0.2).to(DEVICE)
        for tgt, kw in ((y, dict()), (y, dict(weight=cw, label_smoothing=0.1, reduction="sum")),
                        (y, dict(reduction="none")), (q, dict(label_smoothing=0.2)), (q, dict(reduction="none"))):
            shape = (N, *dk) if kw.get("reduction") == "none" else ()
            up = torch.randn(shape, generator=g).to(DEVICE)
            got, gg = _grads(lambda x_, w_, b_: linear_cross_entropy(x_, w_, tgt, linear_bias=b_, backend=backend,
                                                                     **kw), [x, w, b], up)
            kw64 = dict(kw, weight=cw.double()) if "weight" in kw else kw
            exp, ge = _grads(lambda x_, w_, b_: F.linear_cross_entropy(x_, w_, tgt.double() if tgt is q else tgt,
                                                                       linear_bias=b_, **kw64),
                             [x.double(), w.double(), b.double()], up.double())
            assert got.dtype == torch.float32 and got.shape == exp.shape
            assert_close(got.double(), exp, atol=1e-5, rtol=1e-5)
            for a, e in zip(gg, ge):
                assert_close(a.double(), e, atol=1e-5, rtol=1e-5)
        mine = LinearCrossEntropyLoss(D, C, out_features=list(dk), bias=True, backend=backend).to(DEVICE)
        ref = torch.nn.LinearCrossEntropyLoss(D, C, out_features=list(dk), bias=True).to(DEVICE)
        mine.load_state_dict(ref.state_dict())
        assert repr(mine) == repr(ref) and mine.out_features == ref.out_features == list(dk)
        assert_close(mine(x, y), ref(x, y))
    # no features (D = 0): the logits are the bias, as PyTorch's
    x0, w0, b0 = torch.randn(N, 0, device=DEVICE), torch.randn(C, 2, 0, device=DEVICE), torch.randn(C, 2, device=DEVICE)
    y0 = torch.randint(0, C, (N, 2), device=DEVICE)
    for bias in (None, b0):
        assert_close(linear_cross_entropy(x0, w0, y0, linear_bias=bias, backend=backend),
                     F.linear_cross_entropy(x0, w0, y0, linear_bias=bias))
    with pytest.raises(ValueError, match=r"input: a K-dimensional linear_weight .* takes batched input"):
        linear_cross_entropy(x[0], w, y[0], backend=backend)
    with pytest.raises(ValueError, match="filter_eps: only with a \\(V, D\\) linear_weight"):
        linear_cross_entropy(x, w, y, filter_eps=1e-3, backend=backend)
    with pytest.raises(ValueError, match=r"target: expected shape \(6, 2, 3\) \(class ids\)"):
        linear_cross_entropy(x, w, y[:, 0], backend=backend)

@pytest.mark.skipif(not hasattr(torch.nn, "LinearCrossEntropyLoss"), reason="torch without LinearCrossEntropyLoss")
def test_lce_module_is_a_dropin_for_torch_module(backend):
    x, _, _, y = _data((5, 3), 16, 45, False)
    ref_mod = torch.nn.LinearCrossEntropyLoss(16, 45, bias=True, label_smoothing=0.1).to(DEVICE)
    mod = LinearCrossEntropyLoss(16, 45, bias=True, label_smoothing=0.1, backend=backend).to(DEVICE)
    mod.load_state_dict(ref_mod.state_dict())
    exp = ref_mod(x.reshape(15, 16), y.reshape(15))
    got = mod(x, y)
    assert_close(got, exp)
    got.backward()
    exp.backward()
    assert_close(mod.linear.weight.grad, ref_mod.linear.weight.grad)
    assert_close(mod.linear.bias.grad, ref_mod.linear.bias.grad)
    # a class weight of the wrong shape or a smoothing outside [0, 1] raise at construction, as torch's module
    # does (they were taken and raised only at the first call); the error also is a RuntimeError, as torch's
    for kw, name in ((dict(weight=torch.rand(44)), "weight: expected shape \\(45,\\)"),
                     (dict(label_smoothing=1.5), "label_smoothing: expected a value in \\[0.0, 1.0\\], got 1.5")):
        with pytest.raises(RuntimeError):
            torch.nn.LinearCrossEntropyLoss(16, 45, **kw)
        with pytest.raises(ValueError, match=name):
            LinearCrossEntropyLoss(16, 45, **kw)
        with pytest.raises(RuntimeError, match=name):
            LinearCrossEntropyLoss(16, 45, **kw)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_lce_frozen_head_or_input_gets_no_gradient(backend, reduction):
    """requires_grad=False on the head (LoRA, probing) or the input: that tensor gets no gradient (its
    .grad stays None) and the other's gradient matches PyTorch, on the fast (mean) and per-token paths."""
    x, w, b, y = _data((9,), 16, 40, True)
    up = torch.randn(9, device=DEVICE) if reduction == "none" else None

    def run(f, *ts):
        out = f(*ts)
        out.backward(up) if up is not None else out.backward()

    def ref(x_, w_, b_):
        return F.cross_entropy(x_ @ w_.t() + b_, y, reduction=reduction)

    _, (ex, ew, eb) = _grads(ref, [x, w, b], up)
    xg, wf, bg = x.clone().requires_grad_(True), w.clone(), b.clone().requires_grad_(True)
    run(lambda x_, w_, b_: linear_cross_entropy(x_, w_, y, linear_bias=b_, reduction=reduction, backend=backend),
        xg, wf, bg)
    assert wf.grad is None
    assert_close(xg.grad, ex)
    assert_close(bg.grad, eb)
    xf, wg = x.clone(), w.clone().requires_grad_(True)
    run(lambda x_, w_: linear_cross_entropy(x_, w_, y, linear_bias=b, reduction=reduction, backend=backend), xf, wg)
    assert xf.grad is None
    assert_close(wg.grad, ew)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lce_half_precision_no_worse_than_materialised_torch(backend, dtype):
    x, w, b, y = _data((24,), 32, 96, True, dtype=dtype)
    up = torch.randn(24, device=DEVICE)
    truth, gt = _grads(lambda x_, w_, b_: F.cross_entropy(x_.double() @ w_.double().t() + b_.double(), y,
                                                          reduction="none"), [x, w, b], up.double())
    mine, gm = _grads(lambda x_, w_, b_: linear_cross_entropy(x_, w_, y, linear_bias=b_, reduction="none",
                                                              backend=backend), [x, w, b], up)
    theirs, gth = _grads(lambda x_, w_, b_: F.cross_entropy(x_ @ w_.t() + b_, y, reduction="none"), [x, w, b],
                         up.to(dtype))
    err_m = (mine.double() - truth).abs().max()
    err_t = (theirs.double() - truth).abs().max()
    assert err_m <= err_t + 1e-6, (err_m, err_t)
    for a, c, e, name in zip(gm, gth, gt, ["input", "linear_weight", "linear_bias"]):
        em, et = (a.double() - e).abs().max(), (c.double() - e).abs().max()
        assert em <= 1.5 * et + 1e-6, (name, em, et)
        assert a.dtype == dtype


def test_lce_masked_vocab_and_dominant_split_combine(backend):
    # -inf bias masks the last classes (a whole vocab split on the triton backend in the interpreter),
    # and a large bias makes one split hold every row's max: the split combine must match PyTorch.
    V = 100
    x, w, b, y = _data((17,), 16, V, True)
    y[y >= 64] = 3
    b = b.clone()
    b[64:] = float("-inf")  # classes 64..99: the second split when BN=32
    b[5] = 30.0
    up = torch.randn(17, device=DEVICE)
    got, g = _grads(lambda x_, w_, b_: linear_cross_entropy(x_, w_, y, linear_bias=b_, reduction="none",
                                                            backend=backend), [x, w, b], up)
    exp, ge = _grads(lambda x_, w_, b_: F.cross_entropy(x_.double() @ w_.double().t() + b_.double(), y,
                                                        reduction="none"), [x, w, b], up.double())
    assert_close(got, exp, atol=2e-5, rtol=2e-5)
    for a, e, name in zip(g, ge, ["input", "linear_weight", "linear_bias"]):
        assert torch.isfinite(a).all(), name
        assert_close(a, e, atol=2e-5, rtol=2e-5, msg=name)


def test_lce_all_ignored_and_empty(backend):
    x, w, b, y = _data((5,), 8, 20, False)
    y[:] = -100
    s, g = _grads(lambda x_, w_: linear_cross_entropy(x_, w_, y, reduction="sum", backend=backend), [x, w], None)
    assert s.item() == 0 and all((t == 0).all() for t in g)
    xe = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    out = linear_cross_entropy(xe, w, torch.zeros(0, dtype=torch.long, device=DEVICE), reduction="sum",
                               backend=backend)
    out.backward()
    assert out.item() == 0 and xe.grad.shape == (0, 8)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_lce_deterministic_bitwise(backend, reduction):
    # a repeat gives the same bits: loss and every gradient, with several chunks (chunk_size) on both paths
    x, w, b, y = _data((20,), 16, 40, True)
    up = torch.randn(20, device=DEVICE) if reduction == "none" else None

    def run():
        return _grads(lambda *t: linear_cross_entropy(t[0], t[1], y, linear_bias=t[2], reduction=reduction,
                                                      chunk_size=300, backend=backend), [x, w, b], up)
    a_, c_ = run(), run()
    assert torch.equal(a_[0], c_[0]) and all(torch.equal(p, q) for p, q in zip(a_[1], c_[1]))


def test_lce_gradcheck_float64_torch_backend():
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 6, -100, 3, 2])
    assert torch.autograd.gradcheck(
        lambda x_, w_, b_: linear_cross_entropy(x_, w_, y, linear_bias=b_, reduction="none", label_smoothing=0.1,
                                                focal_gamma=1.5, z_loss=0.1, softcap=2.0, backend="torch"),
        (x, w, b))


def test_lce_torch_backend_memory_is_chunked(monkeypatch):
    # The torch backend must never build the N x V logits: with a small budget, every logits matrix it
    # forms has at most `chunk` rows; the scalar-upstream path forms each row's logits once, the per-token
    # path twice (forward, recomputed in the backward).
    from tri_losses._torch import linear_cross_entropy as T
    monkeypatch.setattr(T, "CHUNK_BYTES", 4 * 300 * 4)  # 4 fp32 rows of V=300 per chunk
    seen = []
    orig = T._logits

    def spy(xc, w, b, ct):
        z = orig(xc, w, b, ct)
        seen.append(z.shape[0])
        return z

    monkeypatch.setattr(T, "_logits", spy)
    x, w, b, y = _data((30,), 8, 300, True)
    x.requires_grad_(True)
    linear_cross_entropy(x, w, y, linear_bias=b, backend="torch").backward()
    assert seen and max(seen) <= 4 and sum(seen) == 30
    seen.clear()
    up = torch.rand(30, device=x.device)
    linear_cross_entropy(x, w, y, linear_bias=b, reduction="none", backend="torch").backward(up)
    assert max(seen) <= 4 and sum(seen) == 2 * 30
    seen.clear()
    linear_cross_entropy(x, w, y, linear_bias=b, chunk_size=7 * 300, backend="torch").backward()  # the override
    assert max(seen) == 7 and sum(seen) == 30


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_lce_scalar_upstream_fast_path_matches_per_token_path(backend, reduction):
    """mean/sum form the gradients in the forward and scale them by the upstream scalar in the backward;
    the per-token path (reduction='none', then the same reduction by hand) recomputes them. Same inputs,
    every option, a non-trivial upstream scalar: the same loss and gradients."""
    x, w, b, y = _data((3, 7), 24, 45, True)
    cw = torch.rand(45, device=DEVICE) + 0.5
    kw = dict(weight=cw, label_smoothing=0.1, focal_gamma=1.0, z_loss=1e-3, softcap=5.0, backend=backend)
    scale = 3.7

    def fast(x_, w_, b_):
        return linear_cross_entropy(x_, w_, y, linear_bias=b_, reduction=reduction, **kw) * scale

    def per_token(x_, w_, b_):
        rows = linear_cross_entropy(x_, w_, y, linear_bias=b_, reduction="none", **kw)
        total = rows.sum()
        if reduction == "mean":
            total = total / torch.where(y != -100, cw[y.clamp(min=0)], 0.0).sum()
        return total * scale

    got, g = _grads(fast, [x, w, b], None)
    exp, ge = _grads(per_token, [x, w, b], None)
    assert_close(got, exp, atol=1e-6, rtol=1e-6)
    for a_, e_, name in zip(g, ge, ["input", "linear_weight", "linear_bias"]):
        assert_close(a_, e_, atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_lce_chunk_sizes_not_dividing_rows_or_classes(backend, reduction):
    """chunk_size=5*67: the torch backend takes 5 of the 13 rows at a time, the Triton backward 25 of the
    67 classes (several vocabulary chunks, the last one partial): same values as the float64 reference."""
    V = 67
    x, w, b, y = _data((13,), 20, V, True)
    up = torch.randn(13, device=DEVICE) if reduction == "none" else None
    kw = dict(label_smoothing=0.1, label_smoothing_mode="others", focal_gamma=0.5)
    got, g = _grads(lambda x_, w_, b_: linear_cross_entropy(x_, w_, y, linear_bias=b_, reduction=reduction,
                                                            chunk_size=5 * V, backend=backend, **kw), [x, w, b], up)
    fref = _reference(kw, None, reduction=reduction)
    exp, ge = _grads(lambda x_, w_, b_: fref(x_, w_, b_, y), [x.cpu(), w.cpu(), b.cpu()],
                     up.cpu().double() if up is not None else None)
    assert_close(got, exp, atol=2e-5, rtol=2e-5)
    for a_, e_, name in zip(g, ge, ["input", "linear_weight", "linear_bias"]):
        assert_close(a_, e_, atol=2e-5, rtol=2e-5, msg=name)


def test_lce_extreme_logits_fp32_gradients_match_float64(backend):
    """|logit| ~ 1e4 in fp32: the softmax is formed from the row maximum (exp(x - m) / s), not as
    exp(x - lse) (which loses ~ulp(lse) ~ 1e-3 absolute, ~5e-4 relative). With one-hot inputs
    (x = I, so the logits are W's columns exactly and dW = dz), the loss, dW and db match float64 at
    rtol 1e-5 (atol 1e-9 so that entries which underflow do not count)."""
    N, V = 6, 40
    x = torch.eye(N, device=DEVICE)
    w = (1e4 + torch.randn(V, N, device=DEVICE) * 3.0) * torch.where(torch.rand(V, 1, device=DEVICE) < 0.5, -1, 1)
    w[:8] = 1e4 + torch.randn(8, N, device=DEVICE)  # several classes near the top of each row
    b = torch.zeros(V, device=DEVICE)
    y = torch.randint(0, 8, (N,), device=DEVICE)
    up = torch.randn(N, device=DEVICE)
    got, g = _grads(lambda w_, b_: linear_cross_entropy(x, w_, y, linear_bias=b_, reduction="none",
                                                        backend=backend), [w, b], up)
    exp, ge = _grads(lambda w_, b_: F.cross_entropy(x.double() @ w_.double().t() + b_.double(), y,
                                                    reduction="none"), [w, b], up.double())
    assert_close(got, exp, atol=1e-9, rtol=1e-5)
    for a_, e_, name in zip(g, ge, ["linear_weight", "linear_bias"]):
        assert_close(a_, e_, atol=1e-9, rtol=1e-5, msg=name)


FR, FC = 16, 32  # filter_eps's documented block: 16 rows x 32 classes


def _block_filtered_grads(x, w, b, y, up, eps, ignore_index=-100, offset=0):
    """Float64 (dx, dw, db) of sum_n up_n * CE_n (no smoothing/weights) with filter_eps's blocks dropped:
    dz = up * (p - onehot(y)) (0 on ignored rows) is zeroed on every (FR, FC) block whose live rows'
    probabilities are all < eps and none of whose live rows has its target in the block's classes.
    Also returns the dropped and the kept block counts and the maxima of the target-free blocks.
    ``offset``: a head shard holding classes [offset, V) (its block grid from there): dx is that shard's
    part, dw/db its rows."""
    x, w = x.double().cpu(), w.double().cpu()
    y = y.cpu()
    p = torch.softmax(x @ w.t() + (b.double().cpu() if b is not None else 0.0), 1)
    live = y != ignore_index
    dz = p.clone()
    for n in range(len(y)):
        if live[n]:
            dz[n, y[n]] -= 1.0
    dz *= (up.double().cpu() * live)[:, None]
    p, dz, w, y = p[:, offset:], dz[:, offset:], w[offset:], torch.where(live, y - offset, y)
    dropped, kept, maxima = 0, 0, []
    for r0 in range(0, p.shape[0], FR):
        for c0 in range(0, p.shape[1], FC):
            rows = [n for n in range(r0, min(r0 + FR, p.shape[0])) if live[n]]
            has_target = any(c0 <= y[n] < c0 + FC for n in rows)
            pmax = max([p[n, c0:c0 + FC].max().item() for n in rows], default=0.0)
            if not has_target:
                maxima.append(pmax)
            if pmax < eps and not has_target:
                dz[r0:r0 + FR, c0:c0 + FC] = 0.0
                dropped += 1
            else:
                kept += 1
    return (dz @ w, dz.t() @ x, dz.sum(0)), dropped, kept, maxima


def _eps_between(maxima):
    """A threshold in the widest (log) gap between the target-free blocks' maxima: no block within 5%."""
    m = sorted(v for v in maxima if v > 0)
    gaps = [(m[i + 1] / m[i], i) for i in range(len(m) - 1)]
    ratio, i = max(gaps)
    assert ratio > 1.1, ratio
    return (m[i] * m[i + 1]) ** 0.5


def _filter_data(peaked, lo=0):
    torch.manual_seed(3 if peaked else 4)
    N, D, V = 45, 16, 100  # partial blocks at both ends
    x, w, b, y = _data((N,), D, V, True)
    y = torch.where(y == -100, y, lo + y % 40)  # targets among 40 classes from lo: target-free blocks
    if peaked:  # trained-like: the likely classes are the targets' (a bias), a few dominant per row
        w, b = w * 3, b + 6.0 * ((torch.arange(V, device=DEVICE) >= lo) & (torch.arange(V, device=DEVICE) < lo + 40))
    return x, w, b, y


@pytest.mark.parametrize("chunk_size", [None, 1600], ids=["onechunk", "chunks"])
@pytest.mark.parametrize("peaked", [True, False], ids=["peaked", "random"])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_lce_filter_eps_drops_blocks_from_gradient_only(backend, reduction, peaked, chunk_size):
    """filter_eps (opt-in): dz blocks of 16 rows x 32 classes with all live probabilities below it and no
    live target are dropped from the gradients; the loss stays exact. Against a float64 reference that
    drops exactly those blocks (eps set between block maxima, none within 5%); several chunks (1600
    logits: 16-row torch chunks, 32-class Triton chunks); the scalar-upstream path (sum) too."""
    x, w, b, y = _filter_data(peaked)
    N = x.shape[0]
    up = torch.randn(N, device=DEVICE) if reduction == "none" else torch.full((N,), 0.7, device=DEVICE)
    _, _, _, maxima = _block_filtered_grads(x, w, b, y, up, 0.0)
    eps = _eps_between(maxima)
    ref, dropped, kept, _ = _block_filtered_grads(x, w, b, y, up, eps)
    assert dropped > 0 and kept > 0, (dropped, kept)
    got, g = _grads(lambda x_, w_, b_: linear_cross_entropy(x_, w_, y, linear_bias=b_, reduction=reduction,
                                                            filter_eps=eps, chunk_size=chunk_size, backend=backend),
                    [x, w, b], up if reduction == "none" else torch.tensor(0.7, device=DEVICE))
    exp = F.cross_entropy(x.double() @ w.double().t() + b.double(), y, reduction=reduction)
    assert_close(got, exp)  # the loss is exact
    (exact, *_) = _block_filtered_grads(x, w, b, y, up, 0.0)
    for a_, e_, x_, name in zip(g, ref, exact, ["input", "linear_weight", "linear_bias"]):
        assert_close(a_, e_, atol=2e-5, rtol=2e-5, msg=name)
        assert (e_ - x_).abs().max() > 1e-6, name  # the dropped blocks change this gradient


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_lce_filter_eps_below_every_probability_is_bitwise_exact(backend, reduction):
    """A filter_eps no probability is below drops nothing: gradients equal to filter_eps=None (the Triton
    consumers' skip flags and the torch block mask change nothing when nothing is dropped): bitwise on the
    CPU and in the interpreter; on a GPU the filtered kernels are other compiled programs, whose fp32
    arithmetic the compiler may contract differently (FMA), so there they agree to fp32 rounding (seen on
    an H100: bitwise equality failed there)."""
    x, w, b, y = _filter_data(True)
    up = torch.randn(x.shape[0], device=DEVICE) if reduction == "none" else None

    def run(fe):
        return _grads(lambda x_, w_, b_: linear_cross_entropy(x_, w_, y, linear_bias=b_, reduction=reduction,
                                                              filter_eps=fe, backend=backend), [x, w, b], up)
    (l0, g0), (l1, g1) = run(None), run(1e-300)
    assert torch.equal(l0, l1)
    for a_, e_ in zip(g0, g1):
        assert_same_rounding(a_, e_, backend=backend)
    # "auto": the input dtype's eps / 32 (2**-28 for fp32), exactly that threshold
    for a_, e_ in zip(run("auto")[1], run(torch.finfo(x.dtype).eps / 32)[1]):
        assert torch.equal(a_, e_)


def test_lce_filter_eps_on_a_vocab_shard(backend):
    """A vocab-parallel head shard (classes 40..99 of 100, the whole row's statistics): blocks on the
    shard's own class grid, targets at global ids; against the float64 reference on that shard."""
    x, w, b, y = _filter_data(True, lo=30)  # targets 30..69: some in the shard, some before it
    up = torch.randn(x.shape[0], device=DEVICE)
    eps = _eps_between(_block_filtered_grads(x, w, b, y, up, 0.0, offset=40)[3])
    ref, dropped, kept, _ = _block_filtered_grads(x, w, b, y, up, eps, offset=40)
    assert dropped > 0 and kept > 0, (dropped, kept)
    flat = (-100, 0.0, 0, 0.0, 0.0, 0.0, 0)  # ignore_index, smoothing, mode, focal, z-loss, softcap, chunk
    _, stats, coef, _, _ = torch.ops.tri_losses.lce_fwd(x, w, b, y, None, *flat, 0.0, 0, 0, False)  # the whole row
    got = torch.ops.tri_losses.lce_bwd(up, None, x, w[40:].contiguous(), b[40:].contiguous(), y, None, stats.float(),
                                       coef.float(), *flat, eps, 40, 100, True, True, backend == "triton")
    for a_, e_, name in zip(got, ref, ["input", "linear_weight", "linear_bias"]):
        assert_close(a_, e_, atol=2e-5, rtol=2e-5, msg=name)


def test_lce_filter_eps_backends_agree_and_share_the_block():
    """Both backends drop the same blocks (same gradients up to rounding) and use the same block shape."""
    pytest.importorskip("triton")
    from tri_losses._torch.linear_cross_entropy import FILTER_BLOCK
    from tri_losses.kernels import linear_cross_entropy as klce
    assert FILTER_BLOCK == (klce.FILTER_ROWS, klce.FILTER_COLS) == (FR, FC)
    x, w, b, y = _filter_data(True)
    up = torch.randn(x.shape[0], device=DEVICE)
    eps = _eps_between(_block_filtered_grads(x, w, b, y, up, 0.0)[3])
    outs = [_grads(lambda x_, w_, b_: linear_cross_entropy(x_, w_, y, linear_bias=b_, reduction="none",
                                                           filter_eps=eps, backend=be), [x, w, b], up)[1]
            for be in ("torch", "triton")]
    for a_, e_, name in zip(*outs, ["input", "linear_weight", "linear_bias"]):
        assert_close(a_, e_, atol=1e-5, rtol=1e-5, msg=name)


BAD = [
    (dict(input=torch.randn(4, 7)), ValueError, "input"),
    (dict(linear_weight=torch.randn(10, 8, dtype=torch.float64)), TypeError, "linear_weight"),
    (dict(linear_weight=torch.randn(10)), ValueError, "linear_weight"),
    (dict(target=torch.zeros(5, dtype=torch.long)), ValueError, "target"),
    (dict(target=torch.tensor([0, 1, 10, 2])), ValueError, "target"),
    (dict(target=torch.rand(4)), ValueError, "target"),  # a float target is probabilities: (4, V)
    (dict(linear_bias=torch.randn(9)), ValueError, "linear_bias"),
    (dict(weight=torch.rand(3)), ValueError, "weight"),
    (dict(reduction="mean_all"), ValueError, "reduction"),
    (dict(label_smoothing_mode="uniform"), ValueError, "label_smoothing_mode"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(linear_bias=torch.randn(10, dtype=torch.float16)), TypeError, "linear_bias"),  # PyTorch raises
    (dict(weight=torch.rand(10, requires_grad=True)), ValueError, "weight"),  # not differentiable (PyTorch)
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(chunk_size=0, target=torch.rand(4, 10)), ValueError, "chunk_size"),  # probability targets too
    (dict(filter_eps=-1e-3), ValueError, "filter_eps"),
    (dict(filter_eps=0.0), ValueError, "filter_eps"),  # > 0; None is exact
    (dict(filter_eps=1.5), ValueError, "filter_eps"),
    (dict(filter_eps="on"), ValueError, "filter_eps"),
    (dict(filter_eps=[1e-3]), TypeError, "filter_eps"),
    (dict(filter_eps=1e-3, label_smoothing=0.1), ValueError, "filter_eps"),
    (dict(filter_eps=1e-3, target=torch.rand(4, 10)), ValueError, "filter_eps"),  # probability targets
    (dict(ignore_index=-100, target=torch.rand(4, 10)), ValueError, "ignore_index"),  # as F.linear_cross_entropy
    (dict(ignore_index=2, target=torch.rand(4, 10)), ValueError, "ignore_index"),
    (dict(filter_eps=1e-3, return_lse=True), ValueError, "filter_eps"),
    (dict(filter_eps=1e-3, return_entropy=True), ValueError, "filter_eps"),
    (dict(return_entropy=None), TypeError, "return_entropy"),
    (dict(return_lse="yes"), TypeError, "return_lse"),
    (dict(return_argmax=1), TypeError, "return_argmax"),
    (dict(z_loss=float("inf")), ValueError, "z_loss"),
    (dict(focal_gamma=float("inf")), ValueError, "focal_gamma"),
]


@pytest.mark.parametrize("kw,exc,name", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_lce_bad_input_raises_naming_argument(kw, exc, name):
    args = dict(input=torch.randn(4, 8), linear_weight=torch.randn(10, 8), target=torch.tensor([0, 1, 9, -100]))
    args.update(kw)
    x, w, t = args.pop("input"), args.pop("linear_weight"), args.pop("target")
    with pytest.raises(exc, match=name):
        linear_cross_entropy(x, w, t, **args)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_lce_torch_compile_fullgraph(backend, reduction):
    # the scalar-upstream op (mean) and the per-token ops (none) both compile without graph breaks
    x, w, b, y = _data((12,), 16, 40, True)
    up = torch.randn(12, device=DEVICE) if reduction == "none" else None

    def f(x_, w_, b_):
        return linear_cross_entropy(x_, w_, y, linear_bias=b_, label_smoothing=0.1, reduction=reduction,
                                    backend=backend)

    torch._dynamo.reset()
    got, g = _grads(torch.compile(f, fullgraph=True), [x, w, b], up)
    exp, ge = _grads(f, [x, w, b], up)
    assert_close(got, exp)
    for a, e in zip(g, ge):
        assert_close(a, e)
    # return_argmax: the rows' argmax out of the compiled graph (the mean's fast-path op, the exact one for none)
    def f_arg(x_, w_, b_):
        return linear_cross_entropy(x_, w_, y, linear_bias=b_, reduction=reduction, return_argmax=True,
                                    backend=backend)

    got_loss, got_pred = torch.compile(f_arg, fullgraph=True)(x, w, b)
    exp_loss, exp_pred = f_arg(x, w, b)
    assert torch.equal(got_pred, exp_pred) and torch.equal(exp_pred, F.linear(x, w, b).argmax(-1))
    assert_close(got_loss, exp_loss)
    if reduction == "none":  # return_lse, return_entropy: their gradients through the compiled backward too
        def f_lse(x_, w_, b_):
            loss, lse, ent = linear_cross_entropy(x_, w_, y, linear_bias=b_, reduction="none", return_lse=True,
                                                  return_entropy=True, backend=backend)
            return loss + 0.5 * lse - 0.3 * ent

        got, g = _grads(torch.compile(f_lse, fullgraph=True), [x, w, b], up)
        exp, ge = _grads(f_lse, [x, w, b], up)
        assert_close(got, exp)
        for a, e in zip(g, ge):
            assert_close(a, e)


def test_lce_torch_compile_dynamic_with_bias(backend):
    # the fast path's bias gradient under Inductor with symbolic sizes (an in-place scale on its (1, V) view
    # failed Inductor's post-grad pass); compiled from scratch, as a cached backward would hide the failure
    x, w, b, y = _data((12,), 16, 40, True)

    def f(x_, w_, b_):
        return linear_cross_entropy(x_, w_, y, linear_bias=b_, backend=backend)

    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        got, g = _grads(torch.compile(f, fullgraph=True, dynamic=True), [x, w, b], None)
    exp, ge = _grads(f, [x, w, b], None)
    assert_close(got, exp)
    for a, e in zip(g, ge):
        assert_close(a, e)


@pytest.mark.gpu
def test_lce_gpu_peak_memory_excludes_logits():
    N, V, D = 4096, 65536, 1024
    x = torch.randn(N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(V, D, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_(True)
    y = torch.randint(0, V, (N,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    linear_cross_entropy(x, w, y, backend="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    logits_bytes = N * V * 2
    # fp32 grad buffers (N*D + V*D)*4 plus the bf16 grads: well below one bf16 N x V logits tensor
    assert extra < logits_bytes, (extra, logits_bytes)


def test_lce_fp16_mean_gradients_do_not_underflow(backend):
    """reduction='mean' over many rows, times a loss weight: the upstream 1e-2/N times small probabilities
    underflows fp16 in a dz cast for the tensor-core dot; the kernels form dz relative to the tile's max
    |upstream| (the interpreter emulates the 16-bit cast). Weight-gradient error vs float64: PyTorch's
    materialised fp16 path loses ~2e-2 here (measured), ours stays near one rounding. (N = 512 with a loss
    weight of 2.5e-3 gives each row the upstream of N = 2048 at 1e-2, a quarter of the interpreter's work.)"""
    N, D, V = 512, 16, 96
    x = torch.randn(N, D, device=DEVICE).half()
    w = (torch.randn(V, D, device=DEVICE) * 0.5).half()
    y = torch.randint(0, V, (N,), device=DEVICE)
    _, (gt,) = _grads(lambda w_: F.cross_entropy(x.double() @ w_.double().t(), y) * 2.5e-3, [w], None)
    _, (gm,) = _grads(lambda w_: linear_cross_entropy(x, w_, y, backend=backend) * 2.5e-3, [w], None)
    _, (gp,) = _grads(lambda w_: F.cross_entropy(x @ w_.t(), y) * 2.5e-3, [w], None)
    err = (gm.double() - gt.double()).norm() / gt.double().norm()
    err_pt = (gp.double() - gt.double()).norm() / gt.double().norm()
    assert err <= err_pt and err < 2e-3, (err, err_pt)


def test_ce_nan_propagates_through_bound_and_probs_like_pytorch(backend):
    x = torch.randn(4, 6, device=DEVICE)
    x[1, 2] = float("nan")
    x[2, 0] = float("inf")
    y = torch.tensor([0, 1, 2, 3], device=DEVICE)
    got = cross_entropy(x, y, reduction="none", fake_upper_bound=2.0, backend=backend)
    exp = F.cross_entropy(x, y, reduction="none").clamp(max=2.0)  # clamp keeps NaN
    assert torch.equal(torch.isnan(got), torch.isnan(exp)) and torch.isnan(got[1:3]).all()
    p = torch.softmax(torch.randn(3, 5, device=DEVICE), -1)
    p[1, 1] = float("nan")  # at the target: -log(max(NaN, eps)) is NaN (PyTorch: log(NaN))
    got = cross_entropy(p, torch.tensor([0, 1, 2], device=DEVICE), reduction="none", input_type="probs",
                        backend=backend)
    assert torch.isnan(got[1]) and torch.isfinite(got[[0, 2]]).all()


def test_lce_infinite_softcap_is_no_cap(backend):
    # softcap * tanh(x / softcap) at softcap = inf would be NaN: an infinite cap means no cap
    x, w, b, y = _data((7,), 8, 30, True)
    up = torch.rand(7, device=DEVICE)
    got, g = _grads(lambda x_, w_: linear_cross_entropy(x_, w_, y, linear_bias=b, softcap=float("inf"),
                                                        reduction="none", backend=backend), [x, w], up)
    exp, ge = _grads(lambda x_, w_: F.cross_entropy(x_ @ w_.t() + b, y, reduction="none"), [x, w], up)
    assert_close(got, exp)
    for a_, e_ in zip(g, ge):
        assert_close(a_, e_)


def test_ce_and_lce_strided_class_weight_and_bias(backend):
    x, w, b, y = _data((11,), 8, 30, True)
    cw = (torch.rand(60, device=DEVICE) + 0.2)[::2]  # strided views
    bb = torch.randn(60, device=DEVICE)[::2]
    got = linear_cross_entropy(x, w, y, linear_bias=bb, weight=cw, backend=backend)
    assert_close(got, F.cross_entropy(x @ w.t() + bb, y, weight=cw))
    logits = torch.randn(11, 30, device=DEVICE)
    assert_close(cross_entropy(logits, y, cw, backend=backend), F.cross_entropy(logits, y, weight=cw))


@pytest.mark.parametrize("case", ["plain", "smooth_others_wt", "focal_softcap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lce_forward_tma_option_matches_plain_loads_and_reference(monkeypatch, case, dtype):
    """The forward's tensor-descriptor loads (``FWD_TMA``, off by default; a GPU measurement picks it):
    the loss and gradients of the masked pointer loads (both read 0 past the edges; the dot's operand
    layout may change its rounding) and of the float64 reference; x and w that TMA cannot read (a row
    stride that is not a multiple of 16 bytes) take the pointer loads."""
    from tri_losses._backend import kernels
    K = kernels("linear_cross_entropy")
    monkeypatch.setattr(K, "BLAS", ())  # (bf16's forward is otherwise cuBLAS's)
    kw = dict(CASES[case])
    cw = torch.rand(67, device=DEVICE) + 0.5 if kw.pop("weighted", False) else None
    x, w, b, y = _data((2, 9), 24, 67, True, dtype)  # 24 features: 48 / 96-byte rows, 16-byte aligned
    up = torch.randn(2, 9, device=DEVICE)

    def run(x_, w_, b_):
        return linear_cross_entropy(x_, w_, y, linear_bias=b_, weight=cw, reduction="none", backend="triton", **kw)

    seen = []
    real_ok = K._tma_ok
    monkeypatch.setattr(K, "_tma_ok", lambda *a: seen.append(real_ok(*a)) or seen[-1])
    plain, gp = _grads(run, [x, w, b], up)
    assert seen == []  # off by default
    monkeypatch.setattr(K, "FWD_TMA", True)
    got, g = _grads(run, [x, w, b], up)
    assert seen == [True]
    assert_close(got, plain, atol=1e-6, rtol=1e-6)
    for a, e, name in zip(g, gp, ["input", "linear_weight", "linear_bias"]):
        assert_close(a.float(), e.float(), atol=1e-6, rtol=1e-6 if dtype == torch.float32 else 1e-2, msg=name)
    fref = _reference(kw, cw)
    exp, ge = _grads(lambda x_, w_, b_: fref(x_.cpu().double(), w_.cpu().double(), b_.cpu().double(), y),
                     [x, w, b], up.cpu().double())
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert_close(got, exp.float(), atol=tol, rtol=tol)
    for a, e, name in zip(g, ge, ["input", "linear_weight", "linear_bias"]):
        assert_close(a.float(), e.float(), atol=tol, rtol=tol, msg=name)
    xo = torch.randn(18, 20, device=DEVICE, dtype=dtype)  # 20 bf16 features: 40-byte rows, no TMA
    wo = (torch.randn(67, 20, device=DEVICE) * 0.4).to(dtype)
    got_o = linear_cross_entropy(xo, wo, y.reshape(-1), reduction="none", backend="triton")
    assert seen[-1] == (dtype == torch.float32)  # fp32: 80-byte rows are 16-byte multiples
    assert_close(got_o, F.cross_entropy(xo.double() @ wo.double().t(), y.reshape(-1), reduction="none").float(),
                 atol=tol, rtol=tol)


_BLAS_CASES = [(("dwdx",), "plain")] + [(("dz",), c) for c in ("plain", "smooth_others_wt", "gaussian", "focal_softcap")] \
    + [(("fwd",), c) for c in ("plain", "smooth_others_wt", "gaussian", "focal_softcap", "smooth_torch_z")] \
    + [(("fwd", "dz", "dwdx"), c) for c in ("plain", "smooth_torch_z")]


@pytest.mark.skipif(not blas_runs(), reason="the cuBLAS stages need torch >= 2.10 on CUDA")
@pytest.mark.parametrize("stages,case", _BLAS_CASES, ids=[f"{'+'.join(s)}-{c}" for s, c in _BLAS_CASES])
@pytest.mark.parametrize("chunk_size,reduction", [(None, "mean"), (17 * 18, "none")], ids=["one_chunk-mean", "chunks-none"])
def test_lce_blas_stages_match_triton_gemms_and_reference(monkeypatch, stages, case, chunk_size, reduction):
    """The GEMM stages on torch.mm (``BLAS``; all three by default), bf16: the
    forward's fp32 logits with cross-entropy's partial kernel and the REL combine ("fwd"), the backward's dz
    from fp32 logits and cross-entropy's backward kernel ("dz"), the dW/dX GEMMs ("dwdx"): loss and
    gradients of the Triton kernels and of the float64 reference, one chunk and several (17 classes per
    chunk: the fp32 dX accumulator, the dz columns past a chunk of 17 that the Triton GEMMs read), with a bias
    and ignored rows, a mean and a random per-row upstream; a frozen head or input skips its GEMM; fp32 and
    filter_eps keep the Triton backward."""
    from tri_losses._backend import kernels
    K = kernels("linear_cross_entropy")
    kw = dict(CASES[case])
    cw = torch.rand(67, device=DEVICE) + 0.5 if kw.pop("weighted", False) else None
    x, w, b, y = _data((2, 9), 24, 67, True, torch.bfloat16)
    up = torch.randn(2, 9, device=DEVICE) if reduction == "none" else torch.tensor(1.0, device=DEVICE)

    def run(x_, w_, b_):
        return linear_cross_entropy(x_, w_, y, linear_bias=b_, weight=cw, reduction=reduction, backend="triton",
                                    chunk_size=chunk_size, **kw)

    calls = []
    for name in ("_blas_chunk", "_logits_f32"):
        real = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _n=name, _r=real: calls.append(_n) or _r(*a))
    assert K.BLAS == ("fwd", "dz", "dwdx")  # the default (CUDA, torch >= 2.10; the interpreter)
    monkeypatch.setattr(K, "BLAS", ())  # the Triton kernels
    plain, gp = _grads(run, [x, w, b], up)
    assert calls == []
    monkeypatch.setattr(K, "BLAS", stages)
    poison_allocations(monkeypatch)  # every buffer the path reads must have been written
    got, g = _grads(run, [x, w, b], up)
    n_chunks = 1 if chunk_size is None else 4  # 67 classes, 17 per chunk
    n_logits = n_chunks * (("fwd" in stages) + ("dz" in stages))
    assert calls.count("_blas_chunk") == (n_chunks if "dwdx" in stages else 0)
    assert calls.count("_logits_f32") == n_logits
    if "fwd" not in stages:
        assert_close(got, plain, atol=0, rtol=0)  # the forward is the same
    else:
        assert_close(got, plain, atol=1e-5, rtol=1e-5)
    for a, e, name in zip(g, gp, ["input", "linear_weight", "linear_bias"]):
        assert a.dtype == e.dtype == torch.bfloat16, name
        assert_close(a.float(), e.float(), atol=1e-2, rtol=1e-2, msg=name)
    fref = _reference(kw, cw)
    live = y >= 0
    den = live.sum().double() if cw is None else cw[y[live]].double().sum().cpu()
    red = (lambda t: t.sum() / den) if reduction == "mean" else (lambda t: t)
    exp, ge = _grads(lambda x_, w_, b_: red(fref(x_.cpu().double(), w_.cpu().double(), b_.cpu().double(), y)),
                     [x, w, b], up.cpu().double())
    assert_close(got.float(), exp.float(), atol=2e-2, rtol=2e-2)
    for a, e, name in zip(g, ge, ["input", "linear_weight", "linear_bias"]):
        assert_close(a.float(), e.float(), atol=2e-2, rtol=2e-2, msg=name)
    if case != "plain" or reduction != "none":
        return
    for frozen in (0, 1):  # a frozen head: only dX; a frozen input: only dW
        ts = [t.detach().clone().requires_grad_(i != frozen) for i, t in enumerate([x, w, b])]
        out = run(*ts)
        out.backward(up)
        assert ts[frozen].grad is None
        live = 1 - frozen
        assert_close(ts[live].grad.float(), g[live].float(), atol=0, rtol=0)
    xf, wf = x.float(), w.float()  # fp32, and filter_eps's backward: the Triton kernels
    calls.clear()
    _grads(lambda x_, w_: linear_cross_entropy(x_, w_, y, backend="triton"), [xf, wf], torch.tensor(1.0))
    _grads(lambda x_, w_: linear_cross_entropy(x_, w_, y, backend="triton", filter_eps=1e-6), [x, w],
           torch.tensor(1.0))
    assert calls == (["_logits_f32"] if "fwd" in stages else [])


@pytest.mark.parametrize("stages", [("fwd",), ("fwd", "dz", "dwdx")], ids=["fwd", "all"])
def test_lce_blas_stages_with_a_chunk_of_minus_inf_bias(monkeypatch, stages):
    """Vocabulary padding: a bias of -inf on one whole 7-class chunk (no finite logit there: its partial has
    s = 0 and must not set the row max) and strongly negative logits elsewhere; loss and gradients of the
    Triton kernels and of the float64 reference (no gradient reaches the padded classes)."""
    from tri_losses._backend import kernels
    K = kernels("linear_cross_entropy")
    x, w, _, y = _data((18,), 24, 67, False, torch.bfloat16)
    b = torch.full((67,), -200.0, device=DEVICE)
    b[7:14] = -float("inf")
    b = b.to(torch.bfloat16)
    y[(y >= 7) & (y < 14)] = 20
    up = torch.randn(18, device=DEVICE)

    def run(x_, w_):
        return linear_cross_entropy(x_, w_, y, linear_bias=b, reduction="none", backend="triton", chunk_size=7 * 18)

    monkeypatch.setattr(K, "BLAS", ())
    plain, gp = _grads(run, [x, w], up)
    monkeypatch.setattr(K, "BLAS", stages)
    got, g = _grads(run, [x, w], up)
    assert torch.isfinite(got).all()
    assert_close(got, plain, atol=1e-5, rtol=1e-5)
    exp, ge = _grads(lambda x_, w_: F.cross_entropy(x_.double() @ w_.double().t() + b.double(), y, reduction="none"),
                     [x.cpu(), w.cpu()], up.cpu().double())
    assert_close(got.double(), exp, atol=2e-2, rtol=2e-2)
    for a, e, p_, name in zip(g, ge, gp, ["input", "linear_weight"]):
        assert_close(a.double(), e, atol=2e-2, rtol=2e-2, msg=name)
        assert_close(a.float(), p_.float(), atol=1e-2, rtol=1e-2, msg=name)
    assert (g[1][7:14] == 0).all()


@pytest.mark.parametrize("bwd_inside", [False, True], ids=["bwd_after", "bwd_inside"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_lce_under_autocast_runs_the_head_in_the_autocast_dtype(backend, reduction, bwd_inside):
    """Under torch.autocast(bfloat16) with fp32 operands, the head's GEMM runs in bf16, as autocast runs
    F.linear: loss and gradients equal the float64 ones of the bf16-rounded operands (the torch backend
    failed with a scatter dtype error, the Triton one computed in fp32), the loss is fp32 and the gradients
    reach the fp32 leaves in fp32. Also F.linear_cross_entropy's under autocast (to bf16 rounding of its
    logits) where it exists. ``bwd_inside``: ``.backward()`` inside the autocast block (the torch backend's
    backward ran under the caller's autocast and failed with the same scatter error)."""
    x, w, b, y = _data((12,), 24, 70, True)
    up = torch.randn(12, device=DEVICE) if reduction == "none" else None
    ts = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        got = linear_cross_entropy(*ts[:2], y, linear_bias=ts[2], reduction=reduction, backend=backend)
        if bwd_inside:
            got.backward(up)
    assert got.dtype == torch.float32
    if not bwd_inside:
        got.backward(up)
    assert all(t.grad.dtype == torch.float32 for t in ts)
    r = [t.detach().cpu().to(torch.bfloat16).double().requires_grad_(True) for t in (x, w, b)]
    exp = F.cross_entropy(r[0] @ r[1].t() + r[2], y.cpu(), reduction=reduction)
    exp.backward(up.cpu().double() if up is not None else None)
    assert_close(got, exp, atol=2e-5, rtol=2e-5)  # fp32 math on exactly the bf16 operands
    for t, e, name in zip(ts, r, ["input", "linear_weight", "linear_bias"]):
        # the gradients are written in bf16 (the operands' dtype) before the cast back to fp32
        assert_close(t.grad, e.grad, dtype=torch.bfloat16, msg=name)
    if hasattr(F, "linear_cross_entropy"):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            theirs = F.linear_cross_entropy(x, w, y, linear_bias=b, reduction=reduction)
        assert_close(got, theirs, dtype=torch.bfloat16)  # PyTorch rounds its logits to bf16 first


@pytest.mark.parametrize("rows, vocab", [(32, 1002), (64, 2000), (128, 1940), (1, 250), (8, 250), (1, 8),
                                         (782, 4), (3, 100000), (1000, 1)])
def test_lce_forward_split_plan_fills_waves_and_keeps_x_in_l2(rows, vocab):
    """The forward's vocab splits (``split_plan``, 132 SMs, groups of 8 row tiles): no empty split, the
    splits cover the vocabulary, enough splits that the resident programs span at most 8 row tiles (or
    every vocab tile is a split), and at the goal shapes (N = 4096 / 8192 / 16384 in 128-row tiles) the
    programs fill their waves to >= 95%."""
    from tri_losses._backend import kernels
    K = kernels("linear_cross_entropy")
    S, tps = K.split_plan(132, rows, vocab, 8)
    assert 1 <= S <= vocab and (S - 1) * tps < vocab <= S * tps
    assert S >= min(vocab, -(-132 // min(8, rows)))
    waves = -(-rows * S // 132)
    eff = rows * vocab / (waves * 132 * tps)
    if (rows, vocab) in [(32, 1002), (64, 2000), (128, 1940)]:
        assert eff >= 0.95


def test_lce_backward_chunk_width_default():
    """The Triton backward's default chunk: 8192 classes (``CHUNK_CLASSES``) within 256 MiB of dz
    (``DZ_BYTES``), a multiple of the dz tile width, at least one tile, at most V rounded up to a tile;
    ``chunk_size`` overrides it (elements of dz: ``chunk_size // N`` classes)."""
    from tri_losses._backend import kernels
    K = kernels("linear_cross_entropy")
    assert K.chunk_classes(4096, 128256, 128, 2) == 8192  # 64 MiB of bf16 dz, not 256
    assert K.chunk_classes(16384, 248320, 128, 2) == 8192
    assert K.chunk_classes(65536, 248320, 128, 2) == 2048  # the 256 MiB budget binds
    assert K.chunk_classes(1 << 22, 248320, 128, 2) == 128  # at least one tile
    assert K.chunk_classes(10, 1000, 128, 2) == 1024  # V rounded up to the tile
    assert K.chunk_classes(100, 1000, 128, 2, chunk_size=700) == 7


@pytest.mark.parametrize("splits", [1, 3])
def test_lce_forward_grouped_grid_partial_last_group(monkeypatch, splits):
    """The forward's grouped grid with more row tiles than a group (150 rows: 10 interpreter row tiles,
    groups of 8, the last one partial) and 1 or 3 vocab splits (a GPU-like split count forced): every
    (row tile, split) pair runs once and the split combine is right, against float64 with smoothing,
    focal loss and a bias."""
    from tri_losses._backend import kernels
    K = kernels("linear_cross_entropy")
    def plan(x, rows, vocab):  # as split_plan: no empty split
        tps = -(-vocab // min(splits, vocab))
        return -(-vocab // tps), tps
    monkeypatch.setattr(K, "_num_splits", plan)
    x, w, b, y = _data((150,), 12, 200, True)  # 7 vocab tiles of 32: splits of 3, 3 and 1 tiles
    kw = dict(label_smoothing=0.1, focal_gamma=1.0)
    got = linear_cross_entropy(x, w, y, linear_bias=b, reduction="none", backend="triton", **kw)
    exp = _reference(kw, None)(x.cpu().double(), w.cpu().double(), b.cpu().double(), y.cpu())
    assert_close(got, exp.float(), atol=2e-5, rtol=2e-5)


def test_lce_fp16_gradients_under_a_loss_scaler(backend):
    """fp16 with a mean over N = 2048 rows and GradScaler's upstream 2**16: the gradients for an upstream of 1
    (dX ~ |W| / N) lie below fp16's normal range, so fp16 does not take the scalar-upstream path that would
    hold them in fp16 before the scaling (17% error on dX): as accurate as PyTorch's materialised path (fp16
    logits, fp32 cross-entropy), against float64."""
    g = torch.Generator().manual_seed(0)
    N, D, V = 2048, 8, 32
    x = torch.randn(N, D, generator=g).half()
    w = (torch.randn(V, D, generator=g) * 0.05).half()
    y = torch.randint(0, V, (N,), generator=g)
    up = torch.tensor(2.0 ** 16)
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    exp = torch.autograd.grad(F.cross_entropy(F.linear(x64, w64), y), (x64, w64), up.double())
    xp, wp = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    peer = torch.autograd.grad(F.cross_entropy(F.linear(xp, wp).float(), y), (xp, wp), up)
    xs, ws = x.to(DEVICE).requires_grad_(True), w.to(DEVICE).requires_grad_(True)
    got = torch.autograd.grad(linear_cross_entropy(xs, ws, y.to(DEVICE), backend=backend), (xs, ws), up.to(DEVICE))

    def err(a, e):
        big = e.abs() > 1e-2
        return float(((a.double().cpu() - e).abs() / e.abs())[big].max())
    for a, p, e, name in zip(got, peer, exp, ("x", "W")):
        assert a.dtype == torch.float16
        assert err(a, e) <= 1.25 * err(p, e) + 1e-3, (name, err(a, e), err(p, e))
