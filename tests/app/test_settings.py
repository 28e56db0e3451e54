"""Server settings: engine flags override the same field of every registry entry."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from app.cli import build_parser
from app.settings import Settings


def test_engine_flags_override_every_entry(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    models = [{"name": "a", "source": "/x"}, {"name": "b", "source": "/y", "gpu_memory_utilization": 0.5}]
    path.write_text(yaml.safe_dump({"models": models}))
    args = build_parser().parse_args(["serve", "--gpu-memory-utilization", "0.6", "--max-num-seqs", "8"])
    registry = Settings(models=path, gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=8).registry()
    assert [(e.gpu_memory_utilization, e.max_num_seqs) for e in registry.models] == [(0.6, 8), (0.6, 8)]
    assert [e.gpu_memory_utilization for e in Settings(models=path).registry().models] == [0.9, 0.5]


def test_admin_keys_fall_back_to_the_api_keys() -> None:
    assert Settings(api_key="a").admin_keys() == ["a"]
    assert Settings(api_key="a", admin_key="b").admin_keys() == ["b"]
    assert Settings(api_key="", admin_key="").admin_keys() == []


def test_an_unknown_log_level_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENMILL_LOG_LEVEL", "verbose")
    with pytest.raises(ValidationError, match="log_level"):
        Settings()
    monkeypatch.setenv("TOKENMILL_LOG_LEVEL", "warning")
    assert Settings().log_level == "warning"
