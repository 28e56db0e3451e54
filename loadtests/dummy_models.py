"""Models of realistic size with random weights, for benchmarks on a machine that cannot download (the GPU machine):
the configs of SmolLM2-135M-Instruct (the default model's shapes), Qwen2.5-0.5B-Instruct, Llama-3.2-1B, Llama-3.2-3B,
Llama-3.1-8B and Qwen2.5-7B as published (`dummy_configs/`), each made into a model directory with the default model's
tokenizer (SmolLM2's 49,152 ids all lie inside these vocabularies), and a registry that serves them with
`load_format: dummy`.

    python -m loadtests.dummy_models --out /tmp/dummy [--device cuda] [--names llama-3.2-1b ...] [--weights]

writes /tmp/dummy/NAME/ for each and /tmp/dummy/models.yaml. With --weights the random weights are made here, from
a fixed seed, and saved as safetensors in the directory (and the registry loads them): every server under test,
tokenmill, vLLM or llama.cpp through its converter, then computes with the same numbers. Outputs are random text:
for throughput and latency, with `ignore_eos`, never for quality.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from worker.loader import resolve_source
from worker.registry import DEFAULT_SOURCE

CONFIGS = Path(__file__).resolve().parent / "dummy_configs"
NAMES = sorted(path.name for path in CONFIGS.iterdir() if (path / "config.json").is_file())
MAX_MODEL_LEN = (
    8192  # the configs allow 32k-128k positions; a benchmark needs a few thousand, and the KV pool its share
)
SEED = 1234


def default_tokenizer() -> PreTrainedTokenizerBase:
    """The default model's tokenizer, read from its GGUF file (no conversion of the weights)."""
    gguf = Path(resolve_source(DEFAULT_SOURCE))
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return tokenizer


def prepare(name: str, out: Path, tokenizer: PreTrainedTokenizerBase, **overrides: Any) -> Path:
    """out/name: the config (with `overrides`, e.g. fewer layers for a test) and the tokenizer's files."""
    config = json.loads((CONFIGS / name / "config.json").read_text())
    config.update(overrides)
    if len(tokenizer) > config["vocab_size"]:
        raise ValueError(f"{name}: the tokenizer has {len(tokenizer)} tokens, the vocabulary {config['vocab_size']}")
    directory = out / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(directory)
    return directory


def save_weights(directory: Path, dtype: str, seed: int = SEED) -> Path:
    """The config's model with random weights from `seed` (transformers' own initialization), saved as safetensors."""
    config = AutoConfig.from_pretrained(directory)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config.eos_token_id = None  # outputs are random text: no stop but max_tokens
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def write_registry(
    directories: list[Path], path: Path, device: str = "cuda", dtype: str = "bfloat16", weights: bool = False
) -> Path:
    """A models.yaml serving each directory under its own name: random weights of the config's shapes made at load,
    or (`weights`) the ones saved in the directory."""
    models = [
        {
            "name": directory.name,
            "source": str(directory),
            "load_format": "auto" if weights else "dummy",
            "dtype": dtype,
            "device": device,
            "max_model_len": MAX_MODEL_LEN,
        }
        for directory in directories
    ]
    path.write_text(yaml.safe_dump({"models": models}, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--names", nargs="+", choices=NAMES, default=NAMES)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--weights", action="store_true", help="save seeded random weights as safetensors")
    args = parser.parse_args(argv)
    tokenizer = default_tokenizer()
    directories = [prepare(name, args.out, tokenizer) for name in args.names]
    if args.weights:
        for directory in directories:
            print(save_weights(directory, args.dtype), flush=True)
    print(write_registry(directories, args.out / "models.yaml", args.device, args.dtype, args.weights))
    return 0


if __name__ == "__main__":
    sys.exit(main())
