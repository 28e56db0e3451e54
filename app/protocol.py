"""OpenAI's request bodies as pydantic models: what a client may send, validated once, then mapped to sampling params.

Unknown fields are rejected, never dropped; fields OpenAI documents that we do not support yet are named in the error.
Responses and stream chunks live in `app.protocol_responses`.
"""

from __future__ import annotations

import json
import re
from itertools import chain
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from app.errors import invalid
from app.protocol_structured import StructuredFields
from app.tokenizer import TEMPLATE_ARGUMENTS
from worker.messages import MAX_CACHE_SALT_CHARS, InvalidRequest, SamplingParams

_TOKEN_ID_KEY = re.compile(r"-?[0-9]+")
_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTAINERS = frozenset({str, list, dict})
MAX_STOP_STRINGS = 64  # documented limits: a request may not make every detokenizer step scan thousands of strings
MAX_STOP_CHARS = 1024


def _lone_surrogate(data: Any) -> str | None:
    """Where parsed JSON holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair), which Python's
    json module lets through: the path of the string ('messages.0.content'), or of the object whose key it is."""
    # Each entry is (value, its key, its parent's entry): the path is spelled only when there is something to report.
    stack: list[tuple[Any, Any, Any]] = [(data, None, None)]
    while stack:
        entry = stack.pop()
        value = entry[0]
        kind = type(value)
        if kind is str:
            if _SURROGATE.search(value):
                return _spell(entry)
        elif kind is dict:
            if any(_SURROGATE.search(key) for key in value if type(key) is str):
                return _spell(entry)
            items = [(item, key, entry) for key, item in value.items() if type(item) in _CONTAINERS]
            stack.extend(reversed(items))
        elif kind is list and not _plain(value):
            items = [(item, i, entry) for i, item in enumerate(value) if type(item) in _CONTAINERS]
            stack.extend(reversed(items))
    return None


def _plain(items: list[Any]) -> bool:
    """Nothing to look at inside: only numbers (token ids), strings without a surrogate, or lists of either; told at
    C speed, since a prompt may be a million token ids."""
    types = set(map(type, items))
    if types == {list}:
        items = list(chain.from_iterable(items))
        types = set(map(type, items))
    if types == {str}:
        return _SURROGATE.search("".join(items)) is None
    return _CONTAINERS.isdisjoint(types)


def _spell(entry: tuple[Any, Any, Any]) -> str:
    keys = []
    while entry[2] is not None:
        keys.append(str(entry[1]))
        entry = entry[2]
    return ".".join(reversed(keys))


def _unsupported_error(name: str) -> PydanticCustomError:
    return invalid(name, f"'{name}' is not supported by this server yet", "unsupported_parameter")


def _check_stop(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_STOP_CHARS:
        raise invalid("", f"'stop' strings may be at most {MAX_STOP_CHARS} characters long")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        if "" in value:
            raise invalid("", "'stop' strings must not be empty")
        if len(value) > MAX_STOP_STRINGS:
            raise invalid("", f"'stop' has {len(value)} strings; at most {MAX_STOP_STRINGS} are allowed")
        if any(len(item) > MAX_STOP_CHARS for item in value):
            raise invalid("", f"'stop' strings may be at most {MAX_STOP_CHARS} characters long")
        return value
    raise invalid("", "'stop' must be a string or a list of strings")


def _check_prompt(value: Any) -> Any:
    return _texts_or_token_ids(value, "prompt")


def _check_input(value: Any) -> Any:
    if value == "" or (isinstance(value, list) and "" in value):
        raise invalid("", "'input' must not be an empty string")
    return _texts_or_token_ids(value, "input")


def _texts_or_token_ids(value: Any, name: str) -> Any:
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(i, str) for i in value)):
        return value
    if isinstance(value, list) and value and all(_is_token_ids(item) for item in value):
        return value
    if _is_token_ids(value):
        return value
    raise invalid(
        "",
        f"'{name}' must be a string, a list of strings, a non-empty list of token ids or a list of non-empty lists "
        "of token ids",
    )


def _is_token_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)
    )


Stop = Annotated[str | list[str] | None, BeforeValidator(_check_stop)]
Prompt = Annotated[str | list[str] | list[int] | list[list[int]], BeforeValidator(_check_prompt)]
EmbeddingInput = Annotated[str | list[str] | list[int] | list[list[int]], BeforeValidator(_check_input)]
Role = Literal["system", "developer", "user", "assistant", "tool"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Body(_Strict):
    """A whole request body. Every string in it, keys too, must be valid Unicode: a lone surrogate would fail
    later, in the tokenizer or in encoding a reply that echoes it, as a 500. Checked once, before any field."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = _lone_surrogate(data)
        if where is not None:
            message = "holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair), which is not text"
            raise invalid(where, f"'{where or 'body'}' {message}", "invalid_unicode")
        return data


class TextContentPart(_Strict):
    type: str
    text: str

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        if value != "text":
            raise invalid("", f"content parts of type '{value}' are not supported yet; only 'text'")
        return value


def template_arguments(arguments: str) -> Any:
    """A call's arguments as chat templates expect them: a mapping (they render it with tojson), as transformers
    passes them; text that is not JSON stays text."""
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


class ToolCallFunction(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction

    def to_template(self) -> dict[str, Any]:
        function = {"name": self.function.name, "arguments": template_arguments(self.function.arguments)}
        return {"id": self.id, "type": self.type, "function": function}


class ChatMessage(_Strict):
    """One message of a conversation. Assistant tool calls and tool results are accepted as data for the template."""

    role: Role
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None  # sent back by clients that replay an earlier assistant message
    annotations: list[Any] | None = None

    @model_validator(mode="after")
    def _check_role_fields(self) -> Self:
        if self.tool_calls is not None and self.role != "assistant":
            raise invalid("tool_calls", "only assistant messages may carry tool_calls")
        if self.tool_call_id is not None and self.role != "tool":
            raise invalid("tool_call_id", "only tool messages may carry tool_call_id")
        if self.role == "tool" and self.tool_call_id is None:
            raise invalid("tool_call_id", "a tool message needs the tool_call_id it answers")
        if self.content is None and not (self.role == "assistant" and (self.tool_calls or self.refusal)):
            raise invalid("content", f"{self.role} messages need content")
        return self

    def text(self) -> str:
        """The content as one string: text parts joined by newlines."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def to_template(self) -> dict[str, Any]:
        """The message as a chat template expects it; 'developer' becomes 'system', which templates know."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [call.to_template() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class FunctionDefinition(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _FUNCTION_NAME.fullmatch(value):
            raise invalid("", "function names are 1 to 64 letters, digits, underscores or dashes")
        return value


class ToolDefinition(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Strict):
    include_usage: bool = False


# Fields OpenAI documents that we do not support yet: rejected by name unless null or one of these no-op values.
_CHAT_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "functions": ([],),
    "function_call": ("none",),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "web_search_options": (),
    "store": (False,),
    "metadata": (),
    "service_tier": ("auto", "default"),
    "reasoning_effort": (),
}
_COMPLETION_UNSUPPORTED: dict[str, tuple[Any, ...]] = {"suffix": ("",)}


def _drop_no_ops(data: Any, unsupported: dict[str, tuple[Any, ...]]) -> Any:
    """Removes unsupported fields whose value asks for nothing; any other value is rejected by name."""
    if not isinstance(data, dict):
        return data
    kept: dict[str, Any] = {}
    for name, value in data.items():
        if name not in unsupported:
            kept[name] = value
        elif value is not None and not any(type(value) is type(ok) and value == ok for ok in unsupported[name]):
            raise _unsupported_error(name)
    return kept


class OneReply(BaseModel):
    """Mixed into the bodies of the chat-shaped APIs that ask for one reply and have no timeout field (Anthropic's
    Messages, OpenAI's Responses): what the chat pipeline asks of them beside their own fields."""

    @property
    def n(self) -> int:
        return 1

    @property
    def timeout(self) -> float | None:
        return None  # the server's request_timeout applies


class _SamplingRequest(StructuredFields, _Body):
    """The fields chat and completions share, and their mapping to the worker's sampling params (None: the default)."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    timeout: float | None = Field(default=None, gt=0)  # ours: seconds before the request is aborted
    # vLLM's extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[int] | None = None
    cache_salt: str | None = Field(default=None, min_length=1, max_length=MAX_CACHE_SALT_CHARS, strict=True)
    # each prompt token's logprob given those before it, with this many alternatives (vLLM's shape)
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20, strict=True)
    return_metrics: bool = False  # ours: the reply's own timing (`metrics`), in a stream's usage chunk

    @model_validator(mode="after")
    def _check_stream_options(self) -> Self:
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options", "stream_options is only allowed when stream is true")
        if self.prompt_logprobs is not None and self.stream:
            raise invalid("prompt_logprobs", "prompt_logprobs are not available when stream is true")
        return self

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def _sampling_params(
        self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None
    ) -> SamplingParams:
        structured = self.structured_output()  # compiled and tried before this, off the event loop (app.serving)
        return SamplingParams(
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=self.top_k or 0,
            top_p=1.0 if self.top_p is None else self.top_p,
            min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=_token_id_keys(self.logit_bias or {}),
            seed=self.seed,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            structured=structured,
            cache_salt=self.cache_salt,
        )


def _token_id_keys(logit_bias: dict[str, float]) -> dict[int, float]:
    biases: dict[int, float] = {}
    for key, bias in logit_bias.items():
        if not _TOKEN_ID_KEY.fullmatch(key):
            raise InvalidRequest("logit_bias", f"key {key!r} is not a token id (an integer, as a string)")
        biases[int(key)] = float(bias)
    return biases


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolDefinition] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = Field(default=False, strict=True)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: more variables for the chat template

    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported(cls, data: Any) -> Any:
        return _drop_no_ops(data, _CHAT_UNSUPPORTED)

    @model_validator(mode="after")
    def _check_chat(self) -> Self:
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs", "top_logprobs needs logprobs to be true")
        both = self.max_tokens is not None and self.max_completion_tokens is not None
        if both and self.max_tokens != self.max_completion_tokens:
            raise invalid("max_completion_tokens", "max_tokens and max_completion_tokens disagree; send only one")
        names = [tool.function.name for tool in self.tools or []]
        if len(set(names)) != len(names):
            raise invalid("tools", "two tools have the same function name")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise invalid("tool_choice", f"tool_choice names '{choice.function.name}', which is not among the tools")
        if choice == "required" and not names:
            raise invalid("tool_choice", "tool_choice 'required' needs tools")
        if self.forces_tool_call and self.structured_output() is not None:
            raise invalid("tool_choice", "a forced tool call cannot be combined with another structured output")
        taken = sorted(TEMPLATE_ARGUMENTS.intersection(self.chat_template_kwargs or {}))
        if taken:
            message = f"chat_template_kwargs may not set {', '.join(taken)}: the server gives them to the template"
            raise invalid("chat_template_kwargs", message)
        return self

    @property
    def tools_active(self) -> bool:
        """Tools are offered to the model (and its reply is parsed for calls)."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def forces_tool_call(self) -> bool:
        return self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)

    @property
    def names_a_tool(self) -> bool:
        """tool_choice names a function: exactly one call to it, which OpenAI finishes with 'stop'."""
        return isinstance(self.tool_choice, NamedToolChoice)

    def offered_tools(self) -> list[dict[str, Any]]:
        """The tools as the chat template receives them (none when tool_choice is 'none')."""
        return [tool.model_dump(exclude_none=True) for tool in self.tools or []] if self.tools_active else []

    def forced_tools(self) -> list[dict[str, Any]]:
        """The tools a forced call may use: the named one, or all of them for 'required'."""
        tools = self.offered_tools()
        if isinstance(self.tool_choice, NamedToolChoice):
            tools = [tool for tool in tools if tool["function"]["name"] == self.tool_choice.function.name]
        return tools

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """`default_max_tokens` applies when the request sets no limit (typically what is left of the context)."""
        max_tokens = self.max_completion_tokens or self.max_tokens or default_max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs, self.prompt_logprobs)


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions. A list prompt is a batch: each prompt gets `n` choices."""

    prompt: Prompt
    # OpenAI's default for completions; null: default_max_tokens; 0 with echo: score the prompt, generate nothing
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=5, strict=True)  # true/false would be the chat API's
    echo: bool = False
    best_of: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported(cls, data: Any) -> Any:
        return _drop_no_ops(data, _COMPLETION_UNSUPPORTED)

    @model_validator(mode="after")
    def _check_best_of(self) -> Self:
        if self.best_of is not None and self.best_of != self.n:
            raise invalid("best_of", "best_of is not supported yet (only best_of equal to n)")
        if self.max_tokens == 0 and not self.echo:
            raise invalid("max_tokens", "max_tokens 0 only scores the prompt, so it needs echo true (with logprobs)")
        return self

    @property
    def echo_logprobs(self) -> int | None:
        """The alternatives each echoed prompt token's logprobs hold (OpenAI's legacy echo with logprobs)."""
        return self.logprobs if self.echo else None

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a batch: one string or list of token ids per prompt."""
        return _as_batch(self.prompt)

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """`default_max_tokens` applies when the request sends max_tokens: null (absent means OpenAI's 16)."""
        max_tokens = self.max_tokens if self.max_tokens is not None else default_max_tokens
        asked = [k for k in (self.echo_logprobs, self.prompt_logprobs) if k is not None]
        return self._sampling_params(max_tokens, self.logprobs, max(asked) if asked else None)


class TokenizeRequest(_Body):
    """vLLM's /tokenize: either a plain `prompt` or chat `messages` rendered with the model's template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (the template adds them)

    @model_validator(mode="after")
    def _one_input(self) -> Self:
        if (self.prompt is None) == (self.messages is None):
            raise invalid("prompt", "send exactly one of 'prompt' or 'messages'")
        if self.prompt is not None and "add_generation_prompt" in self.model_fields_set:
            raise invalid("add_generation_prompt", "add_generation_prompt applies to messages only")
        return self

    @property
    def special_tokens(self) -> bool:
        """Whether the tokenizer adds its special tokens (BOS...) around the text."""
        if self.add_special_tokens is not None:
            return self.add_special_tokens
        return self.prompt is not None


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


class EmbeddingRequest(_Body):
    """POST /v1/embeddings: one vector per input (a string, a list of them, token ids, or lists of token ids)."""

    model: str
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)  # shorter vectors, where the model is trained for them
    user: str | None = None
    # vLLM's: an input longer than this keeps its last k tokens (special tokens kept); -1: the model's limit
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _not_zero(cls, value: int | None) -> int | None:
        if value == 0:
            raise invalid("", "'truncate_prompt_tokens' must be positive, or -1 for the model's limit")
        return value

    def inputs(self) -> list[str | list[int]]:
        """The input as a batch: one string or list of token ids per vector."""
        return _as_batch(self.input)


def _as_batch(value: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """A prompt or input field as a batch: one string or list of token ids per item."""
    if isinstance(value, str):
        return [value]
    if isinstance(value[0], int):
        return [[item for item in value if isinstance(item, int)]]
    return [item for item in value if not isinstance(item, int)]
