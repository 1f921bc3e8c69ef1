"""The package layering holds: no module imports from a layer above its own.

Read from the source with ``ast`` (function-level imports included), so a lazy import
cannot hide a dependency that goes the wrong way.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module belongs to the first layer whose prefix names it.
LAYERS = [
    ("base", ("agents.errors", "agents.files")),
    ("adapters and memory", ("adapters", "memory_store")),
    ("model runtime", ("agents.lm",)),
    ("roles", ("agents",)),
    ("loop, evaluation, inspection", ("graph",)),
    ("command line", ("run_loop",)),
]


def _layer(module: str) -> int | None:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    return None  # the standard library or a third-party package


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # "from agents import lm" imports the subpackage agents.lm; a plain name adds nothing
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names
                      if _is_module(f"{node.module}.{alias.name}")]
    return found


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _sources() -> list[Path]:
    files = [ROOT / "run_loop.py"]
    for package in ("agents", "adapters", "memory_store", "graph"):
        files += sorted((ROOT / package).rglob("*.py"))
    return files


def test_every_project_module_has_a_layer():
    assert all(_layer(_module_name(path)) is not None for path in _sources())


def test_no_module_imports_from_a_higher_layer():
    wrong = []
    for path in _sources():
        module = _module_name(path)
        own = _layer(module)
        for line, imported in _imports(path):
            layer = _layer(imported)
            if layer is not None and layer > own:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({LAYERS[own][0]}) imports {imported} ({LAYERS[layer][0]})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_check_sees_a_wrong_way_import(tmp_path):
    """The rule itself: a roles module importing the loop is caught; the layers are ordered as documented."""
    assert _layer("agents.solver") < _layer("graph.nodes")
    assert _layer("agents.lm.backend") < _layer("agents.solver")
    assert _layer("agents.errors") < _layer("adapters.bank") < _layer("agents.lm.generation")
    source = tmp_path / "bad.py"
    source.write_text("def f():\n    from graph.nodes import solve\n")
    assert (2, "graph.nodes") in _imports(source)
