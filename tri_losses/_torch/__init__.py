"""Pure-PyTorch implementations (the "torch" backend), one module per family."""
import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The math dtype of the torch backend: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
