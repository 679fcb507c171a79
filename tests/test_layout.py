"""The layout's floors: the core imports neither the Cerebras bridge nor the callbacks, no two files
import each other (directly or round a loop), the model loads without Lightning, and a user's own
``callbacks.py`` / ``accelerators.py`` cannot shadow gigagpt's."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, run_gigagpt

# Folder -> the name it installs as (pyproject.toml's package-dir).
PACKAGES = {"gigagpt": "gigagpt", "accelerators": "gigagpt.accelerators", "callbacks": "gigagpt.callbacks"}
# The command line composes the core with the bridge and the callbacks; everything else in gigagpt/ is core.
COMMAND_LINE = {"gigagpt.cli", "gigagpt.commands", "gigagpt.__main__"}
UPPER_FLOORS = ("gigagpt.accelerators", "gigagpt.callbacks", "accelerators", "callbacks")


def source_modules() -> dict[str, Path]:
    """Dotted name -> file, for every source file of the three packages."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def imported_names(path: Path, module: str) -> set[str]:
    """Every module ``path`` imports, at any depth of the file (functions included); ``from a import b``
    counts as ``a.b`` (where b is a module) and as ``a``; relative imports resolved against ``module``."""
    names = set()
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)
    return names


def is_core(module: str) -> bool:
    return module.split(".")[0] == "gigagpt" and not module.startswith(UPPER_FLOORS[:2]) and module not in COMMAND_LINE


def file_imports(path: Path, module: str, modules) -> set[str]:
    """The source files ``path`` imports: ``from a import b`` where ``a.b`` is a file names that file
    only (the package ``a`` is loaded first either way, as for any ``import a.b``)."""
    names = imported_names(path, module)
    packages = {n.rpartition(".")[0] for n in names if n in modules and "." in n}
    direct = {n for n in names if n in modules and n != module}
    # ``from a import b`` adds both ``a`` and ``a.b``: keep ``a`` only if something is imported from it
    # that is not a file of its own.
    for package in packages & direct:
        if all(f"{package}.{alias}" in modules for alias in _from_aliases(path, package, module)):
            direct.discard(package)
    return direct


def _from_aliases(path: Path, package: str, module: str) -> list[str]:
    out = []
    own = module if path.stem == "__init__" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = own.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base == package:
                out += [alias.name for alias in node.names]
    return out


def test_core_imports_neither_the_bridge_nor_the_callbacks():
    offending = []
    for module, path in source_modules().items():
        if not is_core(module):
            continue
        for name in imported_names(path, module):
            if name.split(".")[0] in UPPER_FLOORS[2:] or name.startswith(UPPER_FLOORS[:2]):
                offending.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offending, "core modules reach up a floor:\n" + "\n".join(offending)


def test_nothing_imports_the_folders_by_their_top_level_names():
    """``accelerators`` / ``callbacks`` as top-level names would be a second copy of the package (or a
    user's file of that name)."""
    files = [*source_modules().values(), *sorted((ROOT / "tests").rglob("*.py")),
             *sorted((ROOT / "benchmarks").glob("*.py"))]
    offending = [f"{p.relative_to(ROOT)} imports {name}" for p in files for name in imported_names(p, "tests.x")
                 if name.split(".")[0] in ("accelerators", "callbacks")]
    assert not offending, "\n".join(offending)


def test_no_import_cycle_between_files():
    modules = source_modules()
    graph = {m: sorted(file_imports(p, m, modules)) for m, p in modules.items()}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_model_loads_without_lightning():
    code = ("import sys\nfrom gigagpt.model import GPT, GPTConfig\nfrom gigagpt import GPT, GPTConfig\n"
            "print(sorted(m for m in ('lightning', 'torchmetrics', 'gigagpt.accelerators', 'gigagpt.callbacks') "
            "if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


SHADOWS = {"callbacks.py": "raise ImportError('the user callbacks.py was imported')\n",
           "accelerators.py": "raise ImportError('the user accelerators.py was imported')\n"}


def test_users_own_callbacks_and_accelerators_files_do_not_shadow_gigagpt(tmp_path):
    for name, text in SHADOWS.items():
        (tmp_path / name).write_text(text)
    proc = run_gigagpt("--help", cwd=tmp_path)
    assert "fit" in proc.stdout and "export" in proc.stdout, proc.stdout
    code = "import gigagpt.accelerators, gigagpt.callbacks\nprint(gigagpt.accelerators.__file__)\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          check=False, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).resolve() == (ROOT / "accelerators" / "__init__.py").resolve()


def test_the_folders_refuse_to_load_under_their_top_level_names():
    proc = subprocess.run([sys.executable, "-c", "import callbacks"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode != 0 and "import that, not callbacks" in proc.stderr, proc.stderr


def test_every_project_error_derives_from_one_root():
    """Every exception class defined in gigagpt, the bridge and the callbacks (each module imports without
    cerebras-pytorch or matplotlib)."""
    import importlib
    import inspect

    from gigagpt.errors import GigagptError

    loose = []
    for module in source_modules():
        if module.endswith("__main__"):
            continue  # runs the command
        mod = importlib.import_module(module)
        for name, cls in vars(mod).items():
            if (inspect.isclass(cls) and issubclass(cls, Exception) and cls.__module__ == module
                    and not issubclass(cls, GigagptError)):
                loose.append(f"{module}.{name}")
    assert not loose, "errors outside GigagptError: " + ", ".join(loose)


def test_an_error_raised_during_a_run_is_one_gigagpt_line(monkeypatch, capsys):
    import pytest

    import gigagpt.cli
    from gigagpt.callbacks import NonFiniteLossError
    from gigagpt.commands import main

    def run(argv, **kwargs):
        raise NonFiniteLossError("non-finite loss at step 3;\nthe last checkpoint is runs/x/last.ckpt")

    monkeypatch.setattr(gigagpt.cli, "cli_main", run)
    with pytest.raises(SystemExit) as info:
        main(["fit"])
    assert info.value.code == "gigagpt: non-finite loss at step 3; the last checkpoint is runs/x/last.ckpt"


def test_help_lists_only_what_works(capsys):
    """No ``predict`` (GPTModule has no predict step: ``gigagpt sample`` generates) and no
    ``--optimizer`` / ``--lr_scheduler`` (the optimizer is ``--model.optim``)."""
    import pytest

    from gigagpt.cli import cli_main

    with pytest.raises(SystemExit):
        cli_main(["--help"])
    top = capsys.readouterr().out
    assert "fit" in top and "predict" not in top, top
    with pytest.raises(SystemExit):
        cli_main(["fit", "--help"])
    fit = capsys.readouterr().out
    assert "--model.optim" in fit and "--optimizer" not in fit and "--lr_scheduler" not in fit
