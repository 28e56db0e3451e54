"""A lean forward pass for Llama-shaped models (Llama, Qwen2, Mistral) over the paged cache.

transformers' modules cost tens of microseconds of Python per op, and a 30-layer model runs about 1,200 of them per
step: at batch 1 on a CPU that overhead was a third of the step. This pass runs the same arithmetic with fewer,
larger ops: q, k and v come from one matmul, gate and up from another, and nothing is built that the step does not
use. The HF model's own weights are reused (its projections become views of the fused tensors), its rotary module
computes the position embeddings, and every op mirrors the HF one (norms in float32, rotary in the model dtype), so
greedy outputs stay equal to transformers' `generate`.

In bfloat16 on a CPU every projection, and the output head, is packed once at load for a native kernel of
AVX-512 BF16 dot products (`BF16Projection`, csrc/bf16_linear.c), whose layout also gives back the embedding's rows
where the head is tied (one copy of the vocabulary's rows). `F.linear` reordered each weight for oneDNN on every
call, which at decode batch sizes cost as much as the product itself. Its sums round in another order than oneDNN's
(about one output in 5,000 differs by a bfloat16 unit), as the bfloat16 prefill attention kernel's do; bfloat16
outputs equal transformers' up to a near-tie. On a CPU with AMX (`native_projections`), the layers are reordered
for oneDNN instead, whose tiles prefill faster, and those products are `F.linear`'s bit for bit (each weight is
checked when packed, and kept plain where it differs). Packing takes the weights over: the HF projections are
released (the process holds one copy), so the model's own forward no longer runs.

Models of other shapes, quantized weights and anything else unusual keep the HF forward (`supports` says which).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from worker import native
from worker.attention import AttentionMetadata, attend
from worker.gguf_weights import QuantizedRows

SUPPORTED_TYPES = frozenset({"llama", "qwen2", "mistral"})


@dataclass
class Projection:
    """x @ W.T + b, where W is plain or packed for oneDNN."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    packed: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
            return out
        return F.linear(x, self.weight, self.bias)


@dataclass
class BlockProjection:
    """x @ W.T + b in float32, W a GGUF file's Q4_1 or Q8_0 blocks packed for `native.gguf_linear`."""

    code: int
    packed: torch.Tensor
    rows: int
    cols: int
    bias: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = native.gguf_linear(self.code, self.packed, self.rows, self.cols, x)
        return out if self.bias is None else out.add_(self.bias)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of W: an embedding lookup."""
        return native.gguf_rows(self.code, self.packed, self.rows, self.cols, ids)

    @classmethod
    def exact(
        cls, parts: list[QuantizedRows], weight: torch.Tensor, bias: torch.Tensor | None
    ) -> BlockProjection | None:
        """The parts' blocks stacked and packed, if they decode to `weight` (the parts' weights stacked) bit for bit."""
        codes = {part.code for part in parts}
        rows, cols = weight.shape
        if len(codes) != 1 or not native.gguf_takes(rows, cols) or any(part.cols != cols for part in parts):
            return None
        code = codes.pop()
        blocks = torch.cat([part.blocks for part in parts]) if len(parts) > 1 else parts[0].blocks
        found = cls(code, native.gguf_pack(code, blocks, cols), rows, cols, bias)
        return found if torch.equal(found.lookup(torch.arange(rows)), weight) else None


@dataclass
class BF16Projection:
    """x @ W.T + b in bfloat16 over W packed by `native.bf16_pack`; a tied head's packed rows also serve the
    embedding lookup: one copy of the vocabulary's rows for both."""

    packed: torch.Tensor
    rows: int
    cols: int
    bias: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return native.bf16_linear(self.packed, self.rows, self.cols, x, self.bias)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of W: an embedding lookup."""
        return native.bf16_rows(self.packed, self.rows, self.cols, ids)

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> BF16Projection:
        """`weight` packed, its rows checked to read back bit for bit (a stretch at a time, to bound the copy)."""
        rows, cols = weight.shape
        head = cls(native.bf16_pack(weight), rows, cols, None if bias is None else bias.contiguous())
        for start in range(0, rows, 8192):
            ids = torch.arange(start, min(rows, start + 8192))
            if not torch.equal(head.lookup(ids), weight[start : start + len(ids)]):
                raise RuntimeError("bf16_pack: the packed weight does not read back as the weight")
        return head


Project = Projection | BlockProjection | BF16Projection


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv: Project  # [(H + 2 Hkv) * D, hidden]
    o: Project
    post_norm: torch.Tensor
    gate_up: Project  # [2 * intermediate, hidden]
    down: Project


def supports(model: PreTrainedModel) -> bool:
    """Whether `LlamaForward` computes exactly what this model's own forward does."""
    config = model.config
    if config.model_type not in SUPPORTED_TYPES or getattr(config, "hidden_act", "silu") != "silu":
        return False
    if getattr(config, "mlp_bias", False) or getattr(config, "use_sliding_window", False):
        return False
    if getattr(config, "sliding_window", None) and config.model_type == "mistral":
        return False
    body = getattr(model, "model", None)
    lm_head = model.get_output_embeddings()  # type: ignore[no-untyped-call]
    if body is None or not hasattr(body, "rotary_emb") or not isinstance(lm_head, nn.Linear):
        return False
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return all(type(m) is nn.Linear and type(m.weight) is nn.Parameter for m in linears)  # no quantized layers


def native_projections() -> bool:
    """Whether bfloat16 projections run `native.bf16_linear` rather than oneDNN: where the kernel is built (AVX-512
    BF16) and the CPU has no AMX. With AMX, oneDNN's tiles multiply prompts several times faster than AVX-512 dot
    products can; without, oneDNN's reordered product was 1.0-1.45x slower (decode reads the weights at 21-26
    against 31-33 GB/s; prompts run at the same 350-440 GFLOP/s; AMD EPYC Zen 4). `native.gguf_amx` says whether
    the OS lets this process use AMX tiles, which oneDNN needs as much as the GGUF kernels."""
    return native.bf16_linear_ready() and not native.gguf_amx()


def packs(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether weights of this dtype on this device are worth packing for oneDNN (bfloat16 on a CPU with oneDNN)."""
    return dtype == torch.bfloat16 and device.type == "cpu" and torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]


class LlamaForward:
    def __init__(self, model: PreTrainedModel, blocks: dict[str, QuantizedRows] | None = None) -> None:
        """`blocks`: the model's weights as GGUF blocks (gguf_weights.read), for the projections, the embedding and
        the head to compute from instead of the float32 copies, which are released. The dict is emptied."""
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = float(config.rms_norm_eps)
        body = model.model
        self.rotary: nn.Module = body.rotary_emb
        self.final_norm = body.norm.weight
        lm_head = model.get_output_embeddings()  # type: ignore[no-untyped-call]
        assert isinstance(lm_head, nn.Linear)
        weight = self.final_norm
        self.pack = packs(weight.dtype, weight.device)
        self.native_bf16 = self.pack and native_projections()
        self.blocks = blocks if blocks and weight.dtype == torch.float32 and weight.device.type == "cpu" else {}
        self.names = {id(module): name for name, module in model.named_modules()}
        sizes = (config.hidden_size, config.intermediate_size, self.head_dim)
        self.fused = native.layer_ops_take(weight.dtype, weight.device, *sizes)
        if self.pack or self.blocks:
            _copy_out_of_file(model, body.layers, set(self.blocks))
        self.layers = [self._fuse(layer) for layer in body.layers[: config.num_hidden_layers]]
        self.scaling = float(body.layers[0].self_attn.scaling)
        head_weight = lm_head.weight.detach()
        self.lm_head: Callable[[torch.Tensor], torch.Tensor] = (
            self._from_blocks([lm_head], lm_head.bias) or self._packed_head(lm_head) or lm_head
        )
        self.embed = self._embedding(body.embed_tokens, head_weight)
        self.blocks.clear()  # the caller's too: every block is packed into new memory by now

    def _packed_head(self, lm_head: nn.Linear) -> BF16Projection | None:
        """The head packed for `native.bf16_linear` (and its HF weight released), in bfloat16 on a CPU that has the
        kernel. It is not oneDNN's product bit for bit (bf16_linear.c says how it rounds), but as fast as a oneDNN
        copy reordered once from one row to hundreds, and where the head is tied its rows are the embedding's."""
        weight = lm_head.weight.detach()
        if not (self.pack and lm_head.bias is None and weight.shape[1] % 2 == 0 and native.bf16_linear_ready()):
            return None
        head = BF16Projection.of(weight)
        _release([lm_head])
        return head

    def _embedding(self, embed: nn.Embedding, head_weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """Token ids -> hidden rows (a new tensor), from the GGUF blocks where there are some, or from the packed
        head's rows where the head is tied to the embedding."""
        weight = embed.weight.detach()
        if isinstance(self.lm_head, BlockProjection) and weight.device.type == "meta":  # tied: released with the head
            return self.lm_head.lookup
        tied = weight.data_ptr() == head_weight.data_ptr() and weight.shape == head_weight.shape
        if isinstance(self.lm_head, BF16Projection) and tied:
            embed.weight = nn.Parameter(torch.empty(weight.shape, device="meta"), requires_grad=False)
            return self.lm_head.lookup
        part = self.blocks.get(f"{self.names[id(embed)]}.weight")
        found = BlockProjection.exact([part], weight, None) if part is not None else None
        if found is None:
            return embed
        embed.weight = nn.Parameter(torch.empty(weight.shape, device="meta"), requires_grad=False)
        return found.lookup

    def _fuse(self, layer: Any) -> _Layer:  # an HF decoder layer: attribute access is all it offers to types
        attn, mlp = layer.self_attn, layer.mlp
        biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
        qkv_bias = torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases) else None
        return _Layer(
            input_norm=layer.input_layernorm.weight.detach(),
            qkv=self._project([attn.q_proj, attn.k_proj, attn.v_proj], qkv_bias),
            o=self._project([attn.o_proj]),
            post_norm=layer.post_attention_layernorm.weight.detach(),
            gate_up=self._project([mlp.gate_proj, mlp.up_proj]),
            down=self._project([mlp.down_proj]),
        )

    def _project(self, linears: list[nn.Linear], bias: torch.Tensor | None = None) -> Project:
        """One projection for several of the same input: from GGUF blocks or packed (and the HF weights released)
        where exact, else plain, with the HF weights made views of it."""
        found = self._from_blocks(linears, bias)
        if found is not None:
            return found
        plain = Projection(_concat_into_views(linears) if len(linears) > 1 else linears[0].weight.detach(), bias)
        if not self.pack:
            return plain
        if self.native_bf16 and plain.weight.shape[1] % 2 == 0:
            _release(linears)
            return BF16Projection.of(plain.weight, bias)
        packed = _packed_if_exact(plain.weight, bias)
        if packed is None:
            return plain
        _release(linears)
        return Projection(packed, bias, packed=True)

    def _from_blocks(self, linears: list[nn.Linear], bias: torch.Tensor | None) -> BlockProjection | None:
        """The linears stacked, computed from their GGUF blocks (and the HF weights released), where they have
        blocks that decode to their weights exactly."""
        parts = [self.blocks.get(f"{self.names[id(linear)]}.weight") for linear in linears]
        if not self.blocks or any(part is None for part in parts):
            return None
        weight = torch.cat([linear.weight.detach() for linear in linears])
        found = BlockProjection.exact([part for part in parts if part is not None], weight, bias)
        if found is not None:
            _release(linears)
        return found

    def projections(self) -> str:
        """What the projections compute with, for the start-up log."""

        def label(projection: Project) -> str:
            if isinstance(projection, BF16Projection):
                return "native bf16 (AVX-512 BF16), packed once"
            if isinstance(projection, BlockProjection):
                return "GGUF blocks" + (" (AMX from 32 rows)" if native.gguf_amx() else "")
            return "oneDNN, reordered once" if projection.packed else "torch F.linear"

        kinds = {label(p) for layer in self.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)}
        if isinstance(self.lm_head, BF16Projection):
            head = "bf16 packed" + (", its rows the embedding's" if self.embed == self.lm_head.lookup else "")
        else:
            head = label(self.lm_head) if isinstance(self.lm_head, BlockProjection) else "torch F.linear"
        return f"{', '.join(sorted(kinds))}; head: {head}"

    @torch.inference_mode()
    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """input_ids and positions [T]; the logits [len(keep), vocab] of the rows in `keep`."""
        if self.fused:
            return self._fused(input_ids, positions, keep, meta)
        hidden = self.embed(input_ids)  # [T, hidden]
        cos, sin = self.rotary(hidden, positions[None])
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [T, 1, D]
        tokens = hidden.shape[0]
        q_end = self.heads
        k_end = q_end + self.kv_heads
        for index, layer in enumerate(self.layers):
            normed = self._rms_norm(hidden, layer.input_norm)
            qkv = layer.qkv(normed).view(tokens, -1, self.head_dim)
            qk = _rotate(qkv[:, :k_end], cos, sin)  # q and k heads in one go
            q, k, v = qk[:, :q_end], qk[:, q_end:], qkv[:, k_end:]
            attn = attend(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), index, meta, self.scaling)
            hidden = hidden + layer.o(attn.reshape(tokens, -1))
            normed = self._rms_norm(hidden, layer.post_norm)
            gate, up = layer.gate_up(normed).chunk(2, dim=-1)
            hidden = hidden + layer.down(F.silu(gate) * up)
        last = self._rms_norm(hidden.index_select(0, keep), self.final_norm)
        logits: torch.Tensor = self.lm_head(last)
        return logits

    def _fused(
        self, input_ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """The same layers with the elementwise steps in `native` kernels: the residual add goes into the next norm,
        rotary into the cache write, silu into the product with up."""
        hidden = self.embed(input_ids)  # [T, hidden], a new tensor: the residual stream, updated in place
        cos, sin = self.rotary(hidden, positions[None])
        cos, sin = cos[0].contiguous(), sin[0].contiguous()  # [T, D]
        tokens = hidden.shape[0]
        q_end = self.heads
        k_end = q_end + self.kv_heads
        delta: torch.Tensor | None = None
        for index, layer in enumerate(self.layers):
            normed = native.add_rms_norm(hidden, delta, layer.input_norm, self.eps)
            qkv = layer.qkv(normed).view(tokens, -1, self.head_dim)
            k_cache, v_cache = meta.kv_caches[index]
            native.rope_store(qkv, cos, sin, self.heads, self.kv_heads, k_cache, v_cache, meta.slot_mapping)
            q, k, v = qkv[:, :q_end], qkv[:, q_end:k_end], qkv[:, k_end:]
            attn = attend(
                q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), index, meta, self.scaling, stored=True
            )
            normed = native.add_rms_norm(hidden, layer.o(attn.reshape(tokens, -1)), layer.post_norm, self.eps)
            delta = layer.down(native.silu_mul(layer.gate_up(normed)))
        if delta is not None:
            hidden = hidden + delta
        last = native.add_rms_norm(hidden.index_select(0, keep), None, self.final_norm, self.eps)
        logits: torch.Tensor = self.lm_head(last)
        return logits

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        wide = x.float()
        wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * wide.to(x.dtype)


def _release(linears: list[nn.Linear]) -> None:
    """The HF copies of weights the forward now holds in another form: the process keeps one."""
    for linear in linears:
        linear.weight = nn.Parameter(torch.empty(linear.weight.shape, device="meta"), requires_grad=False)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


def _copy_out_of_file(model: PreTrainedModel, layers: nn.ModuleList, replaced: set[str]) -> None:
    """Weights loaded from safetensors in their stored dtype are views of the file's mapping, and every page read
    stays in the process's RSS while any view holds the mapping. The projections (and the parameters named in
    `replaced`) are about to be rebuilt in new memory and released; this copies out the rest (embeddings, norms,
    biases), so that nothing holds the mapping and it goes: 270 MiB less RSS for SmolLM2 in bfloat16."""
    projections = {id(m.weight) for m in layers.modules() if isinstance(m, nn.Linear)}
    for name, param in model.named_parameters():
        if id(param) not in projections and name not in replaced:
            param.data = param.data.clone()


def _packed_if_exact(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """`weight` reordered for oneDNN, if its products equal `F.linear`'s bit for bit at a few batch sizes."""
    packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(weight, 32)  # 32 rows: the layout's size hint
    gen = torch.Generator().manual_seed(0)
    for rows in (1, 7, 64):
        x = torch.randn(rows, weight.shape[1], generator=gen).to(weight.dtype)
        got = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        if not torch.equal(got, F.linear(x, weight, bias)):
            return None
    return packed


def _concat_into_views(linears: list[nn.Linear]) -> torch.Tensor:
    """One weight for several projections of the same input; the projections' weights become views of it."""
    fused = torch.cat([linear.weight.detach() for linear in linears])
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = nn.Parameter(fused[start : start + rows], requires_grad=False)
        start += rows
    return fused
