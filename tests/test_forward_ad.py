"""Forward-mode and higher-order AD through the custom ops: a tangent on any differentiable operand
raises a clear error (a ``torch.library`` custom op has no jvp), and so does differentiating a gradient
formed with ``create_graph=True`` (the backward ops have no derivative), instead of being dropped silently."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import tri_losses
from tests.conftest import DEVICE, assert_close


def _ce_dense(args, be):
    x, q = args
    return tri_losses.cross_entropy(x, q, backend=be)


def _lce(args, be):
    x, w, b = args
    return tri_losses.linear_cross_entropy(x, w, torch.tensor([1, 0, 4, 2], device=DEVICE), linear_bias=b,
                                           backend=be)


def _sampled(args, be):
    x, w, b = args
    return tri_losses.sampled_softmax_loss(x, w, torch.tensor([1, 0, 4, 2], device=DEVICE), 3, linear_bias=b,
                                           sampler="uniform", backend=be,
                                           generator=torch.Generator(DEVICE).manual_seed(0))


def _ctc(args, be):
    (x,) = args
    return tri_losses.ctc_loss(x, torch.tensor([[1, 2], [3, 3]], device=DEVICE), [6, 5], [2, 2],
                               input_type="logits", backend=be)


CASES = {
    "ctc_loss": (_ctc, lambda: (torch.randn(6, 2, 5, device=DEVICE),)),
    "cross_entropy": (_ce_dense, lambda: (torch.randn(4, 5, device=DEVICE),
                                          torch.rand(4, 5, device=DEVICE).softmax(-1))),
    "linear_cross_entropy": (_lce, lambda: (torch.randn(4, 3, device=DEVICE), torch.randn(5, 3, device=DEVICE),
                                            torch.randn(5, device=DEVICE))),
    "sampled_softmax_loss": (_sampled, lambda: (torch.randn(4, 3, device=DEVICE), torch.randn(6, 3, device=DEVICE),
                                                torch.randn(6, device=DEVICE))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_mode_ad_tangent_on_any_operand_raises(backend, name):
    call, make = CASES[name]
    args = make()
    for i in range(len(args)):
        with fwAD.dual_level():
            dual = list(args)
            dual[i] = fwAD.make_dual(args[i], torch.randn_like(args[i]))
            with pytest.raises(NotImplementedError, match=f"{name}: forward-mode AD is not supported"):
                call(dual, backend)
    out = call(args, backend)  # outside a dual level nothing changes
    assert torch.isfinite(out).all()


def _fsa(x, red, be):
    fsa = tri_losses.ctc_fsa(torch.tensor([[1, 2], [3, 3]], device=DEVICE), torch.tensor([2, 2], device=DEVICE), 0)
    return tri_losses.fsa_loss(x, [6, 5], fsa, reduction=red, backend=be)


_T4 = [1, 0, 4, 2]
HIGHER = {  # name: (call(args, reduction, backend), make args)
    "cross_entropy": (lambda a, r, be: tri_losses.cross_entropy(a[0], torch.tensor(_T4, device=DEVICE), reduction=r,
                                                                backend=be),
                      lambda: (torch.randn(4, 5, device=DEVICE),)),
    "cross_entropy dense": (lambda a, r, be: tri_losses.cross_entropy(a[0], a[1], reduction=r, backend=be),
                            lambda: (torch.randn(4, 5, device=DEVICE), torch.rand(4, 5, device=DEVICE).softmax(-1))),
    "cross_entropy inplace": (lambda a, r, be: tri_losses.cross_entropy(a[0] * 1, torch.tensor(_T4, device=DEVICE),
                                                                        reduction=r, inplace_backward=True,
                                                                        backend=be),
                              lambda: (torch.randn(4, 5, device=DEVICE),)),
    "linear_cross_entropy": (lambda a, r, be: tri_losses.linear_cross_entropy(
        a[0], a[1], torch.tensor(_T4, device=DEVICE), linear_bias=a[2], reduction=r, backend=be),
        lambda: (torch.randn(4, 3, device=DEVICE), torch.randn(5, 3, device=DEVICE), torch.randn(5, device=DEVICE))),
    "sampled_softmax_loss": (lambda a, r, be: tri_losses.sampled_softmax_loss(
        a[0], a[1], torch.tensor(_T4, device=DEVICE), 3, linear_bias=a[2], sampler="uniform", reduction=r,
        backend=be, generator=torch.Generator(DEVICE).manual_seed(0)),
        lambda: (torch.randn(4, 3, device=DEVICE), torch.randn(6, 3, device=DEVICE), torch.randn(6, device=DEVICE))),
    "ctc_loss": (lambda a, r, be: tri_losses.ctc_loss(a[0], torch.tensor([[1, 2], [3, 3]], device=DEVICE), [6, 5],
                                                      [2, 2], input_type="logits", reduction=r, backend=be),
                 lambda: (torch.randn(6, 2, 5, device=DEVICE),)),
    "fsa_loss": (lambda a, r, be: _fsa(a[0], r, be), lambda: (torch.randn(6, 2, 5, device=DEVICE),)),
    "mse_loss": (lambda a, r, be: tri_losses.mse_loss(a[0], a[1], reduction=r, backend=be),
                 lambda: (torch.randn(4, 5, device=DEVICE), torch.randn(4, 5, device=DEVICE))),
    "l1_loss": (lambda a, r, be: tri_losses.l1_loss(a[0], a[1], reduction=r, backend=be),
                lambda: (torch.randn(4, 5, device=DEVICE), torch.randn(4, 5, device=DEVICE))),
    "binary_cross_entropy_with_logits": (
        lambda a, r, be: tri_losses.binary_cross_entropy_with_logits(a[0], a[1], reduction=r, backend=be),
        lambda: (torch.randn(4, 5, device=DEVICE), torch.rand(4, 5, device=DEVICE))),
}


@pytest.mark.parametrize("name,reduction", [(n, r) for n in HIGHER for r in ("mean", "none")
                                            if not (n == "cross_entropy inplace" and r == "none")])
def test_double_backward_raises_instead_of_dropping_the_second_order_term(backend, name, reduction):
    """``create_graph=True`` gives the first-order gradient (same values as without it); differentiating
    that gradient raises, for a scalar upstream (mean: the path that forms the gradient in the forward)
    and a per-row one (none), on every operand. Before, the scalar path returned a detached gradient and
    a gradient penalty silently lost its Hessian term."""
    call, make = HIGHER[name]
    torch.manual_seed(0)
    args = [a.requires_grad_(True) for a in make()]
    loss = call(args, reduction, backend)
    up = torch.rand_like(loss) + 0.5
    ref = torch.autograd.grad(call(args, reduction, backend), args, up)
    grads = torch.autograd.grad(loss, args, up, create_graph=True)
    for g, r in zip(grads, ref):
        assert torch.equal(g.detach(), r)
        assert g.requires_grad
    with pytest.raises(RuntimeError, match=f"{name.split()[0]}.*double backward is not supported"):
        sum((g ** 2).sum() for g in grads).backward()


@pytest.mark.parametrize("name,reduction", [(n, r) for n in HIGHER for r in ("mean", "none")
                                            if not (n == "cross_entropy inplace" and r == "none")])
def test_gradient_penalty_through_autograd_grad_raises_or_warns(backend, name, reduction):
    """torch.autograd.grad(penalty, inputs) runs only the nodes on a path to the inputs: the gradient's error
    node is linked to the op's saved inputs, so a penalty plus a direct term raises (before, it silently
    returned the direct term alone). Where a path saves no input (cross-entropy's fast path formed the
    gradient in the forward and keeps no N x V logits), create_graph=True warns that it cannot tell."""
    import warnings
    call, make = HIGHER[name]
    torch.manual_seed(0)
    args = [a.requires_grad_(True) for a in make()]
    loss = call(args, reduction, backend)
    up = torch.rand_like(loss) + 0.5
    from tri_losses import _backend
    _backend._WARNED_UNTRACKED.clear()  # the warning is once per op and process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grads = torch.autograd.grad(loss, args, up, create_graph=True)
    untracked = [w for w in caught if "not linked to the inputs" in str(w.message)]
    penalty = sum((g ** 2).sum() for g in grads) + sum((a ** 2).sum() for a in args)
    if untracked:
        assert name.startswith("cross_entropy") and reduction == "mean", (name, reduction)
        return
    with pytest.raises(RuntimeError, match=f"{name.split()[0]}.*double backward is not supported"):
        torch.autograd.grad(penalty, args)


@pytest.mark.parametrize("name", ["cross_entropy", "linear_cross_entropy", "mse_loss", "ctc_loss"])
def test_create_graph_through_non_reentrant_checkpointing(backend, name):
    """The first-order wrapper unpacks an op's saved tensors once (non-reentrant checkpointing allows no
    second unpack): create_graph=True through a checkpointed op gives the plain gradient, and a penalty on
    it still raises."""
    from torch.utils.checkpoint import checkpoint
    call, make = HIGHER[name]
    torch.manual_seed(0)
    args = [a.requires_grad_(True) for a in make()]
    ref = torch.autograd.grad(call(args, "none", backend).sum(), args)
    loss = checkpoint(lambda *a: call(list(a), "none", backend).sum(), *args, use_reentrant=False)
    grads = torch.autograd.grad(loss, args, create_graph=True)
    for g, r in zip(grads, ref):
        assert_close(g.detach(), r)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(sum((g ** 2).sum() for g in grads), args)


def test_linear_cross_entropy_fast_path_keeps_no_strong_reference_to_its_input():
    """The fast path links its inputs into the first-order error node through weak references only: an
    input nothing else keeps (a norm's output, say) is freed after the forward, as before."""
    import gc
    import weakref
    torch.manual_seed(0)
    w = torch.randn(7, 4, device=DEVICE, requires_grad=True)
    h = torch.randn(6, 4, device=DEVICE, requires_grad=True)
    x = h * 2.0  # MulBackward by a number saves nothing of its output
    ref = weakref.ref(x)
    loss = tri_losses.linear_cross_entropy(x, w, torch.tensor([0, 1, 2, 3, 4, 5], device=DEVICE))
    del x
    gc.collect()
    assert ref() is None
    loss.backward()
    assert h.grad is not None and w.grad is not None
