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

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.deploy.container import MODEL, UID, served
from tests.deploy.podman import Podman, unavailable
from tests.server_harness import REPO

BASE = "python:3.11-slim-bookworm"  # the Dockerfile's default PYTHON_IMAGE
TAG = "localhost/tokenmill:cpu-test"
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
    with served(podman, image, tmp_path) as container:
        assert podman.run("healthcheck", "run", container.name, check=False).returncode == 0, "HEALTHCHECK on its port"
        assert container.uid() == str(UID)
        container.chat_and_stream()

        metrics = httpx.get(f"{container.base}/metrics", timeout=10.0)
        assert metrics.status_code == 200
        finished = [
            float(line.rsplit(" ", 1)[1])
            for line in metrics.text.splitlines()
            if line.startswith("tokenmill_request_success_total{") and f'model_name="{MODEL}"' in line
        ]
        assert sum(finished) == 2, metrics.text[:2000]
        logs = container.logs()
        assert "native CPU kernels: prebuilt for" in logs, logs[-3000:]

        seconds, code = container.stop()
        assert seconds < 45
        assert code == 0, container.logs()[-4000:]
