"""loadtests.vllm_bench without vLLM: workload names, the command line, the table, and the parsing of the JSON that
`vllm bench serve --save-result --save-detailed` writes (a fixture with its fields, from a c=1 run with one failed
request). `run` is driven with subprocess.run replaced: nothing is started."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from loadtests import vllm_bench
from loadtests.peers.vllm_cpu import LAUNCH
from loadtests.vllm_bench import Outcome, Workload

FIXTURE = Path(__file__).with_name("data") / "vllm_bench_random-1024-16-c1.json"


def fixture() -> dict[str, Any]:
    result: dict[str, Any] = json.loads(FIXTURE.read_text())
    return result


def test_workload_names_parse_into_datasets_and_concurrency() -> None:
    random = Workload.parse("random-1024-16:8")
    assert (random.dataset, random.sizes, random.concurrency) == ("random", (1024, 16), 8)
    assert random.stem == "random-1024-16-c8"
    assert random.prompts(3) == 24 and Workload.parse("random-1024-16:1").prompts(3) == vllm_bench.MIN_PROMPTS
    assert random.dataset_args() == [
        "--dataset-name",
        "random",
        "--random-input-len",
        "1024",
        "--random-output-len",
        "16",
    ]
    prefix = Workload.parse("prefix-512-128-64:8")
    assert (prefix.dataset, prefix.sizes, prefix.concurrency) == ("prefix_repetition", (512, 128, 64), 8)
    args = prefix.dataset_args()
    assert args[args.index("--prefix-repetition-prefix-len") + 1] == "512"
    assert args[args.index("--prefix-repetition-suffix-len") + 1] == "128"
    assert args[args.index("--prefix-repetition-output-len") + 1] == "64"
    assert args[args.index("--prefix-repetition-num-prefixes") + 1] == str(vllm_bench.PREFIXES)
    assert [Workload.parse(w).name for w in vllm_bench.DEFAULT_WORKLOADS] == vllm_bench.DEFAULT_WORKLOADS


@pytest.mark.parametrize(
    "name",
    ["random-1024:8", "random-1024-16", "random-1024-16:", "sharegpt-1-2:1", "random-a-16:1", "random-0-16:1",
     "prefix-512-128:8", "random-1024-16:x"],
)  # fmt: skip
def test_malformed_workload_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="unknown workload"):
        Workload.parse(name)


def test_the_result_json_parses_into_the_reported_numbers() -> None:
    outcome = vllm_bench.outcome("random-1024-16:1", fixture(), 4)
    assert (outcome.workload, outcome.completed, outcome.failed) == ("random-1024-16:1", 3, 1)
    assert outcome.ttft_median_ms == pytest.approx(871.6)
    assert outcome.itl_p99_ms == pytest.approx(36.7064)
    assert outcome.input_tok_s == pytest.approx(3072 / 3.0512)  # prompt tokens of completed requests / duration
    assert outcome.output_tok_s == pytest.approx(15.7315)
    assert outcome.first_error.endswith("ValueError: HTTP 429: too many requests")
    assert "\n" not in outcome.first_error and len(outcome.first_error) <= vllm_bench.ERROR_CHARS


def test_a_result_without_failed_or_errors_counts_the_missing_requests_as_failed() -> None:
    result = fixture()
    for name in ("failed", "errors", "ttfts", "itls", "generated_texts"):  # older versions; no --save-detailed
        del result[name]
    outcome = vllm_bench.outcome("random-1024-16:1", result, 5)
    assert (outcome.completed, outcome.failed, outcome.first_error) == (3, 2, "")


@pytest.mark.parametrize("name", ["median_ttft_ms", "p99_itl_ms", "total_input_tokens", "completed"])
def test_a_result_missing_a_number_is_refused_by_name(name: str) -> None:
    result = fixture()
    del result[name]
    with pytest.raises(ValueError, match=name):
        vllm_bench.outcome("random-1024-16:1", result, 4)


def test_a_zero_duration_gives_zero_prompt_throughput_not_a_crash() -> None:
    result = {**fixture(), "duration": 0.0, "completed": 0, "failed": 4, "output_throughput": 0.0}
    assert vllm_bench.outcome("random-1024-16:1", result, 4).input_tok_s == 0.0


def test_the_command_runs_the_workload_from_the_given_python_and_saves_detailed_results(tmp_path: Path) -> None:
    result = tmp_path / "out" / "r.json"
    workload = Workload.parse("random-256-128:32")
    cmd = vllm_bench.command(
        Path("/venv/bin/python"), "http://127.0.0.1:8400", "smollm2", workload, Path("/tok"), 3, result
    )
    assert cmd[:5] == ["/venv/bin/python", "-c", LAUNCH, "bench", "serve"]

    def value(flag: str) -> str:
        return cmd[cmd.index(flag) + 1]

    assert value("--base-url") == "http://127.0.0.1:8400" and value("--served-model-name") == "smollm2"
    assert value("--model") == "/tok" and value("--random-input-len") == "256" and value("--random-output-len") == "128"
    assert value("--num-prompts") == "96" and value("--max-concurrency") == "32"
    assert value("--result-dir") == str(result.parent) and value("--result-filename") == "r.json"
    assert {"--ignore-eos", "--save-result", "--save-detailed"} <= set(cmd)


def test_the_table_has_a_row_per_outcome_with_or_without_a_leading_column() -> None:
    outcome = Outcome("random-1024-16:8", 24, 0, 7131.4, 104.2, 904.4, 14.13)
    lines = vllm_bench.table([("tokenmill", outcome)])
    assert lines[0] == "| server | " + " | ".join(vllm_bench.COLUMNS) + " |"
    assert lines[1] == "|---" * (len(vllm_bench.COLUMNS) + 1) + "|"
    assert lines[2] == "| tokenmill | random-1024-16:8 | 24 / 0 | 7131 ms | 104 ms | 904 | 14.1 |"
    assert (
        vllm_bench.table([("", outcome)], first=None)[2]
        == "| random-1024-16:8 | 24 / 0 | 7131 ms | 104 ms | 904 | 14.1 |"
    )


class FakeBench:
    """subprocess.run in place of vllm bench serve: writes `result` (if any) where the command says, exits `code`."""

    def __init__(self, result: dict[str, Any] | None, code: int = 0) -> None:
        self.result, self.code, self.commands = result, code, list[list[str]]()

    def __call__(self, cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        self.commands.append(cmd)
        kwargs["stdout"].write(b"============ Serving Benchmark Result ============\n")
        if self.result is not None:
            path = Path(cmd[cmd.index("--result-dir") + 1]) / cmd[cmd.index("--result-filename") + 1]
            path.write_text(json.dumps(self.result))
        return subprocess.CompletedProcess(cmd, self.code)


def test_run_parses_what_vllm_bench_wrote_and_keeps_its_output(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = FakeBench(fixture())
    monkeypatch.setattr(subprocess, "run", fake)
    result = tmp_path / "report_vllm_bench_tokenmill_random-1024-16-c1.json"
    workload = Workload.parse("random-1024-16:1")
    outcome = vllm_bench.run("http://127.0.0.1:1", "smollm2", workload, tmp_path, 3, result)
    assert (outcome.completed, outcome.failed, outcome.ttft_median_ms) == (3, 1, 871.6)
    assert "Serving Benchmark Result" in result.with_suffix(".log").read_text()
    assert fake.commands[0][0].endswith("/bin/python")


def test_run_does_not_take_an_earlier_result_for_its_own(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    result = tmp_path / "r.json"
    result.write_text(json.dumps(fixture()))  # a stale file from an earlier run
    monkeypatch.setattr(subprocess, "run", FakeBench(None))
    with pytest.raises(RuntimeError, match="no usable"):
        vllm_bench.run("http://127.0.0.1:1", "smollm2", Workload.parse("random-1024-16:1"), tmp_path, 3, result)


def test_run_reports_a_failed_exit_with_its_log(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(subprocess, "run", FakeBench(fixture(), code=1))
    with pytest.raises(RuntimeError, match=r"exit 1.*r\.log"):
        vllm_bench.run("http://x", "m", Workload.parse("random-1024-16:1"), tmp_path, 3, tmp_path / "r.json")


def test_run_reports_a_timeout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def too_slow(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])

    monkeypatch.setattr(subprocess, "run", too_slow)
    with pytest.raises(RuntimeError, match="ran past 5 s"):
        vllm_bench.run("http://x", "m", Workload.parse("random-1024-16:1"), tmp_path, 3, tmp_path / "r.json", 5.0)
