"""Speculative decoding by prompt lookup (n-gram drafts, no draft model), with and without, on tokenmill and on
llama.cpp's llama-server, for SmolLM2-135M-Instruct with natural outputs: temperature 0, `--max-tokens` (256) at most,
no ignore_eos, completion tokens counted from each reply's `usage`.

Two workloads. Input-grounded chat prompts make the model quote its input: rewrite a generated 40-80 line Python file
with one function renamed, extract fields of a few orders as JSON, continue a list whose pattern the prompt shows
(built from a seed, several of each kind). Open-ended prompts are short questions. The share of each reply's word
4-grams found in its prompt is printed: the input-grounded replies must really quote for the comparison to mean
anything.

Levels: the input-grounded workload at each `--concurrency`, the open-ended one at each `--open-concurrency`. A
level reports output tokens/s over its whole wall time (completion tokens summed / seconds), TTFT p50, and where the
server speculates, the share of drafted tokens accepted and the accepted tokens per draft, from the servers' own
counters on /metrics read before and after the level (tokenmill_spec_decode_*_total{model_name}; llama-server's
llamacpp:spec_decode_*_total with --metrics, whose drafts are its verification steps; else the draft counts in its
replies' `timings`). Each configuration is also given as a ratio to the same server without speculation.

Servers run one at a time, each started, measured and stopped: tokenmill with a registry of one entry per
configuration (`speculative: {method: none}`, then `{method: ngram, num_tokens: K}` for each `--num-tokens`), and
llama-server (`python -m loadtests.peers.llama_cpp install`) on the F32 GGUF of the same weights, without and with each
`--llama-spec` (a string of flags appended to its command line; by default its best draftless setting here, chosen by
a sweep of its n-gram types on the input-grounded workload at c=1: see loadtests/results/bench_spec.txt).

    python -m loadtests.bench_spec [--servers tokenmill llama.cpp] [--concurrency 1 32] [--open-concurrency 1]
        [--num-tokens 3 4 5] [--requests 9] [--out loadtests/results/bench_spec.txt]
        [--json loadtests/results/bench_spec.json] [--replies replies.jsonl]
    python -m loadtests.bench_spec --servers llama.cpp --concurrency 1 --open-concurrency \
        --llama-spec "--spec-type ngram-simple" "--spec-type ngram-mod"   # a sweep of llama-server's settings
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import yaml

from loadtests.bench_server import tokenmill
from loadtests.load import percentile
from loadtests.peers import cache_dir, llama_cpp
from loadtests.peers.server import Server, serving
from worker.registry import DEFAULT_SOURCE, ModelEntry

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 2026
QUOTE_N = 4  # word n-grams of a reply looked up in its prompt
# llama-server's draftless n-gram speculation: its best setting on the input-grounded workload at c=1 here
LLAMA_SPEC = "--spec-type ngram-mod --spec-ngram-mod-n-match 8 --spec-ngram-mod-n-min 4 --spec-ngram-mod-n-max 16"
COUNTERS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")
TOKENMILL_COUNTERS = "tokenmill_spec_decode_"  # with model_name
LLAMA_COUNTERS = "llamacpp:spec_decode_"  # llama-server --metrics; num_drafts counts its verification steps
LLAMA_CONTEXT = 65536  # tokens of KV cache, shared by the 32 slots (--kv-unified)
OFF = "off"

# ---------------------------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class Prompt:
    kind: str  # rewrite | extract | continue | open
    text: str


_VERBS = ["load", "parse", "compute", "render", "merge", "filter", "validate", "encode", "resolve", "collect"]
_NOUNS = ["record", "invoice", "config", "token", "order", "user", "schedule", "report", "packet", "account"]
_NEW_VERBS = ["fetch", "build", "check", "convert", "gather", "assemble", "inspect", "normalize"]

_BODIES = [
    [
        "result = []",
        "for item in {arg}:",
        "    if item is not None:",
        "        result.append(item)",
        "return result",
    ],
    [
        "total = 0",
        "for value in {arg}:",
        "    total += value * {k}",
        "if total > {limit}:",
        "    total = {limit}",
        "return total",
    ],
    [
        "if not {arg}:",
        '    raise ValueError("empty {noun}")',
        "cleaned = {arg}.strip().lower()",
        "parts = cleaned.split(',')",
        "return [part.strip() for part in parts if part]",
    ],
    [
        "counts = {{}}",
        "for key in {arg}:",
        "    counts[key] = counts.get(key, 0) + 1",
        "ordered = sorted(counts.items(), key=lambda pair: pair[1], reverse=True)",
        "return ordered[:{k}]",
    ],
    [
        "lines = []",
        "for index, entry in enumerate({arg}):",
        '    lines.append(f"{{index}}: {{entry}}")',
        'return "\\n".join(lines)',
    ],
    [
        "try:",
        "    value = int({arg})",
        "except (TypeError, ValueError):",
        "    return {limit}",
        "return max(0, min(value, {limit}))",
    ],
]


def _function(name: str, noun: str, body: list[str], rng: random.Random, callee: str | None) -> list[str]:
    arg = f"{noun}s" if rng.random() < 0.5 else f"raw_{noun}"
    lines = [f"def {name}({arg}):", f'    """{name.replace("_", " ").capitalize()} for each {noun}."""']
    if callee is not None:  # calls another function of the file, so a rename has uses to follow
        lines.append(f"    {arg} = {callee}({arg})")
    fill = {"arg": arg, "noun": noun, "k": rng.randint(2, 9), "limit": rng.choice([10, 100, 255, 1000])}
    lines += [f"    {line.format(**fill)}" for line in body]
    return [*lines, "", ""]


def code_file(rng: random.Random) -> tuple[str, list[str], list[str]]:
    """A Python module of 40-80 lines from templates; the names of its functions, and of those it calls."""
    names = [f"{verb}_{rng.choice(_NOUNS)}" for verb in rng.sample(_VERBS, rng.randint(5, 6))]
    lines = [f'"""Helpers for the {rng.choice(_NOUNS)} service."""', "", "import os", "import sys", "", ""]
    called = []
    for index, name in enumerate(names):
        callee = names[index - 1] if index and rng.random() < 0.6 else None
        called += [callee] if callee else []
        lines += _function(name, name.split("_", 1)[1], rng.choice(_BODIES), rng, callee)
    lines += ['if __name__ == "__main__":', f"    print({names[-1]}(sys.argv[1:]))"]
    return "\n".join(lines) + "\n", names, [*called, names[-1]]


def rewrite_prompt(rng: random.Random) -> Prompt:
    """A generated module and the instruction to rename one of its functions that is called (the reply is the file
    again, changed in a few places)."""
    source, _, called = code_file(rng)
    old = rng.choice(called)
    new = f"{rng.choice(_NEW_VERBS)}_{old.split('_', 1)[1]}"
    text = (
        f"Rename the function `{old}` to `{new}` everywhere in this Python file, including where it is called. "
        "Change nothing else. Reply with the complete updated file in one Python code block.\n\n"
        f"```python\n{source}```"
    )
    return Prompt("rewrite", text)


_FIRST = ["Maria", "James", "Aiko", "Olu", "Priya", "Lars", "Chen", "Fatima", "Diego", "Nora", "Ivan", "Zoe"]
_LAST = ["Lopez", "Smith", "Tanaka", "Adeyemi", "Sharma", "Nilsson", "Wei", "Haddad", "Ruiz", "Berg", "Petrov"]
_CITIES = ["Springfield", "Riverton", "Lakeside", "Fairview", "Greenville", "Milford", "Ashland", "Clayton"]
_PRODUCTS = ["Blue Widget", "Steel Bracket", "Desk Lamp", "USB Cable", "Garden Hose", "Coffee Grinder", "Notebook"]


def extract_prompt(rng: random.Random) -> Prompt:
    """A few orders told in prose; the reply lists their fields as JSON."""
    orders = []
    for _ in range(rng.randint(3, 4)):
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        order = {
            "name": f"{first} {last}",
            "email": f"{first.lower()}.{last.lower()}@example.com",
            "city": rng.choice(_CITIES),
            "order_id": f"A-{rng.randint(10000, 99999)}",
            "product": rng.choice(_PRODUCTS),
            "quantity": rng.randint(1, 12),
            "unit_price": f"{rng.randint(2, 90)}.{rng.choice(['00', '25', '50', '99'])}",
        }
        orders.append(
            f"{order['name']} ({order['email']}), who lives in {order['city']}, placed order {order['order_id']} "
            f"for {order['quantity']} x {order['product']} at ${order['unit_price']} each."
        )
    text = (
        "Extract every order below as a JSON array of objects with the keys name, email, city, order_id, product, "
        "quantity and unit_price, copying the values exactly as written. Reply with the JSON only.\n\n"
        + "\n".join(orders)
    )
    return Prompt("extract", text)


def continue_prompt(rng: random.Random) -> Prompt:
    """A numbered list with a fixed pattern (the ten first entries); the reply continues it."""
    zone = rng.choice(["eu-west", "us-east", "ap-south", "sa-east"])
    role = rng.choice(["web", "db", "cache", "queue", "worker"])
    start, port = rng.randint(1, 40), rng.choice([8000, 9000, 5432, 6379])
    entries = [
        f"{i + 1}. host {role}-{start + i:03d}.{zone}.internal, port {port + start + i}, zone {zone}, "
        f"role {role}, status healthy"
        for i in range(10)
    ]
    text = (
        f"Here is the start of an inventory of {role} servers:\n\n" + "\n".join(entries) + "\n\n"
        "Continue the list with the next ten entries, numbered on, in exactly the same format. Reply with the "
        "entries only."
    )
    return Prompt("continue", text)


BUILDERS = (rewrite_prompt, extract_prompt, continue_prompt)


def grounded_prompts(count: int, seed: int = SEED) -> list[Prompt]:
    """`count` input-grounded prompts, the kinds in turn, each from its own seeded generator (the same every run)."""
    return [BUILDERS[i % len(BUILDERS)](random.Random(seed * 1000 + i)) for i in range(count)]


_QUESTIONS = [
    "Why is the sky blue?",
    "What should I pack for a weekend hiking trip?",
    "How do vaccines train the immune system?",
    "What are good habits for learning a new language?",
    "Why do cats purr?",
    "How does a bicycle stay upright?",
    "What makes a good cup of coffee?",
    "Give me three ideas for a birthday party.",
    "Why do leaves change color in autumn?",
    "How can I sleep better?",
    "What is the difference between weather and climate?",
    "How do bees make honey?",
    "Suggest a name for a small bakery and explain it.",
    "Why is exercise good for the brain?",
    "What are the rules of chess in short?",
    "How do airplanes fly?",
]
_STYLES = ["", " Answer briefly.", " Explain it to a child.", " Answer in a few sentences."]


def open_prompts(count: int, seed: int = SEED) -> list[Prompt]:
    """`count` short open-ended questions (distinct up to 64), in a seeded order."""
    pool = [q + style for style in _STYLES for q in _QUESTIONS]
    random.Random(seed).shuffle(pool)
    return [Prompt("open", pool[i % len(pool)]) for i in range(count)]


# ---------------------------------------------------------------------------------------------------------------
# Arithmetic


_WORD = re.compile(r"\w+")


def ngrams(text: str, n: int = QUOTE_N) -> list[tuple[str, ...]]:
    """The text's n-grams of words (runs of letters, digits and underscores: punctuation and layout aside)."""
    words = _WORD.findall(text)
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def quoted_fraction(prompt: str, reply: str, n: int = QUOTE_N) -> float | None:
    """The share of the reply's word n-grams that occur in the prompt (None: the reply has fewer than n words)."""
    grams = ngrams(reply, n)
    if not grams:
        return None
    seen = set(ngrams(prompt, n))
    return sum(gram in seen for gram in grams) / len(grams)


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")


def counter(metrics: str, name: str, model: str | None = None) -> float | None:
    """The value of counter `name` (for `model_name="model"`, given a model) in a Prometheus text exposition (None:
    absent)."""
    for line in metrics.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match["name"] != name:
            continue
        if model is None or f'model_name="{model}"' in (match["labels"] or "").split(","):
            return float(match["value"])
    return None


def spec_counters(metrics: str, prefix: str, model: str | None = None) -> dict[str, float] | None:
    """The speculative-decoding counters `{prefix}{key}_total` (tokenmill's `tokenmill_spec_decode_` for `model`,
    llama-server's `llamacpp:spec_decode_`); None where the server exports them not all."""
    values = {key: counter(metrics, f"{prefix}{key}_total", model) for key in COUNTERS}
    if any(value is None for value in values.values()):
        return None
    return {key: float(value or 0.0) for key, value in values.items()}


@dataclass(frozen=True)
class Drafts:
    drafts: float | None  # None: the server does not say how many drafts it made
    draft_tokens: float
    accepted_tokens: float

    @property
    def acceptance(self) -> float | None:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def per_draft(self) -> float | None:
        return self.accepted_tokens / self.drafts if self.drafts else None


def counter_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> Drafts | None:
    if before is None or after is None:
        return None
    diff = {key: after[key] - before[key] for key in COUNTERS}
    return Drafts(diff["num_drafts"], diff["num_draft_tokens"], diff["num_accepted_tokens"])


@dataclass
class Reply:
    ok: bool
    ttft: float = 0.0
    tokens: int = 0
    text: str = ""
    error: str = ""
    draft_tokens: int | None = None  # llama-server's timings
    accepted_tokens: int | None = None


@dataclass
class Level:
    server: str  # tokenmill | llama.cpp
    config: str  # e.g. OFF, "ngram k=4"
    workload: str  # grounded | open
    concurrency: int
    requests: int
    errors: int
    seconds: float
    completion_tokens: int
    ttft_p50: float
    quoted: float | None  # mean share of reply 4-grams found in the prompt
    finished_by_length: int = 0  # replies that ran to max_tokens
    drafts: Drafts | None = None
    baseline: float | None = None  # tokens/s of the same server without speculation at the same level
    by_kind: dict[str, float] = field(default_factory=dict)  # quoted share per prompt kind
    first_error: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def ratio(self) -> float | None:
        return self.tokens_per_s / self.baseline if self.baseline else None


def level_of(
    server: str,
    config: str,
    workload: str,
    concurrency: int,
    prompts: Sequence[Prompt],
    replies: Sequence[Reply],
    seconds: float,
    max_tokens: int,
    drafts: Drafts | None,
) -> Level:
    """A level's figures from its replies (in prompt order) and its wall time."""
    good = [(p, r) for p, r in zip(prompts, replies, strict=True) if r.ok]
    shares: dict[str, list[float]] = {}
    for prompt, reply in good:
        share = quoted_fraction(prompt.text, reply.text)
        if share is not None:
            shares.setdefault(prompt.kind, []).append(share)
    every = [s for values in shares.values() for s in values]
    if drafts is None and any(r.draft_tokens is not None for _, r in good):
        drafted = sum(r.draft_tokens or 0 for _, r in good)
        drafts = Drafts(None, drafted, sum(r.accepted_tokens or 0 for _, r in good))
    return Level(
        server=server,
        config=config,
        workload=workload,
        concurrency=concurrency,
        requests=len(replies),
        errors=len(replies) - len(good),
        seconds=seconds,
        completion_tokens=sum(r.tokens for _, r in good),
        ttft_p50=percentile([r.ttft for _, r in good], 0.5),
        quoted=sum(every) / len(every) if every else None,
        finished_by_length=sum(r.tokens >= max_tokens for _, r in good),
        drafts=drafts,
        by_kind={kind: sum(values) / len(values) for kind, values in sorted(shares.items())},
        first_error=next((r.error for r in replies if not r.ok), ""),
    )


def set_baselines(levels: list[Level]) -> None:
    """Each level's baseline: the tokens/s of its server's configuration without speculation at the same level."""
    off = {(lv.server, lv.workload, lv.concurrency): lv.tokens_per_s for lv in levels if lv.config == OFF}
    for lv in levels:
        lv.baseline = off.get((lv.server, lv.workload, lv.concurrency))


def _optional(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def table(levels: Sequence[Level]) -> list[str]:
    lines = [
        "| server | speculation | workload | c | requests | tokens | seconds | tok/s | vs off | TTFT p50 | "
        "accepted / drafted | accepted per draft | quoted |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in levels:
        drafts = lv.drafts
        lines.append(
            f"| {lv.server} | {lv.config} | {lv.workload} | {lv.concurrency} | {lv.requests - lv.errors}"
            f"{f' ({lv.errors} failed)' if lv.errors else ''} | {lv.completion_tokens} | {lv.seconds:.1f} | "
            f"{lv.tokens_per_s:.1f} | {_optional(lv.ratio, '.2f', 'x')} | {lv.ttft_p50 * 1000:.0f} ms | "
            f"{_optional(drafts.acceptance if drafts else None, '.0%')} | "
            f"{_optional(drafts.per_draft if drafts else None, '.2f')} | {_optional(lv.quoted, '.0%')} |"
        )
    return lines


def notes(levels: Sequence[Level]) -> list[str]:
    """What the table's columns leave out: how much the replies quote, by prompt kind, and early ends."""
    lines = [f"quoted: the share of a reply's word {QUOTE_N}-grams found in its prompt, by prompt kind:"]
    for lv in levels:
        if lv.by_kind:
            kinds = ", ".join(f"{kind} {share:.0%}" for kind, share in lv.by_kind.items())
            lines.append(f"- {lv.server} {lv.config}, {lv.workload} c={lv.concurrency}: {kinds}")
    lines.append("replies that ran to max_tokens: " + ", ".join(
        f"{lv.server} {lv.config} {lv.workload} c={lv.concurrency} {lv.finished_by_length}/{lv.requests}"
        for lv in levels
    ))  # fmt: skip
    return lines


def level_json(level: Level) -> dict[str, Any]:
    drafts = level.drafts
    return {
        **asdict(level),
        "tokens_per_s": level.tokens_per_s,
        "ratio": level.ratio,
        "acceptance": drafts.acceptance if drafts else None,
        "accepted_per_draft": drafts.per_draft if drafts else None,
    }


def cpu_model(cpuinfo: str | None = None) -> str:
    """The first processor's model name in /proc/cpuinfo, with its family and model numbers where given (a virtual
    machine's name is often generic)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return platform.processor() or "unknown CPU"
    fields: dict[str, str] = {}
    for line in cpuinfo.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


# ---------------------------------------------------------------------------------------------------------------
# Running


async def chat(session: aiohttp.ClientSession, model: str, prompt: Prompt, max_tokens: int) -> Reply:
    """One streamed chat completion at temperature 0: time to its first text, its text and its usage."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt.text}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    reply = Reply(ok=False)
    parts: list[str] = []
    usage = False
    start = time.perf_counter()
    try:
        async with session.post("/v1/chat/completions", json=body) as response:
            if response.status != 200:
                reply.error = f"HTTP {response.status}: {(await response.read())[:200]!r}"
                return reply
            async for raw in response.content:
                if not raw.startswith(b"data: {"):
                    continue
                chunk = json.loads(raw[6:])
                if chunk.get("usage"):
                    reply.tokens, usage = int(chunk["usage"]["completion_tokens"]), True
                timings = chunk.get("timings") or {}
                if "draft_n" in timings:  # llama-server, speculating
                    reply.draft_tokens = int(timings["draft_n"])
                    reply.accepted_tokens = int(timings.get("draft_n_accepted", 0))
                text = "".join(c.get("delta", {}).get("content") or "" for c in chunk.get("choices", []))
                if text:
                    if not parts:
                        reply.ttft = time.perf_counter() - start
                    parts.append(text)
        reply.text = "".join(parts)
        reply.ok = usage
        if not usage:
            reply.error = "no usage in the stream"
    except (aiohttp.ClientError, TimeoutError) as exc:
        reply.error = repr(exc)
    return reply


async def run_level(
    url: str, model: str, prompts: Sequence[Prompt], concurrency: int, max_tokens: int
) -> tuple[list[Reply], float]:
    """`concurrency` clients, each sending the next prompt when its last reply ends; replies in prompt order."""
    replies: list[Reply | None] = [None] * len(prompts)
    queue = iter(enumerate(prompts))
    connector = aiohttp.TCPConnector(limit=concurrency + 4, force_close=True)  # llama-server closes after a stream
    timeout = aiohttp.ClientTimeout(total=1800.0)
    async with aiohttp.ClientSession(base_url=url, connector=connector, timeout=timeout) as session:

        async def client() -> None:
            for index, prompt in queue:
                replies[index] = await chat(session, model, prompt, max_tokens)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return [r if r is not None else Reply(ok=False, error="not sent") for r in replies], seconds


def metrics_text(url: str) -> str:
    try:
        response = httpx.get(f"{url}/metrics", timeout=10)
    except httpx.HTTPError:
        return ""
    return response.text if response.status_code == 200 else ""


@dataclass(frozen=True)
class Plan:
    concurrency: tuple[int, ...]  # of the input-grounded workload
    open_concurrency: tuple[int, ...]
    requests: int  # at c=1; at c=C, max(requests, 2 C)
    max_tokens: int

    def levels(self) -> Iterator[tuple[str, int, list[Prompt]]]:
        for workload, levels in (("grounded", self.concurrency), ("open", self.open_concurrency)):
            for c in levels:
                count = max(self.requests, 2 * c)
                prompts = grounded_prompts(count) if workload == "grounded" else open_prompts(count)
                yield workload, c, prompts


@dataclass(frozen=True)
class Target:
    """One configuration of a running server: where its speculation counters are, if it has any."""

    server: str  # tokenmill | llama.cpp
    config: str
    url: str
    model: str
    prefix: str  # of its counters on /metrics
    label: bool  # whether they carry model_name


def measure(target: Target, plan: Plan, replies_log: Path | None = None) -> list[Level]:
    """Every level of `plan` against one running configuration, after two warm-up replies; each reply appended to
    `replies_log` (JSON lines), given one."""
    warmup = [*grounded_prompts(1, seed=SEED + 1), *open_prompts(1, seed=SEED + 1)]
    asyncio.run(run_level(target.url, target.model, warmup, 1, 32))
    model = target.model if target.label else None
    levels = []
    for workload, concurrency, prompts in plan.levels():
        before = spec_counters(metrics_text(target.url), target.prefix, model)
        replies, seconds = asyncio.run(run_level(target.url, target.model, prompts, concurrency, plan.max_tokens))
        after = spec_counters(metrics_text(target.url), target.prefix, model)
        level = level_of(
            target.server, target.config, workload, concurrency, prompts, replies, seconds, plan.max_tokens,
            counter_delta(before, after),
        )  # fmt: skip
        print(table([level])[-1], flush=True)
        if level.first_error:
            print(f"    first error: {level.first_error}", flush=True)
        levels.append(level)
        if replies_log is not None:
            with replies_log.open("a") as out:
                for prompt, reply in zip(prompts, replies, strict=True):
                    row = {"server": target.server, "config": target.config, "c": concurrency, "kind": prompt.kind}
                    out.write(json.dumps({**row, "tokens": reply.tokens, "reply": reply.text}) + "\n")
    return levels


def tokenmill_entries(num_tokens: Sequence[int], threads: int) -> list[tuple[str, dict[str, Any]]]:
    """(configuration, models.yaml entry) for speculation off and for each of `num_tokens`. Where the registry has no
    `speculative` field yet, the entry without speculation leaves it out and no speculating entry is made."""
    base: dict[str, Any] = {"source": DEFAULT_SOURCE, "threads": threads}
    if "speculative" not in ModelEntry.model_fields:
        return [(OFF, {"name": "smollm2-nospec", **base})]
    entries = [(OFF, {"name": "smollm2-nospec", **base, "speculative": {"method": "none"}})]
    for k in num_tokens:
        spec = {"method": "ngram", "num_tokens": k}
        entries.append((f"ngram num_tokens={k}", {"name": f"smollm2-spec{k}", **base, "speculative": spec}))
    return entries


def run_tokenmill(
    plan: Plan, num_tokens: Sequence[int], threads: int, port: int, replies_log: Path | None = None
) -> list[Level]:
    """A `tokenmill serve` of one entry for each configuration, one after the other."""
    levels = []
    for config, entry in tokenmill_entries(num_tokens, threads):
        with tempfile.TemporaryDirectory() as tmp:
            registry = Path(tmp) / "models.yaml"
            registry.write_text(yaml.safe_dump({"models": [entry]}))
            print(f"--- tokenmill {config}: {json.dumps(entry)}", flush=True)
            with tokenmill(port, "--models", str(registry)) as (url, _):
                if config != OFF and spec_counters(metrics_text(url), TOKENMILL_COUNTERS, entry["name"]) is None:
                    print("    no tokenmill_spec_decode_* counters on /metrics", flush=True)
                target = Target("tokenmill", config, url, entry["name"], TOKENMILL_COUNTERS, label=True)
                levels += measure(target, plan, replies_log)
    return levels


def llama_configs(spec: Sequence[str]) -> list[tuple[str, list[str]]]:
    """(configuration, flags): without speculation, then each of `spec` (a string of flags each; '' is none)."""
    configs: list[tuple[str, list[str]]] = [(OFF, [])]
    for flags in spec:
        words = shlex.split(flags)
        if words and " ".join(words) not in (name for name, _ in configs):
            configs.append((" ".join(words), words))
    return configs


def run_llama(plan: Plan, spec: Sequence[str], threads: int, port: int, replies_log: Path | None = None) -> list[Level]:
    """llama-server on the F32 GGUF without speculation and with each of `spec`, one after the other: `threads`
    threads, its KV cache unified with room for every slot's prompt and reply, /metrics on."""
    cache = cache_dir()
    if not llama_cpp.installed(cache):
        print("llama.cpp is not installed (python -m loadtests.peers.llama_cpp install): its rows are left out")
        return []
    f32 = next(s for s in llama_cpp.servers(cache, port) if s.name == f"{llama_cpp.NAME}-f32")
    common = ["-t", str(threads), "-tb", str(threads), "-c", str(LLAMA_CONTEXT), "--kv-unified", "--metrics"]
    levels = []
    for index, (config, flags) in enumerate(llama_configs(spec)):
        server = Server(f32.name, f32.weights, [*f32.command, *common, *flags], port)
        print(f"--- llama.cpp {config}: {shlex.join(server.command)}", flush=True)
        with serving(server, RESULTS / f"bench_spec.llama-server.{index}.log"):
            target = Target("llama.cpp", config, server.url, server.model, LLAMA_COUNTERS, label=False)
            levels += measure(target, plan, replies_log)
    return levels


_OPTION_ROW = re.compile(
    r"^\| `(?P<option>(?:-lc[sd], )?--(?:spec-type|spec-default|spec-ngram-[a-z0-9-]+|lookup-cache-[a-z]+)[^`]*)` \| "
    r"(?P<help>.*?) \|$"
)


def llama_spec_options(readme: str) -> list[str]:
    """llama-server's options for draftless speculation, from the options table of its tools/server/README.md (the
    type list, the n-gram types' settings, ngram-cache's files and --spec-default; removed options left out)."""
    options = []
    for line in readme.splitlines():
        match = _OPTION_ROW.match(line)
        if match and "has been removed" not in match["help"]:
            text = re.sub(r"<br/>\(env: [A-Z_]+\)", "", match["help"]).replace("<br/>", " ")
            options.append(f"- `{match['option']}`: {' '.join(text.split())}")
    return options


def header(argv: Sequence[str], plan: Plan, threads: int) -> list[str]:
    import torch

    from worker.loader import resolve_dtype

    dtype = str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    src = llama_cpp.find_sources(llama_cpp.home(cache_dir()))
    return [
        f"$ python -m loadtests.bench_spec {shlex.join(argv)}".rstrip(),
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {cpu_model()}; {len(os.sched_getaffinity(0))} cores; "
        f"torch {torch.__version__}; {threads} threads each server",
        f"SmolLM2-135M-Instruct: tokenmill from the shipped Q4_1 GGUF (dtype auto: {dtype} here), llama-server "
        f"({src.parents[1].name if src else 'not installed'}) on its F32 GGUF",
        f"chat, temperature 0, max_tokens {plan.max_tokens}, no ignore_eos (replies end where the model ends them); "
        f"{plan.requests} requests at c=1, 2 x c at c>1; tok/s = completion tokens (usage) / the level's wall time",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", nargs="+", choices=["tokenmill", "llama.cpp"], default=["tokenmill", "llama.cpp"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32], help="of the input-grounded workload")
    parser.add_argument("--open-concurrency", type=int, nargs="*", default=[1], help="of the open-ended workload")
    parser.add_argument("--num-tokens", type=int, nargs="*", default=[3, 4, 5], help="tokenmill's tokens a draft")
    parser.add_argument(
        "--llama-spec", nargs="*", default=[LLAMA_SPEC], help="llama-server's speculation flags, one string each"
    )
    parser.add_argument("--requests", type=int, default=9, help="requests of each workload at c=1")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--port", type=int, default=8730)
    parser.add_argument("--out", default=None, help="write the table here")
    parser.add_argument("--json", default=None, help="write the levels as JSON here")
    parser.add_argument("--replies", type=Path, default=None, help="append every reply here (JSON lines)")
    args = parser.parse_args(argv)
    # a TERM (a background run cannot be interrupted) still stops the server under test on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    plan = Plan(tuple(args.concurrency), tuple(args.open_concurrency), args.requests, args.max_tokens)
    lines = header(sys.argv[1:] if argv is None else argv, plan, args.threads)
    print("\n".join(lines), flush=True)
    levels: list[Level] = []
    if "tokenmill" in args.servers:
        levels += run_tokenmill(plan, args.num_tokens, args.threads, args.port, args.replies)
    if "llama.cpp" in args.servers:
        levels += run_llama(plan, args.llama_spec, args.threads, args.port + 1, args.replies)
    set_baselines(levels)
    lines += ["", *table(levels), "", *notes(levels)]
    src = llama_cpp.find_sources(llama_cpp.home(cache_dir()))
    if "llama.cpp" in args.servers and src is not None and (src / "tools/server/README.md").is_file():
        lines += ["", "llama-server's draftless speculation options (its tools/server/README.md):"]
        lines += llama_spec_options((src / "tools/server/README.md").read_text())
    text = "\n".join(lines) + "\n"
    print("\n" + text, end="")
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps([level_json(lv) for lv in levels], indent=2) + "\n")
    return 0 if all(lv.errors == 0 for lv in levels) else 1


if __name__ == "__main__":
    sys.exit(main())
