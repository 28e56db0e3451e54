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

# Parameter counts of the published models (their model cards: 1.24B, 8.03B, 7.62B)
PUBLISHED = {"llama-3.2-1b": 1_235_814_400, "llama-3.1-8b": 8_030_261_248, "qwen2.5-7b": 7_615_616_512}


@pytest.mark.parametrize("name", dummy_models.NAMES)
def test_configs_have_the_published_models_sizes(name: str) -> None:
    config = AutoConfig.from_pretrained(dummy_models.CONFIGS / name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]


def test_a_prepared_model_loads_with_random_weights_and_generates(tmp_path: Path) -> None:
    """The 1B config at one layer and a narrow width (its vocabulary kept), through the registry, loader and engine."""
    tokenizer = dummy_models.default_tokenizer()
    narrow = {"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}
    directory = dummy_models.prepare("llama-3.2-1b", tmp_path, tokenizer, **narrow, num_key_value_heads=2, head_dim=16)
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
