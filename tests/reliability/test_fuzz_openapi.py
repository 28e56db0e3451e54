"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis): valid and invalid requests to
every operation, for a bounded number of cases. No case may get a 5xx, every refusal takes the shape of the API its
path belongs to (Anthropic's under /v1/messages, OpenAI's elsewhere), and the server still answers afterwards."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from app.anthropic.errors import speaks_anthropic
from tests.server_harness import Server, model_entry, start_server, write_registry

schemathesis = pytest.importorskip("schemathesis")

KEY = "fuzz-key"
CASES_PER_MODE = 50  # per operation and generation mode (valid, invalid)


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("fuzz")
    entry = model_entry(tiny_llama_dir)
    args = ("--api-key", KEY, "--request-timeout", "20", "--body-read-timeout", "5")
    server = start_server(write_registry(tmp / "models.yaml", [entry]), tmp, *args)
    yield server
    assert server.stop() == 0


def check_response(response: requests.Response) -> None:
    assert response.status_code < 500, f"{response.request.method} {response.request.url}: {response.text[:2000]}"
    if response.status_code >= 400:
        body = response.json()
        error = body["error"]
        if speaks_anthropic(urlsplit(response.request.url or "").path):
            assert body["type"] == "error" and set(error) == {"type", "message"}, response.text
        else:
            assert set(error) == {"message", "type", "param", "code"}, response.text
        assert error["message"] and error["type"], response.text


def test_no_input_from_the_schema_gets_a_server_error(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {KEY}"
    statuses: Counter[int] = Counter()
    cases = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @settings(
                max_examples=CASES_PER_MODE,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode), real_model=st.booleans())
            def run(case: Any, real_model: bool) -> None:
                nonlocal cases
                if real_model and isinstance(case.body, dict) and "model" in case.body:
                    case.body["model"] = "tiny"  # reach past the model lookup in half of the cases
                response = case.call(base_url=server.base_url, session=session, timeout=60)
                cases += 1
                statuses[response.status_code] += 1
                check_response(response)

            try:
                run()
            except Unsatisfiable:  # an operation without parameters or body has no invalid form
                assert mode == schemathesis.GenerationMode.NEGATIVE, operation.path
    with capsys.disabled():
        print(f"\nschemathesis: {cases} cases, statuses {dict(sorted(statuses.items()))}")
    assert cases >= 100 and statuses[200] > 0 and sum(n for s, n in statuses.items() if s >= 400) > 0
    answer = session.post(f"{server.base_url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert answer.status_code == 200
