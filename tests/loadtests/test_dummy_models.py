"""The benchmark models of realistic size: their configs are the published models', and a prepared directory loads
through the real loader with random weights and serves through the real engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from loadtests import dummy_models
from worker.engine import Engine
from worker.loader import load_model
from worker.messages import SamplingParams
from worker.registry import load_registry

# Parameter counts of the published models (their model cards: 0.49B, 1.24B, 3.21B, 8.03B, 7.62B)
PUBLISHED = {
    "smollm2-135m": 134_515_008,
    "qwen2.5-0.5b": 494_032_768,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "llama-3.1-8b": 8_030_261_248,
    "qwen2.5-7b": 7_615_616_512,
}
NARROW = {"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}


@pytest.mark.parametrize("name", dummy_models.NAMES)
def test_configs_have_the_published_models_sizes(name: str) -> None:
    config = AutoConfig.from_pretrained(dummy_models.CONFIGS / name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]


def test_a_prepared_model_loads_with_random_weights_and_generates(tmp_path: Path) -> None:
    """The 1B config at one layer and a narrow width (its vocabulary kept), through the registry, loader and engine."""
    tokenizer = dummy_models.default_tokenizer()
    directory = dummy_models.prepare("llama-3.2-1b", tmp_path, tokenizer, **NARROW, num_key_value_heads=2, head_dim=16)
    registry = dummy_models.write_registry([directory], tmp_path / "models.yaml", device="cpu", dtype="float32")
    entry = load_registry(registry).get("llama-3.2-1b")
    assert entry.load_format == "dummy" and entry.max_model_len == dummy_models.MAX_MODEL_LEN
    loaded = load_model(entry)
    assert loaded.model.config.vocab_size == 128256 and loaded.model.config.num_hidden_layers == 1
    assert loaded.max_model_len == dummy_models.MAX_MODEL_LEN
    engine = Engine.from_loaded(loaded, entry.model_copy(update={"kv_cache_memory": 16 << 20}))
    prompt = tokenizer.encode("Benchmarks need no downloads.")
    engine.add_request("r", prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    tokens: list[int] = []
    while engine.has_work():
        for output in engine.step().outputs:
            tokens.extend(output.new_token_ids)
    assert len(tokens) == 6 and all(0 <= t < 128256 for t in tokens)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="the tokenizer has 49152 tokens"):
        dummy_models.prepare("qwen2.5-7b", tmp_path, dummy_models.default_tokenizer(), vocab_size=1000)


def test_the_3b_config_loads_at_one_layer_through_the_registry(tmp_path: Path) -> None:
    """Llama-3.2-3B at its full width (3,072, 24 heads of 128), one layer: the loader and the engine take its shapes."""
    tokenizer = dummy_models.default_tokenizer()
    directory = dummy_models.prepare("llama-3.2-3b", tmp_path, tokenizer, num_hidden_layers=1)
    registry = dummy_models.write_registry([directory], tmp_path / "models.yaml", device="cpu", dtype="bfloat16")
    entry = load_registry(registry).get("llama-3.2-3b").model_copy(update={"kv_cache_memory": 64 << 20})
    loaded = load_model(entry)
    config = loaded.model.config
    assert (config.hidden_size, config.num_attention_heads, config.head_dim) == (3072, 24, 128)
    engine = Engine.from_loaded(loaded, entry)
    engine.add_request("r", tokenizer.encode("Three billion."), SamplingParams(max_tokens=2, ignore_eos=True))
    tokens = [t for _ in range(4) if engine.has_work() for out in engine.step().outputs for t in out.new_token_ids]
    assert len(tokens) == 2


def test_saved_weights_are_the_seeds_and_load_as_real_weights(tmp_path: Path) -> None:
    """Two directories saved from the same seed hold the same safetensors, and the registry loads them as they are."""
    tokenizer = dummy_models.default_tokenizer()
    small = {**NARROW, "num_key_value_heads": 2}
    first, second = (
        dummy_models.save_weights(dummy_models.prepare("qwen2.5-0.5b", tmp_path / tag, tokenizer, **small), "float32")
        for tag in ("a", "b")
    )
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    registry = dummy_models.write_registry([first], tmp_path / "models.yaml", "cpu", "float32", weights=True)
    entry = load_registry(registry).get("qwen2.5-0.5b")
    assert entry.load_format == "auto"
    loaded = load_model(entry)
    saved = AutoModelForCausalLM.from_pretrained(first, dtype=torch.float32)
    ours, theirs = loaded.model.state_dict(), saved.state_dict()
    assert torch.equal(ours["model.embed_tokens.weight"], theirs["model.embed_tokens.weight"])
