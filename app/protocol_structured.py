"""Structured-output fields of a request: OpenAI's `response_format`, vLLM's `guided_*` extensions and its
`structured_outputs` object, reduced to the one `StructuredOutput` constraint the worker enforces."""

from __future__ import annotations

import json
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from worker.messages import StructuredOutput


def _invalid(param: str, message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_request", "{message}", {"message": message, "param": param, "code": None})


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
            raise _invalid("json_schema", "json_schema is required with type 'json_schema', and only there")
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
        found: list[StructuredOutput] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(StructuredOutput("json_object", param="response_format"))
        if rf is not None and rf.json_schema is not None:
            found.append(StructuredOutput("json", json.dumps(rf.json_schema.json_schema), "response_format"))
        if self.guided_json is not None:
            found.append(StructuredOutput("json", _text(self.guided_json), "guided_json"))
        if self.guided_regex is not None:
            found.append(StructuredOutput("regex", self.guided_regex, "guided_regex"))
        if self.guided_choice is not None:
            found.append(StructuredOutput("choice", json.dumps(self.guided_choice), "guided_choice"))
        if self.guided_grammar is not None:
            found.append(StructuredOutput("grammar", self.guided_grammar, "guided_grammar"))
        so = self.structured_outputs
        if so is not None:
            if so.json_schema is not None:
                found.append(StructuredOutput("json", _text(so.json_schema), "structured_outputs.json"))
            if so.regex is not None:
                found.append(StructuredOutput("regex", so.regex, "structured_outputs.regex"))
            if so.choice is not None:
                found.append(StructuredOutput("choice", json.dumps(so.choice), "structured_outputs.choice"))
            if so.grammar is not None:
                found.append(StructuredOutput("grammar", so.grammar, "structured_outputs.grammar"))
            if so.json_object:
                found.append(StructuredOutput("json_object", param="structured_outputs.json_object"))
        if len(found) > 1:
            names = ", ".join(item.param for item in found)
            raise _invalid(found[1].param, f"send one structured output constraint, not several ({names})")
        return found[0] if found else None


def _text(schema: dict[str, Any] | str) -> str:
    return schema if isinstance(schema, str) else json.dumps(schema)
