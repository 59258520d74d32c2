"""torch.library.opcheck on every custom op (schema, fake tensors, autograd registration, AOTAutograd's
trace with dynamic shapes against eager: every output defined), both backends."""
import math

import pytest
import torch

import tri_losses  # noqa: F401  (registers the ops)
from tests.conftest import DEVICE

CHECKS = ("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


def _check(op, args, test_utils=CHECKS):
    torch.library.opcheck(op, args, test_utils=test_utils)


def test_opcheck_linear_cross_entropy(backend):
    x = torch.randn(6, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(20, 8, device=DEVICE, requires_grad=True)
    y = torch.tensor([0, 3, -100, 19, 2, 7], device=DEVICE)
    b = torch.randn(20, device=DEVICE, requires_grad=True)
    tri = backend == "triton"
    opts = (-100, 0.1, 1, 1.0, 1e-3, 5.0, 6 * 7, 0.0, 0, 0)  # LceOptions; chunk_size: several chunks
    _check(torch.ops.tri_losses.lce_fwd.default, (x, w, b, y, None, *opts, tri))
    _check(torch.ops.tri_losses.lce_fwd.default, (x, w, b, y, None, *opts, tri, True))  # with the rows' argmax
    _check(torch.ops.tri_losses.lce_fwd.default, (x, w, b, y, None, *opts, tri, False, True))  # with the entropy
    denom = torch.tensor(5.0, device=DEVICE)
    # the fast path's backward scales the gradients its forward saved in place (see cross_entropy's
    # _scaled_grad), so an AOT trace that also returns them as outputs, as opcheck's does, is refused; the
    # public functions never return them (their compiled graphs are tested in the compile tests), and the
    # trace of this op without gradients is checked in test_opcheck_every_op_of_a_training_step
    fast = CHECKS[:3]
    _check(torch.ops.tri_losses.lce_fwd_grad.default, (x, w, b, y, None, denom, *opts, True, True, tri), fast)
    _check(torch.ops.tri_losses.lce_fwd_grad.default, (x, w.detach(), None, y, None, denom, *opts, True, False, tri),
           fast)
    _check(torch.ops.tri_losses.lce_fwd_grad.default, (x, w, b, y, None, None, *opts, True, True, tri), fast)  # "sum"
    _check(torch.ops.tri_losses.lce_fwd_grad.default, (x, w, b, y, None, denom, *opts, True, True, tri, True), fast)
    _check(torch.ops.tri_losses.lce_fwd_grad.default,
           (x.detach(), w.detach(), b.detach(), y, None, denom, *opts, True, True, tri))  # every check, no gradients
    loss, stats, coef, _, ent = torch.ops.tri_losses.lce_fwd.default(x.detach(), w.detach(), b.detach(), y, None,
                                                                      *opts, tri, False, True)
    _check(torch.ops.tri_losses.lce_bwd.default, (torch.randn(6, device=DEVICE), None, x.detach(), w.detach(),
                                                  b.detach(), y, None, stats, coef, *opts, True, True, tri))
    _check(torch.ops.tri_losses.lce_bwd.default, (torch.randn(6, device=DEVICE), torch.randn(6, device=DEVICE),
                                                  x.detach(), w.detach(), b.detach(), y, None, stats, coef, *opts,
                                                  True, True, tri))  # with the lse's upstream (return_lse)
    _check(torch.ops.tri_losses.lce_bwd.default, (torch.randn(6, device=DEVICE), None, x.detach(), w.detach(),
                                                  b.detach(), y, None, stats, coef, *opts, True, True, tri,
                                                  torch.randn(6, device=DEVICE), ent))  # the entropy's upstream


def test_opcheck_ctc(backend):
    x = torch.randn(7, 2, 5, device=DEVICE, requires_grad=True)
    tg = torch.tensor([[1, 2], [3, 0]], device=DEVICE)
    _check(torch.ops.tri_losses.ctc_fwd.default,
           (x, tg, torch.tensor([7, 5], device=DEVICE), torch.tensor([2, 1], device=DEVICE), 0, True, False, True,
            backend == "triton"))


def test_opcheck_elementwise(backend):
    x = torch.randn(3, 4, device=DEVICE, requires_grad=True)
    t = torch.rand(3, 4, device=DEVICE, requires_grad=True)
    _check(torch.ops.tri_losses.ew_fwd.default, (x, t, None, None, [3, 4], 0, False, True, backend == "triton"))


def test_opcheck_text(backend):
    h = torch.randint(0, 5, (3, 6), device=DEVICE)
    lens = torch.tensor([6, 2, 0], device=DEVICE)
    _check(torch.ops.tri_losses.edit_distance.default, (h, lens, h.flip(1), lens, backend == "triton"))
    _check(torch.ops.tri_losses.bleu_stats.default, (h, lens, h.flip(1), lens, 4, backend == "triton"))


def test_opcheck_automata(backend):
    from tri_losses.automata import ctc_fsa
    # the ops take the automaton on the emissions' device (the public functions move it there)
    fsa = ctc_fsa(torch.tensor([[1, 2]], device=DEVICE), [2], 0)
    x = torch.randn(5, 1, 3, device=DEVICE, requires_grad=True)
    lens = torch.tensor([5], device=DEVICE)
    tri = backend == "triton"
    _check(torch.ops.tri_losses.fsa_fwd.default, (x, lens, *fsa, True, False, tri))
    # states past every sequence's (num_states may exceed them): their alpha is -inf, never left unwritten
    _check(torch.ops.tri_losses.fsa_fwd.default, (x, lens, *fsa[:3], fsa.num_states + 2, True, False, tri))
    _check(torch.ops.tri_losses.fsa_fwd.default, (x, lens, *fsa[:3], fsa.num_states + 2, True, True, tri))
    am = -x.detach().log_softmax(-1)
    _check(torch.ops.tri_losses.fast_bw.default, (am, lens, *fsa, tri))
    _check(torch.ops.tri_losses.fast_viterbi.default, (-am, lens, *fsa, -1, tri))


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_opcheck_sampled(backend, sparse):
    x = torch.randn(5, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(30, 16, device=DEVICE, requires_grad=True)
    b = torch.randn(30, device=DEVICE, requires_grad=True)
    y = torch.tensor([[0], [3], [9], [2], [7]], device=DEVICE)
    samp = torch.tensor([[3, 5, 5, 11, 0, 29, 17, 8, 1, 2, 4, 6, 12, 13, 14, 15]], device=DEVICE)
    _check(torch.ops.tri_losses.sampled_fwd.default,
           (x, w, b, y, torch.zeros(5, 1, device=DEVICE), samp, torch.full((1, 16), math.log(0.5), device=DEVICE),
            torch.ones(1, 16, dtype=torch.int8, device=DEVICE), torch.zeros(5, dtype=torch.int64, device=DEVICE),
            torch.ones(5, dtype=torch.int8, device=DEVICE), False, True, False, 0.0, sparse, backend == "triton"))


class _ZeroFills(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the size of every tensor that an op zero-fills or fills with a constant."""
    FILLS = ("zeros", "zeros_like", "new_zeros", "full", "full_like", "fill_", "zero_")

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in self.FILLS and isinstance(out, torch.Tensor):
            self.sizes.append(out.numel())
        return out


def test_fused_backward_fills_no_gradient_sized_zeros(backend):
    """The training fast paths save the gradient as a non-differentiable output; autograd must not
    zero-fill a gradient of that size for it in the backward (a full extra write of the logits / the
    head's gradient per step): the backward only scales the saved gradient."""
    N, D, V = 12, 8, 40
    x = torch.randn(N, V, device=DEVICE, requires_grad=True)
    h = torch.randn(N, D, device=DEVICE, requires_grad=True)
    w = torch.randn(V, D, device=DEVICE, requires_grad=True)
    y = torch.randint(0, V, (N,), device=DEVICE)
    cases = {"cross_entropy": (lambda: tri_losses.cross_entropy(x, y, backend=backend), N * V),
             "linear_cross_entropy": (lambda: tri_losses.linear_cross_entropy(h, w, y, backend=backend), N * D)}
    for name, (fn, floor) in cases.items():
        loss = fn()
        with _ZeroFills() as fills:
            (2.0 * loss).backward()
        assert max(fills.sizes, default=0) < floor, (name, fills.sizes)
    exp_x = torch.autograd.grad(torch.nn.functional.cross_entropy(x, y) * 2.0, x)[0]
    torch.testing.assert_close(x.grad, exp_x)
    z = h @ w.t()
    gh, gw = torch.autograd.grad(torch.nn.functional.cross_entropy(z, y) * 2.0, (h, w))
    torch.testing.assert_close(h.grad, gh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, gw, rtol=1e-4, atol=1e-5)


def test_tracing_an_op_warns_nothing(backend):
    """torch.compile traces the public call without a warning of ours or of dynamo about our code (it
    warned about a functools.lru_cache-wrapped helper); dynamo only (backend='eager'): fast."""
    import warnings
    torch._dynamo.reset()
    x = torch.randn(4, 10, device=DEVICE, requires_grad=True)
    y = torch.randint(0, 10, (4,), device=DEVICE)
    f = torch.compile(lambda a: tri_losses.cross_entropy(a, y, backend=backend), backend="eager", fullgraph=True)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        f(x).backward()
    assert [str(w.message) for w in got if issubclass(w.category, UserWarning)] == []
    torch.testing.assert_close(x.grad, torch.autograd.grad(torch.nn.functional.cross_entropy(x, y), x)[0])


class _OpCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the first call of every ``tri_losses::`` op (its arguments cloned before the call)."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name().split("::")[-1]
        if func.namespace == "tri_losses" and name not in self.calls:
            self.calls[name] = (func, tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a
                                                   for a in args), dict(kwargs or {}))
        return func(*args, **(kwargs or {}))


def test_opcheck_every_op_of_a_training_step(backend):
    """The ops autograd calls in the backward (and the in-place and path ops) get no call of their own
    above: record every op a forward and backward of each family makes, with a random per-element upstream
    and the scalar-upstream fast paths, and check each one's schema, fake implementation (what
    torch.compile traces the backward with) and AOT trace (eager's outputs, each of them defined). Every
    registered op is reached, except the vocab-parallel partials (tests/test_vocab_parallel.py checks them
    inside a process group)."""
    from tri_losses import automata
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE).requires_grad_()

    def step(loss):
        loss.backward(torch.randn(loss.shape, generator=gen).to(DEVICE) if loss.dim() else None)

    y = torch.tensor([0, 3, -100, 10, 2, 7], device=DEVICE)
    x = rnd(6, 11)
    with _OpCalls() as rec:
        step(tri_losses.cross_entropy(x, y, reduction="none", backend=backend))
        step(tri_losses.cross_entropy(x, y, backend=backend))
        tri_losses.cross_entropy(x, y, backend=backend).backward(retain_graph=True)  # the copying scale
        step(tri_losses.cross_entropy(x.detach().clone().requires_grad_(), y, inplace_backward=True,
                                      backend=backend))
        step(tri_losses.cross_entropy(x.detach().clone().requires_grad_(), y, reduction="none",
                                      inplace_backward=True, backend=backend))
        h, w = rnd(6, 8), rnd(20, 8)
        yl = torch.tensor([0, 3, -100, 19, 2, 7], device=DEVICE)
        step(tri_losses.linear_cross_entropy(h, w, yl, reduction="none", backend=backend))
        step(tri_losses.linear_cross_entropy(h, w, yl, backend=backend))
        lp = rnd(7, 2, 5)
        ctc = (torch.tensor([[1, 2], [3, 0]], device=DEVICE), torch.tensor([7, 5], device=DEVICE),
               torch.tensor([2, 1], device=DEVICE))
        step(tri_losses.ctc_loss(lp.log_softmax(-1), *ctc, reduction="none", backend=backend))
        tri_losses.ctc_best_path(lp.detach().log_softmax(-1), *ctc, backend=backend)
        a, t = rnd(3, 4), torch.rand(3, 4, generator=gen).to(DEVICE).requires_grad_()
        step(tri_losses.binary_cross_entropy_with_logits(a, t, reduction="none", backend=backend))
        fsa = automata.ctc_fsa(ctc[0], ctc[2], 0)
        step(automata.fsa_loss(lp, ctc[1], fsa, reduction="none", backend=backend))
        am = -lp.detach().log_softmax(-1)
        mask = torch.arange(7, device=DEVICE)[:, None] < ctc[1]
        automata.fast_baum_welch(am, *fsa[:3], mask, num_states=fsa.num_states, backend=backend)
        automata.fast_viterbi(-am, ctc[1], *fsa[:3], num_states=fsa.num_states, backend=backend)
        xs, ws, bs = rnd(5, 16), rnd(30, 16), rnd(30)
        ys = torch.tensor([0, 3, 9, 2, 7], device=DEVICE)
        step(tri_losses.sampled_softmax_loss(xs, ws, ys, 8, linear_bias=bs, reduction="none", backend=backend))
        hyp = torch.randint(0, 5, (3, 6), generator=gen).to(DEVICE)
        lens = torch.tensor([6, 2, 0], device=DEVICE)
        tri_losses.edit_distance(hyp, lens, hyp.flip(1), lens, backend=backend)
        tri_losses.bleu(hyp, lens, hyp.flip(1), lens, backend=backend)
    registered = {n for n in dir(torch.ops.tri_losses) if not n.startswith("_") and n != "name"}
    assert registered - set(rec.calls) == {"ce_partial", "lce_partial"}, sorted(registered - set(rec.calls))
    for name, (op, args, kwargs) in sorted(rec.calls.items()):
        torch.library.opcheck(op, args, kwargs, test_utils=("test_schema", "test_faketensor",
                                                             "test_aot_dispatch_dynamic"))
