"""The layers the folders show hold in the code: edge -> core -> stores and ComfyUI; the core and the
stores never load aiohttp's server; the emulator is a test double nothing in production imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "comfybridge"
# Which layer may import which (the top-level modules: config, errors, the app factory, the CLI).
MAY_IMPORT = {
    "edge": {"edge", "core", "store", "comfy", "errors", "config", "__version__"},
    "core": {"core", "store", "comfy", "errors"},
    "comfy": {"comfy", "store.files", "errors"},
    "store": {"store", "errors"},
}


def imports_of(path: Path) -> list[str]:
    """The comfybridge modules a file imports, as dotted paths inside the package."""
    here = path.relative_to(PACKAGE).with_suffix("").parts
    package = here[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(package[: len(package) - (node.level - 1)])
            target = base + (node.module.split(".") if node.module else [])
            names = [alias.name for alias in node.names] if node.module is None else [""]
            found += [".".join([*target, name]).strip(".") for name in names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("comfybridge"):
            found.append(node.module.removeprefix("comfybridge").strip("."))  # type: ignore[union-attr]
        elif isinstance(node, ast.Import):
            found += [a.name.removeprefix("comfybridge.") for a in node.names if a.name.startswith("comfybridge.")]
    return found


def allowed(layer: str, target: str) -> bool:
    return any(target == rule or target.startswith(rule + ".") for rule in MAY_IMPORT[layer])


@pytest.mark.parametrize("layer", sorted(MAY_IMPORT))
def test_each_layer_imports_only_the_layers_below_it(layer: str) -> None:
    wrong = [
        f"{path.relative_to(PACKAGE)} imports {target}"
        for path in sorted((PACKAGE / layer).rglob("*.py"))
        for target in imports_of(path)
        if not allowed(layer, target)
    ]
    assert wrong == []


def test_only_the_app_factory_imports_the_emulator() -> None:
    importers = {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if "emulator" not in path.relative_to(PACKAGE).parts
        and any(t == "emulator" or t.startswith("emulator.") for t in imports_of(path))
    }
    assert importers == {"app.py"}  # lazily, for --emulate


def test_the_core_and_the_stores_load_no_http_server() -> None:
    code = (
        "import sys, comfybridge.core, comfybridge.store.journal, comfybridge.store.uploads, "
        "comfybridge.store.results, comfybridge.store.counter, comfybridge.store.datadir, comfybridge.comfy; "
        "print(sorted(m for m in sys.modules if m == 'aiohttp.web' or m.startswith('comfybridge.emulator') "
        "or m.startswith('comfybridge.edge')))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_every_module_says_what_it_exports() -> None:
    missing = [
        str(path.relative_to(PACKAGE))
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name not in ("__main__.py",)
        and path.read_text().strip()
        and not any(declares_all(node) for node in ast.parse(path.read_text()).body)
    ]
    assert missing == []


def declares_all(node: ast.stmt) -> bool:
    if isinstance(node, ast.Assign):
        return any(getattr(target, "id", "") == "__all__" for target in node.targets)
    if isinstance(node, ast.AnnAssign):
        return getattr(node.target, "id", "") == "__all__"
    return isinstance(node, ast.ImportFrom) and any(alias.asname == "__all__" for alias in node.names)
