"""Security properties of a running server: several API keys, no TCP listener but the HTTP port, owner-only IPC,
and request limits (stop lists, n, bodies) refused with OpenAI-shaped errors."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.server_harness import Server, model_entry, start_server, write_registry


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("security")
    keys = tmp / "keys.txt"
    keys.write_text("# team keys\nkey-one\n\nkey-two\n")
    entry = model_entry(tiny_llama_dir)
    server = start_server(
        write_registry(tmp / "models.yaml", [entry]), tmp, "--api-key", "key-zero", "--api-key-file", str(keys)
    )
    yield server
    assert server.stop() == 0


def chat(client: httpx.Client, key: str | None, **body: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    payload = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **body}
    return client.post("/v1/chat/completions", json=payload, headers=headers)


@pytest.mark.parametrize("key", ["key-zero", "key-one", "key-two"])
def test_every_configured_key_works(server: Server, key: str) -> None:
    with server.client() as client:
        assert chat(client, key).status_code == 200


@pytest.mark.parametrize("key", [None, "# team keys", "key-thr", "key-one-more", "KEY-ONE"])
def test_other_keys_are_refused(server: Server, key: str | None) -> None:
    with server.client() as client:
        response = chat(client, key)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("path", "content"),
    [
        ("/v1/chat/completions", b"{not json"),
        ("/v1/completions", b'{"model": 5}'),
        ("/tokenize", b"[]"),
        ("/admin/reload", b""),
        ("/metrics", b""),
        ("/v1/no-such-route", b"{}"),
    ],
)
def test_a_client_without_a_key_gets_401_before_its_body_is_looked_at(
    server: Server, path: str, content: bytes
) -> None:
    with server.client() as client:
        response = client.post(path, content=content, headers={"content-type": "application/json"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert response.headers["www-authenticate"] == "Bearer"


def test_the_probes_stay_open(server: Server) -> None:
    with server.client() as client:
        assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200


def test_no_key_is_logged(server: Server) -> None:
    with server.client() as client:
        chat(client, "key-one")
        chat(client, "a-wrong-secret")
    log = server.log()
    assert "key-one" not in log and "a-wrong-secret" not in log and "key-zero" not in log


def test_only_the_http_port_listens_on_tcp(server: Server) -> None:
    processes = [psutil.Process(server.process.pid), *psutil.Process(server.process.pid).children(recursive=True)]
    assert len(processes) >= 2  # the API process and its worker
    pids = {p.pid for p in processes}
    listening = [c for c in psutil.net_connections(kind="inet") if c.pid in pids and c.status == psutil.CONN_LISTEN]
    assert [tuple(c.laddr) for c in listening] == [("127.0.0.1", server.port)]


def test_worker_socket_is_owner_only(server: Server) -> None:
    sockets = [Path(str(c.laddr)) for c in psutil.Process(server.process.pid).net_connections(kind="unix") if c.laddr]
    assert sockets, "the API process holds the worker's Unix socket"
    for path in sockets:
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_infinite_temperature(server: Server) -> None:
    with server.client() as client:
        body = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}'
        headers = {"Authorization": "Bearer key-one", "content-type": "application/json"}
        response = client.post("/v1/chat/completions", content=body, headers=headers)
        assert response.status_code == 400 and response.json()["error"]["param"] == "temperature"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"stop": ["x"] * 65}, "stop"),
        ({"stop": "y" * 1025}, "stop"),
        ({"n": 10_000}, "n"),
        ({"max_tokens": 10**30}, "messages"),  # context_length_exceeded, as OpenAI answers it
    ],
)
def test_request_limits(server: Server, body: dict[str, object], param: str) -> None:
    with server.client() as client:
        response = chat(client, "key-one", **body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
        assert chat(client, "key-one").status_code == 200
