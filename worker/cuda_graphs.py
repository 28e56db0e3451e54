"""CUDA graphs for decode-only steps: captured at start for a ladder of batch sizes, replayed with the batch padded up
to the next captured size.

A decode step at small batch on a GPU is bound by kernel launches, not by the GPU: a 16-layer model launches several
hundred kernels a step, each costing microseconds of CPU time. A graph replays them all in one launch. Capture bakes
in every tensor's address, so a graph reads its inputs from static buffers that each step fills, and writes its
logits into one static output. Rows past the real batch are padding: token 0 at position 0, its K/V written to a
scratch block no sequence owns, attending to that block alone.

Attention that reads each sequence's length (flash-attn, the CPU kernel) is captured at one table width, the model's
longest context. Attention over gathered blocks reads every block of the table, so it is captured at a few widths
(each four times the last), only as far as the rows times the width stay within a bound on gathered tokens, and a
step replays the narrowest that holds its longest sequence; wider steps run eagerly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger("tokenmill.cuda_graphs")

# Batch sizes captured, as far as max_num_seqs; larger decode batches run eagerly.
CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)
NARROWEST_WIDTH = 256  # tokens: the narrowest table of attention that reads whole tables
WIDTH_FACTOR = 4


@dataclass
class DecodeInputs:
    """What a decode step feeds the model, one row per sequence: its new token, that token's position and cache
    slot, its block table and its length (cached tokens, the new one included)."""

    ids: torch.Tensor  # [N] long
    positions: torch.Tensor  # [N] long
    slots: torch.Tensor  # [N] long
    tables: torch.Tensor  # [N, W] long
    lengths: torch.Tensor  # [N] long

    def view(self, size: int, width: int) -> DecodeInputs:
        return DecodeInputs(
            self.ids[:size], self.positions[:size], self.slots[:size], self.tables[:size, :width], self.lengths[:size]
        )


# The model's decode step over static inputs: logits [rows, vocab], with no host sync and no shape taken from data.
DecodeForward = Callable[[DecodeInputs], torch.Tensor]


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [size for size in CAPTURE_SIZES if size < max_num_seqs]
    return [*sizes, min(max_num_seqs, CAPTURE_SIZES[-1])]


def table_widths(max_blocks: int, block_size: int, reads_lengths: bool) -> list[int]:
    """Table widths (in blocks) to capture: the longest alone where attention stops at each length, else a ladder."""
    if reads_lengths:
        return [max_blocks]
    widths = []
    width = -(-NARROWEST_WIDTH // block_size)
    while width < max_blocks:
        widths.append(width)
        width *= WIDTH_FACTOR
    return [*widths, max_blocks]


class DecodeGraphs:
    """One graph per (batch size, table width); `run` pads a decode batch into the smallest that holds it.

    `capture=False` builds the same static buffers and padding but runs the forward eagerly on each replay: the CPU
    has no graphs, and tests prove the padding and the static inputs there."""

    def __init__(
        self,
        forward: DecodeForward,
        *,
        sizes: Sequence[int],
        widths: Sequence[int],
        block_size: int,
        scratch_block: int,
        vocab_size: int,
        device: torch.device,
        capture: bool = True,
        max_gathered_tokens: int | None = None,
    ) -> None:
        """`max_gathered_tokens`: capture no graph whose rows times table width (in tokens) exceed it."""
        self.forward = forward
        self.sizes = sorted(sizes)
        self.widths = sorted(widths)
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.device = device
        self.shapes = [
            (size, width)
            for size in self.sizes
            for width in self.widths
            if max_gathered_tokens is None or size * width * block_size <= max_gathered_tokens
        ]
        rows, width = self.sizes[-1], self.widths[-1]
        self.inputs = DecodeInputs(
            torch.zeros(rows, dtype=torch.long, device=device),
            torch.zeros(rows, dtype=torch.long, device=device),
            torch.zeros(rows, dtype=torch.long, device=device),
            torch.zeros(rows, width, dtype=torch.long, device=device),
            torch.ones(rows, dtype=torch.long, device=device),
        )
        self.logits = torch.zeros(rows, vocab_size, dtype=torch.float32, device=device)
        pin = device.type == "cuda"
        # One host staging tensor for the four per-row inputs, so a step copies them in one transfer.
        self._host_rows = torch.zeros(4, rows, dtype=torch.long, pin_memory=pin)
        self._host_tables = torch.zeros(rows, width, dtype=torch.long, pin_memory=pin)
        self._replays: dict[tuple[int, int], Callable[[], None]] = {}
        self.capture_seconds = 0.0
        self.capture_bytes = 0
        self.replays = 0  # steps served by a graph
        if capture:
            self._capture()
        else:
            for size, width in self.shapes:
                self._replays[size, width] = self._eager(size, width)

    def _eager(self, size: int, width: int) -> Callable[[], None]:
        view = self.inputs.view(size, width)

        def replay() -> None:
            self.logits[:size].copy_(self.forward(view))

        return replay

    def _capture(self) -> None:
        start = time.perf_counter()
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_reserved(self.device)
        pool = torch.cuda.graph_pool_handle()
        self._pad(0, self.sizes[-1], self.widths[-1])
        # Largest first: later, smaller graphs reuse the pool's memory.
        for size, width in reversed(self.shapes):
            eager = self._eager(size, width)
            side = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                eager()  # warm-up outside the graph: lazy initializations and allocator growth
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                eager()
            self._replays[size, width] = graph.replay
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - start
        self.capture_bytes = torch.cuda.memory_reserved(self.device) - before
        log.info(
            "captured %d decode graphs (batch sizes %s, table widths %s blocks) in %.1f s, %.0f MiB",
            len(self._replays),
            self.sizes,
            self.widths,
            self.capture_seconds,
            self.capture_bytes / 2**20,
        )

    def fits(self, batch: int, blocks: int) -> tuple[int, int] | None:
        """The captured (size, width) a batch of `batch` rows whose longest table has `blocks` blocks replays."""
        size = next((s for s in self.sizes if s >= batch), None)
        width = next((w for w in self.widths if w >= blocks), None)
        if size is None or width is None or (size, width) not in self._replays:
            return None
        return size, width

    def run(
        self, tokens: Sequence[int], positions: Sequence[int], tables: Sequence[Sequence[int]]
    ) -> torch.Tensor | None:
        """Logits [batch, vocab] of one decode step (a new tensor), or None when no captured graph holds the batch.
        Row i feeds `tokens[i]` at `positions[i]` with block table `tables[i]`."""
        batch = len(tokens)
        bs = self.block_size
        blocks = max(p // bs + 1 for p in positions)
        fit = self.fits(batch, blocks)
        if fit is None:
            return None
        size, width = fit
        # The host buffers are free to write: the previous step's copies were done when its tokens reached the host.
        rows, host_tables = self._host_rows.numpy(), self._host_tables.numpy()
        rows[0, :batch] = tokens
        rows[1, :batch] = positions
        for row, (table, position) in enumerate(zip(tables, positions, strict=True)):
            used = position // bs + 1
            host_tables[row, :used] = table[:used]
            host_tables[row, used:width] = 0  # past the length: never attended to
            rows[2, row] = table[position // bs] * bs + position % bs
        rows[3, :batch] = rows[1, :batch] + 1
        static = self.inputs
        targets = (static.ids, static.positions, static.slots, static.lengths)
        for target, source in zip(targets, self._host_rows, strict=True):
            target[:batch].copy_(source[:batch], non_blocking=True)
        static.tables[:batch, :width].copy_(self._host_tables[:batch, :width], non_blocking=True)
        self._pad(batch, size, width)
        self._replays[size, width]()
        self.replays += 1
        return self.logits[:batch].clone()

    def _pad(self, start: int, end: int, width: int) -> None:
        """Rows [start, end) become padding: token 0 at position 0, in the scratch block, attending to it alone."""
        if start >= end:
            return
        static = self.inputs
        static.ids[start:end] = 0
        static.positions[start:end] = 0
        static.slots[start:end] = self.scratch_block * self.block_size
        static.lengths[start:end] = 1
        static.tables[start:end, :width] = 0
        static.tables[start:end, 0] = self.scratch_block
