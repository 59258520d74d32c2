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
* ``compile_jobs(jobs, procs=N)``: compiles the jobs in N subprocesses (no ``TRITON_INTERPRET``), with
  each launch's shared memory, int32 row math and (``usage=True``) registers, spills and synchronous
  tiles; ``compile_all`` lists the failures.

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

import concurrent.futures
import contextlib
import inspect
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEADLINE = "not compiled before the deadline"  # compile_jobs' error for the jobs its timeout left out

_SCRIPT = r"""
import json, os, re, subprocess, sys, tempfile, traceback
sys.path.insert(0, sys.argv[1])
import triton
from tests.aot import compile_job, int32_row_math
cap, usage = int(sys.argv[2]), sys.argv[3] == "1"
tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
for line in sys.stdin:
    if not line.strip():
        continue
    try:
        k = compile_job(json.loads(line), cap)
        res = dict(SHARED=k.metadata.shared, ROWS=int32_row_math(k.asm["ttir"]),
                   BARRIERS=k.asm["ptx"].count("bar.sync"))
        if usage:
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(k.asm["cubin"])
                f.flush()
                out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
            res.update({key: int(v) for key, v in re.findall(r"(REG|STACK):(\d+)", out)})
            # tiles written to shared memory from registers: loads (e.g. a dot's operands) left synchronous
            res["SYNC_SMEM"] = k.asm["ttgir"].count("ttg.local_alloc %")
    except Exception:
        res = dict(error=traceback.format_exc()[-2500:])
    res["triton"] = triton.__version__
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


def int32_row_math(ttir: str) -> list:
    """The TTIR lines that do int32 arithmetic scaled by a kernel's row count ``N``: a product such as
    ``f * N`` (an offset that wraps from N = 2**31 / f) or a loop to ``N`` by a runtime step (a persistent
    grid's ``pid + P`` wraps from N = 2**30 with P = N programs). A loop by a constant block (e.g. 32 rows a
    step) wraps only within a block of 2**31, where no (N, D) operand fits, and is not listed."""
    pat = re.compile(r"arith\.muli[^:]*%N\b[^:]*: i32|scf\.for [^:]* to %N step %(?!c\d)[^:]*: i32")
    return [ln.strip().split(" loc(")[0] for ln in ttir.splitlines() if pat.search(ln)]


def compile_jobs(jobs, capability=90, procs=2, python_path=None, usage=False, timeout=1200):
    """Compile every job in ``procs`` subprocesses (no ``TRITON_INTERPRET``); per job a dict: ``SHARED``
    (the shared memory the launch asks for, bytes per block), ``ROWS`` (:func:`int32_row_math` of its TTIR),
    ``BARRIERS`` (how many ``bar.sync`` its PTX has), ``triton`` (the version), or ``error`` (the traceback's
    end). With ``usage``, also from the sm_90 cubin
    (the ``cuobjdump`` Triton ships): ``REG`` (registers per thread), ``STACK`` (stack bytes per thread:
    spills), and ``SYNC_SMEM`` (how many tiles the TTGIR writes to shared memory from registers: e.g. a dot
    operand whose load the software pipeliner left synchronous).

    ``"ast"`` jobs compile for ``sm_<capability>``, ``"spec"`` jobs for the target they were recorded on.
    ``python_path`` puts another Triton first on the path (e.g. the GPU image's 3.6 installed with
    ``pip install --target``). A job whose process died has ``error`` with that process's last output. At
    ``timeout`` seconds the processes still compiling are stopped: the jobs they finished keep their results,
    the others get ``error`` starting with :data:`DEADLINE` and ``late=True``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if python_path:
        env["PYTHONPATH"] = python_path + os.pathsep + env.get("PYTHONPATH", "")
    parts = [list(range(i, len(jobs), procs)) for i in range(procs) if i < len(jobs)]
    ps = [subprocess.Popen([sys.executable, "-c", _SCRIPT, ROOT, str(capability), "1" if usage else "0"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=env, cwd=ROOT) for _ in parts]
    # each process is fed and read by a thread of its own: one communicate() after another would hand the
    # next process its jobs only once the previous one had finished, and the compiles would run one at a time
    late = set()  # processes stopped at the deadline: their jobs compiled so far keep their results

    def feed(p, idx):
        try:
            return p.communicate("".join(json.dumps(jobs[i]) + "\n" for i in idx), timeout=timeout)
        except subprocess.TimeoutExpired:
            late.add(p.pid)
            p.kill()
            return p.communicate()

    try:
        with concurrent.futures.ThreadPoolExecutor(len(ps) or 1) as pool:
            outs = list(pool.map(feed, ps, parts))
    finally:
        for p in ps:
            if p.poll() is None:
                p.kill()
    out = [None] * len(jobs)
    for p, idx, (text, err) in zip(ps, parts, outs):
        res = [json.loads(ln[4:]) for ln in (text or "").splitlines() if ln.startswith("RES ")]
        for n, i in enumerate(idx):
            out[i] = res[n] if n < len(res) else dict(error=f"{DEADLINE} ({timeout:.0f} s)", late=True) \
                if p.pid in late else dict(error=f"compiler process exited {p.returncode}: " + (err or "")[-2500:])
    return out


def compile_failures(jobs, results, shared_limit=232448, check_rows=False):
    """(kernel, constexprs, message) per job of :func:`compile_jobs` that failed to compile, asks for more
    shared memory than ``shared_limit`` (a block's most on H100/H200: 227 KiB; it would compile, then fail at
    launch), or, with ``check_rows``, has :func:`int32_row_math` in its TTIR (the package's kernels: offsets
    that grow with the row count are int64)."""
    failed = []
    for job, r in zip(jobs, results):
        if "error" in r:
            msg = r["error"]
        elif r["SHARED"] > shared_limit:
            msg = f"needs {r['SHARED']} bytes of shared memory, more than the {shared_limit} a block can have"
        elif check_rows and r["ROWS"]:
            msg = "int32 arithmetic scaled by the row count N (wraps from N = 2**31 / factor): " + "; ".join(r["ROWS"])
        else:
            continue
        failed.append((job["kernel"], job.get("constexprs", {}), msg))
    return failed


def compile_all(jobs, capability=90, shared_limit=232448, procs=2, python_path=None, timeout=1200,
                check_rows=False):
    """Compile every job (:func:`compile_jobs`); returns :func:`compile_failures`' list."""
    return compile_failures(jobs, compile_jobs(jobs, capability, procs, python_path, timeout=timeout),
                            shared_limit, check_rows)
