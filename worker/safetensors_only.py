"""Weights load from safetensors only, unless their models.yaml entry sets `trust_pickle`: unpickling a file can run
any code in it. One check, and one message, for a model's directory and a LoRA adapter's."""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

from worker.registry import ModelEntry

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_safetensors(entry: ModelEntry, directory: Path, missing: str, weights: str = "*.safetensors") -> None:
    """Raise unless `directory` holds safetensors weights (files named like `weights`); `missing` says what to do
    when it holds no weights at all."""
    names = [p.name for p in directory.iterdir()]
    if any(fnmatch(name, weights) for name in names):
        return
    pickled = sorted(name for name in names if name.endswith(PICKLE_SUFFIXES))
    if pickled:
        raise ValueError(
            f"model '{entry.name}': {directory} has only pickle weights ({', '.join(pickled)}); tokenmill loads "
            "safetensors only, since unpickling can run code. Convert them to safetensors, or set trust_pickle: true "
            "on the entry if you trust their origin."
        )
    raise FileNotFoundError(f"model '{entry.name}': {directory} has no {weights} weights; {missing}")
