"""Server settings, validated once at start: command-line flags over `TOKENMILL_*` environment variables over defaults.

Engine knobs given here override the same fields of every entry in models.yaml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOKENMILL_", extra="forbid")

    models: Path = DEFAULT_REGISTRY
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_key: str | None = None
    api_key_file: Path | None = None  # one key per line ('#' comments); any of them, or api_key, is accepted
    metrics_open: bool = False  # serve /metrics without the API key
    cache_dir: Path | None = None
    max_waiting_requests: int | None = Field(default=None, ge=0)
    threads: int | None = Field(default=None, ge=1)
    kv_cache_memory: int | None = Field(default=None, gt=0)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    max_num_seqs: int | None = Field(default=None, ge=1)
    max_num_batched_tokens: int | None = Field(default=None, ge=16)
    prefill_chunk_ratio: float | None = Field(
        default=None,
        ge=0,
        description="while requests decode, a step's prompt tokens may cost this many decode-only steps, so streams "
        f"keep flowing during a long prefill (default: {ModelEntry.model_fields['prefill_chunk_ratio'].default:g}, "
        "from the registry; 0: prompts fill the token budget)",
    )
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_prompts_per_request: int = Field(
        default=128,
        ge=1,
        description="prompts one /v1/completions request may batch; past it: 400 (prompts x n must also fit the "
        "model's max_num_seqs + max_waiting_requests)",
    )
    body_read_timeout: float = Field(default=30.0, gt=0)  # seconds a client may take between body chunks
    request_timeout: float | None = Field(default=None, gt=0)  # seconds; a request's own `timeout` may lower it
    keepalive_seconds: float | None = Field(
        default=None,
        gt=0,
        description="send an SSE comment on a stream silent this long (off by default: OpenAI sends none, and some "
        "clients' parsers fail on them; set it where a proxy cuts idle streams before a long prompt's first token)",
    )
    worker_start_timeout: float = Field(default=600.0, gt=0)
    # no progress (a step, or a heartbeat showing the worker computing) for this long with work pending: restart
    watchdog_seconds: float = Field(default=15.0, gt=0)
    max_worker_restarts: int = Field(default=3, ge=0)  # per model within 5 minutes, then the model is failed
    drain_timeout: float = Field(default=30.0, ge=0)  # on SIGTERM, how long in-flight requests may take
    admin_key: str | None = Field(
        default=None,
        description="key for /admin/* ('Authorization: Bearer KEY'); default: the API key; with neither, only "
        "loopback clients may use them",
    )
    header_read_timeout: float = Field(
        default=10.0, gt=0, description="seconds a client may take to send a request's headers; then 408 and close"
    )
    max_connections: int = Field(
        default=1000, ge=1, description="open HTTP connections; past it a new one gets 503 and is closed"
    )
    log_level: str = "info"

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
