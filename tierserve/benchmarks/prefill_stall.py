"""`tierserve bench prefill-stall`: how long a long prompt holds the streams already decoding, with
chunked prefill and without.

    tierserve bench prefill-stall --out bench-results/prefill-stall.json [--tier bf16] [--streams 8]
        [--prompt-words 1500] [--chunks 256,off] [--stream-tokens 384]

For each chunk setting (`off`: every prompt prefilled in one forward) it starts a pool whose
workers of the tier have `[batching] prefill_chunk_tokens` set so (without --config: one worker on
every usable CPU), sends the long prompt once alone (its TTFT is the prefill's time, warm), then
starts `--streams` greedy streams straight to the worker, and once each has made a few tokens
sends the long prompt. Figures per setting: the streams' median token gap before the long prompt
arrived, their worst gap between its arrival and its first token (the stall), its TTFT there and
alone, and whether its greedy text equals that of the other settings. A stream that ended before
the long prompt's first token is reported (raise --stream-tokens). Writes FILE.json and FILE.md.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from tierserve_client.options import CHANNEL_OPTIONS
from tierserve_client.v1 import generate_pb2, router_pb2, worker_pb2_grpc

from tierserve.benchmarks.livepool import bench_pool_config, prompt_words, running_pool, usable_cpus
from tierserve.benchmarks.throughput.run import make_prompts
from tierserve.domain.config import ConfigError, TierserveConfig, parse_config
from tierserve.domain.tiers import TIER_NAMES
from tierserve.rpc.calls import list_workers

OFF = "off"
# Tokens every stream has made before the long prompt is sent (its gaps are warm by then).
STREAM_WARM_TOKENS = 6
LONG_NEW_TOKENS = 16
STREAM_PROMPT_WORDS = (16, 40, 24, 48, 8, 32, 20, 56)


def parse_chunks(text: str) -> list[int | None]:
    """Comma-separated chunk sizes (>= 16) or `off`, in the order given, without repeats."""
    chunks: list[int | None] = []
    for item in (v.strip().lower() for v in text.split(",") if v.strip()):
        try:
            value = None if item == OFF else int(item)
        except ValueError:
            value = 0
        if value is not None and value < 16:
            raise ConfigError(f"--chunks: expected token counts of at least 16 or {OFF!r}, got {item!r}")
        if value not in chunks:
            chunks.append(value)
    if not chunks:
        raise ConfigError("--chunks: no chunk settings")
    return chunks


def chunk_label(chunk: int | None) -> str:
    return OFF if chunk is None else str(chunk)


def stall_pool_config(
    config_path: str | None, tier: str, cpus: Sequence[int], chunk: int | None, stream_tokens: int
) -> TierserveConfig:
    """--config's workers of `tier` (or one on every CPU), with this chunk setting."""
    if tier not in TIER_NAMES:
        raise ConfigError(f"--tier: unknown tier {tier!r}; known: {', '.join(TIER_NAMES)}")
    data = bench_pool_config(config_path, [tier], cpus, stream_tokens).model_dump()
    data["workers"] = [w for w in data["workers"] if w["tier"] == tier]
    if not data["workers"]:
        raise ConfigError(f"--tier: {tier} is not served by {config_path}")
    batching = data.setdefault("batching", {})
    batching["enabled"] = True
    batching["prefill_chunk_tokens"] = 0 if chunk is None else chunk  # 0: one forward per prompt
    return parse_config(data, source=config_path or "bench prefill-stall")


@dataclass
class Stream:
    """One call as the client saw it: token arrival times, and the summary's facts."""

    sent_s: float = 0.0
    token_times_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    text: str = ""
    error: str = ""

    def gaps_ms(self, after_s: float, before_s: float) -> list[float]:
        """Gaps between consecutive tokens whose interval overlaps [after_s, before_s]."""
        times = self.token_times_s
        return [(b - a) * 1e3 for a, b in itertools.pairwise(times) if b >= after_s and a <= before_s]


async def _stream(stub: Any, request: generate_pb2.GenerateRequest, into: Stream, timeout_s: float) -> None:
    into.sent_s = time.perf_counter()
    try:
        async for response in stub.Generate(request, timeout=timeout_s):
            if response.HasField("token"):
                into.token_times_s.append(time.perf_counter())
            else:
                into.prompt_tokens, into.text = response.summary.prompt_tokens, response.summary.text
    except grpc.aio.AioRpcError as error:
        into.error = f"{error.code().name}: {error.details()}"


async def _until(condition: Any, timeout_s: float) -> None:
    deadline = time.perf_counter() + timeout_s
    while not condition():
        if time.perf_counter() > deadline:
            raise TimeoutError("the streams did not start in time")
        await asyncio.sleep(0.005)


async def _measure(
    worker_address: str,
    long_prompt: str,
    stream_prompts: Sequence[str],
    stream_tokens: int,
    timeout_s: float,
) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(worker_address, options=CHANNEL_OPTIONS) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)

        def request(prompt: str, tokens: int, name: str) -> generate_pb2.GenerateRequest:
            return generate_pb2.GenerateRequest(prompt=prompt, max_new_tokens=tokens, request_id=name)

        alone = Stream()
        await _stream(stub, request(long_prompt, LONG_NEW_TOKENS, "stall-alone-warm"), Stream(), timeout_s)
        await _stream(stub, request(long_prompt, LONG_NEW_TOKENS, "stall-alone"), alone, timeout_s)
        streams = [Stream() for _ in stream_prompts]
        tasks = [
            asyncio.create_task(_stream(stub, request(p, stream_tokens, f"stall-stream-{i}"), s, timeout_s))
            for i, (p, s) in enumerate(zip(stream_prompts, streams, strict=True))
        ]
        await _until(
            lambda: all(len(s.token_times_s) >= STREAM_WARM_TOKENS or s.error for s in streams), timeout_s
        )
        long = Stream()
        await _stream(stub, request(long_prompt, LONG_NEW_TOKENS, "stall-long"), long, timeout_s)
        await asyncio.gather(*tasks)
    return _figures(alone, long, streams)


def _figures(alone: Stream, long: Stream, streams: Sequence[Stream]) -> dict[str, Any]:
    errors = [s.error for s in (alone, long, *streams) if s.error]
    if errors or not long.token_times_s or not alone.token_times_s:
        return {"errors": errors or ["the long prompt made no token"]}
    arrived, first = long.sent_s, long.token_times_s[0]
    before = [(b - a) * 1e3 for s in streams for a, b in itertools.pairwise(s.token_times_s) if b <= arrived]
    during = [max(s.gaps_ms(arrived, first), default=0.0) for s in streams]
    return {
        "prompt_tokens": long.prompt_tokens,
        "streams": len(streams),
        "gap_before_p50_ms": round(statistics.median(before), 2) if before else None,
        "worst_gap_during_prefill_ms": round(max(during), 2),
        "long_ttft_ms": round((first - arrived) * 1e3, 2),
        "long_ttft_alone_ms": round((alone.token_times_s[0] - alone.sent_s) * 1e3, 2),
        # Tokens the streams made between the long prompt's arrival and its first token.
        "stream_tokens_during_prefill": sum(
            sum(1 for t in s.token_times_s if arrived < t < first) for s in streams
        ),
        "streams_ended_before_first_token": sum(
            1 for s in streams if not s.token_times_s or s.token_times_s[-1] < first
        ),
        "long_text": long.text,
        "long_text_same_as_alone": long.text == alone.text,
        "errors": [],
    }


def _worker_address(router_address: str, tier: str) -> tuple[str, list[str]]:
    workers = [
        w
        for w in list_workers(router_address).workers
        if w.info.tier == tier and w.health == router_pb2.WORKER_HEALTH_SERVING
    ]
    if not workers:
        raise ConfigError(f"no serving worker of tier {tier!r} in the pool")
    return workers[0].address, list(workers[0].info.notices)


def render_markdown(tier: str, rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        f"# Prefill stall ({tier})",
        "",
        "| chunk | prompt tokens | streams | gap before p50 ms | worst gap during prefill ms "
        "| long TTFT ms | alone ms | stream tokens during prefill | same text |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.get("errors"):
            lines.append(f"| {row['chunk']} | errors: {'; '.join(row['errors'])} |||||||")
            continue
        lines.append(
            f"| {row['chunk']} | {row['prompt_tokens']} | {row['streams']} | {row['gap_before_p50_ms']} "
            f"| {row['worst_gap_during_prefill_ms']} | {row['long_ttft_ms']} | {row['long_ttft_alone_ms']} "
            f"| {row['stream_tokens_during_prefill']} | {row['same_text_as_first_setting']} |"
        )
    ended = [r["chunk"] for r in rows if r.get("streams_ended_before_first_token")]
    if ended:
        lines += ["", f"Streams ended before the long prompt's first token at chunk {', '.join(ended)}: "
                  "raise --stream-tokens."]  # fmt: skip
    return "\n".join(lines) + "\n"


def run_prefill_stall_benchmark(
    out: Path,
    config_path: str | None,
    *,
    tier: str,
    streams: int,
    prompt_words_count: int,
    chunks: str,
    stream_tokens: int,
    timeout_s: float,
    run_dir: Path | None,
    console: Console,
) -> int:
    settings = parse_chunks(chunks)
    if not 1 <= streams <= 64:
        raise ConfigError(f"--streams: expected 1 to 64, got {streams}")
    cpus = usable_cpus()
    rows: list[dict[str, Any]] = []
    for chunk in settings:
        config = stall_pool_config(config_path, tier, cpus, chunk, stream_tokens)
        words = prompt_words(config)
        [long_prompt] = make_prompts(words, [prompt_words_count])
        stream_prompts = make_prompts(words, [STREAM_PROMPT_WORDS[i % 8] for i in range(streams)])
        console.print(f"prefill chunk {chunk_label(chunk)}: tier {tier}, {streams} streams", highlight=False)
        with running_pool(config, run_dir / chunk_label(chunk) if run_dir else None, console) as launcher:
            address, notices = _worker_address(launcher.router_address, tier)
            figures = asyncio.run(_measure(address, long_prompt, stream_prompts, stream_tokens, timeout_s))
        rows.append({"chunk": chunk_label(chunk), "notices": notices, **figures})
    texts = [r.get("long_text") for r in rows]
    for row in rows:
        row["same_text_as_first_setting"] = row.get("long_text") == texts[0]
    meta = {"tier": tier, "streams": streams, "prompt_words": prompt_words_count, "cpus": cpus}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n", encoding="utf-8")
    report = render_markdown(tier, rows)
    out.with_suffix(".md").write_text(report, encoding="utf-8")
    print(report)
    console.print(f"wrote {out}, {out.with_suffix('.md')}", highlight=False)
    return 1 if any(r.get("errors") for r in rows) else 0
