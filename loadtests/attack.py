"""Hostile traffic against a live server while a normal client keeps asking: each case's answer, how long it took,
and whether the server stayed ready; and the normal client's latency before and during the attack.

    python -m loadtests.attack [--url URL] [--out loadtests/results/attack.md] [-- SERVE FLAGS]

Without --url it starts `tokenmill serve` on the default model (with `tool_parser: hermes`, which its template
lacks) with --max-num-seqs 8 --max-waiting-requests 8 (flags after `--` are added), so the burst case knows what an
idle server should take. Every request is bounded in count and time, and goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import yaml

from loadtests.bench_server import tokenmill
from loadtests.load import percentile
from worker.registry import DEFAULT_REGISTRY, load_registry

MODEL = "smollm2"
CHAT = "/v1/chat/completions"
SEQS, WAITING = 8, 8


@dataclass
class Outcome:
    case: str
    answer: str
    seconds: float
    ready_after: bool


class NormalClient(threading.Thread):
    """A well-behaved client: a short chat request every 0.25 s; each latency is kept with its start time."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.samples: list[tuple[float, float, int]] = []  # (start, seconds, status)
        self.stopped = threading.Event()

    def run(self) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self.stopped.wait(0.25):
                start = time.perf_counter()
                try:
                    status = client.post(CHAT, json={**body, "temperature": 0}).status_code
                except httpx.HTTPError:
                    status = 0
                self.samples.append((start, time.perf_counter() - start, status))

    def between(self, start: float, end: float) -> list[tuple[float, int]]:
        return [(seconds, status) for t, seconds, status in self.samples if start <= t <= end]


def raw_post(url: str, path: str, body: bytes, content_type: str | None = "application/json") -> str:
    headers = {"content-type": content_type} if content_type else {}
    with httpx.Client(base_url=url, timeout=60) as client:
        response = client.post(path, content=body, headers=headers)
    return describe(response)


def describe(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict):
        return f"{response.status_code} {error.get('code')}"
    return str(response.status_code)


def post_json(url: str, path: str, body: dict[str, object]) -> str:
    return raw_post(url, path, json.dumps(body).encode())


def burst(url: str) -> str:
    body = {"model": MODEL, "prompt": "Count slowly:", "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    limits = httpx.Limits(max_connections=60)
    with httpx.Client(base_url=url, timeout=120, limits=limits) as client, ThreadPoolExecutor(60) as pool:
        statuses = list(pool.map(lambda _: client.post("/v1/completions", json=body).status_code, range(60)))
    return f"{statuses.count(200)} of 60 accepted (idle capacity {SEQS + WAITING}), {statuses.count(429)} got 429"


def named_tool(url: str) -> str:
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": parameters}}
    body: dict[str, object] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [tool],
    }
    body |= {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "max_tokens": 60}
    with httpx.Client(base_url=url, timeout=60) as client:
        response = client.post(CHAT, json=body)
    if response.status_code != 200:
        return describe(response)
    choice = response.json()["choices"][0]
    return f"200: {len(choice['message'].get('tool_calls') or [])} call(s), finish_reason {choice['finish_reason']}"


def slow_headers(url: str, interval: float, limit: float = 40.0) -> str:
    """A header line every `interval` s (0: never a second line); how long until the server hangs up."""
    host, port = urlsplit(url).hostname or "127.0.0.1", urlsplit(url).port or 80
    start = time.monotonic()
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        while time.monotonic() - start < limit:
            try:
                if interval:
                    sock.sendall(f"X-Drip-{int(time.monotonic() * 1000)}: 1\r\n".encode())
                sock.settimeout(interval or 1.0)
                reply = sock.recv(4096)
                if reply == b"":
                    return f"closed after {time.monotonic() - start:.1f} s"
                status = reply.split(b"\r\n", 1)[0].decode(errors="replace")
                return f"{status!r} after {time.monotonic() - start:.1f} s"
            except TimeoutError:
                continue
            except OSError:
                return f"closed after {time.monotonic() - start:.1f} s"
    return f"still open after {limit:.0f} s"


def idle_connections(url: str, count: int = 400) -> str:
    host, port = urlsplit(url).hostname or "127.0.0.1", urlsplit(url).port or 80
    opened: list[socket.socket] = []
    try:
        for _ in range(count):
            try:
                opened.append(socket.create_connection((host, port), timeout=2))
            except OSError:
                break
        with httpx.Client(base_url=url, timeout=30) as client:
            normal = client.get("/health").status_code
        return f"{len(opened)} idle connections held; a normal request then got {normal}"
    finally:
        for sock in opened:
            sock.close()


def dropped_streams(url: str, rounds: int = 10) -> str:
    body = {"model": MODEL, "prompt": "Tell a long story:", "max_tokens": 200, "stream": True, "ignore_eos": True}
    leftovers = 0
    with httpx.Client(base_url=url, timeout=60) as metrics:
        for _ in range(rounds):
            clients = [httpx.Client(base_url=url, timeout=60) for _ in range(4)]
            streams = [c.stream("POST", "/v1/completions", json=body) for c in clients]
            for stream in streams:
                next(stream.__enter__().iter_raw())  # the first bytes: the request is running
            for client in clients:
                client.close()  # the connection goes without a word
            deadline = time.monotonic() + 2.0  # the normal client may hold one request of its own
            while (running := _running(metrics)) > 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            leftovers += max(0, running - 1)
    return f"{leftovers} requests still running 2 s after their clients left ({rounds} rounds of 4)"


def _running(metrics: httpx.Client) -> int:
    text = metrics.get("/metrics").text
    lines = [line for line in text.splitlines() if line.startswith("tokenmill_num_requests_running{")]
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in lines)


def cases(url: str) -> list[tuple[str, Callable[[], str]]]:
    def post(path: str, body: dict[str, object] | bytes, content_type: str = "application/json") -> Callable[[], str]:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return lambda: raw_post(url, path, content, content_type)

    completions, tokenize = "/v1/completions", "/tokenize"
    lone = b'"a\\ud800b"'  # a JSON escape of a lone surrogate
    chat: dict[str, object] = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    bomb = "(a{1000}){1000}"
    anchored = {"type": "string", "pattern": f"^{bomb}$"}  # unanchored, it binds only once a string could match it
    schema_bomb = {"type": "json_schema", "json_schema": {"name": "x", "schema": anchored}}
    self_ref = {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}
    many = b'{"model": "smollm2", "max_tokens": 1, "prompt": [' + b",".join([b'"a"'] * 700_000) + b"]}"
    chat_with = b'{"model": "smollm2", "max_tokens": 4, "messages": [{"role": "user", "content": %s}]}'
    return [
        ("burst of 60 on an idle model", lambda: burst(url)),
        ("700,000 one-token prompts (3.5 MB)", post(completions, many)),
        ("64 prompts x n=128", post(completions, {"model": MODEL, "prompt": ["a"] * 64, "n": 128, "max_tokens": 1})),
        ("named tool_choice", lambda: named_tool(url)),
        ("lone surrogate in chat content", post(CHAT, chat_with % lone)),
        ("lone surrogate in a prompt", post(completions, b'{"model": "smollm2", "prompt": %s}' % lone)),
        ("lone surrogate in /tokenize", post(tokenize, b'{"model": "smollm2", "prompt": %s}' % lone)),
        ("lone surrogate as the model", post(CHAT, b'{"model": %s, "messages": []}' % lone)),
        ("guided_regex bomb", post(CHAT, {**chat, "guided_regex": bomb})),
        ("guided_regex bomb, streamed", post(CHAT, {**chat, "guided_regex": bomb, "stream": True})),
        ("schema pattern bomb", post(CHAT, {**chat, "response_format": schema_bomb})),
        ("self-referencing schema", post(CHAT, {**chat, "guided_json": self_ref})),
        ("invalid UTF-8", post(CHAT, chat_with % b'"\xff\xfe"')),
        ("JSON nested 100,000 deep", post(CHAT, b"[" * 100_000 + b"]" * 100_000)),
        ("token ids outside the vocabulary", post(completions, {"model": MODEL, "prompt": [10**9]})),
        ("empty prompt", post(completions, {"model": MODEL, "prompt": ""})),
        ("JSON without a JSON content type", post(CHAT, chat, content_type="text/plain")),
        ("10 MB body", post(CHAT, b'{"model": "smollm2", "x": "' + b"a" * 10_000_000 + b'"}')),
        ("a header line every 2 s", lambda: slow_headers(url, 2.0)),
        ("headers never finished", lambda: slow_headers(url, 0.0)),
        ("400 idle connections", lambda: idle_connections(url)),
        ("api_key in the query string", lambda: describe(httpx.get(f"{url}/v1/models?api_key=sk-secret", timeout=30))),
        ("POST /admin/reload from loopback, no key", lambda: describe(httpx.post(f"{url}/admin/reload", timeout=120))),
        ("4 streams dropped mid-way, 10 rounds", lambda: dropped_streams(url)),
    ]


def ready(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/ready", timeout=30).status_code == 200
    return False


def attack(url: str) -> tuple[list[Outcome], list[str]]:
    normal = NormalClient(url)
    normal.start()
    deadline = time.monotonic() + 300
    while not normal.samples and time.monotonic() < deadline:  # the first request warms the model up
        time.sleep(0.1)
    quiet_start = time.perf_counter()
    time.sleep(8)  # the baseline: the normal client alone
    quiet_end = time.perf_counter()
    outcomes = []
    for name, case in cases(url):
        start = time.perf_counter()
        try:
            answer = case()
        except Exception as exc:  # a case that breaks the client is itself an answer
            answer = f"client error: {type(exc).__name__}: {exc}"[:160]
        outcomes.append(Outcome(name, answer, time.perf_counter() - start, ready(url)))
        print(f"{name}: {answer} ({outcomes[-1].seconds:.2f} s)", flush=True)
    normal.stopped.set()
    normal.join()
    before = normal.between(quiet_start, quiet_end)
    during = normal.between(quiet_end, time.perf_counter())
    summary = []
    for label, samples in (("before", before), ("during", during)):
        seconds = [s for s, _ in samples]
        failed = sum(1 for _, status in samples if status != 200)
        summary.append(
            f"normal client {label} the attack: {len(samples)} requests, p50 {percentile(seconds, 0.5) * 1000:.0f} ms,"
            f" p99 {percentile(seconds, 0.99) * 1000:.0f} ms, {failed} not 200"
        )
    return outcomes, summary


@contextlib.contextmanager
def target(args: argparse.Namespace) -> Iterator[str]:
    if args.url:
        yield args.url
        return
    # the default model, with a tool-call format (its template teaches none), so that tool_choice can be tried
    entry = load_registry(DEFAULT_REGISTRY).models[0].model_dump(mode="json", exclude_unset=True)
    registry = Path(tempfile.mkdtemp(prefix="attack-")) / "models.yaml"
    registry.write_text(yaml.safe_dump({"models": [{**entry, "tool_parser": "hermes"}]}))
    flags = ["--models", str(registry), "--max-num-seqs", str(SEQS), "--max-waiting-requests", str(WAITING)]
    with tokenmill(args.port, *flags, *args.serve_flags) as (url, _):
        yield url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None)
    parser.add_argument("--port", type=int, default=8330)
    parser.add_argument("--out", default=None, help="write the Markdown table here too")
    parser.add_argument("serve_flags", nargs="*", help="after --: flags for tokenmill serve")
    args = parser.parse_args(argv)
    with target(args) as url:
        outcomes, summary = attack(url)
    lines = ["| case | answer | time | ready after |", "|---|---|---|---|"]
    lines += [f"| {o.case} | {o.answer} | {o.seconds:.2f} s | {'yes' if o.ready_after else 'NO'} |" for o in outcomes]
    text = "\n".join([*lines, "", *[f"- {line}" for line in summary]])
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if all(o.ready_after for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
