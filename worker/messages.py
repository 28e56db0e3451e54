"""Typed wire messages between the API process and a worker: token ids and numbers only, no torch, never pickled.

Each message is a msgspec Struct tagged by class name, so one `Message` union decodes any frame from the socket.
"""

from __future__ import annotations

import math

import msgspec

FinishReason = str  # "stop" | "length" | "abort" | "error"
MAX_CACHE_SALT_CHARS = 256  # a salt names a tenant; longer ones only cost hashing


class StructuredOutput(msgspec.Struct, frozen=True):
    """A constraint on the output, enforced token by token: `kind` is json (a JSON schema, as text), json_object,
    regex, choice (a JSON list of strings) or grammar (Lark or GBNF). See worker.grammar."""

    kind: str
    spec: str = ""
    param: str = "response_format"  # the request field it came from, for error messages
    # json, json_object: the output runs free up to and including this special token, and the constraint applies
    # after it (a thinking model's answer after </think>)
    after: str = ""


class SamplingParams(msgspec.Struct, frozen=True, omit_defaults=True):
    """What a request asks of the sampler and the stop rules. Validated on construction and on decode."""

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = msgspec.field(default_factory=dict)
    seed: int | None = None
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's logprob plus k alternatives
    # vLLM's: the same for each prompt token after the first, given the tokens before it (raw logits, no penalties)
    prompt_logprobs: int | None = None
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    ignore_eos: bool = False
    structured: StructuredOutput | None = None
    # vLLM's: mixed into the prefix cache's key of the first block, so requests of different salts share no KV
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        # 0: score the prompt (prompt_logprobs) without generating; the request ends with "length" once prefilled
        _check(self.max_tokens >= 0, "max_tokens", f"must be non-negative, got {self.max_tokens}")
        _check(self.min_tokens >= 0, "min_tokens", f"must be non-negative, got {self.min_tokens}")
        _check(
            self.min_tokens <= self.max_tokens,
            "min_tokens",
            f"({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
        )
        _check_finite(self.temperature, "temperature")
        _check(0.0 <= self.temperature <= 100.0, "temperature", f"must be in [0, 100], got {self.temperature}")
        _check(self.top_k >= -1, "top_k", f"must be -1, 0 (off) or positive, got {self.top_k}")
        _check_finite(self.top_p, "top_p")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check_finite(self.min_p, "min_p")
        _check(0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}")
        _check_finite(self.repetition_penalty, "repetition_penalty")
        _check(
            0.0 < self.repetition_penalty <= 100.0,
            "repetition_penalty",
            f"must be in (0, 100], got {self.repetition_penalty}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_finite(value, name)
            _check(-2.0 <= value <= 2.0, name, f"must be in [-2, 2], got {value}")
        for token_id, bias in self.logit_bias.items():
            _check(token_id >= 0, "logit_bias", f"token id {token_id} is negative")
            _check_finite(bias, "logit_bias")
            _check(-100.0 <= bias <= 100.0, "logit_bias", f"bias {bias} for token {token_id} is outside [-100, 100]")
        if self.seed is not None:
            _check(0 <= self.seed < 2**63, "seed", f"must be in [0, 2**63), got {self.seed}")
        if self.logprobs is not None:
            _check(0 <= self.logprobs <= 20, "logprobs", f"must be in [0, 20], got {self.logprobs}")
        if self.prompt_logprobs is not None:
            _check(
                0 <= self.prompt_logprobs <= 20, "prompt_logprobs", f"must be in [0, 20], got {self.prompt_logprobs}"
            )
        for token_id in self.stop_token_ids:
            _check(token_id >= 0, "stop_token_ids", f"token id {token_id} is negative")
        if self.cache_salt is not None:
            _check(
                0 < len(self.cache_salt) <= MAX_CACHE_SALT_CHARS,
                "cache_salt",
                f"must be a non-empty string of at most {MAX_CACHE_SALT_CHARS} characters",
            )
        if self.structured is not None:
            _check(
                not self.ignore_eos,
                "ignore_eos",
                "cannot be combined with a structured output, which ends where its grammar does",
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class InvalidRequest(ValueError):
    """A request parameter is out of range; `param` names the field for the API's error body."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param} {message}")
        self.param = param


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidRequest(param, message)


def _check_finite(value: float, param: str) -> None:
    _check(math.isfinite(value), param, f"must be a finite number, got {value}")


# --- API process -> worker -------------------------------------------------------------------------------------


class AddRequest(msgspec.Struct, tag=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


class AbortRequest(msgspec.Struct, tag=True):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag=True):
    pass


# --- worker -> API process -------------------------------------------------------------------------------------


class TokenLogprob(msgspec.Struct, array_like=True):
    token_id: int
    logprob: float


class SampleLogprobs(msgspec.Struct, array_like=True):
    """The chosen token's logprob and the top alternatives (most likely first), for one generated or prompt
    position."""

    chosen: TokenLogprob
    top: list[TokenLogprob]
    rank: int = 0  # prompt tokens: 1 + how many tokens are more likely (ties count ahead, as vLLM's); 0: not computed


class RequestOutput(msgspec.Struct, omit_defaults=True):
    """What one engine step produced for one request: new token ids, and a finish reason when it ended."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    logprobs: list[SampleLogprobs] | None = None
    # the first output of a request with prompt_logprobs: one per prompt token, None for the first (it has no context)
    prompt_logprobs: list[SampleLogprobs | None] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    queue_seconds: float = 0.0  # on the first output: time from arrival to first schedule
    error: str | None = None
    error_code: str | None = None  # "invalid_request" (with error_param), "model_error" or "out_of_memory"
    error_param: str | None = None
    embedding: bytes | None = None  # an embed model's vector: float32, little-endian (what OpenAI's base64 encodes)

    @classmethod
    def refused(cls, request_id: str, exc: InvalidRequest) -> RequestOutput:
        """The end of a request refused for one of its parameters, named for the API's 400."""
        return cls(request_id, [], "error", error=str(exc), error_code="invalid_request", error_param=exc.param)


class EngineStats(msgspec.Struct):
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache, cumulative
    prefix_cache_hits: int = 0  # tokens found there, cumulative
    num_preemptions: int = 0  # cumulative
    step_tokens: int = 0  # tokens fed to the model in this step
    step_seconds: float = 0.0
    grammar_mask_seconds: float = 0.0  # cumulative: computing structured-output masks (overlapped with forwards)
    grammar_wait_seconds: float = 0.0  # cumulative: steps waiting for those masks after their forward
    # cumulative, speculative decoding: verifications, tokens proposed, tokens kept, and kept by position proposed
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_position: list[int] = msgspec.field(default_factory=list)


class StepOutput(msgspec.Struct, tag=True):
    """ONE message per engine step: every request's new tokens plus the engine's stats."""

    step: int
    outputs: list[RequestOutput]
    stats: EngineStats


class ModelInfo(msgspec.Struct, tag=True):
    """Sent once by a worker when its model is loaded and it is ready for requests."""

    name: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    dtype: str
    device: str
    kv_blocks_total: int
    block_size: int
    max_num_seqs: int  # running slots: with max_waiting_requests, what the API process admits at once
    tokenizer_dir: str  # where the API process reads tokenizer.json and the chat template
    native_kernels: bool | None = None  # the C kernels serve this CPU model (None: not on a CPU)
    native_kernels_reason: str = ""  # why they do not: the torch paths run, about half as fast
    task: str = "generate"  # "generate" | "embed": which endpoints the model answers
    embedding_size: int = 0  # embed: the length of the model's vectors
    embedding_normalized: bool = False  # embed: vectors have unit length (a shortened one is scaled back to it)
    # embed: the sizes a request's `dimensions` may take besides the full one; None: none; []: any smaller size
    matryoshka_dimensions: list[int] | None = None


class WorkerError(msgspec.Struct, tag=True):
    """A worker could not start or hit a fatal error; it exits after sending this."""

    message: str


class Heartbeat(msgspec.Struct, tag=True):
    """Sent by a worker's heartbeat thread every few seconds, whatever its main loop is doing: evidence of progress
    that a long step cannot block and a deadlock cannot fake (see app.liveness)."""

    monotonic: float  # the worker's clock when it was sent
    cpu_seconds: float  # CPU time of the whole worker process so far (all threads: the forward's too)
    step: int  # engine steps finished
    step_seconds: float  # how long the step now running has run; 0 between steps


ToWorker = AddRequest | AbortRequest | Shutdown
FromWorker = StepOutput | ModelInfo | WorkerError | Heartbeat
