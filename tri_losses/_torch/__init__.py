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


def row_segment_sum(rows: torch.Tensor, ids: torch.Tensor):
    """Sums of the rows (n, D) that share an id, in a fixed order (stable sort by id, float64 running
    sums): returns ``(sorted ids (n,), sums (n, D) in rows' dtype, last (n,) bool)``, where every position of
    a run of equal ids holds the run's full sum and ``last`` marks each run's final position. Static
    shapes and no atomics: scattering ``sums`` by ``ids`` writes the same value for every duplicate."""
    n = ids.numel()
    key, order = torch.sort(ids, stable=True)
    if n == 0:
        return key, rows[order], torch.zeros(0, dtype=torch.bool, device=ids.device)
    cs = torch.cumsum(rows[order].double(), 0)
    cs = torch.cat([torch.zeros_like(cs[:1]), cs], 0)
    start = torch.searchsorted(key, key, right=False)
    end = torch.searchsorted(key, key, right=True)
    sums = (cs[end] - cs[start]).to(rows.dtype)
    last = torch.ones(n, dtype=torch.bool, device=ids.device)
    last[:-1] = key[1:] != key[:-1]
    return key, sums, last
