"""Structured outputs as llguidance grammars. No torch here: the API process compiles and tries a request's
constraint against the model's tokenizer before queueing it (`probe`), and the worker compiles the same grammar, with
the same limits, off its engine step (worker.structured).

llguidance was chosen over xgrammar (loadtests/bench_grammar.py, results/bench_grammar.txt): it compiles a JSON
schema in 1.6 ms against xgrammar's 15 ms, and compiling happens on each request's path, while masks (40 us per
token against xgrammar's 3 us) are computed beside the forward and cost the step nothing; it needs
no other package (xgrammar pulls in triton and apache-tvm-ffi); and one library covers JSON Schema, regular
expressions, Lark and GBNF grammars.
"""

from __future__ import annotations

import json
import queue
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from llguidance import LLMatcher, LLParserLimits, LLTokenizer
from llguidance.gbnf_to_lark import any_to_lark

from worker.messages import InvalidRequest, StructuredOutput

KINDS = ("json", "json_object", "regex", "choice", "grammar")

# Compact JSON (no free whitespace): fewer tokens, and no way for a small model to ramble in blank space.
_JSON_OPTIONS = {"whitespace_flexible": False}

# llguidance's defaults, but for the lexer's initial fuel: at its default (1M) a regex such as (a{1000}){1000} costs
# 1-2 s of CPU before it fails, at 200k about 0.2 s, and no schema or expression we tried that compiles at all needs
# more than 100k. Errors stay short: the verbose ones dump the parser's state and the whole grammar.
LEXER_FUEL = 200_000
PROBE_TOKENS = 8  # tokens `probe` walks
PROBE_SECONDS = 2.0  # and the time it may take, between tokens; each token's work is bounded by the limits
_NO_OUTPUT = "NoExtensionBias"  # llguidance's word for a grammar that admits no output at all

# llguidance recurses along chains of rules (a JSON schema's $refs, a Lark rule naming the next): on an 8 MB stack a
# chain of about 1000 $defs or 3000 rules overflows it and the process dies. Grammars are compiled on threads with a
# deep stack (GrammarThreads), and sizes are capped well below what that stack holds (about 30x).
STACK_BYTES = 256 << 20
MAX_SCHEMA_OBJECTS = 10_000  # JSON objects in a schema (or '{' in a grammar, which may embed schemas)
MAX_GRAMMAR_RULES = 2_000
_RULE = re.compile(r"^[ \t]*[?!]?[A-Za-z_][A-Za-z_0-9]*(?:\.-?[0-9]+)?[ \t]*:", re.MULTILINE)
T = TypeVar("T")


def limits() -> LLParserLimits:
    return LLParserLimits(initial_lexer_fuel=LEXER_FUEL, verbose_errors=False)


def to_grammar(structured: StructuredOutput) -> str:
    """The llguidance grammar for a constraint; InvalidRequest when it cannot be one."""
    kind, spec = structured.kind, structured.spec
    if structured.after:
        return _after(structured)
    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=_JSON_OPTIONS)  # type: ignore[arg-type]
    if kind == "json":
        return LLMatcher.grammar_from_json_schema(_schema(structured), overrides=_JSON_OPTIONS)  # type: ignore[arg-type]
    if kind == "regex":
        return LLMatcher.grammar_from_regex(spec)
    if kind == "choice":
        choices = json.loads(spec)
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise InvalidRequest(structured.param, "must be a non-empty list of non-empty strings")
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    if kind == "grammar":
        try:
            lark = any_to_lark(spec)
        except Exception as exc:  # the GBNF converter raises its own error types
            raise InvalidRequest(structured.param, f"is not a valid grammar: {exc}") from exc
        _cap(structured, "rules", len(_RULE.findall(lark)), MAX_GRAMMAR_RULES)
        _cap(structured, "'{' (JSON objects or {n} repeats)", lark.count("{"), MAX_SCHEMA_OBJECTS)
        return LLMatcher.grammar_from_lark(lark)
    raise InvalidRequest(structured.param, f"unknown kind '{kind}'; use one of {', '.join(KINDS)}")


def _schema(structured: StructuredOutput) -> dict[str, Any] | bool:
    try:
        schema = json.loads(structured.spec)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InvalidRequest(structured.param, f"is not valid JSON: {exc}") from exc
    if not isinstance(schema, dict | bool):
        raise InvalidRequest(structured.param, "must be a JSON schema object")
    _cap(structured, "objects", _count_objects(schema), MAX_SCHEMA_OBJECTS)
    return schema


def _after(structured: StructuredOutput) -> str:
    """Free text up to the special token `structured.after` (`</think>`: one token in the tokenizers of Qwen3,
    DeepSeek-R1 and QwQ; the model writes it itself, as the text cannot), then the JSON the constraint asks for,
    after at most two newlines (Qwen3 writes a blank line after </think>; more blank space would let a model ramble
    in it). A tokenizer without that token refuses the grammar by name."""
    if structured.kind not in ("json", "json_object"):
        raise InvalidRequest(structured.param, f"a {structured.kind} constraint applies to the whole output")
    if not re.fullmatch(r"<[^<>\s]+>", structured.after):
        raise InvalidRequest(structured.param, f"cannot start after {structured.after!r}: not a special token")
    schema = {"type": "object"} if structured.kind == "json_object" else _schema(structured)
    if isinstance(schema, dict):
        schema = {**schema, "x-guidance": _JSON_OPTIONS}
    lark = (
        "start: free answer\n"
        f"free: FREE {structured.after}\n"
        "FREE: /(.|\\n)*/\n"
        f"answer: /\\n{{0,2}}/ %json {json.dumps(schema)}\n"
    )
    return LLMatcher.grammar_from_lark(lark)


def _cap(structured: StructuredOutput, what: str, count: int, limit: int) -> None:
    if count > limit:
        raise InvalidRequest(structured.param, f"is too large to enforce: it has {count} {what}; at most {limit}")


def _count_objects(value: Any) -> int:
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            count += 1
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def validate(structured: StructuredOutput, grammar: str) -> str:
    """`grammar` (from `to_grammar`) validated without a tokenizer; InvalidRequest saying what is wrong. Call it on
    a GrammarThreads thread: llguidance compiles the grammar here."""
    error = LLMatcher.validate_grammar(grammar, limits=limits())
    if error:
        raise InvalidRequest(structured.param, f"is not a valid {structured.kind}: {short(error)}")
    return grammar


def check(structured: StructuredOutput) -> str:
    """The grammar, validated without a tokenizer; on a GrammarThreads thread, as `validate`."""
    return validate(structured, to_grammar(structured))


def compile_matcher(tokenizer: LLTokenizer, structured: StructuredOutput, grammar: str) -> LLMatcher:
    """The request's matcher, run to its first mask: llguidance builds its lexer lazily, and that first mask is where
    a hostile expression costs its time. InvalidRequest when the grammar cannot be enforced."""
    matcher = LLMatcher(tokenizer, grammar, log_level=0, limits=limits())
    if not matcher.is_error():
        matcher.compute_bitmask()  # drops the GIL, unlike compute_ff_bytes
    if matcher.is_error():
        raise _unenforceable(structured, matcher)
    return matcher


class GrammarThreads:
    """A few threads with a deep stack (STACK_BYTES) for llguidance's compiling; `submit` as an executor's."""

    def __init__(self, count: int, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None]
        self._jobs = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(count)]
        previous = threading.stack_size(STACK_BYTES)  # for the threads started now (virtual memory, touched as used)
        try:
            for thread in self._threads:
                thread.start()
        finally:
            threading.stack_size(previous)

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        future: Future[T] = Future()
        self._jobs.put((future, fn, args))
        return future

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # the caller's to see, as a pool's future has it
                future.set_exception(exc)

    def shutdown(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)


def probe(tokenizer: LLTokenizer, structured: StructuredOutput) -> None:
    """Compile the constraint and walk a few tokens of it (the lowest allowed id each time, never EOS), the way the
    worker will: a grammar too complex for the limits, or one that admits no output, fails here with InvalidRequest
    instead of in the worker's step. Bounded: each token's work by the limits, the walk by PROBE_SECONDS. Call it on a
    GrammarThreads thread."""
    matcher = compile_matcher(tokenizer, structured, check(structured))
    eos = 0
    for token in tokenizer.eos_tokens:
        eos |= 1 << token
    deadline = time.monotonic() + PROBE_SECONDS
    for _ in range(PROBE_TOKENS):
        allowed = int.from_bytes(matcher.compute_bitmask(), "little") & ~eos
        if matcher.is_error():
            raise _unenforceable(structured, matcher)
        if not allowed:
            return  # the output may (only) end here
        if not matcher.consume_token((allowed & -allowed).bit_length() - 1):
            raise _unenforceable(structured, matcher)
        if time.monotonic() > deadline:
            raise InvalidRequest(structured.param, f"is too complex: its grammar took over {PROBE_SECONDS:g} s")


def short(error: str) -> str:
    """llguidance's message without its parser-state and grammar dumps, on one line."""
    for marker in ("<state>", "<grammar>", "<non-verbose/>"):
        error = error.split(marker, 1)[0]
    error = " ".join(error.split())
    return error if len(error) <= 300 else error[:297] + "..."


def _unenforceable(structured: StructuredOutput, matcher: LLMatcher) -> InvalidRequest:
    error = short(matcher.get_error())
    if error == _NO_OUTPUT:
        return InvalidRequest(structured.param, "admits no output at all (a schema that only refers to itself?)")
    return InvalidRequest(structured.param, f"cannot be enforced: {error}")
