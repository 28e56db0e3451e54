"""models.yaml validation: every error names the file, the entry and the field, and says how to fix it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from worker.engine import speculates
from worker.registry import DEFAULT_REGISTRY, RegistryError, SpeculativeSpec, load_registry, parse_size


def write(tmp_path: Path, models: Any) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": models}))
    return path


def error_of(path: Path) -> str:
    with pytest.raises(RegistryError) as err:
        load_registry(path)
    return str(err.value)


def test_the_shipped_registry_is_valid() -> None:
    registry = load_registry(DEFAULT_REGISTRY)
    assert [e.name for e in registry.models] == ["smollm2"]
    assert registry.models[0].quantization == "none" and registry.models[0].lora is None


def test_unknown_key(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, [{"name": "a", "source": "/x", "dtyp": "float32"}]))
    assert str(tmp_path / "models.yaml") in message
    assert "models[0] ('a'), field 'dtyp'" in message and "unknown key" in message


def test_wrong_type_names_entry_and_field(tmp_path: Path) -> None:
    models = [{"name": "ok", "source": "/x"}, {"name": "b", "source": "/y", "max_num_seqs": "many"}]
    message = error_of(write(tmp_path, models))
    assert "models[1] ('b'), field 'max_num_seqs'" in message


def test_bad_choice(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, [{"name": "q", "source": "/x", "quantization": "int3"}]))
    assert "field 'quantization'" in message and "'int8'" in message


def test_two_models_with_one_name(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, [{"name": "a", "source": "/x"}, {"name": "a", "source": "/y"}]))
    assert "'a' is used twice" in message


def test_alias_clashing_with_a_name(tmp_path: Path) -> None:
    models = [{"name": "a", "source": "/x"}, {"name": "b", "source": "/y", "aliases": ["a"]}]
    assert "'a' is used twice (a and b)" in error_of(write(tmp_path, models))


def test_missing_adapter(tmp_path: Path) -> None:
    models = [{"name": "l", "source": "/x", "lora": {"adapter": str(tmp_path / "nowhere")}}]
    message = error_of(write(tmp_path, models))
    assert "models[0] ('l'), field 'lora.adapter'" in message and "adapter_config.json" in message


def test_missing_chat_template(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, [{"name": "t", "source": "/x", "chat_template": str(tmp_path / "t.jinja")}]))
    assert "field 'chat_template'" in message and "is not a file" in message


def test_quantization_of_dummy_weights(tmp_path: Path) -> None:
    models = [{"name": "d", "source": "/x", "load_format": "dummy", "quantization": "nf4"}]
    assert "quantization needs real weights" in error_of(write(tmp_path, models))


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"source": "/models/llama"}, "the source must be a .gguf"),
        ({"source": "/m.gguf", "dtype": "bfloat16"}, "dtype auto or float32"),
        ({"source": "/m.gguf", "lora": {"adapter": "/a"}}, "no lora"),
    ],
)
def test_gguf_blocks_need_a_gguf_source_in_float32(tmp_path: Path, fields: dict[str, Any], words: str) -> None:
    if "lora" in fields:
        (tmp_path / "a").mkdir()
        (tmp_path / "a" / "adapter_config.json").write_text("{}")
        fields = {**fields, "lora": {"adapter": str(tmp_path / "a")}}
    message = error_of(write(tmp_path, [{"name": "g", "quantization": "gguf", **fields}]))
    assert "models[0] ('g')" in message and words in message


def test_gguf_blocks_need_no_optional_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    path = write(tmp_path, [{"name": "g", "source": "/m.gguf", "quantization": "gguf"}])
    assert load_registry(path).models[0].quantization == "gguf"


@pytest.mark.parametrize(
    ("package", "field", "extra"), [("bitsandbytes", "quantization", "quant"), ("peft", "lora", "lora")]
)
def test_a_missing_optional_package_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, package: str, field: str, extra: str
) -> None:
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    value = "int8" if field == "quantization" else {"adapter": str(tmp_path / "adapter")}
    path = write(tmp_path, [{"name": "q", "source": "/x", field: value}])
    load_registry(path)  # valid where the package is installed
    monkeypatch.setitem(sys.modules, package, None)  # as if it were not
    message = error_of(path)
    assert f"models[0] ('q'), field '{field}'" in message and f"tokenmill[{extra}]" in message


def test_empty_and_unreadable(tmp_path: Path) -> None:
    assert "models" in error_of(write(tmp_path, []))
    assert "cannot read" in error_of(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [")
    assert "not valid YAML" in error_of(bad)


def test_aliases_resolve(tmp_path: Path) -> None:
    registry = load_registry(write(tmp_path, [{"name": "a", "source": "/x", "aliases": ["alpha", "first"]}]))
    assert registry.get("alpha").name == "a" and registry.get("a").name == "a"
    with pytest.raises(KeyError):
        registry.get("b")


@pytest.mark.parametrize(
    ("text", "size"), [("512", 512), ("2GiB", 2 * 2**30), ("1.5GB", 1_500_000_000), ("64MiB", 64 * 2**20)]
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_bad_size(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, [{"name": "s", "source": "/x", "kv_cache_memory": "lots"}]))
    assert "field 'kv_cache_memory'" in message and "'512MiB'" in message


def test_gpu_memory_utilization_is_a_share(tmp_path: Path) -> None:
    entry = load_registry(write(tmp_path, [{"name": "s", "source": "/x"}])).models[0]
    assert entry.gpu_memory_utilization == 0.9 and entry.cuda_graphs
    for bad in (0, 1.5, -0.2):
        message = error_of(write(tmp_path, [{"name": "s", "source": "/x", "gpu_memory_utilization": bad}]))
        assert "field 'gpu_memory_utilization'" in message


def test_embed_entries_and_their_fields(tmp_path: Path) -> None:
    entry = load_registry(write(tmp_path, [{"name": "e", "source": "/x", "task": "embed", "pooling": "cls"}])).models[0]
    assert (entry.task, entry.pooling, entry.normalize, entry.matryoshka_dimensions) == ("embed", "cls", None, None)
    message = error_of(write(tmp_path, [{"name": "g", "source": "/x", "pooling": "mean"}]))
    assert "pooling applies to embedding models only; set task: embed" in message
    message = error_of(write(tmp_path, [{"name": "e", "source": "/x.gguf", "task": "embed", "quantization": "gguf"}]))
    assert "an embed entry computes with plain weights" in message
    bad = [{"name": "e", "source": "/x", "task": "embed", "matryoshka_dimensions": [0, 64]}]
    assert "positive integers" in error_of(write(tmp_path, bad))
    assert "field 'task'" in error_of(write(tmp_path, [{"name": "e", "source": "/x", "task": "rerank"}]))


@pytest.mark.parametrize(
    ("speculative", "field", "words"),
    [
        ({"method": "medusa"}, "speculative.method", "'auto', 'ngram' or 'none'"),
        ({"method": "ngram", "num_tokens": 0}, "speculative.num_tokens", "greater than or equal to 1"),
        ({"method": "ngram", "num_tokens": 4, "draft": "x"}, "speculative.draft", "unknown key"),
        ({"prompt_lookup_min": 6}, "speculative", "prompt_lookup_min (6) must not exceed prompt_lookup_max (5)"),
    ],
)
def test_a_bad_speculative_setting_is_refused_by_name(
    tmp_path: Path, speculative: dict[str, Any], field: str, words: str
) -> None:
    message = error_of(write(tmp_path, [{"name": "s", "source": "/x", "speculative": speculative}]))
    assert f"models[0] ('s'), field '{field}'" in message and words in message


def test_speculation_is_chosen_by_device_unless_set(tmp_path: Path) -> None:
    models = [{"name": "a", "source": "/x"}, {"name": "b", "source": "/x", "speculative": {"method": "none"}}]
    entries = load_registry(write(tmp_path, models)).models
    assert (entries[0].speculative.method, entries[0].speculative.num_tokens) == ("auto", 5)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (speculates(entries[0].speculative, cpu), speculates(entries[0].speculative, cuda)) == (True, False)
    assert not speculates(entries[1].speculative, cpu)
    assert speculates(SpeculativeSpec(method="ngram"), cuda)
