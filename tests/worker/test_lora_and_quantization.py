"""LoRA merged at load equals peft's unmerged model; the merge is cached; bitsandbytes int8 / nf4 / fp4 load, shrink the
weights and still answer sensibly through the engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from tests.conftest import tiny_entry
from tests.worker.engine_harness import random_prompts, run_all
from worker.engine import Engine
from worker.loader import load_model
from worker.messages import SamplingParams
from worker.registry import LoraSpec

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with random, non-zero A and B (a freshly initialized adapter would be a no-op)."""
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    model = peft.get_peft_model(base, config)
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path)
    return path


def greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return [int(t) for t in out[0, len(prompt) :]]


def test_merged_lora_equals_unmerged_peft_and_is_cached(
    tiny_llama_dir: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    unmerged = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    prompts = random_prompts(int(plain.config.vocab_size), [5, 11, 17], seed=4)

    entry = tiny_entry(tiny_llama_dir, lora=LoraSpec(adapter=str(adapter_dir)))
    first = load_model(entry, tmp_path)
    assert first.converted and first.weights_path.parent == tmp_path / "merged"
    engine = Engine.from_loaded(first, entry.model_copy(update={"kv_cache_memory": 1 << 22}))
    run = run_all(engine, prompts, SamplingParams(max_tokens=10, temperature=0.0))
    for rid, prompt in prompts.items():
        assert run.tokens[rid] == greedy(unmerged, prompt, 10)
    assert any(run.tokens[rid] != greedy(plain, p, 10) for rid, p in prompts.items()), "the adapter changes nothing"

    second = load_model(entry, tmp_path)
    assert not second.converted and second.weights_path == first.weights_path
    again = run_all(
        Engine.from_loaded(second, entry.model_copy(update={"kv_cache_memory": 1 << 22})),
        prompts,
        SamplingParams(max_tokens=10, temperature=0.0),
    )
    assert again.tokens == run.tokens


def test_lora_scale_is_part_of_the_cache_key(tiny_llama_dir: Path, adapter_dir: Path, tmp_path: Path) -> None:
    one = load_model(tiny_entry(tiny_llama_dir, lora=LoraSpec(adapter=str(adapter_dir), scale=1.0)), tmp_path)
    two = load_model(tiny_entry(tiny_llama_dir, lora=LoraSpec(adapter=str(adapter_dir), scale=2.0)), tmp_path)
    assert one.weights_path != two.weights_path
    w1 = one.model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    w2 = two.model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert torch.allclose(w2 - base, 2 * (w1 - base), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["int8", "nf4", "fp4"])
def test_quantized_smollm2_answers_sensibly_and_is_smaller(smollm2_dir: Path, quantization: str) -> None:
    pytest.importorskip("bitsandbytes")
    entry = tiny_entry(smollm2_dir, name=f"smollm2-{quantization}", quantization=quantization)
    loaded = load_model(entry)
    full = cast(PreTrainedModel, AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32))
    assert loaded.model.get_memory_footprint() < 0.6 * full.get_memory_footprint()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = cast(list[int], tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
    engine = Engine.from_loaded(loaded, entry.model_copy(update={"kv_cache_memory": 1 << 24}))
    run = run_all(engine, {"q": prompt}, SamplingParams(max_tokens=12, temperature=0.0))
    assert "Paris" in tokenizer.decode(run.tokens["q"])
