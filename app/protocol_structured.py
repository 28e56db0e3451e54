"""Structured-output fields of a request: OpenAI's `response_format`, vLLM's `guided_*` extensions and its
`structured_outputs` object, reduced to the one `StructuredOutput` constraint the worker enforces."""

from __future__ import annotations

import json
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.errors import invalid
from worker.messages import StructuredOutput


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class JsonSchemaFormat(_Strict):
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_needed(self) -> Self:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise invalid("json_schema", "json_schema is required with type 'json_schema', and only there", code=None)
        return self


class StructuredOutputsParams(_Strict):
    """vLLM's `structured_outputs`: exactly one of its fields."""

    json_schema: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class StructuredFields(BaseModel):
    """The request fields; mixed into the chat and completions requests."""

    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputsParams | None = None

    @model_validator(mode="after")
    def _one_constraint(self) -> Self:
        self.structured_output()
        return self

    def structured_output(self) -> StructuredOutput | None:
        """The one constraint the request asks for; more than one is refused (which would win is not obvious)."""
        rf, so = self.response_format, self.structured_outputs
        candidates: list[tuple[str, Any, str]] = [  # (kind, value or None, the field it came from)
            ("json_object", (rf is not None and rf.type == "json_object") or None, "response_format"),
            ("json", rf.json_schema.json_schema if rf is not None and rf.json_schema else None, "response_format"),
            ("json", self.guided_json, "guided_json"),
            ("regex", self.guided_regex, "guided_regex"),
            ("choice", self.guided_choice, "guided_choice"),
            ("grammar", self.guided_grammar, "guided_grammar"),
        ]
        if so is not None:
            candidates += [
                ("json", so.json_schema, "structured_outputs.json"),
                ("regex", so.regex, "structured_outputs.regex"),
                ("choice", so.choice, "structured_outputs.choice"),
                ("grammar", so.grammar, "structured_outputs.grammar"),
                ("json_object", so.json_object or None, "structured_outputs.json_object"),
            ]
        given = [(kind, value, param) for kind, value, param in candidates if value is not None]
        found = [StructuredOutput(kind, _spec(kind, value), param) for kind, value, param in given]
        if len(found) > 1:
            names = ", ".join(item.param for item in found)
            raise invalid(found[1].param, f"send one structured output constraint, not several ({names})", code=None)
        return found[0] if found else None


def _spec(kind: str, value: Any) -> str:
    """The constraint as the worker's text: a schema or choice list as JSON, a regex or grammar as it is."""
    if kind == "json_object":
        return ""
    return value if isinstance(value, str) else json.dumps(value)
