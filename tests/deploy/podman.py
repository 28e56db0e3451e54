"""Podman for the image tests, on a machine with no container registry and no Docker engine.

- `Podman.environment()`: a containers.conf of its own (`CONTAINERS_CONF`) that suits a root user without
  CAP_SYS_RESOURCE: the runc runtime, the cgroupfs cgroup manager, file events, an open-files limit no higher than
  this process's own and a process-count limit of 4,096 (podman's defaults of 1,048,576 each are refused there, and
  so were process counts from 65,536 up, below the shell's own hard limit).
- `base_image()`: the image `FROM` names cannot be pulled, so it is made locally: `mmdebstrap --variant=minbase`
  from the machine's own apt sources (the files its apt configuration names, passed as they are), with `python3`,
  `python3-venv` and `ca-certificates`, then `podman import`ed under that name. It is kept between runs.
- `build()`: inside a build pip reaches the package registries only through the machine's own pip configuration:
  the files `pip config debug` names, and the paths they refer to (CA bundle, constraints, local wheel and index
  directories), are mounted read-only at the same paths. Nothing is copied into the repository or the image.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

PODMAN = shutil.which("podman")
MMDEBSTRAP = shutil.which("mmdebstrap")
APT_SOURCES = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))]
BASE_PACKAGES = ["python3", "python3-venv", "ca-certificates"]
NPROC = 4096
ENVIRONMENT_PATHS = ("PIP_CERT", "PIP_FIND_LINKS", "PIP_CONSTRAINT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")


def unavailable() -> str:
    """Why podman cannot build and run an image here; empty where it can."""
    if PODMAN is None or MMDEBSTRAP is None:
        return "podman and mmdebstrap are missing (apt-get install -y podman mmdebstrap runc; .ci/run installs them)"
    if os.geteuid() != 0:
        return "the image tests run podman as root (rootless podman needs subuid ranges this machine may lack)"
    if not apt_sources():
        return "no apt sources to make the base image from"
    return ""


def option_name(key: str) -> str:
    """pip's option name of a configuration key or environment variable: global.find-links, PIP_FIND_LINKS."""
    return key.rsplit(".", 1)[-1].removeprefix("PIP_").lower().replace("_", "-")


def apt_sources() -> list[Path]:
    return [path for path in APT_SOURCES if path.is_file() and path.read_text().strip()]


def pip_mounts(leave_out: Collection[str] = ()) -> list[str]:
    """`podman --volume` arguments for the machine's pip configuration and every existing path it refers to, but
    for the paths of the options named in `leave_out` (pip's names, such as "find-links")."""
    listing = subprocess.run(
        ["python3", "-m", "pip", "config", "debug"], capture_output=True, text=True, timeout=60
    ).stdout
    files = re.findall(r"^\s+(/\S+), exists: True", listing, re.MULTILINE)
    # global.cert: ..., PIP_CERT='...'
    settings = re.findall(r"^\s+([\w.-]+)\s*[:=]\s*(.+)$", listing, re.MULTILINE)
    settings += [(name, os.environ.get(name, "")) for name in ENVIRONMENT_PATHS]
    paths = set(files)
    for key, value in settings:
        if option_name(key) in leave_out:
            continue
        for word in value.strip().strip("'\"").split():
            path = word.removeprefix("file://")
            if path.startswith("/") and Path(path).exists():
                paths.add(path)
    # an index directory is referred to by its simple/ subfolder: mount the folder above it
    mounts = {str(Path(p).parent) if Path(p).name == "simple" else p for p in paths}
    return [f"--volume={path}:{path}:ro" for path in sorted(mounts)]


@dataclass
class Podman:
    conf: Path

    @classmethod
    def environment(cls, directory: Path) -> Podman:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        conf = directory / "containers.conf"
        conf.write_text(
            "[containers]\n"
            f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={NPROC}:{NPROC}"]\n'
            'netns = "host"\n'
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
        )
        return cls(conf)

    def run(self, *args: str, timeout: float = 600.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert PODMAN is not None
        env = {**os.environ, "CONTAINERS_CONF": str(self.conf)}
        done = subprocess.run([PODMAN, *args], capture_output=True, text=True, timeout=timeout, env=env)
        if check and done.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args[:3])} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return done

    def base_image(self, name: str, scratch: Path, suite: str = "bookworm") -> str:
        """`name` made from the machine's apt sources (see the module's docstring), unless it exists already."""
        if self.run("image", "exists", name, check=False).returncode == 0:
            return "cached"
        assert MMDEBSTRAP is not None
        tarball = scratch / "base.tar"
        include = ",".join(BASE_PACKAGES)
        command = [MMDEBSTRAP, "--variant=minbase", f"--include={include}", suite, str(tarball)]
        done = subprocess.run([*command, *map(str, apt_sources())], capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"mmdebstrap failed ({done.returncode}):\n{done.stderr[-3000:]}")
        self.run("import", "--change", 'CMD ["/bin/bash"]', str(tarball), name, timeout=600)
        tarball.unlink()
        return "made"

    def build(
        self, tag: str, dockerfile: Path, context: Path, build_args: dict[str, str], leave_out: Collection[str] = ()
    ) -> str:
        """Docker's image format: podman's default (OCI) has no HEALTHCHECK. `leave_out`: see `pip_mounts`."""
        mounts = pip_mounts(leave_out)
        args = ["build", "--format=docker", "--network=host", f"--file={dockerfile}", f"--tag={tag}", *mounts]
        args += [f"--build-arg={key}={value}" for key, value in build_args.items()]
        return self.run(*args, str(context), timeout=1500).stdout

    def size(self, tag: str) -> int:
        return int(self.run("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())
