"""Server settings: engine flags override the same field of every registry entry."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

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


def test_documented_settings_get_their_flags_from_the_model(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # help lines unwrapped
    args = build_parser().parse_args(
        ["serve", "--header-read-timeout", "2.5", "--max-connections", "64", "--admin-key", "k"]
    )
    assert (args.header_read_timeout, args.max_connections, args.admin_key) == (2.5, 64, "k")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    help_text = capsys.readouterr().out
    for name, field in Settings.model_fields.items():
        if field.description is not None:
            assert "--" + name.replace("_", "-") in help_text, name
    assert "(default: 10)" in help_text and "(default: 1000)" in help_text


def test_admin_keys_fall_back_to_the_api_keys() -> None:
    assert Settings(api_key="a").admin_keys() == ["a"]
    assert Settings(api_key="a", admin_key="b").admin_keys() == ["b"]
    assert Settings(api_key="", admin_key="").admin_keys() == []
