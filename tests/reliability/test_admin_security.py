"""The admin endpoints and the edges of an exposed server: with no key, /admin/* answers loopback clients only (403
for others, measured through this machine's own non-loopback address, and through a forwarded client address); with
--admin-key, only that key opens them. A server listening beyond loopback without a key says so at start. One
reload at a time (409, SIGHUP skipped), and no generated registry file outlives its use. Credentials in a query
string never reach the access log."""

from __future__ import annotations

import ipaddress
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from app.access_log import redact_query
from app.auth import binds_loopback_only, is_loopback
from tests.server_harness import Server, model_entry, start_server, wait_until, write_registry

API_KEY = "api-key-for-tests"
ADMIN_KEY = "admin-key-for-tests"


def own_non_loopback_address() -> str | None:
    """An IPv4 address of this machine outside loopback (eth0's, typically): connecting to it from here is local
    traffic, yet the server sees a non-loopback client address."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not ipaddress.ip_address(address.address).is_loopback:
                return str(address.address)
    return None


@pytest.fixture(scope="module")
def open_server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """No key at all, listening on every interface (as the Docker image does)."""
    tmp = tmp_path_factory.mktemp("admin-open")
    registry = write_registry(tmp / "models.yaml", [model_entry(tiny_llama_dir)])
    server = start_server(registry, tmp, "--host", "0.0.0.0")
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def keyed_server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("admin-keyed")
    registry = write_registry(tmp / "models.yaml", [model_entry(tiny_llama_dir, load="lazy")])  # no worker needed
    server = start_server(registry, tmp, "--api-key", API_KEY, "--admin-key", ADMIN_KEY)
    yield server
    assert server.stop() == 0


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_listening_beyond_loopback_without_a_key_is_warned_about(open_server: Server) -> None:
    warnings = [line for line in open_server.log().splitlines() if "without an API key" in line]
    assert warnings and "WARNING" in warnings[0] and "0.0.0.0" in warnings[0], open_server.log()[-3000:]


def test_no_warning_on_loopback_or_with_a_key(keyed_server: Server) -> None:
    assert "without an API key" not in keyed_server.log()


def test_with_no_key_a_loopback_client_may_reload(open_server: Server) -> None:
    with open_server.client() as client:
        answer = client.post("/admin/reload")
    assert answer.status_code == 200, answer.text
    assert answer.json()["unchanged"] == ["tiny"]


def test_with_no_key_a_client_from_another_address_is_refused(open_server: Server) -> None:
    address = own_non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    with httpx.Client(base_url=f"http://{address}:{open_server.port}", timeout=30) as client:
        assert client.get("/v1/models").status_code == 200  # the API itself is open: no key was set
        refused = client.post("/admin/reload")
    assert refused.status_code == 403, refused.text
    error = refused.json()["error"]
    assert error["code"] == "admin_loopback_only" and "--admin-key" in error["message"]


def test_with_no_key_a_forwarded_remote_client_is_refused(open_server: Server) -> None:
    """Behind a reverse proxy on this machine, the address it forwards decides, not the proxy's own."""
    with open_server.client() as client:
        refused = client.post("/admin/reload", headers={"X-Forwarded-For": "203.0.113.7"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_loopback_only"


def cards(client: httpx.Client) -> dict[str, dict[str, Any]]:
    return {card["id"]: card for card in client.get("/v1/models").json()["data"]}


def registry_dir(server: Server) -> Path:
    """Where the server writes the registry its workers read: from a worker's command line."""
    for proc in psutil.Process(server.process.pid).children(recursive=True):
        cmdline = proc.cmdline()
        if "--models" in cmdline and "--model" in cmdline:
            return Path(cmdline[cmdline.index("--models") + 1]).parent
    raise AssertionError("no worker process found")


def test_a_reload_during_a_reload_is_refused(open_server: Server, tiny_llama_dir: Path) -> None:
    path = open_server.log_path.parent / "models.yaml"
    write_registry(path, [model_entry(tiny_llama_dir), model_entry(tiny_llama_dir, name="second")])
    with open_server.client() as client:
        first = client.post("/admin/reload")
        assert first.status_code == 200 and first.json()["added"] == ["second"], first.text
        again = client.post("/admin/reload")  # 'second' is still loading: its worker takes seconds to start
        assert again.status_code == 409, again.text
        error = again.json()["error"]
        assert error["code"] == "reload_in_progress" and "'second' loading" in error["message"]
        open_server.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "SIGHUP reload skipped" in open_server.log(), 30, "the SIGHUP reload to be skipped")

        wait_until(lambda: cards(client)["second"]["state"] == "loaded", 120, "'second' to load")
        write_registry(path, [model_entry(tiny_llama_dir)])
        done = client.post("/admin/reload")
        assert done.status_code == 200 and done.json()["removed"] == ["second"], done.text


def test_generated_registry_files_are_deleted_once_no_worker_needs_them(open_server: Server) -> None:
    with open_server.client() as client:
        wait_until(lambda: client.post("/admin/reload").status_code == 200, 60, "the last reload to complete")
        for _ in range(3):
            assert client.post("/admin/reload").status_code == 200
    # Several reloads, one file: the one every served model's worker would restart from.
    files = sorted(registry_dir(open_server).glob("*.yaml"))
    assert len(files) == 1, files


def test_the_admin_key_alone_opens_the_admin_endpoints(keyed_server: Server) -> None:
    with keyed_server.client() as client:
        for headers in ({}, bearer(API_KEY), bearer("wrong")):
            refused = client.post("/admin/reload", headers=headers)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert client.post("/admin/reload", headers=bearer(ADMIN_KEY)).status_code == 200
        assert client.get("/v1/models", headers=bearer(API_KEY)).status_code == 200
        assert client.get("/v1/models", headers=bearer(ADMIN_KEY)).status_code == 401


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


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False),
        ("0.0.0.0", False),
        ("::", False),
        ("testclient", False),
        (None, False),
    ],
)
def test_loopback_addresses(host: str | None, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_listening_addresses() -> None:
    assert binds_loopback_only("127.0.0.1") and binds_loopback_only("localhost") and binds_loopback_only("::1")
    assert not binds_loopback_only("0.0.0.0") and not binds_loopback_only("::")
