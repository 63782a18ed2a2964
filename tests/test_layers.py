"""The package graph: no import cycles, and every layer imports only from below.

The imports are read from the source (``ast``), at module level and inside
functions alike: a deferred import is still a dependency.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tuneloop", "bot", "trainer")

# Lowest first. A module may import its own layer and those below it.
LAYERS = [
    ("bottom", ("tuneloop", "tuneloop.errors", "tuneloop.config", "tuneloop.store")),
    ("learning control", ("tuneloop.learning",)),
    ("engine", ("tuneloop.engine",)),
    ("memory", ("tuneloop.memory",)),
    ("core", ("bot",)),  # bot's modules not named below
    ("adapters", ("bot.adapters",)),
    ("trainer", ("trainer",)),
    ("commands", ("bot.cli", "bot.cli_serve", "bot.cli_train", "bot.cli_memory", "bot.cli_review", "bot.serve", "bot.runtime",
                  "bot.bench", "bot.__main__")),
]
# Modules that must run without torch installed or imported.
TORCH_FREE = ("tuneloop.errors", "tuneloop.config", "tuneloop.store", "tuneloop.learning")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            # ``from pkg import module`` names a module too.
            found.update(f"{mod}.{a.name}" for a in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            modules[_module_name(path)] = path
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path, name) if m in modules}
    return graph


def _layer(module: str) -> int:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS in {__file__}"
    return best


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for mod, deps in graph.items():
        for dep in deps:
            if _layer(dep) > _layer(mod):
                wrong.append(f"{mod} ({LAYERS[_layer(mod)][0]}) imports {dep} ({LAYERS[_layer(dep)][0]})")
    return sorted(wrong)


def cycles(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    found = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            # A package's __init__ importing its own submodules is its face, not a cycle.
            if dep.startswith(node + "."):
                continue
            if state.get(dep) == 1:
                found.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_every_module_imports_only_its_own_layer_or_below():
    wrong = upward_imports(_graph())
    assert not wrong, "imports that run up the layers:\n" + "\n".join(wrong)


def test_trainer_never_imports_bot_and_tuneloop_imports_neither():
    wrong = []
    for mod, deps in _graph().items():
        for dep in deps:
            top, dtop = mod.split(".")[0], dep.split(".")[0]
            if (top == "trainer" and dtop == "bot") or (top == "tuneloop" and dtop in ("bot", "trainer")):
                wrong.append(f"{mod} imports {dep}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles_between_modules():
    found = cycles(_graph())
    assert not found, "import cycles:\n" + "\n".join(found)


def test_the_bottom_layers_do_not_import_torch():
    heavy = ("torch", "transformers", "peft", "trl", "accelerate")
    wrong = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = _module_name(path)
            if not any(name == p or name.startswith(p + ".") for p in TORCH_FREE):
                continue
            for imp in _imports(path, name):
                if imp.split(".")[0] in heavy:
                    wrong.append(f"{name} imports {imp}")
    assert not wrong, "\n".join(wrong)


def test_the_checks_see_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    # The checks above must be able to fail: a made-up tree with one of each.
    for pkg, files in {
        "tuneloop": {"__init__.py": "", "store.py": "from tuneloop import config\n",
                     "config.py": "import tuneloop.store\nfrom bot import chat\n"},
        "bot": {"__init__.py": "", "chat.py": ""},
        "trainer": {"__init__.py": ""},
    }.items():
        (tmp_path / pkg).mkdir()
        for fname, text in files.items():
            (tmp_path / pkg / fname).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    graph = _graph()
    assert cycles(graph) == ["tuneloop.config -> tuneloop.store -> tuneloop.config"]
    assert upward_imports(graph) == ["tuneloop.config (bottom) imports bot (core)",
                                     "tuneloop.config (bottom) imports bot.chat (core)"]
