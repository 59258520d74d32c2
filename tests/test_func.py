"""torch.func transforms over the losses: ``vmap``, ``grad``, ``vjp``/``jacrev`` and their compositions
(per-sample gradients, ``vmap(grad(...))`` with ``functional_call``), on both backends.

A ``torch.library`` custom op cannot take part in ``torch.func.grad`` by itself (its generated
``autograd.Function`` has no ``setup_context``) and has no vmap rule; the package routes the call through
an ``autograd.Function`` with the op's own backward under a transform, and runs ``vmap`` once per sample.
References: PyTorch's own ops under the same transform where the semantics coincide, else the same
tri_losses call per sample with ``torch.autograd.grad`` (outside any transform). Forward mode and a
second derivative raise."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev, vjp, vmap

import tri_losses
from tri_losses import returnn
from tests.conftest import DEVICE, assert_close

B, N, C = 3, 4, 7


def _eager_grad(fn, x, *rest):
    """d fn(x, *rest) / d x by plain autograd (no transform): the per-sample reference."""
    x = x.detach().clone().requires_grad_()
    return torch.autograd.grad(fn(x, *rest), x)[0]


def _per_sample(fn, *batched):
    """``torch.stack`` over the samples of ``_eager_grad(fn, *sample)``."""
    return torch.stack([_eager_grad(fn, *[b[i] for b in batched]) for i in range(batched[0].shape[0])])


def _data():
    x = torch.randn(B, N, C, device=DEVICE)
    t = torch.randint(0, C, (B, N), device=DEVICE)
    t[0, 1] = -100
    return x, t


CE_OPTIONS = [dict(), dict(weight="w"), dict(label_smoothing=0.1), dict(reduction="sum"), dict(reduction="none"),
              dict(weight="w", label_smoothing=0.2, reduction="sum")]


@pytest.mark.parametrize("opts", CE_OPTIONS, ids=str)
def test_cross_entropy_matches_pytorch_under_transforms(backend, opts):
    x, t = _data()
    w = torch.rand(C, device=DEVICE) + 0.5
    kw = {k: (w if v == "w" else v) for k, v in opts.items()}

    def ours(a, b):
        return tri_losses.cross_entropy(a, b, backend=backend, **kw)

    def theirs(a, b):
        return F.cross_entropy(a, b, **kw)

    def total(f):
        return lambda a, b: f(a, b).sum()

    assert_close(vmap(ours)(x, t), vmap(theirs)(x, t))
    assert_close(grad(total(ours))(x[1], t[1]), grad(total(theirs))(x[1], t[1]))
    assert_close(vmap(grad(total(ours)))(x, t), vmap(grad(total(theirs)))(x, t))
    assert_close(jacrev(ours)(x[1], t[1]), jacrev(theirs)(x[1], t[1]))
    out, pull = vjp(lambda a: ours(a, t[2]), x[2])
    up = torch.rand_like(out)
    ref_out, ref_pull = vjp(lambda a: theirs(a, t[2]), x[2])
    assert_close(out, ref_out)
    assert_close(pull(up)[0], ref_pull(up)[0])


@pytest.mark.parametrize("opts", [dict(z_loss=1e-2, softcap=5.0), dict(focal_gamma=2.0),
                                  dict(label_smoothing=0.2, label_smoothing_mode="others"),
                                  dict(label_smoothing=0.3, label_smoothing_mode="gaussian"),
                                  dict(inplace_backward=True), dict(input_type="log_probs")], ids=str)
def test_cross_entropy_options_per_sample_grads_match_a_loop(backend, opts):
    """Options beyond PyTorch's: vmap(grad) equals the per-sample eager gradients (the fast path and the
    in-place backward are not taken under a transform; the results are the exact path's)."""
    x, t = _data()

    def loss(a, b):
        return tri_losses.cross_entropy(a, b, backend=backend, **opts)

    assert_close(vmap(grad(loss))(x, t), _per_sample(loss, x, t), atol=1e-6, rtol=1e-5)


def test_cross_entropy_in_dims_and_nesting(backend):
    x, t = _data()

    def ours(a, b):
        return tri_losses.cross_entropy(a, b, reduction="none", backend=backend)

    def theirs(a, b):
        return F.cross_entropy(a, b, reduction="none")

    assert_close(vmap(ours, in_dims=(None, 0))(x[0], t), vmap(theirs, in_dims=(None, 0))(x[0], t))
    assert_close(vmap(ours, in_dims=(0, None))(x, t[0]), vmap(theirs, in_dims=(0, None))(x, t[0]))
    assert_close(vmap(ours, in_dims=(1, 1))(x, t), vmap(theirs, in_dims=(1, 1))(x, t))
    assert_close(vmap(vmap(ours))(x, t), vmap(vmap(theirs))(x, t))  # one sample's row: (C,), a scalar id
    q = torch.rand(B, N, C, device=DEVICE).softmax(-1)  # probability targets: gradients for both operands
    g = vmap(grad(lambda a, b: tri_losses.cross_entropy(a, b, backend=backend), argnums=(0, 1)))(x, q)
    ref = vmap(grad(lambda a, b: F.cross_entropy(a, b), argnums=(0, 1)))(x, q)
    assert_close(g[0], ref[0])
    assert_close(g[1], ref[1])


def test_per_sample_gradients_of_a_model(backend):
    """The torch.func recipe for per-sample gradients: vmap(grad(...)) over functional_call."""
    lin = torch.nn.Linear(5, C).to(DEVICE)
    params = {k: v.detach() for k, v in lin.named_parameters()}
    xs = torch.randn(B, 2, 5, device=DEVICE)
    t = torch.randint(0, C, (B, 2), device=DEVICE)
    mod = tri_losses.CrossEntropyLoss(label_smoothing=0.1, backend=backend)
    ref_mod = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def loss(fn):
        return lambda p, a, b: fn(functional_call(lin, p, (a,)), b)

    ours = vmap(grad(loss(mod)), in_dims=(None, 0, 0))(params, xs, t)
    theirs = vmap(grad(loss(ref_mod)), in_dims=(None, 0, 0))(params, xs, t)
    for k in params:
        assert_close(ours[k], theirs[k], msg=k)


def test_linear_cross_entropy_under_transforms(backend):
    x, t = _data()
    h = torch.randn(B, N, 6, device=DEVICE)
    W, b = torch.randn(C, 6, device=DEVICE), torch.randn(C, device=DEVICE)

    def ours(hh, tt, WW):
        return tri_losses.linear_cross_entropy(hh, WW, tt, linear_bias=b, backend=backend)

    def theirs(hh, tt, WW):
        return F.cross_entropy(F.linear(hh, WW, b), tt)

    assert_close(vmap(ours, in_dims=(0, 0, None))(h, t, W), vmap(theirs, in_dims=(0, 0, None))(h, t, W))
    g = vmap(grad(ours, argnums=(0, 2)), in_dims=(0, 0, None))(h, t, W)
    ref = vmap(grad(theirs, argnums=(0, 2)), in_dims=(0, 0, None))(h, t, W)
    assert_close(g[0], ref[0])
    assert_close(g[1], ref[1])


@pytest.mark.parametrize("name", ["mse_loss", "l1_loss", "binary_cross_entropy_with_logits"])
def test_elementwise_under_transforms(backend, name):
    x = torch.randn(B, N, C, device=DEVICE)
    y = torch.rand(B, N, C, device=DEVICE)
    ours, theirs = getattr(tri_losses, name), getattr(F, name)
    g = vmap(grad(lambda a, b: ours(a, b, backend=backend), argnums=(0, 1)))(x, y)
    ref = vmap(grad(lambda a, b: theirs(a, b), argnums=(0, 1)))(x, y)
    assert_close(g[0], ref[0])
    assert_close(g[1], ref[1])
    assert_close(vmap(lambda a, b: ours(a, b, reduction="none", backend=backend))(x, y),
                 vmap(lambda a, b: theirs(a, b, reduction="none"))(x, y))
    assert_close(jacrev(lambda a: ours(a, y[0], reduction="none", backend=backend))(x[0]),
                 jacrev(lambda a: theirs(a, y[0], reduction="none"))(x[0]))


def test_ctc_and_automata_per_sample_grads(backend):
    T, S, b = 12, 4, 2
    lp = torch.randn(B, T, b, C, device=DEVICE).log_softmax(-1)
    tg = torch.randint(1, C, (B, b, S), device=DEVICE)
    il, tlen = torch.tensor([12, 10], device=DEVICE), torch.tensor([4, 3], device=DEVICE)
    # log-probs: the loss matches PyTorch; the gradient is the true partial derivative (-gamma, documented
    # as different from F.ctc_loss's), so against the eager call per sample
    assert_close(vmap(lambda l, g: tri_losses.ctc_loss(l, g, il, tlen, reduction="none", backend=backend))(lp, tg),
                 vmap(lambda l, g: F.ctc_loss(l, g, il, tlen, reduction="none"))(lp, tg))
    ctc = grad(lambda l, g: tri_losses.ctc_loss(l, g, il, tlen, backend=backend))
    assert_close(vmap(ctc)(lp, tg), _per_sample(lambda l, g: tri_losses.ctc_loss(l, g, il, tlen, backend=backend),
                                                lp, tg))
    # logits: the fused log-softmax's gradient is PyTorch's through log_softmax
    assert_close(vmap(grad(lambda l, g: tri_losses.ctc_loss(l, g, il, tlen, input_type="logits", backend=backend)))(
        lp, tg), vmap(grad(lambda l, g: F.ctc_loss(l.log_softmax(-1), g, il, tlen)))(lp, tg))
    fsa = tri_losses.ctc_fsa(tg[0], tlen, 0)

    def full_sum(l):
        return tri_losses.fsa_loss(l, il, fsa, input_type="log_probs", backend=backend)

    assert_close(vmap(grad(full_sum))(lp), _per_sample(full_sum, lp), atol=1e-5, rtol=1e-4)


def test_sampled_softmax_per_sample_grads(backend):
    W, bias = torch.randn(50, 6, device=DEVICE), torch.randn(50, device=DEVICE)
    h = torch.randn(B, 4, 6, device=DEVICE)
    lab = torch.randint(0, 50, (B, 4, 1), device=DEVICE)
    drawn = tri_losses.samplers.LogUniformSampler(50).to(DEVICE).sample(
        8, lab[0], generator=torch.Generator(DEVICE).manual_seed(1))[:3]

    def loss(hh, ll):
        return tri_losses.sampled_softmax_loss(hh, W, ll, 8, linear_bias=bias, sampled_values=drawn, backend=backend)

    assert_close(vmap(grad(loss))(h, lab), _per_sample(loss, h, lab))


@pytest.mark.parametrize("name,activation,target", [("ce", None, "ids"), ("ce", "softmax", "ids"),
                                                    ("generic_ce", "exp", "ids"), ("mse", None, "dense"),
                                                    ("bin_ce", None, "binary"), ("as_is", None, None)])
def test_returnn_registry_per_sample_grads(name, activation, target):
    out = torch.randn(2, 2, 5, 6, device=DEVICE)
    ol = torch.tensor([5, 3], device=DEVICE)
    tgt = {"ids": torch.randint(0, 6, (2, 2, 5), device=DEVICE), "dense": torch.rand(2, 2, 5, 6, device=DEVICE),
           "binary": (torch.rand(2, 2, 5, 6, device=DEVICE) > 0.5).float(), None: torch.zeros(2, device=DEVICE)}[target]
    loss = returnn.get_loss(name)

    def value(o, t):
        return loss(o, t if target is not None else None, activation=activation, output_lengths=ol).value

    assert_close(vmap(grad(value))(out, tgt), _per_sample(value, out, tgt))


def test_misc_functions_under_transforms():
    x = torch.randn(B, 4, 6, device=DEVICE)
    g2 = torch.full((4, 6), 2.0, device=DEVICE)

    def with_grad(a):
        return tri_losses.loss_with_gradient(a.sum(), a, g2)

    def smoothed(a):
        return (tri_losses.label_smoothed_log_prob_gradient(a.log_softmax(-1), 0.1) * torch.arange(6.0)).sum()

    assert_close(vmap(grad(with_grad))(x), _per_sample(with_grad, x))
    assert_close(vmap(grad(smoothed))(x), _per_sample(smoothed, x))
    q = torch.rand(4, 6, device=DEVICE).softmax(-1)  # class weights that require grad (probability targets)
    w = torch.rand(6, device=DEVICE)
    assert_close(grad(lambda ww: tri_losses.cross_entropy(x[0], q, weight=ww))(w),
                 grad(lambda ww: F.cross_entropy(x[0], q, weight=ww))(w))


def test_forward_mode_and_second_order_raise(backend):
    x, t = _data()

    def loss(a):
        return tri_losses.cross_entropy(a, t[0], backend=backend)

    with pytest.raises(NotImplementedError, match="cross_entropy: forward-mode AD is not supported"):
        torch.func.jvp(loss, (x[0],), (torch.ones_like(x[0]),))
    with pytest.raises(NotImplementedError, match="cross_entropy: forward-mode AD is not supported"):
        torch.func.hessian(loss)(x[0])
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        grad(lambda a: grad(loss)(a).sum())(x[0])
    with pytest.raises(NotImplementedError, match="forward-mode AD is not supported"):
        torch.func.jacfwd(lambda a: tri_losses.mse_loss(a, x[1], backend=backend))(x[0])


def test_second_derivative_of_class_weight_gradient_raises(backend):
    """Probability targets with class weights that require grad: the weights' gradient is formed from the
    logits and targets without a graph, so a second derivative through it raises (never zeros) with respect
    to each of the three, under transforms and in eager mode; the first derivatives match PyTorch's."""
    x = torch.randn(4, 5, device=DEVICE)
    q = torch.rand(4, 5, device=DEVICE).softmax(-1)
    w = torch.rand(5, device=DEVICE) + 0.5

    def gw(a, qq, v):
        return grad(lambda v_: tri_losses.cross_entropy(a, qq, weight=v_, backend=backend))(v)

    for argnum in range(3):
        with pytest.raises(RuntimeError, match="double backward is not supported"):
            grad(lambda *args: gw(*args).pow(2).sum(), argnums=argnum)(x, q, w)
    first = grad(lambda a, qq, v: tri_losses.cross_entropy(a, qq, weight=v, backend=backend), argnums=(0, 1, 2))
    ref = grad(lambda a, qq, v: F.cross_entropy(a, qq, weight=v), argnums=(0, 1, 2))
    for got, want in zip(first(x, q, w), ref(x, q, w)):
        assert_close(got, want)
    xs, qs, ws = (t.clone().requires_grad_() for t in (x, q, w))
    (g,) = torch.autograd.grad(tri_losses.cross_entropy(xs, qs, weight=ws, backend=backend), ws, create_graph=True)
    for t in (xs, qs, ws):
        with pytest.raises(RuntimeError, match="double backward is not supported"):
            torch.autograd.grad(g.pow(2).sum(), t, retain_graph=True)


def _count_calls(monkeypatch, module, **names):
    """{key: calls so far} of the torch backend's functions ``module.<names[key]>``, counted from now on."""
    calls = dict.fromkeys(names, 0)

    def counted(key, real):
        def call(*a, **k):
            calls[key] += 1
            return real(*a, **k)
        return call

    for key, name in names.items():
        monkeypatch.setattr(module, name, counted(key, getattr(module, name)))
    return calls


def test_vmap_folds_samples_into_rows_for_cross_entropy(monkeypatch):
    """vmap over the logits and targets (the per-sample-gradient case) runs cross-entropy's forward and
    backward once on all samples' rows; mapped class weights fall back to one call per sample. Same values
    either way (against PyTorch's op)."""
    from tri_losses._torch import cross_entropy as tce
    calls = _count_calls(monkeypatch, tce, fwd="ce_fwd", bwd="ce_bwd")
    x = torch.randn(5, 3, C)
    t = torch.randint(0, C, (5, 3))
    w = torch.rand(5, C) + 0.5
    for in_dims, weight, per_call in (((0, 0), None, 1), ((0, None), None, 1), ((None, 0), None, 1),
                                      ((0, 0, None), w[0], 1), ((0, 0, 0), w, 5)):
        calls.update(fwd=0, bwd=0)
        args = ((x[0] if in_dims[0] is None else x, t[0] if in_dims[1] is None else t)
                + ((weight,) if len(in_dims) > 2 else ()))

        def ours(a, b, v=None):
            return tri_losses.cross_entropy(a, b, weight=v, backend="torch")

        def theirs(a, b, v=None):
            return F.cross_entropy(a, b, weight=v)

        got = vmap(grad(ours), in_dims=in_dims)(*args)
        assert calls == {"fwd": per_call, "bwd": per_call}, (in_dims, calls)
        assert_close(got, vmap(grad(theirs), in_dims=in_dims)(*args))


def test_samplers_under_vmap_randomness():
    """A sampler's draw under vmap follows ``randomness``: per-sample draws with "different", one draw with
    "same"; sampled softmax's per-sample gradients run with either. The learned sampler (shared counts
    updated in place) raises."""
    lab = torch.randint(0, 50, (6, 4, 1), device=DEVICE)
    for sampler in (tri_losses.samplers.LogUniformSampler(50), tri_losses.samplers.UniformSampler(50),
                    tri_losses.samplers.FixedUnigramSampler(unigrams=list(range(1, 51)))):
        sampler = sampler.to(DEVICE)
        diff = vmap(lambda t: sampler.sample(8, t)[0], randomness="different")(lab)
        same = vmap(lambda t: sampler.sample(8, t)[0], randomness="same")(lab)
        assert diff.shape == same.shape == (6, 1, 8)
        assert not all(torch.equal(diff[0], d) for d in diff[1:])
        assert all(torch.equal(same[0], s) for s in same[1:])
        assert all(d.unique().numel() == 8 for d in diff[:, 0])  # unique draws within each sample
    W = torch.randn(50, 6, device=DEVICE)
    h = torch.randn(6, 4, 6, device=DEVICE)

    def loss(hh, ll):
        return tri_losses.sampled_softmax_loss(hh, W, ll, 8)

    # "same": the one draw an eager call makes from the same seed, so each sample's gradient is the eager one
    torch.manual_seed(5)
    g = vmap(grad(loss), randomness="same")(h, lab)
    for i in (0, 3):
        torch.manual_seed(5)
        assert_close(g[i], _eager_grad(loss, h[i], lab[i]), atol=1e-6, rtol=1e-5)
    # identical samples: identical gradients with one draw, different ones with per-sample draws
    rep = (h[:1].expand(6, 4, 6), lab[:1].expand(6, 4, 1))
    same = vmap(grad(loss), randomness="same")(*rep)
    diff = vmap(grad(loss), randomness="different")(*rep)
    assert all(torch.equal(same[0], s) for s in same[1:])
    assert torch.isfinite(diff).all() and not all(torch.equal(diff[0], d) for d in diff[1:])
    learned = tri_losses.samplers.LearnedUnigramSampler(50)
    with pytest.raises(NotImplementedError, match="LearnedUnigramSampler: sampling under torch.vmap"):
        vmap(lambda t: learned.sample(8, t)[0], randomness="different")(lab.cpu())
    assert learned.counts.sum() == 50  # nothing counted


def test_vmap_over_an_empty_batch(backend):
    """vmap over zero samples gives empty results as PyTorch's op does (the row-folding path and the per-sample
    loop, which runs one sample of zeros for the shapes only)."""
    x = torch.randn(0, 4, C, device=DEVICE)
    t = torch.randint(0, C, (0, 4), device=DEVICE)
    w = torch.rand(0, C, device=DEVICE)
    assert vmap(lambda a, b: tri_losses.cross_entropy(a, b, backend=backend))(x, t).shape == (0,)
    assert vmap(grad(lambda a, b: tri_losses.cross_entropy(a, b, backend=backend)))(x, t).shape == (0, 4, C)
    g = vmap(grad(lambda a, b, v: tri_losses.cross_entropy(a, b, weight=v, backend=backend)))(x, t, w)
    assert g.shape == (0, 4, C)
    lp = torch.randn(0, 6, 2, C, device=DEVICE).log_softmax(-1)
    tg = torch.randint(1, C, (0, 2, 2), device=DEVICE)
    out = vmap(lambda l, g_: tri_losses.ctc_loss(l, g_, [6, 5], [2, 2], reduction="none", backend=backend))(lp, tg)
    assert out.shape == (0, 2)


def test_vmap_folds_samples_into_rows_for_linear_cross_entropy_forward(monkeypatch):
    """vmap over linear CE's hidden states and targets runs its forward once on all samples' rows (the head's
    weight gradient sums over rows, so the backward stays one call per sample); gradients of the input and of
    the head as PyTorch's F.linear + F.cross_entropy under the same transforms."""
    from tri_losses._torch import linear_cross_entropy as tlce
    calls = _count_calls(monkeypatch, tlce, fwd="lce_fwd", bwd="lce_bwd")
    h = torch.randn(5, 3, 6)
    t = torch.randint(0, C, (5, 3))
    t[1, 2] = -100
    W, b = torch.randn(C, 6), torch.randn(C)

    def ours(hh, tt, WW):
        return tri_losses.linear_cross_entropy(hh, WW, tt, linear_bias=b, label_smoothing=0.1, backend="torch")

    def theirs(hh, tt, WW):
        return F.cross_entropy(F.linear(hh, WW, b), tt, label_smoothing=0.1)

    g = vmap(grad(ours, argnums=(0, 2)), in_dims=(0, 0, None))(h, t, W)
    assert calls == {"fwd": 1, "bwd": 5}, calls
    ref = vmap(grad(theirs, argnums=(0, 2)), in_dims=(0, 0, None))(h, t, W)
    assert_close(g[0], ref[0])
    assert_close(g[1], ref[1])


def test_vmap_grad_of_linear_cross_entropy_with_its_lse(backend):
    """Per-sample gradients of a loss built from linear CE's return_lse (a z-loss of one's own): the lse's
    gradient through the op's backward under vmap(grad), as F.linear + F.cross_entropy + logsumexp give it."""
    h = torch.randn(3, 5, 6, device=DEVICE)
    t = torch.randint(0, C, (3, 5), device=DEVICE)
    t[0, 1] = -100  # an ignored row: its lse still has a gradient
    W = torch.randn(C, 6, device=DEVICE)

    def ours(WW, hh, tt):
        loss, lse = tri_losses.linear_cross_entropy(hh, WW, tt, return_lse=True, backend=backend)
        return loss + 0.1 * (lse ** 2).mean()

    def theirs(WW, hh, tt):
        z = hh @ WW.t()
        return F.cross_entropy(z, tt) + 0.1 * (torch.logsumexp(z, -1) ** 2).mean()

    assert_close(vmap(grad(ours), in_dims=(None, 0, 0))(W, h, t), vmap(grad(theirs), in_dims=(None, 0, 0))(W, h, t))
    # return_argmax under vmap (the forward folds the samples into rows): each sample's rows' argmax
    pred = vmap(lambda hh, tt: tri_losses.linear_cross_entropy(hh, W, tt, return_argmax=True, backend=backend)[1])(h, t)
    assert torch.equal(pred, (h @ W.t()).argmax(-1))


def test_vmap_grad_of_linear_cross_entropy_with_an_entropy_bonus(backend):
    """Per-sample gradients of a loss minus an entropy bonus (PPO's) from linear CE's return_entropy: the
    entropy's gradient through the op's backward under vmap(grad), as F.linear + softmax entropy give it."""
    h = torch.randn(3, 5, 6, device=DEVICE)
    t = torch.randint(0, C, (3, 5), device=DEVICE)
    t[0, 1] = -100  # an ignored row: its entropy still has a gradient
    W = torch.randn(C, 6, device=DEVICE)

    def ours(WW, hh, tt):
        loss, ent = tri_losses.linear_cross_entropy(hh, WW, tt, return_entropy=True, backend=backend)
        return loss - 0.1 * ent.mean()

    def theirs(WW, hh, tt):
        z = hh @ WW.t()
        return F.cross_entropy(z, tt) + 0.1 * (z.softmax(-1) * z.log_softmax(-1)).sum(-1).mean()

    assert_close(vmap(grad(ours), in_dims=(None, 0, 0))(W, h, t), vmap(grad(theirs), in_dims=(None, 0, 0))(W, h, t))
