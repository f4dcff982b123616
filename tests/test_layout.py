"""The package's layout holds: training and evaluation meet only through the shared modules, and nothing imports
the command line. Read from the source's import statements, so a lazy import inside a function counts too."""

import ast
from pathlib import Path

import tgdpo_ray

PACKAGE = Path(tgdpo_ray.__file__).parent
# Used by both subsystems: configuration, errors, processes on the cluster, JSON Lines, a model's file identity,
# the bootstrap.
SHARED = {"config", "config_base", "config_eval", "config_loader", "errors", "cluster", "jsonl", "model_files",
          "bootstrap"}
# The doors: they start jobs of either kind.
DOORS = {"cli", "pipeline", "jobs", "plan", "demo_real"}
# Makes training data with evaluation's parts: the pairs job samples with eval's engines, ranks with its judges and
# reads prompts with the training data's readers.
BOTH = {"pairs"}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def imported_modules(path: Path) -> set[str]:
    """The tgdpo_ray modules a file imports, as names relative to the package ("eval.judge", "config")."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tgdpo_ray"):
            base = node.module.removeprefix("tgdpo_ray").lstrip(".")
            for alias in node.names:  # `from tgdpo_ray import cluster` imports the module cluster
                found.add(f"{base}.{alias.name}".lstrip(".") if not base else base)
        elif isinstance(node, ast.Import):
            found |= {alias.name.removeprefix("tgdpo_ray.") for alias in node.names
                      if alias.name.startswith("tgdpo_ray.")}
    return found


def modules() -> dict[str, set[str]]:
    return {module_name(path): imported_modules(path) for path in sorted(PACKAGE.rglob("*.py"))
            if path.name != "__init__.py"}


def test_evaluation_imports_nothing_of_training():
    for name, imports in modules().items():
        if name.startswith("eval."):
            foreign = {m for m in imports if not m.startswith("eval.") and m.split(".")[0] not in SHARED}
            assert not foreign, f"tgdpo_ray/{name.replace('.', '/')}.py imports {sorted(foreign)}"


def test_training_imports_nothing_of_evaluation():
    for name, imports in modules().items():
        if not name.startswith("eval.") and name not in DOORS | BOTH:
            assert not {m for m in imports if m == "eval" or m.startswith("eval.")}, \
                f"tgdpo_ray/{name}.py imports the eval subpackage"


def test_shared_modules_import_only_shared_modules():
    for name in SHARED & set(modules()):
        assert modules()[name] <= SHARED, f"tgdpo_ray/{name}.py imports {sorted(modules()[name] - SHARED)}"


def test_nothing_imports_the_command_line():
    assert [name for name, imports in modules().items() if "cli" in imports] == []


def test_the_checks_see_imports_of_every_form(tmp_path):
    """A check that finds nothing proves nothing unless it would find something."""
    source = tmp_path / "sample.py"
    source.write_text("from tgdpo_ray.eval.judge import x\nfrom tgdpo_ray import cluster\nimport tgdpo_ray.cli\n"
                      "def f():\n    from tgdpo_ray.train.worker import train_loop\n")
    assert imported_modules(source) == {"eval.judge", "cluster", "cli", "training"}
    assert "eval.flow" in modules()["pipeline"]  # a lazy import, inside a function


def test_readme_lists_every_module_and_no_other():
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme.split("## Code layout", 1)[1].split("\n## ", 1)[0]
    tree = section.split("```", 2)[1]
    listed = set()
    for line in tree.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.endswith(".py"):
            listed.add(("eval/" if line.startswith("    ") else "") + name)
    actual = {str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py") if path.name != "__init__.py"}
    assert listed == actual, f"README lists {sorted(listed - actual)}, which do not exist, and misses " \
                             f"{sorted(actual - listed)}"
