"""LoRA adapters merged into the base weights once, in full precision, and cached as safetensors.

Merging into already quantized weights loses precision, so the base loads in float32, peft merges the adapter
(`merge_and_unload`), and the result is saved under the cache directory keyed by (base, revision, adapter, scale).
The next start loads the merged directory directly, and quantizes it then if the entry asks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from worker.registry import ModelEntry

logger = logging.getLogger("tokenmill.loader")
CACHE_FORMAT = 1


def _fingerprint(path: str) -> list[tuple[str, int, int]] | str:
    """What identifies an adapter's contents without reading them: each file's name, size and mtime."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        return path  # a hub id: its revision is the adapter's own business
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir() if p.is_file())


def merged_dir(entry: ModelEntry, base: str, cache_dir: Path) -> tuple[Path, bool]:
    """The directory of `base` with the entry's adapter merged in, and whether this call wrote it."""
    assert entry.lora is not None
    key = json.dumps(
        [CACHE_FORMAT, base, entry.revision, entry.lora.adapter, _fingerprint(entry.lora.adapter), entry.lora.scale],
        default=str,
    )
    target = cache_dir / "merged" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (target / "config.json").is_file():
        logger.info("model '%s': using the cached merged LoRA weights in %s", entry.name, target)
        return target, False

    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    start = time.perf_counter()
    revision = entry.revision or "main"
    model = AutoModelForCausalLM.from_pretrained(base, revision=revision, dtype=torch.float32, use_safetensors=True)
    peft_model = PeftModel.from_pretrained(model, entry.lora.adapter)
    if entry.lora.scale != 1.0:
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                module.scale_layer(entry.lora.scale)
    merged = peft_model.merge_and_unload()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".merging-", dir=target.parent))
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        AutoTokenizer.from_pretrained(base, revision=revision).save_pretrained(staging)
        (staging / "tokenmill_source.json").write_text(key)
        try:
            os.rename(staging, target)
        except OSError:  # another process finished the same merge first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        "model '%s': merged LoRA %s (scale %g) into %s in %.1fs; cached in %s",
        entry.name,
        entry.lora.adapter,
        entry.lora.scale,
        base,
        time.perf_counter() - start,
        target,
    )
    return target, True
