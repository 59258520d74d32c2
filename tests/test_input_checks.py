"""Argument checks across the families, on both backends: tensors on another device (a meta tensor standing in
for one) raise a ValueError naming the argument instead of reading garbage; NumPy scalars and arrays are taken
where PyTorch takes them; class ids compare with ``ignore_index`` as int64 values whatever the target's dtype."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tri_losses as T
from tests.conftest import DEVICE, assert_close


def _raises(exc, name, fn):
    with pytest.raises(exc) as info:
        fn()
    assert name in str(info.value), str(info.value)


def test_tensors_on_another_device_are_named(backend):
    x, t = torch.randn(3, 4, device=DEVICE), torch.rand(3, 4, device=DEVICE)
    meta = lambda v: v.to("meta")  # noqa: E731
    _raises(ValueError, "weight", lambda: T.binary_cross_entropy_with_logits(
        x, t, meta(torch.rand(4)), backend=backend))
    _raises(ValueError, "pos_weight", lambda: T.binary_cross_entropy_with_logits(
        x, t, pos_weight=meta(torch.rand(4)), backend=backend))
    xs, W, b = torch.randn(4, 3, device=DEVICE), torch.randn(10, 3, device=DEVICE), torch.randn(10, device=DEVICE)
    y = torch.tensor([1, 5, 9, 0], device=DEVICE)
    for name, kw in (("linear_weight", dict(linear_weight=meta(W))), ("linear_bias", dict(linear_bias=meta(b))),
                     ("target", dict(target=meta(y)))):
        args = dict(input=xs, linear_weight=W, target=y, num_sampled=3, backend=backend) | kw
        _raises(ValueError, name, lambda: T.sampled_softmax_loss(**args))
        _raises(ValueError, name, lambda: T.nce_loss(**args))
    lp = torch.randn(6, 2, 5, device=DEVICE).log_softmax(-1)
    tg, il, tl = torch.tensor([[1, 2], [3, 0]], device=DEVICE), torch.tensor([6, 5]), torch.tensor([2, 1])
    _raises(ValueError, "targets", lambda: T.ctc_loss(lp, meta(tg), il, tl, backend=backend))
    _raises(ValueError, "input_lengths", lambda: T.ctc_loss(lp, tg, meta(il), tl, backend=backend))
    fsa = T.ctc_fsa(tg, tl, 0)
    _raises(ValueError, "edges", lambda: T.fsa_loss(lp, il, (meta(fsa[0]), *fsa[1:]), backend=backend))
    mask = torch.ones(6, 2, device=DEVICE)
    _raises(ValueError, "mask", lambda: T.fast_baum_welch(-lp, *fsa[:3], meta(mask), backend=backend))
    _raises(TypeError, "mask", lambda: T.fast_baum_welch(-lp, *fsa[:3], [[1, 1]] * 6, backend=backend))


def test_other_devices_in_the_plain_pytorch_ops():
    x = torch.randn(2, 3, 8)
    _raises(ValueError, "targets", lambda: T.deep_clustering_loss(x, torch.rand(2, 3, 4).to("meta"),
                                                                   embedding_dim=2))
    _raises(ValueError, "target", lambda: T.triplet_loss(torch.randn(4, 6), torch.zeros(4, 3, dtype=torch.long).to("meta"),
                                                         margin=0.5))
    _raises(ValueError, "scores", lambda: T.expected_loss(torch.ones(2, 3), torch.ones(2, 3).to("meta")))
    _raises(ValueError, "grad_x", lambda: T.loss_with_gradient(torch.ones(()), torch.ones(3),
                                                               torch.ones(3).to("meta")))
    hyp, ref = torch.tensor([[1, 2, 3]]), torch.tensor([[1, 3, 0]])
    _raises(ValueError, "ref", lambda: T.edit_distance(hyp, [3], ref.to("meta"), [2]))
    _raises(ValueError, "hyp", lambda: T.edit_distance(hyp.to("meta"), [3], ref, [2]))  # (returned a meta result)
    _raises(ValueError, "hyp", lambda: T.bleu(hyp.to("meta"), [3], ref, [2]))


def test_bad_scalar_options_are_named():
    _raises(ValueError, "embedding_dim", lambda: T.deep_clustering_loss(torch.randn(2, 3, 20), torch.rand(2, 3, 8),
                                                                         embedding_dim=-5))
    _raises(TypeError, "embedding_dim", lambda: T.deep_clustering_loss(torch.randn(2, 3, 20), torch.rand(2, 3, 8),
                                                                        embedding_dim=5.0))
    _raises(ValueError, "losses", lambda: T.expected_loss(torch.ones(3), torch.ones(3)))
    _raises(TypeError, "value", lambda: T.loss_with_gradient("a", torch.ones(3), torch.ones(3)))
    _raises(TypeError, "exclude_labels", lambda: T.label_smoothed_log_prob_gradient(
        torch.randn(2, 5), 0.1, exclude_labels=[1.5]))
    _raises(TypeError, "process_group", lambda: T.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]),
                                                                process_group="x"))


def test_numpy_scalars_and_arrays_as_pytorch_takes_them(backend):
    x = torch.randn(4, 5, device=DEVICE)
    y = torch.tensor([0, 2, 4, 1], device=DEVICE)
    exp = T.cross_entropy(x, y, ignore_index=2, label_smoothing=0.25, backend=backend)
    got = T.cross_entropy(x, y, ignore_index=np.int64(2), label_smoothing=np.float32(0.25), backend=backend)
    assert_close(got, exp, atol=1e-6, rtol=1e-6)
    assert_close(got, F.cross_entropy(x, y, ignore_index=2, label_smoothing=0.25), atol=1e-5, rtol=1e-5)
    h, W = torch.randn(4, 3, device=DEVICE), torch.randn(5, 3, device=DEVICE)
    got = T.linear_cross_entropy(h, W, y, ignore_index=np.int32(2), chunk_size=np.int64(8), backend=backend)
    assert_close(got, F.cross_entropy(h @ W.t(), y, ignore_index=2), atol=1e-5, rtol=1e-5)
    lp = torch.randn(6, 3, 5, device=DEVICE).log_softmax(-1)
    tg = torch.tensor([[1, 2, 2], [3, 4, 0], [1, 0, 0]], device=DEVICE)
    il, tl = np.array([6, 5, 4]), np.array([3, 2, 1])
    got = T.ctc_loss(lp, tg, il, tl, blank=np.int64(0), reduction="none", backend=backend)
    assert_close(got, F.ctc_loss(lp, tg, torch.tensor(il), torch.tensor(tl), reduction="none"), atol=1e-4, rtol=1e-5)
    g = T.label_smoothed_log_prob_gradient(torch.randn(2, 5), 0.1, exclude_labels=torch.tensor([1, 2]))
    assert g.shape == (2, 5)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_narrow_target_dtypes_compare_with_ignore_index_as_int64(backend, dtype):
    """-100 is 156 in uint8 (a comparison with a Python int casts it to the tensor's dtype): a uint8 id 156 is
    still out of range (PyTorch raises), and an ignore_index outside the target dtype's range ignores nothing."""
    x, W = torch.randn(4, 3, device=DEVICE), torch.randn(6, 3, device=DEVICE)
    logits = x @ W.t()
    y = torch.tensor([1, 1, 2, 3], device=DEVICE)
    if dtype == torch.uint8:
        bad = torch.tensor([156, 1, 2, 3], dtype=dtype, device=DEVICE)
        # (validate=True: on CUDA the id range is read only on request)
        _raises(ValueError, "target", lambda: T.cross_entropy(logits, bad, validate=True, backend=backend))
        _raises(ValueError, "target", lambda: T.linear_cross_entropy(x, W, bad, validate=True, backend=backend))
    far = {torch.uint8: 257, torch.int8: 257, torch.int16: 2 ** 16 + 1, torch.int32: 2 ** 32 + 1}[dtype]
    exp = F.cross_entropy(logits, y)  # far wraps to 1 in the narrow dtype: no row may be ignored
    assert_close(T.cross_entropy(logits, y.to(dtype), ignore_index=far, backend=backend), exp, atol=1e-5, rtol=1e-5)
    assert_close(T.linear_cross_entropy(x, W, y.to(dtype), ignore_index=far, backend=backend), exp, atol=1e-5,
                 rtol=1e-5)
    assert_close(T.cross_entropy(logits, y.to(dtype), ignore_index=1, backend=backend),
                 F.cross_entropy(logits, y, ignore_index=1), atol=1e-5, rtol=1e-5)
    assert T.frame_error(logits, y.to(dtype), ignore_index=far) == T.frame_error(logits, y)


def test_ignore_index_checks_in_every_family(backend):
    x, W, y = torch.randn(4, 3, device=DEVICE), torch.randn(10, 3, device=DEVICE), torch.tensor([1, 5, 9, 0],
                                                                                                   device=DEVICE)
    _raises(ValueError, "ignore_index", lambda: T.linear_cross_entropy(x, W, y, ignore_index=2 ** 70,
                                                                       backend=backend))
    for bad, exc in ((None, TypeError), ("a", TypeError), (1.5, TypeError), (2 ** 70, ValueError)):
        _raises(exc, "ignore_index", lambda: T.sampled_softmax_loss(x, W, y, 3, ignore_index=bad, backend=backend))
    got = T.sampled_softmax_loss(x, W, y, np.int64(3), ignore_index=np.int64(-100), backend=backend,
                                 generator=torch.Generator(DEVICE).manual_seed(0))
    exp = T.sampled_softmax_loss(x, W, y, 3, backend=backend, generator=torch.Generator(DEVICE).manual_seed(0))
    assert_close(got, exp, atol=0, rtol=0)


def test_hf_num_items_in_batch_checked():
    pytest.importorskip("transformers")
    import tri_losses.hf as hf
    logits, labels = torch.randn(2, 4, 6), torch.randint(0, 6, (2, 4))
    _raises(TypeError, "num_items_in_batch", lambda: hf.causal_lm_loss(logits, labels, num_items_in_batch="5"))
    _raises(ValueError, "num_items_in_batch", lambda: hf.causal_lm_loss(logits, labels,
                                                                         num_items_in_batch=torch.tensor([3, 3])))
    a = hf.causal_lm_loss(logits, labels, num_items_in_batch=torch.tensor([5]))
    b = hf.causal_lm_loss(logits, labels, num_items_in_batch=5)
    assert_close(a, b, atol=0, rtol=0)


def test_export_with_a_dynamic_batch_and_a_per_class_weight(backend):
    """A (C,) pos_weight/weight next to an (N, C) input adds no guard on N (torch.export with N's range
    containing C), as for F.binary_cross_entropy_with_logits."""
    from torch.export import Dim
    C = 11
    pw = torch.rand(C, device=DEVICE) + 0.5

    class M(torch.nn.Module):
        def __init__(self, **kw):
            super().__init__()
            self.kw = kw

        def forward(self, x, t):
            return T.binary_cross_entropy_with_logits(x, t, backend=backend, **self.kw)

    for kw in (dict(pos_weight=pw), dict(weight=pw)):
        n = Dim("n", min=2, max=64)
        ep = torch.export.export(M(**kw), (torch.randn(6, C, device=DEVICE), torch.rand(6, C, device=DEVICE)),
                                 dynamic_shapes={"x": {0: n}, "t": {0: n}})
        x, t = torch.randn(C, C, device=DEVICE), torch.rand(C, C, device=DEVICE)
        assert_close(ep.module()(x, t), F.binary_cross_entropy_with_logits(x, t, **kw), atol=1e-5, rtol=1e-5)



def test_export_element_wise_losses_with_an_unbounded_dynamic_batch(backend):
    """torch.export with a dynamic batch over its whole range (``Dim("n")``, spanning the 1024-element blocks
    of the sum): the reduced op returns the scalar sum, not one partial per block, whose count (a ceil
    division of the element count) made the export guard on it and fail. The exported program on batches
    on both sides of a block matches PyTorch's functions."""
    from torch.export import Dim
    C = 13
    for fn, ref in ((T.mse_loss, F.mse_loss), (T.l1_loss, F.l1_loss),
                    (T.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits)):
        class M(torch.nn.Module):
            def forward(self, x, t):
                return fn(x, t, backend=backend)

        n = Dim("n")
        ep = torch.export.export(M(), (torch.randn(5, C, device=DEVICE), torch.rand(5, C, device=DEVICE)),
                                 dynamic_shapes={"x": {0: n}, "t": {0: n}})
        for rows in (3, 79, 200):  # 39, 1027 and 2600 elements
            x = torch.randn(rows, C, device=DEVICE, requires_grad=True)
            t = torch.rand(rows, C, device=DEVICE)
            got = ep.module()(x, t)
            (g,) = torch.autograd.grad(got, x)
            xr = x.detach().double().requires_grad_()
            exp = ref(xr, t.double())
            (ge,) = torch.autograd.grad(exp, xr)
            assert_close(got.double(), exp, atol=1e-6, rtol=1e-5)
            assert_close(g.double(), ge, atol=1e-7, rtol=1e-5)


def test_export_linear_cross_entropy_then_train_other_inputs(backend):
    """An exported linear CE whose example input did not require grad (only the head did), run on an input
    that does (the loss inside a larger exported model), and the other way round: every gradient as
    PyTorch's. The training fast path forms only the gradients the forward's inputs require, which an
    exported program would fix at export; under export the loss takes the path whose backward asks."""
    torch.manual_seed(0)
    m = T.LinearCrossEntropyLoss(4, 13, bias=True, backend=backend).to(DEVICE)
    y = torch.randint(0, 13, (5,), device=DEVICE)
    for at_export in (False, True):
        ep = torch.export.export(m, (torch.randn(5, 4, device=DEVICE, requires_grad=at_export), y))
        for grad_x in (True, False):
            x = torch.randn(5, 4, device=DEVICE, requires_grad=grad_x)
            mod = ep.module()  # (the exported program's parameters: shared by every module() call)
            mod.zero_grad()
            loss = mod(x, y)
            loss.backward()
            xr = x.detach().double().requires_grad_(grad_x)
            W = m.linear.weight.detach().double().requires_grad_()
            b = m.linear.bias.detach().double().requires_grad_()
            exp = F.cross_entropy(xr @ W.t() + b, y)
            exp.backward()
            assert_close(loss.double(), exp, atol=1e-6, rtol=1e-5)
            if grad_x:
                assert_close(x.grad.double(), xr.grad, atol=1e-6, rtol=1e-5)
            params = dict(mod.named_parameters())
            assert_close(params["linear.weight"].grad.double(), W.grad, atol=1e-6, rtol=1e-5)
            assert_close(params["linear.bias"].grad.double(), b.grad, atol=1e-6, rtol=1e-5)


def test_linear_cross_entropy_on_meta_tensors():
    """Shapes without data (as F.linear_cross_entropy): no autocast query for the meta device."""
    x, W = torch.randn(4, 3, device="meta", requires_grad=True), torch.randn(6, 3, device="meta")
    y = torch.zeros(4, dtype=torch.long, device="meta")
    assert T.linear_cross_entropy(x, W, y, backend="torch").shape == ()
    assert T.linear_cross_entropy(x, W, y, reduction="none", backend="torch").shape == (4,)


def test_weighted_mean_over_zero_weight_is_nan_as_pytorch(backend):
    """Class weights summing to 0 over the batch's targets: the mean is 0/0 = NaN with its NaN gradients, as
    F.cross_entropy, also with label smoothing (whose own term would otherwise give x/0 = inf)."""
    x0, y = torch.randn(4, 6, device=DEVICE), torch.tensor([0, 1, 0, 1], device=DEVICE)
    w = torch.rand(6, device=DEVICE) + 0.1
    w[:2] = 0
    for eps in (0.0, 0.1):
        for fn in (lambda x: T.cross_entropy(x, y, w, label_smoothing=eps, backend=backend),
                   lambda x: T.linear_cross_entropy(x, torch.eye(6, device=DEVICE), y, weight=w,
                                                    label_smoothing=eps, backend=backend)):
            x = x0.clone().requires_grad_(True)
            loss = fn(x)
            loss.backward()
            ref = x0.clone().requires_grad_(True)
            F.cross_entropy(ref, y, w, label_smoothing=eps).backward()
            assert torch.isnan(loss) and torch.isnan(x.grad).all() and torch.isnan(ref.grad).all()


def test_returnn_registry_checks_call_keywords_options_and_ids():
    import tri_losses.returnn as R
    out, tgt, ol = torch.randn(2, 4, 5), torch.randint(0, 5, (2, 4)), torch.tensor([4, 3])
    ce = R.get_loss("ce")
    _raises(TypeError, "output_lenghts", lambda: ce(out, tgt, activation="softmax", output_lenghts=ol))
    bad = tgt.clone()
    bad[0, 0] = 7
    _raises(ValueError, "target", lambda: ce(torch.softmax(out, -1), bad))
    _raises(ValueError, "target", lambda: R.get_loss("generic_ce")(out, bad))
    pad = bad.clone()
    pad[1, 3] = 99  # past output_lengths[1] = 3: padding, never read
    pad[0, 0] = 1
    assert torch.isfinite(ce(torch.softmax(out, -1), pad, output_lengths=ol).value)
    for opts, exc, name in ((dict(label_smoothing=1.0), ValueError, "label_smoothing"),
                            (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
                            (dict(focal_loss_factor=-1.0), ValueError, "focal_loss_factor"),
                            (dict(fake_upper_bound="a"), TypeError, "fake_upper_bound")):
        _raises(exc, name, lambda: R.get_loss("ce", **opts))
    _raises(TypeError, "margin", lambda: R.get_loss("triplet_loss", margin="1"))
    _raises(ValueError, "beam_width", lambda: R.get_loss("ctc", beam_width=0))
    # an option RETURNN's class does not take fails there at construction; here too (ctc took a 0 focal factor)
    _raises(ValueError, "focal_loss_factor", lambda: R.get_loss("ctc", focal_loss_factor=0.0))
    _raises(TypeError, "beam_scores", lambda: R.get_loss("ce")(out, tgt, beam_scores=torch.zeros(2)))
    # expected_loss / search_score: beam_scores is a (B, K) float tensor, B * K = the output's batch (6 here)
    ex = R.get_loss("expected_loss", loss={"class": "ce"})
    o6, t6 = torch.randn(6, 4, 5), torch.randint(0, 5, (6, 4))
    for bad_scores, exc in ((torch.zeros(4, 2), ValueError), (torch.zeros(6), ValueError), ([[0.0] * 3] * 2, TypeError),
                            (torch.zeros(2, 3, dtype=torch.long), TypeError)):
        _raises(exc, "beam_scores", lambda: ex(o6, t6, activation="softmax", beam_scores=bad_scores))
    assert torch.isfinite(ex(o6, t6, activation="softmax", beam_scores=torch.zeros(2, 3)).value)
    ss = R.get_loss("search_score")
    for bad_scores, exc in ((torch.zeros(6), ValueError), ([0.0, 1.0], TypeError)):
        _raises(exc, "beam_scores", lambda: ss(torch.zeros(2, 3), beam_scores=bad_scores))
    # triplet_loss: class ids (RETURNN casts labels to int32; a float label is refused, not compared as a float)
    _raises(TypeError, "target", lambda: T.triplet_loss(torch.randn(1, 6), torch.tensor([[1.2, 1.7, 0.5]]), margin=0.5))
    _raises(TypeError, "target", lambda: R.get_loss("triplet_loss", margin=0.5)(torch.randn(1, 6),
                                                                                  torch.tensor([[1.2, 1.7, 0.5]])))


def test_returnn_ctc_error_metric_inside_a_triton_block(backend):
    """The registry's CTC computes its error with the decoders (no Triton kernel of their own): a
    use_backend block around it changes the loss's backend only."""
    import tri_losses.returnn as R
    out, ol = torch.randn(2, 4, 5, device=DEVICE), torch.tensor([4, 3])
    tgt = torch.tensor([[1, 2], [3, 0]], device=DEVICE)
    ref = R.get_loss("ctc")(out, tgt, output_lengths=ol, target_lengths=[2, 1])
    with T.use_backend(backend):
        got = R.get_loss("ctc")(out, tgt, output_lengths=ol, target_lengths=[2, 1])
    assert_close(got.value, ref.value, atol=1e-4, rtol=1e-5)
    assert torch.equal(got.error, ref.error)


def test_tf_compat_mod_shards_must_have_the_mod_sizes():
    """partition_strategy='mod' puts id i in shard i % n: shards of other sizes would read other rows."""
    import tri_losses.tf_compat as TF
    W, b, lab, x = torch.randn(10, 3), torch.randn(10), torch.tensor([[1], [2], [3], [9]]), torch.randn(4, 3)
    for cut in (3, 6):
        _raises(ValueError, "weights", lambda: TF.sampled_softmax_loss([W[:cut], W[cut:]], [b[:cut], b[cut:]], lab,
                                                                       x, 3, 10, seed=1))
    shards = [W[0::2], W[1::2]]  # the mod layout: ids 0, 2, ... then 1, 3, ...
    got = TF.sampled_softmax_loss(shards, [b[0::2], b[1::2]], lab, x, 3, 10, seed=1)
    assert_close(got, TF.sampled_softmax_loss(W, b, lab, x, 3, 10, seed=1), atol=0, rtol=0)


def test_unbatched_forms_as_pytorch_takes_them(backend):
    """(C,) logits with a (1,) target (F.cross_entropy's forward takes it); CTC's unbatched (T, C) input in
    ctc_posteriors and ctc_best_path as in ctc_loss; linear CE with D = 0 (the logits are the bias)."""
    x = torch.randn(5, device=DEVICE)
    for red in ("none", "mean", "sum"):
        got = T.cross_entropy(x, torch.tensor([2], device=DEVICE), reduction=red, backend=backend)
        assert_close(got, F.cross_entropy(x, torch.tensor(2, device=DEVICE), reduction=red), atol=1e-6, rtol=1e-6)
    lp = torch.randn(6, 2, 5, device=DEVICE).log_softmax(-1)
    tg, il, tl = torch.tensor([[1, 2], [3, 0]], device=DEVICE), torch.tensor([6, 4]), torch.tensor([2, 1])
    post = T.ctc_posteriors(lp, tg, il, tl, backend=backend)
    one = T.ctc_posteriors(lp[:, 0], tg[0], np.int64(6), 2, backend=backend)
    assert one.shape == (6, 5) and torch.equal(one, post[:, 0])
    path, score = T.ctc_best_path(lp, tg, il, tl, backend=backend)
    p1, s1 = T.ctc_best_path(lp[:, 0], tg[0], 6, torch.tensor(2), backend=backend)
    assert p1.shape == (6,) and s1.shape == () and torch.equal(p1, path[0]) and s1 == score[0]
    h, W = torch.randn(4, 0, device=DEVICE), torch.randn(6, 0, device=DEVICE)
    b = torch.randn(6, device=DEVICE, requires_grad=True)
    y = torch.tensor([0, 1, -100, 3], device=DEVICE)
    got = T.linear_cross_entropy(h, W, y, linear_bias=b, label_smoothing=0.1, backend=backend)
    (g,) = torch.autograd.grad(got, b)
    bb = b.detach().clone().requires_grad_(True)
    exp = F.cross_entropy(F.linear(h, W, bb), y, label_smoothing=0.1)  # (F.linear_cross_entropy: torch >= 2.13)
    (ge,) = torch.autograd.grad(exp, bb)
    assert_close(got, exp, atol=1e-5, rtol=1e-5)
    assert_close(g, ge, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(4, 6), (2, 6, 3), (6,)])
def test_class_weights_differentiable_with_probability_targets_as_pytorch(backend, shape):
    """F.cross_entropy differentiates its class weights for probability targets (label-smoothed too): the loss
    and the gradients of the input and the weights with a random upstream, also through linear_cross_entropy."""
    cdim = 1 if len(shape) > 1 else 0
    x0, w0 = torch.randn(*shape, device=DEVICE), torch.rand(6, device=DEVICE) + 0.5
    t = torch.softmax(torch.randn(*shape, device=DEVICE), cdim)
    for red in ("none", "mean", "sum"):
        for eps in (0.0, 0.2):
            x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
            got = T.cross_entropy(x, t, w, reduction=red, label_smoothing=eps, backend=backend)
            up = torch.randn(got.shape, device=DEVICE)
            gx, gw = torch.autograd.grad(got, (x, w), up)
            xr, wr = x0.clone().requires_grad_(), w0.clone().requires_grad_()
            exp = F.cross_entropy(xr, t, wr, reduction=red, label_smoothing=eps)
            hx, hw = torch.autograd.grad(exp, (xr, wr), up)
            for a, b in ((got, exp), (gx, hx), (gw, hw)):
                assert_close(a, b, atol=1e-5, rtol=1e-4)
    if len(shape) == 2:
        h, W = torch.randn(4, 3, device=DEVICE), torch.randn(6, 3, device=DEVICE)
        w = w0.clone().requires_grad_()
        (gw,) = torch.autograd.grad(T.linear_cross_entropy(h, W, t, weight=w, backend=backend), w)
        wr = w0.clone().requires_grad_()
        (hw,) = torch.autograd.grad(F.cross_entropy(h @ W.t(), t, weight=wr), wr)
        assert_close(gw, hw, atol=1e-5, rtol=1e-4)
    # inplace_backward (the logits become their gradient in the forward): the weights' gradient is still
    # PyTorch's (it was formed from the overwritten logits); and a -inf logit under target mass keeps
    # PyTorch's +inf loss (the weights' zero term was 0 * inf = NaN)
    xi, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    got = T.cross_entropy(xi * 1.0, t, w, reduction="sum", inplace_backward=True, backend=backend)
    (gw,) = torch.autograd.grad(got, w)
    wr = w0.clone().requires_grad_()
    (hw,) = torch.autograd.grad(F.cross_entropy(x0, t, wr, reduction="sum"), wr)
    assert_close(gw, hw, atol=1e-5, rtol=1e-4)
    # a second derivative raises (it came back None under allow_unused=True: the error node had no anchor)
    xi, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    (gw,) = torch.autograd.grad(T.cross_entropy(xi, t, w, reduction="sum", backend=backend), w, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(gw.sum(), (xi, w), allow_unused=True)
    xm = x0.clone()
    xm.select(cdim, 1).fill_(-math.inf)
    for red in ("none", "sum"):
        got = T.cross_entropy(xm, t, w0.clone().requires_grad_(), reduction=red, backend=backend)
        exp = F.cross_entropy(xm, t, w0, reduction=red)
        assert torch.equal(torch.isposinf(got), torch.isposinf(exp)) and torch.isposinf(exp).any()
    with pytest.raises(ValueError, match="weight"):  # class ids: not differentiable, as in PyTorch
        T.cross_entropy(x0, torch.zeros(shape[:cdim] + shape[cdim + 1:], dtype=torch.long, device=DEVICE),
                        w0.clone().requires_grad_(), backend=backend)
    with pytest.raises(ValueError, match="weight"):  # this package's own options: not with such weights
        T.cross_entropy(x0, t, w0.clone().requires_grad_(), focal_gamma=2.0, backend=backend)


def test_review_regressions_of_the_checks(backend):
    """A sampler by name compiles with fullgraph=True (the fake-mode query skipped while tracing); a
    differentiable class weight gives the detached weight's loss where a target with no mass meets a -inf
    logit (0 * -inf = 0, as the op); the registry takes 0-d tensor options and an integral float beam width."""
    import tri_losses.returnn as R
    h, W = torch.randn(6, 4, device=DEVICE), torch.randn(11, 4, device=DEVICE)
    t = torch.randint(0, 11, (6,), device=DEVICE)
    for fn in (T.sampled_softmax_loss, T.nce_loss):
        def f():
            return fn(h, W, t, num_sampled=4, backend=backend)
        torch.manual_seed(0)
        got = torch.compile(f, fullgraph=True, backend="eager")()
        torch.manual_seed(0)
        assert_close(got, f(), atol=1e-6, rtol=1e-6)
    x = torch.randn(3, 5, device=DEVICE)
    x[0, 2] = -float("inf")
    q = torch.softmax(torch.randn(3, 5, device=DEVICE), -1)
    q[0, 2] = 0.0
    w = torch.rand(5, device=DEVICE) + 0.5
    a = T.cross_entropy(x, q, w, backend=backend)
    b = T.cross_entropy(x, q, w.clone().requires_grad_(), backend=backend)
    assert torch.isfinite(a) and torch.equal(a, b.detach())
    for name, opts in (("bin_ce", dict(pos_weight=torch.tensor(2.0))), ("ce", dict(label_smoothing=torch.tensor(0.1))),
                       ("triplet_loss", dict(margin=torch.tensor(1.0))), ("ctc", dict(beam_width=4.0))):
        R.get_loss(name, **opts)


def test_ignored_row_of_minus_inf_logits_has_zero_gradient(backend):
    """An ignored row whose logits are all -inf (a fully masked padding position): loss 0 and gradient 0 on
    both backends (PyTorch's own gradient there is NaN, which would reach the weights); a row with a target
    and all logits -inf stays NaN."""
    x0 = torch.randn(3, 4, device=DEVICE)
    x0[0] = -float("inf")
    for dtype in (torch.float32, torch.bfloat16):
        for red in ("mean", "sum", "none"):
            x = x0.to(dtype).clone().requires_grad_()
            loss = T.cross_entropy(x, torch.tensor([-100, 1, 2], device=DEVICE), reduction=red, backend=backend)
            loss.sum().backward()
            assert (x.grad[0] == 0).all() and torch.isfinite(x.grad[1:]).all()
            ref = x0[1:].clone().detach().requires_grad_()
            F.cross_entropy(ref, torch.tensor([1, 2], device=DEVICE), reduction="sum").backward()
            if red == "sum":
                assert_close(x.grad[1:].float(), ref.grad, atol=1e-2 if dtype == torch.bfloat16 else 1e-6, rtol=1e-2)
    x = x0.clone().requires_grad_()
    loss = T.cross_entropy(x, torch.tensor([0, 1, 2], device=DEVICE), reduction="none", backend=backend)
    loss.sum().backward()
    assert torch.isnan(loss[0]) and torch.isnan(x.grad[0]).all()


def test_sampled_softmax_with_infinite_logits_matches_the_torch_backend(backend):
    """A -inf true logit (a masked class): that row's loss is +inf and, with upstream 0 there, every gradient
    stays finite (the Triton forward's online log-sum-exp gave NaN, which reached the shared W/b gradient);
    a +inf sampled logit: loss +inf, as torch.logsumexp."""
    X, W = torch.randn(3, 3, device=DEVICE), torch.randn(10, 3, device=DEVICE)
    b = torch.randn(10, device=DEVICE) * 0.1
    b[3] = -float("inf")
    t = torch.tensor([1, 3, 0], device=DEVICE)
    sv = (torch.tensor([2, 5, 7, 9], device=DEVICE), torch.full((3, 1), 0.3, device=DEVICE),
          torch.tensor([0.2, 0.1, 0.05, 0.4], device=DEVICE))
    res = {}
    for be in ("torch", backend):
        Xi, Wi, bi = [a.clone().requires_grad_() for a in (X, W, b)]
        loss = T.sampled_softmax_loss(Xi, Wi, t, 4, linear_bias=bi, sampled_values=sv, reduction="none", backend=be)
        loss[torch.tensor([0, 2])].sum().backward()
        assert loss[1] == float("inf") and torch.isfinite(loss[[0, 2]]).all()
        assert all(torch.isfinite(g).all() for g in (Xi.grad, Wi.grad, bi.grad[torch.isfinite(b)]))
        res[be] = (loss.detach(), Xi.grad, Wi.grad)
    for u, v in zip(res["torch"], res[backend]):
        assert_close(u, v, atol=1e-5, rtol=1e-5)
    b2 = torch.randn(10, device=DEVICE)
    b2[5] = float("inf")
    loss = T.sampled_softmax_loss(X, W, t, 4, linear_bias=b2, sampled_values=sv, reduction="none", backend=backend)
    assert (loss == float("inf")).all()


def test_bce_target_gradient_without_cancellation(backend):
    """d/dt of BCE-with-logits is pw * softplus(-x) - softplus(x) = (pw - 1) * softplus(-x) - x: formed without
    the difference of two ~log 2 terms, it keeps fp32 relative accuracy at x ~ 0 (float64 reference)."""
    x = torch.tensor([1e-3, -1e-5, 1e-7, -3e-8, 2.0, -30.0], device=DEVICE)
    t = torch.rand(6, device=DEVICE)
    for pw in (None, torch.full((6,), 3.0, device=DEVICE)):
        tt = t.clone().requires_grad_()
        T.binary_cross_entropy_with_logits(x, tt, pos_weight=pw, reduction="sum", backend=backend).backward()
        x64 = x.double()
        q = 1.0 if pw is None else pw.double()
        exp = q * F.softplus(-x64) - F.softplus(x64)
        exp = (q - 1.0) * F.softplus(-x64) - x64 if pw is None else exp
        assert_close(tt.grad.double(), exp, atol=0, rtol=1e-5)


def test_integer_arguments_take_numpy_ints_and_reject_floats_and_bools():
    """Count and id arguments outside the tensor ops (automaton builders, decoders, samplers, BLEU) take
    anything with ``__index__`` (NumPy ints, 0-d int tensors), as PyTorch's int arguments do, and raise a
    TypeError naming the argument for a float or a bool, a ValueError for a value out of range."""
    from tri_losses.samplers import FixedUnigramSampler, UniformSampler
    tg, tl = torch.tensor([[1, 2]]), torch.tensor([2])

    def same(a, b):
        return all(torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v for u, v in zip(a, b))
    want = T.hmm_fsa(tg, tl, states_per_label=2, silence=0)
    got = T.hmm_fsa(tg, tl, states_per_label=np.int64(2), silence=torch.tensor(0))
    assert same(want, got) and same(T.ctc_fsa(tg, tl, 0), T.ctc_fsa(tg, tl, np.int32(0)))
    assert UniformSampler(np.int64(7)).num_classes == 7
    s = FixedUnigramSampler([1.0, 2.0, 3.0, 4.0], num_shards=np.int64(2), shard=np.int64(1), num_reserved_ids=0)
    assert s.num_classes == 2
    lg = torch.randn(1, 5, 4)
    a = T.ctc_beam_search_decode(lg, [5], beam_width=3, blank=0)
    b = T.ctc_beam_search_decode(lg, [5], beam_width=np.int64(3), blank=0)
    assert same(a, b)
    h, hl = torch.tensor([[1, 2, 3]]), torch.tensor([3])
    assert torch.equal(T.bleu(h, hl, h, hl, max_order=np.int64(2)), T.bleu(h, hl, h, hl, max_order=2))
    _raises(TypeError, "states_per_label", lambda: T.hmm_fsa(tg, tl, states_per_label=2.0))
    _raises(ValueError, "states_per_label", lambda: T.hmm_fsa(tg, tl, states_per_label=0))
    # (a bound: the template's loop over the states of a label ran for minutes at 2**40)
    _raises(ValueError, "states_per_label: expected a positive int in [1, 1024], got 1099511627776",
            lambda: T.hmm_fsa(tg, tl, states_per_label=2 ** 40))
    assert T.hmm_fsa(tg, tl, states_per_label=1024).num_states > 0
    _raises(TypeError, "silence", lambda: T.hmm_fsa(tg, tl, silence=True))
    _raises(TypeError, "blank", lambda: T.ctc_fsa(tg, tl, 0.0))
    _raises(TypeError, "num_classes", lambda: UniformSampler(7.0))
    _raises(TypeError, "num_sampled", lambda: UniformSampler(7).sample(2.5, torch.tensor([1])))
    _raises(TypeError, "num_shards", lambda: FixedUnigramSampler([1.0, 2.0], num_shards=2.0))
    _raises(ValueError, "shard", lambda: FixedUnigramSampler([1.0, 2.0], num_shards=2, shard=2))
    _raises(TypeError, "beam_width", lambda: T.ctc_beam_search_decode(lg, [5], beam_width=2.5))
    _raises(TypeError, "label_map", lambda: T.edit_distance(h, hl, h, hl, label_map={1.0: 2}))
    got = T.edit_distance(h, hl, h + 1, hl, label_map={np.int64(1): np.int64(0), 2: 0, 3: None, 4: None})
    assert got.tolist() == [1]  # hyp 0 0 against ref 0


def test_automaton_builders_name_a_negative_target_id():
    """ctc_fsa / hmm_fsa: a negative id within a target length is an IndexError (a ValueError) naming
    ``targets`` and its position; before, the automaton was built and fsa_loss named ``edges``. Padding
    beyond the lengths may hold anything."""
    tg = torch.tensor([[1, 2, 3], [4, -2, -1]])
    for build in (lambda t, n: T.ctc_fsa(t, n, 0), lambda t, n: T.hmm_fsa(t, n)):
        with pytest.raises(IndexError) as info:
            build(tg, [3, 2])
        assert isinstance(info.value, ValueError)
        assert str(info.value).endswith("targets: expected non-negative ids within target_lengths, got -2 at [1, 1]")
        assert build(tg, [3, 1]).num_states > 0


def test_ctc_errors_are_runtime_errors_where_pytorch_raises_one(backend):
    """Where F.ctc_loss raises RuntimeError, ctc_loss raises an error that is a RuntimeError too (and a
    ValueError naming the argument), so a caller's except clause written for PyTorch still catches it."""
    lp = torch.randn(10, 2, 5, device=DEVICE).log_softmax(-1)
    tg = torch.randint(1, 5, (2, 3), device=DEVICE)
    cases = [("target_lengths", lp, tg, [10, 10], [4, 3]),
             ("targets", lp, torch.randint(1, 5, (3, 3), device=DEVICE), [10, 10], [3, 3]),
             ("log_probs", torch.randn(0, 2, 5, device=DEVICE), tg, [0, 0], [3, 3])]
    for name, a, b, il, tl in cases:
        with pytest.raises(RuntimeError):
            F.ctc_loss(a, b, torch.tensor(il), torch.tensor(tl))
        _raises(RuntimeError, name, lambda: T.ctc_loss(a, b, torch.tensor(il), torch.tensor(tl), backend=backend))
        _raises(ValueError, name, lambda: T.ctc_loss(a, b, torch.tensor(il), torch.tensor(tl), backend=backend))
    bad = tg.clone()
    bad[1, 2] = 0
    _raises(ValueError, "[1, 2]", lambda: T.ctc_loss(lp.cpu(), bad.cpu(), [10, 10], [3, 3], backend=backend))


BOOL_FLAGS = {
    "cross_entropy": ("inplace_backward", "return_lse", "validate"),
    "linear_cross_entropy": ("validate", "reduce_input_grad"),
    "ctc_loss": ("zero_infinity", "max_approx", "label_loop", "batch_first", "validate"),
    "ctc_posteriors": ("label_loop", "batch_first", "validate"),
    "ctc_best_path": ("label_loop", "batch_first", "validate"),
    "ctc_greedy_decode": ("batch_first",),
    "triplet_loss": ("multi_view",),
    "expected_loss": ("norm_scores", "norm_scores_stop_gradient", "divide_beam_size", "subtract_average_loss",
                      "loss_correction_grad_only"),
    "edit_distance": ("normalize",),
    "bleu": ("use_bp",),
    "ctc_beam_search_decode": ("return_scores",),
    "fast_baum_welch": ("validate",),
    "fast_viterbi": ("validate",),
    "fsa_loss": ("max_approx", "batch_first", "validate"),
    "ctc_fsa": ("label_loop",),
}


@pytest.mark.parametrize("op", sorted(BOOL_FLAGS))
def test_bool_flags_must_be_bools_as_pytorchs(op):
    """A true/false option takes a bool (Python or NumPy), as PyTorch's bool arguments: the string "False",
    None or 1 raised nothing and was taken by its truth value (max_approx="False" gave the Viterbi loss,
    zero_infinity="False" zeroed infinite losses). The flags are checked first, so no valid tensors are needed."""
    fn = getattr(T, op)
    n_args = {"cross_entropy": 2, "linear_cross_entropy": 3, "ctc_loss": 4, "ctc_posteriors": 4, "ctc_best_path": 4,
              "ctc_greedy_decode": 2, "triplet_loss": 2, "expected_loss": 2, "edit_distance": 4, "bleu": 4,
              "ctc_beam_search_decode": 2, "fast_baum_welch": 5, "fast_viterbi": 5, "fsa_loss": 3, "ctc_fsa": 3}[op]
    extra = {"triplet_loss": dict(margin=0.5)}.get(op, {})
    for flag in BOOL_FLAGS[op]:
        for bad in ("False", None, 1):
            with pytest.raises(TypeError, match=rf"{op}: {flag}: expected a bool"):
                fn(*([None] * n_args), **extra, **{flag: bad})
    if op == "bleu":  # None: its default (by aggregate); anything else a bool
        for bad in ("False", 1):
            with pytest.raises(TypeError, match=r"bleu: effective_order: expected a bool"):
                fn(*([None] * n_args), effective_order=bad)


@pytest.mark.parametrize("fn", ["sampled_softmax_loss", "nce_loss", "compute_sampled_logits"])
def test_sampled_bool_flags_must_be_bools(fn):
    h, W, t = torch.randn(4, 3), torch.randn(10, 3), torch.randint(0, 10, (4,))
    for flag in ("unique", "remove_accidental_hits", "subtract_log_q", "validate") + (
            ("use_full_softmax",) if fn != "compute_sampled_logits" else ()):
        with pytest.raises(TypeError, match=rf"{fn}: {flag}: expected a bool"):
            getattr(T, fn)(h, W, t, 3, **{flag: "False"})
    getattr(T, fn)(h, W, t, 3, unique=np.bool_(True), backend="torch")  # a NumPy bool is a bool


def test_ctc_and_automata_ids_out_of_range_raise_index_errors(backend):
    """An id outside its range is an InputIndexError (also an IndexError, as PyTorch raises), as cross_entropy's."""
    x = torch.randn(5, 2, 4).log_softmax(-1)
    for bad in (5, -1):
        tg = torch.tensor([[1, bad], [2, 3]])
        for fn in (T.ctc_loss, T.ctc_posteriors, T.ctc_best_path):
            with pytest.raises(IndexError, match="targets: expected class ids in"):
                fn(x, tg, [5, 5], [2, 2], backend=backend)
    e, w, se = T.ctc_fsa(torch.tensor([[1, 2]]), [2], 0)[:3]
    e = e.clone()
    e[2, 0] = 9  # emission id past D = 4
    with pytest.raises(IndexError, match="emission_idx expected in"):
        T.fast_baum_welch(x[:, :1], e, w, se, torch.ones(5, 1), backend=backend)


def test_complex_targets_and_deep_clustering_flat_batch_mismatch(backend):
    """A complex target is refused by mse_loss (PyTorch raises) and BCE (PyTorch returns a complex 'loss');
    l1_loss with real input and a complex target is |input - target| as PyTorch's (the imaginary part was
    dropped silently). deep_clustering_loss's flat (B, T, F*S) targets are read with their own (B, T): a
    batch/time mismatch with the embeddings raises naming targets (one was reshaped into the embeddings'
    (B, T) and gave a value, others a bare reshape error); complex source masks are refused."""
    import tri_losses as T
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=g).to(DEVICE)
    tc = torch.randn(3, 4, dtype=torch.complex64, generator=g).to(DEVICE)
    _raises(TypeError, "mse_loss: target: expected a real tensor, got torch.complex64",
            lambda: T.mse_loss(x, tc, backend=backend))
    _raises(TypeError, "binary_cross_entropy_with_logits: target: expected a real tensor",
            lambda: T.binary_cross_entropy_with_logits(x, tc, backend=backend))
    xg = x.clone().requires_grad_(True)
    got = T.l1_loss(xg, tc)
    xr = x.clone().requires_grad_(True)
    exp = torch.nn.functional.l1_loss(xr, tc)
    assert_close(got, exp)
    got.backward()
    exp.backward()
    assert_close(xg.grad, xr.grad)
    emb = torch.randn(2, 3, 6, generator=g).to(DEVICE)
    for bad in ((3, 2, 4), (3, 3, 4), (2, 4, 4)):  # (B, T) swapped, B, T differing
        tg = torch.rand(*bad, generator=g).to(DEVICE)
        _raises(ValueError, "deep_clustering_loss: targets: expected (2, 3, 2, S)",
                lambda: T.deep_clustering_loss(emb, tg, embedding_dim=3))
    _raises(TypeError, "targets: expected real source masks",
            lambda: T.deep_clustering_loss(emb, torch.ones(2, 3, 4, dtype=torch.complex64).to(DEVICE),
                                           embedding_dim=3))


def test_returnn_registry_call_checks_output_and_target_types():
    """A registry loss call checks its output (a float tensor; integer label sequences only for the losses that
    read decoded labels: edit_distance, bleu, and expected_loss over them) and target (a tensor): an int64
    output gave a 'loss' for ce, generic_ce and as_is, and a string target an AttributeError."""
    from tri_losses import returnn
    out = torch.randn(2, 3, 5, device=DEVICE)
    tgt = torch.randint(0, 5, (2, 3), device=DEVICE)
    lens = torch.tensor([3, 2], device=DEVICE)
    for name in ("ce", "generic_ce", "as_is", "mse", "l1", "bin_ce"):
        loss = returnn.get_loss(name)
        _raises(TypeError, f"{name}: output: expected a floating", lambda: loss(tgt, tgt, output_lengths=lens))
        _raises(TypeError, f"{name}: target", lambda: loss(out, "abc", output_lengths=lens))
    hyp = torch.randint(1, 5, (2, 3), device=DEVICE)
    ed = returnn.get_loss("edit_distance")(hyp, tgt, output_lengths=lens, target_lengths=lens)
    assert ed.error is not None and ed.value is None
    # search_score reads only the beam scores; RETURNN puts it on a ChoiceLayer (sparse int labels): 0.5 there
    ss = returnn.get_loss("search_score")(hyp[:1, :2], None, beam_scores=torch.tensor([[0.5, -1.0]], device=DEVICE))
    assert ss.value.item() == 0.5


def test_sequence_arguments_of_the_wrong_kind_are_named():
    """ctc_loss's targets as a string or a sequence with non-ints, and label_smoothed_log_prob_gradient's
    exclude_labels as a bare int or a string, raise TypeError naming the argument (bare 'too many dimensions
    str' / 'int object is not iterable' before); NumPy id arrays stay accepted."""
    x = torch.randn(5, 2, 4, device=DEVICE).log_softmax(-1)
    for bad in ("abc", [1, "a"], [1.7, 2.9], [True, True]):  # (floats were truncated to ids, bools read as 1)
        _raises(TypeError, "ctc_loss: targets: expected", lambda: T.ctc_loss(x, bad, [5, 5], [1, 1]))
    assert torch.equal(T.ctc_loss(x, [1, 2], [5, 5], [1, 1]), T.ctc_loss(x, torch.tensor([1, 2]), [5, 5], [1, 1]))
    assert T.ctc_loss(x, [], [5, 5], [0, 0]).isfinite()
    for bad in (5, "ab"):
        for s in (0.1, 0.0):  # (smoothing 0, the identity, returned before checking them)
            _raises(TypeError, "label_smoothed_log_prob_gradient: exclude_labels: expected a sequence",
                    lambda: T.label_smoothed_log_prob_gradient(x, s, exclude_labels=bad))
    for s in (0.1, 0.0):
        _raises(IndexError, "exclude_labels: expected ids in [0, 4), got [99]",
                lambda: T.label_smoothed_log_prob_gradient(x, s, exclude_labels=[99]))
    assert T.label_smoothed_log_prob_gradient(x, 0.0, exclude_labels=[3]) is x
    assert torch.equal(T.label_smoothed_log_prob_gradient(x, 0.1, exclude_labels=np.array([0])),
                       T.label_smoothed_log_prob_gradient(x, 0.1, exclude_labels=[0]))
