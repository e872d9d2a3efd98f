"""A `maxjax serve` process for a test module: a free port, its log, ready once `/health` is 200, killed at the end."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log_path: Path
    health_codes: list[int] = field(default_factory=list)  # the /health answers seen while it started

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def running_server(args: list[str], log_dir: Path, *, port: int | None = None, cwd: Path = ROOT,
                   env: dict[str, str] | None = None, load_timeout_s: float = 600) -> Iterator[Server]:
    """``python -m maxjax serve --port PORT *args`` (``--port`` added unless ``args`` has it), yielded once
    ``/health`` answers 200; killed when the block ends. ``load_timeout_s`` only guards against a hang."""
    import httpx

    port = port or free_port()
    command = [sys.executable, "-m", "maxjax", "serve", *([] if "--port" in args else ["--port", str(port)]), *args]
    env = {**(os.environ if env is None else env), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    log_path = log_dir / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        server = Server(proc, port, log_path)
        try:
            deadline = time.monotonic() + load_timeout_s
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
                try:
                    server.health_codes.append(httpx.get(f"{server.base}/health", timeout=2).status_code)
                    if server.health_codes[-1] == 200:
                        break
                except httpx.HTTPError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    pytest.fail(f"server not ready after {load_timeout_s} s:\n{log_path.read_text()[-4000:]}")
                time.sleep(0.5)  # 503 {"status": "loading"} while the models load
            yield server
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
