"""Pure-PyTorch implementations (the "torch" backend), one module per family."""
import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The math dtype of the torch backend: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def segment_sum(src: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """``out[..., k] = sum of src[..., j] over index[..., j] == k`` (last dim), deterministically.

    ``index`` has ``src``'s shape (or broadcasts to it). On CPU, ``scatter_add_`` (sequential, so
    deterministic); on CUDA, where ``scatter_add_`` uses float atomics, a stable sort by index and a
    float64 running sum whose differences at the segment ends give each sum in a fixed order.
    """
    index = index.expand_as(src)
    if src.device.type == "cpu":
        return torch.zeros(*src.shape[:-1], size, dtype=src.dtype, device=src.device).scatter_add_(-1, index, src)
    return sorted_segment_sum(src, index, size)


def sorted_segment_sum(src: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """The atomics-free path of :func:`segment_sum` (any device)."""
    index = index.expand_as(src)
    key, order = torch.sort(index, dim=-1, stable=True)
    cs = torch.cumsum(src.gather(-1, order).double(), -1)
    cs = torch.cat([torch.zeros_like(cs[..., :1]), cs], -1)
    bounds = torch.arange(size + 1, device=src.device).expand(*src.shape[:-1], size + 1).contiguous()
    pos = torch.searchsorted(key.contiguous(), bounds)  # first position of each id (and the end)
    c = cs.gather(-1, pos)
    return (c[..., 1:] - c[..., :-1]).to(src.dtype)
