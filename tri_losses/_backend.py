"""Backend selection: ``"auto" | "triton" | "torch"``.

* ``"triton"`` runs the Triton kernels in :mod:`tri_losses.kernels`: on CUDA tensors, and on CPU
  tensors when ``TRITON_INTERPRET=1`` was set before Triton was imported (Triton's interpreter).
* ``"torch"`` runs the pure-PyTorch implementation (any device, any float dtype incl. fp64).
* ``"auto"`` picks ``"triton"`` where it can run (CUDA tensor with Triton importable, or a CPU
  tensor under the interpreter) and the dtype is fp32/fp16/bf16, else ``"torch"``.

A forced backend that cannot run raises :class:`RuntimeError`/:class:`TypeError` naming why.
:func:`use_backend` sets the default for a block of code (``backend="auto"`` calls follow it).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import threading
import warnings

import torch
from torch.autograd import forward_ad as _fwad

from .kernels import interpreting as interpreter_enabled  # triton-free: the env check only
from ._validate import InputError, InputTypeError

BACKENDS = ("auto", "triton", "torch")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# a context variable, not thread-local state: each thread, asyncio task and generator frame driven
# inside a copied context sees its own setting
_default_backend: contextvars.ContextVar[str] = contextvars.ContextVar("tri_losses_backend", default="auto")
# torch.compile cannot trace ContextVar.get: while tracing, the default is read from this per-thread
# mirror instead (an attribute read that Dynamo guards on, so a changed setting recompiles): ``backend``,
# the innermost open block's setting of the thread's ``blocks`` (a block leaves its own entry on exit, so
# blocks exited out of order, e.g. a suspended generator's closed later, leave no stale setting behind)
_traced = threading.local()


def _default() -> str:
    if torch.compiler.is_compiling():
        return getattr(_traced, "backend", "auto")
    return _default_backend.get()


_TRITON_IMPORTABLE = []  # the answer, once known


@torch.compiler.assume_constant_result  # traced code takes the answer as a constant (no lru_cache: dynamo warns)
def triton_importable() -> bool:
    if not _TRITON_IMPORTABLE:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _TRITON_IMPORTABLE.append(True)
        except Exception:  # pragma: no cover - platform without triton
            _TRITON_IMPORTABLE.append(False)
    return _TRITON_IMPORTABLE[0]


def triton_can_run(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device``."""
    if not triton_importable():
        return False
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        return interpreter_enabled()
    return False


@contextlib.contextmanager
def use_backend(backend: str):
    """Context manager: every ``backend="auto"`` call inside the block uses ``backend`` instead.

    ``with tri_losses.use_backend("torch"): loss = tri_losses.cross_entropy(x, y)`` runs the pure-PyTorch
    code even for CUDA tensors (e.g. to compare with the kernels). Calls that pass an explicit
    ``backend="triton"``/``"torch"`` are not affected. Blocks nest; the previous setting comes back on exit.
    Inside a ``use_backend("triton")`` block the functions without a Triton kernel (e.g. ``ctc_fsa``,
    ``frame_error``) raise as with an explicit ``backend="triton"``: call them with ``backend="torch"`` there.

    The setting lives in a :mod:`contextvars` variable: threads and asyncio tasks each see their own.
    A generator shares its caller's context (Python's rule), so a generator that must keep its own
    setting while suspended is driven inside its own context: ``ctx = contextvars.copy_context()``,
    then ``ctx.run(next, gen)``. Inside code compiled by ``torch.compile`` (which cannot read context
    variables) the setting is the thread's innermost block, as before: pass ``backend=`` explicitly
    there when tasks or generators interleave different settings.

    Args:
        backend: ``"auto"`` (by device: CUDA -> Triton, CPU -> torch, or Triton's interpreter with
            ``TRITON_INTERPRET=1``), ``"triton"`` or ``"torch"``.

    Raises:
        ValueError: ``backend`` is not one of those names.
    """
    if backend not in BACKENDS:
        raise InputError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    token = _default_backend.set(backend)
    if not hasattr(_traced, "blocks"):
        _traced.blocks = []
    blocks, entry = _traced.blocks, (object(), backend)
    blocks.append(entry)
    _traced.backend = backend
    try:
        yield
    finally:
        for i in range(len(blocks) - 1, -1, -1):  # this block's own entry, wherever it is now
            if blocks[i] is entry:
                del blocks[i]
                break
        _traced.backend = blocks[-1][1] if blocks else "auto"
        try:
            _default_backend.reset(token)
        except ValueError:  # exited in another context (e.g. a generator closed elsewhere): that context's
            pass            # own setting stays as it is; the block's context is the one left behind


def check_no_forward_ad(op: str, *tensors) -> None:
    """Raise where forward-mode AD (``torch.autograd.forward_ad``, ``torch.func.jvp``) would lose a
    tangent: a ``torch.library`` custom op has no forward-mode rule, so a dual tensor going into one
    would come out with its tangent silently dropped. Costs one attribute read outside a dual level."""
    if transform_active("Jvp"):
        raise _forward_ad_error(op)
    if getattr(_fwad, "_current_level", 0) < 0:  # no dual level open: no tensor can carry a tangent
        return
    for t in tensors:
        if isinstance(t, torch.Tensor) and _fwad.unpack_dual(t).tangent is not None:
            raise _forward_ad_error(op)


def _forward_ad_error(op: str) -> NotImplementedError:
    return NotImplementedError(f"{op}: forward-mode AD is not supported (torch.autograd.forward_ad, torch.func.jvp, "
                               f"jacfwd, hessian: its custom op has no jvp, the tangent would be lost); use reverse "
                               f"mode (.backward(), torch.autograd.grad, torch.func.grad, vjp, jacrev)")


def transform_active(kind: str) -> bool:
    """Whether a :mod:`torch.func` transform of ``kind`` (``"Jvp"``: ``jvp``/``jacfwd``/``hessian``, whose
    tangents live in the transform's wrappers, which :func:`torch.autograd.forward_ad.unpack_dual` does not see;
    ``"Vmap"``) is active."""
    if not functorch_active():
        return False
    key = getattr(torch._C._functorch.TransformType, kind)
    return any(i.key() == key for i in torch._C._functorch.get_interpreter_stack())


def first_order(op: str):
    """Decorator for an op's backward (a ``register_autograd`` function or an ``autograd.Function``
    backward): the gradient it forms is first order only, since the backward ops have no derivative of
    their own. Under ``create_graph=True`` (grad mode on in the backward) it runs without recording a
    graph and its gradients come back attached to a node that raises when they are differentiated, so a
    gradient penalty fails loudly instead of silently losing its second-order term. Unlike
    :func:`torch.autograd.function.once_differentiable` it does so even when the upstream gradient needs
    no grad (a scalar loss): the saved inputs do, and they are linked into that node, so that
    ``torch.autograd.grad(penalty, inputs)`` (which runs only the nodes on a path to ``inputs``) reaches it
    too. Gradients that are only used as values keep their values; as with PyTorch's own ops,
    ``loss.backward(create_graph=True)`` then makes a reference cycle between a leaf and its ``.grad``."""
    msg = (f"{op}: double backward is not supported: its gradient is first-order only (a gradient of that "
           f"gradient, e.g. a gradient penalty after create_graph=True, needs the PyTorch op)").encode()

    def deco(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if not torch.is_grad_enabled():
                return backward(ctx, *grads)
            once = _SavedOnce(ctx)  # saved tensors unpacked once (checkpointing allows no second unpack)
            with torch.no_grad():
                out = backward(once, *grads)
            # the saved inputs that require grad also feed the error node: torch.autograd.grad(penalty, x)
            # only runs the nodes on a path to x, and a gradient attached to detached leaves alone has none
            anchors, lost = _anchors(once)
            single = not isinstance(out, tuple)
            outs = (out,) if single else out
            idx = [i for i, o in enumerate(outs) if isinstance(o, torch.Tensor)
                   and (o.is_floating_point() or o.is_complex())]
            if not idx:
                return out
            if not anchors or lost:
                _warn_untracked(op)
            if functorch_active():  # (a transform's wrapped tensors take no requires_grad_)
                wrapped = _FirstOrderOnly.apply(msg.decode(), len(idx), *[outs[i] for i in idx], *anchors)
            else:
                err = torch._C._functions.DelayedError(msg, len(idx) + len(anchors))
                wrapped = err(*[outs[i].detach().requires_grad_(True) for i in idx], *anchors)
            wrapped = wrapped if isinstance(wrapped, tuple) else (wrapped,)
            res = list(outs)
            for i, w in zip(idx, wrapped):
                res[i] = w
            return res[0] if single else tuple(res)
        return wrapper
    return deco


class _FirstOrderOnly(torch.autograd.Function):
    """``first_order``'s error node under a :mod:`torch.func` transform: the first ``n`` tensors as they are
    (views), linked to the others (the anchors); differentiating them raises ``msg``."""
    generate_vmap_rule = True

    @staticmethod
    def forward(msg, n, *tensors):
        return tuple(t.view_as(t) for t in tensors[:n])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.msg = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.msg)


class _SavedOnce:
    """A backward's ``ctx`` whose ``saved_tensors`` are unpacked at most once however often they are read
    (non-reentrant checkpointing and single-use pack hooks allow one unpack); other attributes pass through."""

    def __init__(self, ctx):
        object.__setattr__(self, "_ctx", ctx)
        object.__setattr__(self, "_saved", None)

    @property
    def saved_tensors(self):
        if self._saved is None:
            object.__setattr__(self, "_saved", self._ctx.saved_tensors)
        return self._saved

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    def __setattr__(self, name, value):
        setattr(self._ctx, name, value)


def _anchors(ctx: _SavedOnce):
    """``(tensors, lost)``: the inputs that require grad among the tensors ``ctx`` saved for the backward, those
    it holds unsaved (``ctx.anchors``) and those it refers to only weakly (``ctx.anchor_refs``: inputs a path
    keeps no other reference to, e.g. linear CE's fast path, which saves the gradients it formed in the
    forward); ``lost``: such an input is gone. Under a :mod:`torch.func` transform every floating-point one:
    an outer transform's tensors do not report ``requires_grad`` inside an inner one, which differentiates
    them all the same."""
    try:
        saved = [t for t in ctx.saved_tensors if isinstance(t, torch.Tensor)]
    except (AttributeError, RuntimeError):
        saved = []
    refs = [r() for r in getattr(ctx, "anchor_refs", ())]
    func = functorch_active()
    keep = [t for t in saved + list(getattr(ctx, "anchors", ())) + refs if t is not None
            and (t.requires_grad or (func and (t.is_floating_point() or t.is_complex())))]
    return keep, any(t is None for t in refs)


_WARNED_UNTRACKED = set()


def _warn_untracked(op: str) -> None:
    """create_graph=True on a path that saved no input (a training fast path formed the gradient in the
    forward): a later differentiation of the gradient through ``.backward()`` still raises, but one by
    ``torch.autograd.grad`` with respect to the inputs cannot see the gradient's dependence on them."""
    if op not in _WARNED_UNTRACKED:
        _WARNED_UNTRACKED.add(op)
        warnings.warn(f"{op}: the gradient is first-order only and, on this path (formed in the forward), "
                      "not linked to the inputs: differentiating it again with torch.autograd.grad(..., inputs) "
                      "would miss its second-order term without an error. For a gradient penalty use the "
                      "PyTorch op", UserWarning, stacklevel=3)


# The kernels index a row's classes in int32 (column tiles of up to 32768, grid axis 1 <= 65535): rows
# longer than this take the torch code under "auto" and are refused by a forced "triton".
TRITON_MAX_CLASSES = 2 ** 31 - 2 ** 16


def resolve_backend(backend: str, tensor: torch.Tensor, op: str, *, has_triton: bool = True,
                    inputs: tuple = (), classes: int = 0) -> bool:
    """Return True to use the Triton kernels, False for the torch implementation.

    ``op`` names the public function in error messages; ``has_triton=False`` marks ops without a
    Triton kernel (forcing ``"triton"`` on them, by argument or by a ``use_backend`` block, is an error).
    Ops with a kernel run through custom ops
    on both backends, so for them a dual (forward-mode AD) ``tensor`` or one in ``inputs`` (the op's
    other differentiable operands) raises :func:`check_no_forward_ad`'s error; ops without one are
    plain torch, where forward-mode AD works. ``classes``: the op's classes per row, at most
    ``TRITON_MAX_CLASSES`` for the kernels.
    """
    if backend not in BACKENDS:
        raise InputError(f"{op}: backend: expected one of {BACKENDS}, got {backend!r}")
    if has_triton:
        check_no_forward_ad(op, tensor, *inputs)
    block = _default() if backend == "auto" else None  # a use_backend setting in effect ("auto": none)
    if backend == "auto":
        backend = block
    if backend == "torch":
        return False
    dev = tensor.device
    if backend == "auto":
        return (tensor.dtype in TRITON_DTYPES and triton_can_run(dev)
                and classes <= TRITON_MAX_CLASSES)
    # forced "triton"
    if not has_triton:
        how = ("use_backend('triton') is in effect: call it with backend='torch' or outside the block"
               if block == "triton" else "use backend='auto' or 'torch'")
        raise RuntimeError(f"{op}: backend='triton' is not available: this op has no Triton kernel; {how}")
    if not triton_importable():
        raise RuntimeError(f"{op}: backend='triton' requested but triton cannot be imported on this platform")
    if not triton_can_run(dev):
        raise RuntimeError(f"{op}: backend='triton' requested for a {dev.type} tensor: Triton runs on CUDA "
                           f"tensors, or on CPU tensors only with TRITON_INTERPRET=1 set before import")
    if tensor.dtype not in TRITON_DTYPES:
        raise InputTypeError(f"{op}: backend='triton' supports float32/float16/bfloat16 inputs, got {tensor.dtype} "
                        f"(use backend='torch' for float64)")
    if classes > TRITON_MAX_CLASSES:
        raise InputError(f"{op}: backend='triton' takes at most {TRITON_MAX_CLASSES} classes per row, got "
                         f"{classes} (use backend='torch' or 'auto')")
    return True


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "mtia", "maia", "ipu")  # (not meta: no autocast)
_ANY_AUTOCAST = getattr(torch._C, "_is_any_autocast_enabled", None)  # (torch >= 2.10 has both: ~0.3 us)
_DISABLE_AUTOCAST = getattr(torch._C, "_DisableAutocast", None)  # excludes every device's autocast key


def _autocast_off():
    """A context with autocast off on every device type (a no-op when it is off everywhere)."""
    if _ANY_AUTOCAST is not None and _DISABLE_AUTOCAST is not None:
        return _DISABLE_AUTOCAST() if _ANY_AUTOCAST() else contextlib.nullcontext()
    stack = contextlib.ExitStack()  # the public way, one device type at a time
    for d in _AUTOCAST_DEVICES:
        try:
            on = torch.is_autocast_enabled(d)
        except (RuntimeError, ValueError):  # a device type this build does not know
            continue
        if on:
            stack.enter_context(torch.autocast(d, enabled=False))
    return stack


def custom_op(name: str, *, mutates_args, rows: tuple = ()):
    """``torch.library.custom_op(name, mutates_args=...)`` for every op of the package: its implementation
    runs with ``torch.autocast`` off. A custom op has no autocast rule, so its body would otherwise run
    under the caller's autocast, its torch backend's matmuls in the autocast dtype (the kernels keep the
    inputs' dtypes, so the backends would differ); ops that want autocast's casts (the linear heads) cast
    their inputs before they enter, as :func:`autocast_like_linear` does.

    The op also works under :mod:`torch.func` transforms (see :class:`_FuncOp`): ``torch.vmap`` runs it
    once per sample, and ``torch.func.grad``/``vjp`` go through an ``autograd.Function`` with the op's
    registered backward. ``rows``: the positions of a row-wise op's row arguments (each row's outputs depend
    on that row of them only, and every output is per row): ``vmap`` over those alone folds the samples
    into the rows, one call (see :func:`_per_sample`)."""
    def register(fn):
        @functools.wraps(fn)
        def body(*args, **kwargs):
            with _autocast_off():
                return fn(*args, **kwargs)
        # the schema from fn itself: its string annotations resolve in its own module
        schema = torch.library.infer_schema(fn, mutates_args=mutates_args)
        op = torch.library.custom_op(name, mutates_args=mutates_args, schema=schema)(body)
        if not mutates_args:  # (an op writing into its arguments has no per-sample form)
            op.register_vmap(_per_sample(op, rows))
        return _FuncOp(op)
    return register


def functorch_active() -> bool:
    """Whether a :mod:`torch.func` transform (``vmap``, ``grad``, ``vjp``, ``jvp``, ...) is active: its
    tensors are wrapped, their values per sample (``vmap``) and their gradients tracked by the transform.
    False while ``torch.compile`` traces (which cannot trace the check; a transform inside compiled code is
    not supported: the custom ops' own autograd refuses it)."""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def check_no_functorch(op: str, what: str) -> None:
    """Raise for ``what`` (a feature of ``op`` that does not work per sample: collectives) under a
    :mod:`torch.func` transform."""
    if functorch_active():
        raise NotImplementedError(f"{op}: {what} is not supported under torch.func transforms (vmap, grad, "
                                  f"jacrev, ...): call it outside the transform")


def _per_sample(op, rows: tuple = ()):
    """A ``torch.vmap`` rule that runs ``op`` once per sample of the mapped dimension and stacks the
    results: the same numbers as a loop over the samples (the ops reduce within a sample only). A row-wise
    op mapped over its ``rows`` arguments only runs once on the samples' rows stacked (the arguments not
    mapped repeated for every sample) and splits its outputs' rows back into samples."""
    def rule(info, in_dims, *args):
        n = info.batch_size
        fold = bool(rows) and all(i in rows for i, d in enumerate(in_dims) if isinstance(d, int))
        if n == 0 and not fold:
            # no sample to run: one of zeros gives the outputs' per-sample shapes and dtypes, of none each
            one = [a.new_zeros(a.shape[:d] + a.shape[d + 1:]) if isinstance(d, int) else a
                   for a, d in zip(args, in_dims)]
            return _batched(op(*one), lambda o: o.new_empty((0, *o.shape)))
        if fold:
            flat, per = list(args), 0
            for i in rows:
                a, d = args[i], in_dims[i]
                if isinstance(a, torch.Tensor):
                    a = a.movedim(d, 0) if isinstance(d, int) else a.expand(n, *a.shape)
                    per = a.shape[1]  # (n, rows per sample, ...)
                    flat[i] = a.reshape(n * per, *a.shape[2:])
            def split(o):  # rows back into samples; an output left empty, (0,) per sample (e.g. an option's
                # output not asked for), is (n, 0)
                empty = o.dim() and not o.numel() and o.shape[0] != n * per
                return o.new_empty(n, *o.shape) if empty else o.reshape(n, per, *o.shape[1:])
            return _batched(op(*flat), split)
        outs = [op(*[a.select(d, i) if isinstance(d, int) else a for a, d in zip(args, in_dims)]) for i in range(n)]
        if isinstance(outs[0], torch.Tensor):
            return _batched(torch.stack(outs))
        return _batched(tuple(torch.stack(c) if isinstance(c[0], torch.Tensor) else c[0] for c in zip(*outs)))
    return rule


def _batched(out, batch=None):
    """A vmap rule's ``(outputs, out_dims)`` for ``out`` (a tensor or a tuple): each tensor through ``batch``
    (into its mapped form, samples in dim 0; None: it is that already), other outputs as they are."""
    outs = (out,) if isinstance(out, torch.Tensor) else out
    res = tuple(batch(o) if batch is not None and isinstance(o, torch.Tensor) else o for o in outs)
    dims = tuple(0 if isinstance(o, torch.Tensor) else None for o in res)
    return (res[0], dims[0]) if isinstance(out, torch.Tensor) else (res, dims)


class _FuncOp:
    """A package op: calls go to the ``torch.library`` custom op, except under a :mod:`torch.func`
    transform, where PyTorch's custom op cannot take part in ``grad``/``vjp`` (its generated
    ``autograd.Function`` has no ``setup_context``): there the call goes through an ``autograd.Function``
    made from the op's own ``register_autograd`` backward and setup (``generate_vmap_rule``: the op's
    per-sample vmap rule inside). An op without a backward (a backward op) runs inside one, where
    :func:`first_order` records no graph. Forward mode (``jvp``) raises: the ops have no forward-mode rule."""

    def __init__(self, op):
        self._op = op
        self._function = None

    def __call__(self, *args):
        if self._function is not None and functorch_active():
            check_no_forward_ad(self._op._qualname.split("::")[-1])
            return self._function.apply(*args)
        return self._op(*args)

    def register_autograd(self, backward, *, setup_context):
        op = self._op
        op.register_autograd(backward, setup_context=setup_context)
        self._function = type(op._qualname.split("::")[-1], (torch.autograd.Function,), dict(
            forward=staticmethod(lambda *args: op(*args)), setup_context=staticmethod(setup_context),
            backward=staticmethod(backward), generate_vmap_rule=True))

    def __getattr__(self, name):  # register_fake, _opoverload, ...
        if name in ("_op", "_function") or name.startswith("__"):  # (not set yet: copy, unpickling)
            raise AttributeError(name)
        return getattr(self._op, name)


def autocast_like_linear(fn):
    """Under ``torch.autocast`` the head's GEMM runs in the autocast dtype, as autocast runs ``F.linear``
    (and ``F.linear_cross_entropy``): ``input``, ``linear_weight`` and ``linear_bias`` in float16/32 are cast
    to it (float64 is left alone, as autocast does), then ``fn`` runs with autocast off, so the op sees one
    dtype and its torch backend's matmuls keep it; the loss is float32 and the gradients reach the
    caller's tensors in their own dtypes through the casts. ``fn(input, linear_weight, target, *args,
    linear_bias=None, **kwargs)``."""
    @functools.wraps(fn)
    def wrapper(input, linear_weight, target, *args, linear_bias=None, **kwargs):
        dev = input.device.type if isinstance(input, torch.Tensor) else None
        if dev is None or dev not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(dev):
            return fn(input, linear_weight, target, *args, linear_bias=linear_bias, **kwargs)
        dtype = torch.get_autocast_dtype(dev)

        def cast(t):
            return t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16,
                                                                               torch.float32) else t
        with torch.autocast(dev, enabled=False):
            return fn(cast(input), cast(linear_weight), target, *args, linear_bias=cast(linear_bias), **kwargs)
    return wrapper


def device_guard(tensor: torch.Tensor):
    """``torch.cuda.device(tensor.device)`` for CUDA tensors, a no-op otherwise (kernel launches)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def kernels(family: str):
    """The Triton kernel module ``tri_losses.kernels.<family>``, imported on first use: importing it
    imports Triton, and ``TRITON_INTERPRET`` is read when its kernels are first defined."""
    return importlib.import_module(f"tri_losses.kernels.{family}")
