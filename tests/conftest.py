"""Shared fixtures: free loopback ports and real redis-server processes.

``redis_server`` is a private redis-server on a free loopback port with AOF persistence in the
test's tmp_path; ``redis_server.restart()`` stops it by PID (SIGTERM) and starts it again on the
same port and directory, keeping the data. ``redis_server_factory`` starts more (or with a
password). Every server is stopped by PID at teardown.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

REDIS_START_TIMEOUT_S = 20.0
REDIS_STOP_TIMEOUT_S = 20.0


def _pick_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def free_port() -> Callable[[], int]:
    """A function returning a loopback TCP port that was free when it was called."""
    return _pick_free_port


class RedisServer:
    """A redis-server child process bound to 127.0.0.1, persisting to ``dir`` with AOF."""

    def __init__(self, binary: str, dir: Path, port: int, password: str | None = None) -> None:
        self.binary = binary
        self.dir = dir
        self.port = port
        self.password = password
        self.log_path = dir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"redis-server on port {self.port} is not running")
        return self.proc.pid

    def client(self) -> redis.Redis:
        """A plain redis-py client (raw bytes) for poking at the server directly."""
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password)

    def start(self) -> None:
        if self.proc is not None:
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--dir",
            str(self.dir),
            "--logfile",
            str(self.log_path),
            "--daemonize",
            "no",
        ]
        if self.password is not None:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while True:
            code = self.proc.poll()
            if code is not None:
                stderr = (
                    self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                )
                self.proc = None
                raise RuntimeError(
                    f"redis-server on port {self.port} exited with code {code} at start:\n"
                    f"{stderr}{self._log_tail()}"
                )
            try:
                with self.client() as c:
                    c.ping()
                return
            except redis.exceptions.BusyLoadingError:
                pass
            except redis.exceptions.ConnectionError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"redis-server on port {self.port} did not answer PING within "
                    f"{REDIS_START_TIMEOUT_S}s:\n{self._log_tail()}"
                )
            time.sleep(0.02)

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return ""

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the process by PID and wait for it; SIGTERM makes Redis flush the AOF first."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=REDIS_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def kill(self) -> None:
        """SIGKILL: a crash, without a final AOF flush."""
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        """Stop by PID and start again on the same port and directory; AOF keeps the data."""
        self.stop()
        self.start()


def _redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server was not found on PATH; the integration tests need a real Redis "
            "(install it, e.g. `apt-get install redis-server`)",
            pytrace=False,
        )
    return binary


@pytest.fixture
def redis_server_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """A function ``make(password=None) -> RedisServer`` starting servers that are stopped at
    teardown; each gets its own directory under tmp_path."""
    binary = _redis_binary()
    servers: list[RedisServer] = []

    def make(password: str | None = None) -> RedisServer:
        for _attempt in range(5):
            data_dir = tmp_path / f"redis-{len(servers)}"
            data_dir.mkdir(exist_ok=True)
            server = RedisServer(binary, data_dir, _pick_free_port(), password)
            servers.append(server)
            try:
                server.start()
                return server
            except RuntimeError as e:
                # Another process can take the port between picking and binding it.
                if "Address already in use" not in str(e):
                    raise
        raise RuntimeError("could not start redis-server on a free port after 5 tries")

    yield make
    for server in servers:
        with contextlib.suppress(ProcessLookupError):
            server.stop()


@pytest.fixture
def redis_server(redis_server_factory: Callable[..., RedisServer]) -> RedisServer:
    """A private redis-server on a free loopback port (no password, AOF on)."""
    return redis_server_factory()
