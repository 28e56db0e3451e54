"""`quantization: gguf` on the real default model: the file's own blocks found for every projection, the embedding and
the head, in the row order transformers loads; and the engine computing from them gives transformers' greedy tokens
(float32, the same weights), under concurrency, chunked prefill and prefix hits."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import cast

import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from tests.worker.engine_harness import reference, run_all
from tests.worker.test_smollm2 import QUESTIONS, TIE, top_two_gap
from worker import gguf_weights, native
from worker.engine import Engine
from worker.llama_forward import BlockProjection
from worker.loader import load_model, resolve_source
from worker.messages import SamplingParams
from worker.registry import DEFAULT_SOURCE, ModelEntry

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(native.library() is None, reason="no AVX-512 or no C compiler: the blocks are not used"),
]

NAMES = {code: name for name, code in gguf_weights.CODES.items()}


@pytest.fixture(scope="module")
def model(smollm2_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    return Path(resolve_source(DEFAULT_SOURCE))


def decoded(rows: gguf_weights.QuantizedRows) -> torch.Tensor:
    weights = dequantize(rows.blocks.numpy(), GGMLQuantizationType[NAMES[rows.code]])
    return torch.from_numpy(weights.reshape(rows.rows, rows.cols))


def test_every_projection_the_embedding_and_the_head_are_read_in_the_loaded_row_order(
    model: PreTrainedModel, gguf_file: Path
) -> None:
    found = gguf_weights.read(gguf_file, model)
    layers = model.config.num_hidden_layers
    assert len(found) == 7 * layers + 2
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight", "lm_head.weight"]:
        assert torch.equal(decoded(found[name]), params[name]), name
    assert found["lm_head.weight"] is found["model.embed_tokens.weight"]  # tied: one copy of the blocks
    assert (
        NAMES[found["lm_head.weight"].code] == "Q8_0"
        and NAMES[found["model.layers.3.mlp.up_proj.weight"].code] == "Q4_1"
    )


def test_a_weight_that_differs_from_its_blocks_is_left_as_loaded(model: PreTrainedModel, gguf_file: Path) -> None:
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.model.layers[3].mlp.down_proj.weight[5, 7] += 1e-3
    found = gguf_weights.read(gguf_file, changed)
    assert "model.layers.3.mlp.down_proj.weight" not in found
    assert "model.layers.3.mlp.up_proj.weight" in found and "model.layers.2.mlp.down_proj.weight" in found


def test_the_engine_on_the_files_blocks_gives_generates_tokens(model: PreTrainedModel) -> None:
    entry = ModelEntry(name="smollm2", source=DEFAULT_SOURCE, quantization="gguf", device="cpu", kv_cache_memory=2**26)
    loaded = load_model(entry)
    assert loaded.dtype == torch.float32 and loaded.gguf_blocks
    engine = Engine.from_loaded(loaded, entry)
    lean = engine.runner.lean
    assert lean is not None and isinstance(lean.layers[0].qkv, BlockProjection) and not loaded.gguf_blocks
    assert isinstance(lean.lm_head, BlockProjection)
    left = [name for name, p in loaded.model.named_parameters() if p.device.type != "meta" and p.dim() == 2]
    assert left == []  # no float32 copy of any matrix is kept
    engine.scheduler.max_num_batched_tokens = 40  # prompts of 30-60 tokens: several are prefilled in chunks
    tokenizer = AutoTokenizer.from_pretrained(loaded.weights_path)
    prompts = {
        f"q{i}": cast(
            list[int],
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, return_dict=False
            ),
        )
        for i, q in enumerate(QUESTIONS)
    }
    params = SamplingParams(max_tokens=24, temperature=0.0)
    first = run_all(engine, prompts, params)
    hits = engine.stats().prefix_cache_hits
    again = run_all(engine, {f"again-{rid}": prompt for rid, prompt in prompts.items()}, params)
    assert engine.stats().prefix_cache_hits > hits
    for rid, prompt in prompts.items():
        want = reference(model, prompt, 24)
        for got in (first.tokens[rid], again.tokens[f"again-{rid}"]):
            if got == want:
                continue
            at = next(i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b)
            gap = top_two_gap(model, prompt + want[:at])
            assert gap < TIE, f"{rid}: diverged at token {at} where the reference's top two differ by {gap:.2e}"
