"""`tgdpo-ray reproduce`: does TGDPO learn faster than DPO where credit assignment matters?

The experiment (jobs/reproduce.yaml) runs the credit-assignment task (task.py) through our real trainer:
every run below is a `kind: train` job (Ray Train + DeepSpeed, the scorer pools, the score cache), and the
trainer's probe (training.probe) records the slot metrics every few optimizer steps.

1. the start of every run, also its reference: the tiny task's SFT warm start on the format (X drawn uniformly),
   or the colours task's pretrained model (`model`, imported from a GGUF when asked);
2. for every seed (its own bijection f, data and pair order, shared by all arms: the arms are paired):
   - guidance: the DPO model that guides arm tgdpo-dpo-guided: a separate, longer DPO run when the spec has a
     `guidance` section (its final slot accuracy must reach guidance.min_slot_accuracy; the report flags a seed
     where it does not), else the seed's dpo arm itself (the paper's recipe);
   - the arms, all with the same data, steps and hyperparameters unless named: dpo (and dpo-lrM for each
     arms.lr_multipliers M other than 1), tgdpo-oracle (+c on X, -c on X' through guidance.source: column),
     tgdpo-dpo-guided (the paper's recipe) and its variants (-clamped, -shuffled, -centred: loss options), and
     tgdpo-shuffled (the oracle rewards shuffled across positions); arms.repeat runs one arm twice in the first
     seed.

Runs go `concurrent_runs` at a time, each as soon as what it needs is done. A run whose folder holds a finished
run of the same config is not run again, so an interrupted experiment resumes where it stopped.
"""

from __future__ import annotations

import copy
import gzip
import json
import logging
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import yaml

from tgdpo_ray.common.errors import UserError
from tgdpo_ray.common.jsonl import read_records
from tgdpo_ray.common.run_dir import RunDir
from tgdpo_ray.config.job import DataSection, JobConfig
from tgdpo_ray.config.loader import build_config, ready_to_run
from tgdpo_ray.experiments.credit.report import write_report
from tgdpo_ray.experiments.credit.colours import make_colour_task
from tgdpo_ray.experiments.credit.spec import (GUIDANCE_RUN, GUIDED, ExperimentSpec, Stage, arms, guidance_run,
                                               load_experiment)
from tgdpo_ray.experiments.credit.task import make_task, make_task_model, write_task_data, write_warm_start_data
from tgdpo_ray.modeling.loading import load_tokenizer
from tgdpo_ray.train.checkpoints import config_changes


def merged(base: dict, update: dict) -> dict:
    """`base` with `update` written over it, section by section."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@dataclass
class Run:
    name: str  # e.g. seed-1/tgdpo-oracle
    config: JobConfig
    made_from: list[str] = field(default_factory=list)  # runs whose models it reads: trained again, it is stale
    after: list[str] = field(default_factory=list)  # runs that must finish first: made_from, and any other

    def __post_init__(self):
        self.after = list(dict.fromkeys(self.made_from + self.after))


class Experiment:
    """The runs of one experiment spec and the files they read."""

    def __init__(self, spec: ExperimentSpec, source: str):
        self.spec, self.source = spec, source
        self.out = spec.out_dir.resolve()
        self.data = DataSection.model_validate({"train": "unused", **spec.job.get("data", {})})

    def job(self, folder: Path, name: str, seed: int, loss: str, train: Path, model: str, stage: Stage,
            lr_multiplier: float = 1.0, probe: Optional[Path] = None, guidance: Optional[dict] = None,
            loss_options: Optional[dict] = None) -> JobConfig:
        """One run's job config, <folder>/<name>: the spec's shared sections, then what this run sets. Its paths
        are checked when it starts (ready_to_run): the models it needs are made by earlier runs."""
        training = {"epochs": stage.epochs, "learning_rate": stage.learning_rate * lr_multiplier}
        if stage.min_lr_ratio is not None:
            training["min_lr_ratio"] = stage.min_lr_ratio
        if probe is not None:  # the reference of every probed run is its start
            task = self.task(0)
            training["probe"] = {"function": "tgdpo_ray.experiments.credit.task:slot_probe",
                                 "every": self.spec.probe_every,
                                 "arguments": {"examples": str(probe), "reference": model, "marker": task.marker,
                                               "slot_line_tokens": task.slot_line_tokens}}
        # With trackers on, every run is one of the experiment's group, its arm the job type.
        defaults = {"scoring": {"cache_dir": str(self.out / "cache")}, "tracking": {"group": self.out.name}}
        raw = merged(merged(defaults, self.spec.job), {
            "kind": "train", "run": {"name": name, "output_dir": str(folder), "seed": seed},
            "tracking": {"job_type": name},
            "data": {"train": {"path": str(train)}}, "loss": {"type": loss, **(loss_options or {})},
            "training": training,
            "policy": {"model": model}, "guidance": guidance or {}})
        return build_config(raw, f"{self.source} (run {folder.name}/{name})", check_paths=False)

    @property
    def init_model(self) -> Path:
        return self.out / "init-model"

    def task(self, seed: int):
        if self.spec.task.kind == "colours":
            return make_colour_task(seed, self.spec.task.keys)
        return make_task(seed, self.spec.task.keys, self.spec.task.filler_words)

    @property
    def start_model(self) -> str:
        """Every run's start and reference: the warm start's model, or the pretrained `model`."""
        if self.spec.task.kind == "tiny":
            return str(self.out / "warm-start" / "model")
        return str(Path(self.spec.model).resolve()) if Path(self.spec.model).exists() else self.spec.model

    @property
    def tokenizer_source(self) -> str:
        # The warm start keeps the tiny model's tokenizer, so the data can be written before it has run.
        return str(self.init_model) if self.spec.task.kind == "tiny" else self.start_model

    def prepare(self, log=print) -> Optional[Run]:
        """The start: the tiny model and the warm start's data, returning the warm-start run; or the pretrained
        model, imported from its GGUF when asked and missing (no run)."""
        spec = self.spec
        if spec.task.kind == "colours":
            if spec.model_from_gguf and not (Path(spec.model) / "config.json").exists():
                from tgdpo_ray.modeling.gguf_import import import_gguf

                import_gguf(spec.model_from_gguf, spec.model, log=log)
            return None
        init = self.init_model
        if not (init / "config.json").exists():
            log(f"[reproduce] building the tiny model in {init}")
            make_task_model(init, make_task(0, spec.task.keys, spec.task.filler_words))
        pairs = write_warm_start_data(self.out / "warm-start.jsonl", make_task(0, spec.task.keys,
                                      spec.task.filler_words), 0, spec.warm_start.pairs)
        return Run("warm-start", self.job(self.out, "warm-start", 0, "sft", pairs, str(init), spec.warm_start))

    def seed_runs(self, seed: int) -> list[Run]:
        """The guidance run (when separate) and every arm of one seed, after writing the seed's data."""
        spec, start = self.spec, self.start_model
        start_runs = ["warm-start"] if spec.task.kind == "tiny" else []
        folder = self.out / f"seed-{seed}"
        paths = write_task_data(folder / "data", self.task(seed), seed, spec.task.train_pairs,
                                spec.task.probe_answers_per_key, load_tokenizer(self.tokenizer_source), self.data,
                                spec.task.oracle_reward)
        runs = []
        if spec.guidance is not None:
            runs.append(Run(f"seed-{seed}/{GUIDANCE_RUN}", self.job(folder, GUIDANCE_RUN, seed, "dpo", paths["train"],
                                                                    start, spec.guidance, probe=paths["probe"]),
                            start_runs))
        guidance = guidance_run(spec)
        guidance_name, guidance_model = f"seed-{seed}/{guidance}", str(RunDir(folder / guidance).model)
        repeated = [arm for arm in arms(spec) if seed == spec.first_seed and arm.name == spec.arms.repeat]
        for arm, name in [(arm, arm.name) for arm in arms(spec)] + [(arm, f"{arm.name}-repeat") for arm in repeated]:
            source = {}
            if arm.rewards:
                source = {"source": "column", "reward_columns": {"chosen": f"{arm.rewards}_chosen",
                                                                 "rejected": f"{arm.rewards}_rejected"}}
            if arm.guided:
                source = {"source": "implicit", "model": guidance_model}
            config = self.job(folder, name, seed, arm.loss, paths["train"], start, spec.arms, arm.lr_multiplier,
                              paths["probe"], source, arm.loss_options)
            # Runs that score the same data with the same models share a cache entry, so they wait for the first
            # of them, which writes it (no two runs write one cache): the dpo arms for the guidance run (or the
            # dpo arm), the guided variants for the guided arm, a repeat for its arm.
            if name != arm.name:
                after = [f"seed-{seed}/{arm.name}"]
            elif arm.loss == "dpo":
                after = [guidance_name]
            elif arm.guided:
                after = [f"seed-{seed}/{GUIDED}"]
            else:
                after = []
            after = [other for other in after if other != f"seed-{seed}/{name}"]  # the first waits for none
            runs.append(Run(f"seed-{seed}/{name}", config, start_runs + ([guidance_name] if arm.guided else []),
                            after=after))
        return runs


# ---------------------------------------------------------------- running them


def finished(config: JobConfig) -> bool:
    """Whether the run's folder holds a complete run of this config (train.checkpoints.config_changes)."""
    files = RunDir(config.run_dir)
    if not (files.summary.exists() and files.config.exists()):
        return False
    complete = json.loads(files.summary.read_text()).get("complete", False)
    return complete and not config_changes(yaml.safe_load(files.config.read_text()), config)


# The training metrics kept beside the probe's: the loss and the parts of TGDPO's z (issue #31).
TRAINING_KEYS = ("loss", "z_dpo", "z_guidance", "weight_sum_gap")


def probe_curve(run_dir: Path) -> list[dict]:
    """The probe records of a run: [{step, slot_probability, slot_accuracy, slot_margin, ...}], by step; and the
    training step's loss and what carries it (z_dpo, z_guidance, weight_sum_gap: TGDPO only) at each probed
    step."""
    records = list(read_records(RunDir(run_dir).metrics))
    steps = {record["step"]: record for record in records if "loss" in record}
    return [{"step": record["step"], **record["probe"],
             **{key: steps[record["step"]][key] for key in TRAINING_KEYS if key in steps.get(record["step"], {})}}
            for record in records if "probe" in record]


class ExperimentError(UserError, RuntimeError):
    """A run of the experiment failed; the message names it and carries its error."""


class Skipped(Exception):
    """A run not started because an earlier one failed."""


class Scheduler:
    """Runs each run in a thread of its own once the runs it waits for are done, `slots` at a time; the first
    failure stops every run that has not started and is raised by wait()."""

    def __init__(self, slots: int, execute: Callable[[Run], None]):
        self.slots = threading.Semaphore(slots)
        self.execute = execute
        self.futures: dict[str, Future] = {}
        self.failed = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=64)

    def submit(self, run: Run) -> None:
        before = [self.futures[name] for name in run.after]  # submitted before it, in order

        def body() -> None:
            for future in before:
                future.result()
            with self.slots:
                if self.failed.is_set():
                    raise Skipped(run.name)
                try:
                    self.execute(run)
                except BaseException:
                    self.failed.set()
                    raise

        self.futures[run.name] = self.pool.submit(body)

    def wait(self) -> None:
        errors = [(name, future.exception()) for name, future in self.futures.items()]
        errors = [(name, error) for name, error in errors if error is not None and not isinstance(error, Skipped)]
        self.pool.shutdown()
        if errors:
            name, error = errors[0]
            raise ExperimentError(f"run {name} failed: {error}") from error


def run_experiment(config_path: str, overrides: Optional[list[str]] = None, log=print,
                   command: Optional[str] = None) -> dict:
    """Every run of the experiment, then the report (report.py); returns the results."""
    from tgdpo_ray.runtime.ray_start import start_ray
    from tgdpo_ray.train.checkpoints import delete_checkpoints
    from tgdpo_ray.train.driver import run_train

    from tgdpo_ray.common.provenance import provenance

    spec = load_experiment(config_path, overrides)
    # Recorded before any run: the code the runs come from (commit, uncommitted changes) and the machine.
    command = command or " ".join(["tgdpo-ray reproduce --config", config_path,
                                   *[f"--set {override}" for override in overrides or []]])
    record = provenance(command)
    experiment = Experiment(spec, config_path)
    experiment.out.mkdir(parents=True, exist_ok=True)
    (experiment.out / "experiment.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    started = time.perf_counter()
    start = experiment.prepare(log)
    runs = [start] if start is not None else []
    runs += [run for seed in spec.seed_numbers for run in experiment.seed_runs(seed)]
    done, trained, lock = [], set(), threading.Lock()

    def execute(run: Run) -> None:
        begun = time.perf_counter()
        # A finished run is kept unless something it was made from (the warm start, a guidance model) was
        # trained again; an interrupted one resumes, unless its config changed: it then starts over.
        retrained = bool(trained.intersection(run.made_from))
        if not retrained and finished(run.config):
            note = "already finished"
        else:
            with lock:
                trained.add(run.name)
            starts = {"resume": not retrained, "on_config_change": "restart"}
            config = run.config.model_copy(update={"run": run.config.run.model_copy(update=starts)})
            run_train(ready_to_run(config, experiment.source), log=lambda line: None)
            # Kept runs need their model and metrics only: a SmolLM2 checkpoint is 1.5 GB, and 26 of them filled
            # this machine's disk during the real experiment.
            delete_checkpoints(config)
            note = f"{time.perf_counter() - begun:.0f}s"
        curve = probe_curve(run.config.run_dir)
        with lock:
            done.append(run.name)
            shown = (f": slot accuracy {curve[0]['slot_accuracy']:.2f} -> {curve[-1]['slot_accuracy']:.2f}, filler "
                     f"KL {curve[-1]['filler_kl']:.3f} at step {curve[-1]['step']}") if curve else ""
            log(f"[reproduce] {len(done)}/{len(runs)} {run.name} ({note}){shown}")

    start_ray(runs[0].config, log_to_driver=False)  # each run's own record is in its folder (metrics.jsonl)
    import ray.data  # noqa: F401  (Ray Data sets its loggers up when imported: quieten them after that)

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # the cache's reads and writes, one line per dataset
    log(f"[reproduce] {len(runs)} runs, {spec.concurrent_runs} at a time; folders under {experiment.out}")
    scheduler = Scheduler(spec.concurrent_runs, execute)
    for run in runs:
        scheduler.submit(run)
    scheduler.wait()
    curves = {run.name: probe_curve(run.config.run_dir) for run in runs if run.name != "warm-start"}
    record["runs_trained"] = len(trained)
    return write_report(spec, experiment.out, curves, time.perf_counter() - started, record, log)


# The small results that are committed (bench/results): the numbers, the per-run curves they come from and the
# plots, each as <experiment name><suffix>.
PUBLISHED = {"reproduce.json": ".json", "curves.jsonl": "_curves.jsonl.gz", "curves.png": "_curves.png",
             "accuracy_vs_kl.png": "_accuracy_vs_kl.png"}


def compact_curves(source: Path, target: Path) -> Path:
    """curves.jsonl (one line per probe) as one line per run, {"run", "seed", metric: [values by step]}, to 4
    significant digits and gzipped: the copy that is committed stays small."""
    runs: dict[tuple, dict] = {}
    for record in read_records(source):
        run = runs.setdefault((record["run"], record["seed"]), {"run": record["run"], "seed": record["seed"]})
        for key, value in record.items():
            if key not in ("run", "seed"):
                run.setdefault(key, []).append(float(f"{value:.4g}") if isinstance(value, float) else value)
    with gzip.open(target, "wt") as handle:
        handle.writelines(json.dumps(run) + "\n" for run in runs.values())
    return target


def publish(results_dir: Path, experiment_dir: Path, name: str) -> list[Path]:
    """Copies the small results into a folder that is committed, e.g. bench/results/<name>.json."""
    results_dir.mkdir(parents=True, exist_ok=True)
    published = []
    for file, suffix in PUBLISHED.items():
        target = results_dir / f"{name}{suffix}"
        if file == "curves.jsonl":
            published.append(compact_curves(experiment_dir / file, target))
        else:
            published.append(Path(shutil.copy2(experiment_dir / file, target)))
    return published
