"""A `conveyor serve` process seen from outside: wait until it is healthy, stop it."""

from __future__ import annotations

import contextlib
import subprocess
import time

import httpx


def wait_healthy(base_url: str, proc: subprocess.Popen, timeout: float,
                 poll_s: float = 0.2) -> None:
    """Return once `base_url`/health answers 200; RuntimeError if `proc` exits first,
    TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                return
        time.sleep(poll_s)
    raise TimeoutError(f"server not healthy after {timeout:g} s")


def stop_process(proc: subprocess.Popen, timeout: float) -> int:
    """SIGTERM (the server drains), then its exit code; killed if it does not exit in time."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
