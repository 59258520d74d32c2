"""Input checks that name the argument, the expected and the actual value.

They raise :class:`InputError` / :class:`InputTypeError`, which derive from ``ValueError`` /
``TypeError`` and from ``RuntimeError`` alike; every family raises its own input errors with them.

None of these synchronise with a CUDA device unless the caller asks for a value check
(``check_index_range`` is only called on CPU tensors or with ``validate=True``).
"""
from __future__ import annotations

import warnings

import numbers
import operator
from collections.abc import Sequence

import torch



class InputError(ValueError, RuntimeError):
    """A bad argument value. Both a :class:`ValueError` (this package's rule) and a
    :class:`RuntimeError` (what PyTorch raises for the same inputs), so callers catching either work."""


class InputIndexError(InputError, IndexError):
    """An id outside its range: an :class:`InputError` that is also an :class:`IndexError`, which PyTorch raises
    for a class id out of bounds."""


class InputTypeError(TypeError, RuntimeError):
    """A bad argument type or dtype: a :class:`TypeError` that is also a :class:`RuntimeError` (as
    PyTorch's own dtype errors), so callers catching either work."""


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
REDUCTIONS = ("none", "mean", "sum")


def check_tensor(x, name: str, op: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InputTypeError(f"{op}: {name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def check_float(x, name: str, op: str, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    check_tensor(x, name, op)
    if x.dtype not in dtypes:
        raise InputTypeError(f"{op}: {name}: expected a floating dtype in "
                             f"{[str(d).replace('torch.', '') for d in dtypes]}, got {x.dtype}")
    return x


def check_int(x, name: str, op: str) -> torch.Tensor:
    check_tensor(x, name, op)
    if x.dtype not in INT_DTYPES:
        raise InputTypeError(f"{op}: {name}: expected an integer tensor, got {x.dtype}")
    return x


def check_option(value, name: str, op: str, choices: Sequence) -> None:
    if value not in choices:
        raise InputError(f"{op}: {name}: expected one of {tuple(choices)}, got {value!r}")


def check_reduction(reduction, op: str) -> None:
    check_option(reduction, "reduction", op, REDUCTIONS)


def legacy_reduction(size_average, reduce, reduction: str) -> str:
    """``reduction`` from PyTorch's deprecated ``size_average``/``reduce`` flags, as ``torch.nn`` maps them
    (a None flag counts as True; with its deprecation warning); ``reduction`` when both are None, PyTorch's
    deprecated spelling ``"elementwise_mean"`` read as ``"mean"`` (with PyTorch's warning). Plain Python, so
    that ``torch.compile`` traces it (torch's own helper is an opaque torch.* call from here)."""
    if size_average is None and reduce is None:
        if isinstance(reduction, str) and reduction == "elementwise_mean":
            if not torch.compiler.is_compiling():
                warnings.warn("reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead.")
            return "mean"
        return reduction
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    out = ("mean" if size_average else "sum") if reduce else "none"
    if not torch.compiler.is_compiling():  # (a warning is a graph break under torch.compile)
        warnings.warn(f"size_average and reduce args will be deprecated, please use reduction='{out}' instead.")
    return out


def _is_host_bool(value) -> bool:
    """A Python or NumPy bool (``numpy.bool_``, named ``bool`` from NumPy 2)."""
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"))


def _is_bool(value) -> bool:
    """A Python, NumPy or 0-d tensor bool (never taken as a number, as PyTorch's int/float arguments)."""
    return _is_host_bool(value) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool)


def check_bool(op: str, **flags) -> None:
    """Each flag a Python or NumPy bool, as PyTorch's bool arguments (an int, None or the string "False"
    would otherwise be taken by its truth value)."""
    for name, value in flags.items():
        if not _is_host_bool(value):
            raise InputTypeError(f"{op}: {name}: expected a bool, got {type(value).__name__} ({value!r})")


def as_int(value, name: str, op: str, *, low=None, high=None, what: str = "an int") -> int:
    """``value`` as a Python int: an int or anything with ``__index__`` (a NumPy integer, a 0-d integer
    tensor), as PyTorch's int arguments take them; bools and floats raise. ``low``/``high``: inclusive bounds. A
    symbolic size (``torch.SymInt``, under ``torch.compile``) is returned as it is, so the graph stays dynamic."""
    if isinstance(value, torch.SymInt) or (isinstance(value, int) and not _is_bool(value)):
        v = value  # (an int as it is: under torch.compile a size is one and stays symbolic; index() would pin it)
    else:
        try:
            if _is_bool(value) or (isinstance(value, torch.Tensor) and value.dim()):
                raise TypeError
            v = operator.index(value)
        except TypeError:
            raise InputTypeError(f"{op}: {name}: expected {what}, got {type(value).__name__}") from None
    if (low is not None and v < low) or (high is not None and v > high):
        rng = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise InputError(f"{op}: {name}: expected {what} in {rng}, got {v}")
    return v


def check_labels(targets: torch.Tensor, lengths, op: str, *, high: int | None = None,
                 blank: int | None = None) -> None:
    """Raise for padded host label ``targets (B, S)`` within their ``lengths`` (B,) (a host tensor or list)
    that lie outside ``[0, high)`` (``high`` None: negative ones), or that are the CTC ``blank`` (naming the
    first such position)."""
    inside = torch.arange(targets.shape[1])[None, :] < torch.as_tensor(lengths, dtype=torch.int64)[:, None]
    bad = inside & ((targets < 0) | (targets >= high)) if high is not None else inside & (targets < 0)
    if bool(bad.any()):
        b, s = bad.nonzero()[0].tolist()
        want = f"class ids in [0, {high})" if high is not None else "non-negative ids within target_lengths"
        raise InputIndexError(f"{op}: targets: expected {want}, got {int(targets[b, s])} at [{b}, {s}]")
    hit = inside & (targets == blank) if blank is not None else None
    if hit is not None and bool(hit.any()):
        b, s = hit.nonzero()[0].tolist()
        raise InputError(f"{op}: targets: expected no blank ({blank}) within target_lengths, got one at [{b}, {s}]")


def check_ignore_index(value, op: str) -> int:
    """A class-id ``ignore_index`` as a Python int in int64's range (class ids are compared as int64)."""
    return as_int(value, "ignore_index", op, low=-2**63, high=2**63 - 1, what="an int64 value")


def class_ids(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Class-id targets in a dtype where ``ignore_index`` compares as in PyTorch (as int64 values): int64,
    or int32 when ``ignore_index`` fits in it (the kernels read int32 ids directly); narrower dtypes, and
    int32 next to an ``ignore_index`` outside its range, become int64 (a comparison with a Python int
    casts the int to the tensor's dtype: -100 would equal a uint8 id 156)."""
    if target.dtype == torch.int64 or (target.dtype == torch.int32 and -2**31 <= ignore_index < 2**31):
        return target
    return target.to(torch.int64)


def torch_float_arg(value):
    """A float argument as PyTorch's argument parser reads it: a 0-dim real tensor that does not require grad
    becomes its Python float (a device tensor is read on the host, as there); anything else is returned
    unchanged, for the checks to name."""
    if (isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad
            and not value.is_complex() and value.dtype != torch.bool):
        return float(value)
    return value


def check_number(value, name: str, op: str, *, low=None, high=None, low_inclusive=True,
                 high_inclusive=True, allow_none=False) -> None:
    """A real number (an int, a float or a NumPy scalar; not a bool) that is not NaN, within the bounds."""
    if value is None and allow_none:
        return
    if type(value) not in (int, float) and (_is_bool(value) or not isinstance(value, numbers.Real)):
        raise InputTypeError(f"{op}: {name}: expected a number, got {type(value).__name__}")
    v = float(value)
    if v != v:
        raise InputError(f"{op}: {name}: expected a number, got nan")
    if ((low is not None and (v < low or (v == low and not low_inclusive)))
            or (high is not None and (v > high or (v == high and not high_inclusive)))):
        rng = (("[" if low_inclusive and low is not None else "(") + ("-inf" if low is None else str(low)) + ", "
               + ("inf" if high is None else str(high)) + ("]" if high_inclusive and high is not None else ")"))
        raise InputError(f"{op}: {name}: expected a value in {rng}, got {value}")


def check_same_dtype(x: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str, op: str) -> None:
    """Raise TypeError unless ``x`` has ``ref``'s dtype (PyTorch's linear layers reject mixed dtypes)."""
    if x.dtype != ref.dtype:
        raise InputTypeError(f"{op}: {name}: expected {ref.dtype} (the dtype of {ref_name}), got {x.dtype}")


def check_same_device(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str, op: str) -> None:
    if a.device != b.device:
        raise InputError(f"{op}: {name_b}: expected a tensor on {a.device} (like {name_a}), got {b.device}")


def check_shape(x: torch.Tensor, expected: Sequence[int], name: str, op: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise InputError(f"{op}: {name}: expected shape {tuple(expected)}, got {tuple(x.shape)}")


def broadcast_shape(*shapes: Sequence[int]) -> tuple | None:
    """The shape ``shapes`` broadcast to (PyTorch's rule), or None where they do not broadcast. Same result as
    ``torch.broadcast_shapes`` without its per-call cost (tens of microseconds: it runs through the reference
    implementation's symbolic-shape checks), which the ops' argument checks would pay on every call."""
    first = tuple(shapes[0])
    # lengths first: a tuple comparison compares items before lengths, and with symbolic sizes (torch.export,
    # dynamic compile) a (C,) against an (N, C) would guard N == C
    if all(len(s) == len(first) and tuple(s) == first for s in shapes[1:]):
        return first
    out = [1] * max(len(s) for s in shapes)
    for s in shapes:
        for i, d in enumerate(s, len(out) - len(s)):  # aligned at the last dim
            if d != 1:
                if out[i] == 1:
                    out[i] = d
                elif out[i] != d:
                    return None
    return tuple(out)


def fake_mode_active() -> bool:
    """Whether a ``FakeTensorMode`` is active (every tensor made or computed now is fake: no values)."""
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


def has_values(t: torch.Tensor) -> bool:
    """Whether ``t`` holds real values (and storage): not while ``torch.compile`` traces, not for a fake
    tensor (``FakeTensorMode``, ``make_fx``), not for a tensor batched by ``torch.vmap``."""
    if torch.compiler.is_compiling() or fake_mode_active():
        return False  # (under FakeTensorMode even a real tensor's comparisons come out fake)
    if type(t) is torch.Tensor or type(t) is torch.nn.Parameter:
        return not _vmapped(t)
    from torch._subclasses.fake_tensor import FakeTensor
    return not isinstance(t, FakeTensor)


def _vmapped(t: torch.Tensor) -> bool:
    """Whether ``t`` is batched by ``torch.vmap`` at some level: Python sees one sample's view of it, whose
    values cannot be read (a transform's other wrappers, e.g. ``torch.func.grad``'s, can be)."""
    ft = torch._C._functorch
    while ft.is_functorch_wrapped_tensor(t):
        if ft.is_batchedtensor(t):
            return True
        t = ft.get_unwrapped(t)
    return False


def host_readable(t: torch.Tensor, validate: bool = False) -> bool:
    """Whether the argument checks read ``t``'s values on the host: on the CPU always (free), elsewhere only
    with ``validate=True`` (a device sync the caller asked for); never while ``torch.compile`` traces or for
    a fake tensor (``FakeTensorMode``, ``make_fx``), which has no values to read."""
    return (validate or t.device.type == "cpu") and has_values(t)


def check_index_range(idx: torch.Tensor, name: str, op: str, high: int, *, low: int = 0,
                      ignore_index: int | None = None) -> None:
    """Raise if any id (other than ``ignore_index``) lies outside ``[low, high)``. Syncs on CUDA."""
    if idx.numel() == 0:
        return
    idx = idx.long()  # (a narrower dtype would wrap ``high``: uint8 ids against 300 classes)
    bad = (idx < low) | (idx >= high)
    if ignore_index is not None:
        bad &= idx != ignore_index
    if bool(bad.any()):
        first = idx[bad].flatten()[0].item()
        extra = f" (or ignore_index={ignore_index})" if ignore_index is not None else ""
        raise InputIndexError(f"{op}: {name}: expected ids in [{low}, {high}){extra}, got {first}")


def _int_like(v, name: str, op: str) -> int:
    """One length from a sequence: an int or an integer scalar (NumPy integer, 0-d integer tensor), as
    PyTorch's ops take them; bools and floats raise."""
    try:
        return as_int(v, name, op)
    except InputTypeError:
        raise InputTypeError(f"{op}: {name}: expected a sequence of ints, got an element {v!r}") from None


def as_lengths(lengths, name: str, op: str, batch: int, device: torch.device, *, max_value: int | None = None,
               check_values: bool = True) -> torch.Tensor:
    """Lengths given as a tensor (any device) or a sequence of ints -> int64 tensor on ``device``.

    Values are checked (non-negative, ``<= max_value``) when they live on the CPU or when
    ``check_values`` and the target device is the CPU; CUDA tensors are not read (no sync).
    """
    if isinstance(lengths, torch.Tensor):
        if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.is_complex():
            raise InputTypeError(f"{op}: {name}: expected an integer tensor or a sequence of ints, got {lengths.dtype}")
        t = lengths
    elif isinstance(lengths, Sequence) and not isinstance(lengths, (str, bytes)) or (
            type(lengths).__name__ == "ndarray" and getattr(lengths, "ndim", 0) == 1):  # a NumPy array
        t = torch.tensor([_int_like(v, name, op) for v in lengths], dtype=torch.int64)
    else:
        raise InputTypeError(f"{op}: {name}: expected an integer tensor or a sequence of ints, got {type(lengths).__name__}")
    if t.dim() != 1 or t.shape[0] != batch:
        raise InputError(f"{op}: {name}: expected shape ({batch},), got {tuple(t.shape)}")
    if check_values and t.numel() and host_readable(t):
        lo, hi = int(t.min()), int(t.max())
        if lo < 0:
            raise InputError(f"{op}: {name}: expected non-negative lengths, got {lo}")
        if max_value is not None and hi > max_value:
            raise InputError(f"{op}: {name}: expected lengths <= {max_value} (the padded size), got {hi}")
    return to_device(t, device, torch.int64, name, op)


def to_device(t: torch.Tensor, device, dtype=None, name: str | None = None, op: str | None = None) -> torch.Tensor:
    """``t`` on ``device`` (and ``dtype``), without a host sync where that is safe: a copy to an accelerator
    is queued (``non_blocking``); a copy to the CPU blocks, because the host reads it next (a non-blocking
    device-to-CPU copy lands in pinned memory later than the host reads it). A meta tensor (no data) going
    to a real device raises, naming the argument ``name`` of ``op``."""
    dev = torch.device(device) if device is not None else t.device
    if t.device.type == "meta" and dev.type != "meta":
        raise InputError(f"{op}: {name}: expected a tensor with data (it goes to {dev}), got a meta tensor")
    return t.to(device=device, dtype=dtype, non_blocking=dev.type != "cpu")


def class_index(value, name: str, op: str, num_classes: int) -> int:
    """An int class index in ``[-C, C)`` (negative counts from the end, as RETURNN's blank = -1),
    normalised to ``[0, C)``."""
    value = as_int(value, name, op)
    if not -num_classes <= value < num_classes:
        raise InputError(f"{op}: {name}: expected an index in [{-num_classes}, {num_classes}), got {value}")
    return value % num_classes


def check_class_weight(weight, C: int, input: torch.Tensor, op: str, allow_grad: bool = False,
                       group: bool = False) -> None:
    """A ``(C,)`` class-weight tensor on the input's device that does not require grad unless ``allow_grad``
    (with class-id targets the loss is not differentiable with respect to the class weights, as in PyTorch;
    with probability targets it is, but not under a process ``group``)."""
    check_float(weight, "weight", op)
    check_shape(weight, (C,), "weight", op)
    check_same_device(input, weight, "input", "weight", op)
    if not (weight.requires_grad and torch.is_grad_enabled()):
        return
    if not allow_grad:
        raise InputError(f"{op}: weight: class weights are not differentiable with class-id targets (as in "
                         f"PyTorch), got a tensor that requires grad; pass weight.detach()")
    if group:
        raise InputError(f"{op}: weight: class weights that require grad (differentiable with probability "
                         f"targets) are not supported with a process_group (their gradient needs every "
                         f"rank's log-probabilities); pass weight.detach(), or compute without the group")

