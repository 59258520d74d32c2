"""Write docs/api.md, the API reference, from the package's docstrings.

    python docs/gen_api.py          # rewrite docs/api.md
    python docs/gen_api.py --check  # exit 1 if docs/api.md is not what the docstrings give

tests/test_docs.py runs the check, so the reference stays true: after changing a public docstring or
signature, run this script and commit docs/api.md with the change.
"""
from __future__ import annotations

import inspect
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "api.md"

# (title, module name of the definitions) for the top-level names, in reading order
FAMILIES = [
    ("Backends", "tri_losses._backend"),
    ("Cross-entropy", "tri_losses.cross_entropy"),
    ("Fused linear cross-entropy", "tri_losses.linear_cross_entropy"),
    ("CTC", "tri_losses.ctc"),
    ("Automata (RETURNN's fast_baum_welch / fast_viterbi)", "tri_losses.automata"),
    ("Element-wise losses", "tri_losses.elementwise"),
    ("Sampled softmax and NCE", "tri_losses.sampled"),
    ("Edit distance, error rate, BLEU, beam search", "tri_losses.text"),
    ("Other RETURNN losses", "tri_losses.misc"),
]
SUBMODULES = ["tri_losses.samplers", "tri_losses.tf_compat", "tri_losses.returnn", "tri_losses.hf"]
SECTION = re.compile(r"^(Args|Arguments|Returns|Raises|Shape|Shapes|Attributes|Example|Examples|Yields|Note|Notes):\s*$")
NAMES_CONTINUED = re.compile(r"^    [A-Za-z_][\w, ]*,$")  # "    a, b, c," (the item's names go on)
ITEM = re.compile(r"^    (\*{0,2}[A-Za-z_][\w, *]*?)( \([^)]*\))?:\s+(.*)$")


def _inline(text):
    """reST roles and double backticks -> Markdown code spans."""
    text = re.sub(r":(?:func|class|data|meth|attr|mod):`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def render_doc(doc):
    """A Google-style docstring as Markdown: sections in bold, ``name: text`` items as a list."""
    out, in_section, lines = [], False, []
    for line in (doc or "(no docstring)").splitlines():
        if lines and NAMES_CONTINUED.match(lines[-1]):  # an item's names listed over two lines
            lines[-1] += " " + line.strip()
        else:
            lines.append(line)
    for line in lines:
        m = SECTION.match(line)
        if m:
            out += ["", f"**{m.group(1)}**", ""]
            in_section = m.group(1)
            continue
        if in_section and line.strip() and not line.startswith("    "):  # prose after a section: its own paragraph
            out.append("")
            in_section = False
        if in_section and line.startswith("    "):
            item = ITEM.match(line)
            if item and in_section in ("Returns", "Yields") and re.search(r"[^,] ", item.group(1).strip()):
                # "The loss: ...": prose, not a name
                item = None
            if item:
                out.append(f"- `{item.group(1).strip()}`{item.group(2) or ''}: {item.group(3)}")
            elif out and out[-1].startswith("- "):
                out[-1] += " " + line.strip()
            else:
                out.append(line.strip())
            continue
        if not line.strip():
            in_section = False
        out.append(line)
    return _inline("\n".join(out)).strip() + "\n"


def _signature(name, obj):
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        sig = "(...)"
    sig = re.sub(r" at 0x[0-9a-f]+", "", sig)  # no memory addresses: the output must be reproducible
    return f"```python\n{name}{sig}\n```\n"


def _constant_doc(module, name, obj):
    """A constant's ``#:`` comment above its assignment, and its keys if it is a dict."""
    lines = inspect.getsource(module).splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"{name}\s*[:=]", line))
    comment = []
    while start > 0 and lines[start - 1].startswith("#:"):
        start -= 1
        comment.insert(0, lines[start][2:].strip())
    doc = " ".join(comment)
    if isinstance(obj, dict):
        doc += ("\n\n" if doc else "") + "A `dict`; keys: " + ", ".join(f"`{k}`" for k in obj) + "."
    return doc


def _entry(qualname, obj, level="###"):
    kind = "class" if inspect.isclass(obj) else "function" if callable(obj) else "constant"
    if kind == "constant":
        module_name, name = qualname.rsplit(".", 1)
        doc = _constant_doc(sys.modules[module_name], name, obj)
    else:
        doc = inspect.getdoc(obj)
    parts = [f"{level} `{qualname}` ({kind})\n", _signature(qualname, obj) if callable(obj) else "",
             render_doc(doc)]
    if inspect.isclass(obj):
        parts += _members(qualname.split(".")[-1], obj)
    return "\n".join(p for p in parts if p)


def _members(cls_name, cls):
    """The public methods and properties a class defines itself and documents (``forward`` included)."""
    out = []
    for name, member in vars(cls).items():
        if name.startswith("_") and name != "__call__":
            continue
        if isinstance(member, property):
            doc = inspect.getdoc(member)
            if doc:
                out += [f"- property `{cls_name}.{name}`: " + _inline(doc.replace("\n", " "))]
        elif inspect.isfunction(member):
            own = inspect.cleandoc(member.__doc__) if member.__doc__ else ""  # not an inherited one
            sig = _signature(f"{cls_name}.{name}", member)
            if "'_" in sig or not (own or name in ("forward", "__call__")):
                continue  # internal hooks (private argument types), undocumented helpers
            out += [sig, render_doc(own) if own else ""]
    return out


def _public(module):
    names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    return [n for n in names if not inspect.ismodule(getattr(module, n))]


def render():
    sys.path.insert(0, str(ROOT))
    import importlib
    import tri_losses
    out = ["# API reference\n",
           "Generated from the docstrings by `python docs/gen_api.py` (do not edit by hand; "
           "`tests/test_docs.py` checks that it is current). Conventions shared by every op (backends, "
           "dtypes, shapes, errors, autograd, `torch.compile`) are in [conventions.md](conventions.md).\n",
           render_doc(inspect.getdoc(tri_losses)), "## Contents\n"]
    top = {n: getattr(tri_losses, n) for n in _public(tri_losses)}
    by_family = {mod: [] for _, mod in FAMILIES}
    for name, obj in top.items():
        module = getattr(obj, "__module__", "")
        if module == "contextlib":  # a @contextmanager keeps its own module in __wrapped__
            module = obj.__wrapped__.__module__
        if module not in by_family:
            raise SystemExit(f"gen_api: tri_losses.{name} is defined in {module}, which FAMILIES does not list")
        by_family[module].append(name)
    for title, mod in FAMILIES:
        out.append(f"- {title}: " + ", ".join(f"`{n}`" for n in by_family[mod]))
    for mod in SUBMODULES:
        out.append(f"- `{mod}`: " + ", ".join(f"`{n}`" for n in _public(importlib.import_module(mod))))
    out.append("")
    for title, mod in FAMILIES:
        out.append(f"## {title}\n")
        out.append(f"Module `{mod}`; the names are exported by `tri_losses`.\n")
        out.append(render_doc(inspect.getdoc(importlib.import_module(mod))))
        for name in by_family[mod]:
            out.append(_entry(f"tri_losses.{name}", top[name]))
    for mod in SUBMODULES:
        module = importlib.import_module(mod)
        out += [f"## Module `{mod}`\n", render_doc(inspect.getdoc(module))]
        for name in _public(module):
            out.append(_entry(f"{mod}.{name}", getattr(module, name)))
    return "\n".join(out).rstrip() + "\n"


def main(argv):
    text = render()
    if "--check" in argv:
        if OUT.read_text() != text:
            print("docs/api.md is out of date: run python docs/gen_api.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
