"""The docs live in the repository and stay true: docs/api.md is what the docstrings give, every public
name has a docstring, and nothing points outside the repository."""
import importlib.util
import inspect
import pathlib
import subprocess

import pytest

import tri_losses

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _gen_api():
    spec = importlib.util.spec_from_file_location("gen_api", ROOT / "docs" / "gen_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_api_reference_is_current():
    text = _gen_api().render()
    assert (ROOT / "docs" / "api.md").read_text() == text, "docs/api.md is out of date: run python docs/gen_api.py"


def test_docs_render_items_and_prose():
    """Args items stay items, also one whose names run on in words ("a, b, and the options: ..."); Returns
    prose ("The loss: ...") is not made an item; prose after an Args list is its own paragraph."""
    doc = ("Title.\n\nArgs:\n    x: the input.\n    a, b, and the options: as in f.\nThe loss is fp32.\n\n"
           "Returns:\n    The loss: fp32.\n")
    out = _gen_api().render_doc(doc)
    assert "- `x`: the input.\n- `a, b, and the options`: as in f.\n\nThe loss is fp32." in out, out
    assert "\nThe loss: fp32." in out and "- `The loss`" not in out, out


def _public_objects():
    import tri_losses.hf
    import tri_losses.returnn
    for module in (tri_losses, tri_losses.samplers, tri_losses.tf_compat, tri_losses.returnn, tri_losses.hf):
        yield module.__name__, module
        for name in module.__all__:
            obj = getattr(module, name)
            if callable(obj) and not inspect.ismodule(obj):
                yield f"{module.__name__}.{name}", obj


def test_docs_every_public_name_has_a_docstring():
    missing = [name for name, obj in _public_objects() if not (inspect.getdoc(obj) or "").strip()]
    assert not missing, f"public names without a docstring: {missing}"


def test_docs_render_google_sections():
    gen = _gen_api()
    md = gen.render_doc("Sum.\n\nArgs:\n    x: ``(N,)`` values,\n        any float dtype.\n    y (optional): more.\n\n"
                        "Returns:\n    The :func:`total`.\n")
    assert md == ("Sum.\n\n\n**Args**\n\n- `x`: `(N,)` values, any float dtype.\n- `y` (optional): more.\n\n\n"
                  "**Returns**\n\nThe `total`.\n")


def test_docs_no_reference_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    offending = []
    for rel in files:
        path = ROOT / rel
        if path.suffix not in {".md", ".py", ".toml", ".cfg", ".txt"} or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        for needle in ("../shared", "shared/spec"):
            if needle in text and rel != "tests/test_docs.py":
                offending.append(f"{rel}: {needle}")
    assert not offending, offending
    assert "spec" not in (ROOT / "docs" / "api.md").read_text().replace("specif", "").replace("inspect", "")
    for rel in ("LICENSE", "docs/README.md", "docs/conventions.md", "docs/hf.md", "docs/api.md"):
        assert (ROOT / rel).is_file(), rel
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()


def test_docs_hf_table_lists_every_fused_model_type():
    """docs/hf.md's tables of fused families (text and multimodal) name exactly the model types and classes of
    ``tri_losses.hf.FUSED_MODEL_TYPES``."""
    import tri_losses.hf
    import re
    rows = [line.split("|") for line in (ROOT / "docs" / "hf.md").read_text().splitlines() if line.startswith("| ")]
    listed = {r[2].strip().strip("`"): r[3].strip().strip("`") for r in rows
              if len(r) > 4 and re.fullmatch(r"`\w+For(CausalLM|ConditionalGeneration)`", r[3].strip())}
    assert listed == {k: v[0] for k, v in tri_losses.hf.FUSED_MODEL_TYPES.items()}
