"""The API process's tokenizer: `tokenizers` plus a sandboxed Jinja chat template, with no transformers import.

transformers' tokenizer classes import torch when it is installed, and the API process must stay torch-free (and
small). This reads the same files (tokenizer.json, tokenizer_config.json, chat_template.jinja) and renders chat
templates the way transformers does: a sandboxed Jinja environment, then encoding without added special tokens.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from llguidance import LLTokenizer
from tokenizers import Tokenizer as FastTokenizer

# What the server itself gives a chat template; a request's chat_template_kwargs may not replace them.
TEMPLATE_ARGUMENTS = frozenset(
    {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "raise_exception", "strftime_now"}
)


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered (the template raised, or the model has no template)."""


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        content = value.get("content")
        return str(content) if content is not None else None
    return str(value) if value is not None else None


class Tokenizer:
    def __init__(self, fast: FastTokenizer, config: dict[str, Any], chat_template: str | None) -> None:
        self.fast = fast
        self.config = config
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.special_ids = frozenset(
            token_id for token_id, added in fast.get_added_tokens_decoder().items() if added.special
        )
        self.chat_template = chat_template
        self._grammar_tokenizer: LLTokenizer | None = None
        self._grammar_lock = threading.Lock()
        self._template: jinja2.Template | None = None
        if chat_template is not None:
            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = _strftime_now
            self._template = env.from_string(chat_template)

    @classmethod
    def from_dir(cls, path: str | Path, chat_template_file: str | Path | None = None) -> Tokenizer:
        path = Path(path)
        fast = FastTokenizer.from_file(str(path / "tokenizer.json"))
        # A tokenizer.json may carry the padding and truncation it was trained with (all-MiniLM-L6-v2's pads every
        # text to 128 tokens); transformers turns both off and pads itself, and so does this.
        fast.no_padding()
        fast.no_truncation()
        config_path = path / "tokenizer_config.json"
        config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.exists() else {}
        template: str | None = None
        if chat_template_file is not None:
            template = Path(chat_template_file).read_text()
        elif (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        elif isinstance(config.get("chat_template"), str):
            template = config["chat_template"]
        return cls(fast, config, template)

    @property
    def vocab_size(self) -> int:
        return int(self.fast.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.encode_batch([text], add_special_tokens)[0]

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Through the tokenizer's batch call, which releases the GIL while it works: its single-text `encode` holds
        the GIL for the whole text (seconds for a 4 MiB prompt), stalling the event loop even from another thread."""
        if not texts:
            return []
        return [list(e.ids) for e in self.fast.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def encode_truncated(self, texts: list[str], max_tokens: int) -> list[list[int]]:
        """Each text with the tokenizer's special tokens, longer ones cut to their last `max_tokens` tokens with the
        special tokens kept (vLLM's `truncate_prompt_tokens`): the text's tokens are cut, then the special tokens
        added, as transformers' truncation does."""
        if not texts:
            return []
        keep = max(1, max_tokens - self.fast.num_special_tokens_to_add(is_pair=False))
        out = []
        for encoding in self.fast.encode_batch(texts, add_special_tokens=False):
            encoding.truncate(keep, direction="left")
            out.append(list(self.fast.post_process(encoding, add_special_tokens=True).ids))
        return out

    def decode(
        self, token_ids: list[int], skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool = False
    ) -> str:
        """`clean_up_tokenization_spaces` is accepted for transformers' signature; tokenizer.json decoders need none."""
        return str(self.fast.decode(token_ids, skip_special_tokens=skip_special_tokens))

    def grammar_tokenizer(self, vocab_size: int, eos_token_ids: Sequence[int]) -> LLTokenizer:
        """llguidance's view of this tokenizer, to compile grammars against as the worker will; built on first use
        (about a second for a large vocabulary, so off the event loop) and kept."""
        with self._grammar_lock:
            if self._grammar_tokenizer is None:
                self._grammar_tokenizer = LLTokenizer(
                    self.fast.to_str(), n_vocab=vocab_size, eos_token=list(eos_token_ids)
                )
            return self._grammar_tokenizer

    def convert_ids_to_tokens(self, token_ids: int | list[int]) -> str | list[str]:
        if isinstance(token_ids, int):
            return self.fast.id_to_token(token_ids) or ""
        return [self.fast.id_to_token(t) or "" for t in token_ids]

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        if self._template is None:
            raise ChatTemplateError("this model has no chat template; use /v1/completions or set chat_template")
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **extra,
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the chat template failed: {exc}") from exc

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt, **extra), add_special_tokens=False)
