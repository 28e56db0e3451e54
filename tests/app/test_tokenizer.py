"""The API process's tokenizer reads tokenizer.json as transformers does: the padding and truncation a file was saved
with are not applied to a prompt, and truncation on request keeps the special tokens."""

from __future__ import annotations

import json

from transformers import AutoTokenizer

from app.tokenizer import Tokenizer
from worker.loader import LoadedModel

TEXT = "The quick brown fox jumps over the lazy dog, again and again."


def test_a_saved_padding_and_truncation_are_not_applied(minilm: LoadedModel) -> None:
    directory = minilm.weights_path
    saved = json.loads((directory / "tokenizer.json").read_text())
    assert saved["padding"] and saved["truncation"]["max_length"] == 128  # MiniLM's file pads and cuts at 128
    ours, theirs = Tokenizer.from_dir(directory), AutoTokenizer.from_pretrained(directory)
    long = " ".join([TEXT] * 40)
    for text in (TEXT, long):
        assert ours.encode(text) == theirs(text)["input_ids"]
    assert len(ours.encode(long)) > 300  # no truncation either


def test_truncation_keeps_the_last_tokens_and_the_special_ones(minilm: LoadedModel) -> None:
    tokenizer = Tokenizer.from_dir(minilm.weights_path)
    full = tokenizer.encode(TEXT)
    [short, whole] = tokenizer.encode_truncated([TEXT, "dog"], 6)
    assert short == [full[0], *full[-5:-1], full[-1]]  # [CLS], the last four words' tokens, [SEP]
    assert whole == tokenizer.encode("dog")
