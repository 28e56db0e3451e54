"""loadtests.embed_load's inputs: texts of exactly the stated number of tokens, the same on every side."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from loadtests.embed_load import texts, whole_words
from worker.loader import LoadedModel


@pytest.mark.parametrize("length", [32, 128, 512])
def test_each_text_is_exactly_its_length_in_tokens(minilm: LoadedModel, length: int) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(minilm.weights_path))
    batch = texts(whole_words(tokenizer), length, 20)
    assert len(set(batch)) == 20
    assert [len(ids) for ids in tokenizer(batch)["input_ids"]] == [length] * 20
    assert batch == texts(whole_words(tokenizer), length, 20)  # seeded: every server gets the same texts
