"""tri_losses: PyTorch losses with fused Triton kernels and RETURNN's loss semantics."""
from ._backend import use_backend

__version__ = "0.1.0"

__all__ = ["use_backend"]
