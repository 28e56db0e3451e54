"""Pooling read from sentence-transformers' files or set in the registry, and computed as sentence-transformers
computes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from worker.embed.pooling import Pooling, PoolingError, read_pooling


def st_dir(tmp_path: Path, mode_key: str | None, normalize: bool, max_seq_length: int | None = 128) -> Path:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    if mode_key is not None:
        modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
        (tmp_path / "1_Pooling").mkdir()
        keys = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens")
        config = {key: key == mode_key for key in keys} | {"word_embedding_dimension": 8}
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(config))
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    if max_seq_length is not None:
        (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    return tmp_path


def test_the_sentence_transformers_config_sets_mode_normalization_and_limit(tmp_path: Path) -> None:
    assert read_pooling(st_dir(tmp_path, "pooling_mode_cls_token", True)) == Pooling("cls", True, 128)


def test_without_a_normalize_module_vectors_keep_their_length(tmp_path: Path) -> None:
    assert read_pooling(st_dir(tmp_path, "pooling_mode_mean_tokens", False, None)) == Pooling("mean", False, None)


def test_a_directory_without_sentence_transformers_files_pools_the_last_token_normalized(tmp_path: Path) -> None:
    assert read_pooling(tmp_path) == Pooling("last", True, None)


def test_the_registry_overrides_the_config(tmp_path: Path) -> None:
    directory = st_dir(tmp_path, "pooling_mode_max_tokens", True)
    assert read_pooling(directory, "mean", False) == Pooling("mean", False, 128)


def test_a_mode_this_server_does_not_compute_is_refused_with_the_way_out(tmp_path: Path) -> None:
    with pytest.raises(PoolingError, match=r"pooling_mode_max_tokens.*set pooling in models\.yaml"):
        read_pooling(st_dir(tmp_path, "pooling_mode_max_tokens", True))


def test_pooling_ignores_padding() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8)
    lengths = torch.tensor([5, 2])
    mean = Pooling("mean", False)(hidden, lengths)
    assert torch.allclose(mean[1], hidden[1, :2].mean(0))
    assert torch.allclose(mean[0], hidden[0].mean(0))
    last = Pooling("last", True)(hidden, lengths)
    assert torch.allclose(last[1], F.normalize(hidden[1, 1], dim=0))
    assert torch.equal(Pooling("cls", False)(hidden, lengths), hidden[:, 0])
