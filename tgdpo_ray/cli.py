"""tgdpo-ray: one entry point for every job.

    tgdpo-ray train --config jobs/demo.yaml [--set key=value ...]
    tgdpo-ray demo [--config jobs/demo.yaml] [--set key=value ...]
    tgdpo-ray make-tiny-model OUT
    tgdpo-ray make-demo-data OUT
"""

from __future__ import annotations

import argparse
import json
import sys

from tgdpo_ray.errors import UserError


def add_config_args(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("--config", required=default is None, default=default, help="job config (YAML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set training.learning_rate=1e-6 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tgdpo-ray", description="TGDPO preference training on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="run a training job (dpo, ipo, simpo or tgdpo)")
    add_config_args(train)

    check = commands.add_parser("check-config", help="validate a job config and print it with defaults filled in")
    add_config_args(check)

    demo = commands.add_parser("demo", help="tiny model + demo data: a DPO run, then TGDPO guided by it")
    add_config_args(demo, default="jobs/demo.yaml")

    tiny = commands.add_parser("make-tiny-model", help="build a random-initialised tiny Llama and tokenizer")
    tiny.add_argument("out")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--hidden-size", type=int, default=128, help="a multiple of 64 (head_dim is 64)")
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--vocab-size", type=int, default=512)

    data = commands.add_parser("make-demo-data", help="write synthetic preference pairs with a known rule")
    data.add_argument("out")
    data.add_argument("--train-pairs", type=int, default=512)
    data.add_argument("--test-pairs", type=int, default=64)
    data.add_argument("--seed", type=int, default=0)
    return parser


def run_command(args: argparse.Namespace) -> int:
    if args.command == "train":
        from tgdpo_ray.config import load_config
        from tgdpo_ray.run import run_train

        summary = run_train(load_config(args.config, args.overrides))
        print(json.dumps(summary, indent=2))
    elif args.command == "check-config":
        import yaml

        from tgdpo_ray.config import load_config

        config = load_config(args.config, args.overrides)
        print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
    elif args.command == "demo":
        from tgdpo_ray.demo import run_demo

        run_demo(args.config, args.overrides)
    elif args.command == "make-tiny-model":
        from tgdpo_ray.models import make_tiny_model

        if args.hidden_size % 64:
            raise SystemExit("error: --hidden-size must be a multiple of 64 (the attention head size)")
        out = make_tiny_model(args.out, args.seed, args.vocab_size, args.hidden_size, args.layers)
        print(f"tiny model and tokenizer written to {out}")
    elif args.command == "make-demo-data":
        from tgdpo_ray.demo_data import write_demo_data

        paths = write_demo_data(args.out, args.train_pairs, args.test_pairs, args.seed)
        print("\n".join(f"{split}: {path}" for split, path in paths.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_command(args)
    except UserError as err:
        # Our own errors already name the key, file or row: print them without a traceback.
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
