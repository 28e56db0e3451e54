"""Structured outputs in the engine, with the real default model: every constrained output parses and validates, a
constraint that allows what the model says anyway changes none of its tokens, constrained rows leave their
neighbours in the batch untouched, and a bad grammar is refused before anything is queued."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import jsonschema
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tests.worker.engine_harness import drain, make_engine, run_all
from worker.engine import Engine
from worker.messages import InvalidRequest, SamplingParams, StructuredOutput

pytestmark = pytest.mark.slow

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
TOPICS = [
    "a doctor in Paris", "a child who loves trains", "a retired sailor", "a software engineer", "a baker in Rome",
    "a football coach", "a jazz pianist", "a student of physics", "a farmer", "a librarian",
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def engine(smollm2_dir: Path) -> Engine:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype="float32").eval()
    return make_engine(model, num_blocks=1024, block_size=16, tokenizer_dir=str(smollm2_dir))


def decode(tokenizer: PreTrainedTokenizerBase, tokens: list[int]) -> str:
    return cast(str, tokenizer.decode(tokens, skip_special_tokens=True))


def chat(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
    return cast(list[int], tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))


def json_params(max_tokens: int = 160, **kwargs: Any) -> SamplingParams:
    structured = StructuredOutput("json", json.dumps(PERSON))
    return SamplingParams(max_tokens=max_tokens, structured=structured, **kwargs)


def test_json_schema_outputs_always_validate(
    engine: Engine, tokenizer: PreTrainedTokenizerBase, capsys: pytest.CaptureFixture[str]
) -> None:
    """Twenty prompts at once, half greedy and half sampled: every output parses and satisfies the schema."""
    for i, topic in enumerate(TOPICS * 2):
        sampled = i >= len(TOPICS)
        params = json_params(temperature=0.8 if sampled else 0.0, seed=i if sampled else None)
        engine.add_request(f"p{i}", chat(tokenizer, f"Describe {topic} as a JSON object."), params)
    mask_before, wait_before, steps_before = engine.grammar.mask_seconds, engine.grammar.wait_seconds, engine.step_count
    run = run_all(engine, {}, SamplingParams())
    assert len(run.tokens) == 20
    for request_id, tokens in run.tokens.items():
        assert run.finish[request_id] == "stop", f"{request_id} did not finish its JSON: {tokenizer.decode(tokens)}"
        jsonschema.validate(json.loads(decode(tokenizer, tokens)), PERSON)
    steps = engine.step_count - steps_before
    mask_ms = (engine.grammar.mask_seconds - mask_before) / steps * 1e3
    wait_ms = (engine.grammar.wait_seconds - wait_before) / steps * 1e3
    with capsys.disabled():
        print(f"\ngrammar masks for 20 rows: {mask_ms:.2f} ms per step computed, {wait_ms:.2f} ms per step waited")


def test_a_constraint_that_allows_the_models_own_answer_changes_no_token(
    engine: Engine, tokenizer: PreTrainedTokenizerBase
) -> None:
    prompt = chat(tokenizer, "What is the capital of France?")
    free = run_all(engine, {"free": prompt}, SamplingParams(max_tokens=24, temperature=0.0)).tokens["free"]
    text = tokenizer.decode(free[:12])
    regex = "".join("\\" + c if c in r"\.+*?()|[]{}^$#&-~" else c for c in text) + r"[\s\S]*"
    params = SamplingParams(max_tokens=24, temperature=0.0, structured=StructuredOutput("regex", regex, "guided_regex"))
    constrained = run_all(engine, {"constrained": prompt}, params).tokens["constrained"]
    assert constrained == free


def test_constrained_rows_leave_their_neighbours_alone(engine: Engine, tokenizer: PreTrainedTokenizerBase) -> None:
    prompts = {f"q{i}": chat(tokenizer, question) for i, question in enumerate(["hi", "Name a color.", "2+2?"])}
    plain = SamplingParams(max_tokens=16, temperature=0.0)
    alone = run_all(engine, prompts, plain).tokens
    for i, topic in enumerate(TOPICS[:4]):
        engine.add_request(f"j{i}", chat(tokenizer, f"Describe {topic} as JSON."), json_params())
    mixed = run_all(engine, prompts, plain).tokens
    assert {rid: mixed[rid] for rid in prompts} == alone


def test_choice_and_grammar(engine: Engine, tokenizer: PreTrainedTokenizerBase) -> None:
    choice = StructuredOutput("choice", json.dumps(["Paris", "London", "Berlin"]), "guided_choice")
    grammar = StructuredOutput("grammar", 'root ::= "The answer is " [0-9]+ "."', "guided_grammar")
    run = run_all(engine, {"c": chat(tokenizer, "Capital of France?")}, SamplingParams(max_tokens=8, structured=choice))
    assert decode(tokenizer, run.tokens["c"]) in ("Paris", "London", "Berlin")
    params = SamplingParams(max_tokens=16, temperature=0.0, structured=grammar)
    run = run_all(engine, {"g": chat(tokenizer, "What is 12 times 12?")}, params)
    text = decode(tokenizer, run.tokens["g"])
    assert text.startswith("The answer is ") and text.endswith(".") and text[14:-1].isdigit()


@pytest.mark.parametrize(
    ("structured", "words"),
    [
        (StructuredOutput("json", '{"type": "objec"}'), "objec"),
        (StructuredOutput("json", "{not json"), "not valid JSON"),
        (StructuredOutput("regex", "(unclosed", "guided_regex"), "unclosed group"),
        (StructuredOutput("choice", "[]", "guided_choice"), "non-empty list"),
        # SmolLM2 has no </think> token: an answer format cannot start after it
        (StructuredOutput("json_object", after="</think>"), 'unknown special token: "</think>"'),
        (StructuredOutput("regex", "a+", "guided_regex", after="</think>"), "applies to the whole output"),
        (StructuredOutput("json_object", after="</think"), "not a special token"),
    ],
)
def test_a_bad_constraint_is_refused_before_it_runs(engine: Engine, structured: StructuredOutput, words: str) -> None:
    """At once when it cannot even be a grammar; else once its compiling (off the step) fails, before any token."""
    param: str | None
    try:
        engine.add_request("bad", [1, 2, 3], SamplingParams(structured=structured))
    except InvalidRequest as refused:
        error, param = str(refused), refused.param
    else:
        [output] = drain(engine).steps[-1].outputs
        assert (output.finish_reason, output.error_code, output.new_token_ids) == ("error", "invalid_request", [])
        error, param = output.error or "", output.error_param
    assert param == structured.param and words in error
    assert "bad" not in engine.requests and not engine.has_work()
