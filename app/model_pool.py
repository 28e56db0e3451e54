"""`ModelPool`: the models this server serves, each a worker process behind an `EngineClient` plus its tokenizer.

It starts every worker at once, writes the effective registry (models.yaml with the server's overrides) for them,
and answers which model a request names.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from app.engine_client import EngineClient
from app.errors import APIError
from app.metrics import Metrics
from app.supervisor import RestartPolicy, Supervisor
from app.tokenizer import Tokenizer
from worker.messages import ModelInfo, StepOutput
from worker.registry import ModelEntry, Registry

log = logging.getLogger("tokenmill.models")


@dataclass
class ServedModel:
    entry: ModelEntry
    client: EngineClient
    supervisor: Supervisor | None = None
    tokenizer: Tokenizer | None = None
    loading: asyncio.Task[None] | None = None
    last_used: float = 0.0

    @property
    def ready(self) -> bool:
        return self.client.ready and self.tokenizer is not None

    @property
    def unloaded(self) -> bool:
        """A lazy model that is not loaded, nor loading, nor failed."""
        return not self.ready and not self.client.failed and (self.loading is None or self.loading.done())

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def info(self) -> ModelInfo:
        if self.client.info is None:
            raise APIError.unavailable(f"model '{self.name}' is still loading", retry_after=5)
        return self.client.info


class ModelPool:
    def __init__(
        self, registry: Registry, metrics: Metrics, cache_dir: Path | None = None, policy: RestartPolicy | None = None
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.policy = policy or RestartPolicy()
        self.draining = False  # set on SIGTERM: not ready, no new requests, in-flight ones finish
        self._dir = Path(tempfile.mkdtemp(prefix="tokenmill-registry-"))
        self.registry_path = self._dir / "models.yaml"
        self.registry_path.write_text(yaml.safe_dump(registry.model_dump(mode="json"), sort_keys=False))
        self.models: dict[str, ServedModel] = {}
        self.aliases: dict[str, str] = {alias: entry.name for entry in registry.models for alias in entry.aliases}
        for entry in registry.models:
            client = EngineClient(entry.name, self.registry_path, entry.max_waiting_requests, cache_dir)
            client.on_step.append(self._step_listener(entry.name))
            self.models[entry.name] = ServedModel(entry, client)
            metrics.add_model(entry.name)
        self.start_timeout = self.policy.start_timeout
        self.lazy_wait = 120.0  # a request for a lazy model waits this long for the load, then gets 503
        self._reaper: asyncio.Task[None] | None = None

    def _step_listener(self, name: str) -> Callable[[StepOutput], None]:
        def on_step(out: StepOutput) -> None:
            self.metrics.observe_step(name, out.stats, sum(len(o.new_token_ids) for o in out.outputs))

        return on_step

    async def start(self, timeout: float) -> None:
        """Load every eager model (lazy ones load on their first request) and start the idle reaper."""
        self.start_timeout = timeout
        self._reaper = asyncio.create_task(self._reap_idle())
        eager = [self._load(model) for model in self.models.values() if model.entry.load == "eager"]
        await asyncio.gather(*eager, return_exceptions=True)

    def _load(self, model: ServedModel) -> asyncio.Task[None]:
        if model.loading is None or model.loading.done():
            model.loading = asyncio.create_task(self._start(model, self.start_timeout))
        return model.loading

    async def _reap_idle(self) -> None:
        """Unload lazy models idle for longer than their keep_alive, freeing their worker's memory."""
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for model in self.models.values():
                keep_alive = model.entry.keep_alive
                if keep_alive is None or not model.ready or model.client.num_in_flight():
                    continue
                if now - model.last_used > keep_alive:
                    log.info("unloading '%s' after %.0f s idle", model.name, now - model.last_used)
                    await self._unload(model)

    async def _unload(self, model: ServedModel) -> None:
        if model.supervisor is not None:
            await model.supervisor.stop()
            model.supervisor = None
        await model.client.stop()
        model.tokenizer = None

    def _model_failed(self, reason: str) -> None:
        log.error("%s", reason)
        if self.all_failed():
            log.critical("no model is left to serve")

    def in_flight(self) -> int:
        """Requests admitted and not finished, over every model."""
        return sum(model.client.num_in_flight() for model in self.models.values())

    def all_failed(self) -> bool:
        return all(model.client.failed for model in self.models.values())

    async def _start(self, model: ServedModel, timeout: float) -> None:
        try:
            await model.client.start(timeout)
        except Exception as exc:
            model.client.mark_failed(f"model '{model.name}' failed to start: {exc}")
            self._model_failed(model.client.error or "")
            return
        model.supervisor = Supervisor(model.client, self.policy, self._model_failed)
        model.supervisor.start()
        model.last_used = time.monotonic()
        info = model.client.info
        assert info is not None
        model.tokenizer = await asyncio.to_thread(Tokenizer.from_dir, info.tokenizer_dir, model.entry.chat_template)
        log.info(
            "model '%s' ready: %s on %s, max_model_len %d, %d KV blocks of %d",
            model.name,
            info.dtype,
            info.device,
            info.max_model_len,
            info.kv_blocks_total,
            info.block_size,
        )

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for model in self.models.values():
            if model.loading is not None:
                model.loading.cancel()
        await asyncio.gather(*(self._unload(model) for model in self.models.values()), return_exceptions=True)
        shutil.rmtree(self._dir, ignore_errors=True)

    def state(self, model: ServedModel) -> str:
        if model.client.failed:
            return "failed"
        if model.ready:
            return "loaded"
        return "unloaded" if model.unloaded else "loading"

    def get(self, name: str) -> ServedModel:
        """The model a client's `model` field names (by its name or an alias), ready to serve, or an APIError."""
        model = self.models.get(self.aliases.get(name, name))
        if model is None:
            raise APIError.model_not_found(name)
        if self.draining:
            raise APIError.unavailable("the server is shutting down", retry_after=5)
        if not model.ready:
            reason = model.client.error or f"model '{model.name}' is {self.state(model)}"
            raise APIError.unavailable(reason, retry_after=5)
        model.last_used = time.monotonic()
        return model

    async def acquire(self, name: str) -> ServedModel:
        """Like `get`, but a lazy model that is not loaded starts loading, and the request waits for it (bounded)."""
        model = self.models.get(self.aliases.get(name, name))
        lazy = model is not None and model.entry.load == "lazy"
        if model is not None and lazy and not model.ready and not model.client.failed and not self.draining:
            loading = self._load(model)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(loading), self.lazy_wait)
        return self.get(name)

    def not_ready(self) -> dict[str, str]:
        """Models that cannot serve now, with the reason; empty when all are ready."""
        if self.draining:
            return {name: "shutting down" for name in self.models}
        return {
            name: model.client.error or "loading"
            for name, model in self.models.items()
            if not model.ready and not (model.entry.load == "lazy" and model.unloaded)
        }
