"""A driver started from a shell that joins a running cluster (ray.address) hands the cluster's processes the
trackers' and the Hub's variables of that shell, which they never saw (ray_start.FORWARDED_ENV)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_driver_joining_a_cluster_gives_its_processes_the_trackers_variables(ray_cluster, tmp_path):
    address = ray_cluster.get_runtime_context().gcs_address
    script = tmp_path / "join.py"
    script.write_text(textwrap.dedent(f"""
        import os

        import ray

        from tgdpo_ray.config.loader import build_config
        from tgdpo_ray.runtime.ray_start import start_ray

        config = build_config({{"data": {{"train": "x.jsonl"}}, "policy": {{"model": "m"}}, "loss": {{"type": "dpo"}},
                               "ray": {{"address": "{address}"}}}}, check_paths=False)
        start_ray(config, log_to_driver=False)
        seen = ray.get(ray.remote(lambda: [os.environ.get(name) for name in ("WANDB_BASE_URL", "UNRELATED")])
                       .remote())
        print("seen:", seen)
    """))
    # The cluster was started without the variable: only the driver's forwarding can bring it.
    assert ray_cluster.get(ray_cluster.remote(lambda: "WANDB_BASE_URL" in os.environ).remote()) is False
    shell = {**os.environ, "WANDB_BASE_URL": "http://tracker.test:8080", "UNRELATED": "not forwarded",
             "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(script)], env=shell, capture_output=True, text=True, timeout=180,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "seen: ['http://tracker.test:8080', None]" in done.stdout, done.stdout
