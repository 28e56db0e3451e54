"""Turns a models.yaml entry into a ready model and tokenizer, from a HF directory, a hub id, a GGUF or zip file, or
a file inside an installed package.

GGUF files are dequantized once into a safetensors cache, because converting them costs tens of seconds every start;
a zip (a model directory packed into a package) is unpacked once into the cache too.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GgufConfig,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from worker import gguf_weights, lora, native, quantization
from worker.registry import ModelEntry
from worker.safetensors_only import check_safetensors

logger = logging.getLogger("tokenmill.loader")

PACKAGE_PREFIX = "package:"
# Bump when the cached layout changes, so old caches are rebuilt rather than misread.
_CACHE_FORMAT = 1
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Tokenizers without a known limit report a huge sentinel (about 1e30) as model_max_length.
_SANE_MAX_LEN = 10_000_000
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    config: PreTrainedConfig
    device: torch.device
    dtype: torch.dtype
    max_model_len: int
    eos_token_ids: list[int]
    weights_path: Path
    converted: bool
    gguf_blocks: dict[str, gguf_weights.QuantizedRows] = field(default_factory=dict)  # quantization: gguf


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "tokenmill"


def resolve_source(source: str) -> str:
    """`package:DIST/PATH` -> the absolute path of PATH inside the installed distribution DIST; others unchanged."""
    if not source.startswith(PACKAGE_PREFIX):
        return source
    dist_name, _, inner = source.removeprefix(PACKAGE_PREFIX).partition("/")
    if not dist_name or not inner:
        raise ValueError(f"'{source}' is not a package source; write package:DISTRIBUTION/PATH/INSIDE/IT")
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(f"'{source}': package '{dist_name}' is not installed; pip install it") from exc
    return str(Path(str(dist.locate_file(inner))).resolve())


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{device}' was asked for, but torch sees no CUDA device; use cpu or auto")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Auto picks bfloat16 where the hardware computes it natively, else float32 (float16 on pre-Ampere GPUs)."""
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"'{dtype}' is not a dtype; use one of {', '.join(_DTYPES)} or auto")
        return _DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32


def _cpu_flags() -> set[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    return set()


def _cpu_has_fast_bf16() -> bool:
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def load_model(entry: ModelEntry, cache_dir: Path | None = None) -> LoadedModel:
    start = time.perf_counter()
    native.use_cache_dir(cache_dir or default_cache_dir())  # before anything builds the kernels
    device = resolve_device(entry.device)
    dtype = torch.float32 if entry.quantization == "gguf" else resolve_dtype(entry.dtype, device)
    source, local = _locate(entry)
    gguf_file = local if local is not None and local.suffix == ".gguf" else None
    converted, how = False, "hub" if local is None else "local directory"
    if local is not None and local.suffix == ".zip":
        local, converted = _unpacked(local, cache_dir or default_cache_dir())
        how = "unpacked zip" if converted else "cached zip unpacking"
    if gguf_file is not None:
        # Stored in the dtype served when nothing else is applied on top: loading float32 weights to cast them held
        # both copies at once, the worker's peak RSS (1290 MiB against 1194 MiB serving 64 streams).
        plain = entry.quantization == "none" and entry.lora is None
        local, converted = _gguf_cache(gguf_file, cache_dir or default_cache_dir(), dtype if plain else torch.float32)
        how = "converted GGUF" if converted else "cached GGUF conversion"
    where = str(local) if local is not None else source
    revision = entry.revision or "main"  # ignored for local directories
    if entry.lora is not None and entry.load_format != "dummy":
        local, merged_now = lora.merged_dir(entry, where, cache_dir or default_cache_dir())
        where, converted = str(local), converted or merged_now
        how = f"LoRA merged into {how}" if merged_now else f"cached LoRA merge of {how}"

    remote = entry.trust_remote_code
    auto_model = AutoModel if entry.task == "embed" else AutoModelForCausalLM  # embed: the hidden states, no head
    tokenizer = AutoTokenizer.from_pretrained(where, revision=revision, trust_remote_code=remote)
    if entry.load_format == "dummy":
        config = AutoConfig.from_pretrained(where, revision=revision, trust_remote_code=remote)
        model = auto_model.from_config(config, dtype=dtype, trust_remote_code=remote)  # type: ignore[no-untyped-call]
        with contextlib.suppress(OSError):  # without generation_config.json, keep the one derived from the config
            model.generation_config = GenerationConfig.from_pretrained(where, revision=revision)
        how = f"dummy weights, config of {how}"
    else:
        if local is not None and not entry.trust_pickle:
            check_safetensors(entry, local, "add them, or set load_format: dummy")
        model = auto_model.from_pretrained(
            where,
            revision=revision,
            dtype=dtype,
            use_safetensors=None if entry.trust_pickle else True,  # None: safetensors where there are any
            trust_remote_code=remote,
            **quantization.from_pretrained_kwargs(entry, dtype, device),
        )
        if entry.quantization not in ("none", "gguf"):
            how = f"{how}, {entry.quantization} (bitsandbytes)"
    if entry.quantization in ("none", "gguf"):
        model.to(device)
    blocks: dict[str, gguf_weights.QuantizedRows] = {}
    if entry.quantization == "gguf" and gguf_file is not None:
        blocks = _gguf_blocks(gguf_file, model, device)
        how = f"{how}, {len(blocks)} weights as the file's blocks"
    model.eval()
    model.requires_grad_(False)

    if len(tokenizer) > model.config.get_text_config().vocab_size:
        logger.warning("model '%s': the tokenizer has more tokens than the model's vocabulary", entry.name)
    weights_path = local if local is not None else _hub_snapshot(source, entry.revision)
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        config=model.config,
        device=device,
        dtype=dtype,
        max_model_len=_max_model_len(entry, model.config, tokenizer),
        eos_token_ids=_eos_token_ids(model, tokenizer),
        weights_path=weights_path,
        converted=converted,
        gguf_blocks=blocks,
    )
    elapsed = time.perf_counter() - start
    logger.info("model '%s': %s from %s on %s as %s in %.2fs", entry.name, how, weights_path, device, dtype, elapsed)
    return loaded


def _gguf_blocks(path: Path, model: PreTrainedModel, device: torch.device) -> dict[str, gguf_weights.QuantizedRows]:
    if device.type != "cpu" or native.library() is None:
        logger.warning("quantization: gguf runs on a CPU with the native kernels; serving float32 weights instead")
        return {}
    return gguf_weights.read(path, model)


def _locate(entry: ModelEntry) -> tuple[str, Path | None]:
    """The resolved source, and its local path (None for a hub id); a missing local path fails here, clearly."""
    try:
        source = resolve_source(entry.source)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"model '{entry.name}': {exc}") from exc
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model '{entry.name}': {path} has no config.json, so it is no model directory")
        return source, path.resolve()
    if path.is_file():
        if path.suffix not in (".gguf", ".zip"):
            raise ValueError(
                f"model '{entry.name}': {path} is a file but not a .gguf or .zip; give a directory or such a file"
            )
        return source, path.resolve()
    looks_local = source.startswith((".", "~")) or path.suffix == ".gguf" or not _HUB_ID.match(source)
    if entry.source.startswith(PACKAGE_PREFIX) or looks_local:
        raise FileNotFoundError(f"model '{entry.name}': {path} does not exist (source: {entry.source})")
    return source, None


def _gguf_cache(gguf: Path, cache_root: Path, dtype: torch.dtype = torch.float32) -> tuple[Path, bool]:
    """The safetensors directory converted from `gguf` in `dtype`, and whether this call wrote it (False: reused)."""
    stat = gguf.stat()
    identity = f"{_CACHE_FORMAT}\0{gguf}\0{stat.st_size}\0{stat.st_mtime_ns}"
    if dtype != torch.float32:
        identity += f"\0{dtype}"

    def convert(tmp: Path) -> None:
        # Dequantized to float32, then rounded once to `dtype`: the same values a cast at load time gives.
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
        _drop_quantization(model)
        model.to(dtype=dtype)  # type: ignore[call-arg]
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        origin = {"gguf": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        (tmp / "tokenmill_source.json").write_text(json.dumps(origin, indent=2) + "\n")

    return _built_once(cache_root / "gguf", identity, gguf, ("converting", "converted"), convert)


def _unpacked(archive: Path, cache_root: Path) -> tuple[Path, bool]:
    """The model directory a zip holds (at its top, or in its one top-level folder), unpacked once into the cache,
    and whether this call unpacked it. zipfile drops absolute paths and '..' from member names."""
    stat = archive.stat()
    identity = f"{_CACHE_FORMAT}\0{archive}\0{stat.st_size}\0{stat.st_mtime_ns}"

    def unpack(tmp: Path) -> None:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        if not (tmp / "config.json").is_file():
            inner = [d for d in tmp.iterdir() if d.is_dir() and (d / "config.json").is_file()]
            if len(inner) != 1:
                raise FileNotFoundError(f"{archive} holds no model directory (no config.json at its top)")
            for item in list(inner[0].iterdir()):
                item.rename(tmp / item.name)

    return _built_once(cache_root / "unpacked", identity, archive, ("unpacking", "unpacked"), unpack)


def _built_once(
    root: Path, identity: str, source: Path, verbs: tuple[str, str], build: Callable[[Path], None]
) -> tuple[Path, bool]:
    """The cache directory under `root` named by `identity`, made by `build` into a temporary directory renamed into
    place (so it is complete or absent) if it is not there; and whether this call made it. `verbs`: what the log
    says is happening, and has happened."""
    target = root / hashlib.sha256(identity.encode()).hexdigest()[:16]
    if (target / "config.json").is_file():
        return target, False
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    logger.info("%s %s into %s (once; later starts reuse it)", verbs[0], source, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)  # atomic: the cache directory is complete or absent
        except OSError as exc:
            if not (target / "config.json").is_file():
                raise OSError(f"{target} exists but is not complete; remove it and retry") from exc
            logger.info("another process made %s first; using it", target)
            return target, False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("%s %s in %.1fs", verbs[1], source, time.perf_counter() - start)
    return target, True


def _drop_quantization(model: PreTrainedModel) -> None:
    """save_pretrained refuses a model that still carries its GGUF quantizer, though its weights are plain now."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _hub_snapshot(source: str, revision: str | None) -> Path:
    cached = try_to_load_from_cache(source, "config.json", revision=revision)
    return Path(cached).parent if isinstance(cached, str) else Path(source)


def _max_model_len(entry: ModelEntry, config: PreTrainedConfig, tokenizer: PreTrainedTokenizerBase) -> int:
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if not isinstance(limit, int):
        from_tokenizer = getattr(tokenizer, "model_max_length", None)
        sane = isinstance(from_tokenizer, int) and 0 < from_tokenizer < _SANE_MAX_LEN
        limit = from_tokenizer if sane else None
    if entry.max_model_len is None:
        if limit is None:
            raise ValueError(f"model '{entry.name}': no context length in config or tokenizer; set max_model_len")
        return limit
    if limit is not None and entry.max_model_len > limit:
        logger.warning(
            "model '%s': max_model_len %d exceeds the model's limit; using %d", entry.name, entry.max_model_len, limit
        )
        return limit
    return entry.max_model_len


def _eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    candidates = [*configured] if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(c for c in [*candidates, tokenizer.eos_token_id] if isinstance(c, int)))
