"""tgdpo_ray/common/provenance.py in this checkout: a real commit, a dirty flag, the machine; and its import pulls
nothing heavy (bench/gpu.py imports it on GPU images with torch alone)."""

import json
import re
import subprocess
import sys

from tgdpo_ray.common.provenance import provenance


def test_provenance_of_this_checkout():
    block = provenance("python bench/scaling.py --pairs 8", runs_trained=2)
    assert re.fullmatch(r"[0-9a-f]{40}", block["code_commit"])
    assert isinstance(block["dirty"], bool)
    assert block["command"] == "python bench/scaling.py --pairs 8" and block["runs_trained"] == 2
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", block["date"])
    assert block["machine"]["cpus"] >= 1 and block["machine"]["platform"]
    assert block["machine"]["memory_gib"] is None or block["machine"]["memory_gib"] > 0
    json.dumps(block)  # it goes into result JSONs as it is


def test_provenance_imports_nothing_heavy():
    code = ("import sys; import tgdpo_ray.common.provenance; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'pydantic', 'deepspeed', 'vllm', 'torch'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_provenance_without_git(monkeypatch):
    monkeypatch.setenv("PATH", "")  # no git to run: the fields say unknown, nothing raises
    block = provenance("python bench/gpu.py")
    assert block["code_commit"] is None and block["dirty"] is None
    assert block["machine"]["cpus"] >= 1


def test_the_last_commit_of_a_file_is_found_from_the_repository_root():
    from tgdpo_ray.common.provenance import last_commit_of

    commit = last_commit_of("README.md")
    assert commit is not None and len(commit) == 40 and set(commit) <= set("0123456789abcdef")
    assert last_commit_of("no/such/file.md") is None
