"""The package's layout: the running service never imports the tools.

``stream_classifier/tools/`` (bench, eval) may import anything of the runtime; the runtime
(every other module of the package) may not import the tools, so that ``run`` neither loads
a benchmark's dependencies nor changes when a tool does. The one exception is the CLI,
which dispatches the ``bench`` and ``eval`` commands with an import inside the command
function. The check reads the source (``ast``), so an import under a branch that no test
takes is caught too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "stream_classifier"
TOOLS = "stream_classifier.tools"
#: Runtime modules allowed to import the tools, and only inside a function.
LAZY_DISPATCH = {"stream_classifier.cli_tools"}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_modules() -> list[Path]:
    return sorted(
        path
        for path in PACKAGE.rglob("*.py")
        if (PACKAGE / "tools") not in path.parents and "__pycache__" not in path.parts
    )


def imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The absolute names an import statement loads (``from a import b``: ``a`` and
    ``a.b``, since ``b`` may be a submodule), with relative imports resolved."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package[: len(package) - (node.level - 1)]
        base = ".".join([*anchor, base] if base else anchor)
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def tool_imports(path: Path, package: Path = PACKAGE) -> Iterator[tuple[int, str, bool]]:
    """(line, name, inside a function) for each import of the tools in ``path``."""
    module = module_name(path, package)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    functions: list[ast.AST] = [
        node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]
    in_function = {id(inner) for fn in functions for inner in ast.walk(fn) if inner is not fn}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        for name in imported_names(node, module, is_package):
            if name == TOOLS or name.startswith(TOOLS + "."):
                yield node.lineno, name, id(node) in in_function


def test_the_runtime_never_imports_the_tools() -> None:
    modules = runtime_modules()
    assert PACKAGE / "cli.py" in modules and PACKAGE / "engine" / "nli.py" in modules
    offences = []
    for path in modules:
        module = module_name(path)
        for line, name, lazy in tool_imports(path):
            if not (lazy and module in LAZY_DISPATCH):
                where = "inside a function" if lazy else "at module level"
                offences.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name} {where}")
    assert not offences, "the runtime imports the tools:\n" + "\n".join(offences)


def test_the_cli_imports_each_tool_only_in_its_command() -> None:
    """The dispatch is where the tools are reached: bench, bench --pipeline, --service, eval."""
    found = {name for _, name, lazy in tool_imports(PACKAGE / "cli_tools.py") if lazy}
    assert {f"{TOOLS}.bench", f"{TOOLS}.bench_pipeline", f"{TOOLS}.bench_service"} <= found
    assert {f"{TOOLS}.eval", f"{TOOLS}.plan"} <= found


def test_the_checker_sees_every_form_of_import(tmp_path: Path) -> None:
    """A check that matches nothing passes forever: each spelling must be found."""
    forms = {
        "import stream_classifier.tools.bench": f"{TOOLS}.bench",
        "from stream_classifier.tools import eval": f"{TOOLS}.eval",
        "from stream_classifier import tools": TOOLS,
        "from .tools import bench": f"{TOOLS}.bench",
        "from . import tools": TOOLS,
        "from ..tools.eval import command": f"{TOOLS}.eval",
    }
    package = tmp_path / "stream_classifier"
    (package / "engine").mkdir(parents=True)
    for index, (source, name) in enumerate(forms.items()):
        # ``..`` reaches the package from a subpackage, ``.`` from a top-level module
        folder = package / "engine" if source.startswith("from ..") else package
        path = folder / f"m{index}.py"
        path.write_text(f"def f():\n    {source}\n\n{source}\n", encoding="utf-8")
        found = list(tool_imports(path, package))
        assert (4, name, False) in found and (2, name, True) in found, (source, found)


def test_building_the_command_line_loads_no_tool() -> None:
    """``run`` builds the same parser as every command: it must not pull a tool in."""
    code = (
        "import sys\n"
        "from stream_classifier import cli\n"
        "cli._parser()\n"
        f"print(sorted(m for m in sys.modules if m.startswith({TOOLS!r})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip() == "[]"


def service_constructions(path: Path) -> list[int]:
    """Lines where a module calls ``Service(...)`` itself."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "Service"
    ]


def test_one_function_assembles_the_service() -> None:
    """``run`` and every benchmark get the same assembly (device defaults, engine and
    prepare stages, switch interval) from ``assemble.build_service``: a benchmark that
    built ``Service`` itself would measure something ``run`` never runs."""
    builders = {
        module_name(path): lines
        for path in PACKAGE.rglob("*.py")
        if (lines := service_constructions(path))
    }
    assert set(builders) == {"stream_classifier.assemble"}, builders
