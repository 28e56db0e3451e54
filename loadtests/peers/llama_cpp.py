"""llama.cpp's `llama-server`, built from the llama.cpp sources vendored in the `llama-cpp-python` source
distribution (about 10 minutes on 2 cores), serving the shipped Q4_1 GGUF and an fp32 GGUF written from tokenmill's
converted weights (like for like). Continuous batching over 32 slots.

    python -m loadtests.peers.llama_cpp install
    python -m loadtests.peers.llama_cpp serve [--port 8401] [--config llama.cpp-f32]
"""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
from pathlib import Path

from loadtests.peers import begin_install, cache_dir, converted_model, default_gguf, is_installed, mark_installed, step
from loadtests.peers.server import Peer, Server, serving

NAME = "llama.cpp"
NO_AMX = "no_amx.txt"


def home(cache: Path) -> Path:
    return cache / "llama_cpp"


def server_binary(cache: Path) -> Path:
    return home(cache) / "bin" / "llama-server"


def f32_gguf(cache: Path) -> Path:
    return home(cache) / "models" / f"{default_gguf().stem.split('.')[0]}.f32.gguf"


def sources(directory: Path, log: Path) -> Path:
    """The vendored llama.cpp tree of the newest `llama-cpp-python` sdist, downloaded and unpacked once."""
    found = sorted(directory.glob("llama_cpp_python-*/vendor/llama.cpp/CMakeLists.txt"))
    if found:
        return found[-1].parent
    sdist = directory / "sdist"
    archives = sorted(sdist.glob("llama_cpp_python-*.tar.gz"))
    if not archives:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "llama-cpp-python"]
        step([*pip, "-d", str(sdist)], log)
        archives = sorted(sdist.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(archives[-1]) as archive:
        archive.extractall(directory, filter="data")
    return sources(directory, log)


def install(cache: Path) -> None:
    directory = home(cache)
    started = begin_install(NAME, directory)
    if started is None:
        return
    log = directory / "install.log"
    src = sources(directory, log)
    build = directory / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    flags = ["-DGGML_NATIVE=ON", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF"]
    flags += ["-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release"]
    step(["cmake", "-S", str(src), "-B", str(build), *generator, *flags], log)
    step(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 1)], log)
    server_binary(cache).parent.mkdir(exist_ok=True)
    shutil.copy2(build / "bin" / "llama-server", server_binary(cache))
    # fp32 from the converted safetensors: the same weights tokenmill and vLLM serve. The converter runs on this
    # interpreter (it needs torch and transformers, which it only reads) with llama.cpp's own gguf-py.
    target = f32_gguf(cache)
    if not target.is_file():
        target.parent.mkdir(exist_ok=True)
        partial = target.with_suffix(".partial")
        convert = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(converted_model()), "--outtype", "f32"]
        step([*convert, "--outfile", str(partial)], log)
        partial.rename(target)
    amx = "AMX kernels run" if _amx_runs(cache) else "AMX kernels fault here: served with --no-repack"
    mark_installed(directory, started, f"llama-server from {src}; {amx}")


def _amx_runs(cache: Path) -> bool:
    """Whether the Q4_1 model survives its warm-up. A native build on a CPU that reports AMX uses AMX tile kernels for
    Q4_1, and some virtual machines report AMX yet fault on tile instructions (SIGILL). The answer is kept in a file:
    where they fault, servers run with --no-repack, which drops those kernels (Q4_1 has no other repacked layout)."""
    answer = home(cache) / NO_AMX
    answer.unlink(missing_ok=True)
    probe = [str(server_binary(cache)), "-m", str(default_gguf()), "-np", "1", "-c", "512", "--port", "8498"]
    try:
        with serving(Server("llama.cpp-probe", "", probe, 8498, ready_timeout=120), home(cache) / "amx_probe.log"):
            return True
    except RuntimeError:
        answer.write_text("llama-server with Q4_1 died in its warm-up; see amx_probe.log\n")
        return False


def installed(cache: Path) -> bool:
    return is_installed(home(cache))


def servers(cache: Path, port: int) -> list[Server]:
    threads = len(os.sched_getaffinity(0))
    common = ["--host", "127.0.0.1", "--port", str(port), "-t", str(threads), "-np", "32", "-c", "16384", "-cb"]
    if (home(cache) / NO_AMX).is_file():
        common.append("--no-repack")
    binary = str(server_binary(cache))
    return [
        Server(
            name=f"{NAME}-q4_1",
            weights="Q4_1 GGUF as shipped",
            command=[binary, "-m", str(default_gguf()), *common, "--alias", "smollm2"],
            port=port,
        ),
        Server(
            name=f"{NAME}-f32",
            weights="fp32 GGUF of the converted weights",
            command=[binary, "-m", str(f32_gguf(cache)), *common, "--alias", "smollm2"],
            port=port,
        ),
    ]


PEER = Peer(NAME, install, installed, servers)

if __name__ == "__main__":
    sys.exit(PEER.main(cache_dir()))
