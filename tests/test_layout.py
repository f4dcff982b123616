"""The package's layers hold. Its folders are its subsystems, each importing only the layers below it:

    common <- (config, kernels) <- (modeling, runtime) <- (data, scoring, eval) <- train <- onpolicy <- launch
    <- experiments <- cli

Training and evaluation meet only at a model folder on disk (eval imports no training module, nor the other way
round); nothing imports the command line; no module imports itself through others. Read from the source's import
statements, so a lazy import inside a function counts too. The torch-only core (kernels/) imports in a process
where ray, pydantic, deepspeed and vllm cannot be imported, as on a bare torch GPU image."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import tgdpo_ray

PACKAGE = Path(tgdpo_ray.__file__).parent
# What each top-level module or subpackage may import besides itself: the layers below it. Training (data, scoring,
# train) and evaluation (eval) stand side by side on the same base and meet only at a model folder on disk.
BASE = {"common", "config", "kernels", "modeling", "runtime"}
ALLOWED = {
    "common": set(),
    "config": {"common"},
    "kernels": {"common"},
    "modeling": {"common", "config", "kernels"},
    "runtime": {"common", "config"},
    "data": BASE,
    "scoring": BASE,
    "eval": BASE,
    "train": BASE | {"data", "scoring"},
    "onpolicy": BASE | {"data", "scoring", "eval"},
    "launch": BASE | {"data", "scoring", "eval", "train", "onpolicy"},
    "experiments": BASE | {"data", "scoring", "eval", "train", "onpolicy", "launch"},
    "cli": BASE | {"data", "scoring", "eval", "train", "onpolicy", "launch", "experiments"},
}
# The third-party packages the torch-only core imports at module level; transformers only inside the functions that
# plug attention into a transformers model (a bare torch GPU image has it, but a kernel needs none of it).
KERNEL_THIRD_PARTY = {"torch", "numpy"}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def imported_modules(path: Path) -> set[str]:
    """The tgdpo_ray modules a file imports, as names relative to the package ("eval.judge", "kernels.flex")."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tgdpo_ray"):
            base = node.module.removeprefix("tgdpo_ray").lstrip(".")
            for alias in node.names:  # `from tgdpo_ray.kernels import flex` imports the module kernels.flex
                candidate = f"{base}.{alias.name}".lstrip(".")
                found.add(candidate if (PACKAGE / candidate.replace(".", "/")).with_suffix(".py").exists()
                          else base)
        elif isinstance(node, ast.Import):
            found |= {alias.name.removeprefix("tgdpo_ray.") for alias in node.names
                      if alias.name.startswith("tgdpo_ray.")}
    return found


def top_level_third_party(path: Path) -> set[str]:
    """The packages outside the standard library and tgdpo_ray that a file imports at module level."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Try):  # an optional import (flex.py's FlexAttention, torch 2.5 and later)
            node = node.body[0]
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
    return found - set(sys.stdlib_module_names) - {"tgdpo_ray"}


def modules() -> dict[str, set[str]]:
    found = {module_name(path): imported_modules(path) for path in sorted(PACKAGE.rglob("*.py"))
             if path.name != "__init__.py"}
    assert len(found) > 40 and "kernels.step" in found and "train.worker" in found  # the scan sees the package
    return found


def layer(module: str) -> str:
    return module.split(".")[0]


def test_every_module_is_in_a_layer_and_only_cli_sits_at_the_top():
    names = modules()
    assert {layer(name) for name in names} == set(ALLOWED)
    assert [name for name in names if "." not in name] == ["cli"]


def test_each_layer_imports_only_the_layers_below_it():
    names = modules()
    wrong = {f"tgdpo_ray/{name.replace('.', '/')}.py imports {other}"
             for name, imports in names.items() for other in imports
             if layer(other) not in ALLOWED[layer(name)] | {layer(name)}}
    assert not wrong, sorted(wrong)


def test_the_layers_say_what_the_architecture_says():
    # common imports nothing of the package; config and kernels only common.
    assert ALLOWED["common"] == set() and ALLOWED["config"] == ALLOWED["kernels"] == {"common"}
    # Evaluation never imports training, scoring, data or the layers on top; they never import evaluation.
    assert not ALLOWED["eval"] & {"train", "scoring", "data", "onpolicy", "launch", "experiments", "cli"}
    for name in ("train", "scoring", "data"):
        assert not ALLOWED[name] & {"eval", "onpolicy", "launch", "experiments", "cli"}, name
    assert [name for name, allowed in ALLOWED.items() if "cli" in allowed] == []
    # The layers themselves form no circle.
    assert find_cycle(ALLOWED) is None


def test_kernels_import_only_common_torch_and_numpy():
    kernels = [path for path in (PACKAGE / "kernels").glob("*.py") if path.name != "__init__.py"]
    assert len(kernels) >= 8
    for path in kernels:
        package = {layer(other) for other in imported_modules(path)}
        assert package <= {"common", "kernels"}, (path.name, package)
        assert top_level_third_party(path) <= KERNEL_THIRD_PARTY, (path.name, top_level_third_party(path))


def find_cycle(graph: dict[str, set[str]]):
    """A list of modules that import each other in a circle, or None."""
    state: dict[str, str] = {}  # visiting / done
    path: list[str] = []

    def visit(name: str):
        state[name] = "visiting"
        path.append(name)
        for other in sorted(graph.get(name, ())):
            if state.get(other) == "visiting":
                return path[path.index(other):] + [other]
            if other not in state and (cycle := visit(other)):
                return cycle
        path.pop()
        state[name] = "done"
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            return cycle
    return None


def test_no_module_imports_itself_through_others():
    names = modules()
    assert find_cycle({name: {other for other in imports if other in names} for name, imports in names.items()}) \
        is None


def test_the_checks_see_what_they_look_for(tmp_path):
    """A check that finds nothing proves nothing unless it would find something."""
    source = tmp_path / "sample.py"
    source.write_text("import torch\nimport ray\nfrom tgdpo_ray.eval.judge import x\nfrom tgdpo_ray.kernels import "
                      "flex\nimport tgdpo_ray.cli\ndef f():\n    import vllm\n    from tgdpo_ray.train.worker import "
                      "train_loop\n")
    assert imported_modules(source) == {"eval.judge", "kernels.flex", "cli", "train.worker"}
    assert top_level_third_party(source) == {"torch", "ray"}  # vllm is imported lazily
    assert "eval.flow" in modules()["launch.pipeline"]  # a lazy import, inside a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert "eval" not in ALLOWED["train"] and "kernels" in ALLOWED["train"]


# Run in a fresh interpreter: ray, pydantic, deepspeed and vllm cannot be imported there. It imports every kernel
# module and runs the trainers' step (kernels/step.py) on a tiny random Llama, in every layout.
BARE_TORCH = """
import importlib, pkgutil, sys

for name in ("ray", "pydantic", "deepspeed", "vllm"):
    sys.modules[name] = None  # not installed: importing it fails, and find_spec() finds nothing (as transformers asks)
import torch
import tgdpo_ray.kernels
for module in pkgutil.iter_modules(tgdpo_ray.kernels.__path__):
    importlib.import_module(f"tgdpo_ray.kernels.{module.name}")
from transformers import LlamaConfig, LlamaForCausalLM
from tgdpo_ray.kernels.losses import TGDPOLoss
from tgdpo_ray.kernels.step import StepSettings, micro_batch_loss, prepare_policy

torch.manual_seed(0)
config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1,
                     num_key_value_heads=1, head_dim=64, pad_token_id=0)
rows = [{"pair_id": i, "prompt_ids": [3, 4, 5 + i], "chosen_ids": [6, 7], "rejected_ids": [8, 9, 10],
         "ref_chosen_logps": [-4.0] * 2, "ref_rejected_logps": [-4.0] * 3,
         "guidance_chosen_logps": [-3.0] * 2, "guidance_rejected_logps": [-5.0] * 3} for i in range(3)]
losses = []
for layout, attention in (("padded", "dense"), ("packed", "dense"), ("shared_prompt", "varlen")):
    model = prepare_policy(LlamaForCausalLM(config), layout, attention, torch.device("cpu"), torch.float32)
    settings = StepSettings(layout=layout, packed_row_tokens=64, guidance_kind="implicit")
    out, tokens = micro_batch_loss(model, rows, TGDPOLoss(), settings, 0, torch.device("cpu"))
    out.losses.sum().backward()
    losses.append(out.losses.sum().item())
loaded = {name.split(".")[0] for name, module in sys.modules.items() if module is not None}
heavy = sorted(loaded & {"ray", "pydantic", "deepspeed", "vllm"})
print("bare torch step:", losses, "heavy modules:", heavy)
"""


def test_the_kernels_and_the_step_run_where_only_torch_is_installed():
    done = subprocess.run([sys.executable, "-c", BARE_TORCH], capture_output=True, text=True, timeout=300,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "heavy modules: []" in done.stdout
    losses = [float(value) for value in done.stdout.split("[", 1)[1].split("]", 1)[0].split(",")]
    assert len(losses) == 3 and all(loss > 0 for loss in losses)


def test_the_refusing_importer_would_catch_a_heavy_import():
    done = subprocess.run([sys.executable, "-c", BARE_TORCH.split("import torch\n", 1)[0] + "import pydantic\n"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "ModuleNotFoundError: import of pydantic halted" in done.stderr


def readme_layout() -> set[str]:
    """The files README's "Code layout" tree lists, as paths inside the package."""
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme.split("## Code layout", 1)[1].split("\n## ", 1)[0]
    blocks = section.split("```")[1::2]
    (tree,) = [block.strip("\n").splitlines() for block in blocks if block.lstrip("\n").startswith("tgdpo_ray/")]
    listed, folders = set(), []
    for line in tree[1:]:
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip())) // 2  # two spaces a level, the package's contents at 1
        name = line.split()[0]
        folders = folders[:depth - 1]
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
        elif name.endswith(".py"):
            listed.add("/".join(folders + [name]))
    return listed


@pytest.mark.parametrize("kind", ["modules", "folders"])
def test_readme_lists_every_module_and_no_other(kind):
    listed = readme_layout()
    actual = {str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py") if path.name != "__init__.py"}
    assert len(actual) > 40
    if kind == "folders":
        listed, actual = ({path.rsplit("/", 1)[0] for path in paths if "/" in path} for paths in (listed, actual))
    assert listed == actual, f"README lists {sorted(listed - actual)}, which do not exist, and misses " \
                             f"{sorted(actual - listed)}"
