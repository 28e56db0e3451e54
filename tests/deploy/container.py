"""A tokenmill image served for a test: the default model's GGUF and a registry naming it mounted read-only, an empty
cache volume, and only TOKENMILL_* variables (its port among them) to configure it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
from openai.types.chat import ChatCompletionMessageParam

from tests.deploy.podman import Podman
from tests.server_harness import free_port, model_entry, wait_until, write_registry
from worker.loader import resolve_source
from worker.registry import DEFAULT_SOURCE

MODEL = "smollm2"
UID = 10001  # the images' tokenmill user
READY_SECONDS = 240.0


@dataclass
class Served:
    podman: Podman
    name: str
    base: str

    def logs(self) -> str:
        done = self.podman.run("logs", self.name, check=False)
        return done.stdout + done.stderr

    def state(self) -> dict[str, object]:
        listing = self.podman.run("inspect", "--format", "{{json .State}}", self.name).stdout
        state: dict[str, object] = json.loads(listing)
        return state

    def uid(self) -> str:
        return self.podman.run("exec", self.name, "python", "-c", "import os; print(os.getuid())").stdout.strip()

    def chat_and_stream(self) -> str:
        """A greedy chat completion and the same request streamed, through the official SDK: both must agree."""
        client = openai.OpenAI(base_url=f"{self.base}/v1", api_key="none", timeout=60.0, max_retries=0)
        messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Name three colors."}]
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
        text = reply.choices[0].message.content
        assert text and reply.usage and reply.usage.completion_tokens > 0
        stream = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True
        )
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert streamed == text  # greedy: the same tokens either way
        return text

    def stop(self) -> tuple[float, object]:
        """SIGTERM, then a drain of at most --drain-timeout: the seconds it took and the exit code."""
        started = time.monotonic()
        self.podman.run("stop", "--time=60", self.name)
        return time.monotonic() - started, self.state()["ExitCode"]


@contextmanager
def served(podman: Podman, image: str, directory: Path) -> Iterator[Served]:
    """`image` running on the host network until `/ready`; removed afterwards, whatever happened."""
    gguf = Path(resolve_source(DEFAULT_SOURCE))
    registry = write_registry(directory / "models.yaml", [model_entry("/models/smollm2.gguf", name=MODEL)])
    cache = directory / "cache"
    cache.mkdir()
    cache.chmod(0o777)  # the container's user (uid 10001) writes the converted weights here
    port = free_port()
    name = f"tokenmill-test-{port}"
    podman.run(
        "run", "--detach", f"--name={name}", "--network=host",
        f"--volume={registry}:/etc/tokenmill/models.yaml:ro",
        f"--volume={gguf}:/models/smollm2.gguf:ro",
        f"--volume={cache}:/home/tokenmill/.cache/tokenmill",
        "--env=TOKENMILL_HOST=127.0.0.1", f"--env=TOKENMILL_PORT={port}",
        "--env=TOKENMILL_METRICS_OPEN=true", "--env=TOKENMILL_THREADS=1",
        image,
    )  # fmt: skip
    container = Served(podman, name, f"http://127.0.0.1:{port}")
    try:

        def ready() -> bool:
            assert container.state()["Status"] == "running", container.logs()[-4000:]
            try:
                return httpx.get(f"{container.base}/ready", timeout=2.0).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, READY_SECONDS, "the container's /ready")
        yield container
    finally:
        podman.run("rm", "--force", name, check=False)
