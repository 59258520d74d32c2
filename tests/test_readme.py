"""README.md's examples run top to bottom, as a reader would paste them (torch backend, sizes shrunk)."""
import pathlib
import re

import pytest

import tri_losses

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"

# README shows realistic sizes; the test runs the same code at small ones (whole numbers only)
SHRINK = {"793471": "5003", "32000": "1000", "4096": "64", "2048": "64", "1024": "32", "512": "32"}


def readme_python_blocks(text=None):
    text = README.read_text() if text is None else text
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def shrink(code):
    return re.sub(r"\b(" + "|".join(SHRINK) + r")\b", lambda m: SHRINK[m.group(1)], code)


def test_readme_helpers_find_and_shrink_blocks():
    text = "intro\n```python\nx = 32000\n```\n```\nnot python\n```\n```python\ny = (2048, 120480)\n```\n"
    blocks = readme_python_blocks(text)
    assert blocks == ["x = 32000\n", "y = (2048, 120480)\n"]
    assert [shrink(b) for b in blocks] == ["x = 1000\n", "y = (64, 120480)\n"]


def test_readme_examples_run_top_to_bottom(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import tri_losses.hf
    monkeypatch.chdir(tmp_path)  # the Trainer example writes its output folder here
    blocks = readme_python_blocks()
    assert len(blocks) >= 6 and "tri_losses.hf.patch" in "".join(blocks)
    namespace = {"__name__": "__readme__"}
    try:
        with tri_losses.use_backend("torch"):
            for i, block in enumerate(blocks):
                code = compile(shrink(block), f"README.md python block {i + 1}", "exec")
                exec(code, namespace)  # noqa: S102 - the README's own examples
    finally:
        for cls in list(tri_losses.hf._PATCHED):
            tri_losses.hf.unpatch(cls)
