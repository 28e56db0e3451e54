"""Turns a request's generated token ids into text as they arrive: UTF-8 safe, cheap per token, stop strings honoured.

Each push decodes only a short window of recent tokens and emits the difference (vLLM's prefix/read offsets idea).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import cache
from typing import Protocol

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded ahead of the output, so the first generated token decodes as it would mid-text (a
# SentencePiece decoder strips the leading space of the first token of a decode, not of a later one).
_CONTEXT_TOKENS = 5
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class DetokenizerTokenizer(Protocol):
    """What decoding needs: transformers' tokenizers fit, and so does the app's torch-free `app.tokenizer.Tokenizer`."""

    def decode(
        self, token_ids: list[int], /, *, skip_special_tokens: bool = ..., clean_up_tokenization_spaces: bool = ...
    ) -> str | list[str]: ...

    def convert_ids_to_tokens(self, token_id: int, /) -> str | list[str]: ...


class IncrementalDetokenizer:
    """One per generated sequence. `push` new ids, emit what it returns, then `finish` and emit that too.

    Text is held back while it ends inside a multi-byte character, or while it could be the start of a stop string;
    once a stop string appears, `stopped` is set and only the text before it is ever emitted.
    """

    def __init__(
        self,
        tokenizer: DetokenizerTokenizer,
        prompt_ids: Sequence[int] = (),
        *,
        skip_special_tokens: bool = True,
        stop: Iterable[str] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stops = [s for s in dict.fromkeys(stop) if s]
        # The decoding window: ids[:read] are already emitted (or prompt) and give context; ids[read:] are not yet.
        self._ids = list(prompt_ids[max(len(prompt_ids) - _CONTEXT_TOKENS, 0) :])
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        if self._prefix_text.endswith(_REPLACEMENT):  # the prompt ends inside a character: decode the output alone
            self._ids, self._read, self._prefix_text = [], 0, ""
        self._pending = ""  # decoded text held back because it may be the start of a stop string
        self._pieces: list[str] = []
        self._finished = False
        self._text_cache: dict[int, str] = {}
        self._bytes_cache: dict[int, list[int]] = {}
        self.stopped = False
        self.stop_string: str | None = None  # the stop string that matched
        self.num_tokens = 0  # ids consumed; after a stop, those after the one that completed it are not counted
        # Characters of output before each consumed token: a token that ends inside a multi-byte character adds
        # none, and shares its offset with the token that completes the character.
        self.token_offsets: list[int] = []
        self._decoded_chars = 0

    @property
    def text(self) -> str:
        """All the text emitted so far."""
        return "".join(self._pieces)

    def push(self, token_ids: Iterable[int]) -> str:
        """Takes newly generated ids; returns the text that is now safe to show (often empty)."""
        if self.stopped or self._finished:
            return ""
        out: list[str] = []
        for token_id in token_ids:
            self.num_tokens += 1
            self.token_offsets.append(self._decoded_chars)
            new_text = self._step(token_id)
            self._decoded_chars += len(new_text)
            out.append(self._emit(new_text, final=False))
            if self.stopped:
                break
        return "".join(out)

    def finish(self) -> str:
        """Flushes the held-back text (an incomplete character becomes U+FFFD). Call once, after the last push."""
        if self.stopped or self._finished:
            return ""
        text = self._decode(self._ids)
        tail = text[len(self._prefix_text) :] if len(text) > len(self._prefix_text) else ""
        out = self._emit(tail, final=True)
        self._finished = True
        return out

    def _step(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._decode(self._ids)
        if len(text) <= len(self._prefix_text) or text.endswith(_REPLACEMENT):
            return ""  # nothing yet, or a character is still incomplete: wait for the next token
        new_text = text[len(self._prefix_text) :]
        del self._ids[: self._read]  # the window moves on: the tokens just read become the next context
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return new_text

    def _emit(self, new_text: str, *, final: bool) -> str:
        if self._stops:
            new_text = self._apply_stops(new_text, final=final)
        if new_text:
            self._pieces.append(new_text)
        return new_text

    def _apply_stops(self, new_text: str, *, final: bool) -> str:
        text = self._pending + new_text
        # Emitted text never holds the start of a stop string, so a match can only begin in `text`.
        at, which = -1, None
        for stop in self._stops:
            index = text.find(stop)
            if index != -1 and (at == -1 or index < at):
                at, which = index, stop
        if which is not None:
            self.stopped, self.stop_string, self._pending = True, which, ""
            return text[:at]
        hold = 0 if final else self._stop_prefix_len(text)
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def _stop_prefix_len(self, text: str) -> int:
        """The length of the longest end of `text` that is the beginning of some stop string."""
        best = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:length]):
                    best = length
                    break
        return best

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        text = self._tokenizer.decode(ids, skip_special_tokens=self._skip_special, clean_up_tokenization_spaces=False)
        assert isinstance(text, str)
        return text

    # --- per-token text and bytes, for logprobs ------------------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own, as logprobs show it (U+FFFD where it holds part of a character)."""
        cached = self._text_cache.get(token_id)
        if cached is None:
            decoded = self._tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            assert isinstance(decoded, str)
            token = self._tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(token, str) and token.startswith("▁") and not decoded.startswith(" "):
                decoded = " " + decoded  # a SentencePiece decoder strips the space of a lone token; logprobs keep it
            cached = self._text_cache[token_id] = decoded
        return cached

    def token_bytes(self, token_id: int) -> list[int]:
        """The token's exact UTF-8 bytes (OpenAI's logprobs `bytes`), even when it holds only part of a character."""
        cached = self._bytes_cache.get(token_id)
        if cached is None:
            cached = self._bytes_cache[token_id] = self._token_bytes(token_id)
        return cached

    def _token_bytes(self, token_id: int) -> list[int]:
        text = self.token_text(token_id)
        if _REPLACEMENT not in text:
            return list(text.encode("utf-8"))
        token = self._tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(token, str):
            fallback = _BYTE_FALLBACK.fullmatch(token)
            if fallback:  # SentencePiece byte fallback: <0xE4>
                return [int(fallback.group(1), 16)]
            byte_of = _byte_level_decoder()
            if token and all(char in byte_of for char in token):  # GPT-2 style byte-level BPE
                return [byte_of[char] for char in token]
        return list(text.encode("utf-8"))


@cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: each of the 256 bytes is spelled as one printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    byte_of = {chr(byte): byte for byte in printable}
    byte_of.update({chr(256 + index): byte for index, byte in enumerate(others)})
    return byte_of
