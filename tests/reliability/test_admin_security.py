"""The edges of an exposed server: credentials in a query string never reach the access log."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app.access_log import redact_query
from tests.server_harness import Server, model_entry, start_server, wait_until, write_registry

API_KEY = "api-key-for-tests"


@pytest.fixture(scope="module")
def keyed_server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("admin-keyed")
    registry = write_registry(tmp / "models.yaml", [model_entry(tiny_llama_dir, load="lazy")])  # no worker needed
    server = start_server(registry, tmp, "--api-key", API_KEY)
    yield server
    assert server.stop() == 0


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_credentials_in_the_query_string_are_not_logged(keyed_server: Server) -> None:
    with keyed_server.client() as client:
        assert client.get("/v1/models?api_key=secret-xyz&limit=2").status_code == 401
        assert client.get("/v1/models", params={"access_token": "tok-abc"}, headers=bearer(API_KEY)).status_code == 200
    wait_until(lambda: "limit=2" in keyed_server.log(), 10, "the access log line")
    log = keyed_server.log()
    assert "secret-xyz" not in log and "tok-abc" not in log
    assert "/v1/models?api_key=[redacted]&limit=2" in log and "access_token=[redacted]" in log


@pytest.mark.parametrize(
    ("path", "logged"),
    [
        ("/v1/models", "/v1/models"),
        ("/x?API-KEY=a&b=1&token=t&sig=s", "/x?API-KEY=[redacted]&b=1&token=[redacted]&sig=[redacted]"),
        ("/x?my%5Fsecret=a&q=key", "/x?my%5Fsecret=[redacted]&q=key"),
        ("/x?flag&key", "/x?flag&key"),
    ],
)
def test_redaction_rules(path: str, logged: str) -> None:
    assert redact_query(path) == logged
