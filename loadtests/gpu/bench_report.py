"""The GPU benchmark's results as rows (one per model and batch size), the issue's targets met or not, and the two
files: bench.json for machines and bench.md for people."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loadtests.gpu.bench_paths import PATHS

if TYPE_CHECKING:
    from loadtests.gpu.bench import Model, Run

DECODE_GOAL = 1.5  # batch-1 decode step at most this many times the bandwidth limit, with CUDA graphs
THROUGHPUT_BATCH = 64
THROUGHPUT_GOAL = 10.0  # the engine's output tokens/s at THROUGHPUT_BATCH over generate's

HEADER = (
    "| model | batch | engine tok/s | generate tok/s | generate_batch tok/s | engine / generate | "
    "engine / generate_batch | decode step ms | bandwidth limit ms | step / limit | same tokens as generate / "
    "generate_batch | peak MiB engine / generate / generate_batch |\n" + "|---" * 12 + "|"
)
NOTES = (
    "Decode step: the mean wall time of the engine steps in which every request decoded one token. Its limit: all "
    "weights plus the KV of every request's context, read once at the measured copy bandwidth. Same tokens: the mean "
    "share of each request's output that matches before the first difference (random bf16 weights leave near-ties, "
    "so less than 1 there is no error)."
)


def tokens_per_s(run: Run | None) -> float | None:
    return run.output_tokens / run.seconds if run is not None and run.error is None and run.seconds > 0 else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def agreement(ours: Run | None, theirs: Run | None) -> float | None:
    """The mean share of each request's output that matches the other path's before the first difference."""
    if ours is None or theirs is None or ours.error or theirs.error or len(ours.tokens) != len(theirs.tokens):
        return None
    shares = []
    for a, b in zip(ours.tokens, theirs.tokens, strict=True):
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        shares.append(same / max(len(a), len(b), 1))
    return sum(shares) / len(shares) if shares else None


def row(model: Model, batch: int, copy_bytes_per_s: float) -> dict[str, Any]:
    runs: dict[str, Run] = {run.path: run for run in model.runs if run.batch == batch}
    engine, generate, generate_batch = (runs.get(path) for path in PATHS)
    speeds = {path: tokens_per_s(runs.get(path)) for path in PATHS}
    limit_ms = 1000 * engine.decode_bytes / copy_bytes_per_s if engine and engine.decode_bytes else None
    same_weights = len(set(model.checksums)) <= 1  # the engine and the baselines ran on separate builds
    step_ms = engine.decode_step_ms if engine and engine.error is None else None
    return {
        "model": model.name,
        "batch": batch,
        **{f"{path}_tok_s": speed for path, speed in speeds.items()},
        "engine_vs_generate": ratio(speeds["engine"], speeds["generate"]),
        "engine_vs_generate_batch": ratio(speeds["engine"], speeds["generate_batch"]),
        "decode_steps": engine.decode_steps if engine else 0,
        "decode_step_ms": step_ms,
        "decode_limit_ms": limit_ms,
        "decode_vs_limit": ratio(step_ms, limit_ms),
        "same_as_generate": agreement(engine, generate) if same_weights else None,
        "same_as_generate_batch": agreement(engine, generate_batch) if same_weights else None,
        **{
            f"{path}_peak_mib": run.peak_mib if run and run.error is None else None
            for path, run in zip(PATHS, (engine, generate, generate_batch), strict=True)
        },
        "errors": {path: run.error for path, run in runs.items() if run.error is not None},
    }


def targets(rows: list[dict[str, Any]], cuda_graphs: bool) -> list[dict[str, Any]]:
    """Each model's two targets: `met` is None where the row was not measured."""
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        by_batch = {r["batch"]: r for r in rows if r["model"] == name}
        decode = by_batch.get(1, {}).get("decode_vs_limit")
        out.append(
            {
                "id": "batch1_decode",
                "target": f"batch-1 decode step within {DECODE_GOAL}x of the bandwidth limit, with CUDA graphs",
                "model": name,
                "value": decode,
                "met": None if decode is None else decode <= DECODE_GOAL and cuda_graphs,
                "note": f"engine CUDA graphs {'on' if cuda_graphs else 'off'}",
            }
        )
        speedup = by_batch.get(THROUGHPUT_BATCH, {}).get("engine_vs_generate")
        out.append(
            {
                "id": f"batch{THROUGHPUT_BATCH}_throughput",
                "target": f"batch {THROUGHPUT_BATCH} at least {THROUGHPUT_GOAL:.0f}x transformers' generate",
                "model": name,
                "value": speedup,
                "met": None if speedup is None else speedup >= THROUGHPUT_GOAL,
                "note": "output tokens/s",
            }
        )
    return out


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def markdown(meta: dict[str, Any], models: list[Model], rows: list[dict[str, Any]], goals: list[dict[str, Any]]) -> str:
    lines = [
        "# GPU benchmark",
        "",
        f"{meta['device']}, torch {meta['torch']} (CUDA {meta['cuda']}), transformers {meta['transformers']}, "
        f"{meta['dtype']}; prompts of {meta['prompt_len']} random tokens, {meta['output_len']} output tokens each "
        f"(EOS ignored); copy bandwidth {meta['copy_gb_s']:.1f} GB/s; engine CUDA graphs "
        f"{'on' if meta['engine_cuda_graphs'] else 'off'}; peak memory: {meta['peak_memory']}; "
        f"{meta['seconds']:.0f} s in all.",
        "",
        HEADER,
    ]
    for r in rows:
        peaks = " / ".join(fmt(r[f"{path}_peak_mib"], ".0f") for path in PATHS)
        lines.append(
            f"| {r['model']} | {r['batch']} | {fmt(r['engine_tok_s'])} | {fmt(r['generate_tok_s'])} | "
            f"{fmt(r['generate_batch_tok_s'])} | {times(r['engine_vs_generate'])} | "
            f"{times(r['engine_vs_generate_batch'])} | {fmt(r['decode_step_ms'], '.2f')} | "
            f"{fmt(r['decode_limit_ms'], '.2f')} | {times(r['decode_vs_limit'])} | "
            f"{fmt(r['same_as_generate'], '.2f')} / {fmt(r['same_as_generate_batch'], '.2f')} | {peaks} |"
        )
    lines += ["", NOTES, ""]
    for model in models:
        lines.append(
            f"- {model.name}: {model.parameters / 1e6:,.1f} M parameters ({model.weight_bytes / 2**20:,.1f} MiB), "
            f"KV {model.kv_bytes_per_token} bytes/token, engine blocks of {model.engine_block_size or '-'} tokens"
            + ("" if len(set(model.checksums)) <= 1 else "; its builds differed, so no same-token shares")
            + (f". Engine: {model.engine_paths}" if model.engine_paths else "")
        )
    lines += ["", "## Targets", "", "| target | model | measured | met |", "|---|---|---|---|"]
    for goal in goals:
        met = {True: "yes", False: "no", None: "not measured"}[goal["met"]]
        lines.append(f"| {goal['target']} | {goal['model']} | {times(goal['value'])} ({goal['note']}) | {met} |")
    errors = [f"- {r['model']} batch {r['batch']} {path}: {error}" for r in rows for path, error in r["errors"].items()]
    if errors:
        lines += ["", "## Errors", "", *errors]
    return "\n".join(lines) + "\n"


def summary(model: Model) -> dict[str, Any]:
    """The model's sizes and every run's raw numbers, without the output tokens."""
    runs = [{k: v for k, v in vars(run).items() if k != "tokens"} for run in model.runs]
    return {**{k: v for k, v in vars(model).items() if k != "runs"}, "config": str(model.config), "runs": runs}


def write(out: Path, meta: dict[str, Any], models: list[Model]) -> str:
    """Write out/bench.json and out/bench.md; return the markdown."""
    rows = [row(model, batch, meta["copy_gb_s"] * 1e9) for model in models for batch in meta["batches"]]
    goals = targets(rows, bool(meta["engine_cuda_graphs"]))
    document = {**meta, "rows": rows, "targets": goals, "models": [summary(model) for model in models]}
    (out / "bench.json").write_text(json.dumps(document, indent=2) + "\n")
    text = markdown(meta, models, rows, goals)
    (out / "bench.md").write_text(text)
    return text
