"""`transformers serve --continuous-batching`: Hugging Face's own server, in its own virtual environment with the
transformers version tokenmill pins, serving the converted safetensors in bf16.

    python -m loadtests.peers.transformers_serve install
    python -m loadtests.peers.transformers_serve serve [--port 8401]
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path

from loadtests.peers import begin_install, cache_dir, converted_model, is_installed, make_venv, mark_installed
from loadtests.peers.server import Peer, Server

NAME = "transformers-serve"
# Its paged cache takes 60-90% of free RAM unless bounded. A block holds 256 tokens of all 30 layers (about 6 MB in
# bf16); a request of the load (prompt and 128 tokens) fits one, so 96 blocks serve c=64 with room to spare.
CACHE_BLOCKS = 96


def home(cache: Path) -> Path:
    return cache / "transformers_serve"


def install(cache: Path) -> None:
    directory = home(cache)
    started = begin_install(NAME, directory)
    if started is None:
        return
    transformers = importlib.metadata.version("transformers")
    torch = importlib.metadata.version("torch").split("+")[0]  # the local CPU wheel satisfies the plain version
    packages = [f"transformers[serving]=={transformers}", f"torch=={torch}", "accelerate"]
    make_venv(directory / "venv", packages, directory / "install.log")
    mark_installed(directory, started, f"transformers {transformers} with torch {torch}")


def installed(cache: Path) -> bool:
    return is_installed(home(cache))


def servers(cache: Path, port: int) -> list[Server]:
    model = str(converted_model())
    command = [str(home(cache) / "venv" / "bin" / "transformers"), "serve", model, "--continuous-batching"]
    command += ["--cb-num-blocks", str(CACHE_BLOCKS), "--dtype", "bfloat16", "--device", "cpu"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    # It rejects fields it does not know (ignore_eos) and stream_options; an end token of -1 never comes, so each
    # reply runs to max_tokens. Usage is sent with the last chunk anyway.
    never_stop = json.dumps({"eos_token_id": -1, "do_sample": False})
    extra = {"stream_options": None, "generation_config": never_stop}
    return [Server(f"{NAME}-bf16", "bf16 of the converted weights", command, port, model=model, extra=extra)]


PEER = Peer(NAME, install, installed, servers)

if __name__ == "__main__":
    sys.exit(PEER.main(cache_dir()))
