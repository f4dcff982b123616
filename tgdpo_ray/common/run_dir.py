"""The files of a run's folder (<run.output_dir>/<run.name>), named in one place: the driver and the trainers
write them, `report`, the pipeline, the experiments and the tests read them (README, What a run writes)."""

from __future__ import annotations

from pathlib import Path


class RunDir:
    def __init__(self, path):
        self.path = Path(path)

    @property
    def config(self) -> Path:
        """The job config the run was started with, every default filled in."""
        return self.path / "config.yaml"

    @property
    def data_report(self) -> Path:
        """Rows read, kept and skipped (by reason) by the tokenization pass."""
        return self.path / "data_report.json"

    @property
    def metrics(self) -> Path:
        """One record per optimizer step, held-out evaluation and probe."""
        return self.path / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        """Steps, tokens, throughput, the last held-out metrics and where the model is: written at the run's end."""
        return self.path / "summary.json"

    @property
    def model(self) -> Path:
        """The trained policy in Hugging Face format."""
        return self.path / "model"

    @property
    def adapter(self) -> Path:
        """A LoRA run's adapters alone, in peft's layout (<run>/model holds them merged)."""
        return self.path / "adapter"

    @property
    def placement(self) -> Path:
        """One JSON file per process: its role, node and GPUs."""
        return self.path / "placement"

    @property
    def scoring(self) -> Path:
        """One JSON Lines file per scorer actor: a record per batch scored."""
        return self.path / "scoring"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def tracking(self) -> Path:
        """The run's W&B and MLflow run ids: a resumed run continues the same tracker runs."""
        return self.path / "tracking.json"

    @property
    def checkpoints(self) -> Path:
        """Ray Train's storage of the run's checkpoints, unless run.checkpoint_storage names another."""
        return self.path / "checkpoints"

    @property
    def pipeline(self) -> Path:
        """A pipeline's stages and its table."""
        return self.path / "pipeline.json"

    @property
    def eval(self) -> Path:
        """A pipeline's evaluation: answers, judgments and the report."""
        return self.path / "eval"
