"""Forward-mode AD through the custom ops: a tangent on any differentiable operand raises a clear
error (a ``torch.library`` custom op has no jvp) instead of being dropped silently."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import tri_losses
from tests.conftest import DEVICE


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
