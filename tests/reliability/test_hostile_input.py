"""Input built to break the server, against a real `tokenmill serve`: lone surrogates in any string of a body,
grammars too complex to enforce, bodies the JSON parser refuses. Each gets a 400 (or 415) in OpenAI's shape with a
string code, before any byte of a reply; a hostile grammar does not stall other streams; the server keeps serving.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from transformers import LlamaForCausalLM

from tests.server_harness import Server, model_entry, start_server, write_registry
from tests.worker.engine_harness import drain, make_engine
from worker.messages import SamplingParams, StructuredOutput

HOSTILE_REGEX = "(a{1000}){1000}"  # a million forced characters: llguidance's lexer gives up, after its fuel
SELF_REFERENCE = {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}  # admits no output at all
STREAM_TOKENS = 32


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("hostile-input")
    server = start_server(write_registry(tmp / "models.yaml", [model_entry(tiny_llama_dir)]), tmp)
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client(timeout=60) as client:
        yield client


@pytest.fixture(autouse=True)
def still_serving(client: httpx.Client) -> Iterator[None]:
    yield
    ok = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def post_raw(client: httpx.Client, path: str, body: str | bytes, content_type: str = "application/json") -> Any:
    return client.post(path, content=body, headers={"content-type": content_type})


def error_of(response: httpx.Response, status: int, code: str, param: str | None) -> str:
    """The OpenAI error body, with exactly this status, code and param; returns the message."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, param), error
    message: str = error["message"]
    return message


# --- lone surrogates ---------------------------------------------------------------------------------------------

LONE = "<lone>"  # replaced in the raw body by a lone surrogate's JSON escape
USER = {"role": "user", "content": "hi"}
CALL = {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": LONE}}]}


def chat(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "max_tokens": 2, "messages": list(messages), **fields}


SURROGATES = [
    # (id, path, body, param)
    ("chat-content", "/v1/chat/completions", chat({"role": "user", "content": LONE}), "messages.0.content"),
    ("chat-content-part", "/v1/chat/completions", chat({"role": "user", "content": [{"type": "text", "text": LONE}]}),
     "messages.0.content.0.text"),
    ("message-name", "/v1/chat/completions", chat({**USER, "name": LONE}), "messages.0.name"),
    ("tool-arguments", "/v1/chat/completions", chat(USER, CALL), "messages.1.tool_calls.0.function.arguments"),
    ("tool-description", "/v1/chat/completions",
     chat(USER, tools=[{"type": "function", "function": {"name": "f", "description": LONE}}]),
     "tools.0.function.description"),
    ("stop", "/v1/chat/completions", chat(USER, stop=[LONE]), "stop.0"),
    ("schema-key", "/v1/chat/completions", chat(USER, guided_json={LONE: 1}), "guided_json"),
    ("model", "/v1/chat/completions", chat(USER, model=LONE), "model"),
    ("prompt", "/v1/completions", {"model": "tiny", "prompt": LONE}, "prompt"),
    ("prompt-list", "/v1/completions", {"model": "tiny", "prompt": ["ok", LONE]}, "prompt.1"),
    ("completions-model", "/v1/completions", {"model": LONE, "prompt": "hi"}, "model"),
    ("tokenize", "/tokenize", {"model": "tiny", "prompt": LONE}, "prompt"),
    ("tokenize-model", "/tokenize", {"model": LONE, "prompt": "hi"}, "model"),
    ("detokenize-model", "/detokenize", {"model": LONE, "tokens": [1]}, "model"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "param"), [c[1:] for c in SURROGATES], ids=[c[0] for c in SURROGATES])
def test_a_lone_surrogate_anywhere_is_400(client: httpx.Client, path: str, body: dict[str, Any], param: str) -> None:
    raw = json.dumps(body).replace(LONE, "a\\ud800b")
    message = error_of(post_raw(client, path, raw), 400, "invalid_unicode", param)
    assert "surrogate" in message and param in message


def test_a_surrogate_sent_as_utf8_bytes_is_400_too(client: httpx.Client) -> None:
    # Python's json module decodes bytes with 'surrogatepass': an encoded surrogate arrives as one, like an escape.
    body = b'{"model": "tiny", "prompt": "a\xed\xa0\x80b"}'
    error_of(post_raw(client, "/v1/completions", body), 400, "invalid_unicode", "prompt")


def test_paired_surrogates_are_text(client: httpx.Client) -> None:
    response = post_raw(client, "/tokenize", '{"model": "tiny", "prompt": "\\ud83d\\ude00"}')
    assert response.status_code == 200, response.text
    emoji = client.post("/tokenize", json={"model": "tiny", "prompt": "😀"})
    assert response.json()["tokens"] == emoji.json()["tokens"]


# --- grammars ----------------------------------------------------------------------------------------------------

HOSTILE = [
    # (id, extra fields, param, words in the message)
    ("regex", {"guided_regex": HOSTILE_REGEX}, "guided_regex", "too many expressions"),
    ("schema-pattern", {"guided_json": {"type": "string", "pattern": f"^{HOSTILE_REGEX}$"}}, "guided_json",
     "too many expressions"),
    ("structured-outputs-regex", {"structured_outputs": {"regex": HOSTILE_REGEX}}, "structured_outputs.regex",
     "too many expressions"),
    ("self-reference", {"guided_json": SELF_REFERENCE}, "guided_json", "no output"),
    ("self-reference-response-format",
     {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SELF_REFERENCE}}},
     "response_format", "no output"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "param", "words"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_grammar_that_cannot_be_enforced_is_400_before_the_reply(
    client: httpx.Client, extra: dict[str, Any], param: str, words: str, stream: bool
) -> None:
    body = {"model": "tiny", "prompt": "x", "max_tokens": 4, "stream": stream, **extra}
    with client.stream("POST", "/v1/completions", json=body) as response:
        response.read()
    message = error_of(response, 400, "invalid_grammar", param)
    assert words in message and len(message) < 300  # no dump of llguidance's parser state or of the grammar
    assert "<state>" not in message and "Parser:" not in message


def test_chat_refuses_a_hostile_grammar_too(client: httpx.Client) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "guided_regex": HOSTILE_REGEX}
    error_of(client.post("/v1/chat/completions", json=body), 400, "invalid_grammar", "guided_regex")


def ref_chain(length: int) -> dict[str, Any]:
    """A schema whose $defs each refer to the next: llguidance recurses along the chain."""
    defs: dict[str, Any] = {
        f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}}, "required": ["x"]}
        for i in range(length)
    }
    return {"$ref": "#/$defs/d0", "$defs": {**defs, f"d{length}": {"type": "integer"}}}


def rule_chain(length: int) -> str:
    """A Lark grammar whose rules each name the next."""
    rules = "\n".join(f'r{i}: "x" r{i + 1} | "y"' for i in range(length))
    return f'start: r0\n{rules}\nr{length}: "z"\n'


def test_long_chains_of_rules_are_compiled_not_crashed_on(client: httpx.Client) -> None:
    # On an 8 MB stack, llguidance overflowed (the process died) at about 1000 $defs or 3000 rules in a chain.
    for extra in ({"guided_json": ref_chain(1500)}, {"guided_grammar": rule_chain(1900)}):
        response = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 4, **extra})
        assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"guided_json": ref_chain(4000)}, "guided_json", "12003 objects; at most 10000"),
        ({"guided_grammar": rule_chain(3000)}, "guided_grammar", "3002 rules; at most 2000"),
    ],
    ids=["schema", "grammar"],
)
def test_chains_too_long_to_compile_safely_are_400(
    client: httpx.Client, extra: dict[str, Any], param: str, words: str
) -> None:
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 4, **extra})
    assert words in error_of(response, 400, "invalid_grammar", param)


def stream_seconds(server: Server) -> float:
    """Seconds one plain stream of STREAM_TOKENS tokens takes, from request to [DONE]."""
    body = {"model": "tiny", "prompt": "hello", "max_tokens": STREAM_TOKENS, "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    with server.client(timeout=60) as client, client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        lines = list(response.iter_lines())
    assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]", lines[-3:]
    return time.perf_counter() - start


def test_hostile_grammars_do_not_stall_other_streams(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    alone = min(stream_seconds(server) for _ in range(3))
    statuses: list[int] = []

    def hostile(index: int) -> None:
        pattern = {"type": "string", "pattern": f"^{HOSTILE_REGEX}$"}
        extra: list[dict[str, Any]] = [{"guided_regex": HOSTILE_REGEX}, {"guided_json": pattern}]
        body = {"model": "tiny", "prompt": "x", "max_tokens": 4, **extra[index % 2]}
        with server.client(timeout=60) as client:
            statuses.append(client.post("/v1/completions", json=body).status_code)

    threads = [threading.Thread(target=hostile, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    beside = stream_seconds(server)
    for thread in threads:
        thread.join()
    with capsys.disabled():
        print(f"\n{STREAM_TOKENS}-token stream: {alone:.3f} s alone, {beside:.3f} s beside 3 hostile grammars")
    assert statuses == [400, 400, 400]
    assert beside < 2 * alone + 0.5  # before: each hostile grammar held every stream for 1-3 s


def test_the_worker_compiles_a_grammar_off_its_step(tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Past the API's check (a grammar that fails only later, or a worker driven directly), compiling a grammar
    still never holds the engine's step: a plain request runs on while three hostile ones compile beside it."""
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    engine = make_engine(model, tokenizer_dir=str(tiny_llama_dir))
    warm = StructuredOutput("regex", "[0-9]+", "guided_regex")  # builds llguidance's tokenizer once
    engine.add_request("warm", [1, 2, 3], SamplingParams(max_tokens=2, structured=warm))
    drain(engine)
    plain = SamplingParams(max_tokens=STREAM_TOKENS, ignore_eos=True, temperature=0.0)
    finish: dict[str, str] = {}

    def plain_seconds(name: str) -> float:
        start = time.perf_counter()
        engine.add_request(name, [5, 6, 7, 8], plain)
        while name not in finish:
            finish.update((out.request_id, out.finish_reason) for out in engine.step().outputs if out.finish_reason)
        return time.perf_counter() - start

    alone = min(plain_seconds(f"alone-{i}") for i in range(3))
    hostile = StructuredOutput("regex", HOSTILE_REGEX, "guided_regex")
    for i in range(3):
        engine.add_request(f"hostile-{i}", [1, 2, 3], SamplingParams(max_tokens=4, structured=hostile))
    beside = plain_seconds("beside")
    finish.update(drain(engine).finish)
    with capsys.disabled():
        print(f"\nengine, {STREAM_TOKENS} tokens: {alone:.3f} s alone, {beside:.3f} s beside 3 hostile grammars")
    assert [finish[f"hostile-{i}"] for i in range(3)] == ["error"] * 3 and finish["beside"] == "length"
    assert beside < 2 * alone + 0.5, (alone, beside)  # before: the step waited for each hostile first mask


# --- bodies the parser refuses (invalid UTF-8 and deep nesting: test_bad_input) ---------------------------------


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_json_without_a_json_content_type_is_415_saying_so(client: httpx.Client, content_type: str | None) -> None:
    body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2}).encode()
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/v1/completions", content=body, headers=headers)  # httpx adds no type of its own
    message = error_of(response, 415, "unsupported_media_type", None)
    assert "Content-Type: application/json" in message and (content_type or "no Content-Type") in message


def test_a_json_content_type_with_parameters_is_json(client: httpx.Client) -> None:
    body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert post_raw(client, "/v1/completions", body, "application/json; charset=utf-8").status_code == 200


@pytest.mark.parametrize(
    ("prompt", "words"),
    [("", "empty"), ([1, 2, 100_000], "outside the vocabulary")],
    ids=["empty-prompt", "token-outside-vocab"],
)
def test_bad_prompts_have_a_code(client: httpx.Client, prompt: Any, words: str) -> None:
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 2})
    assert words in error_of(response, 400, "invalid_value", "prompt")
