"""A LoRA adapter saved as a pickle (adapter_model.bin) is refused unless its entry sets trust_pickle, as the base
model's pickle weights are, with the same message; with trust_pickle it loads, and so do safetensors weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import tiny_entry
from worker.loader import load_model
from worker.registry import LoraSpec

peft = pytest.importorskip("peft")
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def save_adapter(base_dir: Path, path: Path, *, safe: bool) -> Path:
    torch.manual_seed(5)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(base, config).save_pretrained(path, safe_serialization=safe)
    return path


@pytest.fixture(scope="module")
def pickled_adapter(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = save_adapter(tiny_llama_dir, tmp_path_factory.mktemp("pickled-adapter"), safe=False)
    assert (path / "adapter_model.bin").is_file() and not list(path.glob("*.safetensors"))
    return path


def test_a_pickle_adapter_is_refused_without_trust_pickle(
    tiny_llama_dir: Path, pickled_adapter: Path, tmp_path: Path
) -> None:
    entry = tiny_entry(tiny_llama_dir, lora=LoraSpec(adapter=str(pickled_adapter)))
    with pytest.raises(ValueError, match="only pickle weights") as refused:
        load_model(entry, tmp_path)
    message = str(refused.value)
    assert "adapter_model.bin" in message and "trust_pickle: true" in message and str(pickled_adapter) in message
    assert not (tmp_path / "merged").exists()  # refused before anything was read or merged


def test_a_safetensors_adapter_beside_other_safetensors_is_still_required(
    tiny_llama_dir: Path, pickled_adapter: Path, tmp_path: Path
) -> None:
    """Only adapter_model.safetensors counts: peft would unpickle adapter_model.bin beside any other file."""
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for item in pickled_adapter.iterdir():
        (mixed / item.name).write_bytes(item.read_bytes())
    (mixed / "unrelated.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="trust_pickle"):
        load_model(tiny_entry(tiny_llama_dir, lora=LoraSpec(adapter=str(mixed))), tmp_path / "cache")


def test_with_trust_pickle_the_pickle_adapter_loads_as_its_safetensors_twin(
    tiny_llama_dir: Path, pickled_adapter: Path, tmp_path: Path
) -> None:
    twin = save_adapter(tiny_llama_dir, tmp_path / "safe-adapter", safe=True)
    trusted = tiny_entry(tiny_llama_dir, lora=LoraSpec(adapter=str(pickled_adapter)), trust_pickle=True)
    from_pickle = load_model(trusted, tmp_path / "a").model.state_dict()[Q_PROJ]
    from_safetensors = load_model(tiny_entry(tiny_llama_dir, lora=LoraSpec(adapter=str(twin))), tmp_path / "b")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()[Q_PROJ]
    assert not torch.equal(from_pickle, base)
    assert torch.equal(from_pickle, from_safetensors.model.state_dict()[Q_PROJ])


def test_trust_pickle_still_loads_safetensors_weights(tiny_llama_dir: Path) -> None:
    """trust_pickle allows pickle weights; it does not make safetensors ones unloadable."""
    loaded = load_model(tiny_entry(tiny_llama_dir, trust_pickle=True))
    assert loaded.model.state_dict()[Q_PROJ].shape[1] == loaded.config.hidden_size
