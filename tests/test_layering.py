"""Layers import downward only: no qkv module imports one of a layer above its own, at the top of
the file or inside a function. Checked twice: statically over every module's imports, and by
importing each layer in a fresh interpreter and listing the qkv modules it pulled in."""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "qkv"

# lowest first; a module belongs to the layer of its longest matching prefix
LAYERS = [
    ("base", ["qkv.errors", "qkv.dtypes", "qkv.registry", "qkv.readback", "qkv.validation", "qkv.component"]),
    ("format", ["qkv.format"]),
    ("data", ["qkv.io", "qkv.compressed"]),
    ("kernels", ["qkv.kernels"]),
    ("bounds", ["qkv.bounds"]),
    ("components", ["qkv.quantizers", "qkv.grouping"]),
    ("spec", ["qkv.spec"]),
    ("caches", ["qkv.caches"]),
    ("tools", ["qkv.testing", "qkv.realdata", "qkv.evaluation", "qkv.cli", "qkv.__main__"]),
]


def layer_of(module: str) -> int:
    if module == "qkv":
        return -1  # the package itself loads its public names lazily
    best = max(
        ((len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
         if module == prefix or module.startswith(prefix + ".")),
        default=None,
    )
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS")
    return best[1]


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imported(name: str, path: pathlib.Path) -> set[str]:
    """Every qkv module ``path`` imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    known = modules()
    return {m for m in found if m in known and m != "qkv"}


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_imports_a_layer_above_its_own(name):
    mine = layer_of(name)
    above = sorted(m for m in imported(name, modules()[name]) if layer_of(m) > mine)
    assert not above, f"{name} ({LAYERS[mine][0]}) imports {above} from higher layers"


@pytest.mark.parametrize("layer", [prefixes[0] for _, prefixes in LAYERS[:-1]])
def test_a_layer_imported_alone_pulls_in_nothing_above_it(layer):
    code = f"import sys, json, {layer}; print(json.dumps(sorted(m for m in sys.modules if m.startswith('qkv'))))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                       cwd=ROOT.parent).stdout)
    mine = layer_of(layer)
    above = [m for m in loaded if layer_of(m) > mine]
    assert not above, f"importing {layer} loads {above}"
    assert "triton" not in loaded and "faiss" not in loaded


def test_importing_qkv_loads_no_layer():
    code = "import sys, qkv; print(sorted(m for m in sys.modules if m.split('.')[0] in ('qkv', 'triton', 'faiss')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT.parent)
    assert out.stdout.strip() == "['qkv']"
