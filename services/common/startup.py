"""Start-up checks: what a newcomer gets wrong first, refused before any process starts, with the
setting to change. Each check returns problems as sentences; ``check_or_raise`` joins them."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

from lpreg_core.config import RunConfig, redis_url_problem

# A Hugging Face model directory needs these; the weights may come in any of these forms.
MODEL_CONFIG_FILE = "config.json"
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class StartupError(RuntimeError):
    """A start-up check failed; the message names the setting to change."""


def model_dir_problems(path: str | Path, setting: str = "model.path") -> list[str]:
    """Why ``path`` is not a complete Hugging Face model directory (empty when it is)."""
    p = Path(path)
    if not p.exists():
        return [
            f"{setting}: no such directory: {p} (resolved from {Path.cwd()}); point {setting} at a "
            "Hugging Face model directory (config.json, *.safetensors, tokenizer files)"
        ]
    if not p.is_dir():
        return [f"{setting}: {p} is a file, not a model directory"]
    problems = []
    if not (p / MODEL_CONFIG_FILE).is_file():
        problems.append(f"{setting}: {p} has no {MODEL_CONFIG_FILE}")
    if not any(any(p.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        problems.append(f"{setting}: {p} has no weights (*.safetensors or pytorch_model*.bin)")
    if not any((p / name).is_file() for name in TOKENIZER_FILES):
        problems.append(
            f"{setting}: {p} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the "
            "tokenizer next to the model (tokenizer.save_pretrained(dir))"
        )
    return problems


def port_problem(host: str, port: int, setting: str, hint: str = "") -> str | None:
    """Why ``host:port`` cannot be bound (in use, or an address not of this machine), or None.
    Port 0 means "pick a free one" and never conflicts."""
    if port == 0:
        return None
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        # As the servers themselves bind: connections of a killed predecessor lingering in
        # TIME_WAIT must not count as "in use" (a restarted learner takes its ports back).
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            s.listen()
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return (
                    f"{setting}={port}: port {port} on {host} is already in use"
                    f"{hint}; pick another with --set {setting}=PORT, or {setting}=0 for a "
                    "free one"
                )
            return f"{setting}={port}: cannot bind {host}:{port} ({e.strerror})"
    return None


def learner_problems(config: RunConfig) -> list[str]:
    problems = model_dir_problems(config.model.path)
    checks = [
        (config.control.host, config.control.port, "control.port", " (another learner?)"),
        (config.broadcast.store_host, config.broadcast.store_port, "broadcast.store_port", ""),
        (config.metrics.host, config.metrics.learner_port, "metrics.learner_port", ""),
    ]
    problems += [p for h, port, name, hint in checks if (p := port_problem(h, port, name, hint))]
    return problems


def generator_problems(config: RunConfig) -> list[str]:
    problems = model_dir_problems(config.model.path)
    p = port_problem(
        config.metrics.host,
        config.metrics.generator_port,
        "metrics.generator_port",
        " (a second generator on this host?)",
    )
    return problems + ([p] if p else [])


def redis_url_problems(url: str, source: str) -> list[str]:
    problem = redis_url_problem(url)
    return [] if problem is None else [f"{source}: {problem}"]


def check_or_raise(problems: list[str]) -> None:
    if problems:
        raise StartupError("cannot start:\n  " + "\n  ".join(problems))
