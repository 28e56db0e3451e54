"""Starts a worker process and hands back its connected socket. Torch-free, so the API process can use it.

The API process listens on a Unix-domain socket in a private (0700) directory; the worker connects to it.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from worker import transport
from worker.messages import FromWorker, ModelInfo, WorkerError


class WorkerStartError(RuntimeError):
    pass


@dataclass
class WorkerHandle:
    process: subprocess.Popen[bytes]
    sock: socket.socket
    info: ModelInfo
    socket_dir: Path

    def close(self, timeout: float = 10.0) -> int:
        """Ask the worker to stop, wait for it, and clean up; returns its exit code."""
        try:
            self.sock.close()
        finally:
            try:
                code = self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                code = self.process.wait()
            _remove_dir(self.socket_dir)
        return code


def start_worker(
    models: str | Path,
    model: str,
    *,
    cache_dir: str | Path | None = None,
    start_timeout: float = 600.0,
    heartbeat_seconds: float = 1.0,
) -> WorkerHandle:
    socket_dir = Path(tempfile.mkdtemp(prefix="tokenmill-"))
    os.chmod(socket_dir, 0o700)
    path = socket_dir / "worker.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(1)
    cmd = [sys.executable, "-m", "worker", "--models", str(models), "--model", model, "--socket", str(path)]
    cmd += ["--heartbeat-seconds", str(heartbeat_seconds)]
    cmd += ["--log-level", logging.getLevelName(logging.getLogger().getEffectiveLevel())]  # the API process's
    if cache_dir is not None:
        cmd += ["--cache-dir", str(cache_dir)]
    process = subprocess.Popen(cmd)
    try:
        sock = _accept(listener, process, start_timeout)
        sock.settimeout(start_timeout)
        first: FromWorker = transport.recv(sock, transport.from_worker_decoder)
        sock.settimeout(None)
    except (OSError, transport.ConnectionClosed, WorkerStartError) as exc:
        process.kill()
        process.wait()
        _remove_dir(socket_dir)
        raise WorkerStartError(f"worker for '{model}' did not start: {exc}") from exc
    finally:
        listener.close()
    if isinstance(first, WorkerError):
        process.wait()
        _remove_dir(socket_dir)
        raise WorkerStartError(f"worker for '{model}' failed: {first.message}")
    if not isinstance(first, ModelInfo):
        process.kill()
        raise WorkerStartError(f"worker for '{model}' sent {type(first).__name__} before ModelInfo")
    return WorkerHandle(process, sock, first, socket_dir)


def _accept(listener: socket.socket, process: subprocess.Popen[bytes], timeout: float) -> socket.socket:
    """Wait for the worker to connect, noticing at once if it died first."""
    listener.settimeout(0.2)
    deadline = time.monotonic() + timeout
    while True:
        try:
            return listener.accept()[0]
        except TimeoutError:
            if process.poll() is not None:
                raise WorkerStartError(f"exited with code {process.returncode} before connecting") from None
            if time.monotonic() > deadline:
                raise


def _remove_dir(path: Path) -> None:
    for child in path.iterdir():
        child.unlink(missing_ok=True)
    path.rmdir()
