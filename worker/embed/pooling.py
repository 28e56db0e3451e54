"""How an embedding model turns its tokens' vectors into one: read from the sentence-transformers configuration that
ships with the model (modules.json, the Pooling module's config, a Normalize module, sentence_bert_config.json), or
set in the registry. A causal LM without such a configuration pools its last token and normalizes, as vLLM does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

# sentence-transformers' Pooling config keys for the modes served here
_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_lasttoken": "last"}
_POOLING_MODULE = "sentence_transformers.models.Pooling"
_NORMALIZE_MODULE = "sentence_transformers.models.Normalize"


@dataclass(frozen=True)
class Pooling:
    mode: str  # mean | cls | last
    normalize: bool
    max_seq_length: int | None = None  # sentence-transformers truncates inputs here; None: the model's own limit

    def __call__(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """One vector per row of `hidden` [B, L, H] (right-padded; `lengths` [B] real tokens), in float32."""
        hidden = hidden.float()
        if self.mode == "cls":
            pooled = hidden[:, 0]
        elif self.mode == "last":
            pooled = hidden[torch.arange(hidden.shape[0]), lengths - 1]
        else:
            mask = (torch.arange(hidden.shape[1])[None, :] < lengths[:, None]).to(hidden.dtype)
            total = (hidden * mask[:, :, None]).sum(dim=1)
            pooled = total / mask.sum(dim=1, keepdim=True).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1) if self.normalize else pooled


class PoolingError(ValueError):
    """The model's sentence-transformers configuration asks for a pooling this server does not compute."""


def read_pooling(model_dir: Path, mode: str = "auto", normalize: bool | None = None) -> Pooling:
    """The pooling of the model in `model_dir`: `mode` and `normalize` as the registry sets them, the rest from the
    sentence-transformers files there; with neither, the last token, normalized."""
    modules = _json(model_dir / "modules.json")
    modules = modules if isinstance(modules, list) else []
    if mode == "auto":
        pooling = next((m for m in modules if m.get("type") == _POOLING_MODULE), None)
        mode = _st_mode(_json(model_dir / pooling.get("path", "") / "config.json") or {}) if pooling else "last"
    if normalize is None:
        normalize = any(m.get("type") == _NORMALIZE_MODULE for m in modules) if modules else True
    settings = _json(model_dir / "sentence_bert_config.json")
    limit = settings.get("max_seq_length") if isinstance(settings, dict) else None
    return Pooling(mode, normalize, limit if isinstance(limit, int) and limit > 0 else None)


def _st_mode(config: dict[str, Any]) -> str:
    on = [key for key, value in config.items() if key.startswith("pooling_mode_") and value is True]
    if len(on) != 1 or on[0] not in _MODES:
        raise PoolingError(
            f"the model's sentence-transformers pooling is {', '.join(on) or 'none'}; this server pools by mean, cls "
            "or last token alone: set pooling in models.yaml to override it"
        )
    return _MODES[on[0]]


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
