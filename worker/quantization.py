"""bitsandbytes quantization through transformers' integration: int8 (LLM.int8()), nf4 and fp4, on CUDA and CPU.

bitsandbytes is an optional extra (`pip install tokenmill[quant]`); the registry refuses an entry that asks for it
where the package is not installed.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

from worker.registry import ModelEntry


def from_pretrained_kwargs(entry: ModelEntry, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """Extra `from_pretrained` arguments that quantize the weights as they load; none for `quantization: none`."""
    if entry.quantization in ("none", "gguf"):  # gguf: loaded as float32, see gguf_weights
        return {}
    from transformers import BitsAndBytesConfig

    _quiet()
    if entry.quantization == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
    else:
        config = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True, bnb_4bit_quant_type=entry.quantization, bnb_4bit_compute_dtype=dtype
        )
    return {"quantization_config": config, "device_map": {"": str(device)}}


def _quiet() -> None:
    """bitsandbytes warns on every call in some paths (casts, CPU fallbacks); say it once, not per step."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("once", module="bitsandbytes")
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
