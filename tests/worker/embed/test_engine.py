"""The embedding engine against sentence-transformers' `encode` of the same model (all-MiniLM-L6-v2, float32), and a
causal LM's last-token vectors against transformers' own forward; its batching by token budget and padding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from tests.conftest import minilm_entry, tiny_entry
from worker.embed.engine import EmbedEngine, EmbedRequest, batches
from worker.loader import LoadedModel, load_model
from worker.messages import InvalidRequest, RequestOutput, SamplingParams

TEXTS = [
    "A cat sat on the mat.",
    "Retrieval-augmented generation embeds document chunks, retrieves the nearest ones and sends them as context.",
    "x",
    "Paged KV caches keep keys and values in fixed-size blocks so that memory is not fragmented by long prompts.",
]
LONG = " ".join(f"word{i} and some filler text" for i in range(200))  # far past MiniLM's 256 tokens


def vectors(outputs: list[RequestOutput]) -> dict[str, np.ndarray]:
    assert all(o.finish_reason == "stop" and o.embedding is not None for o in outputs), outputs
    return {o.request_id: np.frombuffer(o.embedding or b"", dtype="<f4") for o in outputs}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_vectors_equal_sentence_transformers_for_mixed_lengths_in_one_step(
    minilm: LoadedModel, sentence_transformer: Any
) -> None:
    engine = EmbedEngine.from_loaded(minilm, minilm_entry())
    assert engine.max_model_len == 256  # sentence-transformers' max_seq_length, below BERT's 512 positions
    tokenizer = minilm.tokenizer
    at_limit = tokenizer(LONG, truncation=True, max_length=256)["input_ids"]
    assert len(at_limit) == 256
    inputs = [tokenizer(t)["input_ids"] for t in TEXTS] + [at_limit]
    for i, ids in enumerate(inputs):
        engine.add_request(f"r{i}", ids, SamplingParams())
    out = engine.step()
    assert not engine.has_work()  # every input in one step, in more than one padded batch
    got = vectors(out.outputs)
    expected = sentence_transformer.encode([*TEXTS, LONG], convert_to_numpy=True)
    for i in range(len(inputs)):
        assert cosine(got[f"r{i}"], expected[i]) > 0.9999
        assert np.abs(got[f"r{i}"] - expected[i]).max() < 1e-4
        assert abs(np.linalg.norm(got[f"r{i}"]) - 1) < 1e-5  # the model's Normalize module
    assert {o.request_id: o.num_prompt_tokens for o in out.outputs} == {
        f"r{i}": len(ids) for i, ids in enumerate(inputs)
    }


def test_bfloat16_stays_close_to_the_float32_reference(sentence_transformer: Any) -> None:
    loaded = load_model(minilm_entry(dtype="bfloat16"))
    engine = EmbedEngine.from_loaded(loaded, minilm_entry(dtype="bfloat16"))
    for i, text in enumerate(TEXTS):
        engine.add_request(f"r{i}", loaded.tokenizer(text)["input_ids"], SamplingParams())
    got = vectors(engine.step().outputs)
    expected = sentence_transformer.encode(TEXTS, convert_to_numpy=True)
    assert min(cosine(got[f"r{i}"], expected[i]) for i in range(len(TEXTS))) > 0.99


def test_a_causal_lm_embeds_its_last_token_normalized(tiny_llama_dir: Path) -> None:
    entry = tiny_entry(tiny_llama_dir, task="embed")
    loaded = load_model(entry)
    engine = EmbedEngine.from_loaded(loaded, entry)
    assert (engine.pooling.mode, engine.pooling.normalize) == ("last", True)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}", ids, SamplingParams())
    got = vectors(engine.step().outputs)
    reference = AutoModel.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    for i, ids in enumerate(prompts):
        with torch.no_grad():
            hidden = reference(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        assert np.allclose(got[f"r{i}"], F.normalize(hidden, dim=0).numpy(), atol=1e-5)


def test_a_step_takes_the_oldest_inputs_that_fit_its_token_budget(tiny_llama_dir: Path) -> None:
    entry = tiny_entry(tiny_llama_dir, task="embed", max_model_len=64, max_num_batched_tokens=64, max_num_seqs=3)
    engine = EmbedEngine.from_loaded(load_model(entry), entry)
    sizes = [30, 30, 10, 5, 5, 5]
    for i, size in enumerate(sizes):
        engine.add_request(f"r{i}", [7] * size, SamplingParams())
    steps = [sorted(o.request_id for o in engine.step().outputs) for _ in range(3)]
    # 30 + 30 fit 64 tokens and 10 more would not; then three of the short ones (max_num_seqs); then the last
    assert steps == [["r0", "r1"], ["r2", "r3", "r4"], ["r5"]]
    assert not engine.has_work()


def test_batches_are_cut_where_padding_would_pass_a_quarter_of_their_tokens() -> None:
    def request(size: int) -> EmbedRequest:
        return EmbedRequest(f"{size}", [1] * size, 0.0)

    cut = batches([request(s) for s in (10, 10, 11, 12, 30, 31, 100)])
    assert [[len(r.token_ids) for r in batch] for batch in cut] == [[10, 10, 11, 12], [30, 31], [100]]


def test_aborted_and_invalid_inputs(tiny_llama_dir: Path) -> None:
    entry = tiny_entry(tiny_llama_dir, task="embed", max_model_len=32)
    engine = EmbedEngine.from_loaded(load_model(entry), entry)
    with pytest.raises(InvalidRequest, match="33 tokens; this model takes 32"):
        engine.add_request("long", [7] * 33, SamplingParams())
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        engine.add_request("bad", [engine.vocab_size], SamplingParams())
    with pytest.raises(InvalidRequest, match="empty"):
        engine.add_request("empty", [], SamplingParams())
    engine.add_request("a", [7, 8], SamplingParams())
    engine.add_request("b", [7, 8], SamplingParams())
    engine.abort(["a"])
    out = {o.request_id: o for o in engine.step().outputs}
    assert out["a"].finish_reason == "abort" and out["a"].embedding is None
    assert out["b"].finish_reason == "stop" and out["b"].embedding is not None


def test_a_failing_forward_fails_its_inputs_and_the_engine_goes_on(tiny_llama_dir: Path) -> None:
    entry = tiny_entry(tiny_llama_dir, task="embed")
    engine = EmbedEngine.from_loaded(load_model(entry), entry)

    def fail(prompts: list[list[int]]) -> None:
        if [9, 9] in prompts:
            raise RuntimeError("injected")

    engine.fault_hook = fail
    engine.add_request("bad", [9, 9], SamplingParams())
    failed = engine.step().outputs
    assert [(o.request_id, o.finish_reason, o.error_code) for o in failed] == [("bad", "error", "model_error")]
    engine.add_request("good", [7, 8], SamplingParams())
    assert engine.step().outputs[0].embedding is not None


def test_tokenizer_of_the_cached_directory_is_the_models(minilm: LoadedModel) -> None:
    """The API process tokenizes from the worker's directory: the unpacked zip holds tokenizer.json."""
    assert (minilm.weights_path / "tokenizer.json").is_file()
    assert AutoTokenizer.from_pretrained(minilm.weights_path)("hi")["input_ids"] == [101, 7632, 102]
