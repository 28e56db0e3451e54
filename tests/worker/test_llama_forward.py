"""The lean Llama-family forward computes what the HF modules compute, and the HF path stays there for the rest."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tests.conftest import save_tiny_model, tiny_config_kwargs
from tests.worker.engine_harness import (
    assert_near_ties_only,
    make_engine,
    random_prompts,
    reference,
    reference_with_logprobs,
    run_all,
)
from worker import llama_forward, native
from worker.llama_forward import BF16Projection, Projection
from worker.messages import SamplingParams
from worker.model_runner import BatchItem, ModelRunner


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request: pytest.FixtureRequest) -> PreTrainedModel:
    path: Path = request.getfixturevalue(f"tiny_{request.param}_dir")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def mixed_batch(runner: ModelRunner, vocab: int) -> list[list[BatchItem]]:
    """Two steps over blocks 0-7: a whole prefill and a chunk, then two decodes beside a prefill continuation."""
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randint(3, vocab, (9,), generator=gen).tolist(), torch.randint(3, vocab, (12,), generator=gen).tolist()
    first = [BatchItem(a, 0, [0, 1, 2], True), BatchItem(b[:6], 0, [4, 5, 6, 7], False)]
    second = [BatchItem([5], 9, [0, 1, 2], True), BatchItem(b[6:], 6, [4, 5, 6, 7], True)]
    return [first, second]


def assert_lean_equals_hf(model: PreTrainedModel) -> ModelRunner:
    """Logits and cache contents of the lean forward against the HF modules over the mixed batches; the lean runner."""
    lean = ModelRunner(copy.deepcopy(model), num_blocks=8, block_size=4, device=torch.device("cpu"))
    hf = ModelRunner(copy.deepcopy(model), num_blocks=8, block_size=4, device=torch.device("cpu"))
    assert lean.lean is not None
    hf.lean = None
    for step in mixed_batch(lean, int(model.config.vocab_size)):
        torch.testing.assert_close(lean.execute(step), hf.execute(step), rtol=1e-5, atol=1e-5)
    for (lean_k, lean_v), (hf_k, hf_v) in zip(lean.kv_caches, hf.kv_caches, strict=True):
        torch.testing.assert_close(lean_k, hf_k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lean_v, hf_v, rtol=1e-5, atol=1e-5)
    return lean


def test_lean_logits_equal_the_hf_modules(model: PreTrainedModel) -> None:
    assert_lean_equals_hf(model)


def test_fused_weights_stay_the_models_own(model: PreTrainedModel) -> None:
    """The projections become views of the fused tensors: no second copy of the weights, the HF path still works."""
    runner = ModelRunner(copy.deepcopy(model), num_blocks=8, block_size=4, device=torch.device("cpu"))
    assert runner.lean is not None
    layer = runner.model.model.layers[0]  # type: ignore[attr-defined]
    fused = runner.lean.layers[0]
    assert isinstance(fused.qkv, Projection) and isinstance(fused.gate_up, Projection)
    assert layer.self_attn.q_proj.weight.untyped_storage().data_ptr() == fused.qkv.weight.untyped_storage().data_ptr()
    assert layer.mlp.up_proj.weight.untyped_storage().data_ptr() == fused.gate_up.weight.untyped_storage().data_ptr()


@pytest.fixture(scope="module")
def bf16_model(tiny_qwen2_dir: Path) -> PreTrainedModel:
    """bfloat16, where projections are packed for oneDNN; Qwen2 has q/k/v biases, which the packed product adds."""
    return AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.bfloat16).eval()


def test_packed_projections_give_the_plain_products_bit_for_bit(
    bf16_model: PreTrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the layers are reordered for oneDNN (CPUs with AMX): the products are F.linear's bit for bit."""
    if not llama_forward.packs(torch.bfloat16, torch.device("cpu")):
        pytest.skip("torch has no oneDNN here")
    monkeypatch.setattr(llama_forward, "native_projections", lambda: False)
    packed = ModelRunner(copy.deepcopy(bf16_model), num_blocks=8, block_size=4, device=torch.device("cpu"))
    assert packed.lean is not None
    assert all(
        isinstance(p, Projection) and p.packed
        for layer in packed.lean.layers
        for p in (layer.qkv, layer.o, layer.gate_up, layer.down)
    )
    assert packed.lean.layers[0].qkv.bias is not None
    hf_layer = packed.model.model.layers[0]  # type: ignore[attr-defined]
    assert hf_layer.self_attn.q_proj.weight.is_meta and hf_layer.mlp.down_proj.weight.is_meta  # one copy held
    monkeypatch.setattr(llama_forward, "packs", lambda dtype, device: False)
    plain = ModelRunner(copy.deepcopy(bf16_model), num_blocks=8, block_size=4, device=torch.device("cpu"))
    assert plain.lean is not None and isinstance(plain.lean.layers[0].qkv, Projection)
    assert not plain.lean.layers[0].qkv.packed
    plain.lean.lm_head = packed.lean.lm_head  # the head is not oneDNN's (see the tied-head test); the rest is
    for step in mixed_batch(packed, int(bf16_model.config.vocab_size)):
        assert torch.equal(packed.execute(step), plain.execute(step))


@pytest.fixture(scope="module")
def tied_bf16_model(
    tiny_tokenizer: PreTrainedTokenizerFast, tmp_path_factory: pytest.TempPathFactory
) -> PreTrainedModel:
    """bfloat16 with the head tied to the embedding, as SmolLM2, Qwen2.5-0.5B and Llama-3.2-1B/3B are."""
    config = Qwen2Config(**{**tiny_config_kwargs(tiny_tokenizer), "tie_word_embeddings": True})
    path = save_tiny_model(Qwen2ForCausalLM, config, tiny_tokenizer, tmp_path_factory.mktemp("tiny-tied"))
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()


def test_a_tied_head_is_packed_once_and_serves_the_embedding(
    tied_bf16_model: PreTrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The head is packed for the bfloat16 kernel and the embedding reads its rows from it: the process holds one copy
    of the vocabulary's rows. Lookups are bit for bit; logits are the HF modules' within a bfloat16 unit."""
    if not (llama_forward.packs(torch.bfloat16, torch.device("cpu")) and native.bf16_linear_ready()):
        pytest.skip("no oneDNN or no AVX-512 BF16 kernels here")
    embedding = tied_bf16_model.get_input_embeddings().weight.detach().clone()  # type: ignore[no-untyped-call,operator]
    lean = ModelRunner(copy.deepcopy(tied_bf16_model), num_blocks=8, block_size=4, device=torch.device("cpu"))
    monkeypatch.setattr(llama_forward, "supports", lambda model: False)  # the HF modules, their weights kept
    hf = ModelRunner(copy.deepcopy(tied_bf16_model), num_blocks=8, block_size=4, device=torch.device("cpu"))
    assert lean.lean is not None and isinstance(lean.lean.lm_head, BF16Projection)
    assert lean.lean.embed == lean.lean.lm_head.lookup
    assert lean.model.get_input_embeddings().weight.is_meta  # type: ignore[no-untyped-call]
    assert lean.model.get_output_embeddings().weight.is_meta  # type: ignore[no-untyped-call]
    assert "head: bf16 packed, its rows the embedding's" in lean.describe()
    ids = torch.tensor([0, 7, int(embedding.shape[0]) - 1, 7])
    assert torch.equal(lean.lean.embed(ids), embedding[ids])
    for step in mixed_batch(lean, int(tied_bf16_model.config.vocab_size)):
        got, want = lean.execute(step), hf.execute(step)
        torch.testing.assert_close(got, want, rtol=2 * torch.finfo(torch.bfloat16).eps, atol=0.02)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def bf16_pair(request: pytest.FixtureRequest) -> PreTrainedModel:
    path: Path = request.getfixturevalue(f"tiny_{request.param}_dir")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()


def test_native_bf16_projections_equal_generate_up_to_near_ties(bf16_pair: PreTrainedModel) -> None:
    """Without AMX every bfloat16 projection runs the native kernel (Qwen2's q/k/v biases added before the one
    rounding); greedy tokens equal transformers' bfloat16 `generate` up to a near-tie."""
    if not (llama_forward.packs(torch.bfloat16, torch.device("cpu")) and llama_forward.native_projections()):
        pytest.skip("oneDNN runs the projections here (AMX), or there is no AVX-512 BF16 kernel")
    engine = make_engine(bf16_pair)
    lean = engine.runner.lean
    assert lean is not None
    projections = [p for layer in lean.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    assert all(isinstance(p, BF16Projection) for p in projections)
    assert "projections: native bf16 (AVX-512 BF16), packed once; head: bf16 packed)" in engine.runner.describe()
    assert (lean.layers[0].qkv.bias is not None) == (bf16_pair.config.model_type == "qwen2")  # type: ignore[union-attr]
    prompts = random_prompts(int(bf16_pair.config.vocab_size), [5, 17, 3, 30, 11, 24], seed=6)
    run = run_all(engine, prompts, SamplingParams(max_tokens=14, temperature=0.0))
    refs = {rid: reference_with_logprobs(bf16_pair, prompt, 14) for rid, prompt in prompts.items()}
    assert_near_ties_only(run.tokens, refs)


def test_torch_decode_attention_equals_generate(model: PreTrainedModel) -> None:
    """The gather-and-matmul decode path, which runs where the native kernel cannot."""
    engine = make_engine(model)
    engine.runner.native_decode = False
    prompts = random_prompts(int(model.config.vocab_size), [5, 17, 3, 30])
    run = run_all(engine, prompts, SamplingParams(max_tokens=10, temperature=0.0))
    assert run.tokens == {rid: reference(model, prompt, 10) for rid, prompt in prompts.items()}


def test_hf_path_still_equals_generate(model: PreTrainedModel) -> None:
    engine = make_engine(model)
    engine.runner.lean = None
    prompts = random_prompts(int(model.config.vocab_size), [5, 17, 3, 30])
    params = SamplingParams(max_tokens=10, temperature=0.0)
    run = run_all(engine, prompts, params)
    assert run.tokens == {rid: reference(model, prompt, 10) for rid, prompt in prompts.items()}


def test_other_shapes_keep_the_hf_forward(model: PreTrainedModel) -> None:
    assert llama_forward.supports(model)
    gelu = LlamaForCausalLM(LlamaConfig(**{**model.config.to_dict(), "hidden_act": "gelu", "model_type": "llama"}))
    assert not llama_forward.supports(gelu)
    with_bias = LlamaForCausalLM(LlamaConfig(**{**model.config.to_dict(), "mlp_bias": True, "model_type": "llama"}))
    assert not llama_forward.supports(with_bias)
    odd = copy.deepcopy(model)
    odd.model.layers[0].mlp.up_proj = torch.nn.utils.parametrizations.weight_norm(  # type: ignore[union-attr]
        odd.model.layers[0].mlp.up_proj  # type: ignore[union-attr]
    )
    assert not llama_forward.supports(odd)  # a layer whose weight is not a plain parameter (as quantized ones)


@pytest.fixture(scope="module")
def wide_heads(model: PreTrainedModel) -> PreTrainedModel:
    """The tiny model's shape with 32-wide heads, which the fused layer kernels take (their rotary needs 32)."""
    torch.manual_seed(2)
    config = type(model.config)(
        **{**model.config.to_dict(), "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32}
    )
    return type(model)(config).eval()


def test_fused_layers_equal_the_hf_modules(wide_heads: PreTrainedModel) -> None:
    if not native.layer_ops_take(torch.float32, torch.device("cpu"), 64, 128, 32):
        pytest.skip("no native kernels here")
    fused = assert_lean_equals_hf(wide_heads)
    assert fused.lean is not None and fused.lean.fused


def test_fused_layers_greedy_equals_generate(wide_heads: PreTrainedModel) -> None:
    engine = make_engine(wide_heads)
    assert engine.runner.lean is not None and engine.runner.lean.fused == native.layer_ops_take(
        torch.float32, torch.device("cpu"), 64, 128, 32
    )
    prompts = random_prompts(int(wide_heads.config.vocab_size), [5, 17, 3, 30], seed=4)
    run = run_all(engine, prompts, SamplingParams(max_tokens=12, temperature=0.0))
    assert run.tokens == {rid: reference(wide_heads, prompt, 12) for rid, prompt in prompts.items()}


def test_packing_lets_go_of_the_weights_file(bf16_model: PreTrainedModel, tmp_path: Path) -> None:
    """Loaded in its stored dtype, a model's weights are views of the file's mapping; once the projections are
    packed, nothing may hold that mapping, or every page read stays in RSS beside the packed copies."""
    if not llama_forward.packs(torch.bfloat16, torch.device("cpu")):
        pytest.skip("torch has no oneDNN here")
    bf16_model.save_pretrained(tmp_path)
    weights = str(tmp_path / "model.safetensors")

    def mapped() -> bool:
        return any(line.rstrip().endswith(weights) for line in Path("/proc/self/maps").read_text().splitlines())

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert mapped()  # zero-copy load: this test would prove nothing otherwise
    runner = ModelRunner(loaded, num_blocks=8, block_size=4, device=torch.device("cpu"))
    assert runner.lean is not None and not mapped()
    for step in mixed_batch(runner, int(bf16_model.config.vocab_size)):
        assert torch.isfinite(runner.execute(step)).all()  # and runs on its own copies


def test_the_runner_says_which_paths_a_step_takes(model: PreTrainedModel, bf16_model: PreTrainedModel) -> None:
    runner = make_engine(model).runner
    assert runner.describe().startswith("lean Llama forward (")
    assert "projections: torch F.linear" in runner.describe() and "torch.float32 on cpu" in runner.describe()
    runner.native_decode = False
    assert "decode attention: torch matmuls over gathered blocks; prefill attention: SDPA;" in runner.describe()
    runner.lean = None
    assert runner.describe().startswith("transformers' modules; ")
    if llama_forward.packs(torch.bfloat16, torch.device("cpu")):
        kind = (
            "native bf16 (AVX-512 BF16), packed once"
            if llama_forward.native_projections()
            else "oneDNN, reordered once"
        )
        assert f"projections: {kind};" in make_engine(bf16_model).runner.describe()
        head = "bf16 packed" if native.bf16_linear_ready() else "torch F.linear"
        assert f"; head: {head})" in make_engine(bf16_model).runner.describe()
