"""A GGUF file's own quantized weights, matched to the loaded model's parameters (`quantization: gguf`).

transformers loads a GGUF model by dequantizing every tensor to float32. For Q4_1 and Q8_0 tensors that is exact in
the other direction too: the float32 weights are the blocks, decoded. This module reads the blocks back out of the
file for each projection (and the embedding) of the loaded model, in the row order of its weights (transformers
permutes the rows of q and k), so the forward can read 5 or 8.5 bits a weight instead of 32 and still compute with
the very same float32 weights. A tensor is taken only where every row it decodes to equals the loaded weight's bit
for bit; anything else (other block types, a row that differs) stays as transformers loaded it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel

log = logging.getLogger("tokenmill.gguf")

BLOCK = 32  # weights a block, both types
CODES = {"Q4_1": 2, "Q8_0": 8}  # the kernels' names for the block types (csrc/gguf_linear.c)


@dataclass(frozen=True)
class QuantizedRows:
    """One weight [rows, cols] as GGUF blocks: `blocks` is uint8 [rows, cols / 32 * block bytes], row i the blocks
    of the loaded weight's row i."""

    code: int
    blocks: torch.Tensor
    cols: int

    @property
    def rows(self) -> int:
        return int(self.blocks.shape[0])


def read(path: Path, model: PreTrainedModel) -> dict[str, QuantizedRows]:
    """The weights of `model`'s linear layers and embeddings found in `path` as Q4_1 or Q8_0 blocks that decode to
    exactly those weights, keyed by parameter name ("model.layers.0.self_attn.q_proj.weight")."""
    import gguf

    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors if t.tensor_type.name in CODES}
    names = _name_map(model)
    if names is None:
        return {}
    output = model.get_output_embeddings()  # type: ignore[no-untyped-call]
    embed: torch.nn.Module | None = model.get_input_embeddings()  # type: ignore[no-untyped-call]
    embed_name = _module_name(model, embed) if embed is not None else ""
    embed_ptr = embed.weight.data_ptr() if isinstance(embed, torch.nn.Embedding) else None
    found: dict[str, QuantizedRows] = {}
    by_storage: dict[int, QuantizedRows] = {}  # tied weights: matched once
    for module_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear | torch.nn.Embedding) or module.weight.dim() != 2:
            continue
        weight = module.weight.detach()
        tensor = tensors.get(f"{names.get_name(module_name)}.weight")
        if tensor is None and module is output and weight.data_ptr() == embed_ptr:
            tensor = tensors.get(f"{names.get_name(embed_name)}.weight")  # tied to the embedding
        if tensor is None or weight.dtype != torch.float32 or weight.shape[1] % BLOCK:
            continue
        key = f"{module_name}.weight"
        if weight.data_ptr() not in by_storage:
            rows = _matching_rows(tensor, weight)
            if rows is None:
                log.info("%s: the file's %s blocks decode to other weights; kept as loaded", key, tensor.name)
                continue
            by_storage[weight.data_ptr()] = QuantizedRows(CODES[tensor.tensor_type.name], rows, int(weight.shape[1]))
        found[key] = by_storage[weight.data_ptr()]
    return found


def _module_name(model: PreTrainedModel, wanted: torch.nn.Module) -> str:
    return next(str(name) for name, module in model.named_modules() if module is wanted)


def _name_map(model: PreTrainedModel):  # type: ignore[no-untyped-def]  # gguf's TensorNameMap, untyped
    import gguf

    model_type = {"mistral": "llama"}.get(model.config.model_type, model.config.model_type)
    arch = next((key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == model_type), None)
    if arch is None:
        return None
    return gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)


def _matching_rows(tensor, weight: torch.Tensor) -> torch.Tensor | None:  # type: ignore[no-untyped-def]
    """The tensor's blocks reordered to `weight`'s rows, or None unless every row decodes to `weight`'s exactly."""
    import gguf

    raw = np.asarray(tensor.data).view(np.uint8).reshape(weight.shape[0], -1)
    decoded = torch.from_numpy(gguf.quants.dequantize(raw, tensor.tensor_type).reshape(weight.shape))
    if torch.equal(decoded.view(torch.int32), weight.view(torch.int32)):
        return torch.from_numpy(raw.copy())
    where = {row.numpy().tobytes(): i for i, row in enumerate(decoded.view(torch.int32))}
    order = [where.get(row.numpy().tobytes()) for row in weight.view(torch.int32)]
    if any(i is None for i in order):
        return None
    return torch.from_numpy(raw[np.asarray(order)])
