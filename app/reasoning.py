"""Reasoning output: the thinking a model writes between `<think>` and `</think>` (DeepSeek-R1, Qwen3, QwQ) goes to
its own field, apart from the answer. One splitter, fed text as it comes, serves the streamed and the whole reply.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from app.errors import APIError
from app.tool_calls import partial_marker
from worker.messages import StructuredOutput

OPEN, CLOSE = "<think>", "</think>"
ReasoningParser = Literal["auto", "deepseek_r1", "none"]
_State = Literal["start", "reasoning", "after", "content"]


def parses_reasoning(parser: ReasoningParser, chat_template: str | None) -> bool:
    """Whether replies are split: models.yaml's `reasoning_parser`, or for auto, a template that writes the markers."""
    if parser != "auto":
        return parser == "deepseek_r1"
    return chat_template is not None and (OPEN in chat_template or CLOSE in chat_template)


def prompt_opens_thinking(prompt_tail: str) -> bool:
    """Whether the rendered prompt ends inside an open `<think>` (the generation prompt wrote it), so the output
    starts in the thinking."""
    return prompt_tail.rstrip().endswith(OPEN)


THINKING_CONSTRAINT = "reasoning_with_structured_output"  # the code of answer_constraint's refusal
# The constraints that stand for the answer's shape (a JSON reply, a forced tool call), not the whole output's.
_ANSWER_CONSTRAINTS = {"response_format": "response_format", "text.format": "text", "text.format.schema": "text"}


def answer_constraint(model: str, constraint: StructuredOutput | None) -> StructuredOutput | None:
    """The constraint to apply where the prompt opened the thinking. A grammar applies from the first generated token,
    so a JSON format (`response_format`, the Responses API's `text.format`), which stands for the answer's shape,
    starts after `</think>`: the thinking runs free up to it. A forced tool call is refused (400) rather than silently
    changing what the model does. vLLM's regex, choice, grammar and JSON fields constrain the whole output as asked,
    thinking included."""
    if constraint is None:
        return None
    if constraint.param in _ANSWER_CONSTRAINTS and constraint.kind in ("json", "json_object"):
        return msgspec.structs.replace(constraint, after=CLOSE)
    if constraint.param != "tools":
        return constraint
    raise APIError.invalid_request(
        f"model '{model}' thinks before it answers (its chat template opened <think>), and tool_choice would force "
        'the thinking too: turn thinking off (chat_template_kwargs {"enable_thinking": false} where the template '
        "reads it), or let the model choose (tool_choice auto)",
        param="tool_choice",
        code=THINKING_CONSTRAINT,
    )


class ReasoningSplitter:
    """Feed it a reply's text deltas; each call answers (reasoning, content) that can be shown so far. A piece that may
    be the start of a marker is held until the next delta or `finish` decides it, so any chunking of a reply splits it
    exactly as the whole text does.

    The reply is thinking until `</think>` when the prompt opened it, or when the output itself starts with `<think>`;
    an output that starts with anything else is all content. Whitespace between `</think>` and the answer is dropped.
    """

    def __init__(self, thinking: bool) -> None:
        self.state: _State = "reasoning" if thinking else "start"
        self.buffer = ""

    def feed(self, text: str) -> tuple[str, str]:
        self.buffer += text
        reasoning, content = "", ""
        while self.buffer:
            if self.state == "start":
                stripped = self.buffer.lstrip()
                if stripped.startswith(OPEN):
                    self.state, self.buffer = "reasoning", stripped[len(OPEN) :]
                elif OPEN.startswith(stripped):
                    break  # nothing but whitespace, or the start of `<think>`: undecided
                else:
                    self.state = "content"
            elif self.state == "reasoning":
                at = self.buffer.find(CLOSE)
                if at < 0:
                    shown = len(self.buffer) - partial_marker(self.buffer, CLOSE)
                    reasoning, self.buffer = reasoning + self.buffer[:shown], self.buffer[shown:]
                    break
                reasoning, self.buffer = reasoning + self.buffer[:at], self.buffer[at + len(CLOSE) :]
                self.state = "after"
            elif self.state == "after":
                self.buffer = self.buffer.lstrip()
                if self.buffer:
                    self.state = "content"
            else:
                content, self.buffer = content + self.buffer, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What is still held when the reply ends: unfinished thinking stays thinking, an undecided start is content."""
        rest, self.buffer = self.buffer, ""
        if self.state == "reasoning":
            return rest, ""
        return "", rest if self.state in ("start", "content") else ""

    def split_all(self, text: str) -> tuple[str, str]:
        """A whole reply, split as its stream would be."""
        reasoning, content = self.feed(text)
        more_reasoning, more_content = self.finish()
        return reasoning + more_reasoning, content + more_content
