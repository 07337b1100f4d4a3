"""The generator service's composition root: build the backend, Redis transport, control
client and metrics endpoint, then run ``services.generator.loop.GeneratorLoop``.

    lpreg generator CONFIG [--id ID] [--set section.field=value ...]
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import zlib

import torch
from prometheus_client import CollectorRegistry

from lpreg_core.config import RunConfig
from services.common.auth import load_auth_token
from services.common.env import learner_address, redis_password, redis_url, store_host_override
from services.common.metrics import serve_metrics
from services.generator.backends import make_backend
from services.generator.control_client import ControlClient
from services.generator.loop import GeneratorLoop
from services.generator.metrics import GeneratorMetrics
from services.transport import RedisStreams
from services.weight_sync import check_member_backend

log = logging.getLogger("lpreg.generator")


def default_generator_id() -> str:
    return os.environ.get("LPREG_GENERATOR_ID") or f"{socket.gethostname()}-{os.getpid()}"


def run_generator(config: RunConfig, generator_id: str | None = None) -> None:
    torch.set_num_threads(config.generator.num_threads)
    gid = generator_id or default_generator_id()
    seed = config.generator.seed + zlib.crc32(gid.encode())
    torch.manual_seed(seed)
    backend = make_backend(
        config.generator.backend, config.model, seed=seed, dtype=config.generator.dtype
    )
    check_member_backend(config.broadcast.backend, config.learner.device, backend.device)
    prom = CollectorRegistry()
    metrics = GeneratorMetrics(prom, config.run_id)
    transport = RedisStreams(
        config.redis,
        config.run_id,
        consumer=gid,
        password=redis_password(config.redis),
        url=redis_url(config.redis),
        on_dead_letter=lambda reason: metrics.dlq_entries.labels(reason=reason).inc(),
    )
    control = ControlClient(
        config.control,
        address=learner_address(config.control),
        generator_id=gid,
        backend=config.generator.backend.type,
        num_workers=backend.num_workers,
        vocab_size=backend.vocab_size,
        device=backend.device.type,
        auth_token=load_auth_token(config.control),
        run_id=config.run_id,
    )
    gen = GeneratorLoop(
        config,
        gid,
        backend=backend,
        transport=transport,
        control=control,
        metrics=metrics,
        store_host=store_host_override(),
    )
    port = serve_metrics(prom, config.metrics.host, config.metrics.generator_port)
    log.info("metrics on %s:%d/metrics", config.metrics.host, port)

    def _graceful(signum: int, _frame: object) -> None:
        log.info("signal %d: finishing the current batch and stopping", signum)
        gen.stop.set()

    signal.signal(signal.SIGTERM, _graceful)
    signal.signal(signal.SIGINT, _graceful)
    gen.run()
    if gen.failed:
        raise SystemExit(1)
