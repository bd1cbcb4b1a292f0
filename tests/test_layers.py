"""llmkit's structure, read from its source: modules import only from lower layers (or sideways inside their
layer), there is no import cycle, llmkit imports sit at the top of a module (the command line defers a command's
imports by naming its handler in its parser table, for start-up time), no module is over 400 lines and no function
over 80, and cli.py is the parser table. The layer order is declared once, here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from helpers import ROOT

PACKAGE = ROOT / "llmkit"

# lowest first; a module belongs to the first entry that names it or a package above it
LAYERS = [
    ("ground", ["llmkit", "llmkit.errors", "llmkit.faults", "llmkit.logs", "llmkit.metrics", "llmkit.compression",
                "llmkit.config", "llmkit.assets", "llmkit.fresh", "llmkit.shipped",
                # the run folder's map (file names, record readers) is read by the export loaders below the
                # launch layer too; the rest of llmkit.rundir (a run's life, checkpoints) is launch
                "llmkit.rundir.layout"]),
    ("build", ["llmkit.model", "llmkit.data"]),
    ("launch", ["llmkit.launch", "llmkit.memory", "llmkit.rundir"]),
    ("train", ["llmkit.train"]),
    ("the export's owner", ["llmkit.exported"]),
    ("evals and ship", ["llmkit.evals", "llmkit.ship"]),
    ("report", ["llmkit.report"]),
    ("finish", ["llmkit.finish"]),
    ("commands", ["llmkit.cli", "llmkit.commands"]),
]
DEFERRED_OK: set[str] = set()  # none: the command line defers through its table's handler names
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> int:
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix != "llmkit" and module.startswith(prefix + ".")):
                best = index if best is None else best
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return best


def _imports(module: str, path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported llmkit module, line, inside a function) for every import statement, function-level included."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from . import x / from .y import z
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from llmkit.data import sources` imports the module llmkit.data.sources
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in child.names]
            for target in targets:
                while target and target not in known:  # llmkit.x.y (an attribute) -> the module llmkit.x
                    target = target.rpartition(".")[0]
                if target and target != module:
                    found.append((target, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def _graph() -> dict[str, list[tuple[str, int, bool]]]:
    modules = _modules()
    known = set(modules)
    return {m: _imports(m, p, known) for m, p in modules.items()}


def test_every_import_goes_down_the_layers():
    bad = []
    for module, imports in _graph().items():
        for target, line, _ in imports:
            if _layer(target) > _layer(module):
                bad.append(f"{module}:{line} imports {target} ({LAYERS[_layer(module)][0]} -> "
                           f"{LAYERS[_layer(target)][0]}, a higher layer)")
    assert not bad, "\n".join(bad)


def _cycles(graph: dict[str, list[str]]) -> list[str]:
    """Each import cycle found by a depth-first walk, as a -> b -> ... -> a."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        path = path + [node]
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                walk(nxt, path)
        state[node] = 2

    for module in graph:
        if module not in state:
            walk(module, [])
    return cycles


def test_no_import_cycle():
    cycles = _cycles({m: sorted({t for t, _, _ in imports}) for m, imports in _graph().items()})
    assert not cycles, "\n".join(cycles)


def test_llmkit_imports_are_at_module_level():
    deferred = [f"{module}:{line} imports {target} inside a function"
                for module, imports in _graph().items() if module not in DEFERRED_OK
                for target, line, in_function in imports if in_function]
    assert not deferred, "\n".join(deferred)


def test_no_module_over_400_lines():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.py")), ids=lambda p: p.name)
def test_recipes_stay_thin(recipe):
    """A recipe is setup / fit / finish."""
    assert len(recipe.read_text().splitlines()) <= 60


def _function_lines(path: Path, name: str) -> int:
    node = next(n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef) and n.name == name)
    return node.end_lineno - node.lineno + 1


def test_the_training_loop_reads_in_one_sitting():
    assert _function_lines(PACKAGE / "train" / "loop.py", "fit") <= 80


def _functions(path: Path) -> list[tuple[str, int]]:
    """(name:line, length in lines) of every function and method in a module, nested ones included."""
    return [(f"{n.name}:{n.lineno}", n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_function_over_80_lines():
    """A function reads in one sitting: a longer one is split where its steps are."""
    long = [f"{module}.{name}: {n} lines" for module, path in _modules().items()
            for name, n in _functions(path) if n > 80]
    assert not long, "\n".join(long)


def test_cli_is_a_parser_table_under_200_lines():
    """Issue 48: every command's logic lives in its own module under llmkit/commands/; cli.py is the table that
    names each command's options and handler, and the short loop in `main` that builds the parser from it."""
    import importlib

    from llmkit import cli

    path = PACKAGE / "cli.py"
    assert len(path.read_text().splitlines()) < 200
    assert all(n <= 30 for _, n in _functions(path)), _functions(path)
    names = [c.name for c in cli.COMMANDS]
    assert len(names) == len(set(names)) and {"eval", "compare", "validate", "train", "launch"} <= set(names)
    for command in cli.COMMANDS:
        module, _, function = command.handler.partition(":")
        assert (PACKAGE / "commands" / f"{module}.py").is_file(), command
        assert callable(getattr(importlib.import_module(f"llmkit.commands.{module}"), function, None)), command


def _imported_at_start(module: str) -> set[str]:
    """The llmkit modules importing `module` imports with it (module-level imports and parent packages, onward)."""
    graph, seen, todo = _graph(), set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        todo += parents + [target for target, _, in_function in graph[name] if not in_function]
    return seen


def _outside_imports(path: Path) -> set[str]:
    """The packages outside llmkit a module imports at module level (not inside a function)."""
    found, todo = set(), list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.add((node.module or "").split(".")[0])
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            todo += list(ast.iter_child_nodes(node))
    return found - {"llmkit"}


HEAVY = {"torch", "transformers", "accelerate", "deepspeed", "datasets", "evaluate", "peft", "numpy"}


def test_the_command_line_starts_without_torch():
    """`llmkit --help` imports cli.py and what that imports at module level, none of which imports torch (or the
    other heavy libraries): a command's own module is imported, by the name its table row gives, when it runs."""
    modules = _modules()
    start = _imported_at_start("llmkit.cli")
    assert {"llmkit.cli", "llmkit.commands.entry", "llmkit.commands.options", "llmkit"} <= start
    assert not {m for m in start if m.startswith("llmkit.commands.")} - {"llmkit.commands.entry",
                                                                           "llmkit.commands.options"}
    heavy = sorted(f"{m} imports {name}" for m in start for name in _outside_imports(modules[m]) & HEAVY)
    assert not heavy, "\n".join(heavy)


@pytest.mark.slow
def test_help_imports_no_command_module_and_no_torch():
    """The same, run: `llmkit --help` and each command's --help in a fresh interpreter."""
    import subprocess
    import sys

    code = ("import contextlib, io, sys\nfrom llmkit import cli\n"
            "for argv in [[]] + [[c.name] for c in cli.COMMANDS if c.name != 'launch']:\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "        cli.main(argv + ['--help'])\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith('llmkit.commands.')))")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert got.returncode == 0, got.stderr[-3000:]
    assert got.stdout.split() == ["['llmkit.commands.entry',", "'llmkit.commands.options']"], got.stdout


def _run_files() -> set[str]:
    """Every name llmkit.rundir.layout gives a file or folder of a run (and of its final/)."""
    from llmkit.rundir import layout

    run, export = layout.RunDir(Path("/r")), layout.Export(Path("/r/final"))
    names = {getattr(run, a).name for a in dir(layout.RunDir) if isinstance(getattr(layout.RunDir, a), property)
             and isinstance(getattr(run, a), Path)}
    names |= {getattr(export, a).name for a in dir(layout.Export) if isinstance(getattr(layout.Export, a), property)}
    return names | {run.report(k).name for k in ("html", "md", "json")} | {layout.PREDICTIONS, "final"}


def test_only_the_run_directory_package_names_a_run_s_files():
    """A run's file names are spelled in llmkit/rundir/ only: every other module asks its layout. (Its folders'
    plain words, "final" or "tokenizer", are checked by reading; as strings they have other meanings too.)"""
    names = {n for n in _run_files() if "." in n}
    assert {"training_config.yaml", "metrics.jsonl", "explanations.json", ".llmkit.lock", "final.tmp"} <= names
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "rundir":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                    node.value in names or node.value.startswith("predictions_")):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} spells {node.value!r}")
    assert not found, "\n".join(found)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path):
    """The checks above can fail: a tiny package with a cycle and an import against the layers is caught."""
    known = {"llmkit.config", "llmkit.train.loop", "llmkit.errors"}
    (tmp_path / "config.py").write_text("from llmkit.train.loop import fit\n")
    (tmp_path / "loop.py").write_text("def f():\n    from llmkit import config\n")
    up = _imports("llmkit.config", tmp_path / "config.py", known)
    assert up == [("llmkit.train.loop", 1, False)] and _layer("llmkit.train.loop") > _layer("llmkit.config")
    down = _imports("llmkit.train.loop", tmp_path / "loop.py", known)
    assert down == [("llmkit.config", 2, True)]  # function-level imports are seen
    graph = {"llmkit.config": ["llmkit.train.loop"], "llmkit.train.loop": ["llmkit.config"], "llmkit.errors": []}
    assert _cycles(graph) == ["llmkit.config -> llmkit.train.loop -> llmkit.config"]


def test_security_rules_of_the_code_base():
    """No eval/exec/pickle of user content, torch.load only with weights_only=True, weights as safetensors."""
    for path in sorted((ROOT / "llmkit").rglob("*.py")):
        text = path.read_text()
        assert not re.search(r"(?<![\w.])(eval|exec)\(", text), path
        assert "import pickle" not in text and "pickle.load" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
    export = (ROOT / "llmkit" / "ship" / "export.py").read_text()
    assert "safe_serialization=False" not in export


def _is_sys_executable(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "executable" and getattr(node.value, "id", "") == "sys"


def _interpreter_args(tree: ast.AST) -> list[tuple[list[ast.expr], int]]:
    """The interpreter's arguments of every process a module starts, with the line: fresh.run_python([...]), and
    any list [sys.executable, ...] (a subprocess.run / Popen command line). A list that hands on arguments it is
    given (fresh.run_python's own [sys.executable, *args]) starts nothing of its own and is left out."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "run_python" \
                and node.args and isinstance(node.args[0], ast.List) and node.args[0].elts:
            found.append((node.args[0].elts, node.lineno))
        elif isinstance(node, ast.List) and len(node.elts) > 1 and _is_sys_executable(node.elts[0]) \
                and not isinstance(node.elts[1], ast.Starred):
            found.append((node.elts[1:], node.lineno))
    return found


def _started_modules(modules: dict[str, Path] | None = None) -> dict[str, list[str]]:
    """Each `python -m MODULE` llmkit starts (fresh.run_python, or a [sys.executable, "-m", ...] command line),
    with where; and each other interpreter call (`-c`: source in a string; a script) as <its first argument>."""
    found: dict[str, list[str]] = {}
    for module, path in (modules or _modules()).items():
        for args, line in _interpreter_args(ast.parse(path.read_text())):
            flag = args[0].value if isinstance(args[0], ast.Constant) else None
            target = args[1].value if len(args) > 1 and isinstance(args[1], ast.Constant) else None
            found.setdefault(target if flag == "-m" else f"<{flag}>", []).append(f"{module}:{line}")
    return found


# the outside programs llmkit runs with its own interpreter (`llmkit assets` downloads pinned files with pip)
OUTSIDE_MODULES = {"pip"}


def test_every_started_process_is_an_importable_module_with_a_main():
    """A process llmkit starts for a job runs a module that imports like any other and has a `main` (no program
    kept as source in a string, which no linter, import or layer test reads): fresh.run_python's, and a command
    line that starts the interpreter itself (`llmkit launch` / `llmkit audit` run `python -m llmkit.cli train`)."""
    import importlib

    started = _started_modules()
    assert "llmkit.cli" in started and "llmkit.ship.reload" in started, started  # both kinds of start are seen
    ours = {m for m in started if m.startswith("llmkit.")}
    assert not set(started) - ours - OUTSIDE_MODULES, started  # "<-c>" would be source in a string
    for module in ours:
        assert callable(getattr(importlib.import_module(module), "main", None)), f"{module} has no main()"


def test_the_started_process_check_sees_both_kinds_of_start(tmp_path):
    (tmp_path / "job.py").write_text(
        "import subprocess, sys\nfrom llmkit import fresh\n"
        "def go(args):\n"
        "    fresh.run_python(['-m', 'llmkit.ship.reload', 'x'])\n"
        "    subprocess.run([sys.executable, '-m', 'llmkit.cli', 'train'])\n"
        "    subprocess.run([sys.executable, '-c', 'print(1)'])\n"
        "    return subprocess.run([sys.executable, *args])\n")
    assert _started_modules({"llmkit.job": tmp_path / "job.py"}) == {
        "llmkit.ship.reload": ["llmkit.job:4"], "llmkit.cli": ["llmkit.job:5"], "<-c>": ["llmkit.job:6"]}


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """A module's lines without comments and docstrings' prose (the words may name files; the code may not)."""
    tree = ast.parse(path.read_text())
    prose = {n.lineno for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(getattr(n, "value", None),
                                                                                        ast.Constant)}
    spans = {line for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
             for line in range(n.lineno, n.end_lineno + 1)} | prose
    return [(i, line.split("#")[0]) for i, line in enumerate(path.read_text().splitlines(), 1) if i not in spans]


# the names of the files and folders a run or an export leaves: spelled in rundir/layout.py alone
RUN_FILE_NAMES = ('"config.json"', '"adapter_config.json"', '"final"', '"merged"', '"training_config.yaml"',
                  '"metrics.json"', '"llmkit_probe.json"', '"quantized.json"', '"report.html"', '"report.md"',
                  '"report.json"', 'f"step-{', '"predictions_', '"training_dynamics.npy"', '"data_map.json"',
                  '"compare.')


def test_no_run_or_export_file_name_outside_the_layout():
    found = [f"{module}:{i}: {line.strip()}" for module, path in _modules().items() if module != "llmkit.rundir.layout"
             for i, line in _code_lines(path) if any(name in line for name in RUN_FILE_NAMES)]
    assert not found, "\n".join(found)


# "is this folder an export, does it hold a model or an adapter": a test of the files that mark a model's folder
EXPORT_TEST = re.compile(r"(MODEL_CONFIG|ADAPTER_CONFIG|\"config\.json\"|\"adapter_config\.json\")\)\.(is_file|exists)\(\)"
                         r"|Export\([^()]*\)\.adapter\.(is_dir|exists)\(\)")
# who may ask it: the export's owner, the run folder's map, and the model loader (a training run's model and
# tokenizer folders, before any export exists)
EXPORT_TEST_OK = ("llmkit.exported.opened", "llmkit.rundir.layout", "llmkit.model")


def _decides_an_exports_kind(module: str, line: str) -> bool:
    owner, predicates = "llmkit.exported.opened", "llmkit.model"
    if 'endswith("For' in line and module != predicates:
        return True
    if re.search(r"merged\.is_dir\(\)|\.merged / |merged / MODEL_CONFIG", line) and module != owner:
        return True
    return bool(EXPORT_TEST.search(line)) and not any(module == ok or module.startswith(ok + ".")
                                                      for ok in EXPORT_TEST_OK)


def test_an_exports_kind_and_model_folder_are_decided_in_one_module():
    """What an export is (classifier, label-word LM, causal LM, adapter), whether a folder is one and which folder
    holds its model are decided by llmkit.exported.opened (is_export, holds_model, open_export); an architecture's
    name is read by llmkit.model's predicates alone."""
    found = [f"{module}:{i}: {line.strip()}" for module, path in _modules().items()
             for i, line in _code_lines(path) if _decides_an_exports_kind(module, line)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("module, line, flagged", [
    ("llmkit.ship.hub", "    if (path / MODEL_CONFIG).is_file() or Export(path).adapter.is_dir():", True),
    ("llmkit.ship.verify", "merge=not (folder / MODEL_CONFIG).is_file())", True),
    ("llmkit.ship.x", "    if (folder / ADAPTER_CONFIG).is_file():", True),
    ("llmkit.exported.opened", "    return (Path(folder) / MODEL_CONFIG).is_file()", False),
    ("llmkit.model", "        if local.is_dir() and not (local / MODEL_CONFIG).is_file() and what:", False),
    # reading a known model folder's config, copying its files, a run's own records: not a test of what it is
    ("llmkit.ship.to_gguf", "    config = json.loads((folder / MODEL_CONFIG).read_text())", False),
    ("llmkit.ship.quantize", "        if (model_dir / name).is_file():", False),
    ("llmkit.ship.hub", "        if export.adapter.is_dir():  # a LoRA classifier", False),
    ("llmkit.commands.x", "    if run.config.is_file():", False),
])
def test_the_export_kind_check_sees_a_folder_tested_for_a_model_s_files(module, line, flagged):
    assert _decides_an_exports_kind(module, line) is flagged


def test_one_scorer_per_kind_and_one_perplexity():
    """exported.scoring holds the classifier scorer, the label-word scorer and the token log-likelihoods; the
    perplexity is metrics.perplexity. No other module defines them again."""
    defined: dict[str, list[str]] = {}
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in (
                    "token_logprobs", "classifier_logits", "LabelWordScorer", "batch_scores", "perplexity", "text_nll"):
                defined.setdefault(node.name, []).append(module)
    assert defined.pop("perplexity") == ["llmkit.metrics"]
    assert all(where == ["llmkit.exported.scoring"] for where in defined.values()), defined
    exps = [f"{m}:{i}" for m, p in _modules().items() if m != "llmkit.metrics"
            for i, line in _code_lines(p) if re.search(r"(math|np|torch)\.exp\(", line) and "loss" in line]
    assert not exps, exps  # a perplexity computed by hand
