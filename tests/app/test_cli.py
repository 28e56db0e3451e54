"""`tokenmill serve`'s flags are made from the Settings model: one flag and one environment variable per setting,
the field's description and default in the flag's help, and a flag given overrides the environment."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import pytest
from pydantic.fields import FieldInfo

from app import cli
from app.ray_serve import server_args
from app.settings import Flag, Settings

# A value for every setting, other than its default: (the text given to the flag or the variable, the value it sets).
SAMPLES: dict[str, tuple[str, Any]] = {
    "models": ("/srv/tokenmill/models.yaml", Path("/srv/tokenmill/models.yaml")),
    "host": ("0.0.0.0", "0.0.0.0"),
    "port": ("9001", 9001),
    "api_key": ("key-1", "key-1"),
    "api_key_file": ("/srv/tokenmill/keys", Path("/srv/tokenmill/keys")),
    "metrics_open": ("true", True),
    "cache_dir": ("/srv/tokenmill/cache", Path("/srv/tokenmill/cache")),
    "max_waiting_requests": ("7", 7),
    "threads": ("3", 3),
    "kv_cache_memory": ("512MiB", 512 * 1024 * 1024),
    "gpu_memory_utilization": ("0.5", 0.5),
    "max_num_seqs": ("8", 8),
    "max_num_batched_tokens": ("512", 512),
    "prefill_chunk_ratio": ("0.25", 0.25),
    "max_body_bytes": ("2048", 2048),
    "max_prompts_per_request": ("4", 4),
    "body_read_timeout": ("2.5", 2.5),
    "request_timeout": ("60", 60.0),
    "keepalive_seconds": ("5", 5.0),
    "request_metrics": ("true", True),
    "worker_start_timeout": ("90", 90.0),
    "watchdog_seconds": ("20", 20.0),
    "max_worker_restarts": ("1", 1),
    "drain_timeout": ("0", 0.0),
    "admin_key": ("admin-1", "admin-1"),
    "header_read_timeout": ("4", 4.0),
    "max_connections": ("64", 64),
    "log_level": ("debug", "debug"),
}
RAY_FLAGS = {"ray", "ray_address", "min_replicas", "max_replicas", "target_ongoing_requests"}
RAY_FLAGS |= {"max_ongoing_requests", "max_queued_requests"}


class _Started(Exception):
    """Raised in place of starting the app: `serve` has built its settings."""


@pytest.fixture(autouse=True)
def no_tokenmill_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("TOKENMILL_"):
            monkeypatch.delenv(name)


def serve_parser() -> argparse.ArgumentParser:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser: argparse.ArgumentParser = sub.choices["serve"]
    return parser


def flag_args(name: str, text: str) -> list[str]:
    flag = "--" + name.replace("_", "-")
    return [flag] if Settings.model_fields[name].annotation is bool else [flag, text]


def served_settings(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> Settings:
    """The settings `tokenmill serve ARGV` starts the server with."""
    seen: list[Settings] = []

    def create_app(settings: Settings) -> None:
        seen.append(settings)
        raise _Started

    monkeypatch.setattr("app.main.create_app", create_app)
    with pytest.raises(_Started):
        cli.main(["serve", *argv])
    return seen[0]


def test_samples_cover_every_setting_with_a_value_other_than_its_default() -> None:
    assert set(SAMPLES) == set(Settings.model_fields)
    for name, (_, value) in SAMPLES.items():
        assert value != Settings.model_fields[name].get_default(call_default_factory=True), name


def test_serve_has_a_flag_for_the_settings_and_ray_only() -> None:
    dests = [action.dest for action in serve_parser()._actions if action.dest != "help"]
    assert sorted(dests) == sorted([*Settings.model_fields, *RAY_FLAGS])


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_every_setting_has_one_flag_and_an_environment_variable(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    text, value = SAMPLES[name]
    flags = [action for action in serve_parser()._actions if action.dest == name]
    assert [action.option_strings for action in flags] == [["--" + name.replace("_", "-")]]

    assert getattr(served_settings(monkeypatch, flag_args(name, text)), name) == value
    assert getattr(served_settings(monkeypatch, []), name) == Settings.model_fields[name].get_default()

    monkeypatch.setenv("TOKENMILL_" + name.upper(), text)
    assert getattr(Settings(), name) == value
    assert getattr(served_settings(monkeypatch, []), name) == value


def expected_default(name: str) -> str:
    field = Settings.model_fields[name]
    default = field.get_default(call_default_factory=True)
    if default is None:
        return next((item.unset for item in field.metadata if isinstance(item, Flag)), "none")
    if isinstance(default, bool):
        return "on" if default else "off"
    return f"{default:g}" if isinstance(default, float) else str(default)


def flag_help(help_text: str, flag: str) -> str:
    """The help of one flag in `serve --help` printed unwrapped: after the flag on its line, or on the next line."""
    lines = help_text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"  {flag} ") or line == f"  {flag}")
    rest = lines[at].split("  ", 2)[2:] if lines[at].count("  ") > 1 else []
    return (rest[0] if rest else lines[at + 1]).strip()


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_each_flag_help_shows_the_field_description_and_default(
    name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "100000")  # help lines unwrapped
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--help"])
    shown = flag_help(capsys.readouterr().out, "--" + name.replace("_", "-"))
    description = Settings.model_fields[name].description
    assert description
    assert shown == f"{description} (default: {expected_default(name)})"


def test_help_shows_plain_defaults_plainly(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100000")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--help"])
    out = capsys.readouterr().out
    shown = {
        "--host": "(default: 127.0.0.1)",
        "--port": "(default: 8000)",
        "--body-read-timeout": "(default: 30)",
        "--metrics-open": "(default: off)",
        "--log-level": "(default: info)",
        "--request-timeout": "(default: none)",
        "--gpu-memory-utilization": "(default: each model's own in the registry, else 0.9)",
    }
    for flag, default in shown.items():
        assert flag_help(out, flag).endswith(default), flag


def test_a_default_factory_is_shown_as_its_value() -> None:
    assert cli.shown_default(FieldInfo(default_factory=lambda: Path("/var/cache/tokenmill"))) == "/var/cache/tokenmill"
    assert cli.shown_default(FieldInfo(default_factory=lambda: 2.5)) == "2.5"


def test_log_level_choices_come_from_its_type() -> None:
    (action,) = [action for action in serve_parser()._actions if action.dest == "log_level"]
    assert action.choices == ["debug", "info", "warning", "error"]
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--log-level", "verbose"])


def test_metrics_open_unset_falls_back_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli.build_parser().parse_args(["serve"]).metrics_open is None
    monkeypatch.setenv("TOKENMILL_METRICS_OPEN", "1")
    assert served_settings(monkeypatch, []).metrics_open is True


@pytest.mark.parametrize(
    ("name", "environment", "flag", "value"),
    [
        ("port", "9001", "9002", 9002),
        ("models", "/a/models.yaml", "/b/models.yaml", Path("/b/models.yaml")),
        ("kv_cache_memory", "1GiB", "512MiB", 512 * 1024 * 1024),
        ("request_timeout", "5", "6", 6.0),
        ("admin_key", "from-env", "from-flag", "from-flag"),
        ("log_level", "error", "debug", "debug"),
        ("metrics_open", "false", "", True),
    ],
)
def test_a_flag_overrides_the_environment_variable(
    name: str, environment: str, flag: str, value: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENMILL_" + name.upper(), environment)
    assert getattr(served_settings(monkeypatch, []), name) != value
    assert getattr(served_settings(monkeypatch, flag_args(name, flag)), name) == value


def test_an_invalid_flag_value_is_refused_by_the_parser() -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--port", "eighty"])


def test_ray_replicas_get_the_same_settings_as_flags() -> None:
    given = {name: value for name, (_, value) in SAMPLES.items() if name not in ("host", "port")}
    args = cli.build_parser().parse_args(["serve", *server_args(argparse.Namespace(), given)])
    assert Settings(**cli.setting_values(args)).model_dump(exclude={"host", "port"}) == given


def test_the_readme_names_every_serve_flag() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [name for name in Settings.model_fields if f"`--{name.replace('_', '-')}`" not in readme]
    assert missing == []
