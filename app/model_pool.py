"""`ModelPool`: the models this server serves, each a worker process behind an `EngineClient` plus its tokenizer.

It starts every worker at once, writes the effective registry (models.yaml with the server's overrides) for them,
and answers which model a request names.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from app.engine_client import EngineClient
from app.errors import APIError
from app.metrics import Metrics
from app.tokenizer import Tokenizer
from worker.messages import ModelInfo, StepOutput
from worker.registry import ModelEntry, Registry

log = logging.getLogger("tokenmill.models")


@dataclass
class ServedModel:
    entry: ModelEntry
    client: EngineClient
    tokenizer: Tokenizer | None = None

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def info(self) -> ModelInfo:
        if self.client.info is None:
            raise APIError.unavailable(f"model '{self.name}' is still loading", retry_after=5)
        return self.client.info


class ModelPool:
    def __init__(self, registry: Registry, metrics: Metrics, cache_dir: Path | None = None) -> None:
        self.registry = registry
        self.metrics = metrics
        self._dir = Path(tempfile.mkdtemp(prefix="tokenmill-registry-"))
        self.registry_path = self._dir / "models.yaml"
        self.registry_path.write_text(yaml.safe_dump(registry.model_dump(mode="json"), sort_keys=False))
        self.models: dict[str, ServedModel] = {}
        for entry in registry.models:
            client = EngineClient(entry.name, self.registry_path, entry.max_waiting_requests, cache_dir)
            client.on_step.append(self._step_listener(entry.name))
            self.models[entry.name] = ServedModel(entry, client)
            metrics.add_model(entry.name)

    def _step_listener(self, name: str) -> Callable[[StepOutput], None]:
        def on_step(out: StepOutput) -> None:
            self.metrics.observe_step(name, out.stats, sum(len(o.new_token_ids) for o in out.outputs))

        return on_step

    async def start(self, timeout: float) -> None:
        await asyncio.gather(*(self._start(model, timeout) for model in self.models.values()))

    async def _start(self, model: ServedModel, timeout: float) -> None:
        await model.client.start(timeout)
        info = model.client.info
        assert info is not None
        model.tokenizer = await asyncio.to_thread(Tokenizer.from_dir, info.tokenizer_dir)
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
        await asyncio.gather(*(model.client.stop() for model in self.models.values()), return_exceptions=True)
        shutil.rmtree(self._dir, ignore_errors=True)

    def get(self, name: str) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            raise APIError.model_not_found(name)
        if not model.client.ready or model.tokenizer is None:
            reason = model.client.error or f"model '{name}' is still loading"
            raise APIError.unavailable(reason, retry_after=5)
        return model

    def not_ready(self) -> dict[str, str]:
        """Models that cannot serve now, with the reason; empty when all are ready."""
        return {
            name: model.client.error or "loading"
            for name, model in self.models.items()
            if not model.client.ready or model.tokenizer is None
        }
