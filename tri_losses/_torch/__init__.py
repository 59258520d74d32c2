"""Pure-PyTorch implementations (the "torch" backend), one module per family, and the small torch
helpers every family shares: the math and loss dtypes, the reduction, the backward's gradient tuple."""
import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The math dtype of the torch backend: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def loss_dtype(x: torch.Tensor, use_triton: bool) -> torch.dtype:
    """The dtype of a loss (and of its per-row statistics): float32, or float64 for a float64 input on
    the torch backend (the kernels compute in float32 whatever the input)."""
    return torch.float32 if use_triton else compute_dtype(x)


def reduce_loss(rows: torch.Tensor, reduction: str, count=None) -> torch.Tensor:
    """``"none"``: ``rows`` as is; ``"sum"``: their sum; ``"mean"``: the sum over ``count`` (a tensor or a
    number: the non-ignored rows, or their summed class weights), by default ``rows.numel()``. No rows
    give NaN = 0/0 for the mean, as PyTorch."""
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (rows.numel() if count is None else count)


def input_grads(n_inputs: int, *grads):
    """The tuple an autograd backward returns: ``grads`` for the leading inputs, then ``None`` for the
    remaining ones (options, flags) up to ``n_inputs``."""
    return tuple(grads) + (None,) * (n_inputs - len(grads))


def logsumexp0(v: torch.Tensor) -> torch.Tensor:
    """log-sum-exp over dim 0 of ``v`` (a few rows: the recursions' candidate terms), computed in place in
    ``v`` (consumed), -inf safe (an all -inf column gives -inf): a term below e^-80 of its column's largest
    counts as e^-80, far below the float32 and float64 resolution of the sum, and the exponentials never
    produce denormals, which take many times longer on the CPU."""
    m = v.amax(0)
    s = v.sub_(m.clamp_min(torch.finfo(v.dtype).min)).clamp_min_(-80.0).exp_().sum(0)
    return s.log_().add_(m)


def _run_sums(key: torch.Tensor, vals: torch.Tensor, dim: int) -> torch.Tensor:
    """Inclusive segmented prefix sums along ``dim`` of ``vals`` whose runs of equal ``key`` (sorted) are
    the segments: a Hillis-Steele scan of log2(n) element-wise steps. A fixed addition tree (so
    deterministic on every device: no atomics, no device-scheduled scan) with no cancellation; each
    run's total ends at the run's last position."""
    n = key.shape[dim]
    k = 1
    while k < n:
        same = key.narrow(dim, k, n - k) == key.narrow(dim, 0, n - k)
        while same.dim() < vals.dim():
            same = same.unsqueeze(-1)
        head = vals.narrow(dim, 0, k)
        tail = vals.narrow(dim, k, n - k) + torch.where(same, vals.narrow(dim, 0, n - k), 0.0)
        vals = torch.cat([head, tail], dim)
        k *= 2
    return vals


def segment_sum(src: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """``out[..., k] = sum of src[..., j] over index[..., j] == k`` (last dim), deterministically.

    ``index`` has ``src``'s shape (or broadcasts to it). On CPU, ``scatter_add_`` (sequential, so
    deterministic); elsewhere, where ``scatter_add_`` uses float atomics, :func:`sorted_segment_sum`.
    """
    index = index.expand_as(src)
    if src.device.type == "cpu":
        return torch.zeros(*src.shape[:-1], size, dtype=src.dtype, device=src.device).scatter_add_(-1, index, src)
    return sorted_segment_sum(src, index, size)


def sorted_segment_sum(src: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """The atomics-free path of :func:`segment_sum` (any device): a stable sort by index, a segmented scan
    (:func:`_run_sums`), each id's total gathered from its run's last position (0 for absent ids)."""
    index = index.expand_as(src)
    n = src.shape[-1]
    if n == 0:
        return torch.zeros(*src.shape[:-1], size, dtype=src.dtype, device=src.device)
    key, order = torch.sort(index, dim=-1, stable=True)
    key = key.contiguous()
    sums = _run_sums(key, src.gather(-1, order), -1)
    ids = torch.arange(size, device=src.device).expand(*src.shape[:-1], size).contiguous()
    end = torch.searchsorted(key, ids, right=True)  # one past each id's run
    start = torch.searchsorted(key, ids, right=False)
    total = sums.gather(-1, (end - 1).clamp(0, n - 1))
    return torch.where(end > start, total, torch.zeros_like(total))


def row_segment_sum(rows: torch.Tensor, ids: torch.Tensor):
    """Sums of the rows (n, D) that share an id, in a fixed order (stable sort by id; then a segmented scan,
    or on the CPU a sequential ``index_add_`` per run):
    returns ``(sorted ids (n,), sums (n, D) in rows' dtype, last (n,) bool)``, where every position of a
    run of equal ids holds the run's full sum and ``last`` marks each run's final position. Static
    shapes and no atomics: scattering ``sums`` by ``ids`` writes the same value for every duplicate."""
    n = ids.numel()
    key, order = torch.sort(ids, stable=True)
    if n == 0:
        return key, rows[order], torch.zeros(0, dtype=torch.bool, device=ids.device)
    last = torch.ones(n, dtype=torch.bool, device=ids.device)
    last[:-1] = key[1:] != key[:-1]
    if rows.device.type == "cpu":  # index_add_ sums in index order there: deterministic, one pass
        run = torch.cumsum(torch.cat([last.new_zeros(1), last[:-1]]), 0)  # each position's run number
        tot = rows.new_zeros(int(run[-1]) + 1, *rows.shape[1:]).index_add_(0, run, rows[order])
        return key, tot[run], last
    sums = _run_sums(key, rows[order], 0)
    end = torch.searchsorted(key, key, right=True)  # one past this position's run
    return key, sums[end - 1], last
