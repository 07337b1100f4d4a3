"""lpreg_core is a library: no service code, no processes, no sockets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from importcheck import imported_roots

CORE = Path(__file__).resolve().parents[2] / "lpreg_core"
FORBIDDEN = {
    "services",
    "subprocess",
    "socket",
    "multiprocessing",
    "grpc",
    "redis",
    "requests",
    "http",
}


def test_core_sources_import_nothing_that_talks_to_the_outside() -> None:
    offenders = {
        str(p.relative_to(CORE)): sorted(imported_roots(p) & FORBIDDEN)
        for p in CORE.rglob("*.py")
        if "wire" not in p.parts  # generated protobuf code; its *_grpc stubs serve services/
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_the_core_loads_no_service_or_network_client() -> None:
    modules = [f"lpreg_core.{p.stem}" for p in CORE.glob("*.py") if p.stem != "__init__"]
    modules += [f"lpreg_core.{p.parent.name}" for p in CORE.glob("*/__init__.py")]
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + "bad = [m for m in sys.modules if m.split('.')[0] in ('services', 'grpc', 'redis')]\n"
        + "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_config_tree_loads_without_torch() -> None:
    """Reading and validating a config (the CLI, every service's start-up) needs no torch."""
    code = (
        "import sys, lpreg_core.config, lpreg_core.loss_config\n"
        "lpreg_core.config.RunConfig()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
