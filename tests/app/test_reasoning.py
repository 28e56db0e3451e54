"""The reasoning splitter: thinking between `<think>` and `</think>` apart from the answer, whole and streamed in any
chunks alike; which models split (models.yaml or the template); which constraints a thinking prompt refuses."""

from __future__ import annotations

import random
from itertools import pairwise

import pytest

from app.errors import APIError
from app.reasoning import ReasoningSplitter, answer_constraint, parses_reasoning, prompt_opens_thinking
from worker.messages import StructuredOutput

# (the prompt opened the thinking, output, reasoning, content)
CASES = [
    (True, "let me see</think>\n\nParis.", "let me see", "Paris."),
    (True, "still thinking when it ran out", "still thinking when it ran out", ""),
    (True, "</think>Paris.", "", "Paris."),
    (True, "a < b and </thin is not it</think> ok", "a < b and </thin is not it", "ok"),
    (False, "<think>\nhmm\n</think>\n\nParis.", "\nhmm\n", "Paris."),
    (False, "  <think>hmm</think>Paris.", "hmm", "Paris."),
    (False, "Paris.", "", "Paris."),
    (False, "Paris <think>is</think> nice", "", "Paris <think>is</think> nice"),
    (False, "<thin", "", "<thin"),
    (False, "  ", "", "  "),
    (False, "", "", ""),
    (False, "<think>unfinished </thi", "unfinished </thi", ""),
    (True, "a</think>b</think>c", "a", "b</think>c"),
    (True, "é 🙂 思考</think>答え", "é 🙂 思考", "答え"),
]


def streamed(thinking: bool, text: str, cuts: list[int]) -> tuple[str, str]:
    splitter, reasoning, content = ReasoningSplitter(thinking), "", ""
    bounds = [0, *cuts, len(text)]
    for start, end in pairwise(bounds):
        more_reasoning, more_content = splitter.feed(text[start:end])
        reasoning, content = reasoning + more_reasoning, content + more_content
    rest_reasoning, rest_content = splitter.finish()
    return reasoning + rest_reasoning, content + rest_content


@pytest.mark.parametrize(("thinking", "text", "reasoning", "content"), CASES)
def test_whole_replies(thinking: bool, text: str, reasoning: str, content: str) -> None:
    assert ReasoningSplitter(thinking).split_all(text) == (reasoning, content)


@pytest.mark.parametrize(("thinking", "text", "reasoning", "content"), CASES)
def test_any_chunking_splits_the_same(thinking: bool, text: str, reasoning: str, content: str) -> None:
    for cut in range(len(text) + 1):
        assert streamed(thinking, text, [cut]) == (reasoning, content), f"split at {cut}"
    assert streamed(thinking, text, list(range(1, len(text)))) == (reasoning, content)
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, len(text))))
        assert streamed(thinking, text, cuts) == (reasoning, content), f"cuts {cuts}"


def test_a_partial_marker_is_held_not_shown() -> None:
    splitter = ReasoningSplitter(True)
    assert splitter.feed("so the answer is 4</th") == ("so the answer is 4", "")
    assert splitter.feed("ink>") == ("", "")  # the whitespace after </think> may still come
    assert splitter.feed("\n\n4") == ("", "4")
    start = ReasoningSplitter(False)
    assert start.feed("\n<thi") == ("", "")
    assert start.feed("nk>x") == ("x", "")


def test_which_models_split() -> None:
    assert parses_reasoning("auto", "{{ messages }}<|im_start|>assistant\n<think>\n")
    assert parses_reasoning("auto", "{{ message.content.split('</think>')[-1] }}")
    assert not parses_reasoning("auto", "{{ messages }}")
    assert not parses_reasoning("auto", None)
    assert parses_reasoning("deepseek_r1", "{{ messages }}")
    assert not parses_reasoning("none", "<think>")


def test_thinking_starts_where_the_prompt_opened_it() -> None:
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert prompt_opens_thinking("<｜Assistant｜><think>")
    assert not prompt_opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n")


@pytest.mark.parametrize("param", ["response_format", "text.format.schema", "text.format"])
@pytest.mark.parametrize("kind", ["json", "json_object"])
def test_an_answer_format_starts_after_the_thinking(param: str, kind: str) -> None:
    constraint = StructuredOutput(kind, '{"type": "object"}' if kind == "json" else "", param)
    assert answer_constraint("m", constraint) == StructuredOutput(constraint.kind, constraint.spec, param, "</think>")


def test_a_forced_tool_call_is_refused_while_thinking() -> None:
    with pytest.raises(APIError) as caught:
        answer_constraint("m", StructuredOutput("grammar", "start: x", "tools"))
    assert caught.value.status == 400 and caught.value.param == "tool_choice"
    assert "enable_thinking" in caught.value.message


@pytest.mark.parametrize("param", ["structured_outputs.regex", "guided_regex", "guided_json", "guided_grammar"])
def test_whole_output_constraints_are_kept(param: str) -> None:
    constraint = StructuredOutput("regex", "[a-z]+</think>[a-z]+", param)
    assert answer_constraint("m", constraint) is constraint
    assert answer_constraint("m", None) is None
