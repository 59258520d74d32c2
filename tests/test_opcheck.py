"""torch.library.opcheck on every custom op (schema, fake tensors, autograd registration), both backends."""
import math

import pytest
import torch

import tri_losses  # noqa: F401  (registers the ops)
from tests.conftest import DEVICE

CHECKS = ("test_schema", "test_faketensor", "test_autograd_registration")


def _check(op, args):
    torch.library.opcheck(op, args, test_utils=CHECKS)


def test_opcheck_linear_cross_entropy(backend):
    x = torch.randn(6, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(20, 8, device=DEVICE, requires_grad=True)
    y = torch.tensor([0, 3, -100, 19, 2, 7], device=DEVICE)
    b = torch.randn(20, device=DEVICE, requires_grad=True)
    tri = backend == "triton"
    opts = (-100, 0.1, 1, 1.0, 1e-3, 5.0, 6 * 7, 0.0, 0, 0)  # LceOptions; chunk_size: several chunks
    _check(torch.ops.tri_losses.lce_fwd.default, (x, w, b, y, None, *opts, tri))
    denom = torch.tensor(5.0, device=DEVICE)
    _check(torch.ops.tri_losses.lce_fwd_grad.default, (x, w, b, y, None, denom, *opts, True, True, tri))
    _check(torch.ops.tri_losses.lce_fwd_grad.default, (x, w.detach(), None, y, None, denom, *opts, True, False, tri))
    _check(torch.ops.tri_losses.lce_fwd_grad.default, (x, w, b, y, None, None, *opts, True, True, tri))  # "sum"
    loss, stats, coef = torch.ops.tri_losses.lce_fwd.default(x.detach(), w.detach(), b.detach(), y, None, *opts, tri)
    _check(torch.ops.tri_losses.lce_bwd.default, (torch.randn(6, device=DEVICE), x.detach(), w.detach(), b.detach(),
                                                  y, None, stats, coef, *opts, True, True, tri))


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
