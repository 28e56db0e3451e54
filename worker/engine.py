"""`Engine`: the synchronous, socket-free engine core: add_request, abort, step. Tested in-process.

A step is three moves: the scheduler picks what runs, the model runner and sampler produce tokens, the scheduler
folds them back in. Every request's new tokens of the step come back in one `StepOutput`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from worker import native
from worker.block_manager import BlockManager
from worker.flash_attention import PAGE_MULTIPLE as PAGE
from worker.gguf_weights import QuantizedRows
from worker.kv_budget import default_cpu_kv_cache_memory, profile_num_blocks
from worker.messages import (
    EngineStats,
    InvalidRequest,
    ModelInfo,
    RequestOutput,
    SampleLogprobs,
    SamplingParams,
    StepOutput,
)
from worker.model_runner import BatchItem, ModelRunner, flash_backend_fits, kv_bytes_per_token
from worker.prompt_logprobs import score_rows, split_scores
from worker.registry import ModelEntry, SpeculativeSpec
from worker.sampler import SampleInput, Sampler
from worker.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from worker.sequence import Sequence
from worker.spec_decode.speculator import SpecCounts, Speculator
from worker.spec_decode.verify import Verified, verify
from worker.step_budget import StepBudget
from worker.structured import GrammarMasks

if TYPE_CHECKING:
    from worker.loader import LoadedModel

log = logging.getLogger("tokenmill.engine")
COMPILE_WAIT = 0.02  # seconds a step with nothing else to run waits for a grammar to compile, instead of spinning


def default_kv_cache_memory(device: torch.device, bytes_per_token: int, max_num_seqs: int, max_len: int) -> int | None:
    """The KV budget where the entry sets none: on the CPU from the model's bytes per token and the memory left; None
    on CUDA, where a profiling forward sizes the pool (worker.kv_budget)."""
    if device.type == "cuda":
        return None
    return default_cpu_kv_cache_memory(bytes_per_token, max_num_seqs, max_len)


def speculates(spec: SpeculativeSpec | None, device: torch.device) -> bool:
    """Whether an engine proposes tokens (`SpeculativeSpec.method`; auto: on a CPU)."""
    if spec is None or spec.method == "none":
        return False
    return spec.method == "ngram" or device.type == "cpu"


class Engine:
    def __init__(
        self,
        model: PreTrainedModel,
        *,
        name: str,
        max_model_len: int,
        eos_token_ids: Iterable[int],
        device: torch.device,
        num_blocks: int | None,
        block_size: int = 16,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        tokenizer_dir: str = "",
        gguf_blocks: dict[str, QuantizedRows] | None = None,
        gpu_memory_utilization: float = 0.9,
        cuda_graphs: bool = True,
        prefill_chunk_ratio: float = 0.0,
        speculative: SpeculativeSpec | None = None,
    ) -> None:
        """`num_blocks` None: size the KV pool on CUDA from a profiling forward (worker.kv_budget). `cuda_graphs`:
        capture decode graphs at start where the device is a CUDA one. `prefill_chunk_ratio`: while requests decode,
        a step's prompt tokens may cost at most this many decode-only steps (`worker.step_budget`; 0: no bound).
        `speculative`: propose tokens for decoding requests to verify (`worker.spec_decode`); None: one a step."""
        self.name = name
        self.tokenizer_dir = tokenizer_dir
        self.max_model_len = max_model_len
        self.eos_token_ids = sorted(set(eos_token_ids))
        self.vocab_size = int(model.config.get_text_config().vocab_size)
        self.device = device
        self.runner = ModelRunner(model, num_blocks or 0, block_size, device, gguf_blocks)
        log.info("%s: %s", name, self.runner.describe())
        if num_blocks is None:
            if device.type != "cuda":
                raise ValueError("the KV pool is sized by profiling on CUDA only; give num_blocks on other devices")
            per_block = kv_bytes_per_token(model, self.runner.dtype) * block_size
            num_blocks = profile_num_blocks(
                self.runner, max_num_batched_tokens, max_num_seqs, gpu_memory_utilization, per_block
            )
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.step_budget = StepBudget(max_num_batched_tokens, prefill_chunk_ratio)
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs,
            max_num_batched_tokens,
            max_model_len,
            self.eos_token_ids,
            self.step_budget.prompt_tokens,
        )
        if cuda_graphs and device.type == "cuda":
            log.info("%s: %s", name, self.runner.capture_decode_graphs(max_num_seqs, max_model_len))
        self.sampler = Sampler(seed)
        self.speculator = Speculator(speculative) if speculates(speculative, device) and speculative else None
        self.grammar = GrammarMasks(tokenizer_dir, self.vocab_size, self.eos_token_ids)
        self.requests: dict[str, Sequence] = {}
        self.pending: list[RequestOutput] = []  # outputs owed to the client outside a forward (aborts)
        self.step_count = 0
        self._arrivals = 0
        self.fault_hook: Callable[[list[list[int]]], None] | None = None  # tests inject step failures through it

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, entry: ModelEntry) -> Engine:
        per_token = kv_bytes_per_token(loaded.model, loaded.dtype)
        block_size = entry.block_size
        if "block_size" not in entry.model_fields_set and flash_backend_fits(loaded.device, loaded.dtype, PAGE):
            block_size = PAGE  # flash-attn pages blocks of 256 tokens; an entry's own block size keeps SDPA
        budget = entry.kv_cache_memory or default_kv_cache_memory(
            loaded.device, per_token, entry.max_num_seqs, loaded.max_model_len
        )
        num_blocks = None if budget is None else max(1, budget // (per_token * block_size))
        engine = cls(
            loaded.model,
            name=entry.name,
            max_model_len=loaded.max_model_len,
            eos_token_ids=loaded.eos_token_ids,
            device=loaded.device,
            num_blocks=num_blocks,
            block_size=block_size,
            max_num_seqs=entry.max_num_seqs,
            max_num_batched_tokens=entry.max_num_batched_tokens,
            enable_prefix_caching=entry.enable_prefix_caching,
            seed=entry.seed,
            tokenizer_dir=str(loaded.weights_path),
            gguf_blocks=loaded.gguf_blocks,
            gpu_memory_utilization=entry.gpu_memory_utilization,
            cuda_graphs=entry.cuda_graphs,
            prefill_chunk_ratio=entry.prefill_chunk_ratio,
            speculative=entry.speculative,
        )
        log.info(
            "%s: KV cache %d blocks x %d tokens = %d tokens (%.0f MiB, %d bytes/token)",
            entry.name,
            engine.block_manager.num_blocks,
            block_size,
            engine.block_manager.num_blocks * block_size,
            engine.block_manager.num_blocks * block_size * per_token / 2**20,
            per_token,
        )
        return engine

    def model_info(self) -> ModelInfo:
        native_kernels, why_not = native.status(self.device)
        return ModelInfo(
            name=self.name,
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            eos_token_ids=self.eos_token_ids,
            dtype=str(self.runner.dtype).removeprefix("torch."),
            device=str(self.device),
            kv_blocks_total=self.block_manager.num_blocks,
            block_size=self.block_manager.block_size,
            max_num_seqs=self.scheduler.max_num_seqs,
            tokenizer_dir=self.tokenizer_dir,
            native_kernels=native_kernels,
            native_kernels_reason=why_not,
        )

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; raises `InvalidRequest` (nothing queued) when it cannot be served."""
        if request_id in self.requests:
            raise InvalidRequest("request_id", f"'{request_id}' is already in use")
        if not prompt_token_ids:
            raise InvalidRequest("prompt", "is empty")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequest("prompt", f"has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        for field, ids in (("logit_bias", params.logit_bias.keys()), ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in ids if t >= self.vocab_size]
            if bad:
                raise InvalidRequest(field, f"has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequest(
                "prompt", f"has {len(prompt_token_ids)} tokens; the model's limit is {self.max_model_len} in all"
            )
        longest = min(len(prompt_token_ids) + params.max_tokens, self.max_model_len)
        bm = self.block_manager
        if bm.blocks_needed([], longest) > bm.num_blocks:
            raise InvalidRequest(
                "max_tokens",
                f"prompt plus max_tokens ({longest} tokens) exceeds the KV cache ({bm.num_blocks * bm.block_size} "
                "tokens); lower max_tokens or give the model more kv_cache_memory",
            )
        if params.structured is not None:
            self.grammar.add(request_id, params.structured)  # compiles off the step; the request waits for it
        seq = Sequence(request_id, list(prompt_token_ids), params, arrival=self._arrivals)
        self._arrivals += 1
        self.requests[request_id] = seq
        if params.structured is None:
            self.scheduler.add(seq)

    def abort(self, request_ids: Iterable[str]) -> None:
        """Drop requests at once, freeing their blocks; unknown or finished ids are ignored."""
        for request_id in request_ids:
            seq = self.requests.pop(request_id, None)
            if seq is None:
                continue
            if request_id not in self.grammar.compiling:
                self.scheduler.abort(seq)
            self._release(request_id)
            self.pending.append(RequestOutput(request_id, [], "abort"))

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self.pending) or bool(self.grammar.compiling)

    def step(self) -> StepOutput:
        start = time.perf_counter()
        outputs, self.pending = self.pending, []
        outputs.extend(self._schedule_compiled(idle=not (outputs or self.scheduler.has_work())))
        if self.speculator is not None:
            self._propose()
        plan = self.scheduler.schedule()
        if plan.scheduled:
            try:
                outputs.extend(self._run(plan))
            except (torch.OutOfMemoryError, MemoryError) as exc:
                # The largest request goes; the others were not advanced and simply run again next step.
                victim = max(plan.scheduled, key=lambda item: item.seq.num_tokens).seq
                log.warning(
                    "out of memory in a step of %d requests; failing %s", len(plan.scheduled), victim.request_id
                )
                message = f"out of memory while running this request ({exc}); retry shorter"
                outputs.append(self._fail(victim, message, "out_of_memory"))
            except Exception as exc:
                log.exception("step %d failed; failing its %d requests", self.step_count + 1, len(plan.scheduled))
                message = f"the model failed on this request: {type(exc).__name__}: {exc}"
                outputs.extend(self._fail(item.seq, message, "model_error") for item in plan.scheduled)
        self.step_count += 1
        seconds = time.perf_counter() - start
        if plan.scheduled:
            # a decode's rows, proposed tokens included, are priced as streams: each is a row of the projections
            decodes = sum(item.num_new_tokens for item in plan.scheduled if self._decodes(item))
            self.step_budget.observe(plan.num_batched_tokens - decodes, decodes, seconds)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "step %d: %d streams + %d prompt tokens in %.1f ms; %s",
                    self.step_count,
                    decodes,
                    plan.num_batched_tokens - decodes,
                    seconds * 1e3,
                    self.step_budget.describe(),
                )
        return StepOutput(self.step_count, outputs, self.stats(plan.num_batched_tokens, seconds))

    def _run(self, plan: SchedulerOutput) -> list[RequestOutput]:
        items = []
        rows: list[SampleInput] = []  # one a sampling request; a request verifying k proposed tokens has k + 1
        drafts: list[list[int]] = []  # per sampling request, the proposed tokens it verifies
        for item in plan.scheduled:
            seq = item.seq
            first, own = seq.num_computed_tokens, item.num_new_tokens - len(item.drafts)
            fed = seq.token_ids[first : first + own] + item.drafts
            # a verifying request keeps the logits of every proposed token's position too
            kept = range(len(item.drafts)) if item.drafts else score_rows(seq, first, own)
            items.append(BatchItem(fed, first, seq.block_table, item.sample, kept))
            if item.sample:
                rows.extend(self._sample_input(seq, item.drafts[:i]) for i in range(len(item.drafts) + 1))
                drafts.append(item.drafts)
        if self.fault_hook is not None:
            self.fault_hook([item.seq.prompt_token_ids for item in plan.scheduled])
        firsts = self._first_rows(rows, drafts)
        # computed while the model runs; a request with a grammar never proposes
        masks = self.grammar.start(
            [row.request_id for row, proposed in zip(firsts, drafts, strict=True) if not proposed]
        )
        logits, scores = split_scores(self.runner.execute(items), items, [item.seq for item in plan.scheduled])
        for row, allowed in zip(rows, self._allowed(rows, self.grammar.finish(masks)), strict=True):
            row.allowed = allowed
        verified = self._sample(logits, rows, drafts, firsts)
        tokens = {rid: v.token_ids for rid, v in verified.items()}
        lengths = {seq.request_id: seq.num_tokens for seq in (item.seq for item in plan.scheduled)}
        finished = {seq.request_id for seq in self.scheduler.update(plan, tokens)}
        for request_id, prompt_logprobs in scores.items():  # kept only now that the step has certainly happened
            self.requests[request_id].prompt_logprobs.extend(prompt_logprobs)
        broken = {
            rid: error for rid, kept in tokens.items() if (error := self.grammar.advance(rid, kept[0])) is not None
        }

        outputs = []
        for item in plan.scheduled:
            request_id = item.seq.request_id
            if request_id not in verified:
                continue
            seq = self.requests[request_id]
            if request_id in broken and request_id not in finished:
                error = broken[request_id]
                log.error("structured output of %s broke: %s", request_id, error)
                outputs.append(self._fail(seq, f"the structured output failed: {error}", "model_error"))
                continue
            appended = seq.token_ids[lengths[request_id] :]  # what was kept: a stop drops the tokens after it
            if item.drafts and self.speculator is not None:
                self.speculator.accepted(request_id, len(item.drafts), len(tokens[request_id]) - 1)
            first = seq.num_output_tokens == len(appended)
            output = self._first_output(seq) if first else RequestOutput(request_id, [])
            output.new_token_ids = appended
            output.finish_reason = seq.finish_reason if request_id in finished else None
            logprobs = verified[request_id].logprobs
            output.logprobs = logprobs[: len(appended)] if logprobs is not None else None
            outputs.append(output)
        for request_id in finished - verified.keys():  # max_tokens 0: the prompt is in, and that is all
            seq = self.requests[request_id]
            output = self._first_output(seq)
            output.finish_reason = seq.finish_reason
            outputs.append(output)
        for request_id in finished:
            del self.requests[request_id]
            self._release(request_id)
        return outputs

    @staticmethod
    def _first_rows(rows: list[SampleInput], drafts: list[list[int]]) -> list[SampleInput]:
        """Each sampling request's first row."""
        firsts, start = [], 0
        for proposed in drafts:
            firsts.append(rows[start])
            start += len(proposed) + 1
        return firsts

    def _sample(
        self, logits: torch.Tensor, rows: list[SampleInput], drafts: list[list[int]], firsts: list[SampleInput]
    ) -> dict[str, Verified]:
        """Each sampling request's new tokens and their logprobs: one sampled token where it proposed none, else the
        proposed tokens it keeps and one more (`worker.spec_decode.verify`). `firsts`: each request's first row."""
        if not rows:
            return {}
        if not any(drafts):
            sampled = self.sampler.sample(logits, rows)
            return {
                row.request_id: Verified([token], None if logprobs is None else [logprobs])
                for row, token, logprobs in zip(rows, sampled.token_ids, sampled.logprobs, strict=True)
            }
        verified = verify(self.sampler, logits, rows, drafts)
        return {row.request_id: v for row, v in zip(firsts, verified, strict=True)}

    @staticmethod
    def _decodes(item: ScheduledSeq) -> bool:
        """Whether a scheduled request decodes: it feeds its last sampled token (and any proposed ones)."""
        return bool(item.drafts) or (item.num_new_tokens == 1 and item.seq.num_output_tokens > 1)

    def _propose(self) -> None:
        """Proposed tokens for the decoding requests, where they pay at the coming step's size (`Speculator`)."""
        assert self.speculator is not None
        running = self.scheduler.running
        decoding = [s for s in running if s.num_tokens - s.num_computed_tokens == 1 and s.num_output_tokens > 0]
        budget = self.step_budget
        stream = budget.stream_seconds if budget.stream_seconds is not None else budget.token_seconds
        rows = stream * len(running) if stream is not None else 0.0
        self.speculator.propose(decoding, self.max_model_len, rows / (budget.fixed + rows))

    def _first_output(self, seq: Sequence) -> RequestOutput:
        """A request's first output: what it cost to start, and its prompt's logprobs where it asked for them."""
        prompt_logprobs: list[SampleLogprobs | None] | None = None
        if seq.params.prompt_logprobs is not None:
            prompt_logprobs = [None, *seq.prompt_logprobs]
        return RequestOutput(
            seq.request_id,
            [],
            prompt_logprobs=prompt_logprobs,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            queue_seconds=seq.queue_seconds,
        )

    def _schedule_compiled(self, idle: bool) -> list[RequestOutput]:
        """Requests whose grammar has compiled join the scheduler; one that failed to compile ends with its error."""
        failed = []
        for request_id, error in self.grammar.compiled(COMPILE_WAIT if idle else 0.0):
            seq = self.requests[request_id]
            if error is None:
                self.scheduler.add(seq)
            else:
                del self.requests[request_id]
                seq.finish_reason = "error"
                self._release(request_id)
                failed.append(RequestOutput.refused(request_id, error))
        return failed

    def _allowed(self, rows: list[SampleInput], masks: dict[str, torch.Tensor]) -> list[torch.Tensor | None]:
        """Each row's grammar mask; a matcher in an error state allows only EOS, so its request ends, not rambles."""
        out: list[torch.Tensor | None] = []
        for row in rows:
            allowed = masks.get(row.request_id)
            if allowed is not None and not bool(allowed.any()):
                log.error("structured output of %s: %s", row.request_id, self.grammar.error(row.request_id))
                allowed = torch.zeros_like(allowed)
                allowed[self.eos_token_ids] = True
            out.append(allowed)
        return out

    def _release(self, request_id: str) -> None:
        self.sampler.release(request_id)
        if self.speculator is not None:
            self.speculator.release(request_id)
        self.grammar.release(request_id)

    def _fail(self, seq: Sequence, message: str, code: str) -> RequestOutput:
        """End a request with an error and free its blocks; the engine keeps serving the others."""
        if seq.request_id in self.requests:
            del self.requests[seq.request_id]
            self.scheduler.abort(seq)
            seq.finish_reason = "error"
            self._release(seq.request_id)
        return RequestOutput(seq.request_id, [], "error", error=message, error_code=code)

    def _sample_input(self, seq: Sequence, proposed: list[int]) -> SampleInput:
        """The sampler's view of `seq` after `proposed` tokens (kept ones count as output for penalties and
        min_tokens)."""
        params = seq.params
        output = seq.output_token_ids + proposed
        suppress: list[int] = []
        if len(output) < params.min_tokens and params.structured is None:  # a grammar decides its end
            suppress = list(params.stop_token_ids) + ([] if params.ignore_eos else self.eos_token_ids)
        return SampleInput(seq.request_id, params, seq.prompt_token_ids, output, suppress)

    def stats(self, step_tokens: int = 0, step_seconds: float = 0.0) -> EngineStats:
        sched = self.scheduler
        spec = self.speculator.counts if self.speculator is not None else SpecCounts()
        return EngineStats(
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
            kv_blocks_used=self.block_manager.num_used_blocks,
            kv_blocks_total=self.block_manager.num_blocks,
            prefix_cache_queries=sched.prefix_cache_queries,
            prefix_cache_hits=sched.prefix_cache_hits,
            num_preemptions=sched.num_preemptions,
            step_tokens=step_tokens,
            step_seconds=step_seconds,
            grammar_mask_seconds=self.grammar.mask_seconds,
            grammar_wait_seconds=self.grammar.wait_seconds,
            spec_num_drafts=spec.num_drafts,
            spec_num_draft_tokens=spec.num_draft_tokens,
            spec_num_accepted_tokens=spec.num_accepted_tokens,
            spec_accepted_per_position=list(spec.accepted_per_position),
        )
