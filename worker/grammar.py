"""Structured outputs as llguidance grammars. No torch here: the API process checks a request's constraint before
queueing it, and the worker compiles the same grammar against its tokenizer (worker.structured).

llguidance was chosen over xgrammar (loadtests/bench_grammar.py, results/bench_grammar.txt): it compiles a JSON
schema in 1.6 ms against xgrammar's 15 ms, and compiling happens on the request's path in the worker loop, while
masks (40 us per token against xgrammar's 3 us) are computed beside the forward and cost the step nothing; it needs
no other package (xgrammar pulls in triton and apache-tvm-ffi); and one library covers JSON Schema, regular
expressions, Lark and GBNF grammars.
"""

from __future__ import annotations

import json

from llguidance import LLMatcher
from llguidance.gbnf_to_lark import any_to_lark

from worker.messages import InvalidRequest, StructuredOutput

KINDS = ("json", "json_object", "regex", "choice", "grammar")

# Compact JSON (no free whitespace): fewer tokens, and no way for a small model to ramble in blank space.
_JSON_OPTIONS = {"whitespace_flexible": False}


def to_grammar(structured: StructuredOutput) -> str:
    """The llguidance grammar for a constraint; InvalidRequest when it cannot be one."""
    kind, spec = structured.kind, structured.spec
    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=_JSON_OPTIONS)  # type: ignore[arg-type]
    if kind == "json":
        try:
            schema = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(structured.param, f"is not valid JSON: {exc}") from exc
        if not isinstance(schema, dict | bool):
            raise InvalidRequest(structured.param, "must be a JSON schema object")
        return LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)  # type: ignore[arg-type]
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
        return LLMatcher.grammar_from_lark(lark)
    raise InvalidRequest(structured.param, f"unknown kind '{kind}'; use one of {', '.join(KINDS)}")


def check(structured: StructuredOutput) -> str:
    """The grammar, validated without a tokenizer; InvalidRequest saying what is wrong."""
    grammar = to_grammar(structured)
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidRequest(structured.param, f"is not a valid {structured.kind}: {error.strip()}")
    return grammar
