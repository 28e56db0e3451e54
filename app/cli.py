"""The `tokenmill` command. Subcommands import the worker lazily, so the API process never loads torch."""

from __future__ import annotations

import argparse
import logging
import sys
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo

from app.settings import Flag, Settings
from worker.generate import build_parser as build_generate_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="An OpenAI-compatible LLM inference server.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="serve the models of a registry over HTTP",
        description="Start the API process and one worker process per model in the registry. Every flag but the Ray "
        f"Serve ones can also be set as an environment variable {env_var('')}<FLAG> (e.g. {env_var('api_key')}); a "
        "flag given overrides it. SIGHUP, or POST /admin/reload (with the admin key, else the API key; with neither, "
        "from this machine only), re-reads the registry without a restart.",
    )
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


def flag_name(setting: str) -> str:
    """The `serve` flag of a setting."""
    return "--" + setting.replace("_", "-")


def env_var(setting: str) -> str:
    """The environment variable of a setting (pydantic-settings reads it, case-insensitively)."""
    return Settings.model_config.get("env_prefix", "") + setting.upper()


def shown_default(field: FieldInfo) -> str:
    """A setting's default as its flag's help shows it; an unset (None) one says what unset means."""
    default = field.get_default(call_default_factory=True)
    if default is None:
        return next((item.unset for item in field.metadata if isinstance(item, Flag)), Flag().unset)
    if isinstance(default, bool):
        return "on" if default else "off"
    return format(default, "g") if isinstance(default, float) else str(default)


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """A flag for every setting in app.settings, made from its field: the flag's name, type (choices for a Literal),
    help (the description) and the default the help shows. A flag not given is None, so that the setting falls back
    to its environment variable, then to its default."""
    for name, field in Settings.model_fields.items():
        if field.description is None:
            raise TypeError(f"the setting {name} has no description for its flag's help")
        flag = next((item for item in field.metadata if isinstance(item, Flag)), Flag())
        kinds = [kind for kind in get_args(field.annotation) if kind is not type(None)]
        is_union = get_origin(field.annotation) in (Union, types.UnionType)
        kind = kinds[0] if is_union and len(kinds) == 1 else field.annotation
        help_text = f"{field.description} (default: {shown_default(field)})".replace("%", "%%")
        options: dict[str, Any] = {"default": None, "help": help_text}
        if kind is bool and flag.parse is None:
            parser.add_argument(flag_name(name), action="store_true", **options)
            continue
        if get_origin(kind) is Literal:
            options["choices"] = list(get_args(kind))
        else:
            options["metavar"] = flag.metavar or name.upper()
        value_type = flag.parse or (kind if kind in (int, float) else str)
        parser.add_argument(flag_name(name), type=value_type, **options)


def setting_values(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags; the others are left to the environment and the defaults."""
    return {name: value for name, value in vars(args).items() if name in Settings.model_fields and value is not None}


def warn_if_exposed(settings: Settings) -> None:
    """A listener other machines can reach, and no API key: say so at start, where the operator looks."""
    from app.auth import binds_loopback_only

    if binds_loopback_only(settings.host) or settings.api_keys():
        return
    admin_key = flag_name("admin_key")
    admin = f"with {admin_key}" if settings.admin_key else f"only from this machine (no {admin_key})"
    logging.getLogger("tokenmill").warning(
        "listening on %s without an API key: anyone who can reach port %d can use the API; set %s (%s) to require "
        "one. /admin/* answers %s.",
        settings.host,
        settings.port,
        flag_name("api_key"),
        env_var("api_key"),
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

    given = setting_values(args)
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
