"""Server settings, validated once at start: command-line flags over `TOKENMILL_*` environment variables over defaults.

Engine knobs given here override the same fields of every entry in models.yaml.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.registry import DEFAULT_REGISTRY, ModelEntry, Registry, load_registry, parse_size

ENGINE_OVERRIDES = (
    "max_waiting_requests",
    "threads",
    "kv_cache_memory",
    "gpu_memory_utilization",
    "max_num_seqs",
    "max_num_batched_tokens",
    "prefill_chunk_ratio",
)


@dataclass(frozen=True)
class Flag:
    """What a setting's `serve` flag (app.cli) needs beyond its field: what leaving the setting unset (None) means,
    shown as the flag's default; a parser for the flag's text other than the field's type; a metavar."""

    unset: str = "none"
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None


def _registry_flag(name: str, otherwise: str = "", **flag: Any) -> Flag:
    """An engine knob: unset, each model keeps its own from the registry, whose default is shown."""
    default = ModelEntry.model_fields[name].default
    return Flag(unset=f"each model's own in the registry, else {otherwise or format(default, 'g')}", **flag)


class Settings(BaseSettings):
    """Every field is a `tokenmill serve` flag (--name-with-dashes) and an environment variable (TOKENMILL_NAME);
    its description is the flag's help, and its default the help's default."""

    model_config = SettingsConfigDict(env_prefix="TOKENMILL_", extra="forbid")

    models: Path = Field(
        default=DEFAULT_REGISTRY, description="the models.yaml registry; the bundled one serves SmolLM2"
    )
    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=8000, ge=0, le=65535, description="port to listen on")
    api_key: str | None = Field(
        default=None, description="require 'Authorization: Bearer KEY' or 'x-api-key: KEY' on the API and /metrics"
    )
    api_key_file: Path | None = Field(
        default=None,
        description="a file of accepted keys, one per line ('#' comments); any of them, or --api-key, is accepted",
    )
    metrics_open: bool = Field(default=False, description="serve /metrics without the API key")
    cache_dir: Annotated[Path | None, Flag(unset="~/.cache/tokenmill")] = Field(
        default=None, description="where converted weights are cached"
    )
    max_waiting_requests: Annotated[int | None, _registry_flag("max_waiting_requests")] = Field(
        default=None, ge=0, description="bounded waiting queue per model; past it: 429"
    )
    threads: Annotated[
        int | None, _registry_flag("threads", "every usable core, fewer while other processes keep cores busy")
    ] = Field(default=None, ge=1, description="torch threads per worker")
    kv_cache_memory: Annotated[
        int | None,
        _registry_flag(
            "kv_cache_memory", "sized from the memory left once the weights are loaded", parse=str, metavar="SIZE"
        ),
    ] = Field(default=None, gt=0, description="KV cache per model, bytes or '512MiB'")
    gpu_memory_utilization: Annotated[float | None, _registry_flag("gpu_memory_utilization")] = Field(
        default=None, gt=0, le=1, description="CUDA: share of the device's memory a model may use"
    )
    max_num_seqs: Annotated[int | None, _registry_flag("max_num_seqs")] = Field(
        default=None, ge=1, description="running sequences per engine step"
    )
    max_num_batched_tokens: Annotated[int | None, _registry_flag("max_num_batched_tokens")] = Field(
        default=None, ge=16, description="tokens per engine step"
    )
    prefill_chunk_ratio: Annotated[float | None, _registry_flag("prefill_chunk_ratio")] = Field(
        default=None,
        ge=0,
        description="while requests decode, a step's prompt tokens may cost this many decode-only steps of every "
        "request present (waiting ones included), so streams keep flowing during a long prefill; 0: prompts fill "
        "the token budget",
    )
    max_body_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="largest request body, in bytes; past it: 413"
    )
    max_prompts_per_request: int = Field(
        default=128,
        ge=1,
        description="prompts one /v1/completions request may batch; past it: 400 (prompts x n must also fit the "
        "model's max_num_seqs + max_waiting_requests)",
    )
    body_read_timeout: float = Field(
        default=30.0, gt=0, description="seconds a client may take between body chunks; then 408"
    )
    request_timeout: float | None = Field(
        default=None, gt=0, description="seconds before a request is aborted; a request's own `timeout` may lower it"
    )
    keepalive_seconds: Annotated[float | None, Flag(unset="off")] = Field(
        default=None,
        gt=0,
        description="send an SSE comment on a stream silent this long, where a proxy cuts idle streams before a long "
        "prompt's first token (OpenAI sends none, and some clients' parsers fail on them)",
    )
    request_metrics: bool = Field(
        default=False,
        description="give every chat and completions reply its own timing (`metrics`: queue, time to first token, "
        "inter-token gap, tokens per second); without it a request asks with `return_metrics`",
    )
    worker_start_timeout: float = Field(
        default=600.0, gt=0, description="seconds a worker may take to load its model and report ready"
    )
    watchdog_seconds: float = Field(
        default=15.0,
        gt=0,
        description="restart a worker that shows no progress (a step, or a heartbeat showing it computing) for this "
        "many seconds with work pending",
    )
    max_worker_restarts: int = Field(
        default=3, ge=0, description="worker restarts per model within 5 minutes; past them the model is failed"
    )
    drain_timeout: float = Field(default=30.0, ge=0, description="on SIGTERM, seconds in-flight requests may take")
    admin_key: Annotated[str | None, Flag(unset="the API key")] = Field(
        default=None,
        description="key for /admin/* ('Authorization: Bearer KEY'); with neither it nor an API key, only loopback "
        "clients may use them",
    )
    header_read_timeout: float = Field(
        default=10.0, gt=0, description="seconds a client may take to send a request's headers; then 408 and close"
    )
    max_connections: int = Field(
        default=1000, ge=1, description="open HTTP connections; past it a new one gets 503 and is closed"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="how much to log")

    @field_validator("kv_cache_memory", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return parse_size(value) if isinstance(value, str) else value

    def api_keys(self) -> list[str]:
        """Every accepted key; empty means the API is open. Read once, at start."""
        keys = [self.api_key] if self.api_key else []
        if self.api_key_file is not None:
            lines = self.api_key_file.read_text().splitlines()
            keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
            if not keys:
                raise ValueError(f"{self.api_key_file}: no API keys in the file")
        return keys

    def admin_keys(self) -> list[str]:
        """The keys /admin/* accepts: the admin key, else every API key; empty means loopback clients only."""
        return [self.admin_key] if self.admin_key else self.api_keys()

    def registry(self) -> Registry:
        """models.yaml with this server's engine overrides applied to every entry."""
        registry = load_registry(self.models)
        update = {name: getattr(self, name) for name in ENGINE_OVERRIDES if getattr(self, name) is not None}
        if not update:
            return registry
        return Registry(models=[entry.model_copy(update=update) for entry in registry.models])
