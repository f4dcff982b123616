"""The demo's inputs: the tiny model and the demo data that jobs/demo.yaml points at, built when missing."""

from __future__ import annotations

from pathlib import Path

from tgdpo_ray.demo_data import write_demo_data
from tgdpo_ray.models import make_tiny_model


def ensure_demo_inputs(model_dir: Path, data_dir: Path, log=print) -> None:
    if not (model_dir / "config.json").exists():
        log(f"[demo] building the tiny model in {model_dir}")
        make_tiny_model(str(model_dir))
    if not all((data_dir / f"{name}.jsonl").exists() for name in ("train", "test", "questions")):
        log(f"[demo] writing demo preference data in {data_dir}")
        write_demo_data(str(data_dir))
