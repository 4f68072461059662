"""The layer contract, read from the source: commands → pipeline → evaluation → method → files/formats/models.

Every import, at module level or inside a function, goes to the same layer or one below; the import graph has
no cycle; no private name crosses a module; only the command layer turns errors into exits; TRL's private names
appear only in `rbrm.trl_compat`. A new module must be given a layer here.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import re
from pathlib import Path

import pytest
from trl import DPOTrainer

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "rbrm"

LAYERS = [  # bottom first
    ("files, formats and models", {"__init__", "errors", "render", "files", "formats", "models", "flops", "machine",
                                   "stages", "methods", "refusal", "memory", "precision", "layout",
                                   "feature_files", "distributed"}),
    ("method", {"trl_compat", "features", "reward_model", "probe_train", "sampling", "rerank", "dpo", "online"}),
    ("evaluation", {"judges", "helpfulness", "evaluation", "plots"}),
    ("pipeline", {"report", "run_config", "run_context", "run_stages", "pipeline"}),
    ("commands", {"cli", "commands"}),
]


def modules() -> dict[str, Path]:
    """rbrm.x.y -> its file."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for level, (_, names) in enumerate(LAYERS):
        if top in names:
            return level
    raise AssertionError(f"{module} has no layer: add it to tests/test_layers.py's LAYERS")


def imports(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported rbrm module, names taken from it, line) for every import anywhere in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            target = (importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level
                      else node.module or "")
            names = [a.name for a in node.names]
            # `from . import x` names a submodule when there is one
            found = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            out += [(t, [], node.lineno) for t in found] or [(target, names, node.lineno)]
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
    return [(t, n, line) for t, n, line in out if t == "rbrm" or t.startswith("rbrm.")]


MODULES = modules()


def test_every_import_goes_to_the_same_layer_or_below():
    upward = [f"{m}:{line} imports {target} ({LAYERS[layer(target)][0]} above {LAYERS[layer(m)][0]})"
              for m, path in MODULES.items() for target, _, line in imports(m, path) if layer(target) > layer(m)]
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    graph = {m: {t for t, _, _ in imports(m, p) if t != m and t in MODULES} for m, p in MODULES.items()}
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(t):] + [t]))
            if t not in state:
                visit(t, trail + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_no_private_name_is_imported_from_another_module():
    private = [f"{m}:{line} imports {n} from {target}" for m, path in MODULES.items()
               for target, names, line in imports(m, path) for n in names
               if n.startswith("_") and not n.startswith("__")]
    assert not private, "\n".join(private)


def test_only_the_command_layer_raises_system_exit():
    commands = len(LAYERS) - 1
    found = [f"{m}:{node.lineno}" for m, path in MODULES.items() if layer(m) < commands
             for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(node, ast.Raise) and node.exc is not None and "SystemExit" in ast.unparse(node.exc)]
    assert not found, "library code raises SystemExit (raise a typed RbrmError instead): " + ", ".join(found)


# The imports that stay inside functions, each for a stated reason.
DEFERRED_IMPORTS = {
    ("rbrm.cli", "rbrm.commands"),  # `rbrm --help` answers without importing torch and transformers
    ("rbrm.sampling", "vllm"),  # the optional GPU engine; most installs do not have it
}


def function_level_imports(module: str, path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import inside a function body, at any depth."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for func in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                if isinstance(node, ast.ImportFrom):
                    out.append((importlib.util.resolve_name("." * node.level + (node.module or ""), package)
                                if node.level else node.module or "", node.lineno))
                elif isinstance(node, ast.Import):
                    out += [(a.name, node.lineno) for a in node.names]
    return sorted(set(out), key=lambda t: t[1])


def test_imports_sit_at_module_level():
    """So that the import lines at the top of a module show its place in the graph."""
    inside = [f"{m}:{line} imports {target} inside a function" for m, path in MODULES.items()
              for target, line in function_level_imports(m, path)
              if (m, target) not in DEFERRED_IMPORTS and (m, target.split(".")[0]) not in DEFERRED_IMPORTS]
    assert not inside, "\n".join(inside)


def test_the_contract_sees_a_violation(tmp_path):
    """The checks above read real imports: an upward one in a file like the package's is found."""
    path = tmp_path / "rbrm" / "files.py"
    path.parent.mkdir()
    path.write_text("def f():\n    from .pipeline import Pipeline\n    from ._x import _y\n")
    found = imports("rbrm.files", path)
    assert found == [("rbrm.pipeline", ["Pipeline"], 2), ("rbrm._x", ["_y"], 3)]
    assert function_level_imports("rbrm.files", path) == [("rbrm.pipeline", 2), ("rbrm._x", 3)]
    assert layer("rbrm.pipeline") > layer("rbrm.files")


def test_the_package_file_exports_lazily():
    """`rbrm/__init__.py` is imported by every module, so it stays on the ground floor: it names the public API
    (`_API`, name -> module) and imports each module on first use, never at import time."""
    import rbrm

    assert not imports("rbrm", PACKAGE / "__init__.py")
    assert {f"rbrm.{m}" for m in rbrm._API.values()} <= set(MODULES)


def trl_private_names() -> set[str]:
    """The `_`-prefixed names of TRL's DPOTrainer and the trl/transformers classes under it: what they define and
    every `self._x` their code uses."""
    names = set()
    for cls in DPOTrainer.__mro__:
        if cls.__module__.split(".")[0] not in ("trl", "transformers"):
            continue
        names |= set(vars(cls))
        names |= {node.attr for node in ast.walk(ast.parse(inspect.getsource(cls)))
                  if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"}
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def private_trl_uses(path: Path, names: set[str]) -> list[tuple[str, int]]:
    """(name, line) for every attribute, method or class attribute in the file named as one of TRL's privates."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        name = (node.attr if isinstance(node, ast.Attribute) else node.name if isinstance(node, ast.FunctionDef)
                else node.id if isinstance(node, ast.Name) else None)
        if name in names:
            found.append((name, node.lineno))
    return found


def test_trl_private_names_appear_only_in_the_compat_module():
    """TRL rewrites its internals between minor versions: each private contact sits in rbrm.trl_compat, with a test
    in tests/test_trl_compat.py, so a TRL that renames one fails there."""
    names = trl_private_names()
    assert {"_prepare_dataset", "_metrics", "_signature_columns", "_compute_loss"} <= names  # the scan sees them
    files = [p for p in sorted(PACKAGE.rglob("*.py")) if p != PACKAGE / "trl_compat.py"]
    files += sorted([*(REPO / "scripts").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py"), *REPO.glob("*.py")])
    found = [f"{path.relative_to(REPO)}:{line} uses TRL's {name}" for path in files
             for name, line in private_trl_uses(path, names)]
    assert not found, "\n".join(found)
    assert private_trl_uses(PACKAGE / "trl_compat.py", names)  # and the check sees the ones there


def test_the_report_only_reads():
    """The report is statistics over what the stages recorded and a renderer: it imports nothing from the method
    floor (no model, judge run or feature extraction) and never sees a Pipeline, only a `RunView`."""
    method_floor = 1
    reached = [f"rbrm.report:{line} imports {t}" for t, _, line in imports("rbrm.report", MODULES["rbrm.report"])
               if layer(t) == method_floor or t == "rbrm.pipeline"]
    assert not reached, "\n".join(reached)
    assert not re.search(r"\bPipeline\b", MODULES["rbrm.report"].read_text(encoding="utf-8"))


MAX_FUNCTION_LINES = 80


def test_no_function_exceeds_80_lines():
    """A reader sees a whole function at once; longer ones are split where a part has a name."""
    long = [f"{m}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for m, path in MODULES.items() for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, "\n".join(long)


def test_the_pipeline_is_a_driver():
    """The driver stays small: the stages, the run context and the online baseline live elsewhere."""
    assert len(MODULES["rbrm.pipeline"].read_text(encoding="utf-8").splitlines()) <= 250


def test_hidden_states_are_captured_in_one_place():
    """Feature extraction and the DPO trainer read the policy's states through the same hooks
    (`rbrm.features.capture_pooled`), so the probe sees in training exactly what it was fitted on."""
    hooking = [m for m, path in MODULES.items() if "register_forward_hook" in path.read_text(encoding="utf-8")]
    assert hooking == ["rbrm.features"]
    assert "capture_pooled" in MODULES["rbrm.dpo.trainer"].read_text(encoding="utf-8")
