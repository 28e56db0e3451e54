"""The incremental detokenizer: never a broken character, exactly the full decode, and stop strings never leaked."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from app.detokenizer import IncrementalDetokenizer
from app.tokenizer import Tokenizer as AppTokenizer

TEXTS = [
    "你好，世界！这是一个测试句子。",
    "Emoji: 🙂👍🏽 family 👨‍👩‍👧 flag 🇫🇷 done",
    "Ünïcödé mixed with 日本語のテキスト and ascii.",
    "def f(x):\n    return x  # two  spaces\n",
]


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def smollm2_app_tokenizer(smollm2_dir: Path) -> AppTokenizer:
    """The torch-free tokenizer the API process really uses."""
    return AppTokenizer.from_dir(smollm2_dir)


@pytest.fixture(params=["tiny_tokenizer", "smollm2_tokenizer", "smollm2_app_tokenizer"])
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    loaded: PreTrainedTokenizerBase = request.getfixturevalue(request.param)
    return loaded


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    ids: list[int] = tokenizer.encode(text, add_special_tokens=False)
    return ids


def stream(detok: IncrementalDetokenizer, ids: list[int], step: int = 1) -> list[str]:
    pieces = [detok.push(ids[i : i + step]) for i in range(0, len(ids), step)]
    pieces.append(detok.finish())
    return pieces


def decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert isinstance(text, str)
    return text


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("step", [1, 3])
def test_multibyte_text_streams_whole_characters(tokenizer: PreTrainedTokenizerBase, text: str, step: int) -> None:
    ids = encode(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer, encode(tokenizer, "Say this:"))
    pieces = stream(detok, ids, step)
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == decode(tokenizer, ids) == text
    assert detok.text == text
    assert detok.num_tokens == len(ids)


def test_the_texts_do_split_characters_across_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    """Guards the test above: at least one token of the CJK text holds only part of a character."""
    assert any("\ufffd" in decode(tokenizer, [token]) for token in encode(tokenizer, TEXTS[0]))


def test_special_tokens_are_skipped(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    eos = tiny_tokenizer.eos_token_id
    assert isinstance(eos, int)
    ids = [*encode(tiny_tokenizer, "Hello"), eos, *encode(tiny_tokenizer, " you")]
    assert "".join(stream(IncrementalDetokenizer(tiny_tokenizer), ids)) == "Hello you" == decode(tiny_tokenizer, ids)
    kept = IncrementalDetokenizer(tiny_tokenizer, skip_special_tokens=False)
    assert "".join(stream(kept, ids)) == "Hello<|im_end|> you"


def test_a_prompt_ending_inside_a_character_does_not_shift_the_output(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    partial = encode(tiny_tokenizer, "🙂")[:1]
    assert decode(tiny_tokenizer, partial).endswith("\ufffd")
    ids = encode(tiny_tokenizer, "Hello 你好")
    assert "".join(stream(IncrementalDetokenizer(tiny_tokenizer, partial), ids)) == "Hello 你好"


def test_invalid_bytes_are_held_then_flushed_as_replacement(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    ids = encode(tiny_tokenizer, "ok 🙂")[:-1]  # the last character cut short: its bytes never complete
    detok = IncrementalDetokenizer(tiny_tokenizer)
    pushed = "".join(detok.push([token]) for token in ids)
    assert "\ufffd" not in pushed
    assert pushed + detok.finish() == decode(tiny_tokenizer, ids)
    assert detok.text.endswith("\ufffd")


def test_each_push_decodes_a_short_window(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    windows: list[int] = []

    class Spy:
        def decode(self, ids: list[int], **kwargs: Any) -> Any:
            windows.append(len(ids))
            return tiny_tokenizer.decode(ids, **kwargs)

    ids = encode(tiny_tokenizer, " ".join(TEXTS) * 10)
    detok = IncrementalDetokenizer(Spy(), encode(tiny_tokenizer, "prompt")[:3])  # type: ignore[arg-type]
    assert "".join(stream(detok, ids)) == decode(tiny_tokenizer, ids)
    assert len(ids) > 500 and max(windows) <= 12


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=40), steps=st.lists(st.integers(1, 4), min_size=1, max_size=5))
def test_any_text_streams_exactly(tiny_tokenizer: PreTrainedTokenizerFast, text: str, steps: list[int]) -> None:
    ids = encode(tiny_tokenizer, text)
    detok = IncrementalDetokenizer(tiny_tokenizer, encode(tiny_tokenizer, "Hi"))
    pieces: list[str] = []
    at = 0
    while at < len(ids):
        step = steps[len(pieces) % len(steps)]
        pieces.append(detok.push(ids[at : at + step]))
        at += step
    pieces.append(detok.finish())
    if "\ufffd" not in text:
        assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == decode(tiny_tokenizer, ids) == text


def occurrences(text: str, sub: str) -> list[int]:
    return [i for i in range(len(text)) if text.startswith(sub, i)]


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab好🙂 ", max_size=30),
    stops=st.lists(st.text(alphabet="ab好🙂 ", min_size=1, max_size=4), min_size=1, max_size=3),
)
def test_output_ends_before_the_first_stop(
    tiny_tokenizer: PreTrainedTokenizerFast, text: str, stops: list[str]
) -> None:
    """Generation ends as soon as any stop is complete; the output is the text before the earliest complete one."""
    detok = IncrementalDetokenizer(tiny_tokenizer, stop=stops)
    pieces = stream(detok, encode(tiny_tokenizer, text))
    out = "".join(pieces)
    assert out == detok.text
    if not detok.stopped:
        assert out == text and not any(stop in text for stop in stops)
        return
    assert detok.stop_string is not None and text.startswith(out + detok.stop_string)
    end = len(out) + len(detok.stop_string)
    for stop in stops:  # no stop was complete by then that started earlier
        assert all(i >= len(out) for i in occurrences(text, stop) if i + len(stop) <= end)


def run_with_stops(tokenizer: PreTrainedTokenizerBase, text: str, stops: list[str]) -> IncrementalDetokenizer:
    detok = IncrementalDetokenizer(tokenizer, stop=stops)
    pieces = stream(detok, encode(tokenizer, text))
    assert "".join(pieces) == detok.text
    assert not any(stop in detok.text for stop in stops if stop)
    return detok


SENTENCE = "The quick brown fox jumps over the lazy dog."


def test_stop_on_a_single_token(tokenizer: PreTrainedTokenizerBase) -> None:
    detok = run_with_stops(tokenizer, SENTENCE, [" fox"])
    assert (detok.text, detok.stopped, detok.stop_string) == ("The quick brown", True, " fox")


def test_stop_split_across_tokens(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    # ' qu' + 'ick' + ' bro' + 'wn' in the tiny vocabulary: the stop spans four tokens
    detok = run_with_stops(tiny_tokenizer, SENTENCE, ["uick brow"])
    assert (detok.text, detok.stopped) == ("The q", True)
    assert detok.num_tokens == 5  # the ids after the one that completed the stop are not consumed


def test_stop_at_the_very_start(tokenizer: PreTrainedTokenizerBase) -> None:
    detok = run_with_stops(tokenizer, SENTENCE, ["The"])
    assert (detok.text, detok.stopped, detok.num_tokens) == ("", True, 1)


def test_earliest_of_several_stops_wins(tokenizer: PreTrainedTokenizerBase) -> None:
    detok = run_with_stops(tokenizer, SENTENCE, ["lazy", "jumps", "brown f"])
    assert (detok.text, detok.stop_string) == ("The quick ", "brown f")


def test_stop_in_multibyte_text(tokenizer: PreTrainedTokenizerBase) -> None:
    detok = run_with_stops(tokenizer, "你好，世界！🙂 end", ["世界", "🙂"])
    assert detok.text == "你好，"


def test_nothing_is_pushed_after_a_stop(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    detok = IncrementalDetokenizer(tiny_tokenizer, stop=["fox"])
    stream(detok, encode(tiny_tokenizer, SENTENCE))
    assert detok.push(encode(tiny_tokenizer, " more")) == "" and detok.finish() == ""
    assert detok.text == "The quick brown "


def test_finish_flushes_text_held_for_a_possible_stop(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    detok = IncrementalDetokenizer(tiny_tokenizer, stop=["world"])
    pushed = "".join(detok.push([token]) for token in encode(tiny_tokenizer, "Hello wor"))
    assert pushed == "Hello "  # ' wor' could still become ' world'
    assert detok.finish() == "wor"
    assert (detok.text, detok.stopped) == ("Hello wor", False)


def test_held_text_is_released_once_it_cannot_be_a_stop(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    detok = IncrementalDetokenizer(tiny_tokenizer, stop=["worlds"])
    pieces = stream(detok, encode(tiny_tokenizer, "Hello world, bye"))
    assert "".join(pieces) == "Hello world, bye" and not detok.stopped


def test_empty_and_duplicate_stops_are_ignored(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    detok = run_with_stops(tiny_tokenizer, SENTENCE, ["", "dog", "dog"])
    assert detok.text == "The quick brown fox jumps over the lazy "


def test_token_bytes_rebuild_the_text(tokenizer: PreTrainedTokenizerBase) -> None:
    detok = IncrementalDetokenizer(tokenizer)
    for text in TEXTS:
        ids = encode(tokenizer, text)
        assert b"".join(bytes(detok.token_bytes(token)) for token in ids) == text.encode()


def test_token_text_is_the_token_on_its_own(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    detok = IncrementalDetokenizer(tiny_tokenizer)
    ids = encode(tiny_tokenizer, "The quick 你")
    assert [detok.token_text(token) for token in ids] == ["The", " qu", "ick", " 你"]
    partial = encode(tiny_tokenizer, "🙂")[0]
    assert detok.token_text(partial) == "\ufffd"
    assert detok.token_bytes(partial) == list("🙂".encode())[: len(detok.token_bytes(partial))]


def build_sentencepiece_style_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-2's decoding rules: '▁' for spaces, <0xNN> byte fallback, and a decode that strips its leading space."""
    vocab = {"<unk>": 0, "</s>": 1} | {f"<0x{byte:02X}>": 2 + byte for byte in range(256)}
    for char in "▁" + string.ascii_letters + string.digits + ".,!?":
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")  # type: ignore[no-untyped-call]


def test_sentencepiece_output_keeps_its_leading_space_and_whole_characters() -> None:
    tokenizer = build_sentencepiece_style_tokenizer()
    prompt, generated = encode(tokenizer, "Hello"), encode(tokenizer, " world 你好!")
    assert decode(tokenizer, generated) == "world 你好!"  # decoded alone, the first space is lost
    full, before = decode(tokenizer, prompt + generated), decode(tokenizer, prompt)
    pieces = stream(IncrementalDetokenizer(tokenizer, prompt), generated)
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == full[len(before) :] == " world 你好!"


def test_sentencepiece_token_text_and_bytes() -> None:
    tokenizer = build_sentencepiece_style_tokenizer()
    detok = IncrementalDetokenizer(tokenizer)
    ids = encode(tokenizer, " w 你")
    assert tokenizer.convert_ids_to_tokens(ids) == ["▁", "w", "▁", "<0xE4>", "<0xBD>", "<0xA0>"]
    assert [detok.token_text(token) for token in ids][:3] == [" ", "w", " "]
    assert [detok.token_bytes(token) for token in ids] == [[32], [119], [32], [0xE4], [0xBD], [0xA0]]
