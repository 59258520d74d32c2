"""tri_losses.returnn: the RETURNN-compatible registry (base-Loss behaviour and each class)."""
import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import DEVICE, assert_close
from tests.reference import catalogue as ref_cat
from tri_losses import returnn as R
from tri_losses import use_backend
from tri_losses.cross_entropy import cross_entropy

Z = [[[1.0, 2.0, 0.5, -1.0, 0.0]]]


@pytest.mark.parametrize("opts,expected", [
    ({}, 0.574438), (dict(label_smoothing=0.1), 0.298226),
    (dict(label_smoothing=0.1, label_smoothing_gaussian=True), 0.801921),
    (dict(focal_loss_factor=1.0), 0.251017), (dict(focal_loss_factor=2.0), 0.109689)])
def test_returnn_ce_spec_values(opts, expected):
    z = torch.tensor(Z, device=DEVICE, requires_grad=True)
    r = R.get_loss("ce", **opts)(z, torch.tensor([[1]], device=DEVICE), activation="softmax")
    assert r.value.item() == pytest.approx(expected, abs=2e-6)
    r.objective.backward()
    # gradient: float64 autograd of RETURNN's formula (Gaussian smoothing's gradient is checked below)
    if not opts.get("label_smoothing_gaussian"):
        z64 = torch.tensor(Z, dtype=torch.float64, requires_grad=True)
        logp = z64[0, 0].log_softmax(-1)
        eps, gamma = opts.get("label_smoothing", 0.0), opts.get("focal_loss_factor", 0.0)
        q = torch.full((5,), eps / 4, dtype=torch.float64)
        q[1] = 1 - eps
        ref = -(q * logp).sum() * (1 - logp[1].exp()) ** gamma
        ref.backward()
        assert_close(z.grad, z64.grad, atol=1e-6, rtol=1e-5)


def test_returnn_every_class_name_constructs():
    assert set(R.LOSSES) == {"ce", "ctc", "bin_ce", "sse_sigmoid", "generic_ce", "mse", "l1", "mean_l1",
                             "edit_distance", "bleu", "deep_clustering", "triplet_loss", "expected_loss",
                             "via_layer", "as_is", "search_score", "sampling_loss", "fast_bw", "sprint"}
    for name in R.LOSSES:
        opts = {"loss": {"class": "ce"}} if name == "expected_loss" else {}
        assert isinstance(R.get_loss(name, **opts), R.Loss)


def test_returnn_unknown_name_and_option_list_valid_ones():
    with pytest.raises(ValueError, match="class_name.*valid names.*'ce'"):
        R.get_loss("cross_entropy")
    with pytest.raises(ValueError, match="unknown option.*'smoothing'.*valid options.*label_smoothing"):
        R.get_loss("ce", smoothing=0.1)
    R.get_loss("ce", use_flatten_frames=True, use_fused=False, debug_print=True, debug_dump=False)
    with pytest.raises(ValueError, match="custom_norm_factor and custom_inv_norm_factor"):
        R.get_loss("ce", custom_norm_factor=0.5, custom_inv_norm_factor=torch.ones(2))
    with pytest.raises(TypeError, match=r"get_loss\('ce'\): scale: expected a number, got str"):
        R.get_loss("ce", scale="2")
    with pytest.raises(TypeError, match="custom_norm_factor: expected a number"):
        R.get_loss("mse", custom_norm_factor="0.5")


@pytest.mark.parametrize("name", ["ce", "generic_ce"])
def test_returnn_wrong_shaped_target_names_it(name):
    x = torch.randn(2, 3, 4).to(DEVICE).requires_grad_(True)
    loss = R.get_loss(name)
    kinds = [torch.rand(2, 3, 5), torch.rand(2, 4, 4), torch.randint(0, 4, (2, 4))]
    for t in kinds if name == "ce" else kinds[2:]:
        with pytest.raises(ValueError, match=f"{name}: target: expected a .* target of shape"):
            loss(x, t.to(DEVICE))
    if name == "generic_ce":
        with pytest.raises(TypeError, match="generic_ce: target: expected integer class ids"):
            loss(x, torch.rand(2, 3, 4).to(DEVICE))


def _batch(B=3, T=6, V=7, dense=False):
    x = torch.randn(B, T, V)
    lens = torch.tensor([6, 4, 1])[:B]
    t = torch.randint(0, V, (B, T))
    t[1, 4:] = -7  # garbage in the padding is never read
    if dense:
        t = torch.softmax(torch.randn(B, T, V), -1)
    return x.to(DEVICE).requires_grad_(True), t.to(DEVICE), lens.to(DEVICE)


def test_returnn_ce_value_is_sum_over_valid_frames_and_padding_gets_no_grad():
    x, t, lens = _batch()
    r = R.get_loss("ce")(x, t, activation="softmax", target_lengths=lens, output_lengths=lens)
    mask = torch.arange(6, device=DEVICE)[None, :] < lens[:, None]
    ref = cross_entropy(x[mask], t[mask], reduction="sum")
    assert_close(r.value, ref)
    assert r.norm_factor.item() == pytest.approx(1 / 11)
    r.objective.backward()
    onehot = F.one_hot(torch.where(mask, t, 0), 7).float()
    assert (x.grad[~mask] == 0).all()
    assert_close(x.grad[mask], (torch.softmax(x.detach(), -1) - onehot)[mask], atol=1e-6, rtol=1e-5)
    pred = x.detach().argmax(-1)
    assert r.error.item() == ((pred != t) & mask).sum().item()
    assert r.reported_value.item() == pytest.approx(r.value.item() / 11, rel=1e-6)


def test_returnn_time_major_and_no_time_axis():
    x, t, lens = _batch()
    a = R.get_loss("ce")(x, t, activation="softmax", target_lengths=lens)
    b = R.get_loss("ce")(x.transpose(0, 1), t.transpose(0, 1), activation="softmax", target_lengths=lens,
                         time_major=True)
    assert_close(a.value, b.value)
    # a label-sequence target (ctc, edit_distance) stays batch-major (B, S) with time_major, as RETURNN takes it;
    # B == S here, so a transposed target would give another (wrong) value silently
    xc = torch.randn(3, 8, 5).to(DEVICE)
    tc = torch.tensor([[1, 2, 3], [0, 1, 1], [2, 0, 3]]).to(DEVICE)
    ol, tl = torch.tensor([8, 7, 6]).to(DEVICE), torch.tensor([3, 2, 3]).to(DEVICE)
    for name, opts in (("ctc", {}), ("edit_distance", {"ctc_decode": True})):
        kw = dict(activation="softmax", output_lengths=ol, target_lengths=tl)
        a = R.get_loss(name, **opts)(xc, tc, **kw)
        b = R.get_loss(name, **opts)(xc.transpose(0, 1), tc, time_major=True, **kw)
        for u, v in ((a.value, b.value), (a.error, b.error)):
            if u is not None:
                assert_close(v, u)
    x2 = torch.randn(5, 4).to(DEVICE)
    t2 = torch.randint(0, 4, (5,)).to(DEVICE)
    r = R.get_loss("ce")(x2, t2, activation="softmax")
    assert r.norm_factor.item() == pytest.approx(1 / 5)
    assert_close(r.value, F.cross_entropy(x2, t2, reduction="sum"))


def test_returnn_base_options_scale_normalisation_custom_norms():
    x, t, lens = _batch()
    base = R.get_loss("ce")(x, t, activation="softmax", target_lengths=lens)
    r = R.get_loss("ce", scale=0.5, use_normalized_loss=True)(x, t, activation="softmax", target_lengths=lens)
    assert_close(r.objective, base.value * 0.5 / 11)
    assert R.get_loss("ce", scale=0.0)(x, t, activation="softmax", target_lengths=lens).objective is None
    r = R.get_loss("ce", custom_norm_factor=0.25)(x, t, activation="softmax", target_lengths=lens)
    assert r.norm_factor.item() == 0.25
    seen = {}

    def f(self):
        seen["self"] = self
        return 0.125

    loss = R.get_loss("ce", custom_norm_factor=f)
    assert loss(x, t, activation="softmax", target_lengths=lens).norm_factor.item() == 0.125 and seen["self"] is loss

    def returnn_style(self, output, layer, **kwargs):  # RETURNN calls f(self=, output=, layer=)
        seen.update(output=output, layer=layer, kwargs=kwargs)
        return 1.0 / output.shape[0]

    loss = R.get_loss("ce", custom_norm_factor=returnn_style)
    assert loss(x, t, activation="softmax", target_lengths=lens).norm_factor.item() == pytest.approx(1.0 / x.shape[0])
    assert seen["output"] is x and seen["layer"] is None and seen["kwargs"] == {}
    r = R.get_loss("ce", custom_inv_norm_factor=torch.tensor([2.0, 6.0], device=DEVICE))(x, t, activation="softmax",
                                                                                       target_lengths=lens)
    assert r.norm_factor.item() == pytest.approx(1 / 8)
    r = R.get_loss("ce", use_normalized_loss=False)(x, t, activation="softmax", target_lengths=lens)
    assert_close(r.objective, base.value)


def test_returnn_ce_dense_target_and_error_uses_target_argmax():
    x, q, lens = _batch(dense=True)
    r = R.get_loss("ce")(x, q, activation="softmax", target_lengths=lens)
    mask = torch.arange(6, device=DEVICE)[None, :] < lens[:, None]
    assert_close(r.value, cross_entropy(x[mask], q[mask], reduction="sum"))
    assert r.error.item() == ((x.argmax(-1) != q.argmax(-1)) & mask).sum().item()


def test_returnn_frame_error_with_softmax_takes_the_logits_argmax(backend):
    """RETURNN's Loss.get_error takes the argmax of output_before_softmax_flat (the logits) when the layer's
    activation is softmax: two top logits 1e-8 apart round to one fp32 softmax probability, whose argmax would
    be the lower class (checked against RETURNN 1.20261022: error 0 here). Without softmax: the output's."""
    x = torch.full((2, 4, 6), -5.0)
    x[..., 2] = 0.0
    x[..., 4] = 1e-8  # the largest logit, class 4; softmax gives classes 2 and 4 the same fp32 value
    assert torch.softmax(x, -1)[0, 0, 2] == torch.softmax(x, -1)[0, 0, 4]
    t = torch.full((2, 4), 4)
    t[1, 1] = 2  # one real error
    x, t = x.to(DEVICE), t.to(DEVICE)
    lens = torch.tensor([4, 3], device=DEVICE)
    exp = ((x.double().argmax(-1) != t) & (torch.arange(4, device=DEVICE) < lens[:, None])).sum().item()
    assert exp == 1
    with use_backend(backend):
        for name in ("ce", "mse"):
            r = R.get_loss(name)(x, t, activation="softmax", output_lengths=lens)
            assert r.error.item() == exp, name
        probs = torch.softmax(x, -1)  # a layer without activation: its output's argmax, ties to the lower class
        r = R.get_loss("ce", input_type="prob")(probs, t, output_lengths=lens)
        mask = torch.arange(4, device=DEVICE) < lens[:, None]
        assert r.error.item() == ((probs.argmax(-1) != t) & mask).sum().item() == 6
        scores = torch.tensor([[0.0, 5.0]], device=DEVICE)  # one batch entry, a beam of the two sequences
        re = R.get_loss("expected_loss", loss={"class": "ce"}, loss_kind="error")(x, t, activation="softmax",
                                                                                 beam_scores=scores,
                                                                                 output_lengths=lens)
    from tri_losses.misc import expected_loss
    errs = torch.tensor([[0.0, 1.0]], device=DEVICE)  # per-sequence errors by the logits' argmax
    assert_close(re.value, expected_loss(errs, scores, reduction="sum"))


def test_returnn_ce_dense_target_gradient_is_softmax_minus_q():
    # RETURNN's fused softmax_cross_entropy_with_logits: value -sum_k q_k log softmax_k, gradient softmax - q
    # (the op assumes sum(q) = 1; a target that does not sum to 1 shows it)
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    q = torch.rand(2, 4, 6, dtype=torch.float64)
    lens = torch.tensor([4, 2])
    mask = torch.arange(4)[None, :] < lens[:, None]
    xf = x.float().to(DEVICE).requires_grad_(True)
    r = R.get_loss("ce")(xf, q.float().to(DEVICE), activation="softmax", output_lengths=lens.to(DEVICE))
    assert r.value.item() == pytest.approx((-(q * x.log_softmax(-1)).sum(-1))[mask].sum().item(), rel=1e-5)
    up = torch.rand(())
    (g,) = torch.autograd.grad(r.objective * up, xf)
    exp = torch.where(mask[..., None], x.softmax(-1) - q, 0.0) * up.double()
    assert_close(g, exp, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
@pytest.mark.parametrize("opts,activation", [({"focal_loss_factor": 2.0}, "softmax"), ({}, None),
                                             ({"label_smoothing": 0.1}, None)])
def test_returnn_ce_class_ids_of_any_integer_dtype(dtype, opts, activation):
    z = torch.randn(2, 3, 5)
    x = z if activation else z.softmax(-1)
    y = torch.randint(0, 5, (2, 3))
    r = R.get_loss("ce", **opts)(x.to(DEVICE), y.to(dtype).to(DEVICE), activation=activation)
    ref = R.get_loss("ce", **opts)(x.to(DEVICE), y.to(DEVICE), activation=activation)  # int64 ids
    logp = z.log_softmax(-1)
    eps, gamma = opts.get("label_smoothing", 0.0), opts.get("focal_loss_factor", 0.0)
    q = torch.full((2, 3, 5), eps / 4)
    q.scatter_(-1, y[..., None], 1 - eps)
    kappa = -((1 - eps) * math.log(1 - eps) + eps * math.log(eps / 4 + 1e-20)) if eps else 0.0
    rows = (-(q * logp).sum(-1) - kappa) * (1 - logp.gather(-1, y[..., None])[..., 0].exp()) ** gamma
    assert_close(r.value, rows.sum(), atol=1e-5)
    assert r.value.item() == ref.value.item() and r.error.item() == ref.error.item()


def test_returnn_ce_gaussian_gradient_is_softmax_minus_q():
    x = torch.randn(4, 9).to(DEVICE).requires_grad_(True)
    y = torch.tensor([0, 3, 8, 5])
    r = R.get_loss("ce", label_smoothing=0.4, label_smoothing_gaussian=True)(x, y.to(DEVICE), activation="softmax")
    r.objective.backward()
    s = 0.6
    k = torch.arange(9.0)
    q = torch.exp(-((k[None, :] - y[:, None]) ** 2) / (2 * s * s)) / (s * math.sqrt(2 * math.pi))
    p = torch.softmax(x.detach().cpu(), -1)
    assert_close(x.grad, p - q, atol=1e-6, rtol=1e-5)
    # the true gradient of the value differs (sum(q) != 1): cross_entropy gives that one
    xt = x.detach().clone().requires_grad_(True)
    cross_entropy(xt, y.to(DEVICE), label_smoothing=0.4, label_smoothing_mode="gaussian", reduction="sum").backward()
    assert_close(xt.grad, q.sum(-1, keepdim=True) * p - q, atol=1e-6, rtol=1e-5)


def test_returnn_ce_focal_applies_to_shifted_loss_gradient_too():
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 4])
    eps, g = 0.2, 2.0
    r = R.get_loss("ce", label_smoothing=eps, focal_loss_factor=g)(x.float().to(DEVICE), y.to(DEVICE),
                                                                   activation="softmax")
    # float64 reference written from RETURNN's definition
    lp = torch.log_softmax(x, -1)
    q = torch.full((5, 6), eps / 5, dtype=torch.float64)
    q[torch.arange(5), y] = 1 - eps
    c, e = 1 - eps, eps / 5
    kappa = -(c * math.log(c) + 5 * e * math.log(e + 1e-20))
    rows = (-(q * lp).sum(-1) - kappa) * (1 - lp.exp()[torch.arange(5), y]) ** g
    assert r.value.item() == pytest.approx(rows.sum().item(), rel=1e-5)
    (gr,) = torch.autograd.grad(rows.sum(), x)
    xf = x.detach().float().to(DEVICE).requires_grad_(True)
    R.get_loss("ce", label_smoothing=eps, focal_loss_factor=g)(xf, y.to(DEVICE), activation="softmax").objective.backward()
    assert_close(xf.grad, gr, atol=1e-5, rtol=1e-4)


def test_returnn_ce_prob_input_safe_log_and_logits_type():
    p = torch.softmax(torch.randn(4, 5), -1)
    p[0, 2] = 0.0
    y = torch.tensor([2, 1, 0, 4])
    pr = p.clone().to(DEVICE).requires_grad_(True)
    r = R.get_loss("ce")(pr, y.to(DEVICE))  # no activation: output are probabilities
    assert r.value.item() == pytest.approx((-torch.log(torch.clamp(p[torch.arange(4), y], min=1e-20))).sum().item(),
                                           rel=1e-6)
    r.objective.backward()
    assert torch.isfinite(pr.grad).all() and pr.grad[0, 2].item() == pytest.approx(-1e20, rel=1e-5)
    x = torch.randn(4, 5)
    assert_close(R.get_loss("ce", input_type="logits")(x.to(DEVICE), y.to(DEVICE)).value,
                 F.cross_entropy(x, y, reduction="sum"))
    with pytest.raises(NotImplementedError, match="log_prob"):
        R.get_loss("ce", input_type="log_prob")(x.to(DEVICE), y.to(DEVICE))


@pytest.mark.parametrize("activation", ["exp", "sigmoid", "log_softmax"])
def test_returnn_ce_logits_input_type_takes_the_output_after_activation(activation):
    # RETURNN: input_type="logits" reads the layer output (after its activation) as the logits
    z = torch.randn(2, 3, 6, dtype=torch.float64)
    y = torch.randint(0, 6, (2, 3))
    act = {"exp": torch.exp, "sigmoid": torch.sigmoid, "log_softmax": lambda v: v.log_softmax(-1)}[activation]
    z64 = z.clone().requires_grad_(True)
    ref = F.cross_entropy(act(z64).reshape(-1, 6), y.reshape(-1), reduction="none")
    up = torch.rand(())
    (g_ref,) = torch.autograd.grad(ref.sum() * up, z64)
    zf = z.float().to(DEVICE).requires_grad_(True)
    r = R.get_loss("ce", input_type="logits")(zf, y.to(DEVICE), activation=activation)
    assert r.value.item() == pytest.approx(ref.sum().item(), rel=1e-5)
    (g,) = torch.autograd.grad(r.objective * up.float(), zf)
    assert_close(g, g_ref, atol=1e-6, rtol=1e-5)


def test_returnn_ce_safe_log_opts_eps_and_use_fake_grad():
    # RETURNN: -safe_log(p_y, **safe_log_opts); use_fake_grad=False clamps with tf.maximum (no gradient below
    # eps); label smoothing on probabilities uses safe_log's defaults (eps 1e-20, identity gradient)
    p = torch.softmax(torch.randn(4, 5, dtype=torch.float64), -1)
    p[0, 2], p[1, 3] = 1e-9, 1e-30
    y = torch.tensor([2, 3, 0, 4])
    up = torch.rand((), dtype=torch.float64)
    for opts, smooth in (({"eps": 1e-6}, 0.0), ({"eps": 1e-6, "use_fake_grad": False}, 0.0),
                         ({"eps": 1e-6, "use_fake_grad": False}, 0.2)):
        p64 = p.clone().requires_grad_(True)
        if smooth:
            q = torch.full((4, 5), smooth / 4, dtype=torch.float64)
            q[torch.arange(4), y] = 1 - smooth
            c, e = 1 - smooth, smooth / 4
            kappa = -(c * math.log(c) + 4 * e * math.log(e + 1e-20))
            v = p64.clamp(min=1e-20).detach()
            ref = (-(q * (v.log() + (p64 - p64.detach()) / v)).sum(-1) - kappa).sum()
        elif opts.get("use_fake_grad", True):
            v = p64[torch.arange(4), y]
            vc = v.clamp(min=opts["eps"]).detach()
            ref = -(vc.log() + (v - v.detach()) / vc).sum()
        else:
            ref = -p64[torch.arange(4), y].clamp(min=opts["eps"]).log().sum()
        (g_ref,) = torch.autograd.grad(ref * up, p64)
        pf = p.float().to(DEVICE).requires_grad_(True)
        r = R.get_loss("ce", safe_log_opts=opts, label_smoothing=smooth)(pf, y.to(DEVICE))
        assert r.value.item() == pytest.approx(ref.item(), rel=1e-5)
        (g,) = torch.autograd.grad(r.objective * up.float(), pf)
        assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


def test_returnn_ce_fake_upper_bound_identity_gradient():
    x = torch.randn(6, 5) * 3
    y = torch.randint(0, 5, (6,))
    rows = F.cross_entropy(x, y, reduction="none")
    U = rows.median().item()
    xr = x.clone().to(DEVICE).requires_grad_(True)
    r = R.get_loss("ce", fake_upper_bound=U)(xr, y.to(DEVICE), activation="softmax")
    assert r.value.item() == pytest.approx(torch.clamp(rows, max=U).sum().item(), rel=1e-5)
    r.objective.backward()
    xe = x.clone().requires_grad_(True)
    F.cross_entropy(xe, y, reduction="sum").backward()
    assert_close(xr.grad, xe.grad)


def test_returnn_ce_minus_inf_logit_under_target_mass_is_inf_as_tf():
    """TF's softmax_cross_entropy_with_logits (RETURNN's op) gives +inf where a -inf logit meets target mass;
    the registry's gradient carrier (lse - q.x) was inf - inf = NaN there, for a dense target and for a sparse
    one with Gaussian smoothing. The other frames keep RETURNN's gradient softmax - q."""
    x = torch.tensor([[[-math.inf, 0.0, 1.0], [0.5, 0.0, 1.0]]], device=DEVICE)
    q = torch.tensor([[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]], device=DEVICE)
    xr = x.clone().requires_grad_(True)
    r = R.get_loss("ce")(xr, q, activation="softmax", output_lengths=torch.tensor([2], device=DEVICE))
    assert r.value.item() == math.inf
    (g,) = torch.autograd.grad(r.objective, xr)
    assert_close(g[0, 1], torch.softmax(x[0, 1], -1) - q[0, 1])
    assert torch.isfinite(g).all()
    r = R.get_loss("ce", label_smoothing=0.1, label_smoothing_gaussian=True)(
        x.clone().requires_grad_(True), torch.tensor([[1, 2]], device=DEVICE), activation="softmax",
        output_lengths=torch.tensor([2], device=DEVICE))
    assert r.value.item() == math.inf


def test_returnn_ce_dense_target_on_probabilities_clips_each_term():
    """A dense target on a non-softmax layer (RETURNN's unfused path): fake_upper_bound clips each term
    q_c * log p_c (<= 0) before the sum and its sign, with an identity gradient: a bound >= 0 changes nothing,
    a negative one lifts the terms above it; float64 reference."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    q = torch.softmax(torch.randn(2, 4, 3, generator=g, dtype=torch.float64), -1)
    ol = torch.tensor([4, 3])
    valid = (torch.arange(4)[None, :] < ol[:, None])[..., None]
    terms = q * F.logsigmoid(x)
    grad = torch.where(valid, -q * (1 - torch.sigmoid(x)), 0.0)  # d/dx of -sum q log sigmoid(x), unclipped
    for bound in (1.0, 0.0, -0.3):
        xr = x.clone().to(DEVICE).requires_grad_(True)
        r = R.get_loss("ce", fake_upper_bound=bound)(xr, q.to(DEVICE), activation="sigmoid",
                                                     output_lengths=ol.to(DEVICE))
        want = -torch.where(valid, torch.clamp(terms, max=bound), 0.0).sum()
        assert r.value.item() == pytest.approx(want.item(), rel=1e-6)
        if bound < 0:
            assert r.value.item() > -torch.where(valid, terms, 0.0).sum().item() + 1e-3  # the clip lifted it
        r.value.backward()
        assert_close(xr.grad, grad, atol=1e-6, rtol=1e-5)


def test_returnn_ctc_opts_as_the_op_returnn_passes_them_to():
    """ctc_opts on the default (TF) path: preprocess_collapse_repeated collapses the targets of the loss (not of
    the error), ctc_merge_repeated=False is the topology without label loops (label_loop=False),
    ignore_longer_outputs_than_inputs gives a target longer than its input loss 0 and no gradient; on the
    native path label_loop / ctc_merge_repeated; other keys, or any with use_viterbi, raise."""
    from tri_losses.ctc import ctc_loss
    x = torch.randn(3, 6, 4).to(DEVICE)
    tg = torch.tensor([[1, 1, 2, 0], [0, 2, 2, 1], [2, 0, 1, 1]], device=DEVICE)
    ol, tl_ = torch.tensor([6, 5, 3], device=DEVICE), torch.tensor([3, 4, 4], device=DEVICE)
    kw = dict(activation="softmax", output_lengths=ol, target_lengths=tl_)

    def ref(t, lens, **o):
        return ctc_loss(x, t, ol, lens, blank=3, reduction="none", input_type="logits", batch_first=True, **o)
    r = R.get_loss("ctc", ctc_opts=dict(ctc_merge_repeated=False))(x, tg, **kw)
    assert_close(r.value, ref(tg, tl_, label_loop=False).sum())
    ct = torch.tensor([[1, 2, 0, 0], [0, 2, 1, 0], [2, 0, 1, 0]], device=DEVICE)
    cl = torch.tensor([2, 3, 3], device=DEVICE)
    r = R.get_loss("ctc", ctc_opts=dict(preprocess_collapse_repeated=True))(x, tg, **kw)
    assert_close(r.value, ref(ct, cl).sum())
    plain = R.get_loss("ctc")(x, tg, **kw)
    assert r.error.item() == plain.error.item()  # the error's labels are not collapsed
    xr = x.clone().requires_grad_(True)
    r = R.get_loss("ctc", ctc_opts=dict(ignore_longer_outputs_than_inputs=True))(xr, tg, **dict(kw))
    lens_ok = ref(tg, tl_)[:2]
    assert_close(r.value, lens_ok.sum())  # the third (4 labels in 3 frames) counts 0
    r.value.backward()
    assert bool((xr.grad[2] == 0).all()) and bool((xr.grad[:2].abs().sum((1, 2)) > 0).all())
    # TF skips on the label count it is given, before its own collapse: [1, 1, 1] in 2 frames is skipped
    xr = x[:2].clone().requires_grad_(True)
    r = R.get_loss("ctc", ctc_opts=dict(preprocess_collapse_repeated=True, ignore_longer_outputs_than_inputs=True))(
        xr, torch.tensor([[1, 1, 1], [0, 2, 1]], device=DEVICE), activation="softmax",
        output_lengths=torch.tensor([2, 6], device=DEVICE), target_lengths=torch.tensor([3, 3], device=DEVICE))
    r.value.backward()
    assert bool((xr.grad[0] == 0).all()) and float(xr.grad[1].abs().sum()) > 0
    r = R.get_loss("ctc", use_native=True, beam_width=1, ctc_opts=dict(label_loop=False))(
        x[:2], tg[:2], activation="softmax", output_lengths=ol[:2], target_lengths=tl_[:2])
    assert_close(r.value, ref(tg, tl_, label_loop=False)[:2].sum())
    for opts, extra in ((dict(ctc_merge_repeated=False), dict(use_viterbi=True)),
                        (dict(ignore_longer_outputs_than_inputs=True), dict(use_native=True, beam_width=1)),
                        (dict(label_loop=False, ctc_merge_repeated=False), dict(use_native=True, beam_width=1)),
                        (dict(blank_index=0), {})):
        with pytest.raises(ValueError, match="ctc: ctc_opts"):
            R.get_loss("ctc", ctc_opts=opts, **extra)(x, tg, **kw)
    # RETURNN asserts "use beam_width=1 with use_native" where it builds the error (its default width is 100)
    for bw in (100, 2):
        with pytest.raises(ValueError, match="beam_width: use_native=True .* got " + str(bw)):
            R.get_loss("ctc", use_native=True, **({} if bw == 100 else dict(beam_width=bw)))


def test_returnn_generic_ce_exp_is_softmax_ce_and_gradient_ignores_scale():
    x = torch.randn(2, 3, 6).to(DEVICE).requires_grad_(True)
    t = torch.randint(0, 6, (2, 3)).to(DEVICE)
    r = R.get_loss("generic_ce", scale=5.0, use_normalized_loss=True)(x, t, activation="exp")
    assert_close(r.value, F.cross_entropy(x.reshape(-1, 6), t.reshape(-1), reduction="sum"))
    r.objective.backward()
    onehot = F.one_hot(t, 6).float()
    assert_close(x.grad, torch.softmax(x.detach(), -1) - onehot, atol=1e-6, rtol=1e-5)


def test_returnn_as_is_search_score_sprint():
    out = torch.randn(3, 4, 2).to(DEVICE)
    lens = torch.tensor([4, 2, 0], device=DEVICE)
    mask = torch.arange(4, device=DEVICE)[None, :] < lens[:, None]
    r = R.get_loss("as_is")(out, output_lengths=lens)
    assert_close(r.value, out[mask].sum())
    r = R.get_loss("as_is", as_error=True)(out, output_lengths=lens)
    assert r.value is None and r.objective is None
    assert_close(r.error, out[mask].sum())
    scores = torch.randn(2, 3).to(DEVICE)
    r = R.get_loss("search_score")(torch.zeros(2, 1, device=DEVICE), beam_scores=scores)
    assert_close(r.value, -scores.sum())
    with pytest.raises(NotImplementedError, match="RASR/Sprint"):
        R.get_loss("sprint")(torch.zeros(2, 3))
    with pytest.raises(NotImplementedError, match="sprint_opts"):
        R.get_loss("fast_bw", sprint_opts={"a": 1})(torch.zeros(2, 3, 4))


def test_returnn_accumulator_per_epoch_average():
    acc = R.Accumulator()
    loss = R.get_loss("ce")
    tot_v, tot_n = 0.0, 0
    for _ in range(3):
        x, t, lens = _batch()
        r = loss(x, t, activation="softmax", target_lengths=lens)
        acc.add(r)
        tot_v += r.value.item()
        tot_n += int(lens.sum())
    assert acc.value.item() == pytest.approx(tot_v / tot_n, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# classes over the other families: value = sum of the functional op over valid frames
# ------------------------------------------------------------------------------------------------
def test_returnn_ctc_blank_last_value_error_and_infeasible_gradient():
    from tri_losses.ctc import ctc_greedy_decode, ctc_loss
    from tri_losses.text import edit_distance
    B, T, C = 3, 8, 5
    x = torch.randn(B, T, C).to(DEVICE).requires_grad_(True)
    tg = torch.tensor([[0, 1, 2], [3, 3, 0], [1, 1, 1]], device=DEVICE)
    out_len = torch.tensor([8, 6, 3], device=DEVICE)  # seq 2 ("1 1 1" needs 5 frames) is infeasible
    tgt_len = torch.tensor([3, 2, 3], device=DEVICE)
    r = R.get_loss("ctc")(x, tg, activation="softmax", output_lengths=out_len, target_lengths=tgt_len)
    per = ctc_loss(x, tg, out_len, tgt_len, blank=C - 1, reduction="none", input_type="logits", batch_first=True)
    assert torch.isinf(r.value) and torch.isinf(per[2])
    assert_close(per[:2].sum(), R.get_loss("ctc")(x[:2], tg[:2], activation="softmax", output_lengths=out_len[:2],
                                                  target_lengths=tgt_len[:2]).value)
    # the gradient of the feasible sequences: float64 PyTorch CTC through log_softmax
    x64 = x.detach().cpu().double().requires_grad_()
    F.ctc_loss(x64[:2].log_softmax(-1).transpose(0, 1), tg[:2].cpu(), out_len[:2].cpu(), tgt_len[:2].cpu(),
               blank=C - 1, reduction="sum").backward()
    nat = R.get_loss("ctc", use_native=True, beam_width=1)(x, tg, activation="softmax", output_lengths=out_len,
                                             target_lengths=tgt_len)
    assert_close(nat.value, per[:2].sum())  # native: infeasible -> 0
    for res in (r, nat):  # TF path (loss +inf) and native (0): the same gradient
        (g,) = torch.autograd.grad(res.objective, x)
        assert_close(g[:2], x64.grad[:2], atol=1e-5, rtol=1e-4)
        # infeasible sequence: gradient softmax on its valid frames (RETURNN), 0 on padding
        assert_close(g[2, :3], torch.softmax(x.detach()[2, :3], -1), atol=1e-6)
        assert (g[2, 3:] == 0).all()
    hyp, hl = ctc_greedy_decode(x.detach(), out_len, blank=C - 1, batch_first=True)
    assert r.error.item() == edit_distance(hyp, hl, tg, tgt_len).sum().item()
    assert r.norm_factor.item() == pytest.approx(1 / 8)
    # use_viterbi: RETURNN's fast_viterbi fills an infeasible sequence's alignment with class 0, so its
    # gradient there is the CE gradient softmax - onehot(0) on the valid frames, and the loss +inf
    vit = R.get_loss("ctc", use_viterbi=True)(x, tg, activation="softmax", output_lengths=out_len,
                                              target_lengths=tgt_len)
    assert torch.isinf(vit.value)
    (g,) = torch.autograd.grad(vit.objective, x)
    assert_close(g[2, :3], torch.softmax(x.detach()[2, :3], -1) - F.one_hot(torch.zeros(3, dtype=torch.long), C).to(g),
                 atol=1e-6)
    assert (g[2, 3:] == 0).all()


def test_returnn_ctc_options_collapse_clip_viterbi():
    from tri_losses.ctc import ctc_loss
    x = torch.randn(2, 6, 4).to(DEVICE)
    tg = torch.tensor([[1, 1, 2, 2], [0, 1, 0, 0]], device=DEVICE)
    ol, tl_ = torch.tensor([6, 3], device=DEVICE), torch.tensor([4, 4], device=DEVICE)
    r = R.get_loss("ctc", target_collapse_repeated=True, auto_clip_target_len=True)(
        x, tg, activation="softmax", output_lengths=ol, target_lengths=tl_)
    # TF path: collapsed [1, 2] (len 2) and [0, 1, 0] (len 3), clipped to out_len - 1 = 2: [0, 1]
    exp = ctc_loss(x, torch.tensor([[1, 2, 0], [0, 1, 0]], device=DEVICE), ol, torch.tensor([2, 2], device=DEVICE),
                   blank=3, reduction="sum", input_type="logits", batch_first=True)
    assert_close(r.value, exp)
    # use_viterbi (and use_native) take the targets as given: no collapse, no clip
    ol2 = torch.tensor([6, 6], device=DEVICE)
    tg2 = torch.tensor([[1, 1, 2, 0], [0, 1, 0, 2]], device=DEVICE)
    tl2 = torch.tensor([3, 4], device=DEVICE)
    r = R.get_loss("ctc", target_collapse_repeated=True, auto_clip_target_len=True, use_viterbi=True)(
        x, tg2, activation="softmax", output_lengths=ol2, target_lengths=tl2)
    exp = ctc_loss(x, tg2, ol2, tl2, blank=3, reduction="sum", input_type="logits", batch_first=True,
                   max_approx=True)
    assert_close(r.value, exp)
    if DEVICE.type == "cpu":  # checked where the lengths are read on the host (with a CUDA output they are not)
        with pytest.raises(ValueError, match="empty targets"):
            R.get_loss("ctc")(x, tg, activation="softmax", output_lengths=ol, target_lengths=torch.tensor([0, 2]))


def test_returnn_ctc_clips_the_target_length_before_collapsing():
    # RETURNN's sparse_labels: the length is clipped to max(out_len - 1, 0) first, then repeats collapse within it
    x = torch.randn(2, 5, 5, dtype=torch.float64)
    tg = torch.tensor([[1, 1, 2, 3], [2, 0, 0, 1]])
    ol, tl_ = torch.tensor([3, 5]), torch.tensor([4, 4])
    r = R.get_loss("ctc", target_collapse_repeated=True, auto_clip_target_len=True)(
        x.float().to(DEVICE), tg.to(DEVICE), activation="softmax", output_lengths=ol.to(DEVICE),
        target_lengths=tl_.to(DEVICE))
    # clipped [1, 1] -> [1]; [2, 0, 0, 1] -> [2, 0, 1]
    exp = F.ctc_loss(x.log_softmax(-1).transpose(0, 1), torch.tensor([[1, 0, 0], [2, 0, 1]]), ol,
                     torch.tensor([1, 3]), blank=4, reduction="sum")
    assert r.value.item() == pytest.approx(exp.item(), rel=1e-5)
    # the error labels are the same targets: a greedy decoding equal to them counts 0
    z = torch.full((2, 5, 5), -5.0)
    for b, path in enumerate([[1, 4, 4], [2, 4, 0, 4, 1]]):
        for t, c in enumerate(path):
            z[b, t, c] = 5.0
    r = R.get_loss("ctc", target_collapse_repeated=True, auto_clip_target_len=True)(
        z.to(DEVICE), tg.to(DEVICE), activation="softmax", output_lengths=ol.to(DEVICE), target_lengths=tl_.to(DEVICE))
    assert r.error.item() == 0


@pytest.mark.parametrize("name", ["bin_ce", "sse_sigmoid", "mse", "l1", "mean_l1"])
def test_returnn_elementwise_classes_sum_valid_frames(name):
    x = torch.randn(2, 5, 6).to(DEVICE).requires_grad_(True)
    t = (torch.rand(2, 5, 6) if name != "mse" else torch.randn(2, 5, 6)).to(DEVICE)
    lens = torch.tensor([5, 2], device=DEVICE)
    mask = torch.arange(5, device=DEVICE)[None, :] < lens[:, None]
    bce = name in ("bin_ce", "sse_sigmoid")  # RETURNN: the layer output is the logits (no activation)
    r = R.get_loss(name)(x, t, output_lengths=lens)
    xv, tv = x[mask], t[mask]
    if bce:
        exp = torch.nn.functional.binary_cross_entropy_with_logits(xv, tv, reduction="none").mean(-1).sum()
        err = ((xv > 0) != (tv > 0.5)).float().mean(-1).sum()
        assert r.error.item() == pytest.approx(err.item())
    elif name == "mse":
        exp = ((xv - tv) ** 2).mean(-1).sum()
    elif name == "l1":
        exp = (xv - tv).abs().sum(-1).sum()
    else:
        exp = (xv - tv).abs().mean(-1).sum()
    assert_close(r.value, exp)
    r.objective.backward()
    assert (x.grad[1, 2:] == 0).all()


def test_returnn_mse_sparse_target_is_one_hot_and_bin_ce_pos_weight():
    x = torch.randn(2, 3, 4).to(DEVICE)
    y = torch.randint(0, 4, (2, 3)).to(DEVICE)
    r = R.get_loss("mse")(x, y)
    assert_close(r.value, ((x - F.one_hot(y, 4).float()) ** 2).mean(-1).sum())
    t = torch.rand(2, 3, 4).to(DEVICE)
    r = R.get_loss("bin_ce", pos_weight=2.0)(x, t)
    exp = F.binary_cross_entropy_with_logits(x, t, pos_weight=torch.full((4,), 2.0, device=DEVICE),
                                             reduction="none").mean(-1).sum()
    assert_close(r.value, exp)
    # with a sigmoid activation RETURNN still takes the layer's output (now sigmoid(x)) as the logits
    r = R.get_loss("bin_ce")(x, t, activation="sigmoid")
    assert_close(r.value, F.binary_cross_entropy_with_logits(x.sigmoid(), t, reduction="none").mean(-1).sum())


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_returnn_bin_ce_takes_an_integer_dense_target(dtype):
    # RETURNN casts bin_ce's target to the output's dtype: 0/1 integer (or bool) labels of the output's shape
    x = torch.randn(2, 3, 4).to(DEVICE).requires_grad_(True)
    t = torch.randint(0, 2, (2, 3, 4)).to(DEVICE)
    lens = torch.tensor([3, 2], device=DEVICE)
    r = R.get_loss("bin_ce")(x, t.to(dtype), output_lengths=lens)
    mask = (torch.arange(3, device=DEVICE)[None, :] < lens[:, None])
    el = F.binary_cross_entropy_with_logits(x, t.float(), reduction="none").mean(-1)
    assert_close(r.value, el[mask].sum())
    assert r.error.item() == pytest.approx((((x > 0) != (t > 0)).float().mean(-1))[mask].sum().item())
    up = torch.rand(())
    (g,) = torch.autograd.grad(r.objective * up, x)
    (g_ref,) = torch.autograd.grad(el[mask].sum() * up, x)
    assert_close(g, g_ref)


def test_returnn_metrics_edit_distance_and_bleu():
    from tri_losses.text import bleu
    hyp = torch.tensor([[1, 2, 3, 3, 4, 5], [1, 2, 0, 0, 0, 0]], device=DEVICE)
    ref = torch.tensor([[1, 2, 3, 4, 5], [3, 0, 0, 0, 0]], device=DEVICE)
    r = R.get_loss("edit_distance")(hyp, ref, output_lengths=[6, 2], target_lengths=[5, 1])
    assert r.value is None and r.objective is None and r.error.item() == 3
    assert r.norm_factor.item() == pytest.approx(1 / 6)
    r = R.get_loss("bleu")(hyp, ref, output_lengths=[6, 2], target_lengths=[5, 1])
    exp = bleu(hyp, [6, 2], ref, [5, 1]).sum()
    assert r.value is None and r.error.item() == pytest.approx(-exp.item())
    dense = torch.randn(2, 6, 4) * 3  # logits of a softmax layer: decoded by the beam search (width 100)
    tgt = torch.tensor([[1, 2, 0], [2, 2, 1]])
    r = R.get_loss("edit_distance", ctc_decode=True)(dense.to(DEVICE), tgt.to(DEVICE), activation="softmax",
                                                     output_lengths=[6, 4], target_lengths=[2, 3])
    exp = sum(ref_cat.levenshtein(ref_cat.tf_beam_search(dense[b, :n].tolist(), 3, 100), tgt[b, :m].tolist())
              for b, (n, m) in enumerate([(6, 2), (4, 3)]))
    assert r.value is None and r.error.item() == exp


def test_returnn_deep_clustering_triplet_expected_loss():
    emb = torch.randn(2, 4, 3 * 5)
    tgt = F.one_hot(torch.randint(0, 2, (2, 4, 3)), 2).float().reshape(2, 4, 6)
    r = R.get_loss("deep_clustering", embedding_dimension=5, nr_of_sources=2)(emb.to(DEVICE), tgt.to(DEVICE),
                                                                             output_lengths=[4, 2])
    exp = sum(ref_cat.deep_clustering(emb[b, :n].reshape(-1, 5), tgt[b, :n].reshape(-1, 2)) for b, n in enumerate([4, 2]))
    assert_close(r.value, exp)
    assert r.error is None
    out = torch.tensor([[1, 0, 1, 0.1, 0, 1], [0, 1, 0.2, 1, 1, 0]], device=DEVICE)
    r = R.get_loss("triplet_loss", margin=0.5, custom_norm_factor=3.0)(out, torch.tensor([[1, 1, 2], [2, 2, 1]],
                                                                                         device=DEVICE))
    assert r.value.item() == pytest.approx(0.0487643, abs=1e-6) and r.norm_factor.item() == pytest.approx(1 / 18)
    # expected loss: inner CE per (batch*beam) sequence
    B, K, T, V = 2, 3, 4, 5
    x = torch.randn(B * K, T, V).to(DEVICE)
    y = torch.randint(0, V, (B * K, T)).to(DEVICE)
    scores = torch.randn(B, K).to(DEVICE)
    r = R.get_loss("expected_loss", loss={"class": "ce"})(x, y, activation="softmax", beam_scores=scores)
    per = F.cross_entropy(x.reshape(-1, V), y.reshape(-1), reduction="none").reshape(B, K, T).sum(-1)
    from tri_losses.misc import expected_loss
    assert_close(r.value, expected_loss(per, scores, reduction="sum"))
    re = R.get_loss("expected_loss", loss={"class": "ce"}, loss_kind="error")(x, y, activation="softmax",
                                                                             beam_scores=scores)
    errs = (x.argmax(-1) != y).float().sum(-1).reshape(B, K)
    assert_close(re.value, expected_loss(errs, scores, reduction="sum"))


def test_returnn_via_layer_error_signal_and_align():
    x = torch.randn(2, 3, 4).to(DEVICE).requires_grad_(True)
    sig = torch.randn(2, 3, 4).to(DEVICE)
    lens = torch.tensor([3, 1], device=DEVICE)
    r = R.get_loss("via_layer")(x, error_signal=sig, output_lengths=lens,
                                loss_value=torch.tensor([1.5, 2.0], device=DEVICE))
    assert r.value.item() == pytest.approx(3.5)
    r.objective.backward()
    exp = sig.clone()
    exp[1, 1:] = 0
    assert_close(x.grad, exp)
    x.grad = None
    align = torch.softmax(torch.randn(2, 3, 4), -1).to(DEVICE)
    r = R.get_loss("via_layer", loss_wrt_to_act_in="softmax")(x, activation="softmax", align=align,
                                                             output_lengths=lens)
    r.objective.backward()
    exp = torch.softmax(x.detach(), -1) - align
    exp[1, 1:] = 0
    assert_close(x.grad, exp)
    with pytest.raises(ValueError, match="loss_wrt_to_act_in"):
        R.get_loss("via_layer", loss_wrt_to_act_in="sigmoid")(x, activation="softmax", align=align)


def test_returnn_via_layer_time_major_and_shapes():
    """With time_major the error signal and the alignment are time-major like the output (RETURNN re-lays them
    out to the output's layout): the gradient equals the batch-major call's, transposed, also when T == B."""
    T, B, F = 3, 3, 4
    lens = torch.tensor([3, 1, 2], device=DEVICE)
    for kind in ("error_signal", "align"):
        x = torch.randn(B, T, F, dtype=torch.float64).to(DEVICE)
        sig = torch.randn(B, T, F, dtype=torch.float64).to(DEVICE)
        if kind == "align":
            sig = sig.softmax(-1)
        grads = []
        for tm in (False, True):
            xi = (x.transpose(0, 1) if tm else x).clone().requires_grad_(True)
            r = R.get_loss("via_layer", loss_wrt_to_act_in=True)(
                xi, activation="softmax", output_lengths=lens, time_major=tm, loss_value=torch.ones(B, device=DEVICE),
                **{kind: sig.transpose(0, 1) if tm else sig})
            r.objective.backward()
            grads.append(xi.grad.transpose(0, 1) if tm else xi.grad)
        exp = sig if kind == "error_signal" else x.softmax(-1) - sig
        exp = torch.where((torch.arange(T, device=DEVICE)[None, :] < lens[:, None])[..., None], exp, 0.0)
        assert_close(grads[0], exp)
        assert_close(grads[1], exp)
    x = torch.randn(2, 3, F, device=DEVICE)
    with pytest.raises(ValueError, match=r"error_signal: expected the output's shape \(2, 3, 4\)"):
        R.get_loss("via_layer")(x, error_signal=torch.randn(3, 2, F, device=DEVICE), output_lengths=[3, 1])
    with pytest.raises(ValueError, match="loss_wrt_to_act_in.*activation=None"):
        R.get_loss("via_layer", loss_wrt_to_act_in=True)(x, error_signal=torch.randn(2, 3, F, device=DEVICE))


def test_returnn_two_dim_output_with_lengths_has_a_time_axis():
    """A float (B, T) output with output_lengths (a layer's per-frame values, RETURNN's time axis without a feature
    dim): masked by the lengths, norm factor 1 / sum(lengths), as RETURNN; the same as the (B, T, 1) call;
    time-major (T, B) too; a float (B, T) target is frame-wise."""
    out = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64, device=DEVICE)
    r = R.get_loss("as_is")(out, output_lengths=[3, 1])
    assert r.value.item() == 10.0 and r.norm_factor.item() == 0.25
    r = R.get_loss("as_is")(out.t(), output_lengths=[3, 1], time_major=True)
    assert r.value.item() == 10.0 and r.norm_factor.item() == 0.25
    r = R.get_loss("as_is")(out)  # no lengths: (B, F), no time axis
    assert r.value.item() == 21.0 and r.norm_factor.item() == 0.5
    x = torch.randn(2, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    t = torch.randn(2, 5, dtype=torch.float64, device=DEVICE)
    lens = [5, 2]
    mask = torch.arange(5, device=DEVICE)[None, :] < torch.tensor(lens, device=DEVICE)[:, None]
    r = R.get_loss("mse")(x, t, output_lengths=lens)
    assert_close(r.value, ((x - t) ** 2)[mask].sum())
    assert r.norm_factor.item() == pytest.approx(1 / 7)
    r.value.backward()
    assert_close(x.grad, torch.where(mask, 2 * (x - t), 0.0).detach())
    r3 = R.get_loss("mse")(x[..., None], t[..., None], output_lengths=lens)
    assert_close(r3.value, r.value)
    # (B, F) stays (B, F) when lengths are passed along: a (B,) class-id target, a loss without time axis
    x = torch.randn(2, 3, dtype=torch.float64, device=DEVICE)
    ids = torch.tensor([0, 2], device=DEVICE)
    for name in ("ce", "mse"):
        with_lens = R.get_loss(name)(x, ids, activation="softmax", output_lengths=[3, 3])
        without = R.get_loss(name)(x, ids, activation="softmax")
        assert_close(with_lens.value, without.value)
        assert with_lens.norm_factor.item() == without.norm_factor.item() == 0.5
    emb, tgt = torch.randn(2, 6, device=DEVICE), torch.tensor([[1, 1, 2], [2, 2, 1]], device=DEVICE)
    assert_close(R.get_loss("triplet_loss", margin=0.5)(emb, tgt, output_lengths=[3, 3]).value,
                 R.get_loss("triplet_loss", margin=0.5)(emb, tgt).value)
    sc = torch.randn(2, 3, device=DEVICE)
    r = R.get_loss("search_score")(torch.zeros(2, 3, device=DEVICE), beam_scores=sc, output_lengths=[3, 1])
    assert r.norm_factor.item() == 0.5
    # bin_ce on (B, T) frames with an integer 0/1 target of the output's shape: per-frame, masked
    z = torch.randn(2, 4, dtype=torch.float64, device=DEVICE)
    y = torch.randint(0, 2, (2, 4), device=DEVICE)
    r = R.get_loss("bin_ce")(z, y, output_lengths=[4, 2])
    r3 = R.get_loss("bin_ce")(z[..., None], y[..., None], output_lengths=[4, 2])
    assert_close(r.value, r3.value)
    assert r.norm_factor.item() == pytest.approx(1 / 6)


def test_returnn_sampling_loss_and_fast_bw():
    from tri_losses.automata import ctc_fsa, fsa_loss
    from tri_losses.samplers import AllCandidateSampler
    B, T, D, V = 2, 3, 6, 12
    h = torch.randn(B, T, D).to(DEVICE).requires_grad_(True)
    W = torch.randn(V, D).to(DEVICE).requires_grad_(True)
    y = torch.randint(0, V, (B, T)).to(DEVICE)
    lens = torch.tensor([3, 2], device=DEVICE)
    mask = torch.arange(T, device=DEVICE)[None, :] < lens[:, None]
    loss = R.get_loss("sampling_loss", num_sampled=V, sampler=AllCandidateSampler(V))
    r = loss(torch.zeros(B, T, V, device=DEVICE), y, target_lengths=lens, linear_input=h, linear_weight=W)
    # all-candidate sampler with hits removed: the full softmax CE, summed over valid frames
    exp = F.cross_entropy((h @ W.t())[mask], y[mask], reduction="sum")
    assert_close(r.value, exp)
    r.objective.backward()
    assert (h.grad[1, 2] == 0).all()
    ev = R.get_loss("sampling_loss", num_sampled=3, use_full_softmax=True)(torch.zeros(B, T, V, device=DEVICE), y,
                                                                           target_lengths=lens, train=False,
                                                                           linear_input=h, linear_weight=W)
    assert_close(ev.value, exp)
    # fast_bw over a CTC automaton (blank last) = the fsa_loss value; tdp_scale scales the weights
    x = torch.randn(B, 5, 4).to(DEVICE)
    fsa = ctc_fsa(torch.tensor([[0, 1], [2, 2]], device=DEVICE), [2, 1], 3)
    r = R.get_loss("fast_bw")(x, activation="softmax", output_lengths=[5, 4], fsa=fsa)
    assert_close(r.value, fsa_loss(x.transpose(0, 1), [5, 4], fsa))
    # tdp_scale: the weights times it; 0 replaces them by zeros (RETURNN: a +inf, forbidden, edge becomes allowed)
    w = fsa[1].clone()
    w[0] = float("inf")  # forbid the first edge
    w[1] = 0.7
    ff = (fsa[0], w, fsa[2], fsa[3])
    for scale in (0.5, 0.0):
        r = R.get_loss("fast_bw", tdp_scale=scale)(x, activation="softmax", output_lengths=[5, 4], fsa=ff)
        ws = torch.zeros_like(w) if scale == 0 else w * scale
        assert_close(r.value, fsa_loss(x.transpose(0, 1), [5, 4], (fsa[0], ws, fsa[2], fsa[3])))
        if scale == 0:  # the forbidden edge is allowed again: another value than with it forbidden
            assert not torch.allclose(r.value, fsa_loss(x.transpose(0, 1), [5, 4], ff))


def test_returnn_sampling_loss_takes_tf_sampler_args_seed_and_name():
    """RETURNN passes sampler_args to TF's candidate samplers, which take an op-level ``seed`` (and ``name``): a
    seeded loss draws the same samples as an equal seeded one (the same losses over two calls, and different
    ones from call to call, as a TF op's stream), with every sampler; it raised TypeError for seed before."""
    B, T, D, V = 2, 3, 5, 40
    h = torch.randn(B, T, D, device=DEVICE)
    W = torch.randn(V, D, device=DEVICE)
    y = torch.randint(0, V, (B, T), device=DEVICE)
    lens = torch.tensor([3, 2], device=DEVICE)
    for sampler, extra in (("log_uniform", {}), ("uniform", {}), ("fixed_unigram", {"unigrams": [1.0 + i for i in range(V)]}),
                           ("learned_unigram", {})):
        vals = []
        for seed in (42, 42, 7):
            loss = R.get_loss("sampling_loss", num_sampled=4, sampler=sampler,
                              sampler_args=dict(extra, seed=seed, name="sampler"))
            vals.append([float(loss(torch.zeros(B, T, V, device=DEVICE), y, target_lengths=lens, linear_input=h,
                                    linear_weight=W).value) for _ in range(2)])
        assert vals[0] == vals[1], sampler
        assert vals[0][0] != vals[0][1] and vals[0] != vals[2], sampler
    with pytest.raises(TypeError, match=r"sampler_args\['seed'\]: expected an int"):
        R.get_loss("sampling_loss", num_sampled=4, sampler_args={"seed": 1.5})(
            torch.zeros(B, T, V, device=DEVICE), y, target_lengths=lens, linear_input=h, linear_weight=W)


def test_returnn_sampling_loss_full_softmax_in_training_and_learned_unigram():
    # RETURNN: use_full_softmax=True computes the full softmax CE whatever the train flag
    B, T, D, V = 2, 3, 5, 9
    h = torch.randn(B, T, D).to(DEVICE).requires_grad_(True)
    W = torch.randn(V, D).to(DEVICE).requires_grad_(True)
    y = torch.randint(0, V, (B, T)).to(DEVICE)
    lens = torch.tensor([3, 1], device=DEVICE)
    mask = torch.arange(T, device=DEVICE)[None, :] < lens[:, None]
    r = R.get_loss("sampling_loss", num_sampled=2, use_full_softmax=True)(torch.zeros(B, T, V, device=DEVICE), y,
                                                                          target_lengths=lens, train=True,
                                                                          linear_input=h, linear_weight=W)
    h64, W64 = h.detach().double().requires_grad_(True), W.detach().double().requires_grad_(True)
    exp = F.cross_entropy((h64 @ W64.t())[mask], y[mask], reduction="sum")
    assert_close(r.value, exp)
    up = torch.rand(())
    g = torch.autograd.grad(r.value * up, (h, W))
    g_ref = torch.autograd.grad(exp * up.double(), (h64, W64))
    assert_close(g[0], g_ref[0])
    assert_close(g[1], g_ref[1])
    # time_major: output, target and linear_input are all (T, B, ...), as the layer's layout in RETURNN
    rt = R.get_loss("sampling_loss", num_sampled=2, use_full_softmax=True)(
        torch.zeros(T, B, V, device=DEVICE), y.t(), target_lengths=lens, train=True, time_major=True,
        linear_input=h.detach().transpose(0, 1), linear_weight=W.detach())
    assert_close(rt.value, exp)
    # sampler="learned_unigram" (a RETURNN sampler name): the loss instance owns it, so its counts persist
    loss = R.get_loss("sampling_loss", num_sampled=3, sampler="learned_unigram")
    for _ in range(2):
        loss(torch.zeros(B, T, V, device=DEVICE), y, target_lengths=lens, linear_input=h, linear_weight=W)
    counts = torch.ones(V, dtype=torch.int64)
    counts.scatter_add_(0, y[mask].cpu(), torch.full_like(y[mask].cpu(), 2))
    assert torch.equal(loss._sampler.counts.cpu(), counts)


def test_returnn_ctc_scores_follow_returnns_get_output_logits():
    """RETURNN's CTC scores (its get_output_logits(), the CTC op normalising them): a softmax layer's
    pre-activation; with output_in_log_space the output itself, normalised (an unnormalised one too, as
    TF's ctc_loss takes logits); a log_softmax layer without it: safe_log of its output (<= 0), i.e. the
    floor log(1e-20) everywhere, a uniform distribution (RETURNN's value: get_logits() checks for softmax
    only). fast_bw reads a log_softmax layer's output as log-probs (its default input_type)."""
    from tri_losses.automata import ctc_fsa, fsa_loss
    from tri_losses.ctc import ctc_loss
    x = torch.randn(2, 6, 4).to(DEVICE).requires_grad_(True)
    tg, ol, tl_ = (torch.tensor(v, device=DEVICE) for v in ([[0, 1], [2, 2]], [6, 5], [2, 2]))
    exp = ctc_loss(x.detach().log_softmax(-1).transpose(0, 1), tg, ol, tl_, blank=3, reduction="sum")
    uniform = ctc_loss(torch.zeros(6, 2, 4, device=DEVICE).log_softmax(-1), tg, ol, tl_, blank=3, reduction="sum")
    fsa = ctc_fsa(tg, tl_, 3)
    for act, want in (("softmax", exp), ("log_softmax", uniform)):
        r = R.get_loss("ctc")(x, tg, activation=act, output_lengths=ol, target_lengths=tl_)
        assert_close(r.value, want)
        rb = R.get_loss("fast_bw")(x, activation=act, output_lengths=ol, fsa=fsa)
        assert_close(rb.value, fsa_loss(x.detach().transpose(0, 1), ol, fsa))
        assert_close(rb.value, exp, atol=1e-4, rtol=1e-5)
    for act in ("log_softmax", None):
        r = R.get_loss("ctc", output_in_log_space=True)(x, tg, activation=act, output_lengths=ol, target_lengths=tl_)
        assert_close(r.value, exp)  # log_softmax(x), or x normalised by the CTC op: the same
    xs = (2 * x.detach()).requires_grad_(True)  # unnormalised scores, normalised as logits
    r = R.get_loss("ctc", output_in_log_space=True)(xs, tg, output_lengths=ol, target_lengths=tl_)
    assert_close(r.value, ctc_loss((2 * x.detach()).log_softmax(-1).transpose(0, 1), tg, ol, tl_, blank=3,
                                   reduction="sum"))
    r.value.backward()
    frames = (torch.arange(6, device=DEVICE)[None, :] < ol[:, None])[..., None]
    assert_close(torch.where(frames, xs.grad, 0.0).sum(-1), torch.zeros(2, 6, device=DEVICE), atol=1e-5)


def test_returnn_ctc_probability_output_uses_safe_log():
    """No softmax/log_softmax activation and not output_in_log_space: the output is probabilities and
    the CTC scores are safe_log(output) (RETURNN's CTC rules), for the loss and the decoded error."""
    from tri_losses.ctc import ctc_loss
    x = torch.randn(2, 6, 4).to(DEVICE)
    p = x.softmax(-1)
    tg, ol, tl_ = (torch.tensor(v, device=DEVICE) for v in ([[0, 1], [2, 2]], [6, 5], [2, 2]))
    exp = ctc_loss(x.log_softmax(-1).transpose(0, 1), tg, ol, tl_, blank=3, reduction="sum")
    r = R.get_loss("ctc")(p, tg, output_lengths=ol, target_lengths=tl_)
    ref = R.get_loss("ctc")(x, tg, activation="softmax", output_lengths=ol, target_lengths=tl_)
    assert_close(r.value, exp, atol=1e-5, rtol=1e-5)
    assert r.error.item() == ref.error.item()
    ed = R.get_loss("edit_distance", ctc_decode=True)(p, tg, output_lengths=ol, target_lengths=tl_)
    ed_logits = R.get_loss("edit_distance", ctc_decode=True, output_in_log_space=True)(
        x.log_softmax(-1), tg, output_lengths=ol, target_lengths=tl_)
    assert ed.error.item() == ed_logits.error.item()


@pytest.mark.parametrize("activation", ["exp", "sigmoid"])
def test_returnn_ctc_exp_and_sigmoid_layers_use_exact_log_scores(activation):
    # RETURNN's get_logits(): the pre-activation for exp, log_sigmoid(x) for sigmoid (safe_log's op rewrite):
    # no 1e-20 floor, even for scores far below log(1e-20) = -46
    x = torch.randn(2, 6, 4, dtype=torch.float64) * 3
    x[0, 1] = torch.tensor([-80.0, -75.0, -90.0, -60.0])  # a whole frame below the floor
    x[1, 2, 0] = -70.0
    tg, ol, tl_ = torch.tensor([[0, 1], [2, 2]]), torch.tensor([6, 5]), torch.tensor([2, 2])
    x64 = x.clone().requires_grad_(True)
    scores = x64 if activation == "exp" else F.logsigmoid(x64)
    exp = F.ctc_loss(scores.log_softmax(-1).transpose(0, 1), tg, ol, tl_, blank=3, reduction="sum")
    up = torch.rand(())
    (g_ref,) = torch.autograd.grad(exp * up, x64)
    xf = x.float().to(DEVICE).requires_grad_(True)
    r = R.get_loss("ctc")(xf, tg.to(DEVICE), activation=activation, output_lengths=ol.to(DEVICE),
                          target_lengths=tl_.to(DEVICE))
    assert r.value.item() == pytest.approx(exp.item(), rel=1e-5)
    (g,) = torch.autograd.grad(r.objective * up.float(), xf)
    assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["ce", "bin_ce", "mse", "l1", "generic_ce"])
def test_returnn_nan_in_padded_frames_never_reaches_gradients(name):
    x = torch.randn(2, 5, 4)
    x[1, 3:] = float("nan")  # padding (output_lengths = 3) holds garbage
    x = x.to(DEVICE).requires_grad_(True)
    lens = torch.tensor([5, 3], device=DEVICE)
    t = (torch.randint(0, 4, (2, 5)) if name in ("ce", "generic_ce") else torch.rand(2, 5, 4)).to(DEVICE)
    act = {"ce": "softmax", "generic_ce": "exp"}.get(name)
    r = R.get_loss(name)(x, t, activation=act, output_lengths=lens)
    r.value.backward()
    # the same value and gradient as with clean padding (whatever it holds), padding gradient exactly 0
    clean = torch.where(torch.isnan(x.detach()), 0.5, x.detach()).requires_grad_()
    rc = R.get_loss(name)(clean, t, activation=act, output_lengths=lens)
    rc.value.backward()
    assert_close(r.value, rc.value)
    assert_close(x.grad, clean.grad)
    assert (x.grad[1, 3:] == 0).all()


def test_returnn_ce_log_softmax_activation_and_dense_smoothing():
    """ce with input_type="prob" uses the logits for a softmax layer only; with log_softmax it takes
    -safe_log of the (non-positive) output, as RETURNN does (the real RETURNN gives 276.3102 for the
    review's case: 46.0517 per frame)."""
    x = torch.randn(2, 3, 5).to(DEVICE)
    y = torch.randint(0, 5, (2, 3)).to(DEVICE)
    a = R.get_loss("ce")(x, y, activation="softmax").value
    assert_close(a, F.cross_entropy(x.reshape(-1, 5), y.reshape(-1), reduction="sum"))
    b = R.get_loss("ce")(x, y, activation="log_softmax").value
    lp = x.log_softmax(-1).gather(-1, y[..., None])[..., 0]
    assert_close(b, -R.safe_log(lp).sum())
    assert_close(b, torch.tensor(6 * -math.log(1e-20)))
    with pytest.raises(NotImplementedError, match="dense"):
        R.get_loss("ce", label_smoothing=0.1)(x, torch.rand(2, 3, 5).softmax(-1).to(DEVICE), activation="softmax")
    # safe_log keeps its value and gives 1/max(x, eps) as the gradient, also for tiny and negative x
    v = torch.tensor([0.5, 1e-30, -2.0], device=DEVICE, requires_grad=True)
    out = R.safe_log(v)
    assert_close(out, torch.tensor([math.log(0.5), math.log(1e-20), math.log(1e-20)]))
    out.sum().backward()
    assert_close(v.grad, torch.tensor([2.0, 1e20, 1e20]), rtol=1e-6)


def test_returnn_generic_ce_without_activation_is_the_identity():
    p = (torch.rand(2, 3, 4) + 0.1).to(DEVICE)
    y = torch.randint(0, 4, (2, 3)).to(DEVICE)
    r = R.get_loss("generic_ce")(p, y)
    exp = -torch.log((p / p.sum(-1, keepdim=True)).gather(-1, y[..., None])[..., 0]).sum()
    assert_close(r.value, exp)


@pytest.mark.parametrize("act", [None, "sigmoid", "softmax", "exp"])
def test_returnn_generic_ce_compiles_fullgraph_in_training(act):
    """generic_ce's custom gradient (f'/f times y_hat - onehot) is formed with torch.func, which
    torch.compile(fullgraph=True) traces (torch.autograd.grad inside the forward broke the graph); the
    compiled objective and gradient equal eager's, and f'/f is the float64 derivative of log f."""
    x = (torch.rand(2, 5, 7) + 0.1).to(DEVICE)
    y = torch.randint(0, 7, (2, 5)).to(DEVICE)
    lens = torch.tensor([5, 3], device=DEVICE)
    kw = {} if act is None else dict(activation=act)
    loss = R.get_loss("generic_ce")
    fn = lambda v: loss(v, y, output_lengths=lens, **kw).objective  # noqa: E731
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (ge,) = torch.autograd.grad(fn(xe), xe)
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(xc)
    (gc,) = torch.autograd.grad(got, xc)
    assert_close(got, fn(xe).detach())
    assert_close(gc, ge)
    f = {None: lambda v: v, "sigmoid": torch.sigmoid, "softmax": lambda v: torch.softmax(v, -1), "exp": torch.exp}[act]
    xd = x.double().requires_grad_(True)
    (dlogf,) = torch.autograd.grad(torch.log(f(xd)).sum(), xd)
    fx = f(x.double())
    yhat = fx / fx.sum(-1, keepdim=True)
    ref = dlogf * (yhat - F.one_hot(y, 7).double())
    ref[1, 3:] = 0.0  # padded frames
    assert_close(ge.double(), ref, atol=1e-6, rtol=1e-5)


def test_returnn_generic_ce_takes_an_autograd_function_activation():
    """Eager generic_ce takes any callable activation, also an autograd.Function without setup_context (which
    torch.func refuses): the same value and gradient as the built-in "exp"."""
    class Exp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, v):
            out = v.exp()
            ctx.save_for_backward(out)
            return out

        @staticmethod
        def backward(ctx, g):
            (out,) = ctx.saved_tensors
            return g * out

    x = torch.randn(2, 4, 5, device=DEVICE)
    y = torch.randint(0, 5, (2, 4), device=DEVICE)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a = R.get_loss("generic_ce")(xa, y, activation=Exp.apply).objective
    b = R.get_loss("generic_ce")(xb, y, activation="exp").objective
    a.backward()
    b.backward()
    assert_close(a, b)
    assert_close(xa.grad, xb.grad)
    # also under torch.compile (the caller's callable takes autograd.grad there too: a graph break)
    xc = x.clone().requires_grad_(True)
    c = torch.compile(lambda v: R.get_loss("generic_ce")(v, y, activation=Exp.apply).objective, backend="aot_eager")(xc)
    c.backward()
    assert_close(c, b)
    assert_close(xc.grad, xb.grad)

def test_returnn_lengths_are_validated():
    with pytest.raises(ValueError, match="output_lengths"):
        R.get_loss("mse")(torch.randn(2, 4, 3).to(DEVICE), torch.randn(2, 4, 3).to(DEVICE), output_lengths=[5, 3])
    with pytest.raises(ValueError, match="output_lengths"):  # list lengths are checked on any device
        R.get_loss("mse")(torch.randn(2, 4, 3).to(DEVICE), torch.randn(2, 4, 3).to(DEVICE), output_lengths=[-1, 3])


def test_returnn_expected_loss_over_edit_distance_and_bleu():
    """MWER / MBR: the inner metric's per-sequence error (d_b, -BLEU_b) weighted by the beam scores."""
    from tri_losses.misc import expected_loss
    from tri_losses.text import bleu, edit_distance
    B, K, L = 2, 3, 5
    hyp = torch.randint(1, 6, (B * K, L)).to(DEVICE)
    ref = torch.randint(1, 6, (B * K, L)).to(DEVICE)
    hl = torch.tensor([5, 4, 3, 5, 2, 1], device=DEVICE)
    rl = torch.tensor([5, 5, 5, 4, 4, 4], device=DEVICE)
    s = torch.randn(B, K).to(DEVICE).requires_grad_(True)
    for inner, per in (("edit_distance", edit_distance(hyp, hl, ref, rl).float()),
                       ("bleu", -bleu(hyp, hl, ref, rl))):
        r = R.get_loss("expected_loss", loss={"class": inner}, loss_kind="error")(
            hyp, ref, output_lengths=hl, target_lengths=rl, beam_scores=s)
        assert_close(r.value, expected_loss(per.reshape(B, K), s, reduction="sum"))
        # RETURNN's base norm factor over the (batch * beam) sequences: 1 / sum of their target lengths
        assert r.norm_factor.item() == pytest.approx(1 / rl.sum().item())


def test_registry_values_under_no_grad_and_inference_mode():
    """Evaluation runs the losses without autograd: under torch.no_grad() and torch.inference_mode() each
    gives the value it gives with autograd on (generic_ce formed its custom gradient with autograd and
    failed under inference_mode)."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, device=DEVICE)
    t = torch.randint(0, 5, (2, 6), device=DEVICE)
    for name, kw in (("generic_ce", dict(activation="exp")), ("generic_ce", dict(activation="sigmoid")),
                     ("ce", {}), ("mse", {})):
        want = R.get_loss(name)(x.clone().requires_grad_(True), t, **kw).value.detach()
        with torch.no_grad():
            a = R.get_loss(name)(x, t, **kw).value
        with torch.inference_mode():
            b = R.get_loss(name)(x, t, **kw).value
        assert_close(a, want)
        assert_close(b, want)


def test_returnn_fast_bw_and_sampling_loss_report_the_default_frame_error():
    """With a target, fast_bw and sampling_loss report the base loss's error (frames whose output argmax is not
    the target), as RETURNN's FastBaumWelchLoss (get_error falls back to it) and SamplingBasedLoss do; fast_bw
    without a target has none."""
    from tri_losses.automata import ctc_fsa
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 3, generator=g).to(DEVICE)
    t = torch.randint(0, 3, (2, 4), generator=g).to(DEVICE)
    L = torch.tensor([4, 3], device=DEVICE)
    want = ((z.argmax(-1) != t) & (torch.arange(4, device=DEVICE)[None] < L[:, None])).sum().float()
    fsa = ctc_fsa(torch.tensor([[1], [2]], device=DEVICE), torch.tensor([1, 1], device=DEVICE), 0)
    r = R.get_loss("fast_bw")(z, t, activation="softmax", output_lengths=L, fsa=fsa[:3])
    assert_close(r.error, want)
    assert R.get_loss("fast_bw")(z, activation="softmax", output_lengths=L, fsa=fsa[:3]).error is None
    r2 = R.get_loss("sampling_loss", num_sampled=2)(z, t, activation="softmax", output_lengths=L,
                                                    linear_input=torch.randn(2, 4, 5, device=DEVICE),
                                                    linear_weight=torch.randn(3, 5, device=DEVICE))
    assert_close(r2.error, want)


@pytest.mark.parametrize("name", ["ce", "mse", "l1", "bin_ce", "generic_ce"])
def test_frame_wise_losses_refuse_target_lengths_other_than_the_output_lengths(name):
    """A frame-wise target shares the output's time axis. With output lengths [2, 3] and target lengths
    [4, 3] the loss summed min(...) frames but divided by the target lengths' sum; RETURNN itself fails
    (its flattened frames differ in number) or, with equal totals, pairs frames across sequences. Now a
    ValueError naming target_lengths; equal lengths still give the loss of the shared frames."""
    x = torch.randn(2, 4, 5, device=DEVICE, requires_grad=True)
    if name in ("ce", "generic_ce"):
        t = torch.randint(0, 5, (2, 4), device=DEVICE)
    else:
        t = torch.rand(2, 4, 5, device=DEVICE)
    act = "softmax" if name in ("ce", "generic_ce") else ("sigmoid" if name == "bin_ce" else None)
    loss = R.get_loss(name)
    with pytest.raises(ValueError, match=r"target_lengths: .*expected the output_lengths \[2, 3\], got \[4, 3\]"):
        loss(x, t, activation=act, output_lengths=[2, 3], target_lengths=[4, 3])
    same = loss(x, t, activation=act, output_lengths=[2, 3], target_lengths=[2, 3])
    base = loss(x, t, activation=act, output_lengths=[2, 3])
    assert_close(same.value, base.value)
    assert_close(same.norm_factor, torch.tensor(1 / 5))


def test_losses_without_a_frame_wise_target_take_other_target_lengths():
    """The target_lengths check is for frame-wise targets only: search_score (a decoded label output, the
    target not read) and as_is (target not read) keep accepting target lengths other than the output's when
    the padded target happens to be as long as the output (it raised there, and not with a padding of 5),
    as do the label-sequence losses (ctc with S == T); results equal those with the longer padding."""
    B, T = 2, 4
    out, tgt, bs = torch.randint(0, 5, (B, T)), torch.randint(0, 5, (B, T)), torch.randn(B, 1)
    tgt5 = torch.cat([tgt, torch.zeros(B, 1, dtype=tgt.dtype)], 1)
    kw = dict(output_lengths=[2, 3], target_lengths=[4, 3])
    a = R.get_loss("search_score")(out, tgt, beam_scores=bs, **kw)
    b = R.get_loss("search_score")(out, tgt5, beam_scores=bs, **kw)
    assert_close(a.value, b.value)
    x, t3 = torch.randn(B, T, 3), torch.randint(0, 3, (B, T))
    a = R.get_loss("as_is")(x, t3, **kw)
    b = R.get_loss("as_is")(x, torch.cat([t3, torch.zeros(B, 1, dtype=t3.dtype)], 1), **kw)
    assert_close(a.value, b.value)
    r = R.get_loss("ctc")(torch.randn(B, T, 5), torch.randint(0, 4, (B, T)), output_lengths=[4, 3],
                          target_lengths=[2, 1])
    assert torch.isfinite(r.value)


def test_empty_batch_without_a_time_axis_gives_norm_inf_as_returnn():
    """B = 0 without a time axis (RETURNN, run with TF 2.21: value 0, error 0, norm inf): the norm's
    1.0 / B raised ZeroDivisionError; triplet_loss's 1 / (9 B) too."""
    for name, x, t, act in (("ce", torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), "softmax"),
                            ("mse", torch.zeros(0, 5), torch.zeros(0, 5), None),
                            ("bin_ce", torch.zeros(0, 5), torch.zeros(0, 5), "sigmoid")):
        x = x.to(DEVICE).requires_grad_(True)
        res = R.get_loss(name)(x, t.to(DEVICE), activation=act)
        assert res.value.item() == 0 and res.norm_factor.item() == math.inf, name
        if res.error is not None:
            assert res.error.item() == 0, name
        res.value.backward()
        assert x.grad.shape == (0, 5)
    res = R.get_loss("triplet_loss", margin=0.5)(torch.zeros(0, 6, device=DEVICE),
                                                 torch.zeros(0, 3, dtype=torch.long, device=DEVICE))
    assert res.norm_factor.item() == math.inf


@pytest.mark.parametrize("name, act, opts", [("ce", "softmax", {}), ("ce", "sigmoid", {}),
                                             ("ce", "softmax", {"label_smoothing": 0.1}),
                                             ("ce", "sigmoid", {"focal_loss_factor": 2.0}),
                                             ("generic_ce", "sigmoid", {})])
def test_unchecked_out_of_range_ids_give_nan_not_an_out_of_bounds_gather(backend, monkeypatch, name, act, opts):
    """Where ids are not read on the host (a device without validate; simulated here), an id >= F on a valid
    frame reached torch.gather on the probability path of ce and in generic_ce (an IndexError on the CPU, a
    device-side assert on CUDA): now that frame's value is NaN, as the fused cross-entropy path gives it; an
    out-of-range id on a padded frame is never read (finite value, equal to the in-range result)."""
    import tri_losses._validate as V_
    x = torch.randn(2, 4, 5, device=DEVICE)
    t = torch.randint(0, 5, (2, 4), device=DEVICE)
    ok = R.get_loss(name, **opts)(x.clone().requires_grad_(True), t, activation=act, output_lengths=[4, 3])
    monkeypatch.setattr(V_, "host_readable", lambda t, validate=False: False)
    pad = t.clone()
    pad[1, 3] = 12  # a padded frame
    with use_backend(backend):
        r = R.get_loss(name, **opts)(x.clone().requires_grad_(True), pad, activation=act, output_lengths=[4, 3])
        assert_close(r.value, ok.value)
        bad = t.clone()
        bad[0, 1] = 12  # a valid frame
        xb = x.clone().requires_grad_(True)
        r = R.get_loss(name, **opts)(xb, bad, activation=act, output_lengths=[4, 3])
        r.value.backward()
    assert r.value.isnan()
    # NaN reaches that frame's gradient (the whole row on the softmax path, as TF's sparse softmax CE on a
    # GPU), never a finite class-0 gradient; the other frames' gradients stay finite
    g = xb.grad
    assert g[0, 1].isnan().any() and (name == "ce" and act == "sigmoid" or g[0, 1].isnan().all())
    keep = torch.ones(2, 4, dtype=torch.bool)
    keep[0, 1] = False
    assert torch.isfinite(g[keep]).all()


def test_ctc_train_error_greedy_decodes_nan_as_tf():
    """RETURNN's training-mode ctc error decodes with tf.nn.ctc_greedy_decoder, whose argmax keeps the first maximum by
    '>': a NaN logit wins its frame only in class 0 (the starting value), elsewhere it never wins; torch.argmax takes
    the first NaN. Hand-decoded as TF does (blank = last class)."""
    nan = math.nan
    x = torch.tensor([[[nan, 0.0, 1.0], [0.0, 1.0, nan], [2.0, nan, 0.0]]], device=DEVICE)  # (B, T, F), blank 2
    # TF: frame 0 -> 0 (NaN in class 0), frame 1 -> 1 (NaN in the blank skipped), frame 2 -> 0: labels [0, 1, 0]
    for tgt, want in (([0, 1, 0], 0.0), ([0, 1], 1.0), ([1], 2.0)):
        r = R.get_loss("ctc")(x, torch.tensor([tgt], device=DEVICE), activation="softmax",
                              output_lengths=torch.tensor([3], device=DEVICE),
                              target_lengths=torch.tensor([len(tgt)], device=DEVICE), train=True)
        assert float(r.error) == want
