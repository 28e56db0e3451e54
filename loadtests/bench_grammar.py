"""llguidance against xgrammar on this machine, for the choice of structured-output backend: time to build the
tokenizer tables, to compile a JSON schema, and to compute one allowed-token mask, along a real JSON document
tokenized by the default model's tokenizer. Also what each installs.

    pip install xgrammar   # not a tokenmill dependency; only for this comparison
    python -m loadtests.bench_grammar [--repeat 20]
    pip uninstall -y xgrammar triton apache-tvm-ffi   # afterwards: see below

Uninstall it afterwards: xgrammar pulls in triton, and torch imports triton on start whenever it is installed, which
costs every tokenmill worker 75 MB of RSS on a CPU where triton has nothing to do.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

import torch
from transformers import AutoTokenizer

from tests.worker.test_structured import PERSON as SCHEMA
from worker.loader import default_cache_dir, load_model
from worker.registry import DEFAULT_SOURCE, ModelEntry

DOCUMENT = {
    "name": "Ada Lovelace",
    "age": 36,
    "role": "admin",
    "tags": ["math", "poetry"],
    "address": {"city": "London", "zip": "12345"},
}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_llguidance(hf: Any, vocab: int, tokens: list[int], repeat: int) -> dict[str, float]:
    from llguidance import LLMatcher
    from llguidance.hf import from_tokenizer

    llt, setup = timed(lambda: from_tokenizer(hf, n_vocab=vocab))
    schema = json.dumps(SCHEMA)
    options: Any = {"whitespace_flexible": False}
    compiles, masks = [], []
    bitmask = torch.zeros(1, (vocab + 31) // 32, dtype=torch.int32)
    for _ in range(repeat):
        matcher, seconds = timed(
            lambda: LLMatcher(llt, LLMatcher.grammar_from_json_schema(schema, overrides=options), log_level=0)
        )
        compiles.append(seconds)
        for token in tokens:
            start = time.perf_counter()
            matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)
            masks.append(time.perf_counter() - start)
            assert matcher.consume_token(token), matcher.get_error()
    return {"setup": setup, "compile": statistics.median(compiles), "mask": statistics.median(masks)}


def bench_xgrammar(hf: Any, vocab: int, tokens: list[int], repeat: int) -> dict[str, float]:
    import xgrammar as xgr

    info, setup = timed(lambda: xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab))
    compiles, masks = [], []
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    schema = json.dumps(SCHEMA)
    for _ in range(repeat):
        compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        start = time.perf_counter()
        compiled = compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))
        compiles.append(time.perf_counter() - start)
        matcher = xgr.GrammarMatcher(compiled)
        for token in tokens:
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask)
            masks.append(time.perf_counter() - start)
            assert matcher.accept_token(token)
    return {"setup": setup, "compile": statistics.median(compiles), "mask": statistics.median(masks)}


def requirements(dist: str) -> str:
    try:
        return ", ".join(sorted(r.split(";")[0].strip() for r in metadata.requires(dist) or [] if "extra" not in r))
    except metadata.PackageNotFoundError:
        return "not installed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    entry = ModelEntry(name="smollm2", source=DEFAULT_SOURCE, dtype="float32", device="cpu")
    loaded = load_model(entry, cache_dir=default_cache_dir())
    hf = AutoTokenizer.from_pretrained(loaded.weights_path)
    vocab = int(loaded.model.config.vocab_size)
    tokens = hf.encode(json.dumps(DOCUMENT, separators=(",", ":")), add_special_tokens=False)
    print(f"SmolLM2 tokenizer, vocab {vocab}; a {len(tokens)}-token JSON document; median of {args.repeat} runs")
    for name, bench in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar)):
        try:
            result = bench(hf, vocab, tokens, args.repeat)
        except ImportError:
            print(f"{name}: not installed")
            continue
        print(
            f"{name} {metadata.version(name)}: tokenizer tables {result['setup'] * 1e3:.0f} ms, "
            f"schema compile {result['compile'] * 1e3:.2f} ms, mask {result['mask'] * 1e6:.0f} us per token; "
            f"requires: {requirements(name) or 'nothing'}"
        )


if __name__ == "__main__":
    main()
