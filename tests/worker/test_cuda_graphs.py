"""Decode graphs: padded static inputs give the eager step's logits, and an engine replaying them still equals
transformers' `generate`. On the CPU the graphs run eagerly over the same static buffers and padding (what capture
would bake in); the tests marked gpu capture real CUDA graphs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import cast

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from tests.worker.engine_harness import make_engine, random_prompts, reference, run_all
from worker.cuda_graphs import DecodeGraphs, DecodeInputs, capture_sizes, table_widths
from worker.messages import SamplingParams
from worker.model_runner import BatchItem, ModelRunner

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
on_cuda = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request: pytest.FixtureRequest) -> PreTrainedModel:
    path: Path = request.getfixturevalue(f"tiny_{request.param}_dir")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_the_ladders() -> None:
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert capture_sizes(5) == [1, 2, 4, 5]
    assert capture_sizes(4096)[-1] == 256
    assert table_widths(256, 16, reads_lengths=True) == [256]
    assert table_widths(256, 16, reads_lengths=False) == [16, 64, 256]
    assert table_widths(300, 16, reads_lengths=False) == [16, 64, 256, 300]
    assert table_widths(10, 16, reads_lengths=False) == [10]


def test_graphs_that_would_gather_too_much_are_not_captured() -> None:
    def forward(inputs: DecodeInputs) -> torch.Tensor:
        return torch.zeros(inputs.ids.shape[0], 10)

    graphs = DecodeGraphs(
        forward,
        sizes=[1, 8, 64],
        widths=[16, 64, 256],
        block_size=16,
        scratch_block=0,
        vocab_size=10,
        device=torch.device("cpu"),
        capture=False,
        max_gathered_tokens=64 * 16 * 16,  # 64 rows of 16 blocks
    )
    assert graphs.shapes == [(1, 16), (1, 64), (1, 256), (8, 16), (8, 64), (64, 16)]
    assert graphs.fits(40, 10) == (64, 16)
    assert graphs.fits(40, 17) is None  # 64 rows of 64 blocks: eager
    assert graphs.fits(5, 17) == (8, 64)
    assert graphs.fits(65, 1) is None


def prefilled(model: PreTrainedModel, device: torch.device, native: bool) -> ModelRunner:
    """A runner on `device` whose cache holds three prompts (5, 9 and 14 tokens, blocks 0-2, 3-5, 6-9)."""
    runner = ModelRunner(copy.deepcopy(model).to(device), num_blocks=16, block_size=4, device=device)  # type: ignore[arg-type]
    runner.native_decode = runner.native_decode and native
    runner.execute(
        [
            BatchItem(list(range(3, 8)), 0, [0, 1, 2], True),
            BatchItem(list(range(10, 19)), 0, [3, 4, 5], True),
            BatchItem(list(range(20, 34)), 0, [6, 7, 8, 9], True),
        ]
    )
    return runner


DECODES = [
    BatchItem([40], 5, [0, 1, 2], True),
    BatchItem([41], 9, [3, 4, 5], True),
    BatchItem([42], 14, [6, 7, 8, 9], True),
]


def assert_replay_equals_eager(model: PreTrainedModel, device: torch.device, native: bool, capture: bool) -> None:
    eager, graphed = prefilled(model, device, native), prefilled(model, device, native)
    graphed.capture_decode_graphs(max_num_seqs=8, max_model_len=1024, capture=capture)
    assert graphed.graphs is not None
    scratch = graphed.scratch_block
    for k, v in graphed.kv_caches:  # a mark the padding rows must overwrite, and the real rows must never read
        k[:, scratch].fill_(7.0)
        v[:, scratch].fill_(7.0)
    for step in range(2):  # the second step reads what the first wrote through the graph
        items = [BatchItem([t + step], n + step, table, True) for (t,), n, table, _ in map(astuple, DECODES)]
        want = eager.execute(items)
        got = graphed.execute(items)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert graphed.graphs.replays == 2
    for (eager_k, eager_v), (graph_k, graph_v) in zip(eager.kv_caches, graphed.kv_caches, strict=True):
        torch.testing.assert_close(graph_k[:, :scratch], eager_k[:, :scratch], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(graph_v[:, :scratch], eager_v[:, :scratch], rtol=1e-5, atol=1e-5)
    # three rows ran as a batch of 4: the padding row wrote its K/V to the scratch block's first slot, nowhere else
    for k, v in graphed.kv_caches:
        assert not bool((k[:, scratch, 0] == 7.0).any()) and bool((k[:, scratch, 1:] == 7.0).all())
        assert not bool((v[:, scratch, 0] == 7.0).any()) and bool((v[:, scratch, 1:] == 7.0).all())


def astuple(item: BatchItem) -> tuple[list[int], int, list[int], bool]:
    return item.token_ids, item.num_computed, item.block_table, item.sample


@pytest.mark.parametrize("native", [True, False], ids=["length-reading-attention", "gathered-blocks-attention"])
def test_padded_static_decode_equals_the_eager_step(model: PreTrainedModel, native: bool) -> None:
    assert_replay_equals_eager(model, torch.device("cpu"), native, capture=False)


def test_prefills_and_oversized_batches_run_eagerly(model: PreTrainedModel) -> None:
    runner = prefilled(model, torch.device("cpu"), native=True)
    runner.capture_decode_graphs(max_num_seqs=2, max_model_len=64, capture=False)
    assert runner.graphs is not None
    runner.execute(DECODES)  # three decodes: more rows than the largest graph (2)
    runner.execute([BatchItem([7, 8], 6, [0, 1, 2], True)])  # a prefill chunk
    assert runner.graphs.replays == 0
    runner.execute(DECODES[:2])
    assert runner.graphs.replays == 1


def test_an_engine_replaying_decode_graphs_equals_generate(model: PreTrainedModel) -> None:
    prompts = random_prompts(int(model.config.vocab_size), [1, 3, 7, 12, 16, 23])
    engine = make_engine(model, max_num_seqs=6)
    engine.runner.capture_decode_graphs(max_num_seqs=6, max_model_len=engine.max_model_len, capture=False)
    got = run_all(engine, prompts, GREEDY).tokens
    assert got == {rid: reference(model, prompt, GREEDY.max_tokens) for rid, prompt in prompts.items()}
    assert engine.runner.graphs is not None and engine.runner.graphs.replays > GREEDY.max_tokens // 2


@pytest.mark.parametrize("native", [False], ids=["gathered-blocks-attention"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_cuda_graphs_equal_the_eager_step(model: PreTrainedModel, native: bool) -> None:
    assert_replay_equals_eager(model, torch.device("cuda"), native, capture=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_engine_on_cuda_with_captured_graphs_equals_generate(model: PreTrainedModel) -> None:
    on_device = cast(PreTrainedModel, copy.deepcopy(model).to("cuda"))  # type: ignore[arg-type]
    prompts = random_prompts(int(model.config.vocab_size), [1, 3, 7, 12, 16, 23])
    engine = make_engine(on_device, max_num_seqs=6)
    assert engine.runner.graphs is not None, "an engine on CUDA captures decode graphs at start"
    got = run_all(engine, prompts, GREEDY).tokens
    assert got == {rid: reference(on_device, prompt, GREEDY.max_tokens) for rid, prompt in prompts.items()}
    assert engine.runner.graphs.replays > GREEDY.max_tokens // 2


@pytest.mark.parametrize("native", [True, False], ids=["length-reading-attention", "gathered-blocks-attention"])
def test_decode_graphs_under_preemption_and_prefix_hits_equal_generate(model: PreTrainedModel, native: bool) -> None:
    """Requests preempted and recomputed, prefixes taken from the cache, batches shrinking as requests end: every
    decode step of whatever size replays a padded graph, and the outputs stay generate's."""
    vocab = int(model.config.vocab_size)
    shared = random_prompts(vocab, [12], seed=7)["r0"]
    prompts = random_prompts(vocab, [3, 9, 17, 30, 5, 21, 40, 1], seed=8, prefix=shared)
    engine = make_engine(model, num_blocks=24, block_size=4, max_num_seqs=8)  # 96 slots for 8 requests of up to 72
    engine.runner.native_decode = engine.runner.native_decode and native
    engine.runner.capture_decode_graphs(max_num_seqs=8, max_model_len=engine.max_model_len, capture=False)
    params = SamplingParams(max_tokens=20, temperature=0.0)
    run = run_all(engine, prompts, params)
    assert run.tokens == {rid: reference(model, prompt, params.max_tokens) for rid, prompt in prompts.items()}
    stats = run.steps[-1].stats
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert engine.runner.graphs is not None and engine.runner.graphs.replays > 10
    assert engine.block_manager.num_used_blocks == 0
