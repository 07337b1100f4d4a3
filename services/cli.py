"""The `lpreg` command line.

lpreg local CONFIG [--resume [RUN_DIR]] [--set k=v ...]   private redis-server + learner + N
                                                         generators (--resume continues a run)
lpreg learner CONFIG [--resume] [--set k=v ...]
lpreg generator CONFIG [--id ID] [--set k=v ...]
lpreg eval CONFIG --checkpoint DIR --data FILE   accuracy, pass@k, length, entropy
lpreg generate MODEL_DIR PROMPT [-n N]           sample completions from a model directory
lpreg dashboard RUN_DIR [--port P]               TensorBoard of a run, on loopback
lpreg data convert IN OUT [--layout L]           DAPO-Math-17k / MATH-500 / AIME -> jsonl task
lpreg config show CONFIG [--set k=v ...]         print the resolved config
lpreg config fields                              every config field with its description
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sys
from typing import Any

from pydantic import BaseModel

from lpreg_core.config import (
    ConfigError,
    RunConfig,
    dump_config,
    load_config,
    models_in,
    variants_of,
)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see `lpreg config fields`)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one field, e.g. --set learner.steps=20 (repeatable; value parsed as YAML)",
    )


def _field_lines(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every field with its default and description; a typed variant lists each variant's
    fields under ``[type=NAME]`` (``--set section.type=NAME`` switches to its defaults)."""
    lines = []
    for name, field in model.model_fields.items():
        ann: Any = field.annotation
        variants = variants_of(ann)
        if variants:
            default = field.get_default(call_default_factory=True)
            lines.append(
                f"{prefix}{name}  (typed variant: {', '.join(variants)}; default "
                f"{getattr(default, 'type', None)!r}; --set {prefix}{name}.type=NAME switches "
                "to that variant's defaults)"
            )
            if field.description:
                lines.append(f"    {field.description}")
            for tag, variant in variants.items():
                doc = (variant.__doc__ or "").strip().splitlines()
                lines.append(f"  [{prefix}{name}.type={tag}]  {doc[0] if doc else ''}")
                lines.extend(
                    "  " + line
                    for line in _field_lines(variant, f"{prefix}{name}.")
                    if not line.lstrip().startswith(f"{prefix}{name}.type ")
                )
            continue
        models = models_in(ann)
        if models:
            lines.extend(_field_lines(models[0], f"{prefix}{name}."))
            continue
        if field.is_required():
            lines.append(f"{prefix}{name}  (required)")
        else:
            lines.append(f"{prefix}{name} = {field.get_default(call_default_factory=True)!r}")
        if field.description:
            lines.append(f"    {field.description}")
    return lines


def _startup_checks(config: RunConfig, command: str) -> None:
    """Refuse to start, naming the setting, what would fail later with a vaguer error."""
    from services.common.auth import load_auth_token
    from services.common.env import REDIS_URL_ENV, redis_url
    from services.common.startup import (
        check_or_raise,
        generator_problems,
        learner_problems,
        redis_url_problems,
    )

    load_auth_token(config.control)  # a missing token is the first thing to say
    problems = learner_problems(config) if command == "learner" else generator_problems(config)
    if os.environ.get(REDIS_URL_ENV):
        problems += redis_url_problems(redis_url(config.redis), f"${REDIS_URL_ENV}")
    check_or_raise(problems)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lpreg",
        description="RLVR training with Lp-Reg.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--log-level", default=os.environ.get("LPREG_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("local", help="run a whole training job on this machine")
    _add_config_args(p)
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="RUN_DIR",
        help="continue a local run from its newest checkpoint, with its own Redis data "
        "(default RUN_DIR: the config's local.run_dir, e.g. runs/tiny)",
    )
    p = sub.add_parser("learner", help="run the learner service")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p = sub.add_parser("generator", help="run a generator service")
    _add_config_args(p)
    p.add_argument(
        "--id", default=None, help="generator id (default: $LPREG_GENERATOR_ID or host-pid)"
    )
    p = sub.add_parser("eval", help="accuracy, pass@k, length and entropy of a checkpoint")
    _add_config_args(p)
    from services.eval.args import add_eval_args

    add_eval_args(p)
    p = sub.add_parser("generate", help="sample completions from a Hugging Face model directory")
    p.add_argument("model", help="model directory, e.g. runs/tiny/final_model")
    p.add_argument("prompt", help='prompt text, e.g. "23+58="')
    p.add_argument("-n", "--num-samples", type=int, default=4, help="samples to print")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("dashboard", help="serve a run's TensorBoard on loopback")
    p.add_argument("run_dir", help="run folder, e.g. runs/tiny")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=6006, help="0 = a free port")
    p = sub.add_parser("data", help="prepare task data")
    dsub = p.add_subparsers(dest="data_command", required=True)
    conv = dsub.add_parser(
        "convert", help="DAPO-Math-17k / MATH-500 / AIME rows to the jsonl task's layout"
    )
    from services.data.convert import add_convert_args

    add_convert_args(conv)
    p = sub.add_parser("config", help="inspect configs")
    csub = p.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the resolved config as YAML")
    _add_config_args(show)
    csub.add_parser("fields", help="list every config field with its description")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # `kill -USR1 <pid>` prints every thread's stack to the log: the first tool for a stuck process.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.command == "config" and args.config_command == "fields":
        print("\n".join(_field_lines(RunConfig)))
        return 0
    if args.command == "generate":
        from services.local.generate import run_generate

        return run_generate(args)
    if args.command == "dashboard":
        from services.dashboard.serve import run_dashboard

        return run_dashboard(args.run_dir, args.host, args.port)
    if args.command == "data":
        from services.data.convert import run_convert

        return run_convert(args)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"lpreg: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(dump_config(config), end="")
        return 0
    if args.command == "eval":
        from services.eval.main import run_eval

        try:
            return run_eval(config, args)
        except (OSError, ValueError, RuntimeError) as e:
            print(f"lpreg eval: {e}", file=sys.stderr)
            return 1
    from services.common.auth import AuthConfigError
    from services.common.errors import ControlError
    from services.common.startup import StartupError
    from services.transport.redis_streams import TransportUnavailable

    try:
        if args.command == "local":
            from services.local.launcher import run_local

            return run_local(
                config, config_path=args.config, overrides=args.overrides, resume=args.resume
            )
        _startup_checks(config, args.command)
        if args.command == "learner":
            from services.learner.main import run_learner

            run_learner(config, resume=args.resume)
            return 0
        from services.generator.main import run_generator

        run_generator(config, args.id)
        return 0
    except StartupError as e:
        print(f"lpreg {args.command}: {e}", file=sys.stderr)
        return 2
    except (TransportUnavailable, AuthConfigError, ControlError, OSError, RuntimeError) as e:
        logging.getLogger("lpreg").debug("fatal error", exc_info=True)
        print(f"lpreg {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
