"""How to start one configuration of a server under test, and the context manager that starts it, waits for it to
be ready and stops its whole process tree."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtests.bench_server import REPO, wait_ready


@dataclass(frozen=True)
class Server:
    """One server configuration: its command line, the request fields that force `max_tokens` output tokens, and
    what the report says about its weights."""

    name: str
    weights: str
    command: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)  # added to this process's environment
    model: str = "smollm2"
    extra: dict[str, Any] = field(default_factory=lambda: {"ignore_eos": True})  # None: leave the field out
    ready_path: str = "/health"
    ready_timeout: float = 900.0  # vLLM compiles its kernels on first start (about 4 minutes on 2 cores)
    max_concurrency: int | None = None  # higher levels are skipped (the naive server's one-at-a-time pace)
    prepare: Callable[[], None] | None = field(default=None, compare=False)  # files it needs first (a conversion)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass(frozen=True)
class Peer:
    """A peer: installs itself (idempotent) under a cache directory and lists its server configurations."""

    name: str
    install: Callable[[Path], None]
    installed: Callable[[Path], bool]
    servers: Callable[[Path, int], list[Server]]  # (cache directory, port)
    # (cache directory, port, a model directory with safetensors and tokenizer, e.g. loadtests.dummy_models'), served
    # under the directory's name; None: the peer serves the default model only
    directory_servers: Callable[[Path, int, Path], list[Server]] | None = None

    def serve(self, cache: Path, port: int, config: str | None, directory: Path | None = None) -> int:
        """Runs one configuration (the first by default) of the default model, or of `directory`'s, in the
        foreground until interrupted."""
        if not self.installed(cache):
            print(f"{self.name} is not installed; python -m loadtests.peers install {self.name}", file=sys.stderr)
            return 1
        if directory is None:
            configs = self.servers(cache, port)
        elif self.directory_servers is not None:
            configs = self.directory_servers(cache, port, directory)
        else:
            print(f"{self.name} serves the default model only", file=sys.stderr)
            return 2
        chosen = next((s for s in configs if s.name == config), None) if config else configs[0]
        if chosen is None:
            print(f"no configuration {config}; choose from {', '.join(s.name for s in configs)}", file=sys.stderr)
            return 2
        if chosen.prepare is not None:
            chosen.prepare()
        print(f"{chosen.name} on {chosen.url}: {' '.join(chosen.command)}", flush=True)
        try:
            return subprocess.run(chosen.command, cwd=REPO, env={**os.environ, **chosen.env}).returncode
        except KeyboardInterrupt:
            return 0

    def main(self, cache: Path, argv: list[str] | None = None) -> int:
        """`python -m loadtests.peers.<module> install | serve [--port N] [--config NAME] [--model-dir DIR]`."""
        parser = argparse.ArgumentParser(prog=f"{self.name} peer")
        parser.add_argument("action", choices=["install", "serve"])
        parser.add_argument("--port", type=int, default=8400)
        parser.add_argument("--config", default=None, help="a configuration name (default: the first)")
        parser.add_argument(
            "--model-dir", type=Path, default=None, help="serve this model directory (default: the default model)"
        )
        args = parser.parse_args(argv)
        if args.action == "install":
            self.install(cache)
            return 0
        return self.serve(cache, args.port, args.config, args.model_dir)


@contextlib.contextmanager
def serving(server: Server, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`server` started (output to `log`) and ready. On exit it is terminated, then anything left of its process
    group (engine processes some servers fork) is killed."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        process = subprocess.Popen(
            server.command,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **server.env},
            start_new_session=True,  # its own process group, so its children can be found and stopped
        )
        try:
            try:
                wait_ready(server.url, server.ready_timeout, path=server.ready_path, process=process)
            except RuntimeError as exc:
                raise RuntimeError(f"{server.name}: {exc}; see {log}") from exc
            yield process
        finally:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
