"""The `tokenmill` command. Subcommands import the worker lazily, so the API process never loads torch."""

from __future__ import annotations

import argparse
import logging
import sys
import types
from typing import Any, Union, get_args, get_origin

from app.settings import Settings
from worker.generate import build_parser as build_generate_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="An OpenAI-compatible LLM inference server.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="serve the models of a registry over HTTP",
        description="Start the API process and one worker process per model in the registry. Every flag can also "
        "be set as an environment variable TOKENMILL_<FLAG> (e.g. TOKENMILL_API_KEY). SIGHUP, or POST /admin/reload "
        "(with the admin key, else the API key; with neither, from this machine only), re-reads the registry "
        "without a restart.",
    )
    serve.add_argument("--models", help="the models.yaml registry (default: the bundled one, SmolLM2)")
    serve.add_argument("--host", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: 8000)")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the API and /metrics")
    serve.add_argument("--api-key-file", help="a file of accepted keys, one per line (with or without --api-key)")
    serve.add_argument("--metrics-open", action="store_true", default=None, help="serve /metrics without the key")
    serve.add_argument("--max-waiting-requests", type=int, help="bounded waiting queue per model; past it: 429")
    serve.add_argument(
        "--threads",
        type=int,
        help="torch threads per worker (default: every usable core, fewer while other processes keep cores busy)",
    )
    serve.add_argument("--kv-cache-memory", help="KV cache per model, bytes or '512MiB' (default: per registry)")
    serve.add_argument(
        "--gpu-memory-utilization", type=float, help="CUDA: share of the device's memory a model may use (0.9)"
    )
    serve.add_argument("--max-num-seqs", type=int, help="running sequences per engine step")
    serve.add_argument("--max-num-batched-tokens", type=int, help="tokens per engine step")
    serve.add_argument("--max-body-bytes", type=int, help="largest request body (default: 4 MiB); past it: 413")
    serve.add_argument("--body-read-timeout", type=float, help="seconds between body chunks (default: 30); 408")
    serve.add_argument("--request-timeout", type=float, help="seconds before a request is aborted (default: none)")
    serve.add_argument("--watchdog-seconds", type=float, help="restart a stuck worker after this (default: 15)")
    serve.add_argument("--max-worker-restarts", type=int, help="restarts per model in 5 minutes (default: 3)")
    serve.add_argument("--drain-timeout", type=float, help="on SIGTERM, seconds for in-flight requests (default: 30)")
    serve.add_argument("--cache-dir", help="where converted weights are cached (default: ~/.cache/tokenmill)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="(default: info)")
    add_setting_flags(serve)
    ray = serve.add_argument_group("Ray Serve", "run replicas of this server as a Ray Serve application")
    ray.add_argument("--ray", action="store_true", help="deploy on Ray Serve (pip install 'tokenmill[ray]')")
    ray.add_argument("--ray-address", default=None, help="a cluster to join ('auto', 'ray://...'); default: a new one")
    ray.add_argument("--min-replicas", type=int, default=1, help="replicas kept running (default: 1)")
    ray.add_argument("--max-replicas", type=int, default=1, help="autoscaling ceiling (default: 1)")
    ray.add_argument(
        "--target-ongoing-requests", type=float, default=16, help="ongoing requests per replica to scale at (16)"
    )
    ray.add_argument("--max-ongoing-requests", type=int, default=64, help="requests a replica takes at once (64)")
    ray.add_argument(
        "--max-queued-requests", type=int, default=256, help="requests queued for replicas; past it: 429 (256)"
    )
    build_generate_parser(sub.add_parser("generate", help="generate offline (no HTTP) with a model of the registry"))
    return parser


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """A flag for every setting that documents itself (a `description` in app.settings) and has none above: its
    help, type and default come from the settings model."""
    taken = {option for action in parser._actions for option in action.option_strings}
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.description is None or flag in taken:
            continue
        kinds = [kind for kind in get_args(field.annotation) if kind is not type(None)]
        is_union = get_origin(field.annotation) in (Union, types.UnionType)
        kind = kinds[0] if is_union and len(kinds) == 1 else field.annotation
        default = f" (default: {field.default:g})" if isinstance(field.default, float) else ""
        default = default or (f" (default: {field.default})" if field.default not in (None, False) else "")
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=None, help=field.description + default)
        else:
            value_type = kind if kind in (int, float) else str
            parser.add_argument(flag, type=value_type, metavar=name.upper(), help=field.description + default)


def warn_if_exposed(settings: Settings) -> None:
    """A listener other machines can reach, and no API key: say so at start, where the operator looks."""
    from app.auth import binds_loopback_only

    if binds_loopback_only(settings.host) or settings.api_keys():
        return
    admin = "with --admin-key" if settings.admin_key else "only from this machine (no --admin-key)"
    logging.getLogger("tokenmill").warning(
        "listening on %s without an API key: anyone who can reach port %d can use the API; set --api-key "
        "(TOKENMILL_API_KEY) to require one. /admin/* answers %s.",
        settings.host,
        settings.port,
        admin,
    )


def serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from app import access_log
    from app.connections import H11_MAX_INCOMPLETE_EVENT, protocol_class
    from app.main import create_app
    from app.server import DrainingServer
    from worker.registry import RegistryError

    given: dict[str, Any] = {
        name: value
        for name, value in vars(args).items()
        if name not in ("command",) and value is not None and name in Settings.model_fields
    }
    if args.ray:
        from app.ray_serve import run as run_on_ray

        return run_on_ray(args, given)
    try:
        settings = Settings(**given)
        app = create_app(settings)
    except (ValidationError, RegistryError, OSError, ValueError) as exc:
        print(f"tokenmill: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,  # the drain happened before uvicorn is told to stop
        http=protocol_class(settings.header_read_timeout, settings.max_connections),
        h11_max_incomplete_event_size=H11_MAX_INCOMPLETE_EVENT,
    )
    access_log.install()  # after uvicorn.Config, which configures uvicorn's loggers
    warn_if_exposed(settings)
    server = DrainingServer(config, app.state.pool, settings.drain_timeout, reload=app.state.reloader.reload_logged)
    server.run()
    if app.state.pool.all_failed():
        return 1
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    from worker.generate import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
