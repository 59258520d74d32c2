"""tri_losses: PyTorch losses with fused Triton kernels and RETURNN's loss semantics."""
from ._backend import use_backend
from .cross_entropy import CrossEntropyLoss, cross_entropy, frame_error
from .ctc import CTCLoss, ctc_best_path, ctc_greedy_decode, ctc_loss, ctc_posteriors
from .linear_cross_entropy import LinearCrossEntropyLoss, linear_cross_entropy

__version__ = "0.1.0"

__all__ = ["use_backend", "cross_entropy", "CrossEntropyLoss", "frame_error", "linear_cross_entropy",
           "LinearCrossEntropyLoss", "ctc_loss", "CTCLoss", "ctc_posteriors", "ctc_best_path", "ctc_greedy_decode"]
