"""The scale benchmark's pure parts: prompts of an exact token length, the KV sizing, the tables, the targets and the
cost growth across models; and the peers' configurations for a model directory (no server is started)."""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from loadtests import dummy_models
from loadtests import scale_results as results
from loadtests.bench_itl import Level, overlapping, token_arrived
from loadtests.peers import llama_cpp, vllm_cpu
from loadtests.scale import exact_prompt, prompts, word_pool
from loadtests.scale_results import ItlResult, ModelRun, ServerRun, WorkloadResult


@pytest.mark.parametrize("tokens", [1, 2, 17, 256, 300])
def test_prompts_have_exactly_their_token_length(tiny_tokenizer: PreTrainedTokenizerFast, tokens: int) -> None:
    pool = word_pool(tiny_tokenizer)
    text = exact_prompt(tiny_tokenizer, tokens, random.Random(tokens), pool)
    assert len(tiny_tokenizer.encode(text, add_special_tokens=False)) == tokens


def test_a_workloads_prompts_are_distinct_and_the_same_on_every_call(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    pool = word_pool(tiny_tokenizer)
    workload = results.Workload("c8", 8, 64, 16, 8)
    first = prompts(tiny_tokenizer, pool, workload, "m")
    assert first == prompts(tiny_tokenizer, pool, workload, "m")
    assert len(set(first)) == 8 and first != prompts(tiny_tokenizer, pool, workload, "other")
    assert {len(tiny_tokenizer.encode(p, add_special_tokens=False)) for p in first} == {64}


def test_the_word_pool_holds_single_token_words(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    for word in word_pool(tiny_tokenizer):
        assert word.startswith(" ") and len(tiny_tokenizer.encode(word, add_special_tokens=False)) == 1


def test_kv_sizing_follows_the_workloads_and_the_config() -> None:
    # c=8 x (2,048 + 16) is the most held at once: 16,512 tokens, a quarter more, up to a multiple of 1,024
    assert results.kv_tokens(results.WORKLOADS) == 21504
    config = json.loads((dummy_models.CONFIGS / "llama-3.2-1b" / "config.json").read_text())
    assert results.kv_bytes_per_token(config) == 2 * 16 * 8 * 64 * 2
    assert results.kv_gib(21504, 32768) == 1 and results.kv_gib(40000, 32768) == 2
    assert results.kv_bytes_per_token({"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4}) == 512


def _result(key: str, tok_s: float, ttft: float, failed: int = 0, rss: int = 2 << 30) -> WorkloadResult:
    return WorkloadResult(
        key=key,
        label=key,
        requests=8,
        failed=failed,
        seconds=10.0,
        output_tokens=int(tok_s * 10),
        tokens_per_s=tok_s,
        ttft_p50=ttft,
        ttft_p99=2 * ttft,
        itl_p50=0.05,
        itl_p99=0.1,
        peak_rss=rss,
        preemptions=0,
        prompt_tokens=256,
        counted_prompt_tokens=[256],
    )


def _level(quiet: float, during: float) -> Level:
    return Level(2048, 100, quiet / 2, quiet, 20, during / 2, during, during * 1.5, 12.0)


def _server(name: str, speed: float, ttft: float, rss: int = 2 << 30, itl: float = 200.0) -> ServerRun:
    workloads = [
        _result("c1", 10 * speed, ttft),
        _result("c8", 40 * speed, ttft),
        _result("c32", 80 * speed, 2 * ttft),
        _result("long-c8", 8 * speed, 10 * ttft),
        _result("long-1", speed, 5 * ttft),
    ]
    return ServerRun(name, "bf16", workloads, ItlResult(_level(100.0, itl), rss, 0), peak_rss=rss)


def _run(
    model: str = "llama-3.2-1b", parameters: int = 1_235_814_400, scale: float = 1.0, **servers: ServerRun
) -> ModelRun:
    chosen = servers or {
        "tokenmill": _server("tokenmill", 1.5 / scale, 0.5 * scale, rss=3 << 30),
        "vllm": _server(results.VLLM, 1.0 / scale, 1.0 * scale),
        "llama": _server(results.LLAMA_BF16, 1.2 / scale, 0.8 * scale),
    }
    return ModelRun(model, parameters, int(2.3 * (1 << 30)), 1 << 30, 21504, list(chosen.values()))


def test_targets_met() -> None:
    found = results.targets(_run())
    assert [t.met for t in found] == [True] * 6, [t.line() for t in found]
    assert "1.50x" in found[0].detail


def test_targets_not_met() -> None:
    run = _run(
        tokenmill=_server("tokenmill", 1.1, 1.1, rss=5 << 30, itl=400.0),
        vllm=_server(results.VLLM, 1.0, 1.0),
        llama=_server(results.LLAMA_BF16, 1.2, 0.8),
    )
    run.servers[0].workloads[0].failed = 1
    assert [t.met for t in results.targets(run)] == [False] * 6


def test_targets_not_evaluated_without_the_servers() -> None:
    found = results.targets(_run(tokenmill=_server("tokenmill", 1.5, 0.5)))
    assert [t.met for t in found] == [None, None, None, True, True, True]
    assert [t.met for t in results.targets(_run(vllm=_server(results.VLLM, 1.0, 1.0)))] == [None] * 6


def test_tables_have_a_row_per_server_and_workload() -> None:
    run = _run()
    assert len(results.workload_table(run)) == 2 + 3 * 5
    assert len(results.itl_table(run)) == 2 + 3
    summary = results.summary_table(run)
    assert len(summary) == 2 + 3 and "| 15.0 | 60.0 | 120.0 |" in summary[2] and "2.00x" in summary[2]
    assert "3,072 MiB" in summary[2]
    assert results.ratios(run)[0].startswith("tokenmill / vllm-cpu-bf16: c1: 1.50x tok/s, 0.50x TTFT p50")


def test_a_failed_level_is_flagged_in_the_summary() -> None:
    run = _run()
    run.servers[1].workloads[1].failed = 2
    assert "| 40.0* |" in results.summary_table(run)[3]


def test_cost_growth_orders_models_by_size_and_shows_growth_over_the_smallest() -> None:
    small = _run("qwen2.5-0.5b", 494_032_768)
    big = _run("llama-3.2-3b", 3_212_749_824, scale=2.0)
    lines = results.cost_growth([big, _run(), small])
    rows = [line for line in lines[2:] if line.startswith("| tokenmill |")]
    assert [row.split(" | ")[1] for row in rows] == ["qwen2.5-0.5b", "llama-3.2-1b", "llama-3.2-3b"]
    assert "| 15.0 |" in rows[0] and "(1.00x)" in rows[1] and "7.5 (0.50x)" in rows[2] and "(2.00x)" in rows[2]
    assert len(lines) == 2 + 3 * 3


def test_a_report_json_reads_back() -> None:
    run = _run()
    assert results.model_run(json.loads(json.dumps(asdict(run)))) == run


def test_preemptions_are_read_from_either_servers_metrics() -> None:
    tokenmill = (
        '# HELP x\ntokenmill_num_preemptions_total{model="m"} 3.0\ntokenmill_num_preemptions_created{model="m"} 1e9\n'
    )
    vllm = 'vllm:num_preemptions_total{engine="0",model_name="a b"} 2.0\nvllm:num_preemptions_total{engine="1"} 1.0\n'
    assert results.preemptions(tokenmill) == 3
    assert results.preemptions(vllm) == 3
    assert results.preemptions("llamacpp:requests_processing 1\n") is None


def test_a_chunk_carries_a_token_by_its_text_or_its_logprobs() -> None:
    assert token_arrived({"choices": [{"text": "a", "logprobs": None}]})
    assert token_arrived({"choices": [{"text": "", "logprobs": {"tokens": ["\\xe4"]}}]})
    assert token_arrived({"choices": [{"text": "", "logprobs": {"content": [{"token": "a"}]}}]})
    assert not token_arrived({"choices": [], "usage": {"completion_tokens": 3}})
    assert not token_arrived({"choices": [{"text": "", "finish_reason": "length"}]})


def test_the_cost_figure_is_written_where_matplotlib_is(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = results.cost_figure([_run(), _run("qwen2.5-0.5b", 494_032_768, scale=0.5)], tmp_path / "cost.png")
    assert path is not None and path.stat().st_size > 0


def test_the_markdown_report_states_the_targets() -> None:
    text = results.markdown(_run(), [_run()], None)
    assert "## Targets (set for llama-3.2-1b)" in text and text.count(": met (") == 6


def test_a_directory_is_served_by_llama_server_from_its_gguf_files(tmp_path: Path) -> None:
    directory = tmp_path / "llama-3.2-1b"
    configs = llama_cpp.directory_servers(tmp_path / "cache", 8700, directory, context=21504)
    assert [s.name for s in configs] == ["llama.cpp-bf16", "llama.cpp-q8_0"]
    for server, outtype in zip(configs, llama_cpp.GGUF_TYPES, strict=True):
        command = server.command
        assert command[command.index("-m") + 1] == str(tmp_path / f"llama-3.2-1b.{outtype}.gguf")
        assert command[command.index("-np") + 1] == "32" and command[command.index("-c") + 1] == "21504"
        assert "--kv-unified" in command and "-cb" in command and server.model == "llama-3.2-1b"
        assert server.prepare is not None


def test_gguf_files_already_there_are_kept(tmp_path: Path) -> None:
    directory = tmp_path / "m"
    for outtype in llama_cpp.GGUF_TYPES:
        llama_cpp.gguf_file(directory, outtype).write_bytes(b"GGUF")
    # no converter runs: the sources given do not exist
    assert llama_cpp.convert(directory, tmp_path / "no-sources") == [tmp_path / "m.bf16.gguf", tmp_path / "m.q8_0.gguf"]


def test_a_directory_is_served_by_vllm_under_its_name(tmp_path: Path) -> None:
    (server,) = vllm_cpu.directory_servers(tmp_path / "cache", 8710, tmp_path / "qwen2.5-0.5b", kv_gib=3)
    assert server.model == "qwen2.5-0.5b" and server.env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    command = server.command
    assert command[command.index("serve") + 1] == str(tmp_path / "qwen2.5-0.5b")
    assert command[command.index("--served-model-name") + 1] == "qwen2.5-0.5b" and "bfloat16" in command


def test_itl_results_compare_during_and_quiet() -> None:
    assert math.isclose(_level(100.0, 250.0).p99_ratio, 2.5)


def test_the_gaps_a_long_prompt_held_up_count_while_it_prefills() -> None:
    # (arrival, gap): before it was sent; during; held up from 9.9 until after it was answered at 12; after it
    gaps = [(9.5, 0.1), (10.5, 0.2), (12.2, 2.3), (13.0, 0.1)]
    assert overlapping(gaps, 10.0, 12.0) == [0.2, 2.3]
