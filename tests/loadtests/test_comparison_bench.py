"""The comparison's vllm bench part: the best configuration per workload and metric, tokenmill's ratios against the
best peer, and the issue's targets, met, not met or not evaluated. Pure functions on hand-made outcomes."""

from __future__ import annotations

import pytest

from loadtests import comparison, vllm_bench
from loadtests.comparison import OUTPUT_TOK_S, TOKENMILL, TTFT_MEDIAN, Measured, Target
from loadtests.vllm_bench import Outcome

C1, C8, C32 = "random-1024-16:1", "random-1024-16:8", "random-256-128:32"


def row(workload: str, ttft: float, prompt: float, output: float, failed: int = 0, itl: float = 100.0) -> Outcome:
    return Outcome(workload, 24 - failed, failed, ttft, itl, prompt, output)


def server(name: str, peer: str, *rows: Outcome) -> Measured:
    return Measured(name, peer, "bf16", vllm_bench=list(rows))


def run() -> list[Measured]:
    """tokenmill's two configurations, vLLM's two and llama.cpp's one, each with the three targets' workloads."""
    return [
        server("tokenmill", TOKENMILL, row(C1, 964, 761, 11.9), row(C8, 7131, 904, 14.1), row(C32, 1118, 441, 220.5)),
        server("tokenmill-2threads", TOKENMILL, row(C1, 800, 700, 12.5), row(C8, 6000, 1400, 21.0, failed=2)),
        server("vllm-cpu-bf16", comparison.VLLM, row(C1, 872, 769, 12.0), row(C8, 3412, 1311, 20.5)),
        server("vllm-cpu-fp32", comparison.VLLM, row(C1, 990, 650, 10.2), row(C32, 2678, 583, 183.0)),
        server("llama.cpp-q4_1", "llama.cpp", row(C1, 500, 900, 13.0, itl=20.0), row(C32, 900, 300, 150.0, failed=5)),
    ]


def by_text(targets: list[Target]) -> dict[str, Target]:
    return {t.text.split(": ")[0]: t for t in targets}


def test_the_targets_workloads_are_ones_the_report_runs_by_default() -> None:
    assert {workload for workload, _, _ in comparison.BENCH_TARGETS} <= set(vllm_bench.DEFAULT_WORKLOADS)


def test_the_best_configuration_follows_the_metric_and_skips_runs_with_failed_requests() -> None:
    measured = run()
    fastest = comparison.bench_best(measured, C1, TTFT_MEDIAN, TOKENMILL)
    assert fastest is not None and fastest[0].name == "tokenmill-2threads"  # lower TTFT is better
    best_c8 = comparison.bench_best(measured, C8, OUTPUT_TOK_S, TOKENMILL)
    assert best_c8 is not None and best_c8[0].name == "tokenmill"  # -2threads' is faster, but 2 requests failed
    peer_c1 = comparison.bench_best(measured, C1, OUTPUT_TOK_S, None)
    assert peer_c1 is not None and peer_c1[0].name == "llama.cpp-q4_1"  # any peer but tokenmill
    vllm_c32 = comparison.bench_best(measured, C32, OUTPUT_TOK_S, comparison.VLLM)
    assert vllm_c32 is not None and vllm_c32[0].name == "vllm-cpu-fp32"
    assert comparison.bench_best(measured, "prefix-512-128-64:8", OUTPUT_TOK_S, TOKENMILL) is None


def test_ratios_set_tokenmills_best_against_the_best_peer_metric_by_metric() -> None:
    lines = comparison.bench_ratios(run())
    assert [line.split(",")[0] for line in lines] == [f"vllm bench {C1}", f"vllm bench {C8}", f"vllm bench {C32}"]
    c1 = lines[0]
    assert "TTFT median 1.60x (tokenmill-2threads 800 ms / llama.cpp-q4_1 500 ms)" in c1
    assert "ITL p99 5.00x (tokenmill 100 ms / llama.cpp-q4_1 20 ms)" in c1
    assert "output tok/s 0.96x (tokenmill-2threads 12.5 / llama.cpp-q4_1 13.0)" in c1
    assert "prompt tok/s 0.69x (tokenmill 904 / vllm-cpu-bf16 1311)" in lines[1]
    # llama.cpp's c=32 run failed requests: vLLM's fp32 is the best peer there
    assert "output tok/s 1.20x (tokenmill 220.5 / vllm-cpu-fp32 183.0)" in lines[2]


def test_ratios_say_when_tokenmill_was_not_measured_and_are_empty_without_vllm_bench() -> None:
    peers_only = [m for m in run() if m.peer != TOKENMILL]
    assert comparison.bench_ratios(peers_only) == ["tokenmill was not measured in this run: no vllm bench ratios."]
    assert comparison.bench_ratios([server("tokenmill", TOKENMILL)]) == []


def test_the_issues_targets_against_vllms_best() -> None:
    found = by_text(comparison.bench_targets(run()))
    assert list(found) == [f"vllm bench {C1}", f"vllm bench {C8}", f"vllm bench {C32}"]
    c1 = found[f"vllm bench {C1}"]
    assert c1.met is True and "800 ms vs 872 ms = 0.92x" in c1.detail and "tokenmill-2threads" in c1.detail
    c8 = found[f"vllm bench {C8}"]  # 904 prompt tok/s against 1311: the faster configuration failed requests
    assert c8.met is False and "904 vs 1311 = 0.69x" in c8.detail
    c32 = found[f"vllm bench {C32}"]  # 220.5 / 183.0 = 1.205x
    assert c32.met is True and "220.5 vs 183.0 = 1.20x" in c32.detail
    assert "NOT met" in c8.line() and c32.line().startswith(f"vllm bench {C32}: output tok/s >= 1.2x vLLM best")


def test_the_throughput_target_is_not_met_just_under_its_factor_or_with_failed_requests() -> None:
    measured = run()
    measured[0].vllm_bench[2] = row(C32, 1118, 441, 219.0)  # 219.0 / 183.0 = 1.197x
    assert by_text(comparison.bench_targets(measured))[f"vllm bench {C32}"].met is False
    measured[0].vllm_bench[2] = row(C32, 1118, 441, 400.0, failed=1)  # twice vLLM's, but a request failed
    target = by_text(comparison.bench_targets(measured))[f"vllm bench {C32}"]
    assert target.met is False and "failed requests: 1 of 24" in target.detail


def test_targets_without_tokenmill_or_vllm_rows_are_not_evaluated() -> None:
    no_vllm = [m for m in run() if m.peer != comparison.VLLM]
    assert all(t.met is None for t in comparison.bench_targets(no_vllm))
    vllm_failed = run()
    for m in vllm_failed:
        if m.peer == comparison.VLLM:
            m.vllm_bench = [row(o.workload, 1, 1, 1, failed=3) for o in m.vllm_bench]
    target = by_text(comparison.bench_targets(vllm_failed))[f"vllm bench {C1}"]
    assert target.met is None and "every vLLM configuration had failed requests" in target.detail


def test_the_targets_list_ends_with_vllm_bench_s_even_when_no_level_ran() -> None:
    found = comparison.targets(run())
    assert [t.text for t in found[-3:]] == [t.text for t in comparison.bench_targets(run())]
    assert found[-3].met is True


@pytest.mark.parametrize(("metric", "expected"), [(TTFT_MEDIAN, "964 ms"), (OUTPUT_TOK_S, "11.9")])
def test_metrics_show_their_unit_and_digits(metric: comparison.BenchMetric, expected: str) -> None:
    assert metric.show(row(C1, 964.4, 761, 11.94)) == expected
