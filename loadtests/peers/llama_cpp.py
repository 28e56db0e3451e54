"""llama.cpp's `llama-server`, built from the llama.cpp sources vendored in the `llama-cpp-python` source
distribution (about 10 minutes on 2 cores), serving the shipped Q4_1 GGUF and an fp32 GGUF written from tokenmill's
converted weights (like for like). Continuous batching over 32 slots.

A model directory (safetensors and tokenizer, e.g. `loadtests.dummy_models`') is served as BF16 and Q8_0 GGUF files
that llama.cpp's own converter writes next to it (DIR.bf16.gguf, DIR.q8_0.gguf; once).

    python -m loadtests.peers.llama_cpp install
    python -m loadtests.peers.llama_cpp serve [--port 8401] [--config llama.cpp-f32]
    python -m loadtests.peers.llama_cpp serve --model-dir DIR [--config llama.cpp-q8_0]
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

from loadtests.peers import begin_install, cache_dir, converted_model, default_gguf, is_installed, mark_installed, step
from loadtests.peers.server import Peer, Server, serving

NAME = "llama.cpp"
NO_AMX = "no_amx.txt"
GGUF_TYPES = ("bf16", "q8_0")  # the converter's --outtype for a model directory's servers
SLOTS = 32
# A model directory's KV cache, in tokens, shared by all slots (unified), so one slot may take a long prompt: room
# for 32 streams of 384 tokens, 8 of 2,064 and one prompt of 6,000
DIRECTORY_CONTEXT = 20480


def home(cache: Path) -> Path:
    return cache / "llama_cpp"


def server_binary(cache: Path) -> Path:
    return home(cache) / "bin" / "llama-server"


def f32_gguf(cache: Path) -> Path:
    return home(cache) / "models" / f"{default_gguf().stem.split('.')[0]}.f32.gguf"


def find_sources(directory: Path) -> Path | None:
    """The vendored llama.cpp tree unpacked under `directory` (the peer's home), if there is one."""
    found = sorted(directory.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    return found[-1].parent if found else None


def sources(directory: Path, log: Path) -> Path:
    """The vendored llama.cpp tree of the newest `llama-cpp-python` sdist, downloaded and unpacked once."""
    found = find_sources(directory)
    if found is not None:
        return found
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


def gguf_file(directory: Path, outtype: str) -> Path:
    """Where the `outtype` GGUF of a model directory is kept: next to it."""
    return directory.parent / f"{directory.name}.{outtype}.gguf"


def convert(directory: Path, src: Path, outtypes: tuple[str, ...] = GGUF_TYPES) -> list[Path]:
    """GGUF files of `directory` written by the converter of the llama.cpp tree `src`, one per `outtype`; a file
    already there is kept. The converter runs on this interpreter (it reads the safetensors with torch) with its own
    gguf-py, at the lowest CPU priority."""
    written = []
    for outtype in outtypes:
        target = gguf_file(directory, outtype)
        if not target.is_file():
            partial = target.with_suffix(".partial")
            command = [sys.executable, "-m", "loadtests.peers.convert_gguf", str(src / "convert_hf_to_gguf.py")]
            command += [*pre_tokenizer(directory), "--", str(directory), "--outtype", outtype]
            log = directory.parent / f"{directory.name}.convert.log"
            step([*command, "--outfile", str(partial)], log, cwd=Path(__file__).resolve().parents[2])
            partial.rename(target)
        written.append(target)
    return written


def pre_tokenizer(directory: Path) -> list[str]:
    """`--pre` for `loadtests.peers.convert_gguf`: the pre-tokenizer transformers applies to the directory's model
    where it overrides tokenizer.json's (Qwen2: its own split pattern, llama.cpp's `qwen2`)."""
    model_type = json.loads((directory / "config.json").read_text()).get("model_type")
    return ["--pre", "qwen2"] if model_type == "qwen2" else []


def directory_servers(cache: Path, port: int, directory: Path, context: int = DIRECTORY_CONTEXT) -> list[Server]:
    """llama-server on each GGUF of `directory` (converted when first served), named after the directory, with
    `context` tokens of KV cache that every slot may use (`--kv-unified`)."""
    threads = str(len(os.sched_getaffinity(0)))
    common = ["--host", "127.0.0.1", "--port", str(port), "-t", threads, "-tb", threads, "-np", str(SLOTS), "-cb"]
    common += ["-c", str(context), "--kv-unified", "--alias", directory.name]
    if (home(cache) / NO_AMX).is_file():
        common.append("--no-repack")

    def converter(outtype: str) -> Callable[[], None]:
        def run() -> None:
            src = find_sources(home(cache))
            if src is None:
                raise RuntimeError(f"no llama.cpp sources in {home(cache)}; install the llama.cpp peer")
            convert(directory, src, (outtype,))

        return run

    return [
        Server(
            name=f"{NAME}-{outtype}",
            weights=f"{outtype.upper()} GGUF written by llama.cpp's converter",
            command=[str(server_binary(cache)), "-m", str(gguf_file(directory, outtype)), *common],
            port=port,
            model=directory.name,
            prepare=converter(outtype),
        )
        for outtype in GGUF_TYPES
    ]


PEER = Peer(NAME, install, installed, servers, directory_servers)

if __name__ == "__main__":
    sys.exit(PEER.main(cache_dir()))
