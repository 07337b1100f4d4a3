"""The `lpreg` command line.

lpreg local CONFIG [--set k=v ...]        private redis-server + learner + N generators
lpreg learner CONFIG [--resume] [--set k=v ...]
lpreg generator CONFIG [--id ID] [--set k=v ...]
lpreg eval CONFIG --checkpoint DIR --data FILE   accuracy, pass@k, length, entropy
lpreg config show CONFIG [--set k=v ...]  print the resolved config
lpreg config fields                       every config field with its description
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

from lpreg_core.config import ConfigError, RunConfig, dump_config, load_config


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
    lines = []
    for name, field in model.model_fields.items():
        ann: Any = field.annotation
        sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if sub is not None:
            lines.extend(_field_lines(sub, f"{prefix}{name}."))
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            lines.append(
                f"{prefix}{name}  (typed variant, `type` selects it; default {default.model_dump()})"
            )
            lines.append(f"    {field.description or ''}")
            continue
        lines.append(f"{prefix}{name} = {default!r}")
        if field.description:
            lines.append(f"    {field.description}")
    return lines


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
    from services.transport.redis_streams import TransportUnavailable

    try:
        if args.command == "local":
            from services.local.launcher import run_local

            return run_local(config, config_path=args.config, overrides=args.overrides)
        if args.command == "learner":
            from services.learner.main import run_learner

            run_learner(config, resume=args.resume)
            return 0
        from services.generator.main import run_generator

        run_generator(config, args.id)
        return 0
    except (TransportUnavailable, AuthConfigError, ControlError, OSError, RuntimeError) as e:
        logging.getLogger("lpreg").debug("fatal error", exc_info=True)
        print(f"lpreg {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
