"""The project owns no top-level import name but ``tri_losses``.

A Python process started in the repository root (``python -m pytest``, a user's script or notebook)
has the root on ``sys.path``; a top-level package folder there would shadow an installed
distribution of the same name. transformers 5 imports Hugging Face's ``kernels`` package, so a
``kernels/`` package in the root once broke ``import transformers`` integrations.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # "-c" puts the current directory (the repository root) first on sys.path, as a script there does.
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_repo_root_has_no_top_level_package_but_tri_losses():
    importable = sorted(p.name for p in ROOT.iterdir()
                        if p.is_dir() and (p / "__init__.py").exists() and p.name not in ("tests",))
    assert importable == ["tri_losses"], importable
    stray_modules = sorted(p.name for p in ROOT.glob("*.py"))
    assert stray_modules == [], stray_modules


def test_kernels_are_importable_inside_the_package_from_the_repo_root():
    r = _run("import tri_losses.kernels as k, tri_losses.kernels._math, os, sys\n"
             "root = os.getcwd()\n"
             "assert os.path.dirname(k.__file__) == os.path.join(root, 'tri_losses', 'kernels'), k.__file__\n"
             "print('ok')")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")
def test_hf_kernels_package_is_not_shadowed_from_the_repo_root():
    code = ("import importlib.metadata, os, sys\n"
            "import transformers.integrations.hub_kernels\n"
            "root = os.getcwd()\n"
            "try:\n"
            "    importlib.metadata.version('kernels')\n"
            "    installed = True\n"
            "except importlib.metadata.PackageNotFoundError:\n"
            "    installed = False\n"
            "try:\n"
            "    import kernels\n"
            "except ImportError:\n"
            "    assert not installed\n"
            "    print('absent')\n"
            "    sys.exit(0)\n"
            "f = getattr(kernels, '__file__', None) or ''\n"
            "assert f and not os.path.abspath(f).startswith(root + os.sep), f'kernels from the repo: {f!r}'\n"
            "print('hf' if installed else 'other')\n")
    r = _run(code)
    assert r.returncode == 0, r.stderr[-3000:]
    try:
        import importlib.metadata as md
        md.version("kernels")
        assert r.stdout.strip() == "hf", r.stdout
    except md.PackageNotFoundError:
        assert r.stdout.strip() in ("absent", "other"), r.stdout
