"""`EmbedEngine`: the worker loop's engine for an embedding model. Requests wait in arrival order; each step takes
the oldest that fit the token budget (`max_num_batched_tokens`, at most `max_num_seqs` of them), runs them through
the model in right-padded batches of similar lengths, pools and normalizes each, and answers every one of them in
that step. No KV cache, no decoding: a request is one forward.

A step's requests are sorted by length and cut into batches whose padding stays under a quarter of their tokens:
one padded batch of mixed lengths computes every row to the longest, and one forward a request pays the forward's
fixed cost every time (`python -m loadtests.bench_embed` measures the three).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from worker.embed.pooling import Pooling, read_pooling
from worker.loader import LoadedModel
from worker.messages import EngineStats, InvalidRequest, ModelInfo, RequestOutput, SamplingParams, StepOutput
from worker.registry import ModelEntry

log = logging.getLogger("tokenmill.embed")

MAX_PADDING = 0.25  # a batch's padding, as a share of its tokens, above which a step cuts another batch


@dataclass
class EmbedRequest:
    request_id: str
    token_ids: list[int]
    arrived: float


class EmbedEngine:
    def __init__(
        self,
        model: PreTrainedModel,
        pooling: Pooling,
        *,
        name: str,
        max_model_len: int,
        device: torch.device,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        tokenizer_dir: str = "",
        matryoshka_dimensions: list[int] | None = None,
    ) -> None:
        self.model = model
        self.pooling = pooling
        self.name = name
        self.max_model_len = max_model_len
        self.device = device
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max(max_num_batched_tokens, max_model_len)  # the longest input fits a step
        self.tokenizer_dir = tokenizer_dir
        self.matryoshka_dimensions = matryoshka_dimensions
        config = model.config.get_text_config()
        self.vocab_size = int(config.vocab_size)
        self.embedding_size = int(config.hidden_size)
        self.pad_id = int(getattr(config, "pad_token_id", None) or 0)
        self.waiting: deque[EmbedRequest] = deque()
        self.pending: list[RequestOutput] = []  # aborts, answered at the next step
        self.step_count = 0
        self.fault_hook: Callable[[list[list[int]]], None] | None = None  # tests inject step failures through it

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, entry: ModelEntry) -> EmbedEngine:
        pooling = read_pooling(loaded.weights_path, entry.pooling, entry.normalize)
        limit = loaded.max_model_len
        if entry.max_model_len is None and pooling.max_seq_length is not None:
            limit = min(limit, pooling.max_seq_length)  # where sentence-transformers truncates
        engine = cls(
            loaded.model,
            pooling,
            name=entry.name,
            max_model_len=limit,
            device=loaded.device,
            max_num_seqs=entry.max_num_seqs,
            max_num_batched_tokens=entry.max_num_batched_tokens,
            tokenizer_dir=str(loaded.weights_path),
            matryoshka_dimensions=_matryoshka(entry, loaded),
        )
        log.info(
            "%s: embeddings of %d, %s pooling%s, inputs up to %d tokens",
            entry.name,
            engine.embedding_size,
            pooling.mode,
            ", normalized" if pooling.normalize else "",
            limit,
        )
        return engine

    def model_info(self) -> ModelInfo:
        return ModelInfo(
            name=self.name,
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            eos_token_ids=[],
            dtype=str(self.model.dtype).removeprefix("torch."),
            device=str(self.device),
            kv_blocks_total=0,
            block_size=0,
            max_num_seqs=self.max_num_seqs,
            tokenizer_dir=self.tokenizer_dir,
            task="embed",
            embedding_size=self.embedding_size,
            embedding_normalized=self.pooling.normalize,
            matryoshka_dimensions=self.matryoshka_dimensions,
        )

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue an input; raises `InvalidRequest` (nothing queued) when it cannot be embedded. `params` is the
        generation engine's and unused: an embedding has no sampling."""
        if not prompt_token_ids:
            raise InvalidRequest("input", "is empty")
        if len(prompt_token_ids) > self.max_model_len:
            raise InvalidRequest("input", f"has {len(prompt_token_ids)} tokens; this model takes {self.max_model_len}")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequest("input", f"has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        self.waiting.append(EmbedRequest(request_id, prompt_token_ids, time.monotonic()))

    def abort(self, request_ids: Iterable[str]) -> None:
        gone = set(request_ids)
        kept = [r for r in self.waiting if r.request_id not in gone]
        for request in self.waiting:
            if request.request_id in gone:
                self.pending.append(RequestOutput(request.request_id, [], "abort"))
        self.waiting = deque(kept)

    def has_work(self) -> bool:
        return bool(self.waiting) or bool(self.pending)

    def stats(self, step_tokens: int = 0, step_seconds: float = 0.0) -> EngineStats:
        return EngineStats(num_waiting=len(self.waiting), step_tokens=step_tokens, step_seconds=step_seconds)

    def step(self) -> StepOutput:
        start = time.perf_counter()
        outputs, self.pending = self.pending, []
        taken = self._take()
        try:
            if self.fault_hook is not None:
                self.fault_hook([r.token_ids for r in taken])
            outputs.extend(self._embed(taken, time.monotonic()))
        except (torch.OutOfMemoryError, MemoryError) as exc:
            log.warning("out of memory embedding %d inputs; failing them", len(taken))
            message = f"out of memory while embedding this input ({exc}); retry with fewer or shorter inputs"
            outputs.extend(_failed(r, message, "out_of_memory") for r in taken)
        except Exception as exc:
            log.exception("step %d failed; failing its %d inputs", self.step_count + 1, len(taken))
            message = f"the model failed on this input: {type(exc).__name__}: {exc}"
            outputs.extend(_failed(r, message, "model_error") for r in taken)
        self.step_count += 1
        tokens = sum(len(r.token_ids) for r in taken)
        return StepOutput(self.step_count, outputs, self.stats(tokens, time.perf_counter() - start))

    def _take(self) -> list[EmbedRequest]:
        """The oldest waiting inputs whose tokens fit one step's budget (the first always goes)."""
        taken: list[EmbedRequest] = []
        tokens = 0
        while self.waiting and len(taken) < self.max_num_seqs:
            size = len(self.waiting[0].token_ids)
            if taken and tokens + size > self.max_num_batched_tokens:
                break
            taken.append(self.waiting.popleft())
            tokens += size
        return taken

    def _embed(self, taken: list[EmbedRequest], now: float) -> list[RequestOutput]:
        outputs = []
        for batch in batches(sorted(taken, key=lambda r: len(r.token_ids))):
            vectors = self.forward([r.token_ids for r in batch])
            for request, vector in zip(batch, vectors, strict=True):
                outputs.append(
                    RequestOutput(
                        request.request_id,
                        [],
                        "stop",
                        num_prompt_tokens=len(request.token_ids),
                        queue_seconds=max(0.0, now - request.arrived),
                        embedding=vector.numpy().astype("<f4").tobytes(),
                    )
                )
        return outputs

    @torch.inference_mode()
    def forward(self, inputs: list[list[int]]) -> torch.Tensor:
        """The pooled vectors [len(inputs), embedding_size] of one right-padded batch, in float32 on the CPU."""
        longest = max(len(ids) for ids in inputs)
        ids = torch.full((len(inputs), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(inputs), longest), dtype=torch.long)
        for row, token_ids in enumerate(inputs):
            ids[row, : len(token_ids)] = torch.tensor(token_ids)
            mask[row, : len(token_ids)] = 1
        hidden = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        lengths = torch.tensor([len(token_ids) for token_ids in inputs], device=hidden.device)
        return self.pooling(hidden, lengths).cpu()


def batches(inputs: list[EmbedRequest]) -> list[list[EmbedRequest]]:
    """`inputs`, sorted by length, cut where the next one would take a batch's padding past `MAX_PADDING`."""
    out: list[list[EmbedRequest]] = []
    tokens = 0
    for request in inputs:
        size = len(request.token_ids)
        if out and (len(out[-1]) + 1) * size * (1 - MAX_PADDING) > tokens + size:
            out.append([])
            tokens = 0
        if not out:
            out.append([])
        out[-1].append(request)
        tokens += size
    return out


def _failed(request: EmbedRequest, message: str, code: str) -> RequestOutput:
    return RequestOutput(request.request_id, [], "error", error=message, error_code=code)


def _matryoshka(entry: ModelEntry, loaded: LoadedModel) -> list[int] | None:
    """The sizes a request's `dimensions` may take: the registry's, else the model config's (vLLM reads the same
    keys); [] any size; None only the model's own."""
    if entry.matryoshka_dimensions is not None:
        return sorted(set(entry.matryoshka_dimensions))
    listed = getattr(loaded.config, "matryoshka_dimensions", None)
    if isinstance(listed, list) and listed:
        return sorted({int(d) for d in listed})
    return [] if getattr(loaded.config, "is_matryoshka", False) else None
