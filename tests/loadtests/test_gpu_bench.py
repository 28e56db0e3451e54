"""The GPU benchmark at toy scale on the CPU: every row measured with positive numbers, the engine's greedy output the
same as both baselines' (float32, so exactly), and the report's targets present, measured or not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtests.gpu import bench, bench_paths

POSITIVE = [
    "engine_tok_s",
    "generate_tok_s",
    "generate_batch_tok_s",
    "engine_vs_generate",
    "engine_vs_generate_batch",
    "decode_step_ms",
    "decode_limit_ms",
    "decode_vs_limit",
    "engine_peak_mib",
    "generate_peak_mib",
    "generate_batch_peak_mib",
]


def test_the_benchmark_measures_every_row_on_a_tiny_model(tiny_llama_dir: Path, tmp_path: Path) -> None:
    argv = ["--out", str(tmp_path), "--device", "cpu", "--dtype", "float32", "--config", str(tiny_llama_dir)]
    argv += ["--batches", "1", "2", "--prompt-len", "6", "--output-len", "4", "--warmup-tokens", "2"]
    assert bench.main([*argv, "--copy-mib", "16"]) == 0

    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["copy_gb_s"] > 0 and report["dtype"] == "float32"
    [model] = report["models"]
    assert model["name"] == tiny_llama_dir.name and model["weight_bytes"] == 4 * model["parameters"] > 0
    assert len(model["checksums"]) == 2 and model["checksums"][0] == model["checksums"][1]
    assert "decode attention" in model["engine_paths"] and model["engine_paths"].endswith("no decode graphs")
    rows = {(row["model"], row["batch"]): row for row in report["rows"]}
    assert sorted(rows) == [(model["name"], 1), (model["name"], 2)]
    for row in rows.values():
        assert row["errors"] == {}
        assert all(row[key] > 0 for key in POSITIVE), row
        assert row["decode_steps"] == 3  # 4 tokens: the first from prefill, then 3 steps of every request decoding
        assert row["same_as_generate"] == 1.0 and row["same_as_generate_batch"] == 1.0
    runs = [(run["path"], run["batch"], run["output_tokens"]) for run in model["runs"]]
    assert sorted(runs) == sorted((path, b, 4 * b) for path in bench_paths.PATHS for b in (1, 2))

    goals = {goal["id"]: goal for goal in report["targets"] if goal["model"] == model["name"]}
    assert goals["batch1_decode"]["value"] > 0 and goals["batch1_decode"]["met"] is False  # a CPU has no CUDA graphs
    assert goals["batch64_throughput"]["met"] is None  # batch 64 not run
    text = (tmp_path / "bench.md").read_text()
    assert "| engine tok/s |" in text and "## Targets" in text and "not measured" in text
    assert f"Engine: {model['engine_paths']}" in text


def test_a_failing_baseline_is_recorded_and_the_rest_still_measured(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> list[list[int]]:
        raise RuntimeError("no paged attention here")

    monkeypatch.setattr(bench_paths, "run_generate_batch", broken)
    argv = ["--out", str(tmp_path), "--device", "cpu", "--dtype", "float32", "--config", str(tiny_llama_dir)]
    assert bench.main([*argv, "--batches", "1", "--prompt-len", "4", "--output-len", "3", "--copy-mib", "4"]) == 0
    [row] = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert row["errors"] == {"generate_batch": "RuntimeError: no paged attention here"}
    assert row["generate_batch_tok_s"] is None and row["engine_vs_generate_batch"] is None
    assert row["engine_tok_s"] > 0 and row["generate_tok_s"] > 0 and row["same_as_generate"] == 1.0
    assert "generate_batch: RuntimeError: no paged attention here" in (tmp_path / "bench.md").read_text()
