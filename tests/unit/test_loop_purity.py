"""The service loops decide, the composition roots wire: no loop reaches Redis, gRPC or sockets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from importcheck import imported_roots

SERVICES = Path(__file__).resolve().parents[2] / "services"
LOOPS = [
    SERVICES / "learner" / "loop.py",
    SERVICES / "learner" / "loop_parts.py",
    SERVICES / "generator" / "loop.py",
]
FORBIDDEN = {"redis", "grpc", "grpc_health", "socket", "subprocess", "http"}


def test_loop_sources_import_no_network_module() -> None:
    offenders = {str(p): sorted(imported_roots(p) & FORBIDDEN) for p in LOOPS}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_the_loops_loads_no_redis_or_grpc() -> None:
    """Transitively too: whatever the loops import must not pull a network client in."""
    code = (
        "import sys\n"
        "import services.learner.loop, services.generator.loop\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('redis', 'grpc', 'grpc_health'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_loops_name_no_adapter_module() -> None:
    """The loops know the interfaces, not the adapters (services.transport, weight_sync, the
    gRPC server and client)."""
    adapters = (
        "services.transport",
        "services.weight_sync",
        "services.learner.server",
        "services.generator.control_client",
        "services.common.grpc_status",
    )
    for path in LOOPS:
        text = path.read_text()
        assert not [a for a in adapters if f"from {a}" in text or f"import {a}" in text], path
