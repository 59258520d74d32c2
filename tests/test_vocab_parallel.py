"""Vocab-parallel cross-entropy (``process_group=``, DTensor inputs) over gloo on CPU.

Each rank holds a contiguous, uneven slice of the classes (a tiny or an empty one included); the
loss on every rank, and each rank's gradient slice, are compared with the single-process result on
the whole vocabulary (the torch backend in float64, in the parent process), with random per-row
upstream gradients. The worker pools start once per module (tests/dist_pool.py).
"""
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import tri_losses as tl
from tests.conftest import DEVICE
from tests.dist_pool import DistPool
from tests.reference import ce as ref_ce

N, V = 12, 37
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


@pytest.fixture(scope="module")
def pool2():
    pool = DistPool(2)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def pool3():
    pool = DistPool(3)
    yield pool
    pool.close()


# every option, with the whole-vocabulary input it takes ("logits", "log_probs", "probs", "dense")
CASES = [
    ("logits", dict(reduction="none")),
    ("logits", dict(reduction="none", label_smoothing=0.1, inplace_backward=True)),
    ("logits", dict(reduction="none", label_smoothing=0.2, label_smoothing_mode="others", weight=True)),
    ("logits", dict(reduction="none", label_smoothing=0.3, label_smoothing_mode="gaussian", focal_gamma=2.0)),
    ("logits", dict(reduction="none", z_loss=1e-2, softcap=3.0, fake_upper_bound=3.5, return_lse=True)),
    ("logits", dict(reduction="none", focal_gamma=1.5, weight=True, label_smoothing=0.1)),
    ("logits", dict(reduction="mean", weight=True)),
    ("logits", dict(reduction="mean", label_smoothing=0.1)),
    ("logits", dict(reduction="sum", focal_gamma=2.0, z_loss=1e-3)),
    ("log_probs", dict(reduction="none", label_smoothing=0.1, weight=True)),
    ("probs", dict(reduction="none", focal_gamma=1.0)),
    ("dense", dict(reduction="none", label_smoothing=0.1, weight=True)),
    ("dense", dict(reduction="mean")),
]


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    x[1, 5] = -math.inf  # a masked class
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < 0.2] = -100
    y[2], y[3] = -100, V - 1
    w = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
    q = torch.rand(N, V, generator=g, dtype=torch.float64).softmax(1)
    up = torch.randn(N, generator=g, dtype=torch.float64)
    up_lse = torch.randn(N, generator=g, dtype=torch.float64)
    return x, y, w, q, up, up_lse


def _inputs(kind, x, y, q):
    x = torch.where(x == -math.inf, -30.0, x) if kind != "logits" else x
    if kind == "log_probs":
        return x.log_softmax(1), y
    if kind == "probs":
        return x.softmax(1), y
    return x, (q if kind == "dense" else y)


def _run(x, target, w, kw, up, up_lse, **call):
    """loss (and lse), the input gradient, for one call with per-row upstream gradients."""
    x = x.detach().clone().requires_grad_()
    out = tl.cross_entropy(x, target, w if kw.get("weight") else None,
                           **{k: v for k, v in kw.items() if k != "weight"}, **call)
    loss, lse = out if kw.get("return_lse") else (out, None)
    total = (loss * up).sum() if loss.dim() else loss * up[0]
    if lse is not None:
        total = total + (lse * up_lse).sum()
    total.backward()
    return loss.detach(), None if lse is None else lse.detach(), x.grad


def _np(ts):
    """Worker results travel as numpy arrays (pickled by value, no shared-memory handles)."""
    return tuple(None if t is None else t.detach().numpy() for t in ts)


def _t(a):
    return None if a is None else torch.from_numpy(a)


def _on_device(ts):
    """The single-process op tests' data on the test device (CUDA where there is one: the Triton case
    then runs compiled; the gloo workers keep CPU tensors)."""
    return tuple(t.to(DEVICE) for t in ts)


def _bounds(sizes):
    b = [0]
    for s in sizes:
        b.append(b[-1] + s)
    assert b[-1] == V
    return b


def _worker_cases(rank, world, group, sizes, backend, cases, seed, give_start):
    b = _bounds(sizes)
    lo, hi = b[rank], b[rank + 1]
    x, y, w, q, up, up_lse = _data(seed)
    out = []
    for kind, kw in cases:
        xf, target = _inputs(kind, x, y, q)
        xs = xf[:, lo:hi].float()
        ts = target[:, lo:hi].float() if kind == "dense" else target
        out.append(_np(_run(xs, ts, w[lo:hi].float(), kw, up.float(), up_lse.float(), backend=backend,
                            process_group=group, vocab_start=lo if give_start else None)))
    return out


def _reference(kind, kw, seed):
    x, y, w, q, up, up_lse = _data(seed)
    xf, target = _inputs(kind, x, y, q)
    return _run(xf, target, w, kw, up, up_lse, backend="torch")


def _compare(results, sizes, cases, seed):
    b = _bounds(sizes)
    for i, (kind, kw) in enumerate(cases):
        loss, lse, grad = _reference(kind, kw, seed)
        for rank, per_rank in enumerate(results):
            r_loss, r_lse, r_grad = map(_t, per_rank[i])
            msg = f"case {kind} {kw}, rank {rank}, shard {b[rank]}:{b[rank + 1]}"
            torch.testing.assert_close(r_loss.double(), loss, atol=2e-5, rtol=2e-5, equal_nan=True, msg=msg)
            if lse is not None:
                torch.testing.assert_close(r_lse.double(), lse, atol=2e-5, rtol=2e-5, equal_nan=True, msg=msg)
            torch.testing.assert_close(r_grad.double(), grad[:, b[rank]:b[rank + 1]], atol=2e-5, rtol=2e-5, equal_nan=True,
                                       msg=msg)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_vocab_parallel_two_ranks_every_option(pool2, backend):
    sizes = (36, 1)  # a tiny shard; y[3] = V - 1 lives there
    _compare(pool2.run(_worker_cases, sizes, backend, CASES, 0, False), sizes, CASES, 0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_vocab_parallel_three_ranks_every_option(pool3, backend):
    sizes = (2, 23, 12)
    cases = CASES[1:5] + CASES[7:8] + CASES[10:12]
    _compare(pool3.run(_worker_cases, sizes, backend, cases, 1, False), sizes, cases, 1)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_vocab_parallel_empty_shard_and_given_vocab_start(pool3, backend):
    sizes = (19, 0, 18)
    cases = CASES[3:7] + CASES[-2:]  # the dense mean too: its denominator is the whole row count on every rank
    _compare(pool3.run(_worker_cases, sizes, backend, cases, 2, True), sizes, cases, 2)


def _worker_nd(rank, world, group, sizes, backend):
    """(B, C, d) input (class dim 1) with class ids and with probability targets, a rank without classes."""
    b = _bounds(sizes)
    x, y, _, q, up, _ = _data(8)
    out = []
    for dense in (False, True):
        x3 = x.float().reshape(2, N // 2, V).movedim(2, 1)  # (2, V, N/2)
        t3 = q.float().reshape(2, N // 2, V).movedim(2, 1) if dense else y.reshape(2, N // 2)
        for red in ("none", "mean"):
            xs = x3[:, b[rank]:b[rank + 1]].detach().clone().requires_grad_()
            ts = t3[:, b[rank]:b[rank + 1]] if dense else t3
            loss = tl.cross_entropy(xs, ts, reduction=red, process_group=group, backend=backend)
            (loss * up.float().reshape(2, N // 2) if red == "none" else loss).sum().backward()
            xr = x3.detach().clone().requires_grad_()
            ref = tl.cross_entropy(xr, t3, reduction=red, backend="torch")
            (ref * up.float().reshape(2, N // 2) if red == "none" else ref).sum().backward()
            out.append(_np((loss, ref, xs.grad, xr.grad[:, b[rank]:b[rank + 1]])))
    return out


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_vocab_parallel_nd_input_with_an_empty_shard(pool3, backend):
    """A (B, C, d) input where one rank holds no classes (it reshaped to (-1, 0) and failed, leaving the other
    ranks waiting in a collective): every rank gets the whole-vocabulary loss and its gradient slice."""
    for per_rank in pool3.run(_worker_nd, (20, 0, 17), backend):
        for loss, ref, g, gref in per_rank:
            torch.testing.assert_close(_t(loss), _t(ref), atol=2e-5, rtol=2e-5, equal_nan=True)
            torch.testing.assert_close(_t(g), _t(gref), atol=2e-5, rtol=2e-5, equal_nan=True)


def _worker_module(rank, world, group, backend):
    x, y, w, _, up, _ = _data(3)
    b = _bounds((30, 7))
    xs = x[:, b[rank]:b[rank + 1]].float().requires_grad_()
    loss_fn = tl.CrossEntropyLoss(w[b[rank]:b[rank + 1]].float(), label_smoothing=0.1, reduction="none",
                                  backend=backend, process_group=group)
    loss = loss_fn(xs, y)
    (loss * up.float()).sum().backward()
    return _np((loss, xs.grad)), _copies_keep_the_group(loss_fn, lambda m: m(xs, y), loss)


def _copies_keep_the_group(module, call, want):
    """copy.deepcopy of a vocab-parallel loss module keeps its group (an EMA copy, Accelerate); torch.save /
    pickle keeps the default group and, for another group, loads asking for it (a ProcessGroup cannot be
    pickled: both raised TypeError). Returns what differs, [] when all is well."""
    import copy
    import io
    import pickle
    bad = []
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    for how, m in (("deepcopy", copy.deepcopy(module)), ("pickle", pickle.loads(pickle.dumps(module))),
                   ("torch.save", torch.load(buf, weights_only=False))):
        if how == "deepcopy" and m.kwargs["process_group"] is not module.kwargs["process_group"]:
            bad.append("deepcopy: another group")
        if not torch.equal(call(m), want):
            bad.append(how)
    other = dist.new_group(list(range(dist.get_world_size())))
    m = copy.deepcopy(module)
    m.kwargs["process_group"] = other
    if copy.deepcopy(m).kwargs["process_group"] is not other:
        bad.append("deepcopy: not the same subgroup")
    loaded = pickle.loads(pickle.dumps(m))
    try:
        call(loaded)
        bad.append("a pickled subgroup ran")
    except ValueError as e:
        if "process_group" not in str(e) or "set it again" not in str(e):
            bad.append(str(e))
    loaded.kwargs["process_group"] = other
    if not torch.equal(call(loaded), want):
        bad.append("subgroup set again")
    return bad


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_vocab_parallel_module(pool2, backend):
    x, y, w, _, up, _ = _data(3)
    x = x.requires_grad_()
    ref = torch.nn.functional.cross_entropy(x, y, w, label_smoothing=0.1, reduction="none")
    (ref * up).sum().backward()
    b = _bounds((30, 7))
    for rank, (res, bad) in enumerate(pool2.run(_worker_module, backend)):
        assert bad == [], bad
        loss, grad = map(_t, res)
        torch.testing.assert_close(loss.double(), ref.detach(), atol=2e-5, rtol=2e-5, equal_nan=True)
        torch.testing.assert_close(grad.double(), x.grad[:, b[rank]:b[rank + 1]], atol=2e-5, rtol=2e-5, equal_nan=True)


def _worker_dtensor(rank, world, group, backend):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    x, y, _, _, up, _ = _data(4)
    mesh = DeviceMesh("cpu", list(range(world)))
    xd = distribute_tensor(x.float(), mesh, [Shard(1)]).requires_grad_()
    loss, lse = tl.cross_entropy(xd, y, reduction="none", label_smoothing=0.2, return_lse=True, backend=backend)
    assert isinstance(loss, DTensor) and loss.placements == (Replicate(),) and isinstance(lse, DTensor)
    (loss.to_local() * up.float()).sum().backward()
    # the gradient's placement is the one torch gives a leaf through to_local() alone: Shard(1) (torch
    # 2.11 makes an uneven shard's Replicate); the op must not change it. Compared whole on every rank.
    probe = distribute_tensor(x.float(), mesh, [Shard(1)]).requires_grad_()
    probe.to_local().sum().backward()
    assert isinstance(xd.grad, DTensor) and xd.grad.placements == probe.grad.placements
    return _np((loss.to_local(), lse.to_local(), xd.grad.full_tensor()))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_vocab_parallel_dtensor_sharded_on_classes(pool2, backend):
    x, y, _, _, up, _ = _data(4)
    x = x.requires_grad_()
    ref = torch.nn.functional.cross_entropy(x, y, label_smoothing=0.2, reduction="none")
    (ref * up).sum().backward()
    for res in pool2.run(_worker_dtensor, backend):
        loss, lse, grad = map(_t, res)
        torch.testing.assert_close(loss.double(), ref.detach(), atol=2e-5, rtol=2e-5, equal_nan=True)
        torch.testing.assert_close(lse.double(), torch.logsumexp(x.detach(), 1), atol=2e-5, rtol=2e-5, equal_nan=True)
        torch.testing.assert_close(grad.double(), x.grad, atol=2e-5, rtol=2e-5, equal_nan=True)


def _collide(y, classes):
    """Valid class ids that differ from ``y`` at three kept positions with 1-based indices p < q < r, by
    r - q, p - r and q - p: their sum and their position-weighted sum stay the same (what a checksum
    comparison misses)."""
    import itertools
    kept = [i for i in range(len(y)) if y[i] >= 0]
    for i, j, k in itertools.combinations(kept, 3):
        new = y[[i, j, k]] + torch.tensor([k - j, i - k, j - i])
        if bool(((new >= 0) & (new < classes)).all()):
            y = y.clone()
            y[[i, j, k]] = new
            return y
    raise AssertionError("no three ids to change")


def _bad_start(what, rank, lo):
    """vocab_start for the bad-slice cases: a gap or an overlap at rank 1, given on rank 0 only, or invalid
    (negative) on rank 1."""
    if what in ("gap", "overlap"):
        return lo + (rank if what == "gap" else -rank)  # rank 1 starts one past (a gap) or before its slice
    if what == "invalid_start":
        return lo if rank == 0 else -3
    return lo if what.startswith("mixed_start") and rank == 0 else None


def _bad_weight(what, rank, classes):
    """Class weights for the one-rank cases: a slice one too long on rank 1 ("weight_len") or on every rank
    ("weight_len_all"), an error each rank finds before the call's first collective."""
    if what in ("weight_len", "weight_len_all"):
        return torch.ones(classes + (rank == 1 or what == "weight_len_all"))
    return None


def _worker_bad(rank, world, group, what):
    x, y, _, _, _, _ = _data(5)
    b = _bounds((20, 17))
    xs = x[:, b[rank]:b[rank + 1]].float()
    if what == "target":
        y = y.clone()
        y[4] = V + 3  # outside every shard (each shard alone would also miss ids of the others)
    elif what in ("rows", "rows_unvalidated"):
        xs, y = (xs[:-1], y[:-1]) if rank == 1 else (xs, y)
    elif what in ("ids", "ids_unvalidated") and rank == 1:
        y = y.roll(1)  # valid ids, the same multiset, another order: a silent NaN or wrong loss unchecked
    elif what in ("collide", "collide_unvalidated"):
        y = _collide(y, V) if rank == 1 else y
    elif what in ("input_dtype", "input_dtype_unvalidated") and rank == 1:
        xs = xs.double()  # (float64 collectives on rank 1: a gloo abort, were it not checked in every call)
    elif what == "nd_rows":  # (1, C_r, N) rows along a trailing dim; rank 1 has one more, padded with id 0
        xs, y = xs.t()[None], y[None]
        if rank == 1:
            xs, y = torch.cat([xs, xs[..., :1]], 2), torch.cat([y, torch.zeros_like(y[:, :1])], 1)
    try:
        tl.cross_entropy(xs, y, process_group=group, validate=not what.endswith("_unvalidated"), backend="torch",
                         vocab_start=_bad_start(what, rank, b[rank]), weight=_bad_weight(what, rank, xs.shape[1]),
                         label_smoothing=0.1 * rank if what.startswith("options") else 0.0)
    except (ValueError, TypeError) as e:
        return str(e)
    return None


def _check_bad_input_messages(pool2, worker):
    """Every rank names the argument, the expected and the actual value for each bad input."""
    for msg in pool2.run(worker, "target"):
        assert msg is not None and "target" in msg and f"[0, {V})" in msg and str(V + 3) in msg
    for what in ("rows", "rows_unvalidated"):  # checked in every call: without validate an error, not a hang
        for msg in pool2.run(worker, what):
            assert msg is not None and "input" in msg and "row counts" in msg and f"[{N}, {N - 1}]" in msg, msg
    for what in ("input_dtype", "input_dtype_unvalidated"):  # checked in every call: an error, not a gloo abort
        for msg in pool2.run(worker, what):
            assert msg is not None and "same input dtype" in msg and "['float32', 'float64']" in msg, msg
    for what in ("gap", "overlap"):
        for msg in pool2.run(worker, what):
            assert msg is not None and "vocab_start" in msg and "without gaps or overlaps" in msg, msg
    # another order; ids that keep a sum and a position-weighted sum; both checked in every call (a hash of the
    # ids in the shard all-gather: a silently wrong loss before without validate)
    for what in ("ids", "collide", "ids_unvalidated", "collide_unvalidated"):
        for msg in pool2.run(worker, what):
            assert msg is not None and "same (global) class ids" in msg and "ranks [1]" in msg, (what, msg)
    for what in ("mixed_start", "mixed_start_unvalidated"):  # given on rank 0 only: an error, not a hang
        for msg in pool2.run(worker, what):
            assert msg is not None and "vocab_start" in msg and "every rank" in msg and "ranks [0] of 2" in msg, msg
    # label smoothing / reduce_input_grad differing on rank 1: checked in every call (unvalidated, a differing
    # reduce_input_grad left the other rank waiting in the backward's all-reduce, another input type aborted gloo)
    for what in ("options", "options_unvalidated"):
        for msg in pool2.run(worker, what):
            assert msg is not None and "same options" in msg and "ranks [1]" in msg, (what, msg)
    rank0, rank1 = pool2.run(worker, "invalid_start")  # -3 on rank 1: rank 0 is told, not left waiting
    assert rank0 is not None and "vocab_start" in rank0 and "ranks [1]" in rank0, rank0
    assert rank1 is not None and "vocab_start" in rank1 and "-3" in rank1, rank1
    rank0, rank1 = pool2.run(worker, "weight_len")  # only rank 1's slice is wrong: rank 0 is told, not left waiting
    assert rank0 is not None and "ranks [1] of process_group rejected their arguments" in rank0, rank0
    assert rank1 is not None and "weight" in rank1 and "(18,)" in rank1, rank1
    rank0, rank1 = pool2.run(worker, "weight_len_all")  # every rank wrong: each raises its own error
    assert rank0 is not None and "weight" in rank0 and "(21,)" in rank0 and "rejected" not in rank0, rank0
    assert rank1 is not None and "weight" in rank1 and "(18,)" in rank1 and "rejected" not in rank1, rank1
    if worker is _worker_bad:  # rows of an N-d input: every position counts, not only the batch dim
        for msg in pool2.run(worker, "nd_rows"):
            assert msg is not None and "row counts" in msg and f"[{N}, {N + 1}]" in msg, msg


def test_vocab_parallel_bad_input(pool2):
    _check_bad_input_messages(pool2, _worker_bad)


def _worker_option_types(rank, world, group):
    """Equal options of other types on the two ranks (0 and 0.0, a NumPy float, an infinite cap and none)."""
    import numpy as np
    x, y, _, _, _, _ = _data(7)
    lo, hi = _bounds((20, 17))[rank:rank + 2]
    kw = (dict(z_loss=0, softcap=None, label_smoothing=0.1) if rank == 0 else
          dict(z_loss=0.0, softcap=math.inf, label_smoothing=np.float64(0.1)))
    ce = tl.cross_entropy(x[:, lo:hi].float(), y, process_group=group, backend="torch", **kw)
    x2, W, _, y2, _, _, _ = _lce_data(7)
    lce = tl.linear_cross_entropy(x2.float(), W[lo:hi].float(), y2, process_group=group, backend="torch", **kw)
    return ce.item(), lce.item()


def test_vocab_parallel_equal_options_of_other_types_agree(pool2):
    """The ranks' options are compared in every call by value: equal values of other types pass, and the loss
    is the whole-vocabulary one."""
    x, y, _, _, _, _ = _data(7)
    x2, W, _, y2, _, _, _ = _lce_data(7)
    ce = tl.cross_entropy(x.float(), y, label_smoothing=0.1, backend="torch").item()
    lce = tl.linear_cross_entropy(x2.float(), W.float(), y2, label_smoothing=0.1, backend="torch").item()
    for got in pool2.run(_worker_option_types):
        assert got == pytest.approx((ce, lce), rel=1e-5)


def _worker_group_of_one(rank, world, group, backend):
    groups = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    x, y, w, q, up, up_lse = _data(6)
    out = []
    for kind, kw in CASES[3:5] + CASES[-2:-1]:
        xf, target = _inputs(kind, x, y, q)
        args = (xf.float(), target.float() if kind == "dense" else target, w.float(), kw, up.float(), up_lse.float())
        plain = _run(*args, backend=backend)
        alone = _run(*args, backend=backend, process_group=groups[rank])
        out.append((_np(plain), _np(alone)))
    return out


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_vocab_parallel_group_of_one_equals_plain_call(pool2, backend):
    for per_rank in pool2.run(_worker_group_of_one, backend):
        for plain, alone in per_rank:
            for a, b in zip(plain, alone):
                if a is not None:
                    torch.testing.assert_close(_t(b), _t(a), atol=1e-6, rtol=1e-6, equal_nan=True)


def _worker_compile(rank, world, group, backend):
    """Under torch.compile a process_group call runs eagerly (a graph break): the compiled function gives
    the eager result; fullgraph=True fails naming the eager-only function."""
    x, y, _, _, up, _ = _data(7)
    b = _bounds((20, 17))
    xs = x[:, b[rank]:b[rank + 1]].float()
    g = torch.Generator().manual_seed(3)
    h, W = torch.randn(N, 5, generator=g), torch.randn(V, 5, generator=g)[b[rank]:b[rank + 1]]

    def ce(t):
        return (tl.cross_entropy(t, y, reduction="none", label_smoothing=0.1, process_group=group,
                                 backend=backend) * up.float()).sum()

    def lce(t, w):
        return tl.linear_cross_entropy(t, w, y, process_group=group, backend=backend)

    out = []
    for fn, args in ((ce, (xs,)), (lce, (h, W))):
        res = []
        for run in (fn, torch.compile(fn, backend="aot_eager")):
            torch._dynamo.reset()
            a = [t.clone().requires_grad_(True) for t in args]
            loss = run(*a)
            loss.backward()
            res.append((loss,) + tuple(t.grad for t in a))
        torch._dynamo.reset()
        try:
            torch.compile(fn, backend="aot_eager", fullgraph=True)(*args)
            msg = None
        except Exception as e:  # dynamo's own error type
            msg = str(e)
        out.append((_np(res[0]), _np(res[1]), msg))
    # torch.export's non-strict trace sets is_compiling() (not is_dynamo_compiling()) for the whole trace: the
    # eager-only detour is dynamo's alone (taken there, it re-entered itself without end)
    real = torch.compiler.is_compiling
    torch.compiler.is_compiling = lambda: True
    try:
        for fn, args in ((ce, (xs,)), (lce, (h, W))):
            out.append((_np((fn(*args),)), _np((fn(*args),)), "_vocab_parallel_runs_eagerly"))
    finally:
        torch.compiler.is_compiling = real
    return out


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_vocab_parallel_under_torch_compile_runs_eagerly(pool2, backend):
    for per_rank in pool2.run(_worker_compile, backend):
        for eager, compiled, msg in per_rank:
            for a, c in zip(eager, compiled):
                torch.testing.assert_close(_t(c), _t(a), atol=1e-6, rtol=1e-6)
            assert msg is not None and "_vocab_parallel_runs_eagerly" in msg, msg


# ------------------------------------------------------------------------------------------------
# the local half without a group: tri_losses::ce_partial on a shard at an offset, Triton vs torch
# ------------------------------------------------------------------------------------------------
PARTIAL_OPTS = [  # dense, smoothing, smooth_mode, input_type, gamma, softcap (the op's codes)
    (False, 0.0, 0, 0, 0.0, 0.0), (False, 0.1, 1, 0, 2.0, 4.0), (False, 0.2, 2, 0, 0.0, 0.0),
    (False, 0.3, 3, 0, 1.5, 0.0), (False, 0.0, 0, 1, 2.0, 0.0), (False, 0.1, 1, 2, 1.0, 0.0),
    (True, 0.1, 1, 0, 0.0, 0.0),
]


@pytest.mark.parametrize("opts", PARTIAL_OPTS)
def test_ce_partial_triton_matches_torch_on_a_shard(opts):
    dense, eps, mode, itype, gamma, softcap = opts
    x, y, w, q, _, _ = _on_device(_data(7))
    xf, target = _inputs({0: "logits", 1: "log_probs", 2: "probs"}[itype] if not dense else "dense", x, y, q)
    lo, hi = 9, 21  # classes 9..20 of V: some targets here, most elsewhere
    xs = xf[:, lo:hi].float().contiguous()
    ts = target[:, lo:hi].float().contiguous() if dense else target
    args = (ts, w[lo:hi].float(), dense, -100, eps, mode, itype, gamma, 0.0, softcap, math.inf, lo, V)
    ref = torch.ops.tri_losses.ce_partial(xs.double(), *args, False)
    part = torch.ops.tri_losses.ce_partial(xs, *args, True)
    cols = 5 if gamma != 0.0 else 4  # t_y - m is formed only for focal
    torch.testing.assert_close(part[:, :cols].double(), ref[:, :cols], atol=2e-5, rtol=2e-5, equal_nan=True)
    assert dense or ((y >= lo) & (y < hi)).any()  # the hit on this shard is exercised


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_ce_partial_opcheck(backend):
    x, y, w, _, _, _ = _on_device(_data(8))
    args = (x[:, 3:20].float().contiguous(), y, w[3:20].float(), False, -100, 0.1, 1, 0, 2.0, 0.0, 0.0, math.inf,
            3, V, backend == "triton")
    torch.library.opcheck(torch.ops.tri_losses.ce_partial.default, args, test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------------------------------------
# linear cross-entropy: each rank holds rows of the head, the input is replicated
# ------------------------------------------------------------------------------------------------
D = 6
# options (bias / weight / dense: what the case passes); the reference is tests/reference/ce.py in float64 on
# the materialised whole-vocabulary logits
LCE_CASES = [
    dict(reduction="none"),
    dict(reduction="none", label_smoothing=0.1, weight=True, bias=True, chunk_size=40),
    dict(reduction="none", label_smoothing=0.2, label_smoothing_mode="others", focal_gamma=1.5, bias=True),
    dict(reduction="none", label_smoothing=0.3, label_smoothing_mode="gaussian", z_loss=1e-2, softcap=3.0,
         weight=True),
    dict(reduction="mean", weight=True, bias=True, label_smoothing=0.1),
    dict(reduction="mean", focal_gamma=2.0, z_loss=1e-3),
    dict(reduction="sum", label_smoothing=0.2, label_smoothing_mode="others", bias=True),
    dict(reduction="none", reduce_input_grad=False, bias=True, label_smoothing=0.1),
    dict(reduction="mean", dense=True, label_smoothing=0.1, bias=True),
    dict(reduction="none", return_lse=True, z_loss=1e-2, softcap=3.0, bias=True),
    dict(reduction="mean", return_lse=True, label_smoothing=0.1, weight=True),
    dict(reduction="none", return_argmax=True, bias=True, softcap=3.0),  # tied classes 0 and V - 1 (_lce_tied)
    dict(reduction="mean", return_argmax=True, return_lse=True, bias=True),
    dict(reduction="none", dense=True, return_argmax=True, return_lse=True, bias=True),  # materialised logits
    dict(reduction="none", return_entropy=True, softcap=3.0, bias=True, label_smoothing=0.1, masked=True),
    dict(reduction="mean", return_entropy=True, return_lse=True, return_argmax=True, bias=True, chunk_size=40),
]
_REF_KEYS = dict(label_smoothing="eps", label_smoothing_mode="mode", focal_gamma="gamma", z_loss="z_loss",
                 softcap="softcap")


def _lce_data(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    W = torch.randn(V, D, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < 0.2] = -100
    y[2], y[3] = -100, V - 1
    cw = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
    q = torch.rand(N, V, generator=g, dtype=torch.float64).softmax(1)
    up = torch.randn(N, generator=g, dtype=torch.float64)
    return x, W, b, y, cw, q, up


def _lce_tied(kw, W, b):
    """return_argmax cases: classes 0 and V - 1 (first and last shard) with zero head rows and a bias of 6:
    equal logits in any GEMM, the row max on most rows (the lower id is the prediction). ``masked``: class
    4's bias is -inf (no probability; the entropy's terms must skip it)."""
    if kw.get("return_argmax") or kw.get("masked"):
        W, b = W.clone(), b.clone()
    if kw.get("return_argmax"):
        W[[0, V - 1]] = 0.0
        b[[0, V - 1]] = 6.0
    if kw.get("masked"):
        b[4] = -math.inf
    return W, b


def _lce_up_lse(seed, which=1000):
    """The lse's (entropy's: which=2000) per-row upstream gradient for the return_lse (return_entropy) cases."""
    return torch.randn(N, generator=torch.Generator().manual_seed(seed + which), dtype=torch.float64)


def _lce_call_kwargs(kw):
    return {k: v for k, v in kw.items() if k not in ("weight", "bias", "dense", "masked")}


def _lce_unpack(out, kw):
    """(loss, lse, argmax, entropy) of a call's output, None for those not asked for."""
    out = list(out) if isinstance(out, tuple) else [out]
    return tuple([out.pop(0)] + [out.pop(0) if kw.get(f"return_{k}") else None for k in ("lse", "argmax", "entropy")])


def _lce_backward(loss, up, lse=None, up_lse=None, ent=None, up_ent=None):
    total = (loss * up).sum() if loss.dim() else loss * up[0]
    total = total + (lse * up_lse).sum() if lse is not None else total
    (total + (ent * up_ent).sum() if ent is not None else total).backward()


def _worker_lce(rank, world, group, sizes, backend, cases, seed, give_start):
    lo, hi = _bounds(sizes)[rank:rank + 2]
    x0, W0, b0, y, cw, q, up = _lce_data(seed)
    out = []
    for kw in cases:
        W, b = _lce_tied(kw, W0, b0)
        x = x0.float().requires_grad_()
        w = W[lo:hi].float().requires_grad_()
        bias = b[lo:hi].float().requires_grad_() if kw.get("bias") else None
        target = q[:, lo:hi].float() if kw.get("dense") else y
        out_ = tl.linear_cross_entropy(x, w, target, linear_bias=bias, weight=cw[lo:hi].float() if kw.get("weight")
                                       else None, backend=backend, process_group=group,
                                       vocab_start=lo if give_start else None, **_lce_call_kwargs(kw))
        loss, lse, pred, ent = _lce_unpack(out_, kw)
        _lce_backward(loss, up.float(), lse, _lce_up_lse(seed).float(), ent, _lce_up_lse(seed, 2000).float())
        out.append(_np((loss, x.grad, w.grad, None if bias is None else bias.grad, lse, pred, ent)))
    return out


def _lce_reference(kw, seed, sizes):
    """Float64 whole-vocabulary loss and gradients; the input gradient also split by the head's shards
    (each shard's part: what a rank holds before the all-reduce)."""
    x0, W, b, y, cw, q, up = _lce_data(seed)
    W, b = _lce_tied(kw, W, b)
    bnd = _bounds(sizes)
    xs = [x0.clone().requires_grad_() for _ in sizes]
    W, b = W.clone().requires_grad_(), b.clone().requires_grad_()
    z = torch.cat([xs[r] @ W[bnd[r]:bnd[r + 1]].t() for r in range(len(sizes))], 1)
    z = z + b if kw.get("bias") else z
    target, weight = (q if kw.get("dense") else y), (cw if kw.get("weight") else None)
    rows, valid = ref_ce.ce_rows(z, target, weight, **{_REF_KEYS[k]: v for k, v in kw.items() if k in _REF_KEYS})
    loss = ref_ce.reduce(rows, valid, target, weight, kw["reduction"], bool(kw.get("dense")))
    cap = kw.get("softcap")
    zc = cap * torch.tanh(z / cap) if cap else z
    lse = torch.logsumexp(zc, 1) if kw.get("return_lse") else None
    pred = zc.argmax(1) if kw.get("return_argmax") else None
    ent = ref_ce.entropy(zc) if kw.get("return_entropy") else None
    _lce_backward(loss, up, lse, _lce_up_lse(seed), ent, _lce_up_lse(seed, 2000))
    return (loss.detach(), sum(t.grad for t in xs), [t.grad for t in xs], W.grad, b.grad,
            None if lse is None else lse.detach(), pred, None if ent is None else ent.detach())


def _lce_compare(results, sizes, cases, seed):
    bnd = _bounds(sizes)
    for i, kw in enumerate(cases):
        loss, dx, dx_parts, dW, db, lse, pred, ent = _lce_reference(kw, seed, sizes)
        if pred is not None:  # the tie is there: class 0 (not V - 1) predicted on some rows
            assert (pred == 0).sum() >= 3
        for rank, per_rank in enumerate(results):
            r_loss, r_dx, r_dw, r_db, r_lse, r_pred, r_ent = map(_t, per_rank[i])
            lo, hi = bnd[rank:rank + 2]
            msg = f"case {kw}, rank {rank}, shard {lo}:{hi}"
            close = dict(atol=3e-5, rtol=3e-5, equal_nan=True, msg=msg)
            torch.testing.assert_close(r_loss.double(), loss, **close)
            if lse is not None:
                torch.testing.assert_close(r_lse.double(), lse, **close)
            if pred is not None:
                assert torch.equal(r_pred, pred), msg
            if ent is not None:
                torch.testing.assert_close(r_ent.double(), ent, **close)
            want_dx = dx if kw.get("reduce_input_grad", True) else dx_parts[rank]
            torch.testing.assert_close(r_dx.double(), want_dx, **close)
            torch.testing.assert_close(r_dw.double(), dW[lo:hi], **close)
            if kw.get("bias"):
                torch.testing.assert_close(r_db.double(), db[lo:hi], **close)
        if not kw.get("reduce_input_grad", True):  # the parts differ from the whole: the test can tell them apart
            assert not torch.allclose(dx_parts[0], dx, atol=1e-3)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_lce_vocab_parallel_two_ranks_every_option(pool2, backend):
    sizes = (36, 1)  # a tiny shard; y[3] = V - 1 lives there
    _lce_compare(pool2.run(_worker_lce, sizes, backend, LCE_CASES, 10, False), sizes, LCE_CASES, 10)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_lce_vocab_parallel_three_ranks(pool3, backend):
    sizes = (2, 23, 12)
    cases = LCE_CASES[1:4] + LCE_CASES[5:8]
    _lce_compare(pool3.run(_worker_lce, sizes, backend, cases, 11, False), sizes, cases, 11)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_lce_vocab_parallel_empty_shard_and_given_vocab_start(pool3, backend):
    sizes = (19, 0, 18)
    cases = LCE_CASES[2:5] + LCE_CASES[7:]
    _lce_compare(pool3.run(_worker_lce, sizes, backend, cases, 12, True), sizes, cases, 12)


def _worker_lce_module(rank, world, group, backend):
    lo, hi = _bounds((30, 7))[rank:rank + 2]
    x0, W, b, y, _, _, up = _lce_data(13)
    loss_fn = tl.LinearCrossEntropyLoss(D, hi - lo, bias=True, reduction="none", label_smoothing=0.1,
                                        backend=backend, process_group=group)
    with torch.no_grad():
        loss_fn.linear.weight.copy_(W[lo:hi])
        loss_fn.linear.bias.copy_(b[lo:hi])
    x = x0.float().requires_grad_()
    loss = loss_fn(x, y)
    (loss * up.float()).sum().backward()
    return (_np((loss, x.grad, loss_fn.linear.weight.grad, loss_fn.linear.bias.grad)),
            _copies_keep_the_group(loss_fn, lambda m: m(x, y), loss))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_lce_vocab_parallel_module(pool2, backend):
    x, W, b, y, _, _, up = (t.requires_grad_() if t.is_floating_point() else t for t in _lce_data(13))
    ref = torch.nn.functional.cross_entropy(x @ W.t() + b, y, label_smoothing=0.1, reduction="none")
    (ref * up.detach()).sum().backward()
    bnd = _bounds((30, 7))
    for rank, (res, bad) in enumerate(pool2.run(_worker_lce_module, backend)):
        assert bad == [], bad
        loss, dx, dw, db = map(_t, res)
        close = dict(atol=3e-5, rtol=3e-5)
        torch.testing.assert_close(loss.double(), ref.detach(), **close)
        torch.testing.assert_close(dx.double(), x.grad, **close)
        torch.testing.assert_close(dw.double(), W.grad[bnd[rank]:bnd[rank + 1]], **close)
        torch.testing.assert_close(db.double(), b.grad[bnd[rank]:bnd[rank + 1]], **close)


def _worker_lce_dtensor(rank, world, group, backend):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    x0, W, b, y, _, _, up = _lce_data(14)
    mesh = DeviceMesh("cpu", list(range(world)))
    wd = distribute_tensor(W.float(), mesh, [Shard(0)]).requires_grad_()
    bd = distribute_tensor(b.float(), mesh, [Shard(0)]).requires_grad_()
    xd = distribute_tensor(x0.float(), mesh, [Replicate()]).requires_grad_()
    loss = tl.linear_cross_entropy(xd, wd, y, linear_bias=bd, reduction="none", focal_gamma=1.0, backend=backend)
    assert isinstance(loss, DTensor) and loss.placements == (Replicate(),)
    (loss.to_local() * up.float()).sum().backward()
    assert wd.grad.placements == (Shard(0),) and xd.grad.placements == (Replicate(),)
    try:  # a head sharded on D (the wrong dim) is refused, naming the argument
        tl.linear_cross_entropy(x0.float(), distribute_tensor(W.float(), mesh, [Shard(1)]), y, backend=backend)
        refused = None
    except ValueError as e:
        refused = str(e)
    try:  # a DTensor input cannot carry a rank's part of its gradient (DTensor takes a replicated one as reduced)
        tl.linear_cross_entropy(xd, wd, y, reduce_input_grad=False, backend=backend)
        refused_part = None
    except ValueError as e:
        refused_part = str(e)
    assert refused_part is not None and "reduce_input_grad" in refused_part and "DTensor" in refused_part
    _, lse = tl.linear_cross_entropy(xd, wd, y, linear_bias=bd, return_lse=True, backend=backend)  # a tuple of two
    assert isinstance(lse, DTensor) and lse.placements == (Replicate(),)
    return _np((loss.to_local(), xd.grad.to_local(), wd.grad.to_local(), bd.grad.to_local(), lse.to_local())) + (
        refused,)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_lce_vocab_parallel_dtensor_head_sharded_on_rows(pool2, backend):
    x, W, b, y, _, _, up = _lce_data(14)
    x, W, b = x.requires_grad_(), W.requires_grad_(), b.requires_grad_()
    rows, _ = ref_ce.ce_rows(x @ W.t() + b, y, gamma=1.0)
    (rows * up).sum().backward()
    start = 0
    for res in pool2.run(_worker_lce_dtensor, backend):
        *res, refused = res
        loss, dx, dw, db, lse = map(_t, res)
        close = dict(atol=3e-5, rtol=3e-5)
        torch.testing.assert_close(loss.double(), rows.detach(), **close)
        torch.testing.assert_close(lse.double(), torch.logsumexp(x @ W.t() + b, 1).detach(), **close)
        torch.testing.assert_close(dx.double(), x.grad, **close)
        torch.testing.assert_close(dw.double(), W.grad[start:start + dw.shape[0]], **close)
        torch.testing.assert_close(db.double(), b.grad[start:start + dw.shape[0]], **close)
        start += dw.shape[0]
        assert refused is not None and "linear_weight" in refused and "Shard(0)" in refused
    assert start == V


def _worker_lce_bad(rank, world, group, what):
    lo, hi = _bounds((20, 17))[rank:rank + 2]
    x, W, _, y, _, _, _ = _lce_data(15)
    if what == "target":
        y = y.clone()
        y[4] = V + 3  # outside every shard
    elif what in ("rows", "rows_unvalidated") and rank == 1:
        x, y = x[:-1], y[:-1]
    elif what in ("ids", "ids_unvalidated") and rank == 1:
        y = y.roll(1)
    elif what in ("collide", "collide_unvalidated"):
        y = _collide(y, V) if rank == 1 else y
    x, W = x.float(), W.float()
    if what == "input" and rank == 1:  # the replicated input differs in one value
        x = x.clone()
        x[3, 2] = torch.nextafter(x[3, 2], torch.tensor(math.inf))  # one ulp
    elif what == "input_nan":  # NaN at the same place on every rank: the same input
        x = x.clone()
        x[0, 0] = math.nan
    elif what in ("input_dtype", "input_dtype_unvalidated") and rank == 1:
        x, W = x.double(), W.double()
    elif what == "width_unvalidated" and rank == 1:  # one more input column (and head column) on rank 1
        x, W = torch.cat([x, x[:, :1]], 1), torch.cat([W, W[:, :1]], 1)
    elif what in ("entropy_dense", "entropy_no_features"):  # the materialised paths: refused with a group
        y = _lce_data(15)[5][:, lo:hi].float() if what == "entropy_dense" else y
        x, W = (x, W) if what == "entropy_dense" else (x[:, :0], W[:, :0])
    try:
        tl.linear_cross_entropy(x, W[lo:hi], y, process_group=group, return_entropy=what.startswith("entropy"),
                                validate=not what.endswith("_unvalidated"), backend="torch",
                                weight=_bad_weight(what, rank, hi - lo),
                                vocab_start=_bad_start(what, rank, lo),
                                reduce_input_grad=not (what.startswith("options") and rank == 1))
    except (ValueError, TypeError) as e:
        return str(e)
    return None


def test_lce_vocab_parallel_bad_input(pool2):
    _check_bad_input_messages(pool2, _worker_lce_bad)
    for msg in pool2.run(_worker_lce_bad, "input"):  # validate compares the replicated input bit for bit
        assert msg is not None and "input" in msg and "same input values" in msg and "ranks [1]" in msg, msg
    assert pool2.run(_worker_lce_bad, "input_nan") == [None, None]
    # inputs of different widths, unvalidated: checked in every call (the forward ran and the backward's
    # input-gradient all-reduce of different sizes aborted a process in gloo)
    D = _lce_data(15)[0].shape[1]
    for msg in pool2.run(_worker_lce_bad, "width_unvalidated"):
        assert msg is not None and "input" in msg and f"widths D [{D}, {D + 1}]" in msg, msg
    for what in ("entropy_dense", "entropy_no_features"):  # return_entropy on the materialised paths
        for msg in pool2.run(_worker_lce_bad, what):
            assert msg is not None and "return_entropy" in msg and "process_group" in msg, msg


def _worker_one_rank(rank, world, group, what):
    """One rank (rank 1) gets an argument wrong in a way only it can see, found before or at the call's first
    collective: every rank must raise (none may wait in a collective); ``ok`` cases must pass. Returns the
    message or the loss."""
    lo, hi = _bounds((20, 17))[rank:rank + 2]
    x, W, _, y, _, q, _ = _lce_data(25)
    z = _data(25)[0][:, lo:hi]  # this rank's logits, for cross_entropy
    bad = rank == 1
    kw = dict(process_group=group, backend="torch")
    try:
        if what == "ce_input_none":
            out = tl.cross_entropy(None if bad else z, y, **kw)
        elif what == "ce_backend":
            out = tl.cross_entropy(z, y, **dict(kw, backend="bogus" if bad else "torch"))
        elif what == "ce_ids":  # an id outside every shard on rank 1 only, without validate
            out = tl.cross_entropy(z, torch.where(torch.arange(N) == 4, V + 3, y) if bad else y, **kw)
        elif what == "ce_validate":  # validate on rank 1 only
            out = tl.cross_entropy(z, y, validate=bad, **kw)
        elif what == "lce_prob_reduction":  # probability targets: options checked before the first collective
            out = tl.linear_cross_entropy(x, W[lo:hi], q[:, lo:hi], reduction="bogus" if bad else "mean", **kw)
        elif what == "lce_prob_focal":
            out = tl.linear_cross_entropy(x, W[lo:hi], q[:, lo:hi], focal_gamma=2.0 if bad else 0.0, **kw)
        elif what == "lce_backend":
            out = tl.linear_cross_entropy(x, W[lo:hi], y, **dict(kw, backend="bogus" if bad else "torch"))
        elif what == "lce_ids":
            out = tl.linear_cross_entropy(x, W[lo:hi], torch.where(torch.arange(N) == 4, -7, y) if bad else y, **kw)
        elif what == "ce_dtensor_flag":  # a DTensor input: checks made before its dispatch reach every rank too
            from torch.distributed.device_mesh import DeviceMesh
            from torch.distributed.tensor import Shard, distribute_tensor
            zd = distribute_tensor(_data(25)[0].float(), DeviceMesh("cpu", list(range(world))), [Shard(1)])
            out = tl.cross_entropy(zd, y, backend="torch", inplace_backward="yes" if bad else False).full_tensor()
        elif what == "ok_lce_bf16_validate":  # identical 16-bit inputs pass the bitwise comparison
            out = tl.linear_cross_entropy(x.bfloat16(), W[lo:hi].bfloat16(), y, validate=True, **kw)
        return float(out)
    except (ValueError, TypeError) as e:
        return str(e)


def test_vocab_parallel_one_rank_errors_reach_every_rank(pool2):
    """Argument errors only rank 1 makes, for both ops: rank 1 raises its own error and rank 0 one naming rank 1
    (nothing waits in a collective); the group works after each (the next case runs on it)."""
    own = {"ce_input_none": "input", "ce_backend": "backend", "ce_ids": f"got {V + 3}", "ce_validate": "validate",
           "lce_prob_reduction": "reduction", "lce_prob_focal": "focal_gamma", "lce_backend": "backend",
           "lce_ids": "got -7", "ce_dtensor_flag": "inplace_backward"}
    for what, word in own.items():
        rank0, rank1 = pool2.run(_worker_one_rank, what)
        assert isinstance(rank1, str) and word in rank1, (what, rank1)
        assert isinstance(rank0, str) and ("ranks [1]" in rank0 or what == "ce_validate"), (what, rank0)
        if what == "ce_validate":  # the flag itself disagrees: every rank says so alike
            assert rank0 == rank1 and "ranks [1] of 2" in rank0, rank0
    rank0, rank1 = pool2.run(_worker_one_rank, "ok_lce_bf16_validate")
    assert isinstance(rank0, float) and rank0 == rank1 and math.isfinite(rank0), (rank0, rank1)


def _worker_weight_grad_refused(rank, world, group, _):
    """Class weights that require grad with probability targets (differentiable without a group) raise with a
    group, naming the argument and the op: their gradient needs every rank's log-probabilities."""
    lo, hi = _bounds((20, 17))[rank:rank + 2]
    x, W, _, y, _, _, _ = _lce_data(15)
    q = torch.softmax(torch.randn(x.shape[0], V, generator=torch.Generator().manual_seed(3)), -1)[:, lo:hi]
    w = torch.rand(hi - lo).requires_grad_()
    out = []
    for call in (lambda: tl.cross_entropy((x @ W.t())[:, lo:hi].float(), q, w, process_group=group),
                 lambda: tl.linear_cross_entropy(x.float(), W[lo:hi].float(), q, weight=w, process_group=group)):
        try:
            call()
            out.append(None)
        except ValueError as e:
            out.append(str(e))
    return out


def test_vocab_parallel_differentiable_class_weights_are_refused(pool2):
    for msgs in pool2.run(_worker_weight_grad_refused, None):
        for op, msg in zip(("cross_entropy", "linear_cross_entropy"), msgs):
            assert msg is not None and msg.startswith(f"{op}: weight:") and "process_group" in msg, msg


def _zero_weight_problem():
    """Log-probabilities (5, V), class weights with class 3 weighing 0, and targets all 3 but one ignored."""
    g = torch.Generator().manual_seed(8)
    logp = torch.randn(5, V, generator=g, dtype=torch.float64).log_softmax(-1)
    w = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
    w[3] = 0.0
    return logp, w, torch.tensor([3, 3, -100, 3, 3])


def _worker_zero_total_weight(rank, world, group, backend):
    """A weighted mean over rows whose target classes all weigh 0 (total weight 0), log-probability and
    probability inputs, class 3 on rank 0 (slices 20/10/7): this rank's loss and gradient slice."""
    lo, hi = _bounds((20, 10, 7))[rank:rank + 2]
    logp, w, y = _zero_weight_problem()
    out = []
    for input_type, x in (("log_probs", logp), ("probs", logp.exp())):
        xs = x[:, lo:hi].float().requires_grad_()
        loss = tl.cross_entropy(xs, y, w[lo:hi].float(), input_type=input_type, process_group=group, backend=backend)
        loss.backward()
        out.append((loss.detach().double(), xs.grad.double()))
    return out


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_vocab_parallel_weighted_mean_over_zero_weight_is_nan_at_the_target_only(pool3, backend):
    """As PyTorch's nll_loss: a weighted mean whose total weight is 0 is NaN, and so is its gradient at each
    row's target class, 0 elsewhere (ignored rows 0). The shards without the target class (ranks 1 and 2)
    stay 0: their torch backend scattered the NaN coefficient times 0 into their first class before."""
    logp, w, y = _zero_weight_problem()
    refs = []
    for to_input in (lambda t: t, torch.exp):  # log-probs, probs (through log)
        x = to_input(logp.clone()).requires_grad_()
        loss = F.nll_loss(x if to_input is not torch.exp else x.log(), y, w)
        loss.backward()
        refs.append((loss.detach(), x.grad))
    b = _bounds((20, 10, 7))
    for rank, res in enumerate(pool3.run(_worker_zero_total_weight, backend)):
        for (loss, grad), (ref_loss, ref_grad) in zip(res, refs):
            assert math.isnan(loss) and math.isnan(ref_loss)
            torch.testing.assert_close(grad, ref_grad[:, b[rank]:b[rank + 1]], equal_nan=True)


def _worker_collectives(rank, world, group, backend):
    """Every collective the ops issue, as (name, elements): dist's functions wrapped in this worker."""
    lo, hi = _bounds((20, 17))[rank:rank + 2]
    x0, W, b, y, _, q, up = _lce_data(17)
    log = []
    real = {n: getattr(dist, n) for n in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast",
                                            "reduce_scatter", "all_to_all", "all_gather_object", "all_reduce_coalesced")
            if hasattr(dist, n)}

    def wrap(n, f):
        def call(*a, **k):
            t = a[0] if a else next(iter(k.values()))
            log.append((n, sum(u.numel() for u in t) if isinstance(t, (list, tuple)) else t.numel()))
            return f(*a, **k)
        return call

    out = {}
    try:
        for n, f in real.items():
            setattr(dist, n, wrap(n, f))
        logits = (x0 @ W.t())[:, lo:hi].float().requires_grad_()
        del log[:]
        tl.cross_entropy(logits, y, reduction="none", process_group=group, backend=backend).backward(up.float())
        out["ce"] = list(log)
        del log[:]
        tl.cross_entropy(logits, y, reduction="none", process_group=group, backend=backend, vocab_start=lo)
        out["ce vocab_start"] = list(log)
        for name, kw in (("lce", {}), ("lce no input reduce", dict(reduce_input_grad=False))):
            x, w = x0.float().requires_grad_(), W[lo:hi].float().requires_grad_()
            del log[:]
            tl.linear_cross_entropy(x, w, y, reduction="none", process_group=group, backend=backend,
                                    **kw).backward(up.float())
            out[name] = list(log)
        x = torch.zeros(N, 0, requires_grad=True)  # D = 0: the materialised path
        del log[:]
        tl.linear_cross_entropy(x, W[lo:hi, :0].float(), y, linear_bias=b[lo:hi].float(), process_group=group,
                                backend=backend)
        out["lce D=0"] = list(log)
        del log[:]
        tl.linear_cross_entropy(x0.float(), W[lo:hi].float(), q[:, lo:hi].float(), process_group=group,
                                backend=backend)
        out["lce dense"] = list(log)
    finally:
        for n, f in real.items():
            setattr(dist, n, f)
    try:  # ranks disagreeing on the rows, probability targets: the error names linear_cross_entropy
        rows = N - rank
        tl.linear_cross_entropy(x0[:rows].float(), W[lo:hi].float(), q[:rows, lo:hi].float(), process_group=group,
                                backend=backend)
        out["dense rows"] = None
    except ValueError as e:
        out["dense rows"] = str(e)
    return out


def test_vocab_parallel_communication_is_o_n_per_collective(pool2, backend):
    """The collectives per call (dist's functions wrapped on every rank): cross-entropy gathers each rank's
    (vocab_start or -1, slice size, validate, id range, rows, linear CE's input width), with vocab_start or
    without, then one MAX
    all-reduce of N values and one SUM all-reduce of 6N: O(N), never O(N*V); linear CE adds the one all-reduce
    of the N*D input gradient (none with reduce_input_grad=False); the materialised paths (D = 0, probability
    targets) gather the slice sizes once (twice before). With probability targets, ranks holding different
    rows get an error naming linear_cross_entropy (it named cross_entropy), without validate too."""
    P = 2
    for res in pool2.run(_worker_collectives, backend):
        assert res["ce"] == [("all_gather", 10 * P), ("all_reduce", N), ("all_reduce", 6 * N)], res["ce"]
        assert res["ce vocab_start"] == res["ce"], res["ce vocab_start"]
        assert res["lce"] == res["ce"] + [("all_reduce", N * D)], res["lce"]
        assert res["lce no input reduce"] == res["ce"], res["lce no input reduce"]
        for k in ("lce D=0", "lce dense"):
            assert [c for c in res[k] if c[0] == "all_gather"] == [("all_gather", 10 * P)], (k, res[k])
            assert all(n <= 6 * N for _, n in res[k]), (k, res[k])
        assert res["dense rows"] is not None and res["dense rows"].startswith("linear_cross_entropy: input:"), \
            res["dense rows"]


def _worker_lce_group_of_one(rank, world, group, backend):
    groups = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    x0, W, b, y, cw, _, up = _lce_data(16)
    out = []
    for kw in (LCE_CASES[3], LCE_CASES[4], LCE_CASES[6]):  # "none", and the scalar-upstream path of the plain call
        res = []
        for pg in (None, groups[rank]):
            x, w, bias = (t.float().requires_grad_() for t in (x0, W, b))
            loss = tl.linear_cross_entropy(x, w, y, linear_bias=bias, weight=cw.float() if kw.get("weight") else None,
                                           backend=backend, process_group=pg, **_lce_call_kwargs(kw))
            _lce_backward(loss, up.float())
            res.append(_np((loss, x.grad, w.grad, bias.grad)))
        out.append(res)
    return out


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_lce_vocab_parallel_group_of_one_equals_plain_call(pool2, backend):
    for per_rank in pool2.run(_worker_lce_group_of_one, backend):
        for plain, alone in per_rank:
            for a, b in zip(plain, alone):
                torch.testing.assert_close(_t(b), _t(a), atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# linear CE's local half without a group: tri_losses::lce_partial on a head shard at an offset
# ------------------------------------------------------------------------------------------------
LCE_PARTIAL_OPTS = [  # smoothing, smooth_mode, focal_gamma, softcap, bias, class weights
    (0.0, 0, 0.0, 0.0, False, False), (0.0, 0, 2.0, 0.0, True, True), (0.1, 1, 0.0, 4.0, True, True),
    (0.2, 2, 1.0, 0.0, False, False), (0.3, 3, 0.0, 0.0, True, False),
]


@pytest.mark.parametrize("opts", LCE_PARTIAL_OPTS)
def test_lce_partial_triton_matches_float64_on_a_shard(opts):
    eps, mode, gamma, softcap, bias, weight = opts
    x, W, b, y, cw, _, _ = _on_device(_lce_data(17))
    lo, hi = 9, 30  # classes 9..29 of V
    o = (-100, eps, mode, gamma, 0.0, softcap, 0, 0.0, lo, V)
    args = (y, cw[lo:hi] if weight else None, *o)
    bs = b[lo:hi] if bias else None
    ref, ref_pred = torch.ops.tri_losses.lce_partial(x, W[lo:hi], bs, *args, False, True, True)  # torch, float64
    part, pred = torch.ops.tri_losses.lce_partial(x.float(), W[lo:hi].float(), None if bs is None else bs.float(),
                                                  y, None if cw is None or not weight else cw[lo:hi].float(), *o,
                                                  True, True, True)
    # the shard's first maximum, as a global class id (want_argmax)
    assert torch.equal(pred, ref_pred) and ((pred >= lo) & (pred < hi)).all()
    here = (y >= lo) & (y < hi)
    assert here.any() and (~here & (y != -100)).any()  # targets on this shard and elsewhere
    keep = 5 if gamma else 4  # z_y - m: the torch backend forms it for focal only; read where y is here
    ref, part = ref.clone(), part.double()
    if keep == 5:
        ref[~here, 4] = part[~here, 4] = 0.0
    torch.testing.assert_close(part[:, :keep], ref[:, :keep], atol=3e-5, rtol=3e-5)
    # want_entropy: the sixth column, sum exp(z - m) (z - m) over the shard's classes
    assert part.shape == ref.shape == (N, 6)
    torch.testing.assert_close(part[:, 5], ref[:, 5], atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("stages", [("fwd", "dz", "dwdx"), ("dz",)], ids=["all", "dz"])
@pytest.mark.parametrize("opts", LCE_PARTIAL_OPTS)
def test_lce_shard_blas_stages_match_triton_kernels(monkeypatch, opts, stages):
    """The cuBLAS stages (``BLAS``) on a head shard at an offset, bf16, 3 chunks of 7 classes: the forward's
    partial sums (cross-entropy's PARTIAL kernel per chunk and the REL combine) equal the torch backend's
    float64 sums of the same bf16 values; the backward's dz from fp32 logits and cross-entropy's backward
    kernel, with the whole row's statistics, gives the Triton kernels' shard gradients and the shard's rows
    of the whole head's float64 gradients."""
    from tri_losses._backend import kernels
    K = kernels("linear_cross_entropy")
    eps, mode, gamma, softcap, bias, weight = opts
    x, W, b, y, cw, _, up = _on_device(_lce_data(19))
    x, W, b = (t.to(torch.bfloat16) for t in (x, W, b))
    lo, hi = 9, 30  # classes 9..29 of V
    y = y.clone()
    y[4], y[5] = lo + 7, lo + 6  # the first class of the second chunk, the last of the first
    o = (-100, eps, mode, gamma, 0.0, softcap, 7 * N, 0.0, lo, V)  # chunk_size: 7 classes per chunk
    cws = cw[lo:hi].float() if weight else None
    bs = b[lo:hi] if bias else None
    ref = torch.ops.tri_losses.lce_partial(x.double(), W[lo:hi].double(), None if bs is None else bs.double(), y,
                                           None if cws is None else cws.double(), *o, False)[0]
    monkeypatch.setattr(K, "BLAS", stages)
    part = torch.ops.tri_losses.lce_partial(x, W[lo:hi], bs, y, cws, *o, True)[0].double()
    here = (y >= lo) & (y < hi)
    keep = 5 if gamma else 4
    if keep == 5:
        ref[~here, 4] = part[~here, 4] = 0.0
    torch.testing.assert_close(part[:, :keep], ref[:, :keep].cpu(), atol=3e-5, rtol=3e-5)
    # the backward of the shard with the whole row's statistics (from the unsharded forward)
    whole = (-100, eps, mode, gamma, 0.0, softcap, 0, 0.0, 0, 0)
    cwf = cw.float() if weight else None
    _, stats, coef, _, _ = torch.ops.tri_losses.lce_fwd(x.double(), W.double(), b.double() if bias else None, y,
                                                     None if cwf is None else cwf.double(), *whole, False)
    g = up.float()
    _, dw_ref, db_ref = torch.ops.tri_losses.lce_bwd(g.double(), None, x.double(), W.double(),
                                                     b.double() if bias else None, y,
                                                     None if cwf is None else cwf.double(), stats, coef, *whole,
                                                     True, True, False)
    monkeypatch.setattr(K, "BLAS", stages)
    got = torch.ops.tri_losses.lce_bwd(g, None, x, W[lo:hi], bs, y, cws, stats.float(), coef.float(), *o, True, True,
                                       True)
    monkeypatch.setattr(K, "BLAS", ())
    plain = torch.ops.tri_losses.lce_bwd(g, None, x, W[lo:hi], bs, y, cws, stats.float(), coef.float(), *o, True, True,
                                         True)
    for a_, e_, name in zip(got, plain, ("dx", "dw", "db")):
        if e_.numel():
            torch.testing.assert_close(a_.float(), e_.float(), atol=1e-2, rtol=1e-2, msg=name)
    torch.testing.assert_close(got[1].double(), dw_ref[lo:hi], atol=2e-2, rtol=2e-2)
    if bias:
        torch.testing.assert_close(got[2].double(), db_ref[lo:hi], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_lce_partial_opcheck(backend):
    x, W, b, y, cw, _, _ = _on_device(_lce_data(18))
    args = (x.float(), W[3:20].float(), b[3:20].float(), y, cw[3:20].float(), -100, 0.1, 1, 2.0, 0.0, 0.0, 0, 0.0,
            3, V, backend == "triton")
    for want in ((False,), (True,), (False, True)):  # (want_argmax, want_entropy)
        torch.library.opcheck(torch.ops.tri_losses.lce_partial.default, (*args, *want),
                              test_utils=("test_schema", "test_faketensor"))
