"""The CUDA image's Python layers, built from docker/Dockerfile with podman where no GPU, registry or nvcc is, and run
on the CPU.

What differs from a real build is only what cannot be had here, each through a build argument of the Dockerfile:
- the nvidia/cuda bases cannot be pulled, so both stages start from the Debian base that test_image.py makes
  locally (BUILD_IMAGE, RUNTIME_IMAGE);
- download.pytorch.org's cu128 index may be out of reach, so torch comes from PyPI, whose torch 2.13.0 is the CUDA
  13.0 build (TORCH_INDEX_URL);
- flash-attn compiles against the devel image's CUDA toolkit for hours, so the gpu extra is left out (EXTRAS).
The CPU wheel of the same version on this machine's disk (pip's find-links) would stand in for the CUDA one, so that
folder is not mounted into the build.

The image must hold CUDA torch with its CUDA libraries, bitsandbytes and peft, and, with no GPU, serve the default
model on the CPU through its own entry point: ready, a HEALTHCHECK on TOKENMILL_PORT, a chat completion and a stream,
the non-root user, and exit 0 on SIGTERM. The build downloads about 3 GB and takes about 4 minutes; the image (5.7 GB)
and its build stage are removed afterwards, and the test skips where the disk has less than 20 GiB free.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.container import UID, served
from tests.deploy.podman import Podman, unavailable
from tests.deploy.test_image import BASE
from tests.server_harness import REPO

TAG = "localhost/tokenmill:cuda-test"
BUILD_ARGS = {
    "BUILD_IMAGE": BASE,
    "RUNTIME_IMAGE": BASE,
    "TORCH_INDEX_URL": "https://pypi.org/simple",
    "EXTRAS": "quant,lora",
}
FREE_GIB = shutil.disk_usage("/var/lib/containers" if Path("/var/lib/containers").exists() else "/").free / 2**30

pytestmark = [
    pytest.mark.skipif(bool(unavailable()), reason=unavailable() or "podman runs"),
    pytest.mark.skipif(FREE_GIB < 20, reason=f"image and build stage take about 12 GB: {FREE_GIB:.0f} GiB free"),
    pytest.mark.timeout(2400),
]


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    return Podman.environment(tmp_path_factory.mktemp("podman"))


@pytest.fixture(scope="module")
def image(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    podman.base_image(BASE, tmp_path_factory.mktemp("base"))
    podman.build(TAG, REPO / "docker" / "Dockerfile", REPO, BUILD_ARGS, leave_out={"find-links"})
    yield TAG
    podman.run("image", "rm", "--force", TAG, check=False)  # several GB: not kept between runs
    podman.run("image", "prune", "--force", check=False)


def test_the_image_holds_cuda_torch_and_the_extras(podman: Podman, image: str) -> None:
    probe = (
        "import importlib.util as u, torch, bitsandbytes, peft; "
        "print(torch.__version__, torch.version.cuda, torch.backends.cudnn.version(), torch.cuda.is_available(), "
        "u.find_spec('flash_attn') is not None)"
    )
    version, cuda, cudnn, available, flash = podman.run(
        "run", "--rm", "--entrypoint", "python", image, "-c", probe
    ).stdout.split()
    assert version.startswith("2.13.") and "+cpu" not in version, version
    assert cuda != "None" and cudnn != "None", (cuda, cudnn)  # the CUDA build, with its libraries as wheels
    assert available == "False"  # no GPU here: the server below runs on the CPU
    assert flash == "False"  # EXTRAS left the gpu extra out


def test_the_image_serves_on_the_cpu_and_stops_on_sigterm(podman: Podman, image: str, tmp_path: Path) -> None:
    with served(podman, image, tmp_path) as container:
        assert podman.run("healthcheck", "run", container.name, check=False).returncode == 0, "HEALTHCHECK on its port"
        assert container.uid() == str(UID)
        container.chat_and_stream()
        seconds, code = container.stop()
        assert seconds < 45
        assert code == 0, container.logs()[-4000:]
