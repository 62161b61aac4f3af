"""The layers' import directions, read from every source file's imports (ast), lazy ones included.

front door (moeport/: cli, profile, runtime, launch, jobs, conformance, report, testing)
  -> model -> collectives, kernels -> base;  backends -> kernels -> base
The base layer (moeport/base) imports nothing else from moeport; kernels/ imports only
torch, the standard library and the base layer; backends/ and collectives/ know nothing
of the model or of each other; the model imports no backend.
"""

from __future__ import annotations

import ast
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Each layer: the folder holding it, and the moeport layers its files may import (itself included).
LAYERS = {
    "base": ("moeport/base", {"base"}),
    "kernels": ("kernels", {"base", "kernels"}),
    "backends": ("backends", {"base", "kernels", "backends"}),
    "collectives": ("collectives", {"base", "collectives"}),
    "model": ("model", {"base", "kernels", "collectives", "model"}),
}
#: Packages outside moeport that a layer may import besides the standard library (None: any).
THIRD_PARTY = {"base": {"torch"}, "kernels": {"torch"}}


def layer_of(module: str) -> str | None:
    """The layer a moeport module belongs to ("front door" for the rest of moeport), None outside moeport."""
    parts = module.split(".")
    if parts[0] != "moeport":
        return None
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    return "front door"


def imports(path: str) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, at any depth."""
    tree = ast.parse(open(path).read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            found += [(node.lineno, node.module)]
            if node.module == "moeport":  # `from moeport import base` names the layer in the alias
                found += [(node.lineno, f"moeport.{alias.name}") for alias in node.names]
    return found


def offences(layer: str) -> list[str]:
    """Every import in `layer`'s files that its rules forbid."""
    folder, allowed = LAYERS[layer]
    third_party = THIRD_PARTY.get(layer)
    out = []
    for root, _, files in os.walk(os.path.join(REPO, folder)):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            for line, module in imports(path):
                target = layer_of(module)
                top = module.split(".")[0]
                if target is not None and target not in allowed:
                    out.append(f"{os.path.relpath(path, REPO)}:{line}: imports {module} ({target})")
                elif target is None and third_party is not None and top not in sys.stdlib_module_names \
                        and top not in third_party and top != "__future__":
                    out.append(f"{os.path.relpath(path, REPO)}:{line}: imports {module} (outside torch and the stdlib)")
    return out


def test_every_layer_imports_only_downward():
    found = {layer: offences(layer) for layer in LAYERS}
    assert all(not lines for lines in found.values()), "\n".join(line for lines in found.values() for line in lines)


def test_the_rules_see_what_they_guard(tmp_path, monkeypatch):
    """A lower layer importing the front door, or the model importing a backend, is caught (lazy imports too)."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "bad.py").write_text(
        "import torch\n\ndef f():\n    from moeport.runtime import Runtime\n    import moeport.backends.cpu\n"
    )
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "bad.py").write_text("import numpy\nfrom moeport.model import lm\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", str(tmp_path))
    assert offences("model") == ["model/bad.py:4: imports moeport.runtime (front door)",
                                 "model/bad.py:5: imports moeport.backends.cpu (backends)"]
    assert offences("kernels") == ["kernels/bad.py:1: imports numpy (outside torch and the stdlib)",
                                   "kernels/bad.py:2: imports moeport.model (model)"]


def test_every_module_of_the_tree_belongs_to_a_layer():
    """Each source folder is a layer or the front door: nothing new escapes the rules unnoticed."""
    folders = {entry for entry in os.listdir(REPO) if os.path.isfile(os.path.join(REPO, entry, "__init__.py"))}
    assert folders == {"moeport", "backends", "collectives", "kernels", "model", "profiles"}, folders
