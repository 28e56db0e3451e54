"""tokenmill on Ray Serve: `tokenmill serve --ray`. Each Serve replica runs a whole tokenmill server (the API process
and one worker per model, as `tokenmill serve` starts them) on a private loopback port, and forwards HTTP to it,
streaming. Serve adds what one server lacks: replicas across a cluster, one GPU each where the cluster has GPUs,
autoscaling on ongoing requests, backpressure (429 with Retry-After), and a replica whose server dies is replaced
(its health check fails).
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, get_args

import httpx

from app.settings import Settings

log = logging.getLogger("tokenmill.ray")

REPLICA_HEADER = "x-tokenmill-replica"  # which replica answered: for debugging and for tests
_HOP_BY_HOP = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive"})


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the replica's process dies, so no server outlives its replica."""
    libc = ctypes.CDLL(None)
    if hasattr(libc, "prctl"):
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TokenmillReplica:
    """A Serve deployment class (decorated in `build_app`): one tokenmill server per replica."""

    def __init__(self, server_args: list[str], ready_timeout: float = 900.0) -> None:
        from ray import serve

        context = serve.get_replica_context()
        replica_id = getattr(context, "replica_id", None)
        self.replica = str(getattr(replica_id, "unique_id", replica_id or context.replica_tag))
        self.port = _free_port()
        cmd = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port), *server_args]
        self.process = subprocess.Popen(cmd, preexec_fn=_die_with_parent)
        self.base_url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tokenmill exited with {self.process.returncode} while starting")
            try:
                if httpx.get(f"{self.base_url}/ready", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            self.process.kill()
            raise RuntimeError(f"tokenmill was not ready after {ready_timeout:g} s")
        self.client = httpx.AsyncClient(base_url=self.base_url, timeout=httpx.Timeout(None, connect=10.0))
        log.info("replica %s serves tokenmill on port %d (pid %d)", self.replica, self.port, self.process.pid)

    async def __call__(self, request: Any) -> Any:
        from starlette.background import BackgroundTask
        from starlette.responses import StreamingResponse

        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP]
        if request.client is not None:
            # The replica's server sees Serve's proxy on loopback: the client's own address, appended as proxies do,
            # decides who may use /admin
            hops = [v for k, v in headers if k.lower() == "x-forwarded-for"] + [request.client.host]
            headers = [(k, v) for k, v in headers if k.lower() != "x-forwarded-for"]
            headers.append(("x-forwarded-for", ", ".join(hops)))
        upstream = self.client.build_request(
            request.method, request.url.path, params=request.url.query, headers=headers, content=await request.body()
        )
        response = await self.client.send(upstream, stream=True)
        out_headers = {k: v for k, v in response.headers.items() if k.lower() not in _HOP_BY_HOP}
        out_headers[REPLICA_HEADER] = self.replica
        return StreamingResponse(
            response.aiter_raw(),
            status_code=response.status_code,
            headers=out_headers,
            background=BackgroundTask(response.aclose),
        )

    def check_health(self) -> None:
        """Serve calls this periodically; raising gets the replica replaced."""
        if self.process.poll() is not None:
            raise RuntimeError(f"tokenmill exited with {self.process.returncode}")

    def __del__(self) -> None:
        process = getattr(self, "process", None)
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)  # drains in-flight requests, then exits
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()


def server_args(args: argparse.Namespace, given: dict[str, Any]) -> list[str]:
    """The `tokenmill serve` flags each replica's server gets: what was given, less host, port and the Ray flags.
    Paths are made absolute: a replica's working directory is not this one's."""
    from app.cli import flag_name

    fields = Settings.model_fields
    paths = {name for name, field in fields.items() if Path in (field.annotation, *get_args(field.annotation))}
    out: list[str] = []
    for name, value in given.items():
        if name in ("host", "port"):
            continue
        flag = flag_name(name)
        if isinstance(value, bool):
            out += [flag] if value else []
        else:
            out += [flag, str(Path(value).resolve()) if name in paths else str(value)]
    return out


def build_app(args: argparse.Namespace, replica_args: list[str], gpus_per_replica: float) -> Any:
    from ray import serve
    from ray.serve.config import AutoscalingConfig, BackpressureConfig

    deployment = serve.deployment(
        name="tokenmill",
        ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": 0},
        autoscaling_config=AutoscalingConfig(
            min_replicas=args.min_replicas,
            initial_replicas=args.min_replicas,
            max_replicas=max(args.max_replicas, args.min_replicas),
            target_ongoing_requests=args.target_ongoing_requests,
        ),
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=1),
        health_check_period_s=2.0,
        health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=60.0,
    )(TokenmillReplica)
    return deployment.bind(replica_args)


def run(args: argparse.Namespace, given: dict[str, Any]) -> int:
    """Start (or join, with --ray-address) a Ray cluster, deploy tokenmill on Serve, and serve until interrupted."""
    import ray
    from ray import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ray.init(address=args.ray_address, include_dashboard=False, logging_level=logging.WARNING)
    gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0  # type: ignore[no-untyped-call]
    defaults = Settings.model_fields
    host = args.host or defaults["host"].get_default(call_default_factory=True)
    port = args.port or defaults["port"].get_default(call_default_factory=True)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args, server_args(args, given), gpus), name="tokenmill", route_prefix="/")
    log.info(
        "tokenmill on Ray Serve at http://%s:%d: %d-%d replicas, %g GPU each",
        host,
        port,
        args.min_replicas,
        args.max_replicas,
        gpus,
    )
    stop = False

    def on_signal(sig: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop:
        time.sleep(0.5)
    serve.shutdown()  # type: ignore[no-untyped-call]
    ray.shutdown()  # type: ignore[no-untyped-call]
    return 0
