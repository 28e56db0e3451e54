"""The Ray Serve scenario, run by test_ray_serve.py inside its own network namespace (`unshare -n`: loopback only,
because Ray binds every interface): `tokenmill serve --ray` with two replicas, requests that land on both, one
replica's server killed, and the replica replaced. Prints one JSON object with what it saw.

    unshare -n python -m tests.deploy.ray_scenario REGISTRY MODEL LOG_PATH
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil

from app.ray_serve import REPLICA_HEADER
from tests.server_harness import wait_until

PORT = 8765
BASE = f"http://127.0.0.1:{PORT}"


def ready() -> bool:
    try:
        return httpx.get(f"{BASE}/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


MODEL = "tiny"


def complete(_: int) -> tuple[int, str]:
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 8, "temperature": 0}
    try:
        response = httpx.post(f"{BASE}/v1/completions", json=body, timeout=60)
    except httpx.HTTPError as exc:
        return 0, type(exc).__name__
    return response.status_code, response.headers.get(REPLICA_HEADER, "")


def flood(n: int = 48) -> list[tuple[int, str]]:
    """More requests at once than the replicas take and Serve queues: the rest get 429 with Retry-After."""

    def one(_: int) -> tuple[int, str]:
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 48, "ignore_eos": True}
        try:
            response = httpx.post(f"{BASE}/v1/completions", json=body, timeout=120)
        except httpx.HTTPError as exc:
            return 0, type(exc).__name__
        return response.status_code, response.headers.get("retry-after", "")

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def burst(n: int = 24) -> list[tuple[int, str]]:
    """Requests from 4 clients at once: well within what two replicas take (8 each), so none is pushed back."""
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(complete, range(n)))


def answering(answers: list[tuple[int, str]]) -> set[str]:
    """The replicas that served some of `answers`."""
    return {replica for status, replica in answers if status == 200}


def replica_servers() -> list[psutil.Process]:
    """The tokenmill servers the replicas started (`serve --host 127.0.0.1 --port N`, not the --ray driver)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "app.cli" in cmdline and "serve" in cmdline and "--ray" not in cmdline:
            found.append(proc)
    return found


def main(registry: str, model: str, log_path: str) -> int:
    global MODEL
    MODEL = model
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    cmd = [sys.executable, "-m", "app.cli", "serve", "--ray", "--models", registry, "--port", str(PORT)]
    cmd += ["--min-replicas", "2", "--max-replicas", "2", "--kv-cache-memory", "64MiB"]
    cmd += ["--max-ongoing-requests", "8", "--max-queued-requests", "4"]
    result: dict[str, Any] = {}
    with Path(log_path).open("wb") as log:
        driver = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        # Both replica servers can exist before Serve routes to the second (its model still loading): wait until
        # answers come from two replicas, then measure.
        result["startup_s"] = wait_until(
            lambda: ready() and len(replica_servers()) == 2 and len(answering(burst(8))) == 2,
            600,
            "two ready replicas",
            interval=0.5,
        )
        first = burst()
        result["first"] = first
        before = answering(first)
        victim = replica_servers()[0]
        victim.send_signal(signal.SIGKILL)
        result["killed"] = victim.pid
        seen: set[str] = set()

        def replaced() -> bool:
            answers = burst(8)
            seen.update(answering(answers))
            return len(seen - before) >= 1 and len(replica_servers()) == 2 and victim.pid not in pids()

        result["recovery_s"] = wait_until(replaced, 300, "the killed replica to be replaced", interval=0.5)
        result["after"] = burst()
        result["flood"] = flood()
        result["before_ids"], result["new_ids"] = sorted(before), sorted(seen - before)
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        driver.send_signal(signal.SIGTERM)
        try:
            driver.wait(120)
        except subprocess.TimeoutExpired:
            driver.kill()
        result["driver_exit"] = driver.returncode
    print(json.dumps(result))
    return 0


def pids() -> set[int]:
    return {proc.pid for proc in replica_servers()}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3]))
