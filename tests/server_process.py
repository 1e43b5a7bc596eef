"""Start a real `conveyor serve` process on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from server.benchmarks.process import stop_process, wait_healthy

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model_dir: Path, *extra: str, ready_timeout: float = 180.0) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "server", "serve", "--model", str(model_dir),
               "--port", str(self.port), "--dtype", "float32", *extra]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        self.log = open(os.devnull, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float) -> None:
        try:
            wait_healthy(self.base_url, self.proc, timeout)
        except TimeoutError:
            self.stop()
            raise

    def stop(self, timeout: float = 20.0) -> int | None:
        code = stop_process(self.proc, timeout)
        self.log.close()
        return code


@contextlib.contextmanager
def running_server(model_dir: Path, *extra: str) -> Iterator[ServerProcess]:
    server = ServerProcess(model_dir, *extra)
    try:
        yield server
    finally:
        server.stop()
