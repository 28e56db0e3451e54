"""The speculative-decoding benchmark's pure parts: its seeded prompts, the quoting share, the counters read from
/metrics, and the table's arithmetic (no server is started)."""

from __future__ import annotations

import ast
import random
import re

import pytest

from loadtests import bench_spec as bench
from loadtests.bench_spec import Drafts, Level, Prompt, Reply
from worker.registry import ModelEntry


@pytest.mark.parametrize("seed", range(40))
def test_a_code_file_is_40_to_80_lines_of_python_calling_its_own_functions(seed: int) -> None:
    source, names, called = bench.code_file(random.Random(seed))
    assert 40 <= len(source.splitlines()) <= 80
    tree = ast.parse(source)
    assert [node.name for node in tree.body if isinstance(node, ast.FunctionDef)] == names
    assert len(set(names)) == len(names) and set(called) <= set(names)
    for name in called:  # defined once and called at least once
        assert source.count(f"{name}(") >= 2


def test_a_rewrite_prompt_renames_a_called_function_to_a_new_name() -> None:
    for seed in range(20):
        prompt = bench.rewrite_prompt(random.Random(seed))
        match = re.match(r"Rename the function `(\w+)` to `(\w+)`", prompt.text)
        assert match is not None and prompt.kind == "rewrite"
        old, new = match.groups()
        code = prompt.text.split("```python\n", 1)[1]
        assert f"def {old}(" in code and code.count(f"{old}(") >= 2 and new not in code


def test_an_extract_prompt_holds_every_field_it_asks_for() -> None:
    prompt = bench.extract_prompt(random.Random(3))
    orders = prompt.text.split("\n\n", 1)[1].splitlines()
    assert 3 <= len(orders) <= 4
    for order in orders:
        assert re.search(r"\(\w+\.\w+@example\.com\)", order) and re.search(r"order A-\d{5} for \d+ x ", order)


def test_a_continue_prompt_shows_ten_entries_of_one_pattern() -> None:
    prompt = bench.continue_prompt(random.Random(5))
    entries = [line for line in prompt.text.splitlines() if re.match(r"\d+\. host ", line)]
    assert len(entries) == 10
    assert {re.sub(r"\d+", "N", line) for line in entries} == {re.sub(r"\d+", "N", entries[0])}


def test_the_workloads_are_seeded_distinct_and_take_the_kinds_in_turn() -> None:
    grounded = bench.grounded_prompts(64)
    assert grounded == bench.grounded_prompts(64) and len({p.text for p in grounded}) == 64
    assert [p.kind for p in grounded[:6]] == ["rewrite", "extract", "continue"] * 2
    assert bench.grounded_prompts(3, seed=1) != bench.grounded_prompts(3)
    opened = bench.open_prompts(64)
    assert opened == bench.open_prompts(64) and len({p.text for p in opened}) == 64
    assert {p.kind for p in opened} == {"open"} and all(len(p.text) < 80 for p in opened)


def test_the_quoted_share_counts_reply_word_ngrams_found_in_the_prompt() -> None:
    prompt = "def load_user(users): return [u for u in users]"
    assert bench.quoted_fraction(prompt, "def load_user(users):\n    return [u for u in users]") == 1.0
    # words: a b c d e x; 4-grams (a b c d), (b c d e) found, (c d e x) not
    assert bench.quoted_fraction("a b c d e f", "a, b c d e; x", n=4) == pytest.approx(2 / 3)
    assert bench.quoted_fraction("a b c d", "w x y z") == 0.0
    assert bench.quoted_fraction("a b c d", "a b c") is None  # shorter than one n-gram


METRICS = """\
# HELP tokenmill_spec_decode_num_drafts_total Drafts proposed
# TYPE tokenmill_spec_decode_num_drafts_total counter
tokenmill_spec_decode_num_drafts_total{model_name="smollm2-spec4"} 10.0
tokenmill_spec_decode_num_drafts_total{model_name="smollm2-spec40"} 99.0
tokenmill_spec_decode_num_draft_tokens_total{model_name="smollm2-spec4"} 40.0
tokenmill_spec_decode_num_accepted_tokens_total{model_name="smollm2-spec4"} 30.0
tokenmill_spec_decode_num_accepted_tokens_created{model_name="smollm2-spec4"} 1.7e9
llamacpp:spec_decode_num_draft_tokens_total 64
llamacpp:spec_decode_num_accepted_tokens_total 48
llamacpp:spec_decode_num_drafts_total 16
"""


def test_the_counters_are_read_by_name_and_model() -> None:
    assert bench.spec_counters(METRICS, bench.TOKENMILL_COUNTERS, "smollm2-spec4") == {
        "num_drafts": 10.0,
        "num_draft_tokens": 40.0,
        "num_accepted_tokens": 30.0,
    }
    assert bench.spec_counters(METRICS, bench.TOKENMILL_COUNTERS, "smollm2-spec40") is None  # not all three
    assert bench.spec_counters(METRICS, bench.TOKENMILL_COUNTERS, "other") is None
    assert bench.spec_counters(METRICS, bench.LLAMA_COUNTERS) == {
        "num_drafts": 16.0,
        "num_draft_tokens": 64.0,
        "num_accepted_tokens": 48.0,
    }
    assert bench.spec_counters("", bench.LLAMA_COUNTERS) is None


def test_a_levels_drafts_are_the_counters_difference() -> None:
    before = {"num_drafts": 10.0, "num_draft_tokens": 40.0, "num_accepted_tokens": 30.0}
    after = {"num_drafts": 30.0, "num_draft_tokens": 120.0, "num_accepted_tokens": 60.0}
    drafts = bench.counter_delta(before, after)
    assert drafts == Drafts(20.0, 80.0, 30.0)
    assert drafts.acceptance == pytest.approx(0.375) and drafts.per_draft == pytest.approx(1.5)
    assert bench.counter_delta(None, after) is None and bench.counter_delta(before, None) is None
    assert Drafts(0.0, 0.0, 0.0).acceptance is None and Drafts(None, 8.0, 2.0).per_draft is None


def test_a_level_sums_the_good_replies_and_takes_llama_server_timings() -> None:
    prompts = [Prompt("rewrite", "a b c d e"), Prompt("open", "q"), Prompt("open", "r")]
    replies = [
        Reply(ok=True, ttft=0.1, tokens=256, text="a b c d e", draft_tokens=10, accepted_tokens=6),
        Reply(ok=True, ttft=0.3, tokens=44, text="w x y z", draft_tokens=2, accepted_tokens=0),
        Reply(ok=False, error="HTTP 500"),
    ]
    level = bench.level_of("llama.cpp", "x", "grounded", 1, prompts, replies, 10.0, 256, None)
    assert (level.requests, level.errors, level.completion_tokens) == (3, 1, 300)
    assert level.tokens_per_s == pytest.approx(30.0) and level.finished_by_length == 1
    assert level.ttft_p50 == pytest.approx(0.3)  # the median of two is the upper one (loadtests.load.percentile)
    assert level.quoted == pytest.approx(0.5) and level.by_kind == {"open": 0.0, "rewrite": 1.0}
    assert level.drafts == Drafts(None, 12, 6) and level.first_error == "HTTP 500"
    counted = bench.level_of("tokenmill", "x", "grounded", 1, prompts, replies, 10.0, 256, Drafts(3, 9, 3))
    assert counted.drafts == Drafts(3, 9, 3)  # the server's counters win over the replies' timings


def _level(server: str, config: str, workload: str, c: int, tokens: int, seconds: float) -> Level:
    return Level(server, config, workload, c, 4, 0, seconds, tokens, 0.25, 0.5)


def test_ratios_are_to_the_same_server_and_level_without_speculation() -> None:
    levels = [
        _level("tokenmill", bench.OFF, "grounded", 1, 1000, 20.0),
        _level("tokenmill", "ngram num_tokens=4", "grounded", 1, 1000, 10.0),
        _level("tokenmill", "ngram num_tokens=4", "grounded", 32, 1000, 10.0),  # no baseline at c=32
        _level("llama.cpp", bench.OFF, "grounded", 1, 1000, 25.0),
        _level("llama.cpp", "--spec-type ngram-simple", "grounded", 1, 1000, 12.5),
    ]
    bench.set_baselines(levels)
    assert [lv.ratio for lv in levels] == [1.0, 2.0, None, 1.0, 2.0]


def test_the_table_has_a_row_per_level_with_its_columns() -> None:
    level = _level("tokenmill", "ngram num_tokens=4", "grounded", 32, 2560, 10.0)
    level.baseline, level.drafts = 128.0, Drafts(100.0, 400.0, 300.0)
    header, rule, row = bench.table([level])
    assert header.count("|") == rule.count("|") == row.count("|")
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells == [
        "tokenmill", "ngram num_tokens=4", "grounded", "32", "4", "2560", "10.0", "256.0", "2.00x", "250 ms",
        "75%", "3.00", "50%",
    ]  # fmt: skip
    failed = _level("llama.cpp", bench.OFF, "open", 1, 10, 1.0)
    failed.errors = 1
    cells = [cell.strip() for cell in bench.table([failed])[-1].strip("|").split("|")]
    assert cells[4] == "3 (1 failed)" and cells.count("-") == 3


def test_the_llama_configurations_start_without_speculation_and_skip_repeats() -> None:
    configs = bench.llama_configs(["--spec-type ngram-simple", "", "--spec-type  ngram-simple"])
    assert configs == [(bench.OFF, []), ("--spec-type ngram-simple", ["--spec-type", "ngram-simple"])]


def test_the_tokenmill_entries_name_their_speculation() -> None:
    entries = bench.tokenmill_entries([3, 5], threads=2)
    assert entries[0][0] == bench.OFF and entries[0][1]["name"] == "smollm2-nospec"
    if "speculative" in ModelEntry.model_fields:  # the registry takes the field: each entry validates
        assert [e["speculative"] for _, e in entries] == [
            {"method": "none"},
            {"method": "ngram", "num_tokens": 3},
            {"method": "ngram", "num_tokens": 5},
        ]
        for _, entry in entries:
            ModelEntry(**entry)


def test_the_cpu_model_comes_from_cpuinfo() -> None:
    first = "processor\t: 0\ncpu family\t: 6\nmodel\t\t: 143\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t: avx\n"
    second = first.replace("143", "1").replace("Processor", "Other")
    assert bench.cpu_model(f"{first}\n{second}") == "Intel(R) Xeon(R) Processor (family 6, model 143)"
    assert bench.cpu_model("processor\t: 0\nmodel name\t: Some CPU\n") == "Some CPU"


def test_llama_servers_ngram_options_come_from_its_readme_table() -> None:
    readme = "\n".join(
        [
            "| `--spec-draft-n-max N` | number of tokens to draft (default: 3)<br/>(env: LLAMA_ARG_SPEC_DRAFT_N_MAX) |",
            "| `--spec-type none,ngram-simple,ngram-mod` | comma-separated list of types (default: none)<br/><br/>"
            "(env: LLAMA_ARG_SPEC_TYPE) |",
            "| `--spec-ngram-simple-size-n N` | ngram size N for ngram-simple, length of lookup n-gram (default: 12) |",
            "| `--spec-ngram-size-n N` | the argument has been removed. use the respective --spec-ngram-*-size-n |",
            "| `-lcd, --lookup-cache-dynamic FNAME` | path to dynamic lookup cache (updated by generation) |",
            "| `--spec-default` | enable default speculative decoding config |",
        ]
    )
    assert bench.llama_spec_options(readme) == [
        "- `--spec-type none,ngram-simple,ngram-mod`: comma-separated list of types (default: none)",
        "- `--spec-ngram-simple-size-n N`: ngram size N for ngram-simple, length of lookup n-gram (default: 12)",
        "- `-lcd, --lookup-cache-dynamic FNAME`: path to dynamic lookup cache (updated by generation)",
        "- `--spec-default`: enable default speculative decoding config",
    ]
