"""The CPU image, built from docker/Dockerfile.cpu with podman and run for real.

The build uses a base image made locally from the machine's apt sources (tests/deploy/podman.py: no registry can be
reached) and the machine's pip configuration, mounted in. The container runs with a registry file and the default
model's GGUF mounted read-only and an empty cache volume, configured only through TOKENMILL_* variables (its port
among them): it must become ready, pass its own HEALTHCHECK, answer a chat completion and a streamed one through the
official `openai` SDK, serve /metrics, run as its non-root user with the prebuilt kernels and no compiler, and exit
0 on SIGTERM. The base image is kept between runs; the tokenmill image is rebuilt each run (the layers before the
source copy are cached).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.deploy.podman import Podman, unavailable
from tests.server_harness import REPO, free_port, model_entry, wait_until, write_registry
from worker.loader import resolve_source
from worker.registry import DEFAULT_SOURCE

BASE = "python:3.11-slim-bookworm"  # the Dockerfile's default PYTHON_IMAGE
TAG = "localhost/tokenmill:cpu-test"
UID = 10001  # the image's tokenmill user
READY_SECONDS = 240.0
# download.pytorch.org may be out of reach: the CPU wheel then comes from the machine's own pip sources
TORCH_INDEX_URL = "https://pypi.org/simple"

pytestmark = [
    pytest.mark.skipif(bool(unavailable()), reason=unavailable() or "podman runs"),
    pytest.mark.timeout(1800),
]


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    return Podman.environment(tmp_path_factory.mktemp("podman"))


@pytest.fixture(scope="module")
def image(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    podman.base_image(BASE, tmp_path_factory.mktemp("base"))
    podman.build(TAG, REPO / "docker" / "Dockerfile.cpu", REPO, {"TORCH_INDEX_URL": TORCH_INDEX_URL})
    yield TAG
    podman.run("image", "prune", "--force", check=False)  # the dangling layers of earlier builds


def test_the_image_needs_no_compiler_and_drops_the_build_tools(podman: Podman, image: str) -> None:
    probe = (
        "import shutil, torch, worker.native_build as n; "
        "print(shutil.which('gcc'), shutil.which('cc'), shutil.which('pip'), n.prebuilt() is not None, "
        "(torch.__file__.rsplit('/', 1)[0] + '/include'))"
    )
    out = podman.run("run", "--rm", "--entrypoint", "python", image, "-c", probe).stdout.split()
    assert out[:3] == ["None", "None", "None"], out
    assert out[3] == "True", "no prebuilt kernels for this CPU in the image"
    assert podman.run("run", "--rm", "--entrypoint", "test", image, "!", "-d", out[4], check=False).returncode == 0


def test_the_image_serves_streams_reports_metrics_and_stops_on_sigterm(
    podman: Podman, image: str, tmp_path: Path
) -> None:
    gguf = Path(resolve_source(DEFAULT_SOURCE))
    registry = write_registry(tmp_path / "models.yaml", [model_entry("/models/smollm2.gguf", name="smollm2")])
    cache = tmp_path / "cache"
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
    base = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            state = json.loads(podman.run("inspect", "--format", "{{json .State}}", name).stdout)
            assert state["Status"] == "running", podman.run("logs", name, check=False).stderr[-4000:]
            try:
                return httpx.get(f"{base}/ready", timeout=2.0).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, READY_SECONDS, "the container's /ready")
        assert podman.run("healthcheck", "run", name, check=False).returncode == 0, "HEALTHCHECK on TOKENMILL_PORT"
        uid = podman.run("exec", name, "python", "-c", "import os; print(os.getuid())").stdout.strip()
        assert uid == str(UID)

        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", timeout=60.0, max_retries=0)
        messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Name three colors."}]
        reply = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=12, temperature=0)
        assert reply.choices[0].message.content and reply.usage and reply.usage.completion_tokens > 0
        stream = client.chat.completions.create(
            model="smollm2",
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
        )
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert streamed == reply.choices[0].message.content  # greedy: the same tokens either way

        metrics = httpx.get(f"{base}/metrics", timeout=10.0)
        assert metrics.status_code == 200
        finished = [
            float(line.rsplit(" ", 1)[1])
            for line in metrics.text.splitlines()
            if line.startswith("tokenmill_request_success_total{") and 'model_name="smollm2"' in line
        ]
        assert sum(finished) == 2, metrics.text[:2000]
        logs = podman.run("logs", name).stdout + podman.run("logs", name).stderr
        assert "native CPU kernels: prebuilt for" in logs, logs[-3000:]

        started = time.monotonic()
        podman.run("stop", "--time=60", name)  # SIGTERM, then a drain of at most --drain-timeout
        assert time.monotonic() - started < 45
        state = json.loads(podman.run("inspect", "--format", "{{json .State}}", name).stdout)
        assert state["ExitCode"] == 0, podman.run("logs", name, check=False).stderr[-4000:]
    finally:
        podman.run("rm", "--force", name, check=False)
