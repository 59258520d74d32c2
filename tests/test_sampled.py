"""Sampled softmax / NCE with injected samples vs a float64 TF-definition reference; identities; samplers."""
import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import DEVICE, assert_close, blas_runs
from tests.reference import sampled as ref
from tri_losses.sampled import NCELoss, SampledSoftmaxLoss, compute_sampled_logits, nce_loss, sampled_softmax_loss
from tri_losses.samplers import (AllCandidateSampler, FixedUnigramSampler, LearnedUnigramSampler, LogUniformSampler,
                                 UniformSampler)


def _dev(*ts):
    """The tensors on DEVICE: data is made on the CPU from seeded generators, then moved, so CPU runs are
    unchanged and a CUDA run sends the same values through the compiled kernels."""
    return [t.to(DEVICE) for t in ts]


def _gen(seed):
    """A seeded generator on DEVICE: the samplers draw on the input's device. A seed repeats its draws on one
    device (CPU and CUDA streams differ), so tests compare draws made on the same device."""
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _tf_case(T, device=DEVICE):
    """TF's ComputeSampledLogitsTest setting: V = 5, D = 10, B = 3, sampled [1, 0, 2, 3], EC 0.5 (made on the CPU,
    returned on ``device``)."""
    g = torch.Generator().manual_seed(T)
    V, D, B = 5, 10, 3
    W = torch.randn(V, D, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    labels = torch.stack([torch.randperm(V, generator=g)[:T] for _ in range(B)])
    sampled = torch.tensor([1, 0, 2, 3])
    x, W, b, labels, sampled, tec, sec = (t.to(device) for t in (x, W, b, labels, sampled, torch.full((B, T), 0.5),
                                                                  torch.full((4,), 0.5)))
    return x, W, b, labels, (sampled, tec, sec)


@pytest.mark.parametrize("T", [1, 2, 3, 4])
@pytest.mark.parametrize("nce", [False, True], ids=["softmax", "nce"])
@pytest.mark.parametrize("log_q", [True, False], ids=["logq", "nologq"])
def test_sampled_tf_case_matches_reference(T, nce, log_q):
    x, W, b, labels, sv = _tf_case(T)
    target = labels if T > 1 else labels[:, 0]
    fn = nce_loss if nce else sampled_softmax_loss
    xr, Wr, br = (t.clone().requires_grad_(True) for t in (x, W, b))
    got = fn(xr, Wr, target, 4, linear_bias=br, sampled_values=sv, remove_accidental_hits=True,
             subtract_log_q=log_q, reduction="none")
    rows = ref.sampled_logits(x.cpu(), W.cpu(), b.cpu(), labels.tolist(), sv[0].tolist(), sv[1].tolist(),
                              sv[2].tolist(), subtract_log_q=log_q)
    exp = ref.nce_loss(rows) if nce else ref.softmax_loss(rows)
    assert got.tolist() == pytest.approx(exp, rel=1e-10)
    # gradients: float64 gradcheck of the same function
    assert torch.autograd.gradcheck(
        lambda a, c, d: fn(a, c, target, 4, linear_bias=d, sampled_values=sv, subtract_log_q=log_q,
                           remove_accidental_hits=True, reduction="sum"), (xr, Wr, br))
    logits, lab = compute_sampled_logits(x, W, target, 4, linear_bias=b, sampled_values=sv, subtract_log_q=log_q)
    for i, (z, kept, _) in enumerate(rows):
        for j, (v, k) in enumerate(zip(z, kept)):
            if k:
                assert logits[i, j].item() == pytest.approx(v, rel=1e-5, abs=1e-5)
            else:
                assert logits[i, j].item() < -1e38  # s - FLT_MAX - log EC
    assert lab[:, :T].eq(1.0 / T).all() and lab[:, T:].eq(0).all()


@pytest.mark.parametrize("nce", [False, True], ids=["softmax", "nce"])
@pytest.mark.parametrize("T", [1, 3])
def test_sampled_both_backends_match_reference(backend, nce, T):
    """fp32 on both backends (Triton: on-chip logit tiles) vs the float64 reference, gradients vs gradcheck'd torch;
    TF's hit policy (T = 1) and "all" (T = 3) on a repeated hit."""
    g = torch.Generator().manual_seed(T + 10 * nce)
    N, D, V, m = 19, 20, 40, 18
    x = torch.randn(N, D, generator=g)
    W = torch.randn(V, D, generator=g) * 0.5
    b = torch.randn(V, generator=g)
    y = torch.randint(0, V, (N, T), generator=g)
    y[5] = -100
    sampled = torch.randint(0, V, (m,), generator=g)
    sampled[1] = sampled[0]  # a repeated id
    sampled[2] = y[0, 0]      # a certain hit
    sampled[3] = y[0, 0]      # repeated: the policies differ ("tf" drops only the last position)
    policy = "tf" if T == 1 else "all"
    tec = torch.rand(N, T, generator=g) * 0.5 + 0.1
    sec = torch.rand(m, generator=g) * 0.5 + 0.1
    up = torch.randn(N)
    x, W, b, y, sampled, tec, sec, up = _dev(x, W, b, y, sampled, tec, sec, up)
    target = y if T > 1 else y[:, 0]
    fn = nce_loss if nce else sampled_softmax_loss
    ts = [t.clone().requires_grad_(True) for t in (x, W, b)]
    got = fn(ts[0], ts[1], target, m, linear_bias=ts[2], sampled_values=(sampled, tec, sec),
             remove_accidental_hits=True, hit_policy=policy, reduction="none", backend=backend)
    grads = torch.autograd.grad(got, ts, up)
    valid = [i for i in range(N) if i != 5]
    rows = ref.sampled_logits(x.double().cpu()[valid], W.double().cpu(), b.double().cpu(), y[valid].tolist(),
                              sampled.tolist(), tec.double()[valid].tolist(), sec.double().tolist(), hit_policy=policy)
    exp = ref.nce_loss(rows) if nce else ref.softmax_loss(rows)
    assert got[valid].tolist() == pytest.approx(exp, rel=2e-5, abs=2e-5) and got[5] == 0
    t64 = [t.double().requires_grad_(True) for t in (x, W, b)]
    e64 = fn(t64[0], t64[1], target, m, linear_bias=t64[2], sampled_values=(sampled, tec.double(), sec.double()),
             remove_accidental_hits=True, hit_policy=policy, reduction="none", backend="torch")
    for a, e in zip(grads, torch.autograd.grad(e64, t64, up.double())):
        assert_close(a, e, atol=5e-5, rtol=5e-5)
    # the sparse weight gradient holds the same rows, one per touched class
    ws, bs = W.clone().requires_grad_(True), b.clone().requires_grad_(True)
    fn(x, ws, target, m, linear_bias=bs, sampled_values=(sampled, tec, sec), remove_accidental_hits=True,
       hit_policy=policy, reduction="none", weight_grad="sparse", backend=backend).backward(up)
    idx = ws.grad._indices()[0]
    assert ws.grad.is_sparse and bs.grad.is_sparse and idx.unique().numel() == idx.numel()
    assert_close(ws.grad.to_dense(), grads[1])
    assert_close(bs.grad.to_dense(), grads[2])


@pytest.mark.parametrize("policy", ["tf", "all"])
def test_sampled_hit_policies_with_repeated_ids(policy):
    x, W, b, labels, _ = _tf_case(2)
    sampled = torch.tensor([3, 1, 3, 1, 4, 3])  # repeats (unique=False style injection)
    sv = tuple(_dev(sampled, torch.full((3, 2), 0.3, dtype=torch.float64), torch.full((6,), 0.2, dtype=torch.float64)))
    got = sampled_softmax_loss(x, W, labels, 6, linear_bias=b, sampled_values=sv, hit_policy=policy,
                               reduction="none")
    rows = ref.sampled_logits(x.cpu(), W.cpu(), b.cpu(), labels.tolist(), sampled.tolist(), [[0.3] * 2] * 3,
                              [0.2] * 6, hit_policy=policy)
    assert got.tolist() == pytest.approx(ref.softmax_loss(rows), rel=1e-10)


def test_sampled_identities_full_softmax_and_nce(backend):
    """The all-candidate sampler (EC 1) with hits removed is the full softmax CE; NCE is sum_c softplus(s_c) - s_y
    (plus softplus(s_y) without hit removal); vs float64 PyTorch (Triton: fp32 inputs)."""
    N, D, V = 7, 6, 11
    dt = torch.float64 if backend == "torch" else torch.float32
    x64, W64, b64 = torch.randn(N, D, dtype=torch.float64), torch.randn(V, D, dtype=torch.float64), \
        torch.randn(V, dtype=torch.float64)
    y = torch.randint(0, V, (N,))
    y[2] = -100
    x64, W64, b64, y = _dev(x64, W64, b64, y)
    x, W, b = (t.to(dt).requires_grad_(True) for t in (x64, W64, b64))
    x64, W64, b64 = (t.to(dt).double().requires_grad_(True) for t in (x64, W64, b64))  # the same values
    allc = AllCandidateSampler(V)
    kw = dict(linear_bias=b, sampler=allc, backend=backend)
    got = sampled_softmax_loss(x, W, y, V, **kw)
    exp = F.cross_entropy(x64 @ W64.t() + b64, y)
    assert_close(got, exp)
    g = torch.autograd.grad(got, [x, W, b])
    ge = torch.autograd.grad(exp, [x64, W64, b64])
    for a, c in zip(g, ge):
        assert_close(a, c)
    s = (x64 @ W64.t() + b64).detach()
    v = y != -100
    s_y = s.gather(1, y.clamp(min=0)[:, None])[:, 0]
    # hits removed: softplus(-s_y) + sum_{c != y} softplus(s_c) = sum_c softplus(s_c) - s_y
    assert_close(nce_loss(x, W, y, V, remove_accidental_hits=True, reduction="sum", **kw),
                 (F.softplus(s).sum(-1) - s_y)[v].sum())
    # kept hit, log_norm_term c on every column: softplus(-(s_y - c)) + sum_c softplus(s_c - c)
    for c in (0.0, 0.7):
        assert_close(nce_loss(x, W, y, V, log_norm_term=c, reduction="sum", **kw),
                     (F.softplus(-(s_y - c)) + F.softplus(s - c).sum(-1))[v].sum(), msg=f"log_norm_term={c}")
    assert_close(sampled_softmax_loss(x, W, y, 3, linear_bias=b, use_full_softmax=True, backend=backend),
                 F.cross_entropy(s, y))


def test_generator_sampler_kwargs_and_nce_sigmoid_eval_inputs_are_checked(monkeypatch):
    """A non-Generator ``generator`` and a non-dict ``sampler_kwargs`` raise TypeError naming them (torch.rand's
    and an AttributeError before); NCELoss's sigmoid eval loss checks its input and target (shape, dtype, ids)
    as the softmax one does, and gives sum_c softplus(s_c) - s_y against a float64 reference; an unchecked
    out-of-range id (CUDA without validate, emulated) makes its row NaN."""
    from tri_losses import _validate
    x, W, y = torch.randn(4, 3), torch.randn(6, 3), torch.randint(0, 6, (4,))
    for fn in (sampled_softmax_loss, nce_loss):
        with pytest.raises(TypeError, match="generator: expected a torch.Generator or None, got int"):
            fn(x, W, y, 2, generator=5)
        with pytest.raises(TypeError, match="sampler_kwargs: expected a dict or None, got list"):
            fn(x, W, y, 2, sampler="fixed_unigram", sampler_kwargs=[1.0] * 6)
    m = NCELoss(3, 6, 2, eval_loss="sigmoid").eval()
    for bad_y, exc, msg in ((torch.randint(0, 6, (4, 2)), ValueError, r"NCELoss: target: expected shape \(4,\)"),
                            (torch.tensor([0, 1, 9, 2]), IndexError, r"NCELoss: target: expected ids in \[0, 6\)"),
                            (y.float(), TypeError, "NCELoss: target: expected an integer tensor")):
        with pytest.raises(exc, match=msg):
            m(x, bad_y)
    with pytest.raises(ValueError, match=r"NCELoss: input: expected shape \(..., 3\)"):
        m(torch.randn(4, 5), y)
    y2 = torch.tensor([0, -100, 5, 2], dtype=torch.int32)
    s = x.double() @ m.weight.detach().double().t() + m.bias.detach().double()
    rows = F.softplus(s).sum(-1) - s.gather(1, y2.clamp(min=0).long()[:, None])[:, 0]
    exp = rows[[0, 2, 3]].mean()
    assert_close(m(x, y2).double(), exp, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(_validate, "host_readable", lambda *a, **k: False)
    got = NCELoss(3, 6, 2, eval_loss="sigmoid", reduction="none").eval()(x, torch.tensor([0, 9, -100, 2]))
    assert torch.isnan(got[1]) and got[2] == 0 and torch.isfinite(got[[0, 3]]).all()


@pytest.mark.parametrize("loss", ["softmax", "nce"])
def test_sparse_weight_grad_lists_only_touched_classes_with_ignored_rows(backend, loss):
    """An ignored row touches no class: weight_grad="sparse" gives the same indices and values with and without
    it (it added an explicit zero row for its placeholder id: class 0 on the torch backend, a class spread over
    V on the Triton one, which SparseAdam then moves), for one and several label columns and groups."""
    fn = sampled_softmax_loss if loss == "softmax" else nce_loss
    N, D, V, m = 6, 4, 50, 3
    for T, G in ((1, 1), (2, 2)):
        x, W, b = torch.randn(N, D, device=DEVICE), torch.randn(V, D, device=DEVICE), torch.randn(V, device=DEVICE)
        y = torch.randint(10, V, (N, T), device=DEVICE)
        y[[1, 4]] = -100
        keep = (y != -100).all(1)
        samp = torch.randint(10, V, (G, m), device=DEVICE)
        up = torch.rand(N, device=DEVICE)
        res = []
        for rows in (slice(None), keep):
            n = int(keep.sum()) if rows is keep else N
            sv = (samp if G > 1 else samp[0], torch.full((n, T), 0.1, device=DEVICE),
                  torch.full((G, m) if G > 1 else (m,), 0.1, device=DEVICE))
            Ws, bs = W.clone().requires_grad_(True), b.clone().requires_grad_(True)
            out = fn(x[rows], Ws, y[rows] if T > 1 else y[rows, 0], m, linear_bias=bs, sampled_values=sv,
                     num_splits=G, weight_grad="sparse", reduction="none", backend=backend)
            # (the ignored rows' own losses are 0; the live rows' (N, T) grouping is the same both ways)
            gw, gb = torch.autograd.grad(out, [Ws, bs], up[rows])
            res.append((gw.coalesce(), gb.coalesce()))
        (gw, gb), (gw2, gb2) = res
        for a, e in ((gw, gw2), (gb, gb2)):
            assert a.indices().tolist() == e.indices().tolist(), (T, G)
            assert_close(a.values(), e.values())
            assert not (set(a.indices()[0].tolist()) - set(y[keep].reshape(-1).tolist()) - set(samp.reshape(-1).tolist()))


def test_sampled_groups_ignored_rows_sparse_grad_and_determinism():
    N, D, V, m = 9, 5, 40, 6
    x, W = torch.randn(N, D), torch.randn(V, D)
    y = torch.randint(0, V, (N,))
    y[4] = -100
    y[7] = y[1]  # a label duplicated across rows
    sampled = torch.randint(0, V, (3, m))
    x, W, y, sampled = _dev(x, W, y, sampled)
    x.requires_grad_(True)
    W.requires_grad_(True)
    sv = (sampled, torch.full((N,), 0.1, device=DEVICE), torch.full((3, m), 0.1, device=DEVICE))
    got = sampled_softmax_loss(x, W, y, m, sampled_values=sv, num_splits=3, reduction="none")
    assert got[4] == 0
    # groups: the 8 non-ignored rows in order, chunks of 8 // 3 = 2, the last takes the rest
    valid_rows = [i for i in range(N) if i != 4]
    groups = [min(k // 2, 2) for k in range(8)]
    for k, i in enumerate(valid_rows):
        single = sampled_softmax_loss(x[i:i + 1], W, y[i:i + 1], m,
                                      sampled_values=(sampled[groups[k]], torch.full((1,), 0.1, device=DEVICE),
                                                      torch.full((m,), 0.1, device=DEVICE)), reduction="none")
        assert_close(got[i], single[0])
    a = torch.autograd.grad(sampled_softmax_loss(x, W, y, m, sampled_values=sv, num_splits=3), [x, W])
    b2 = torch.autograd.grad(sampled_softmax_loss(x, W, y, m, sampled_values=sv, num_splits=3), [x, W])
    assert all(torch.equal(p, q) for p, q in zip(a, b2))
    # Triton path (one group), labels duplicated across rows: two runs bitwise equal
    sv1 = (sampled[0], torch.full((N,), 0.1, device=DEVICE), torch.full((m,), 0.1, device=DEVICE))
    r1 = torch.autograd.grad(sampled_softmax_loss(x, W, y, m, sampled_values=sv1, backend="triton"), [x, W])
    r2 = torch.autograd.grad(sampled_softmax_loss(x, W, y, m, sampled_values=sv1, backend="triton"), [x, W])
    assert all(torch.equal(p, q) for p, q in zip(r1, r2))
    Ws = W.detach().clone().requires_grad_(True)
    sampled_softmax_loss(x, Ws, y, m, sampled_values=sv, num_splits=3, weight_grad="sparse").backward()
    assert Ws.grad.is_sparse
    idx = Ws.grad._indices()[0]
    assert idx.unique().numel() == idx.numel()  # one row per touched class
    assert_close(Ws.grad.to_dense(), a[1])
    sv0 = (sampled[0], torch.ones(0, device=DEVICE), torch.ones(m, device=DEVICE))
    assert sampled_softmax_loss(x[:0], W, y[:0], m, sampled_values=sv0, reduction="sum").item() == 0


def _check_draws_with_replacement(smp, g, n=100000):
    """``n`` draws with replacement from ``smp`` on DEVICE against its probabilities: no class of P = 0 drawn,
    chi-square over the others (generous: far below a broken sampler; thresholds hold for any stream), the
    sampled expected counts n P(c). Returns num_tries."""
    smp = smp.to(DEVICE)
    p = smp.probs().double()
    s, _, ec, nt = smp.sample(n, torch.zeros(1, 1, dtype=torch.long, device=DEVICE), unique=False, generator=g)
    counts = torch.bincount(s.reshape(-1), minlength=p.numel()).double()
    assert counts.numel() == p.numel() and float(counts[p == 0].sum()) == 0
    live = p > 0
    chi2 = ((counts[live] - n * p[live]) ** 2 / (n * p[live])).sum().item()
    assert chi2 < 3 * p.numel() + 30, (type(smp).__name__, chi2)
    assert torch.allclose(ec, n * p[s].float())
    return nt


def test_samplers_probabilities_and_chi_square():
    """Draws on DEVICE (the samplers' tables and the generator there; thresholds hold for any stream)."""
    g = _gen(0)
    for smp in (UniformSampler(20), LogUniformSampler(20),
                FixedUnigramSampler([2.0 ** i for i in range(9)], distortion=0.8)):
        assert smp.probs().double().sum().item() == pytest.approx(1.0, abs=1e-6)
        assert _check_draws_with_replacement(smp, g).item() == 100000
    fu = FixedUnigramSampler([2.0 ** i for i in range(9)], distortion=0.8)
    assert_close(fu.probs(), torch.tensor([2 ** (0.8 * i) / 197.05 for i in range(9)]), atol=1e-4, rtol=1e-3)
    fr = FixedUnigramSampler([3.0, 1.0], num_reserved_ids=2)
    assert fr.probs().tolist() == pytest.approx([0, 0, 0.75, 0.25])


def test_samplers_draw_from_more_classes_than_multinomial_takes(monkeypatch):
    """Past torch.multinomial's 2**24 categories (TF's samplers take range_max up to 2**31 - 1) a draw with
    replacement inverts the fp64 CDF, and the uniform sampler draws its ids directly (the CDF of 2**31 classes
    took 16 GiB: the process was killed): a real uniform over 2**24 + 3 classes (it raised a RuntimeError),
    and the same paths on small tables (the limit lowered) against the probabilities by chi-square, zero-weight
    classes (reserved ids first; zero counts in the middle and last) never drawn."""
    import tri_losses.samplers as samplers_mod
    g = _gen(1)
    V = 2 ** 24 + 3
    s, tec, sec, nt = UniformSampler(V).to(DEVICE).sample(
        4000, torch.tensor([[V - 1]], device=DEVICE), unique=False, generator=g)
    assert s.dtype == torch.int64 and int(s.min()) >= 0 and int(s.max()) < V
    assert int(s.max()) > V // 2 and int(s.min()) < V // 2  # both halves of the range are reached
    assert_close(tec, torch.full_like(tec, 4000 / V)) and int(nt) == 4000
    monkeypatch.setattr(samplers_mod, "_MULTINOMIAL_MAX", 4)
    for smp in (UniformSampler(20), FixedUnigramSampler([2.0 ** i for i in range(9)], distortion=0.8,
                                                        num_reserved_ids=3),
                FixedUnigramSampler([3.0, 0.0, 0.0, 5.0, 1.0, 0.0, 2.0, 0.0])):
        _check_draws_with_replacement(smp, g)

def test_samplers_learned_unigram_csv_shards(tmp_path):
    ls = LearnedUnigramSampler(10).to(DEVICE)
    ls.sample(2, torch.full((10, 1), 3, device=DEVICE), unique=False)
    assert ls.probs()[3].item() == pytest.approx(0.55) and ls.probs()[0].item() == pytest.approx(0.05)
    f = tmp_path / "vocab.csv"
    f.write_text("a,4\nb,2\nc,2\nd,8\n")
    s = FixedUnigramSampler(vocab_file=str(f), num_reserved_ids=1, num_shards=2, shard=1)
    # ids 0 (reserved), 1..4 -> kept odd ids 1, 3 with weights 4, 2
    assert s.probs().tolist() == pytest.approx([4 / 6, 2 / 6])
    with pytest.raises(ValueError, match="learned_unigram"):
        sampled_softmax_loss(torch.randn(2, 3), torch.randn(5, 3), torch.tensor([0, 1]), 2, sampler="learned_unigram")


def test_unique_sampling_matches_sequential_rejection_law():
    V, m = 200, 40
    smp = UniformSampler(V).to(DEVICE)
    g = _gen(5)
    tc = torch.zeros(1, 1, dtype=torch.long, device=DEVICE)
    tries = []
    for _ in range(200):
        s, _, ec, nt = smp.sample(m, tc, unique=True, generator=g)
        assert s.unique().numel() == m
        tries.append(nt.item())
    # sequential rejection: E[num_tries] = sum_{j<m} V / (V - j) = 67.5 for V = 200, m = 40
    exp = sum(V / (V - j) for j in range(m))
    assert abs(sum(tries) / len(tries) - exp) < 2.0
    # expected counts vs empirical inclusion (log-uniform, 100 batches of 50, V = 100)
    from tri_losses.samplers import expected_count
    lu = LogUniformSampler(100).to(DEVICE)
    inc = torch.zeros(100, device=DEVICE)
    ec_mean = torch.zeros(100, device=DEVICE)
    for _ in range(100):
        s, _, _, nt = lu.sample(50, tc, unique=True, generator=g)
        inc[s[0]] += 1
        ec_mean += expected_count(lu.probs(), nt, 50) / 100
    assert ((inc / 100) - ec_mean).abs().max() < 0.2


@pytest.mark.parametrize("nce", [False, True], ids=["softmax", "nce"])
def test_sampled_modules_train_match_reference_and_eval_full_softmax(nce):
    """train(): the loss of the module's own draw (log-uniform, unique) equals the float64 reference on the same
    ids and counts (drawn again from the same generator state), gradients too; eval(): the full softmax CE."""
    torch.manual_seed(0)
    N, D, V, m = 4, 8, 30, 5
    cls = NCELoss if nce else SampledSoftmaxLoss
    mod = cls(D, V, m, generator=_gen(11)).to(DEVICE)
    x, y = _dev(torch.randn(N, D), torch.randint(0, V, (N,)))
    xr = x.clone().requires_grad_(True)
    mod.train()
    got = mod(xr, y)
    gx, gw, gb = torch.autograd.grad(got, (xr, mod.weight, mod.bias))
    s, tec, sec, _ = LogUniformSampler(V).to(DEVICE).sample(m, y[:, None], unique=True, generator=_gen(11))
    W64, b64 = mod.weight.detach().double(), mod.bias.detach().double()
    rows = ref.sampled_logits(x.double().cpu(), W64.cpu(), b64.cpu(), y[:, None].tolist(), s[0].tolist(),
                              tec.double().tolist(), sec[0].double().tolist(), remove_hits=not nce)
    exp = ref.nce_loss(rows) if nce else ref.softmax_loss(rows)
    assert got.item() == pytest.approx(sum(exp) / N, rel=1e-5)
    t64 = [t.requires_grad_(True) for t in (x.double(), W64.clone(), b64.clone())]
    fn = nce_loss if nce else sampled_softmax_loss
    e64 = fn(t64[0], t64[1], y, m, linear_bias=t64[2], sampled_values=(s[0], tec.double(), sec[0].double()),
             backend="torch")
    for a, e in zip((gx, gw, gb), torch.autograd.grad(e64, t64)):
        assert_close(a, e)
    mod.eval()
    assert_close(mod(x, y), F.cross_entropy(x @ mod.weight.t() + mod.bias, y))


def test_nce_module_eval_sigmoid_and_ignored_rows():
    x, y = _dev(torch.randn(4, 8), torch.randint(0, 30, (4,)))
    nce = NCELoss(8, 30, 5, eval_loss="sigmoid").to(DEVICE).eval()
    s = x @ nce.weight.t() + nce.bias
    assert_close(nce(x, y), (F.softplus(s).sum(-1) - s.gather(1, y[:, None])[:, 0]).mean())
    y_ign = y.clone()
    y_ign[1] = -100
    keep = torch.tensor([0, 2, 3], device=DEVICE)
    assert_close(nce(x, y_ign), nce(x[keep], y[keep]))


BAD = [
    (dict(num_sampled=0), ValueError, "num_sampled"),
    (dict(num_splits=0), ValueError, "num_splits"),
    (dict(hit_policy="first"), ValueError, "hit_policy"),
    (dict(weight_grad="coo"), ValueError, "weight_grad"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(input=torch.randn(3, 4)), ValueError, "input"),
    (dict(target=torch.tensor([0, 9, 1])), ValueError, "target"),
    (dict(linear_bias=torch.randn(4)), ValueError, "linear_bias"),
    (dict(num_sampled=9, sampler="uniform"), ValueError, "num_sampled"),
    (dict(sampled_values=(torch.tensor([1, 2]), torch.ones(3), torch.ones(2))), ValueError, "sampled_values"),
]


@pytest.mark.parametrize("kw,exc,name", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_sampled_bad_input_raises_naming_argument(kw, exc, name):
    args = dict(input=torch.randn(3, 5), linear_weight=torch.randn(8, 5), target=torch.tensor([0, 7, 1]),
                num_sampled=3)
    args.update(kw)
    with pytest.raises(exc, match=name) as err:
        sampled_softmax_loss(args.pop("input"), args.pop("linear_weight"), args.pop("target"), args.pop("num_sampled"),
                             **args)
    assert isinstance(err.value, RuntimeError)  # as PyTorch's own input errors


def test_sampled_torch_compile_fullgraph_with_injected_samples():
    x, W, b, labels, sv = _tf_case(1)
    xf, Wf, bf = x.float(), W.float(), b.float()
    svf = (sv[0], sv[1].float(), sv[2].float())

    def f(a):
        return sampled_softmax_loss(a, Wf, labels[:, 0], 4, linear_bias=bf, sampled_values=svf)

    torch._dynamo.reset()
    assert_close(torch.compile(f, fullgraph=True)(xf), f(xf))


@pytest.mark.parametrize("op", [sampled_softmax_loss, nce_loss], ids=["sampled_softmax", "nce"])
def test_sampled_values_compile_once_for_changing_batch_sizes(backend, op):
    # the injected samples' shape checks must not pin the batch size: one dynamic graph serves every N
    from torch._dynamo.testing import CompileCounterWithBackend
    w = torch.randn(20, 6, device=DEVICE)
    s = torch.tensor([3, 5, 11, 0, 17], device=DEVICE)
    cnt = CompileCounterWithBackend("aot_eager")

    def f(x, y):
        sv = (s, torch.full((x.shape[0],), 0.3, device=DEVICE), torch.full((5,), 0.3, device=DEVICE))
        return op(x, w, y, 5, sampled_values=sv, backend=backend)

    torch._dynamo.reset()
    g = torch.compile(f, backend=cnt, fullgraph=True, dynamic=True)
    counts = []
    for n in (3, 4, 7):
        x, y = torch.randn(n, 6, device=DEVICE), torch.randint(0, 20, (n,), device=DEVICE)
        assert_close(g(x, y), f(x, y))
        counts.append(cnt.frame_count)
    assert counts[0] >= 1 and counts[1:] == counts[:1] * 2  # no recompile after the first size


def test_tf_compat_takes_remove_accidental_hits_by_its_truth_value_as_tf():
    """TF reads remove_accidental_hits as a Python truth value (1/0 work there): tf_compat passes its bool on
    (the ops themselves take bools only)."""
    from tri_losses import tf_compat
    g = torch.Generator().manual_seed(0)
    W, b, x = torch.randn(9, 4, generator=g), torch.randn(9, generator=g), torch.randn(3, 4, generator=g)
    labels = torch.tensor([[1], [2], [3]])
    sv = tf_compat.log_uniform_candidate_sampler(labels, 1, 4, True, 9, seed=3)
    for fn in (tf_compat.sampled_softmax_loss, tf_compat.nce_loss):
        for flag in (True, False):
            assert torch.equal(fn(W, b, labels, x, 4, 9, sampled_values=sv, remove_accidental_hits=int(flag)),
                               fn(W, b, labels, x, 4, 9, sampled_values=sv, remove_accidental_hits=flag))


def test_tf_compat_signatures_and_sharded_weights():
    from tri_losses import tf_compat
    x, W, b, labels, sv = _tf_case(2)
    full = sampled_softmax_loss(x, W, labels, 4, linear_bias=b, sampled_values=sv, reduction="none")
    # "mod": id i lives in shard i % 2 at row i // 2
    shards = [W[0::2], W[1::2]]
    bsh = [b[0::2], b[1::2]]
    got = tf_compat.sampled_softmax_loss(shards, bsh, labels, x, 4, 5, num_true=2, sampled_values=sv)
    assert_close(got, full)
    got = tf_compat.sampled_softmax_loss([W[:3], W[3:]], [b[:3], b[3:]], labels, x, 4, 5, num_true=2,
                                         sampled_values=sv, partition_strategy="div")
    assert_close(got, full)
    n = tf_compat.nce_loss(W, b, labels, x, 4, 5, num_true=2, sampled_values=sv)
    assert_close(n, nce_loss(x, W, labels, 4, linear_bias=b, sampled_values=sv, reduction="none"))
    # on the true classes' device (a seed's generator there: CUDA labels drew from CPU tables before)
    s, tec, sec = tf_compat.uniform_candidate_sampler(labels, 2, 3, True, 5, seed=1)
    assert s.shape == (3,) and tec.shape == (3, 2) and sec.shape == (3,) and s.unique().numel() == 3
    assert s.device == tec.device == sec.device == labels.device
    s2, _, _ = tf_compat.uniform_candidate_sampler(labels, 2, 3, True, 5, seed=1)
    assert torch.equal(s, s2)  # a seed repeats its samples


def test_tf_compat_shard_sizes_and_num_classes_as_tf_reads_them():
    """TF's shard layout for both strategies (V // n rows, one more for the first V % n shards: other sizes make
    TF read other rows or fail, so they raise); ``num_classes`` is only the range of TF's sampler: not read
    with ``sampled_values``, below the weights' rows it draws from the first ``num_classes`` ids (labels past
    them raise, as TF's sampler does), past them it raises."""
    from tri_losses import tf_compat
    x, W, b, labels, sv = _tf_case(1)
    full = sampled_softmax_loss(x, W, labels[:, 0], 4, linear_bias=b, sampled_values=sv, reduction="none")
    for strategy in ("div", "mod"):
        with pytest.raises(ValueError, match=f"weights: with partition_strategy='{strategy}'.*sizes \\[3, 2\\]"):
            tf_compat.sampled_softmax_loss([W[:2], W[2:]], b, labels, x, 4, 5, sampled_values=sv,
                                           partition_strategy=strategy)
        # shards of other widths or dtypes (torch.cat raised its own RuntimeError, or promoted the dtype)
        for other, what in ((W[3:, :-1], "\\(9,\\)"), (W[3:].float(), "\\(10,\\), torch.float32")):
            with pytest.raises(ValueError, match=f"weights\\[1\\]: expected rows of shape .*got {what}"):
                tf_compat.sampled_softmax_loss([W[:3], other], b, labels, x, 4, 5, sampled_values=sv,
                                               partition_strategy=strategy)
    for nc in (3, 5, 9):  # with sampled_values TF never reads num_classes
        assert_close(tf_compat.sampled_softmax_loss(W, b, labels, x, 4, nc, sampled_values=sv), full)
    gen = torch.Generator().manual_seed(5)
    V, D = 12, 4
    x2, W2 = _dev(torch.randn(6, D, generator=gen, dtype=torch.float64), torch.zeros(V, D, dtype=torch.float64))
    b2 = torch.zeros(V, dtype=torch.float64, device=DEVICE)
    b2[10:] = 1e3  # a draw of id 10 or 11 would make the loss about 1000
    y2 = torch.tensor([[1], [4], [9], [0], [2], [3]], device=DEVICE)
    for seed in range(4):
        for fn in (tf_compat.sampled_softmax_loss, tf_compat.nce_loss):
            loss = fn(W2, b2, y2, x2, 5, 10, seed=seed)
            assert loss.shape == (6,) and bool((loss < 100).all()), loss
    with pytest.raises(ValueError, match="num_classes: the sampler's range of 13 ids goes past the weights' 12"):
        tf_compat.sampled_softmax_loss(W2, b2, y2, x2, 5, 13)
    with pytest.raises(ValueError, match="nce_loss: labels: expected ids in \\[0, 10\\), got 11"):
        tf_compat.nce_loss(W2.cpu(), b2.cpu(), torch.tensor([[1], [11], [0], [0], [0], [0]]), x2.cpu(), 5, 10)


def _mc_gradient_bias(sampler, m, unique, draws, s, y, subtract_log_q=True, flip=False, chunk=100):
    """Relative bias of the Monte-Carlo mean of the sampled-softmax logit gradient (mapped onto the V classes)
    against the full-softmax gradient softmax(s) - onehot(y). W = I, so d/dx = the class-mapped gradient."""
    V = s.numel()
    W = torch.eye(V, dtype=torch.float64)
    g = torch.Generator().manual_seed(1234 + m)
    total = torch.zeros(V, dtype=torch.float64)
    for _ in range(draws // chunk):
        X = s.repeat(chunk, 1).requires_grad_(True)
        yy = y.repeat(chunk)
        if flip:
            sm, tec, sec, _ = sampler.sample(m, yy[:, None], unique=unique, groups=torch.arange(chunk),
                                             num_groups=chunk, generator=g)
            sv = (sm, 1.0 / tec, 1.0 / sec)  # the sign-flipped correction: inject 1/EC
            loss = sampled_softmax_loss(X, W, yy, m, sampled_values=sv, num_splits=chunk, reduction="sum")
        else:
            loss = sampled_softmax_loss(X, W, yy, m, sampler=sampler, unique=unique, num_splits=chunk, generator=g,
                                        subtract_log_q=subtract_log_q, reduction="sum")
        (gx,) = torch.autograd.grad(loss, X)
        total += gx.sum(0)
    mean = total / draws
    truth = torch.softmax(s[0], 0) - F.one_hot(y, V)[0].double()
    return ((mean - truth).norm() / truth.norm()).item()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["uniform", "log_uniform"])
@pytest.mark.parametrize("unique", [True, False])
def test_sampled_statistical_gradient_bias_falls_with_m(kind, unique):
    V = 1000
    g = torch.Generator().manual_seed(7)
    s = (torch.randn(1, V, generator=g) * 1.5).double()
    y = torch.randint(0, V, (1,), generator=g)
    smp = UniformSampler(V) if kind == "uniform" else LogUniformSampler(V)
    bias = [_mc_gradient_bias(smp, m, unique, 20000, s, y) for m in (4, 16, 64, 256)]
    assert all(a > b for a, b in zip(bias, bias[1:])), bias
    assert bias[-1] < 0.1, bias
    if kind == "log_uniform" and unique:
        b64 = bias[2]
        assert b64 < _mc_gradient_bias(smp, 64, unique, 20000, s, y, subtract_log_q=False)
        assert b64 < _mc_gradient_bias(smp, 64, unique, 20000, s, y, flip=True)


def test_sampled_ignored_rows_never_poison_gradients(backend):
    """An ignored row's placeholder label may have P = 0 (reserved id 0) or an injected EC of 0: its loss and
    gradient are exactly 0 and the loss and every gradient equal those of the other rows alone (float64
    reference on the torch backend, same draw)."""
    g = torch.Generator().manual_seed(3)
    N, D, V, m = 4, 6, 5, 3
    x, W, b = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g), torch.randn(V, generator=g)
    ups = torch.randn(2, N, generator=g)
    x, W, b, ups = _dev(x, W, b, ups)
    for t in (x, W, b):
        t.requires_grad_(True)
    y, keep, ids = _dev(torch.tensor([1, -100, 2, 3]), torch.tensor([0, 2, 3]), torch.tensor([1, 2, 4]))
    smp = FixedUnigramSampler([1.0] * 4, num_reserved_ids=1)
    tec = torch.tensor([0.5, 0.0, 0.5, 0.5], device=DEVICE)
    for up, (kw, kw_keep) in zip(ups, ((dict(sampler=smp), dict(sampler=smp)),
                                       (dict(sampled_values=(ids, tec, torch.full((3,), 0.4, device=DEVICE))),
                                        dict(sampled_values=(ids, tec[keep].double(),
                                                             torch.full((3,), 0.4, dtype=torch.float64,
                                                                        device=DEVICE)))))):
        # both draws from one seed on one device: the same samples for the 4 rows and the 3 kept ones
        loss = sampled_softmax_loss(x, W, y, m, linear_bias=b, generator=_gen(0), reduction="none", backend=backend,
                                    **kw)
        gx, gw, gb = torch.autograd.grad(loss, (x, W, b), up)
        t64 = [t.detach().double().requires_grad_(True) for t in (x, W, b)]
        exp = sampled_softmax_loss(t64[0][keep], t64[1], y[keep], m, linear_bias=t64[2], reduction="none",
                                   generator=_gen(0), backend="torch", **kw_keep)
        assert loss[1] == 0 and (gx[1] == 0).all()
        assert_close(loss[keep], exp)
        for a, e in zip((gx, gw, gb), torch.autograd.grad(exp, t64, up[keep].double())):
            assert_close(a, e)


def test_sampled_strided_weight_and_bias_match_contiguous(backend):
    g = torch.Generator().manual_seed(4)
    N, D, V, m = 7, 8, 12, 5
    x = torch.randn(N, D, generator=g)
    Wt = torch.randn(D, V, generator=g)
    bb = torch.randn(2 * V, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    x, Wt, bb, y = _dev(x, Wt, bb, y)
    sv = tuple(_dev(torch.tensor([0, 3, 5, 7, 11]), torch.full((N,), 0.3), torch.full((m,), 0.2)))
    got = sampled_softmax_loss(x, Wt.t(), y, m, linear_bias=bb[::2], sampled_values=sv, backend=backend)
    exp = sampled_softmax_loss(x, Wt.t().contiguous(), y, m, linear_bias=bb[::2].contiguous(), sampled_values=sv,
                               backend=backend)
    assert_close(got, exp)


@pytest.mark.parametrize("weight_grad", ["dense", "sparse"])
def test_sampled_bf16_weight_gradient_accumulates_in_fp32(backend, weight_grad):
    """Many rows with one label: the W row's gradient is a long sum; it must not be summed in bf16."""
    g = torch.Generator().manual_seed(5)
    N, D, V, m = 512, 8, 16, 4
    x = torch.randn(N, D, generator=g).bfloat16()
    W = torch.randn(V, D, generator=g).bfloat16()
    y = torch.full((N,), 9)
    x, W, y = _dev(x, W, y)
    sv = tuple(_dev(torch.tensor([0, 1, 2, 3]), torch.full((N,), 0.5), torch.full((m,), 0.5)))
    Wr = W.clone().requires_grad_(True)
    sampled_softmax_loss(x, Wr, y, m, sampled_values=sv, reduction="sum", weight_grad=weight_grad,
                         backend=backend).backward()
    W64 = W.double().requires_grad_(True)
    sampled_softmax_loss(x.double(), W64, y, m, sampled_values=sv, reduction="sum", backend="torch").backward()
    got = Wr.grad.to_dense().double() if weight_grad == "sparse" else Wr.grad.double()
    rel = (got[9] - W64.grad[9]).norm() / W64.grad[9].norm()
    assert rel < 8e-3  # one bf16 rounding (2**-8 = 4e-3 relative); a bf16 running sum is far off


@pytest.mark.skipif(not blas_runs(), reason="the cuBLAS GEMMs need torch >= 2.10 on CUDA")
@pytest.mark.parametrize("nce", [False, True], ids=["softmax", "nce"])
def test_sampled_bf16_blas_gemms_match_triton_kernels_and_reference(monkeypatch, nce):
    """bf16's dW_S/dX GEMMs on torch.mm (linear CE's ``BLAS`` "dwdx", the default on CUDA): the gradients of
    the Triton GEMM kernels and of the float64 torch backend, over several chunks of sampled columns (3 per
    chunk), with a bias, hits removed and a random per-row upstream; a frozen weight and bias: dX alone, the
    same."""
    from tri_losses.kernels import linear_cross_entropy as L
    from tri_losses.kernels import sampled as K
    g = torch.Generator().manual_seed(12)
    N, D, V, m = 10, 16, 40, 8
    x, W = torch.randn(N, D, generator=g).bfloat16(), (torch.randn(V, D, generator=g) * 0.5).bfloat16()
    b = torch.randn(V, generator=g).bfloat16()
    y = torch.randint(0, V, (N,), generator=g)
    up = torch.randn(N, generator=g)
    x, W, b, y, up = _dev(x, W, b, y, up)
    sv = tuple(_dev(torch.tensor([3, 9, 17, 40 - 1, int(y[0]), 5, 22, 31]), torch.full((N,), 0.3),
                    torch.full((m,), 0.2)))
    fn = nce_loss if nce else sampled_softmax_loss
    monkeypatch.setattr(K, "chunk_columns", lambda m_, D_, BN: 3)
    mms = []
    real = K._mm_f32
    monkeypatch.setattr(K, "_mm_f32", lambda *a: mms.append(1) or real(*a))

    def grads(backend, dt=None, frozen=False):
        ts = [t.detach().clone().to(dt or t.dtype).requires_grad_(i == 0 or not frozen)
              for i, t in enumerate((x, W, b))]
        out = fn(ts[0], ts[1], y, m, linear_bias=ts[2], sampled_values=sv, reduction="none", backend=backend)
        out.backward(up.to(out.dtype))
        return [t.grad for t in ts]

    monkeypatch.setattr(L, "BLAS", ())
    plain = grads("triton")
    assert mms == []
    monkeypatch.setattr(L, "BLAS", ("fwd", "dz", "dwdx"))
    got = grads("triton")
    assert len(mms) == 2 * 3  # dW_S and dX for each of 3 chunks of 8 columns
    exp = grads("torch", torch.float64)
    for a, p_, e, name in zip(got, plain, exp, ("input", "weight", "bias")):
        assert a.dtype == torch.bfloat16, name
        assert_close(a.float(), p_.float(), atol=1e-2, rtol=1e-2, msg=name)
        assert_close(a.double(), e, atol=2e-2, rtol=2e-2, msg=name)
    mms.clear()
    dx, dw, db = grads("triton", frozen=True)
    assert dw is None and db is None and len(mms) == 3  # dX only, per chunk
    assert_close(dx, got[0], atol=0, rtol=0)


def test_sampled_groups_when_fewer_rows_than_groups_use_the_last_draw():
    """floor(N'/G) = 0: every row belongs to the last chunk (group G-1), as the spec's chunking rule says."""
    g = torch.Generator().manual_seed(6)
    N, D, V, m, G = 2, 5, 9, 3, 3
    x, W = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g)
    x, W, y, ids = _dev(x, W, torch.tensor([1, 2]), torch.tensor([[3, 4, 5], [6, 7, 8], [0, 3, 6]]))
    ones = lambda *shape: torch.ones(shape, device=DEVICE)  # noqa: E731
    got = sampled_softmax_loss(x, W, y, m, num_splits=G, sampled_values=(ids, ones(N), ones(G, m)),
                               reduction="none", backend="torch")
    exp = sampled_softmax_loss(x, W, y, m, sampled_values=(ids[2], ones(N), ones(m)), reduction="none",
                               backend="torch")
    assert_close(got, exp)


def test_sampled_unchecked_out_of_range_ids_give_nan_rows_not_reads(backend):
    class BadSampler(UniformSampler):
        def sample(self, num_sampled, true_classes, **kw):
            s, te, se, nt = super().sample(num_sampled, true_classes, **kw)
            return s * 0 + torch.tensor([0, 1, 12], device=s.device), te, se, nt  # one id >= V

    g = torch.Generator().manual_seed(7)
    x, W = torch.randn(4, 6, generator=g), torch.randn(10, 6, generator=g)
    x, W, y = _dev(x, W, torch.tensor([1, 2, 3, 4]))
    loss = sampled_softmax_loss(x, W, y, 3, sampler=BadSampler(10), unique=False, reduction="none", backend=backend)
    assert torch.isnan(loss).all()  # one group: every row used the bad id
    with pytest.raises(ValueError, match="num_sampled"):
        AllCandidateSampler(8).sample(9, y)


def test_unique_sampling_with_nearly_exhausted_mass_keeps_finite_counts():
    smp = FixedUnigramSampler([1.0] * 4 + [1e-12]).to(DEVICE)
    s, te, se, nt = smp.sample(5, torch.tensor([0, 1], device=DEVICE), unique=True, generator=_gen(0))
    assert sorted(s[0].tolist()) == [0, 1, 2, 3, 4]
    assert (nt > 0).all() and torch.isfinite(se).all() and torch.isfinite(te).all() and (se > 0).all()
    with pytest.raises(ValueError, match="unigrams"):
        FixedUnigramSampler([1.0, -2.0])
    assert FixedUnigramSampler([0.0, 2.0, 2.0], distortion=-0.5).probs().tolist() == [0.0, 0.5, 0.5]


def test_sampled_module_owns_a_learned_unigram_sampler_and_validation():
    mod = SampledSoftmaxLoss(6, 10, 3, sampler="learned_unigram")
    assert isinstance(mod.sampler, LearnedUnigramSampler)
    mod(torch.randn(4, 6), torch.tensor([3, 3, 3, 1]))
    assert mod.sampler.counts[3].item() == 4 and "sampler.counts" in mod.state_dict()
    x, W, y = torch.randn(3, 6), torch.randn(10, 6), torch.tensor([1, 2, 3])
    with pytest.raises(TypeError, match="sampled_values"):
        sampled_softmax_loss(x, W, y, 2, sampled_values=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="num_sampled"):
        sampled_softmax_loss(x, W, y, 0, use_full_softmax=True)
    with pytest.raises(ValueError, match="sampled_values"):
        sampled_softmax_loss(x, W, y, 2, sampled_values=(torch.tensor([1, 2]), torch.ones(3), torch.tensor([0.5, 0.0])),
                             validate=True)
    with pytest.raises(RuntimeError, match="backend"):
        compute_sampled_logits(x, W, y, 2, backend="triton")
    from tri_losses import tf_compat
    with pytest.raises(ValueError, match="partition_strategy"):  # TF2 positional order puts seed=42 there
        tf_compat.sampled_softmax_loss(W, None, y[:, None], x, 2, 10, 1, None, True, 42)


def test_sampled_mixed_dtypes_raise_type_error(backend):
    """PyTorch's linear layer raises on a float64 weight (or bias) under float32 input; so do these."""
    x, y = torch.randn(3, 5), torch.tensor([0, 7, 1])
    sv = (torch.tensor([2, 3, 4]), torch.full((3,), 0.5), torch.full((3,), 0.5))
    with pytest.raises(TypeError, match="linear_weight.*float64"):
        sampled_softmax_loss(x, torch.randn(8, 5, dtype=torch.float64), y, 3, sampled_values=sv, backend=backend)
    with pytest.raises(TypeError, match="linear_bias.*float64"):
        nce_loss(x, torch.randn(8, 5), y, 3, linear_bias=torch.randn(8, dtype=torch.float64), sampled_values=sv,
                 backend=backend)


@pytest.mark.parametrize("which", ["true", "sampled"])
@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_sampled_nonpositive_injected_expected_counts_raise(backend, which, bad):
    """A count that is not finite and > 0 raises with validate=True; without it (TF checks nothing) the rows
    that use it get TF's loss, the same on both backends (an expected count of 0 gave inf on one backend and
    NaN on the other before), and no error even on the CPU: NaN, but +inf for a true count of +inf (that
    logit is -inf)."""
    x, W, y = torch.randn(3, 5), torch.randn(8, 5), torch.tensor([0, 7, 1])
    tec, sec = torch.full((3,), 0.5), torch.full((3,), 0.5)
    (tec if which == "true" else sec)[1] = bad
    sv = (torch.tensor([2, 3, 4]), tec, sec)
    for fn in (sampled_softmax_loss, nce_loss):
        with pytest.raises(ValueError, match=f"sampled_values: {which} expected counts"):
            fn(x, W, y, 3, sampled_values=sv, validate=True, backend=backend)
        rows = fn(x, W, y, 3, sampled_values=sv, reduction="none", backend=backend)
        want = torch.tensor([False, True, False]) if which == "true" else torch.tensor([True, True, True])
        if which == "true" and bad == math.inf:
            assert rows[1] == math.inf and bool(torch.isfinite(rows[[0, 2]]).all()), rows
        else:
            assert torch.equal(torch.isnan(rows), want), rows
        assert_close(rows, fn(x, W, y, 3, sampled_values=sv, reduction="none", backend="torch"))


def test_sampled_bad_expected_counts_unchecked_give_the_same_nan_rows(backend, monkeypatch):
    """Where counts are not read (CUDA without validate=True), a row with a non-positive count gets a NaN loss
    on both backends and adds nothing to any gradient; the other rows are unaffected."""
    import tri_losses.sampled as S
    monkeypatch.setattr(S, "_host_checks", lambda t, validate: False)
    g = torch.Generator().manual_seed(8)
    x, W = torch.randn(4, 5, generator=g), torch.randn(8, 5, generator=g)
    up = torch.randn(4)
    up[1] = 0.0
    x, W, up, y, keep = _dev(x, W, up, torch.tensor([0, 7, 1, 5]), torch.tensor([0, 2, 3]))
    x.requires_grad_(True)
    W.requires_grad_(True)
    tec = torch.tensor([0.5, 0.0, 0.5, 0.5], device=DEVICE)
    sv = (torch.tensor([2, 3, 4], device=DEVICE), tec, torch.full((3,), 0.5, device=DEVICE))
    rows = sampled_softmax_loss(x, W, y, 3, sampled_values=sv, reduction="none", backend=backend)
    assert torch.isnan(rows[1]) and torch.isfinite(rows[keep]).all()
    exp = sampled_softmax_loss(x[keep], W, y[keep], 3, sampled_values=(sv[0], tec[keep], sv[2]), reduction="none",
                               backend="torch")
    assert_close(rows[keep], exp)
    gx, gw = torch.autograd.grad(rows, (x, W), up)
    ex, ew = torch.autograd.grad(exp, (x, W), up[keep])
    assert (gx[1] == 0).all()
    assert_close(gx, ex)
    assert_close(gw, ew)


def test_sampled_unchecked_rows_mixing_ignore_index_get_nan(backend, monkeypatch):
    """Unchecked (CUDA without validate=True), a row that mixes ignore_index with real labels (T > 1) gets a NaN
    loss and adds nothing to any gradient, as a row with an out-of-range label does (it was scored silently on a
    placeholder label); the all-ignored row is 0 and the other rows equal the float64 reference."""
    import tri_losses.sampled as S
    monkeypatch.setattr(S, "_host_checks", lambda t, validate: False)
    g = torch.Generator().manual_seed(12)
    N, D, V, m = 4, 5, 9, 3
    x, W = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g)
    y = torch.tensor([[0, 7], [-100, 2], [1, 1], [-100, -100]])
    tec = torch.rand(N, 2, generator=g) + 0.2
    ids, sec = torch.tensor([2, 3, 1]), torch.full((3,), 0.5)
    up = torch.randn(N, generator=g)
    x, W, y, tec, ids, sec, up, keep = _dev(x, W, y, tec, ids, sec, up, torch.tensor([0, 2]))
    x.requires_grad_(True)
    W.requires_grad_(True)
    for fn, ref_loss in ((sampled_softmax_loss, ref.softmax_loss), (nce_loss, ref.nce_loss)):
        rows = fn(x, W, y, m, sampled_values=(ids, tec, sec), remove_accidental_hits=True, reduction="none",
                  backend=backend)
        assert torch.isnan(rows[1]) and rows[3] == 0
        exp = ref_loss(ref.sampled_logits(x.detach().double().cpu()[[0, 2]], W.detach().double().cpu(), None,
                                          y[keep].tolist(), ids.tolist(), tec[keep].double().tolist(),
                                          sec.double().tolist()))
        assert rows[keep].tolist() == pytest.approx(exp, rel=2e-5, abs=2e-5)
        gx, gw = torch.autograd.grad(rows, (x, W), up)
        t64 = [t.detach().double().requires_grad_(True) for t in (x, W)]
        e64 = fn(t64[0][keep], t64[1], y[keep], m, sampled_values=(ids, tec[keep].double(), sec.double()),
                 remove_accidental_hits=True, reduction="none", backend="torch")
        ex, ew = torch.autograd.grad(e64, t64, up[keep].double())
        assert (gx[1] == 0).all()
        assert_close(gx, ex)
        assert_close(gw, ew)


def test_sampled_target_without_labels_raises(backend):
    x, W = _dev(torch.randn(3, 5), torch.randn(8, 5))
    sv = tuple(_dev(torch.tensor([2, 3, 4]), torch.ones(3, 0), torch.full((3,), 0.5)))
    for fn in (sampled_softmax_loss, nce_loss):
        with pytest.raises(ValueError, match=r"target: expected at least one label per row.*\(3, 0\)"):
            fn(x, W, torch.zeros(3, 0, dtype=torch.long, device=DEVICE), 3, sampled_values=sv, backend=backend)


def _recorded_tensors(fn):
    """(fn(), [(shape, dtype) of every tensor an op produced while fn ran])."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            seen.extend((tuple(t.shape), t.dtype) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
            return out

    with Record():
        res = fn()
    return res, seen


@pytest.mark.parametrize("unique", [True, False])
def test_sampler_state_is_o_of_groups_times_m_plus_v(monkeypatch, unique):
    """num_splits = G groups: no (G, V) tensor (several G x V fp64 ones were 1 GB at G = 512, V = 100k); the
    unique draw keys groups in blocks and, on the CPU (one sequential stream), gives bitwise the same samples as
    one block (CUDA's counter-based stream maps elements to bits by launch shape: the same law, other bits)."""
    from tri_losses import samplers
    V, G, m = 1000, 64, 8
    labels, groups = _dev(torch.randint(0, V, (G, 1)), torch.arange(G))
    for smp in (UniformSampler(V), LogUniformSampler(V), FixedUnigramSampler([1.0 + i % 7 for i in range(V)])):
        smp = smp.to(DEVICE)

        def draw():
            return smp.sample(m, labels, unique=unique, groups=groups, num_groups=G, generator=_gen(2))
        whole = draw()
        monkeypatch.setattr(samplers, "GUMBEL_BLOCK", 2 * V)
        got, shapes = _recorded_tensors(draw)
        monkeypatch.undo()
        assert max(math.prod(s) for s, _ in shapes) <= max(2 * V, G * m), type(smp).__name__
        assert got[0].shape == (G, m) and whole[0].shape == (G, m)
        if DEVICE.type == "cpu":
            assert all(torch.equal(a, b) for a, b in zip(got, whole))


def test_sampled_backward_allocates_no_fp32_vocab_by_dim_buffer(backend):
    """bf16 W: the dense weight gradient is written in W's dtype (zero-filled, touched rows written once); no
    fp32 (V, D) buffer and no cast of one (3.25 GB at V = 793k, D = 1024)."""
    g = torch.Generator().manual_seed(9)
    N, D, V, m = 8, 16, 64, 4
    x, W = torch.randn(N, D, generator=g).bfloat16(), torch.randn(V, D, generator=g).bfloat16()
    y = torch.randint(0, V, (N,), generator=g)
    x, W, y = _dev(x, W, y)
    x.requires_grad_(True)
    W.requires_grad_(True)
    sv = tuple(_dev(torch.tensor([3, 9, 17, 40]), torch.full((N,), 0.5), torch.full((m,), 0.5)))
    loss = sampled_softmax_loss(x, W, y, m, sampled_values=sv, backend=backend)
    (gw,), shapes = _recorded_tensors(lambda: torch.autograd.grad(loss, [W]))
    assert gw.dtype == torch.bfloat16
    assert ((V, D), torch.float32) not in shapes
    W64 = W.detach().double().requires_grad_(True)
    exp = sampled_softmax_loss(x.detach().double(), W64, y, m, sampled_values=sv, backend="torch")
    assert_close(gw, torch.autograd.grad(exp, [W64])[0], dtype=torch.bfloat16)


def test_sampled_backward_chunk_fills_the_gpu_within_the_memory_bound(monkeypatch):
    """The backward's chunk of sampled columns (``chunk_columns``): at the goal shape (N = m = 8192, D = 1024,
    bf16) each chunk's dW GEMM fills an H200's 132 SMs (256 tiles: two waves, 97% full) where the old
    kernel's grid had 64 programs per row split, and the (N, chunk) dz buffer stays within 4x the (N, D) gradient (or 2048 columns);
    small m is one chunk."""
    from tri_losses.kernels import linear_cross_entropy as L
    from tri_losses.kernels import sampled as K
    monkeypatch.setattr(K, "interpreting", lambda: False)
    monkeypatch.setattr(L, "interpreting", lambda: False)
    c = K._cfg(torch.empty(0, dtype=torch.bfloat16))
    GM, GN = L._GEMM_TILES["16b"][:2]
    mc = K.chunk_columns(8192, 1024, c["BN"])
    tiles = triton_cdiv(mc, GM) * triton_cdiv(1024, GN)
    assert tiles >= 132 and tiles / (132 * triton_cdiv(tiles, 132)) >= 0.95  # two waves, 97% full
    assert mc <= max(2048, 4 * 1024) and mc % c["BN"] == 0
    assert K.chunk_columns(300, 1024, c["BN"]) == 300
    assert K.chunk_columns(8192, 64, c["BN"]) == 2048


def triton_cdiv(a, b):
    return -(-a // b)


def test_sampled_frozen_weight_gets_no_gradient_and_same_input_gradient(backend):
    """Only the input requires grad (a frozen head): no weight gradient work, the same input gradient; and a
    bias that requires grad alone gets its own."""
    g = torch.Generator().manual_seed(10)
    N, D, V, m = 6, 8, 20, 5
    x = torch.randn(N, D, generator=g)
    W, b = torch.randn(V, D, generator=g), torch.randn(V, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    up = torch.randn(N, generator=g)
    x, W, b, y, up = _dev(x, W, b, y, up)
    x.requires_grad_(True)
    sv = tuple(_dev(torch.tensor([1, 4, 7, 11, 19]), torch.full((N,), 0.3), torch.full((m,), 0.2)))
    (gx,) = torch.autograd.grad(sampled_softmax_loss(x, W, y, m, linear_bias=b, sampled_values=sv, reduction="none",
                                                     backend=backend), [x], up)
    Wr, br = W.clone().requires_grad_(True), b.clone().requires_grad_(True)
    ex, _, eb = torch.autograd.grad(sampled_softmax_loss(x, Wr, y, m, linear_bias=br, sampled_values=sv,
                                                         reduction="none", backend=backend), [x, Wr, br], up)
    assert_close(gx, ex)
    (gb,) = torch.autograd.grad(sampled_softmax_loss(x.detach(), W, y, m, linear_bias=br, sampled_values=sv,
                                                     reduction="none", backend=backend), [br], up)
    assert_close(gb, eb)


@pytest.mark.parametrize("nce", [False, True], ids=["softmax", "nce"])
@pytest.mark.parametrize("injected", [False, True], ids=["sampler", "injected"])
def test_sampled_empty_batch(backend, nce, injected):
    """N = 0 rows: the reductions of an empty loss (PyTorch's: sum 0, mean NaN, none (0,)) and zero gradients."""
    V, D, m = 7, 5, 3
    W, b, x, y = _dev(torch.randn(V, D), torch.randn(V), torch.randn(2, 0, D), torch.zeros(2, 0, dtype=torch.long))
    for t in (W, b, x):
        t.requires_grad_(True)
    fn = nce_loss if nce else sampled_softmax_loss
    for red, G in (("none", 1), ("sum", 1), ("mean", 1)) + ((("sum", 3), ("sum", 9)) if backend == "torch" else ()):
        kw = {}
        if injected:
            ids = torch.tensor([1, 4, 2]) if G == 1 else torch.tensor([1, 4, 2]).expand(G, 3)
            kw = dict(sampled_values=tuple(_dev(ids, torch.ones(2, 0), torch.full(ids.shape, 0.5))))
        out = fn(x, W, y, m, linear_bias=b, reduction=red, num_splits=G, backend=backend, **kw)
        exp = F.cross_entropy(torch.zeros(0, V), torch.zeros(0, dtype=torch.long), reduction=red)
        assert out.dtype == torch.float32
        assert out.shape == ((2, 0) if red == "none" else ())
        if red == "mean":
            assert torch.isnan(out) and torch.isnan(exp)
        else:
            assert_close(out, exp.reshape(out.shape), msg=red)
            gx, gw, gb = torch.autograd.grad(out.sum(), (x, W, b))
            assert gx.shape == x.shape and (gw == 0).all() and (gb == 0).all()


@pytest.mark.parametrize("unique", [True, False])
def test_sampler_groups_alone_give_one_draw_per_group(unique):
    """``sample(m, true_classes, groups=g)`` (without ``num_groups``): G = max(g) + 1 draws, each row's expected
    counts from its own group's number of tries (TF's formula, recomputed here from the returned tries)."""
    smp = LogUniformSampler(50).to(DEVICE)
    tc, groups = _dev(torch.randint(0, 50, (6, 2)), torch.tensor([0, 0, 1, 1, 2, 2]))
    s, tec, sec, nt = smp.sample(5, tc, unique=unique, groups=groups, generator=_gen(0))
    assert s.shape == (3, 5) and sec.shape == (3, 5) and nt.shape == (3,) and tec.shape == (6, 2)
    p = smp.probs().double()
    n = nt.double()[groups][:, None]
    exp_t = torch.where(n == 5, 5 * p[tc], -torch.expm1(n * torch.log1p(-p[tc])))
    assert_close(tec, exp_t)
    if unique:
        assert all(len(set(r.tolist())) == 5 for r in s)


def test_fixed_unigram_distortion_zero_is_uniform_and_tf_absent_arguments(tmp_path):
    """TF's FixedUnigramSampler weighs id k by pow(u_k, distortion): 0 ** 0 = 1, so distortion 0 is uniform over
    every non-reserved id, zero counts included (TF: "distortion = 0.0 gives a uniform distribution"); reserved ids
    weigh 0. TF's absent values (vocab_file="", unigrams=()) count as not given."""
    from tri_losses import tf_compat
    from tri_losses.samplers import make_sampler
    counts, R = [0.0, 3.0, 1.0, 0.0, 5.0], 2
    for d in (0.0, 0.8):
        w = [0.0] * R + [math.pow(u, d) for u in counts]  # float64, TF's formula
        exp = torch.tensor([v / sum(w) for v in w], dtype=torch.float64)
        assert_close(FixedUnigramSampler(counts, distortion=d, num_reserved_ids=R).probs(), exp, msg=f"d={d}")
    f = tmp_path / "vocab.csv"
    f.write_text("a,4\nb,2\n")
    assert make_sampler("fixed_unigram", 2, vocab_file="", unigrams=[1.0, 3.0]).probs().tolist() == [0.25, 0.75]
    assert make_sampler("fixed_unigram", 2, vocab_file=str(f), unigrams=()).probs().tolist() == pytest.approx(
        [2 / 3, 1 / 3])
    tc = torch.tensor([[0], [1]])
    with pytest.raises(ValueError, match="exactly one of a non-empty unigrams or vocab_file, got 2 unigrams and "
                                         "vocab_file="):
        tf_compat.fixed_unigram_candidate_sampler(tc, 1, 1, True, 2, vocab_file=str(f), unigrams=[1.0, 3.0])
    with pytest.raises(ValueError, match="exactly one of a non-empty unigrams or vocab_file, got 0 unigrams and "
                                         "no vocab_file"):
        tf_compat.fixed_unigram_candidate_sampler(tc, 1, 1, True, 2)


def test_tf_compat_candidate_samplers_reject_out_of_range_true_classes():
    """TF's candidate samplers raise for a true class outside [0, range_max) (it is not clamped)."""
    from tri_losses import tf_compat
    for bad in (5, -1):
        tc = torch.tensor([[0], [bad]])
        with pytest.raises(ValueError, match=rf"true_classes: expected ids in \[0, 5\), got {bad}"):
            tf_compat.uniform_candidate_sampler(tc, 1, 2, True, 5, seed=0)
        with pytest.raises(ValueError, match="true_classes"):
            tf_compat.log_uniform_candidate_sampler(tc, 1, 2, False, 5, seed=0)


def test_tf_compat_candidate_samplers_name_range_max():
    """The tf_compat samplers take TF's argument names: a bad ``range_max`` is named so (it was reported as the
    sampler's num_classes), and a learned sampler passed in must cover range_max classes."""
    from tri_losses import tf_compat
    from tri_losses.samplers import LearnedUnigramSampler
    tc = torch.tensor([[0], [1]])
    for fn in (tf_compat.uniform_candidate_sampler, tf_compat.log_uniform_candidate_sampler,
               tf_compat.learned_unigram_candidate_sampler):
        with pytest.raises(ValueError, match=r"range_max: expected a positive int in \[1, inf\], got 0"):
            fn(tc, 1, 1, True, 0)
        with pytest.raises(TypeError, match="range_max: expected a positive int, got float"):
            fn(tc, 1, 1, True, 2.5)
    with pytest.raises(ValueError, match="range_max: the kept range has 3 ids, expected 4"):
        tf_compat.fixed_unigram_candidate_sampler(tc, 1, 1, True, 4, unigrams=[1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="range_max: expected a positive int, got float"):
        tf_compat.fixed_unigram_candidate_sampler(tc, 1, 1, True, 3.0, unigrams=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"sampler: expected a LearnedUnigramSampler over range_max=3 classes, got one over 4"):
        tf_compat.learned_unigram_candidate_sampler(tc, 1, 1, True, 3, sampler=LearnedUnigramSampler(4))
    with pytest.raises(TypeError, match="sampler: expected a LearnedUnigramSampler, got str"):
        tf_compat.learned_unigram_candidate_sampler(tc, 1, 1, True, 3, sampler="log_uniform")
    with pytest.raises(TypeError, match="num_sampled: expected a positive int, got float"):
        tf_compat.all_candidate_sampler(tc, 1, 2.0, True)


def test_tf_compat_takes_backend_and_names_tf_arguments_in_errors(backend):
    """Every tf_compat function takes backend= as the package's ops do (the losses run it; the samplers, which
    have no kernel, refuse "triton"), the loss errors name TF's arguments (biases, labels, weights; they named
    linear_bias, target, linear_weight)."""
    from tri_losses import tf_compat
    from tri_losses.samplers import expected_count
    B, D, V = 3, 4, 20
    W, b, x = torch.randn(V, D, device=DEVICE), torch.randn(V, device=DEVICE), torch.randn(B, D, device=DEVICE)
    labels = torch.randint(0, V, (B, 1), device=DEVICE)
    sv = (torch.tensor([1, 5, 7], device=DEVICE), torch.full((B, 1), 0.2, device=DEVICE),
          torch.full((3,), 0.2, device=DEVICE))
    for fn in (tf_compat.sampled_softmax_loss, tf_compat.nce_loss):
        exp = fn(W, b, labels, x, 3, V, sampled_values=sv, backend="torch")
        assert_close(fn(W, b, labels, x, 3, V, sampled_values=sv, backend=backend), exp)
        name = fn.__name__
        with pytest.raises(ValueError, match=rf"{name}: biases: expected \({V},\)"):
            fn(W, b[:-1], labels, x, 3, V, sampled_values=sv, backend=backend)
        with pytest.raises(ValueError, match=rf"{name}: weights: expected \(num_classes, {D}\)"):
            fn(W[:, :-1], b, labels, x, 3, V, sampled_values=sv, backend=backend)
        with pytest.raises(ValueError, match=rf"{name}: weights: expected a tensor on"):
            fn(W.to("meta"), b, labels, x, 3, V, sampled_values=sv, backend=backend)
        with pytest.raises(IndexError, match=rf"{name}: labels: expected ids in \[0, {V}\), got 25"):
            fn(W, b, torch.tensor([[0], [25], [1]], device=DEVICE), x, 3, V, sampled_values=sv, backend=backend)
        with pytest.raises(ValueError, match=rf"{name}: num_classes: the sampler's range of 25 ids"):
            fn(W, b, labels, x, 3, 25, backend=backend)
    tc = labels.cpu()
    for smp in (lambda **k: tf_compat.uniform_candidate_sampler(tc, 1, 2, True, V, seed=1, **k),
                lambda **k: tf_compat.log_uniform_candidate_sampler(tc, 1, 2, True, V, seed=1, **k),
                lambda **k: tf_compat.fixed_unigram_candidate_sampler(tc, 1, 2, True, V, unigrams=[1.0] * V, seed=1,
                                                                      **k),
                lambda **k: tf_compat.learned_unigram_candidate_sampler(tc, 1, 2, True, V, seed=1, **k),
                lambda **k: tf_compat.all_candidate_sampler(tc, 1, V, True, seed=1, **k)):
        a, c = smp(backend="torch"), smp()
        assert all(torch.equal(p, q) for p, q in zip(a, c))
        with pytest.raises(RuntimeError, match="no Triton kernel"):
            smp(backend="triton")
    with pytest.raises(RuntimeError, match="expected_count: backend='triton' is not available"):
        expected_count(torch.tensor([0.1]), torch.tensor([3]), 3, backend="triton")


def test_sampled_values_true_counts_must_have_the_target_shape():
    """True expected counts are (N, T) as the target (or with a trailing 1); a transposed (T, N) tensor has the
    right number of elements but would pair counts with the wrong labels: it raises."""
    x, W, b, labels, sv = _tf_case(2)  # B = 3 rows, T = 2
    tec = torch.rand(3, 2, dtype=torch.float64) + 0.1
    ok = sampled_softmax_loss(x, W, labels, 4, sampled_values=(sv[0], tec, sv[2]), reduction="none")
    trailing = sampled_softmax_loss(x, W, labels, 4, sampled_values=(sv[0], tec[..., None], sv[2]), reduction="none")
    assert torch.equal(ok, trailing)
    for bad in (tec.t().contiguous(), tec.reshape(-1)):
        with pytest.raises(ValueError, match=r"sampled_values: true expected counts must have the target's shape"):
            sampled_softmax_loss(x, W, labels, 4, sampled_values=(sv[0], bad, sv[2]))


def test_compute_sampled_logits_stops_the_expected_counts_gradient():
    """TF's _compute_sampled_logits stops the gradient of sampled_values: counts that require grad get none (the
    logits still differentiate in x, W, b: d logit / d x = W row, checked against the float64 formula)."""
    x, W, b, labels, (ids, tec, sec) = _tf_case(1)
    tec, sec = tec.clone().requires_grad_(True), sec.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    logits, _ = compute_sampled_logits(xr, W, labels[:, 0], 4, linear_bias=b, sampled_values=(ids, tec, sec),
                                       remove_accidental_hits=False)
    up = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    (gx,) = torch.autograd.grad(logits, [xr], up, retain_graph=True)
    cols = torch.cat([labels, ids.expand(labels.shape[0], -1)], 1)  # (B, 1 + m) class of each column
    assert_close(gx, (up.double()[:, :, None] * W[cols]).sum(1))
    (logits * up).sum().backward()
    assert tec.grad is None and sec.grad is None


@pytest.mark.parametrize("nce", [False, True], ids=["softmax", "nce"])
@pytest.mark.parametrize("G", [1, 3, 7, 10])
def test_sampled_groups_on_both_backends_match_reference(backend, nce, G):
    """num_splits = G in {1, 3, N', 10} (N' = 7 non-ignored rows: per-row negatives; 10 > N': every row in the
    last group, and on the torch backend the per-row form instead of the rows laid out by group) on both
    backends (Triton: one launch per group) against the float64 reference taken group by group (the
    non-ignored rows in order, chunks of floor(N'/G), the last with the rest); gradients (x, dense and sparse
    W, b) against float64 torch."""
    gen = torch.Generator().manual_seed(40 + G + 10 * nce)
    N, D, V, m = 8, 6, 15, 4
    x, W, b = torch.randn(N, D, generator=gen), torch.randn(V, D, generator=gen) * 0.5, torch.randn(V, generator=gen)
    y = torch.randint(0, V, (N,), generator=gen)
    y[3] = -100
    sampled = torch.randint(0, V, (G, m), generator=gen)
    sampled[0, 1] = y[0]  # a hit in the first group
    tec, sec = torch.rand(N, generator=gen) * 0.5 + 0.1, torch.rand(G, m, generator=gen) * 0.5 + 0.1
    up = torch.randn(N, generator=gen)
    x, W, b, y, sampled, tec, sec, up = _dev(x, W, b, y, sampled, tec, sec, up)
    fn = nce_loss if nce else sampled_softmax_loss
    sv = (sampled, tec, sec)
    ts = [t.clone().requires_grad_(True) for t in (x, W, b)]
    got = fn(ts[0], ts[1], y, m, linear_bias=ts[2], sampled_values=sv, num_splits=G, remove_accidental_hits=True,
             reduction="none", backend=backend)
    valid = [i for i in range(N) if i != 3]
    chunk = len(valid) // G
    for k, i in enumerate(valid):
        grp = min(k // chunk, G - 1) if chunk else G - 1
        rows = ref.sampled_logits(x.double().cpu()[i:i + 1], W.double().cpu(), b.double().cpu(), [[int(y[i])]],
                                  sampled[grp].tolist(), [[float(tec[i])]], sec[grp].double().tolist())
        exp = ref.nce_loss(rows) if nce else ref.softmax_loss(rows)
        assert got[i].item() == pytest.approx(exp[0], rel=2e-5, abs=2e-5), (i, grp)
    assert got[3] == 0
    grads = torch.autograd.grad(got, ts, up)
    t64 = [t.double().requires_grad_(True) for t in (x, W, b)]
    e64 = fn(t64[0], t64[1], y, m, linear_bias=t64[2], sampled_values=(sampled, tec.double(), sec.double()),
             num_splits=G, remove_accidental_hits=True, reduction="none", backend="torch")
    for a_, e_ in zip(grads, torch.autograd.grad(e64, t64, up.double())):
        assert_close(a_, e_, atol=5e-5, rtol=5e-5)
    ws = W.clone().requires_grad_(True)
    fn(x, ws, y, m, linear_bias=b, sampled_values=sv, num_splits=G, remove_accidental_hits=True, reduction="none",
       weight_grad="sparse", backend=backend).backward(up)
    assert_close(ws.grad.to_dense(), grads[1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("nce", [False, True], ids=["softmax", "nce"])
@pytest.mark.parametrize("chunk", [5, 16])
@pytest.mark.parametrize("G", [1, 3])
def test_sampled_triton_backward_in_several_column_chunks(monkeypatch, nce, chunk, G):
    """The Triton backward's chunks of sampled columns (``chunk_columns`` forced to 5 or 16 of m = 18: four or
    two chunks, widths that are not and are a multiple of 16), with a bias, repeated ids, a removed hit, an
    ignored row, 1 or 3 sample groups: loss and gradients (x, dense and sparse W, b) against float64 torch."""
    from tri_losses.kernels import sampled as K
    monkeypatch.setattr(K, "chunk_columns", lambda m, D, BN: chunk)
    gen = torch.Generator().manual_seed(7 + chunk + G)
    N, D, V, m = 13, 20, 40, 18
    x, W, b = torch.randn(N, D, generator=gen), torch.randn(V, D, generator=gen) * 0.5, torch.randn(V, generator=gen)
    y = torch.randint(0, V, (N,), generator=gen)
    y[4] = -100
    sampled = torch.randint(0, V, (G, m), generator=gen)
    sampled[0, 1] = sampled[0, 0]
    sampled[0, 2] = y[0]
    tec, sec = torch.rand(N, generator=gen) * 0.5 + 0.1, torch.rand(G, m, generator=gen) * 0.5 + 0.1
    up = torch.randn(N, generator=gen)
    x, W, b, y, sampled, tec, sec, up = _dev(x, W, b, y, sampled, tec, sec, up)
    fn = nce_loss if nce else sampled_softmax_loss
    kw = dict(sampled_values=(sampled, tec, sec), num_splits=G, remove_accidental_hits=True, reduction="none")
    ts = [t.clone().requires_grad_(True) for t in (x, W, b)]
    got = fn(ts[0], ts[1], y, m, linear_bias=ts[2], backend="triton", **kw)
    grads = torch.autograd.grad(got, ts, up)
    t64 = [t.double().requires_grad_(True) for t in (x, W, b)]
    kw64 = dict(kw, sampled_values=(sampled, tec.double(), sec.double()))
    e64 = fn(t64[0], t64[1], y, m, linear_bias=t64[2], backend="torch", **kw64)
    assert_close(got, e64, atol=2e-5, rtol=2e-5)
    for a_, e_, name in zip(grads, torch.autograd.grad(e64, t64, up.double()), ["x", "W", "b"]):
        assert_close(a_, e_, atol=5e-5, rtol=5e-5, msg=name)
    ws = W.clone().requires_grad_(True)
    fn(x, ws, y, m, linear_bias=b, weight_grad="sparse", backend="triton", **kw).backward(up)
    assert_close(ws.grad.to_dense(), grads[1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("nce", [False, True], ids=["softmax", "nce"])
@pytest.mark.parametrize("large", [True, False], ids=["loss-scaler", "tiny"])
def test_sampled_fp16_gradients_with_a_large_or_tiny_upstream(nce, large):
    """fp16 inputs with a loss scaler's upstream (g in [2**16, 2**17): a dominant sampled column's dz exceeds
    fp16's 65504 while every gradient fits) or a tiny one (g ~ 2**-14 over 64 sampled columns: dz ~ 2**-20,
    subnormal in fp16): the Triton backend's gradients (its backward holds dz / sigma in 16 bits) are finite
    and within 2x the error of the torch backend's (fp32 math, one rounding) plus 1e-4 of the largest entry,
    both against float64 on the same rounded inputs."""
    gen = torch.Generator().manual_seed(11)
    N, D, V, m = (6, 16, 32, 5) if large else (6, 16, 80, 64)
    x = (torch.randn(N, D, generator=gen) * (0.05 if large else 0.25)).half()
    W = (torch.randn(V, D, generator=gen) * (0.05 if large else 1.0)).half()
    y = torch.randint(0, V - m, (N,), generator=gen)
    sampled = torch.arange(V - m, V)
    tec, sec = torch.full((N,), 0.5), torch.full((m,), 0.5)
    if large:
        sec[0] = 1e-13  # log-Q correction +30: that column's p ~ 1
    up = (torch.rand(N, generator=gen) + 1) * (2.0 ** 16 if large else 2.0 ** -15)
    x, W, y, sampled, tec, sec, up = _dev(x, W, y, sampled, tec, sec, up)
    fn = nce_loss if nce else sampled_softmax_loss
    kw = dict(sampled_values=(sampled, tec, sec), reduction="none")
    got = {}
    for backend in ("torch", "triton"):
        ts = [t.clone().requires_grad_(True) for t in (x, W)]
        got[backend] = torch.autograd.grad(fn(ts[0], ts[1], y, m, backend=backend, **kw), ts, up)
    t64 = [t.double().requires_grad_(True) for t in (x, W)]
    e64 = fn(t64[0], t64[1], y, m, backend="torch", **dict(kw, sampled_values=(sampled, tec.double(), sec.double())))
    for i, e in enumerate(torch.autograd.grad(e64, t64, up.double())):
        e = e.cpu()
        a, t = got["triton"][i].double().cpu(), got["torch"][i].double().cpu()
        assert got["triton"][i].dtype == torch.float16 and bool(torch.isfinite(a).all()), "xW"[i]
        err, bound = float((a - e).abs().max()), float(2 * (t - e).abs().max() + 1e-4 * e.abs().max())
        assert err <= bound, f"{'xW'[i]}: max error {err:.3g} > {bound:.3g} (largest entry {float(e.abs().max()):.3g})"


@pytest.mark.parametrize("nce", [False, True], ids=["softmax", "nce"])
@pytest.mark.parametrize("which", ["true", "sampled"])
def test_sampled_infinite_expected_counts_give_tfs_loss_and_gradient(backend, nce, which):
    """An expected count of +inf (unchecked) as TF computes it: that logit is -inf, so a true count gives its
    row a +inf loss and a sampled count drops its column (p = 0); a sampled one also makes the loss of every
    row of its group NaN (TF's cross-entropy forms 0 * inf there). The gradients are those of the same
    logits in float64 (written out here), finite, on both backends."""
    g = torch.Generator().manual_seed(21)
    N, D, V = 3, 5, 8
    f64 = dict(generator=g, dtype=torch.float64)
    x, W, b = torch.randn(N, D, **f64), torch.randn(V, D, **f64), torch.randn(V, **f64)
    y, sampled = torch.tensor([0, 7, 1]), torch.tensor([2, 3, 4])
    tec, sec = torch.rand(N, **f64) + 0.2, torch.rand(3, **f64) + 0.2
    (tec if which == "true" else sec)[1] = math.inf
    up = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
    r = [t.clone().requires_grad_(True) for t in (x, W, b)]
    zt = (r[0] * r[1][y]).sum(1) + r[2][y] - torch.log(tec)
    zs = r[0] @ r[1][sampled].T + r[2][sampled] - torch.log(sec)
    if nce:
        exp = F.softplus(-zt) + F.softplus(zs).sum(1)
    else:
        exp = torch.logsumexp(torch.cat([zt[:, None], zs], 1), 1) - zt
    egrads = torch.autograd.grad(exp, r, up)
    dt = torch.float64 if backend == "torch" else torch.float32
    ts = [t.to(dt).to(DEVICE).requires_grad_(True) for t in (x, W, b)]
    fn = nce_loss if nce else sampled_softmax_loss
    sv = tuple(t.to(DEVICE) for t in (sampled, tec.to(dt), sec.to(dt)))
    rows = fn(ts[0], ts[1], y.to(DEVICE), 3, linear_bias=ts[2], sampled_values=sv, reduction="none", backend=backend)
    if which == "true":
        assert rows[1] == math.inf
        assert_close(rows[[0, 2]], exp[[0, 2]], dtype=dt)
    else:
        assert bool(torch.isnan(rows).all()), rows
    for a_, e_, name in zip(torch.autograd.grad(rows, ts, up.to(dt).to(DEVICE)), egrads, ["x", "W", "b"]):
        assert bool(torch.isfinite(a_).all()), name
        assert_close(a_, e_, dtype=dt, msg=name)


def test_sampled_fp16_scale_ignores_ignored_rows_and_tiny_upstreams():
    """The Triton backward's 16-bit dz / sigma: sigma comes from the valid rows' upstream only (a huge upstream
    on an ignored row, which reaches no gradient, pushed the valid rows' dz into fp16's subnormals: 52% error)
    and is at least 2**-126 (an upstream of 1e-39 made 1 / sigma infinite): float64 agreement, finite zeros."""
    g = torch.Generator().manual_seed(0)
    N, D, V, m = 6, 16, 80, 64
    x = (torch.randn(N, D, generator=g) * 0.25).half()
    W = torch.randn(V, D, generator=g).half()
    y = torch.randint(0, V - m, (N,), generator=g)
    y[5] = -100
    sv = (torch.arange(V - m, V), torch.full((N,), 0.5), torch.full((m,), 0.5))
    x, W, y = _dev(x, W, y)
    sv = tuple(t.to(DEVICE) for t in sv)
    x64 = x.double().requires_grad_(True)
    up = torch.ones(N, device=DEVICE)
    up[5] = 2.0 ** 24
    sv64 = (sv[0], sv[1].double(), sv[2].double())
    (e,) = torch.autograd.grad(sampled_softmax_loss(x64, W.double(), y, m, sampled_values=sv64, reduction="none",
                                                    backend="torch"), x64, up.double())
    xs = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(sampled_softmax_loss(xs, W, y, m, sampled_values=sv, reduction="none",
                                                     backend="triton"), xs, up)
    assert float((gx.double() - e).abs().max() / e.abs().max()) < 2e-3
    xs = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(sampled_softmax_loss(xs, W, y, m, sampled_values=sv, reduction="sum",
                                                     backend="triton"), xs, torch.tensor(1e-39, device=DEVICE))
    assert bool(torch.isfinite(gx).all()) and float(gx.abs().max()) < 1e-30


def test_tf_compat_true_classes_must_have_num_true_columns():
    """As TF's candidate-sampler ops ("true_classes must have num_true columns") and losses: a (2, 2) matrix
    with num_true=1 (or (4, 1) with num_true=2) raises naming the argument instead of being reshaped into
    another batch; a loss's labels are (batch, num_true), or (batch,) with num_true=1."""
    from tri_losses import tf_compat
    for fn in (tf_compat.uniform_candidate_sampler, tf_compat.log_uniform_candidate_sampler):
        for tc, nt in ((torch.tensor([[0, 1], [2, 3]]), 1), (torch.tensor([[0], [1], [2], [3]]), 2),
                       (torch.tensor([0, 1]), 1)):
            with pytest.raises(ValueError, match=rf"{fn.__name__}: true_classes: expected shape \(batch, {nt}\)"):
                fn(tc, nt, 2, True, 5, seed=0)
        s, tec, sec = fn(torch.tensor([[0, 1], [2, 3]]), 2, 2, True, 5, seed=0)
        assert tec.shape == (2, 2) and s.shape == sec.shape == (2,)
    g = torch.Generator().manual_seed(0)
    W, b, x = torch.randn(9, 4, generator=g), torch.randn(9, generator=g), torch.randn(5, 4, generator=g)
    for loss in (tf_compat.sampled_softmax_loss, tf_compat.nce_loss):
        with pytest.raises(ValueError, match=rf"{loss.__name__}: labels: expected shape \(5, 1\)"):
            loss(W, b, torch.randint(0, 9, (5, 2), generator=g), x, 3, 9)
        with pytest.raises(ValueError, match=r"labels: expected shape \(5, 2\)"):
            loss(W, b, torch.randint(0, 9, (10,), generator=g), x, 3, 9, num_true=2)
        labels = torch.randint(0, 9, (5,), generator=g)
        sv = tf_compat.log_uniform_candidate_sampler(labels[:, None], 1, 3, True, 9, seed=1)
        assert torch.equal(loss(W, b, labels, x, 3, 9, sampled_values=sv),
                           loss(W, b, labels[:, None], x, 3, 9, sampled_values=sv))


def test_fixed_unigram_weights_that_overflow_float32_raise():
    """Weights unigram ** distortion are summed in fp32 (TF's sampler): counts whose weights or sum overflow
    it raise naming unigrams (the probabilities were NaN or all 0, the losses NaN); a count that is not a
    number (a vocab file's header line) raises naming the argument and the entry."""
    from tri_losses.samplers import FixedUnigramSampler
    for u, d in (([1e10, 5e9, 1.0, 2.0], 4.0), ([3e38, 3e38, 1.0], 1.0)):
        with pytest.raises(ValueError, match=r"unigrams: the weights .* overflow float32"):
            FixedUnigramSampler(unigrams=u, distortion=d)
    p = FixedUnigramSampler(unigrams=[1e9, 5e8, 1.0, 2.0], distortion=4.0).probs().double()
    w = torch.tensor([1e9, 5e8, 1.0, 2.0], dtype=torch.float64) ** 4
    assert torch.isfinite(p).all()
    assert_close(p, w / w.sum(), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match=r"unigrams: expected a count at entry 1 \(a number\), got 'x'"):
        FixedUnigramSampler(unigrams=[1.0, "x"])
    for kw in (dict(unigrams=[1e200, 1.0], distortion=2.0), dict(unigrams=[10.0, 1.0], distortion=400.0),
               dict(unigrams=[10 ** 400, 1])):  # past float64 (Python's OverflowError before)
        with pytest.raises(ValueError, match="overflow"):
            FixedUnigramSampler(**kw)


def test_sampled_modules_check_their_options_and_eval_keeps_backend_and_validate():
    """SampledSoftmaxLoss/NCELoss take the functional's keyword options: a misspelt one raises TypeError at
    construction (as torch.nn modules; it was ignored in eval() and raised at the first train() step); eval()
    passes reduction, ignore_index, backend and validate on to the full softmax (backend was dropped)."""
    for cls in (SampledSoftmaxLoss, NCELoss):
        with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['reducton'\]"):
            cls(4, 10, 3, reducton="sum")
        # sizes are checked by name (torch.empty's RuntimeError about a negative dimension before)
        for args, name, got in (((3, -1, 3), "num_classes", "-1"), ((0, 10, 3), "in_features", "0"),
                                ((4, 10, 0), "num_sampled", "0")):
            with pytest.raises(ValueError, match=f"{cls.__name__}: {name}: expected a positive int .*, got {got}"):
                cls(*args)
        with pytest.raises(TypeError, match="in_features: expected a positive int, got str"):
            cls("4", 10, 3)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 4, generator=g, device=DEVICE), torch.randint(0, 10, (5,), generator=g, device=DEVICE)
    y[1] = -1
    m = SampledSoftmaxLoss(4, 10, 3, reduction="sum", ignore_index=-1).to(DEVICE).eval()
    z = x.double() @ m.weight.double().t() + m.bias.double()
    assert_close(m(x, y).double(), F.cross_entropy(z, y, ignore_index=-1, reduction="sum"), atol=1e-5, rtol=1e-5)
    bad = NCELoss(4, 10, 3, backend="bogus").to(DEVICE).eval()
    with pytest.raises(ValueError, match="backend: expected one of"):
        bad(x, y.clamp(min=0))
    assert NCELoss(4, 10, 3, log_norm_term=0.5, eval_loss="sigmoid").eval()(x.cpu(), y.cpu().clamp(min=0)).isfinite()


def test_sampler_probs_is_a_copy_of_its_table():
    """probs() of the fixed-table samplers returns a copy (as LearnedUnigramSampler's is new): writing to it
    leaves the sampler's expected counts unchanged (it returned the buffer: a caller's p /= p.max() changed
    every later count, e.g. 0.3 -> 3.0)."""
    tc = torch.tensor([[0], [3]])
    for smp in (UniformSampler(10), LogUniformSampler(10), FixedUnigramSampler(unigrams=[1.0, 2.0, 3.0, 4.0])):
        _, ec, _, _ = smp.sample(3, tc, unique=False, generator=torch.Generator().manual_seed(0))
        p = smp.probs()
        expected = p.clone()
        p /= p.max()
        assert torch.equal(smp.probs(), expected), type(smp).__name__
        _, ec2, _, _ = smp.sample(3, tc, unique=False, generator=torch.Generator().manual_seed(0))
        assert torch.equal(ec2, ec), type(smp).__name__


def test_sampler_flags_ids_and_expected_count_are_checked():
    """Sampler.sample (and tf_compat's samplers) take unique as a bool (unique="False" drew unique ids, None drew
    with replacement; TF raises 'Expected bool'), integer true classes only (float ids gave an indexing error;
    uint8 ids were read as a mask, now as ids); expected_count checks its arguments' types, device and m."""
    from tri_losses import tf_compat
    from tri_losses.samplers import expected_count
    tc = torch.tensor([[0], [1]])
    for make in (UniformSampler, LogUniformSampler, AllCandidateSampler, LearnedUnigramSampler):
        smp = make(6)
        for bad in ("False", None, 1):
            with pytest.raises(TypeError, match="sample: unique: expected a bool"):
                smp.sample(3, tc, unique=bad)
        with pytest.raises(TypeError, match="sample: true_classes"):
            smp.sample(3, tc.float())
        a = make(6).sample(3, tc.to(torch.uint8), generator=torch.Generator().manual_seed(1))
        b = make(6).sample(3, tc, generator=torch.Generator().manual_seed(1))
        assert all(torch.equal(u, v) for u, v in zip(a, b))  # uint8 ids are ids, not a mask (nor a scatter error)
    with pytest.raises(TypeError, match="unique: expected a bool"):
        tf_compat.uniform_candidate_sampler(tc, 1, 3, "False", 6)
    for kw, msg in ((dict(unigrams=5), "FixedUnigramSampler: unigrams: expected a sequence of counts, got int"),
                    (dict(unigrams=[1.0, 2.0], distortion="x"), "distortion: expected a number, got str")):
        with pytest.raises(TypeError, match=msg):
            FixedUnigramSampler(**kw)
    with pytest.raises(TypeError, match="sampler: expected a name or a Sampler, got list"):
        sampled_softmax_loss(torch.randn(2, 3), torch.randn(6, 3), torch.tensor([0, 1]), 2, sampler=["uniform"],
                             backend="torch")
    p, nt = torch.tensor([[0.1, 0.2]]), torch.tensor([[3]])
    assert_close(expected_count(p, nt, 2), -torch.expm1(3 * torch.log1p(-p)))
    assert_close(expected_count(p, torch.tensor([[2]]), 2), 2 * p)
    for args, exc, msg in (((p.tolist(), nt, 2), TypeError, "expected_count: p"),
                           ((p, 3, 2), TypeError, "expected_count: num_tries"),
                           ((p, nt.float(), 2), TypeError, "expected_count: num_tries"),
                           ((p, nt, 0), ValueError, "expected_count: m"),
                           ((p, nt, True), TypeError, "expected_count: m"),
                           ((p, nt.to("meta"), 2), ValueError, "num_tries")):
        with pytest.raises(exc, match=msg):
            expected_count(*args)


def test_bad_arguments_and_meta_tensors_raise_naming_them():
    """tf_compat's losses check inputs, weights (a tensor or a list of shards), biases and labels (bare
    AttributeError/IndexError/RuntimeError before); a meta tensor beside real ones (labels, injected sampled
    ids, generic_ce's target, causal_lm_loss's labels) raises a ValueError naming it, not 'Cannot copy out of
    meta tensor'."""
    import tri_losses as T
    from tri_losses import hf, tf_compat
    g = torch.Generator().manual_seed(0)
    W, b, x = torch.randn(9, 4, generator=g), torch.randn(9, generator=g), torch.randn(3, 4, generator=g)
    y = torch.tensor([[1], [2], [3]])
    for loss in (tf_compat.sampled_softmax_loss, tf_compat.nce_loss):
        n = loss.__name__
        for kw, exc, msg in ((dict(inputs=None), TypeError, f"{n}: inputs"),
                             (dict(inputs=[[1.0] * 4] * 3), TypeError, f"{n}: inputs"),
                             (dict(weights=torch.tensor(1.0)), ValueError, f"{n}: weights: expected"),
                             (dict(weights=None), TypeError, f"{n}: weights"),
                             (dict(biases=[1.0, 2.0]), TypeError, r"biases\[0\]"),
                             (dict(biases=torch.tensor(1.0)), ValueError, f"{n}: biases"),
                             (dict(labels=None), TypeError, f"{n}: labels"),
                             (dict(labels=y.float()), TypeError, f"{n}: labels"),
                             (dict(labels=y.to("meta")), ValueError, f"{n}: labels: expected a tensor with data")):
            args = dict(weights=W, biases=b, labels=y, inputs=x)
            args.update(kw)
            with pytest.raises(exc, match=msg):
                loss(args["weights"], args["biases"], args["labels"], args["inputs"], 2, 9)
        assert loss(W, b, y.tolist(), x, 2, 9, seed=0).shape == (3,)  # a list of labels, as TF converts it
    sv = (torch.tensor([4, 5]).to("meta"), torch.ones(3), torch.ones(2))
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="sampled_values: expected a tensor with data"):
            sampled_softmax_loss(x, W, y[:, 0], 2, sampled_values=sv, backend=backend)
    with pytest.raises(ValueError, match="generic_ce_loss: target: expected a tensor on cpu"):
        T.generic_ce_loss(x, y[:, 0].to("meta"))
    with pytest.raises(ValueError, match="causal_lm_loss: labels: expected a tensor with data"):
        hf.causal_lm_loss(torch.randn(1, 3, 9), y.reshape(1, 3).to("meta"))


def test_sampler_tables_stay_fp32_under_dtype_casts(backend):
    """``.half()``/``.bfloat16()``/``.double()``/``.to(dtype)`` of a loss module (or of a sampler) leave the
    sampler's tables as they are: an fp16 table rounded the expected counts (and rare classes' probabilities
    to 0: a NaN loss for their rows); device moves still apply."""
    V, m = 5000, 8
    x = torch.randn(6, 16, device=DEVICE)
    w = torch.randn(V, 16, device=DEVICE) * 0.1
    y = torch.tensor([0, 17, 4999, 300, 2, 4000], device=DEVICE)
    expect = sampled_softmax_loss(x, w, y, m, sampler=LogUniformSampler(V).to(DEVICE), reduction="none",
                                  generator=torch.Generator(DEVICE).manual_seed(3), backend=backend)
    module = SampledSoftmaxLoss(16, V, m, sampler="fixed_unigram",
                                sampler_kwargs={"unigrams": list(range(1, V + 1))}).to(DEVICE)
    fixed = module.sampler.probs()
    for cast in (lambda a: a.half(), lambda a: a.bfloat16(), lambda a: a.double(), lambda a: a.to(torch.float16)):
        smp = cast(LogUniformSampler(V).to(DEVICE))
        assert smp.probs().dtype == torch.float32
        got = sampled_softmax_loss(x, w, y, m, sampler=smp, reduction="none",
                                   generator=torch.Generator(DEVICE).manual_seed(3), backend=backend)
        assert torch.equal(got, expect)
        cast(module)
        assert torch.equal(module.sampler.probs(), fixed)
    learned = LearnedUnigramSampler(V).double()
    assert learned.counts.dtype == torch.int64 and learned.probs().dtype == torch.float32


def test_a_sampler_passed_in_is_not_moved(backend):
    """A sampler instance the caller passes is used where it is, never moved in place (the caller's learned
    counts went to the input's device, or were dropped for a ``meta`` input): a ``meta`` (shape-only) call
    uses a copy; a sampler on another device than the input raises naming ``sampler``."""
    smp = LearnedUnigramSampler(10)
    smp.counts += torch.arange(10)
    before = smp.counts.clone()
    fixed = FixedUnigramSampler(unigrams=list(range(1, 11)))
    h, W = torch.randn(4, 3, device="meta"), torch.randn(10, 3, device="meta")
    y = torch.zeros(4, dtype=torch.long, device="meta")
    if backend == "torch":  # (the Triton backend refuses meta tensors before sampling)
        for s in (smp, fixed):
            assert sampled_softmax_loss(h, W, y, 2, sampler=s, backend=backend).device.type == "meta"
        module = SampledSoftmaxLoss(3, 10, 2, sampler=smp, weight=W)
        assert module(h, y).device.type == "meta"
        assert module.sampler.counts.device.type == "cpu"
    assert smp.counts.device.type == "cpu" and torch.equal(smp.counts, before)
    assert fixed._p.device.type == "cpu"
    x, w = torch.randn(4, 3, device=DEVICE), torch.randn(10, 3, device=DEVICE)
    with pytest.raises(ValueError, match="sampled_softmax_loss: sampler: expected its tables on the input's device"):
        sampled_softmax_loss(x, w, torch.zeros(4, dtype=torch.long, device=DEVICE), 2,
                             sampler=LearnedUnigramSampler(10).to("meta"), backend=backend)


def test_tensor_sampler_kwargs_updated_in_place_are_read_again(backend):
    """``sampler_kwargs`` holding a tensor (unigram counts the caller updates in place): the named sampler is
    built from its values on each call (the cache keyed the tensor by identity and kept the first table)."""
    V = 6
    h, W = torch.randn(3, 4, device=DEVICE), torch.randn(V, 4, device=DEVICE)
    y = torch.tensor([0, 1, 2], device=DEVICE)
    counts = torch.ones(V)

    def loss(c):
        return nce_loss(h, W, y, 2, sampler="fixed_unigram", sampler_kwargs={"unigrams": c}, unique=False,
                        reduction="none", generator=torch.Generator(DEVICE).manual_seed(0), backend=backend)
    loss(counts)
    counts.copy_(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1000.0]))
    assert torch.equal(loss(counts), loss(counts.tolist()))


def test_tf_compat_candidate_samplers_build_their_table_once(monkeypatch, tmp_path):
    """TF's candidate sampler ops keep their kernel (and its table) between eager calls: the fixed-unigram one
    builds its O(V) table, or reads its vocab file, once per options and device, not on every call (34 ms a
    call at V=100k against 1.5 ms for the draw); the draws are those of the sampler built directly."""
    from tri_losses import samplers, tf_compat
    built = []

    class Counting(samplers.FixedUnigramSampler):
        def __init__(self, *a, **k):
            built.append(k)
            super().__init__(*a, **k)
    monkeypatch.setattr(samplers, "FixedUnigramSampler", Counting)
    sampled_mod = __import__("tri_losses.sampled", fromlist=["_SAMPLER_CACHE"])
    monkeypatch.setattr(sampled_mod, "_SAMPLER_CACHE", {})
    path = tmp_path / "vocab.csv"
    path.write_text("".join(f"w{k},{k % 7 + 1}\n" for k in range(50)))
    tc = torch.tensor([[3], [11]], device=DEVICE)
    for kw in (dict(unigrams=[float(k % 7 + 1) for k in range(50)]), dict(vocab_file=str(path))):
        built.clear()
        outs = [tf_compat.fixed_unigram_candidate_sampler(tc, 1, 5, True, 50, seed=4, **kw) for _ in range(3)]
        assert len(built) == 1, kw
        direct = samplers.FixedUnigramSampler(unigrams=[float(k % 7 + 1) for k in range(50)]).to(DEVICE)
        s, tec, sec, _ = direct.sample(5, tc, generator=torch.Generator(DEVICE).manual_seed(4))
        for out in outs:
            assert torch.equal(out[0], s[0]) and torch.equal(out[1], tec) and torch.equal(out[2], sec[0])


@pytest.mark.parametrize("nce", [False, True], ids=["softmax", "nce"])
def test_torch_backend_groups_laid_out_without_reading_sizes(monkeypatch, nce):
    """The torch backend's batched layout of the rows by group, sized as on a GPU (no host read of the group
    sizes: the public functions' split bounds them), gives the per-row form's losses and gradients with ignored
    rows and uneven groups; a split of another form with a group past that bound gives NaN rows (the op's
    contract), never a silently dropped row."""
    from tri_losses._torch import sampled as ts_
    gen = torch.Generator().manual_seed(5)
    N, D, V, m = 29, 6, 40, 4
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    W, b = torch.randn(V, D, generator=gen, dtype=torch.float64), torch.randn(V, generator=gen, dtype=torch.float64)
    y = torch.randint(0, V, (N,), generator=gen)
    y[[2, 3, 17]] = -100
    up = torch.randn(N, generator=gen, dtype=torch.float64)
    fn = nce_loss if nce else sampled_softmax_loss
    real = ts_._layout

    def run(layout):
        monkeypatch.setattr(ts_, "_layout", layout)
        ps = [t.clone().requires_grad_(True) for t in (x, W, b)]
        loss = fn(ps[0], ps[1], y, m, linear_bias=ps[2], num_splits=G, reduction="none",
                  generator=torch.Generator().manual_seed(1), backend="torch")
        return (loss,) + torch.autograd.grad(loss, ps, up)
    for G in (2, 4, 5):
        unread = run(lambda group, valid, G_, read_sizes=None: real(group, valid, G_, read_sizes=False))
        assert unread is not None and real(torch.zeros(N, dtype=torch.long), torch.ones(N), G, False) is not None
        per_row = run(lambda *a, **k: None)
        for a_, e_ in zip(unread, per_row):
            assert_close(a_, e_, atol=1e-12, rtol=1e-12)
    # a split of another form: group 0 holds 20 of the rows, past N // G + G - 1 = 11 for G = 3
    group = torch.tensor([0] * 20 + [1] * 5 + [2] * 4)
    lay = real(group, torch.ones(N, dtype=torch.int8), 3, read_sizes=False)
    z = lay.back(torch.bmm(lay.rows(x), W[:3 * m].view(3, m, D).transpose(1, 2)))
    assert lay.S == 11
    assert torch.isnan(z[11:20]).all() and not torch.isnan(z[:11]).any() and not torch.isnan(z[20:]).any()


def test_compute_sampled_logits_with_groups_under_fake_tensors():
    """compute_sampled_logits (plain torch) with num_splits > 1 traces under FakeTensorMode and make_fx: the
    group layout reads no sizes from fake tensors (it raised DataDependentOutputException there)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    N, D, V, m = 12, 4, 30, 2

    def f(x, w, y, ids, tec, sec):
        return compute_sampled_logits(x, w, y, m, num_splits=2, sampled_values=(ids, tec, sec))
    args = (torch.randn(N, D), torch.randn(V, D), torch.randint(0, V, (N,)), torch.tensor([[1, 2], [3, 4]]),
            torch.ones(N), torch.ones(2, m))
    expect = [tuple(t.shape) for t in f(*args)]
    with FakeTensorMode() as mode:
        fake = tuple(mode.from_tensor(a) for a in args)
        assert [tuple(t.shape) for t in f(*fake)] == expect
    assert [tuple(t.shape) for t in make_fx(f, tracing_mode="fake")(*args)(*args)] == expect


def test_sampler_sample_checks_true_class_and_group_ranges(monkeypatch):
    """Sampler.sample clamped an id >= V to V-1 (LogUniform's count for id 7 of V=5 came back as P(4)'s) and
    wrapped a group id of -1 to the last group: now an IndexError naming the argument where the values are on
    the host, NaN counts for those rows where they are not (CUDA without a sync); a negative id is an ignored
    row (count 0, as the losses pass it). Reference: TF's formula m * P(c), P(c) = ln((c+2)/(c+1)) / ln(V+1)."""
    import tri_losses._validate as V_
    V, m = 5, 3
    smp = LogUniformSampler(V)
    p = lambda c: math.log((c + 2) / (c + 1)) / math.log(V + 1)  # noqa: E731
    _, ec, _, _ = smp.sample(m, torch.tensor([[1], [-1], [4]]), unique=False)
    assert_close(ec, torch.tensor([[m * p(1)], [0.0], [m * p(4)]]), atol=1e-6, rtol=1e-6)
    with pytest.raises(IndexError, match=r"sample: true_classes: expected ids < num_classes=5 .*got 7"):
        smp.sample(m, torch.tensor([[1], [7]]), unique=False)
    tc = torch.tensor([[1], [2]])
    for g, msg in (([0, -1], r"groups: expected ids in \[0, 2\), got -1"), ([0, 2], r"expected ids in \[0, 2\), got 2")):
        with pytest.raises(IndexError, match=msg):
            smp.sample(2, tc, groups=torch.tensor(g), num_groups=2)
    with pytest.raises(TypeError, match="sample: groups"):
        smp.sample(2, tc, groups=torch.tensor([0.0, 1.0]), num_groups=2)
    with pytest.raises(ValueError, match=r"sample: groups: expected shape \(2,\)"):
        smp.sample(2, tc, groups=torch.tensor([0, 1, 1]), num_groups=2)
    with pytest.raises(ValueError, match=r"sample: true_classes: expected \(N,\) or \(N, num_true\)"):
        smp.sample(2, tc[None])
    for kw in (dict(true_classes=tc.to("meta")), dict(true_classes=tc, groups=torch.tensor([0, 1], device="meta"))):
        # (torch's NotImplementedError "Cannot copy out of meta tensor" before)
        name = "groups" if "groups" in kw else "true_classes"
        with pytest.raises(ValueError, match=f"sample: {name}: expected a tensor with data .*got a meta tensor"):
            smp.sample(2, num_groups=2, **kw)
    # AllCandidateSampler (its own sample): the same checks; count 1 as TF's, 0 for an ignored entry
    allc = AllCandidateSampler(V)
    _, ec, _, _ = allc.sample(3, torch.tensor([[1, -1], [4, 0]]))
    assert ec.tolist() == [[1.0, 0.0], [1.0, 1.0]]
    with pytest.raises(IndexError, match="true_classes: expected ids < num_classes=5"):
        allc.sample(3, torch.tensor([[1], [7]]))
    with pytest.raises(IndexError, match=r"groups: expected ids in \[0, 2\), got -1"):
        allc.sample(3, tc, groups=torch.tensor([0, -1]), num_groups=2)
    # uint8 ids and groups are compared in int64 (V = 300 wraps to 44 in uint8: id 200 was refused)
    big = LogUniformSampler(300)
    _, ec, _, _ = big.sample(m, torch.tensor([[5], [200]], dtype=torch.uint8),
                             groups=torch.tensor([0, 200], dtype=torch.uint8), num_groups=300, unique=False)
    p300 = lambda c: math.log((c + 2) / (c + 1)) / math.log(301)  # noqa: E731
    assert_close(ec, torch.tensor([[m * p300(5)], [m * p300(200)]]), atol=1e-6, rtol=1e-6)
    # values not on the host (as on CUDA): no check, no out-of-bounds read, those rows' counts NaN
    monkeypatch.setattr(V_, "host_readable", lambda t, validate=False: False)
    _, ec, _, nt = smp.sample(m, torch.tensor([[1], [7], [2]]), groups=torch.tensor([0, 0, 3]), num_groups=2,
                              unique=False)
    assert ec[1].isnan().all() and ec[2].isnan().all()
    assert_close(ec[0], torch.tensor([m * p(1)]), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("nce", [False, True], ids=["softmax", "nce"])
def test_sampled_under_autocast_runs_the_head_in_the_autocast_dtype(backend, nce):
    """Under torch.autocast(bfloat16) the sampled losses cast input, linear_weight and linear_bias to bf16, as
    autocast runs F.linear (and linear_cross_entropy), then run with autocast off. Before, a bf16 hidden state
    from an autocast nn.Linear with the fp32 head raised a dtype error, and with fp32 operands the torch
    backend's matmuls ran in bf16 under the caller's autocast while the Triton backend stayed fp32 (and NCE's
    loss and gradient disagreed). Now both backends, backward inside or after the block, equal the float64
    loss and gradients of the bf16-rounded operands."""
    fn = nce_loss if nce else sampled_softmax_loss
    x, W, b, labels, sv = _tf_case(2)
    x, W, b = (t.float() for t in (x, W, b))
    sv = (sv[0], sv[1].float(), sv[2].float())
    kw = dict(sampled_values=sv, remove_accidental_hits=True, reduction="sum")
    r = [t.detach().to(torch.bfloat16).double().requires_grad_(True) for t in (x, W, b)]
    exp = fn(r[0], r[1], labels, 4, linear_bias=r[2], backend="torch",
             sampled_values=(sv[0], sv[1].double(), sv[2].double()), remove_accidental_hits=True, reduction="sum")
    exp.backward()
    for bwd_inside in (False, True):
        ts = [t.detach().clone().requires_grad_(True) for t in (x, W, b)]
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            got = fn(ts[0], ts[1], labels, 4, linear_bias=ts[2], backend=backend, **kw)
            if bwd_inside:
                got.backward()
        if not bwd_inside:
            got.backward()
        assert got.dtype == torch.float32
        assert_close(got, exp, atol=2e-5, rtol=2e-5)  # fp32 math on exactly the bf16 operands
        for t, e, name in zip(ts, r, ["input", "linear_weight", "linear_bias"]):
            assert t.grad.dtype == torch.float32
            assert_close(t.grad, e.grad, dtype=torch.bfloat16, msg=name)
    # a bf16 hidden state from an autocast layer with the fp32 head (a dtype error before)
    lin = torch.nn.Linear(x.shape[1], x.shape[1]).to(DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        h = lin(x)
        assert h.dtype == torch.bfloat16
        got = fn(h, W, labels, 4, linear_bias=b, backend=backend, **kw)
    exp = fn(h.detach().double(), W.to(torch.bfloat16).double(), labels, 4, linear_bias=b.to(torch.bfloat16).double(),
             backend="torch", sampled_values=(sv[0], sv[1].double(), sv[2].double()), remove_accidental_hits=True,
             reduction="sum")
    assert_close(got, exp, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 2])
def test_nce_confident_true_class_gradient_has_no_cancellation(backend, dtype, T):
    """NCE's true-column gradient sigmoid(z') - 1/T is formed as (1 - 1/T) - sigmoid(-z'): at a confident
    true logit (z' = 12 .. 20) the float32 sigmoid(z') rounds to 1 and the old form gave W[y]'s gradient 0
    (T = 1) or lost it to rounding, where the float64 value is -sigmoid(-z') / T-ish (2e-9 at z' = 20). Against
    the float64 formula of the same loss on identical sampled ids (both backends; the gradient comes back in
    the input's dtype, as PyTorch's softplus composite gives it)."""
    N, D, V, m = 3, 4, 12, 3
    x = torch.ones(N, D, device=DEVICE)
    W = torch.zeros(V, D, device=DEVICE)
    y = torch.tensor([[3, 5], [4, 6], [5, 7]], device=DEVICE)[:, :T]
    W[3], W[4], W[5], W[6], W[7] = 5.0, 4.0, 3.0, 4.5, 3.5  # true logits 12 .. 20
    sv = (torch.tensor([8, 9, 10], device=DEVICE), torch.ones(N, T, device=DEVICE), torch.ones(m, device=DEVICE))
    grads = {}
    for who, dt in (("ours", dtype), ("ref", torch.float64)):
        xi = x.to(dt).clone().requires_grad_()
        Wi = W.to(dt).clone().requires_grad_()
        if who == "ours":
            loss = nce_loss(xi, Wi, y if T > 1 else y[:, 0], m, sampled_values=sv, backend=backend)
        else:  # -log sigmoid(z) per true column (target 1/T each), -log sigmoid(-z) per sample, summed per row
            zt = (xi[:, None, :] * Wi[y]).sum(-1)
            zs = xi @ Wi[sv[0]].T
            loss = ((F.softplus(-zt) + (T - 1) * F.softplus(zt)).sum(1) / T + F.softplus(zs).sum(1)).mean()
        loss.backward()
        grads[who] = Wi.grad.double()
    rows = y.reshape(-1).unique()
    ref_rows = grads["ref"][rows]
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert bool((ref_rows.abs() > 0).all())
    torch.testing.assert_close(grads["ours"][rows], ref_rows, rtol=tol, atol=0)


def test_fixed_unigram_state_dict_sets_the_drawable_classes():
    """A sampler given another's table by load_state_dict draws as one built from that table: unique sampling
    refuses more draws than classes of nonzero weight (it drew zero-weight classes, the loss NaN) and allows
    as many as the loaded table has."""
    from tri_losses.samplers import FixedUnigramSampler
    few = FixedUnigramSampler(unigrams=[0] * 5 + [1, 2, 3])
    many = FixedUnigramSampler(unigrams=[1] * 8)
    few_loaded = FixedUnigramSampler(unigrams=[1] * 8)
    few_loaded.load_state_dict(few.state_dict())
    y = torch.tensor([[5], [6]])
    for s in (few, few_loaded):
        with pytest.raises(ValueError, match=r"unique sampling needs num_sampled <= .*\(3\)"):
            s.sample(4, y)
        drawn = s.sample(3, y, generator=torch.Generator().manual_seed(0))[0]
        assert sorted(drawn.flatten().tolist()) == [5, 6, 7]
    many_loaded = FixedUnigramSampler(unigrams=[0] * 5 + [1, 2, 3])
    many_loaded.load_state_dict(many.state_dict())
    assert many_loaded.sample(6, y, generator=torch.Generator().manual_seed(0))[0].unique().numel() == 6
