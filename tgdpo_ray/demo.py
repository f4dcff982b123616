"""The whole system on a laptop: tiny model and demo data, a DPO run whose policy becomes the guidance model,
then a TGDPO run guided by it, and a table comparing the two."""

from __future__ import annotations

import json
from pathlib import Path

from tgdpo_ray.config import load_config
from tgdpo_ray.demo_data import write_demo_data
from tgdpo_ray.models import make_tiny_model
from tgdpo_ray.run import run_train


def ensure_demo_inputs(model_dir: Path, data_dir: Path, log=print) -> None:
    """Builds what the demo job points at, when it is not there yet."""
    if not (model_dir / "config.json").exists():
        log(f"[demo] building the tiny model in {model_dir}")
        make_tiny_model(str(model_dir))
    if not (data_dir / "train.jsonl").exists():
        log(f"[demo] writing demo preference data in {data_dir}")
        write_demo_data(str(data_dir))


def last_train_loss(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in records if "loss" in r][-1]["loss"]


def summary_table(runs: dict[str, dict]) -> str:
    lines = [
        f"{'run':<8} {'final train loss':>17} {'held-out loss':>14} {'held-out reward acc':>20} {'tokens/s':>9}",
    ]
    for name, summary in runs.items():
        held_out = summary.get("eval") or {}
        lines.append(
            f"{name:<8} {summary['final_train_loss']:>17.4f} {held_out.get('loss', float('nan')):>14.4f} "
            f"{held_out.get('reward_accuracy', float('nan')):>20.3f} {summary['tokens_per_second']:>9.0f}"
        )
    return "\n".join(lines)


def run_demo(config_path: str = "jobs/demo.yaml", overrides: list[str] | None = None, log=print) -> dict[str, dict]:
    raw = load_config_unchecked(config_path, overrides)
    train_path = raw["data"]["train"]["path"] if isinstance(raw["data"]["train"], dict) else raw["data"]["train"]
    ensure_demo_inputs(Path(raw["policy"]["model"]), Path(train_path).parent, log)

    runs = {}
    dpo_config = load_config(config_path, (overrides or []) + ["loss.type=dpo", "run.name=demo-dpo"])
    runs["dpo"] = run_train(dpo_config, log)
    guidance = runs["dpo"]["model_dir"]
    tgdpo_config = load_config(
        config_path, (overrides or []) + ["loss.type=tgdpo", "run.name=demo-tgdpo", f"guidance.model={guidance}"]
    )
    runs["tgdpo"] = run_train(tgdpo_config, log)
    for name, config in (("dpo", dpo_config), ("tgdpo", tgdpo_config)):
        runs[name]["final_train_loss"] = last_train_loss(config.run_dir)
        runs[name]["run_dir"] = str(config.run_dir)

    log("\n" + summary_table(runs))
    log(f"\nDPO policy (the guidance model): {runs['dpo']['model_dir']}")
    log(f"TGDPO policy:                    {runs['tgdpo']['model_dir']}")
    log(f"Per-step metrics: {runs['tgdpo']['run_dir']}/metrics.jsonl (and the same under demo-dpo)")
    return runs


def load_config_unchecked(config_path: str, overrides: list[str] | None) -> dict:
    """The raw demo config with overrides, before path checks (the tiny model may not exist yet)."""
    import yaml

    from tgdpo_ray.config import ConfigError, apply_overrides

    path = Path(config_path)
    if not path.is_file():
        raise ConfigError(f"job config not found: {path}")
    return apply_overrides(yaml.safe_load(path.read_text()), overrides or [])
