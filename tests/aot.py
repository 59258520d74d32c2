"""Launch recorder and parallel ahead-of-time compiler for the Triton kernels.

Two recorders, one compiler:

* ``record_launches()`` (CPU, ``TRITON_INTERPRET=1``): captures every launch the public ops make with
  the launch configuration a GPU would get (``interpreting()`` patched to False, kernels not executed),
  specialised as Triton's JIT would (``native_specialize_impl``: int 1 -> constexpr, ints -> i32/i64,
  tensors -> typed pointers). Used by ``tests/test_kernels_compile.py`` to check that every kernel
  compiles for sm_90 without a GPU. Jobs of kind ``"ast"``.
* ``record_jit_launches()`` (GPU, real JIT): Triton's ``knobs.runtime.jit_cache_hook`` is called by
  ``JITFunction._do_compile`` on an in-memory cache miss, before compiling; returning True there makes
  ``run`` return without compiling or launching. The hook receives Triton's own serialised
  specialisation (``specialization_data``: signature, constexprs, attrs such as 16-byte divisibility,
  options), so a job of kind ``"spec"`` is exactly what the JIT would compile. Any JIT kernel is
  recorded, a peer's too.
* ``compile_all(jobs, procs=N)``: compiles the jobs in N subprocesses (no ``TRITON_INTERPRET``).

Why a precompiled ``"spec"`` job makes the later JIT launch a cache hit (read from triton 3.6.0 and
3.9.0, ``runtime/jit.py`` and ``compiler/compiler.py``): on a miss the JIT calls
``compile(ASTSource(fn, signature, constexprs, attrs), target, options.__dict__)``, and ``compile``
looks up the on-disk cache (``TRITON_CACHE_DIR``, default ``~/.triton/cache``) under
``sha256(triton_key()-src.hash()-backend.hash()-options.hash()-env_vars)``, where
``src.hash()`` = sha256 of ``fn.cache_key`` (the kernel's source and its callees' and constexpr
globals'), ``str(attrs)``, the signature values in name order and the constexpr values (``str``, or
``cache_key`` for JIT functions); ``backend.hash()`` = ptxas version + arch; ``options.hash()`` = every
option field (libdevice by file hash). ``_compile_spec`` below rebuilds exactly those inputs from the
JSON the way ``JITFunction.preload`` does: attrs keys back to tuples (values are lists from
``parse_attr`` already, so ``str(attrs)`` is unchanged), tuple-typed signature entries and option
lists back to tuples, dtype constexprs back to ``tl.dtype`` (``str`` is the same either way), and
``backend.parse_options`` (idempotent: the JIT parses twice too). The environment variables that
enter the key are inherited by the subprocesses, and the target is the recording device's. So the
key, hence the cache directory, is the same: ``tests/test_gpu_check.py`` checks this with the JIT's
own binder and hook on a kernel with every kind of argument, for the installed Triton (and a second
one given by ``TRI_LOSSES_AOT_TRITON_PATH``). What does not carry over: the in-memory
cache (each process loads the binary from disk once, milliseconds). An autotuned kernel's configs
each reach the hook and are recorded, but its timing runs time skipped launches, so the config it
picks while recording is arbitrary: record in a process of its own, never in one that is timed.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = r"""
import json, sys, traceback
sys.path.insert(0, sys.argv[3])
from tests.aot import compile_job, int32_row_math
cap, smem, rows = int(sys.argv[1]), int(sys.argv[2]), sys.argv[4] == "1"
failed = []
for line in sys.stdin:
    if not line.strip():
        continue
    job = json.loads(line)
    try:
        k = compile_job(job, cap)
        if k.metadata.shared > smem:
            failed.append((job["kernel"], job.get("constexprs", {}), f"needs {k.metadata.shared} bytes of shared "
                           f"memory, more than the {smem} a block can have"))
        wraps = int32_row_math(k.asm["ttir"]) if rows else []
        if wraps:
            failed.append((job["kernel"], job.get("constexprs", {}), "int32 arithmetic scaled by the row count N "
                           "(wraps from N = 2**31 / factor): " + "; ".join(wraps)))
    except Exception:
        failed.append((job["kernel"], job.get("constexprs", {}), traceback.format_exc()[-2500:]))
print("AOT-RESULT " + json.dumps(failed))
"""


_RESOURCES = r"""
import json, os, re, subprocess, sys, tempfile
sys.path.insert(0, sys.argv[1])
import triton
from tests.aot import compile_job
tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
for line in sys.stdin:
    try:
        k = compile_job(json.loads(line))
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        res = dict(re.findall(r"(REG|STACK):(\d+)", out), triton=triton.__version__)
        res["SHARED"] = str(k.metadata.shared)  # what the launch asks for (cuobjdump's is the static part)
        # tiles written to shared memory from registers: loads (e.g. a dot's operands) left synchronous
        res["SYNC_SMEM"] = str(k.asm["ttgir"].count("ttg.local_alloc %"))
    except Exception as e:
        res = dict(error=repr(e)[-300:], triton=triton.__version__)
    print("RES " + json.dumps(res), flush=True)
"""


def kernel_modules():
    """Every kernel module of the package (``tri_losses/kernels/<name>.py``, private helpers excluded)."""
    import importlib
    import pkgutil

    import tri_losses.kernels as pkg
    return [importlib.import_module(f"tri_losses.kernels.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)
            if not m.name.startswith("_")]


def defined_kernels():
    """``{(module, name)}`` of every Triton kernel (``*_kernel``) the kernel modules define, each at its
    home module (a kernel another module imports counts once)."""
    return {(m.__name__, n) for m in kernel_modules() for n, obj in vars(m).items()
            if n.endswith("_kernel") and hasattr(obj, "fn") and obj.fn.__module__ == m.__name__}


def cuda_target_available() -> bool:
    """Whether the installed Triton has its NVIDIA backend (and so ptxas) to compile for CUDA."""
    try:
        import triton.backends as tb
        return "nvidia" in tb.backends
    except Exception:
        return False


def _decode_spec(spec: str):
    """(signature, constexprs, attrs, options dict) from Triton's ``specialization_data`` JSON, decoded
    as ``JITFunction.preload`` does (see the module docstring for why the cache key is unchanged)."""
    import triton.language as tl

    def tup(v):
        return tuple(tup(x) for x in v) if isinstance(v, list) else v

    def constant(v):
        if isinstance(v, str) and tl.dtype.is_dtype(v):
            return tl.dtype(v)
        if isinstance(v, dict) and "constexpr" in v:
            return tl.constexpr(tup(v["constexpr"]))
        if isinstance(v, dict) and "jit_function" in v:
            import importlib
            mod, qual = v["jit_function"].split(":")
            return getattr(importlib.import_module(mod), qual)
        return tup(v)

    d = json.loads(spec)
    constexprs = {tuple(k): constant(v) for k, v in zip(d["constant_keys"], d["constant_vals"])}
    attrs = dict(zip(map(tuple, d["attrs_keys"]), d["attrs_vals"]))
    signature = {k: tup(v) for k, v in d["signature"].items()}
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in d["options"].items()}
    return signature, constexprs, attrs, options


def _jit_function(job):
    """The module attribute a job names; under ``triton.autotune``/``heuristics`` wrappers, the JIT function."""
    import importlib

    from triton.runtime.jit import JITFunction
    obj = importlib.import_module(job["module"])
    for part in job["kernel"].split("."):
        obj = getattr(obj, part)
    while not isinstance(obj, JITFunction) and hasattr(obj, "fn"):
        obj = obj.fn
    return obj


def spec_source(job):
    """(ASTSource, target, parsed options) of a ``"spec"`` job: what the JIT would hand to ``compile``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    signature, constexprs, attrs, options = _decode_spec(job["spec"])
    target = GPUTarget(*job["target"])
    backend = make_backend(target)
    return ASTSource(_jit_function(job), signature, constexprs, attrs), target, backend.parse_options(options)


def compile_job(job, capability=90):
    """Compile one job; returns Triton's compiled kernel (written to the on-disk cache)."""
    import triton
    if job.get("kind") == "spec":
        src, target, options = spec_source(job)
        return triton.compile(src, target=target, options=options.__dict__)
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    attrs = {(int(i),): a for i, a in job.get("attrs", {}).items()} or None
    src = ASTSource(fn=_jit_function(job), signature=job["signature"], constexprs=job["constexprs"], attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=job["options"])


def record_hook(jobs: dict, target):
    """A ``jit_cache_hook`` recording each launch's specialisation into ``jobs`` and skipping it.

    ``target``: (backend, arch, warp_size) of the device the launches were made for."""
    def hook(*, fn, compile, **_):
        job = dict(kind="spec", module=fn.module, kernel=fn.name, spec=compile["specialization_data"],
                   target=list(target))
        jobs.setdefault(json.dumps([job["module"], job["kernel"], job["spec"]]), job)
        return True  # skip: no compile, no launch
    return hook


@contextlib.contextmanager
def record_jit_launches():
    """Within the block, compiled-Triton launches (any package's) are recorded, neither compiled nor run.

    Needs a GPU (the JIT asks the driver for the device). Outputs of skipped kernels hold whatever the
    allocator returned: run this in a process of its own, and expect a workload that feeds a kernel's
    output to indexing to fail (its later launches are then not recorded). Yields the dict of jobs."""
    from triton import knobs
    from triton.runtime import driver
    t = driver.active.get_current_target()
    jobs: dict = {}
    old = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = record_hook(jobs, (t.backend, t.arch, t.warp_size))
    try:
        yield jobs
    finally:
        knobs.runtime.jit_cache_hook = old


@contextlib.contextmanager
def record_launches(hints=False):
    """Within the block, kernel launches are recorded (not run) with GPU launch configurations.

    Yields the dict of distinct launches: key -> job (module, kernel, signature, constexprs, options).
    Only meaningful with ``TRITON_INTERPRET=1`` (kernels are then ``InterpretedFunction`` objects).
    ``hints``: also record the JIT's 16-byte divisibility hints of the pointer and int arguments
    (``attrs``: parameter index -> Triton's attribute list), so that the compile sees what a GPU launch
    compiles (vectorised loads; the register counts of ``bench/kernel_resources.py``).
    """
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton.runtime.interpreter import InterpretedFunction

    from tri_losses.kernels import _math
    mods = kernel_modules()
    jobs: dict = {}

    def run(self, *args, grid, warmup, **kwargs):
        sig_obj = inspect.signature(self.fn)
        params = [p for p in sig_obj.parameters]
        kernel_kwargs = {k: v for k, v in kwargs.items() if k in params}
        options = {k: v for k, v in kwargs.items() if k not in params}
        bound = sig_obj.bind(*args, **kernel_kwargs)
        bound.apply_defaults()
        signature, constexprs, attrs = {}, {}, {}
        for i, (name, value) in enumerate(bound.arguments.items()):
            ann = sig_obj.parameters[name].annotation
            if "constexpr" in str(ann):
                signature[name] = "constexpr"
                constexprs[name] = value
                continue
            ty, key = native_specialize_impl(BaseBackend, value, False, True, True)
            signature[name] = ty
            if hints and isinstance(key, str) and BaseBackend.parse_attr(key):
                attrs[str(i)] = BaseBackend.parse_attr(key)
            if ty == "constexpr":
                constexprs[name] = value
        options = {k: v for k, v in options.items() if k in ("num_warps", "num_stages", "maxnreg")}
        job = dict(module=self.fn.__module__, kernel=self.fn.__name__, signature=signature,
                   constexprs=constexprs, options=options)
        if attrs:
            job["attrs"] = attrs
        jobs.setdefault(json.dumps(job, sort_keys=True), job)

    saved = [(m, m.interpreting) for m in mods + [_math] if hasattr(m, "interpreting")]
    old_run = InterpretedFunction.run
    try:
        for m, _ in saved:
            m.interpreting = lambda: False
        InterpretedFunction.run = run
        yield jobs
    finally:
        InterpretedFunction.run = old_run
        for m, f in saved:
            m.interpreting = f


def resource_usage(jobs, python_path=None, procs=2):
    """Per job, the sm_90 cubin's resource usage read with the ``cuobjdump`` Triton ships: a dict with
    ``REG`` (registers per thread), ``STACK`` (stack bytes per thread: spills), ``SHARED`` (the shared
    memory the launch asks for, bytes per block), ``SYNC_SMEM`` (how many tiles the TTGIR writes to
    shared memory from registers: e.g. a dot operand whose load the software pipeliner left synchronous)
    as strings and ``triton`` (the version), or ``error``. Compiled in ``procs`` subprocesses
    (``python_path``: another Triton first on the path, as in :func:`compile_all`)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if python_path:
        env["PYTHONPATH"] = python_path + os.pathsep + env.get("PYTHONPATH", "")
    parts = [list(range(i, len(jobs), procs)) for i in range(procs)]
    ps = [subprocess.Popen([sys.executable, "-c", _RESOURCES, ROOT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True, env=env, cwd=ROOT) for _ in parts]
    out = [None] * len(jobs)
    for p, idx in zip(ps, parts):
        text, _ = p.communicate("".join(json.dumps(jobs[i]) + "\n" for i in idx))
        res = [json.loads(ln[4:]) for ln in text.splitlines() if ln.startswith("RES ")]
        for i, r in zip(idx, res):
            out[i] = r
    return out


def int32_row_math(ttir: str) -> list:
    """The TTIR lines that do int32 arithmetic scaled by a kernel's row count ``N``: a product such as
    ``f * N`` (an offset that wraps from N = 2**31 / f) or a loop to ``N`` by a runtime step (a persistent
    grid's ``pid + P`` wraps from N = 2**30 with P = N programs). A loop by a constant block (e.g. 32 rows a
    step) wraps only within a block of 2**31, where no (N, D) operand fits, and is not listed."""
    pat = re.compile(r"arith\.muli[^:]*%N\b[^:]*: i32|scf\.for [^:]* to %N step %(?!c\d)[^:]*: i32")
    return [ln.strip().split(" loc(")[0] for ln in ttir.splitlines() if pat.search(ln)]


def compile_all(jobs, capability=90, shared_limit=232448, procs=2, python_path=None, timeout=1200,
                check_rows=False):
    """Compile every job in ``procs`` subprocesses; returns a list of (kernel, constexprs, error).

    ``"ast"`` jobs compile for ``sm_<capability>``, ``"spec"`` jobs for the target they were recorded on.

    ``shared_limit``: the most shared memory one block may use (H100/H200: 227 KiB); a kernel needing
    more would compile but fail at launch. ``check_rows``: a job whose TTIR has :func:`int32_row_math`
    fails too (the package's kernels: offsets that grow with the row count are int64). ``python_path``
    puts another Triton first on the path (e.g. the GPU image's 3.6 installed with ``pip install --target``)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if python_path:
        env["PYTHONPATH"] = python_path + os.pathsep + env.get("PYTHONPATH", "")
    lines = [json.dumps(j) for j in jobs]
    chunks = [lines[i::procs] for i in range(procs) if lines[i::procs]]
    ps = [subprocess.Popen([sys.executable, "-c", _SCRIPT, str(capability), str(shared_limit), ROOT,
                            "1" if check_rows else "0"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=env, cwd=ROOT)
          for _ in chunks]
    failed = []
    for p, chunk in zip(ps, chunks):
        out, _ = p.communicate("\n".join(chunk) + "\n", timeout=timeout)
        res = [ln for ln in out.splitlines() if ln.startswith("AOT-RESULT ")]
        if p.returncode != 0 or not res:
            failed.append(("<compiler process>", {}, out[-4000:]))
            continue
        failed += [tuple(f) for f in json.loads(res[-1][len("AOT-RESULT "):])]
    return failed
