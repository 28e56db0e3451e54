"""Every server the comparison report knows: tokenmill itself, the naive baseline and the installable peers; and
the command line that installs, lists and starts them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loadtests.peers import cache_dir, llama_cpp, transformers_serve, vllm_cpu
from loadtests.peers.server import Peer, Server

GGUF_BLOCKS = Path(__file__).with_name("gguf-blocks.yaml")


def tokenmill(port: int) -> list[Server]:
    """The defaults (one worker thread on 2 cores), two threads bound to the cores as vLLM's best runs (faster on a
    quiet machine, but spinning OpenMP threads collapse when another process wants a core), and two threads computing
    from the GGUF file's own blocks in float32 (`quantization: gguf`)."""
    command = [sys.executable, "-m", "app.cli", "serve", "--port"]
    bound = {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}
    servers = []
    for offset, (name, weights, extra, env) in enumerate(
        [
            ("tokenmill", "Q4_1 GGUF dequantized, bf16", [], {}),
            ("tokenmill-2threads", "Q4_1 GGUF dequantized, bf16, 2 threads bound", ["--threads", "2"], bound),
            (
                "tokenmill-gguf-2threads",
                "Q4_1 GGUF blocks, fp32, 2 threads bound",
                ["--models", str(GGUF_BLOCKS), "--threads", "2"],
                bound,
            ),
        ]
    ):
        servers.append(
            Server(
                name=name,
                weights=weights,
                command=[*command, str(port + offset), *extra],
                port=port + offset,
                env=env,
                ready_path="/ready",
            )
        )
    return servers


def _naive_servers(cache: Path, port: int) -> list[Server]:
    return [
        Server(
            name="naive",
            weights="Q4_1 GGUF dequantized, bf16",
            command=[sys.executable, "-m", "loadtests.naive_server", "--port", str(port)],
            port=port,
            ready_path="/ready",
            max_concurrency=8,  # one request at a time at about 13 tok/s: c=64 would take ten minutes
        )
    ]


NAIVE = Peer("naive", install=lambda cache: None, installed=lambda cache: True, servers=_naive_servers)
PEERS = {peer.name: peer for peer in (vllm_cpu.PEER, llama_cpp.PEER, transformers_serve.PEER, NAIVE)}


def install(names: list[str], cache: Path) -> None:
    for name in names:
        print(f"--- {name}", flush=True)
        PEERS[name].install(cache)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.peers", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    install_p = sub.add_parser("install", help="install peers (all by default) into their own environments")
    install_p.add_argument("names", nargs="*", default=[], help=f"of {', '.join(PEERS)}")
    sub.add_parser("list", help="the peers, their configurations and whether they are installed")
    serve_p = sub.add_parser("serve", help="run one peer in the foreground")
    serve_p.add_argument("name", choices=list(PEERS))
    serve_p.add_argument("--port", type=int, default=8400)
    serve_p.add_argument("--config", default=None)
    args = parser.parse_args(argv)
    cache = cache_dir()
    if args.action == "install":
        unknown = sorted(set(args.names) - set(PEERS))
        if unknown:
            parser.error(f"unknown peers {', '.join(unknown)}; choose from {', '.join(PEERS)}")
        install(args.names or list(PEERS), cache)
    elif args.action == "list":
        print(f"cache: {cache}")
        for peer in PEERS.values():
            state = "installed" if peer.installed(cache) else "not installed"
            print(f"{peer.name:20} {state:14} {', '.join(s.name for s in peer.servers(cache, 0))}")
    else:
        return PEERS[args.name].serve(cache, args.port, args.config)
    return 0
