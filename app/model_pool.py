"""`ModelPool`: the models this server serves, each a worker process behind an `EngineClient` plus its tokenizer.

It starts every worker at once, writes the effective registry (models.yaml with the server's overrides) for them,
and answers which model a request names. `reload` applies a new registry without a restart: added models start,
removed ones drain and stop, changed ones are replaced once their in-flight requests finish, and the others keep
serving untouched.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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

# Fields only the API process reads: changing them never restarts a worker.
APP_ONLY_FIELDS = frozenset({"aliases", "load", "keep_alive", "tool_parser", "reasoning_parser"})


def _worker_view(entry: ModelEntry) -> dict[str, object]:
    return entry.model_dump(exclude=set(APP_ONLY_FIELDS))


@dataclass
class ReloadReport:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


@dataclass
class ServedModel:
    entry: ModelEntry
    client: EngineClient
    supervisor: Supervisor | None = None
    tokenizer: Tokenizer | None = None
    loading: asyncio.Task[None] | None = None
    last_used: float = 0.0
    replacing: bool = False  # a reload is swapping this entry in: requests wait for it (bounded)
    created: int = field(default_factory=lambda: int(time.time()))  # when this entry began to be served

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
        self.cache_dir = cache_dir
        self.policy = policy or RestartPolicy()
        self.draining = False  # set on SIGTERM: not ready, no new requests, in-flight ones finish
        self.drain_timeout = 30.0  # how long a removed or replaced model's in-flight requests may take
        self._dir = Path(tempfile.mkdtemp(prefix="tokenmill-registry-"))
        self._generation = 0
        self.registry_path = self._write(registry)
        self.models: dict[str, ServedModel] = {}
        self.aliases: dict[str, str] = {}
        for entry in registry.models:
            self._add(entry)
        self._index_aliases()
        self.start_timeout = self.policy.start_timeout
        self.lazy_wait = 120.0  # a request for a lazy model waits this long for the load, then gets 503
        self._reaper: asyncio.Task[None] | None = None
        self._retiring: dict[asyncio.Task[None], ServedModel] = {}  # removed or replaced models, draining
        self._reload_loads: dict[str, asyncio.Task[None]] = {}  # loads the last reload started, by model
        self._reload_lock = asyncio.Lock()

    def _write(self, registry: Registry) -> Path:
        """Write the effective registry for workers to read. Each reload writes a new file: a worker of an older
        generation reads its own file again when the supervisor restarts it, until it stops (see _prune_files)."""
        self._generation += 1
        path = self._dir / f"models-{self._generation}.yaml"
        path.write_text(yaml.safe_dump(registry.model_dump(mode="json"), sort_keys=False))
        return path

    def _prune_files(self) -> None:
        """Delete the registry files no worker can read again: not the current one, nor one a served or draining
        model's worker would be restarted from."""
        models = [*self.models.values(), *self._retiring.values()]
        in_use = {self.registry_path, *(model.client.models_path for model in models)}
        for path in self._dir.glob("models-*.yaml"):
            if path not in in_use:
                path.unlink(missing_ok=True)

    def settling(self) -> list[str]:
        """What the last reload still waits for: models it removed or replaced that are still stopping, or models
        it added or replaced that are still loading. Empty once that reload is complete."""
        pending = [f"'{model.name}' stopping" for model in self._retiring.values()]
        return pending + [f"'{name}' loading" for name, task in self._reload_loads.items() if not task.done()]

    def _add(self, entry: ModelEntry) -> ServedModel:
        client = EngineClient(entry.name, self.registry_path, entry.max_waiting_requests, self.cache_dir)
        client.on_step.append(self._step_listener(entry.name))
        model = self.models[entry.name] = ServedModel(entry, client)
        self.metrics.add_model(entry.name)
        return model

    def _index_aliases(self) -> None:
        self.aliases = {alias: model.name for model in self.models.values() for alias in model.entry.aliases}

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
            await model.client.start(timeout, self.policy.heartbeat)
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

    async def reload(self, registry: Registry) -> ReloadReport:
        """Apply a new (already validated) registry. Returns at once; replaced and added models load behind it."""
        async with self._reload_lock:
            if self.draining:
                raise APIError.unavailable("the server is shutting down", retry_after=5)
            self.registry = registry
            self.registry_path = self._write(registry)
            self._reload_loads = {}
            report = ReloadReport()
            wanted = {entry.name for entry in registry.models}
            for name in [name for name in self.models if name not in wanted]:
                self._retire(self.models.pop(name))
                report.removed.append(name)
            for entry in registry.models:
                old = self.models.get(entry.name)
                if old is None:
                    model = self._add(entry)
                    if entry.load == "eager":
                        self._reload_loads[entry.name] = self._load(model)
                    report.added.append(entry.name)
                elif _worker_view(old.entry) == _worker_view(entry) and not old.client.failed:
                    old.entry = entry
                    old.client.models_path = self.registry_path  # the same entry for its worker, in the new file
                    if entry.load == "eager" and old.unloaded:
                        self._reload_loads[entry.name] = self._load(old)
                    report.unchanged.append(entry.name)
                else:
                    self._reload_loads[entry.name] = self._replace(old, self._add(entry))
                    report.replaced.append(entry.name)
            self._index_aliases()
            self._prune_files()
            log.info(
                "registry reloaded: added %s, removed %s, replaced %s, unchanged %s",
                report.added or "-",
                report.removed or "-",
                report.replaced or "-",
                report.unchanged or "-",
            )
            return report

    def _replace(self, old: ServedModel, new: ServedModel) -> asyncio.Task[None]:
        """Swap `new` in for `old`: requests wait while `old` drains and stops, then `new` starts (if `old` was
        loaded or is eager; an unloaded lazy model stays unloaded)."""
        load = new.entry.load == "eager" or not old.unloaded
        retired = self._retire(old)

        async def swap() -> None:
            await asyncio.shield(retired)
            if load:
                await self._start(new, self.start_timeout)

        new.replacing = True
        new.loading = asyncio.create_task(swap())
        return new.loading

    def _retire(self, model: ServedModel) -> asyncio.Task[None]:
        """Stop `model` once its in-flight requests finish (or the drain timeout passes)."""

        async def drain() -> None:
            if model.loading is not None:  # a load in progress finishes first: cancelling it could orphan a worker
                await asyncio.wait({model.loading}, timeout=self.start_timeout)
            deadline = time.monotonic() + self.drain_timeout
            while model.client.num_in_flight() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await self._unload(model)
            log.info("model '%s' (%s) stopped", model.name, "replaced" if model.name in self.models else "removed")

        task = asyncio.create_task(drain())
        self._retiring[task] = model
        task.add_done_callback(self._retired)
        return task

    def _retired(self, task: asyncio.Task[None]) -> None:
        self._retiring.pop(task, None)
        self._prune_files()

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for model in self.models.values():
            if model.loading is not None:
                model.loading.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
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
        """Like `get`, but a lazy model that is not loaded starts loading, and the request waits for it (bounded);
        so does a request for a model that a reload is replacing."""
        model = self.models.get(self.aliases.get(name, name))
        if model is not None and not model.ready and not model.client.failed and not self.draining:
            loading = self._load(model) if model.entry.load == "lazy" else model.loading if model.replacing else None
            if loading is not None:
                await asyncio.wait({loading}, timeout=self.lazy_wait)
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
