"""LoRA adapters merged into the base weights once, in full precision, and cached as safetensors.

Merging into already quantized weights loses precision, so the base loads in float32, peft merges the adapter
(`merge_and_unload`), and the result is saved under the cache directory keyed by (base, revision, adapter, scale).
The next start loads the merged directory directly, and quantizes it then if the entry asks. Adapters load from
adapter_model.safetensors only, unless the entry sets trust_pickle: peft would unpickle an adapter_model.bin.
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
from worker.safetensors_only import check_safetensors

logger = logging.getLogger("tokenmill.loader")
CACHE_FORMAT = 1
SAFE_WEIGHTS = "adapter_model.safetensors"  # what peft reads first; else it unpickles adapter_model.bin
MISSING = f"save the adapter with peft's save_pretrained (it writes {SAFE_WEIGHTS}), or give its hub id"


def _fingerprint(path: str) -> list[tuple[str, int, int]] | str:
    """What identifies an adapter's contents without reading them: each file's name, size and mtime."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        return path  # a hub id: its revision is the adapter's own business
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir() if p.is_file())


def merged_dir(entry: ModelEntry, base: str, cache_dir: Path) -> tuple[Path, bool]:
    """The directory of `base` with the entry's adapter merged in, and whether this call wrote it."""
    assert entry.lora is not None
    local = Path(entry.lora.adapter).expanduser()
    if local.is_dir() and not entry.trust_pickle:
        check_safetensors(entry, local, MISSING, SAFE_WEIGHTS)
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
    model = AutoModelForCausalLM.from_pretrained(
        base, revision=revision, dtype=torch.float32, use_safetensors=None if entry.trust_pickle else True
    )
    peft_model = PeftModel.from_pretrained(model, str(local if local.is_dir() else _download(entry)))
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


def _download(entry: ModelEntry) -> Path:
    """A hub adapter's files: its config and safetensors weights, and its pickle weights only with trust_pickle."""
    from huggingface_hub import snapshot_download

    assert entry.lora is not None
    wanted = ["adapter_config.json", SAFE_WEIGHTS, *(["adapter_model.bin"] if entry.trust_pickle else [])]
    local = Path(snapshot_download(entry.lora.adapter, allow_patterns=wanted))
    if not entry.trust_pickle:
        hint = "set trust_pickle: true on the entry to load its adapter_model.bin, if you trust its origin"
        check_safetensors(entry, local, hint, SAFE_WEIGHTS)
    return local
