"""The house rules of docs/design.md that code review alone would let slip: no import circle (module-level or
inside functions), no stage importing another stage or the pipeline, Slurm rendering importing no stage, no module writing
another module's globals, every "DESIGN §" reference pointing at a section of docs/design.md."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"roll": ROOT / "roll", "roll.store": ROOT / "roll" / "store", "roll.stages": ROOT / "stages",
            "roll.pipeline": ROOT / "pipeline", "roll.pipeline.experiments": ROOT / "pipeline" / "experiments"}
# packages whose __init__ is a module like any other (roll.store re-exports its rooms); the others hold a docstring
REEXPORTING = {"roll.store"}


def modules() -> dict[str, Path]:
    out = {}
    for package, directory in PACKAGES.items():
        for path in directory.glob("*.py"):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every roll module `name` imports, at module level or inside functions (not under `if TYPE_CHECKING:`,
    which never runs)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # a submodule imported by name
    return {m for m in found if m in known and m != name and (m not in PACKAGES or m in REEXPORTING)}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, set(known)) for name, path in known.items()}


def test_no_import_circle():
    edges = graph()
    circles = []

    def reach(start: str) -> set[str]:
        seen, todo = set(), list(edges[start])
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo.extend(edges.get(node, ()))
        return seen

    for name in edges:
        if name in reach(name):
            circles.append(name)
    assert circles == [], f"modules on an import circle: {circles}"


def test_no_stage_imports_another_and_slurm_imports_none():
    edges = graph()
    for name, targets in edges.items():
        if name.startswith("roll.stages."):
            assert not {t for t in targets if t.startswith("roll.stages.")}, (name, targets)
    assert not {t for t in edges["roll.pipeline.slurm"] if t.startswith("roll.stages.")}


def test_no_module_writes_another_modules_globals():
    known = set(modules())
    offenders = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in known:
                        aliases[alias.asname or alias.name] = alias.name
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    if f"{node.module}.{alias.name}" in known:
                        aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AugAssign) else []
            for target in targets:
                if isinstance(target, ast.Attribute) and ast.unparse(target.value) in aliases | {m: m for m in known}:
                    offenders.append(f"{name}: {ast.unparse(target)}")
    assert offenders == []


def test_every_design_reference_points_at_a_section_of_docs_design():
    design = (ROOT / "docs" / "design.md").read_text()
    sections = set(re.findall(r"^#+ (\d+(?:\.\d+)?[a-z]?)[. ]", design, flags=re.M))
    cited = set()
    for path in [*ROOT.glob("*.md"), *(p for d in ("roll", "stages", "pipeline", "tests", "bench") for p in (ROOT / d).rglob("*.py"))]:
        cited.update(re.findall(r"DESIGN §(\d+(?:\.\d+)?[a-z]?)", path.read_text()))
    assert cited, "no references found: the pattern is wrong"
    assert cited <= sections, f"cited but not in docs/design.md: {sorted(cited - sections)}"


def test_nothing_in_the_pipeline_imports_the_experiments():
    """pipeline/experiments/ holds the grids and studies run with roll; roll itself must work without them."""
    edges = graph()
    offenders = {name: sorted(t for t in targets if t.startswith("roll.pipeline.experiments."))
                 for name, targets in edges.items() if not name.startswith("roll.pipeline.experiments")}
    assert {n: t for n, t in offenders.items() if t} == {}
    assert {"roll.pipeline.experiments.grid", "roll.pipeline.experiments.frontier"} <= set(edges)


def test_ruff_finds_nothing():
    """The lint rules of pyproject.toml ([tool.ruff]) over the whole repository; `ruff check .` shows the findings."""
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is not installed: it is in the dev extra (pip install -e '.[dev]')"
    proc = subprocess.run([ruff, "check", "--no-cache", "--output-format", "concise", str(ROOT)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]


def test_no_stage_imports_the_pipeline():
    """The folders import in one direction, pipeline → stages → roll's library: a stage that needs another
    stage's output refuses with the command to run, and the orchestration (pipeline/prepare.py) calls both."""
    edges = graph()
    offenders = {name: sorted(t for t in targets if t.startswith("roll.pipeline"))
                 for name, targets in edges.items() if name.startswith("roll.stages")}
    assert {n: t for n, t in offenders.items() if t} == {}
    assert "roll.stages.train" in edges and "roll.pipeline.prepare" in edges
    library = {name: sorted(t for t in targets if t.startswith(("roll.stages", "roll.pipeline")))
               for name, targets in edges.items()
               if not name.startswith(("roll.stages", "roll.pipeline")) and name not in ("roll.cli", "roll.__main__")}
    assert {n: t for n, t in library.items() if t} == {}, "only the command line (roll/cli.py) reaches up"
