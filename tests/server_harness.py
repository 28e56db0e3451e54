"""Starts a real `tokenmill serve` on 127.0.0.1 (API process + worker processes) for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.2) -> float:
    """Poll until `predicate()` is true; the seconds it took. AssertionError naming `what` after `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(interval)
    raise AssertionError(f"not {what} within {timeout:g} s")


def model_entry(source: str | Path, name: str = "tiny", **overrides: Any) -> dict[str, Any]:
    """A registry entry for a test model: float32 (exact against transformers) and a small KV cache."""
    return {"name": name, "source": str(source), "dtype": "float32", "kv_cache_memory": "8MiB", **overrides}


def write_registry(path: Path, entries: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"models": entries}, sort_keys=False))
    return path


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=kwargs.pop("timeout", 120.0), **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)


def start_server(
    registry: Path, log_dir: Path, *args: str, env: dict[str, str] | None = None, ready_timeout: float = 300.0
) -> Server:
    """Start the server and wait until /ready says every model can serve (fails with the server's log if not)."""
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    cmd = [sys.executable, "-m", "app.cli", "serve", "--models", str(registry), "--port", str(port), *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("wb") as log:
        process = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    server = Server(process, port, log_path)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()[-4000:]}")
        try:
            if httpx.get(f"{server.base_url}/ready", timeout=2.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"server not ready after {ready_timeout} s:\n{server.log()[-4000:]}")


def worker_pids(server: Server) -> dict[str, int]:
    """The live worker process of each model, by model name (an exited worker may linger a moment as a zombie)."""
    pids: dict[str, int] = {}
    for proc in psutil.Process(server.process.pid).children(recursive=True):
        try:
            cmdline = proc.cmdline()
            if "--model" in cmdline and proc.status() != psutil.STATUS_ZOMBIE:
                pids[cmdline[cmdline.index("--model") + 1]] = proc.pid
        except psutil.Error:
            continue
    return pids
