"""`tierserve bench chaos`: load while workers are killed (`kill -9`) and restarted.

    tierserve bench chaos --out bench-results/chaos.json [--config F] [--tier fp32] [--duration-s 60]

Starts a pool (two workers of --tier by default, or --config's, which must have two of that tier at
least), sends greedy requests pinned to --tier from several clients in closed loop, and every
--kill-every-s kills one worker of that tier outright while another still serves; the launcher
restarts it with backoff. A share of the requests (CANCEL_SHARE) is cancelled by its own client after
a few tokens, on purpose, so cancellation is exercised while workers die. Every stream is checked as
a client sees it: token indexes 0..n-1, their text equal to the summary's, n equal to
`generated_tokens`; and every stream read to its summary has the text of an uninterrupted run of the
same request through the same tier, run before the first kill (tierserve/benchmarks/chaos_texts.py).

The report counts requests sent, completed, failed by status code, resumed after a failover (tokens
had been streamed), retried before their first token and seams (a broken stream). Failures are told
apart by cause: refused for overload (RESOURCE_EXHAUSTED, the pool's legitimate answer to too much
load), cancelled by their own client on purpose, and the rest, which a worker fault caused
(UNAVAILABLE, INTERNAL, UNKNOWN, DEADLINE_EXCEEDED after a kill) or which no request should ever get.
Lost is every request that neither completed nor was refused for overload nor cancelled on purpose:
the fault-caused failures plus any still unfinished at the end. Exit status 1 when any request was
lost, any stream had a seam or any text differed from its reference. The report is written as JSON
(--out) and as markdown beside it (the same name, .md).
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from tierserve_client.options import CHANNEL_OPTIONS
from tierserve_client.v1 import generate_pb2, router_pb2, router_pb2_grpc

from tierserve.benchmarks.chaos_texts import (
    FinishedStream,
    RequestShape,
    TextCheck,
    compare_texts,
    request_for,
    request_shapes,
    run_references,
)
from tierserve.benchmarks.livepool import bench_pool_config, running_pool, usable_cpus
from tierserve.domain.config import ConfigError, TierserveConfig
from tierserve.domain.tiers import REFERENCE_TIER
from tierserve.ops.launcher import PoolLauncher
from tierserve.rpc.calls import list_workers

CALL_TIMEOUT_S = 120.0
SUPERVISE_EVERY_S = 0.2
PROMPTS = (
    "The history of the lighthouse begins",
    "A short note on rivers and their deltas:",
    "Instructions for planting a small garden:",
    "The committee met on Tuesday to discuss",
)


# Statuses a worker fault (a killed process, a broken stream) leads to when failover does not hide it.
FAULT_CODES = frozenset({"UNAVAILABLE", "INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED"})
# The pool refusing load it has no room for: an answer, not a loss (the client is told to retry).
OVERLOAD_CODE = "RESOURCE_EXHAUSTED"
# Share of requests their client cancels on purpose after a few tokens.
CANCEL_SHARE = 0.1


@dataclass
class ChaosTally:
    sent: int = 0
    completed: int = 0
    # Every status a request ended with other than OK, except the client's own deliberate cancels.
    failed: Counter[str] = field(default_factory=Counter)
    cancelled_by_client: int = 0
    resumed: int = 0
    retried_before_first_token: int = 0
    seams: int = 0
    examples: list[str] = field(default_factory=list)
    # Every stream read to its summary, for the text check.
    finished: list[FinishedStream] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def to_json(self, unfinished: int) -> dict[str, Any]:
        refused = self.failed[OVERLOAD_CODE]
        faults = {code: n for code, n in self.failed.items() if code in FAULT_CODES}
        others = {code: n for code, n in self.failed.items() if code not in FAULT_CODES | {OVERLOAD_CODE}}
        return {
            "sent": self.sent,
            "completed": self.completed,
            "failed_by_code": dict(self.failed),
            "refused_for_overload": refused,
            "cancelled_by_client": self.cancelled_by_client,
            "fault_failures_by_code": faults,
            # Neither a fault's nor overload's status (e.g. INVALID_ARGUMENT, a CANCELLED nobody asked for).
            "unexpected_failures_by_code": others,
            "resumed_after_failover": self.resumed,
            "retried_before_first_token": self.retried_before_first_token,
            "seams": self.seams,
            "unfinished": unfinished,
            "lost": self.sent - self.completed - refused - self.cancelled_by_client,
            "seam_examples": self.examples[:5],
        }


def check_stream(responses: list[generate_pb2.GenerateResponse]) -> str:
    """Empty when the stream is whole as the client saw it, else what is wrong."""
    if not responses or not responses[-1].HasField("summary"):
        return "no summary"
    tokens = [r.token for r in responses[:-1]]
    summary = responses[-1].summary
    if [t.index for t in tokens] != list(range(len(tokens))):
        return f"token indexes {[t.index for t in tokens]}"
    if "".join(t.text for t in tokens) != summary.text:
        return "streamed text differs from the summary's"
    if summary.generated_tokens != len(tokens):
        return f"{len(tokens)} tokens but generated_tokens {summary.generated_tokens}"
    return ""


def request_lengths(new_tokens: int) -> list[int]:
    """The max_new_tokens the load draws from: few, so that every request has its reference run."""
    return sorted({max(1, new_tokens // 2), new_tokens})


def client_loop(
    address: str,
    until: float,
    shapes: list[RequestShape],
    tier: str,
    cancel_share: float,
    rng: random.Random,
    tally: ChaosTally,
) -> None:
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        while time.monotonic() < until:
            shape = rng.choice(shapes)
            request = request_for(shape, tier)
            # Cancel on purpose once this many tokens have arrived (None: read the stream to its end).
            cancel_after = rng.randint(1, 4) if rng.random() < cancel_share else None
            with tally.lock:
                tally.sent += 1
            responses: list[generate_pb2.GenerateResponse] = []
            cancelled = False
            call = stub.Generate(request, timeout=CALL_TIMEOUT_S)
            try:
                for response in call:
                    responses.append(response)
                    if len(responses) == cancel_after and response.HasField("token"):
                        cancelled = call.cancel()
            except grpc.RpcError as error:
                code = error.code().name if isinstance(error, grpc.Call) else "UNKNOWN"
                with tally.lock:
                    if cancelled and code == "CANCELLED":
                        tally.cancelled_by_client += 1
                    else:
                        tally.failed[code] += 1
                time.sleep(0.05)  # a refused client backs off a little
                continue
            problem = check_stream(responses)
            summary = responses[-1].summary if responses else generate_pb2.Summary()
            with tally.lock:
                tally.completed += 1
                if problem:
                    tally.seams += 1
                    tally.examples.append(problem)
                else:  # a whole stream: its text is checked against the reference
                    tally.finished.append(FinishedStream.from_summary(shape, summary))
                if summary.failovers:
                    if summary.resumed_after_tokens:
                        tally.resumed += 1
                    else:
                        tally.retried_before_first_token += 1


def chaos_monkey(
    launcher: PoolLauncher,
    until: float,
    kill_every_s: float,
    rng: random.Random,
    kills: list[dict[str, Any]],
    names: frozenset[str],
) -> None:
    """Kill one serving worker of `names` every `kill_every_s` while another of them serves too (so
    the pool can always fail over); let the launcher restart it. The victim is the busiest (ties
    drawn at random), so a kill lands mid-stream whenever any request is in flight."""
    started = time.monotonic()
    next_kill = started + kill_every_s
    while (now := time.monotonic()) < until:
        launcher.supervise_workers(now)
        if now < next_kill:
            time.sleep(SUPERVISE_EVERY_S)
            continue
        serving = _serving(launcher.router_address)
        # args end with the worker's name (`worker --name NAME`), the router's worker id.
        alive = [
            m for m in launcher.workers if m.process.poll() is None and m.args[-1] in serving.keys() & names
        ]
        if len(alive) >= 2:
            busiest = max(serving[m.args[-1]] for m in alive)
            victim = rng.choice([m for m in alive if serving[m.args[-1]] == busiest])
            victim.process.send_signal(signal.SIGKILL)
            kills.append(
                {
                    "worker": victim.args[-1],
                    "pid": victim.process.pid,
                    "at_s": round(now - started, 2),
                    "in_flight": busiest,
                }
            )
            next_kill = now + kill_every_s
        time.sleep(SUPERVISE_EVERY_S)


def _serving(address: str) -> dict[str, int]:
    """The serving workers and the requests in flight on each, as the router counts them."""
    try:
        workers = list_workers(address, timeout_s=2.0).workers
    except grpc.RpcError:
        return {}
    return {w.worker_id: w.in_flight for w in workers if w.health == router_pb2.WORKER_HEALTH_SERVING}


def chaos_workers(config: TierserveConfig, tier: str) -> frozenset[str]:
    """The workers of `tier`, the ones the load reaches and the monkey kills: two at least, so that one
    serves while another is down."""
    names = frozenset(w.name for w in config.workers if w.tier == tier)
    if len(names) < 2:
        raise ConfigError(
            f"chaos pins its requests to tier {tier} and needs two workers of it to fail over between; "
            f"the pool has {len(names)}"
        )
    return names


def run_chaos_benchmark(
    out: Path,
    config_path: str | None,
    duration_s: float,
    clients: int,
    kill_every_s: float,
    new_tokens: int,
    seed: int,
    run_dir: Path | None,
    console: Console,
    cancel_share: float = CANCEL_SHARE,
    tier: str = REFERENCE_TIER,
) -> int:
    config = bench_pool_config(config_path, (tier, tier), usable_cpus(), new_tokens)
    names = chaos_workers(config, tier)
    rng = random.Random(seed)
    tally = ChaosTally()
    kills: list[dict[str, Any]] = []
    shapes = request_shapes(PROMPTS, request_lengths(new_tokens))
    with running_pool(config, run_dir, console) as launcher:
        console.print(f"chaos: {len(shapes)} reference runs on {tier}, one at a time, before any fault")
        references = run_references(launcher.router_address, tier, shapes, CALL_TIMEOUT_S)
        until = time.monotonic() + duration_s
        threads = [
            threading.Thread(
                target=client_loop,
                args=(
                    launcher.router_address,
                    until,
                    shapes,
                    tier,
                    cancel_share,
                    random.Random(rng.random()),
                    tally,
                ),
                daemon=True,
            )
            for _ in range(clients)
        ]
        for thread in threads:
            thread.start()
        console.print(f"chaos: {clients} clients for {duration_s:.0f} s, a kill every {kill_every_s:.0f} s")
        chaos_monkey(launcher, until, kill_every_s, rng, kills, names)
        for thread in threads:
            thread.join(timeout=CALL_TIMEOUT_S)
        unfinished = sum(thread.is_alive() for thread in threads)
        restarts = sum(m.backoff.restarts for m in launcher.workers)
    with tally.lock:
        texts = compare_texts(list(tally.finished), references, tier)
    report = {
        "benchmark": "chaos",
        "config": {
            "duration_s": duration_s,
            "clients": clients,
            "kill_every_s": kill_every_s,
            "new_tokens": new_tokens,
            "request_lengths": request_lengths(new_tokens),
            "cancel_share": cancel_share,
            "seed": seed,
            "tier": tier,
            "workers": [w.name for w in config.workers],
        },
        "kills": kills,
        "restarts": restarts,
        "requests": tally.to_json(unfinished),
        "texts": texts.to_json(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    markdown = out.with_suffix(".md")
    markdown.write_text(chaos_markdown(report), encoding="utf-8")
    figures = report["requests"]
    console.print(
        f"sent {figures['sent']}, completed {figures['completed']}, "
        f"refused for overload {figures['refused_for_overload']}, "
        f"cancelled by client {figures['cancelled_by_client']}, "
        f"failed by fault {figures['fault_failures_by_code']}, "
        f"failed otherwise {figures['unexpected_failures_by_code']}, "
        f"resumed {figures['resumed_after_failover']}, retried {figures['retried_before_first_token']}, "
        f"seams {figures['seams']}, lost {figures['lost']}; {len(kills)} kills, {restarts} restarts",
        highlight=False,
    )
    console.print(text_verdict(texts), highlight=False)
    console.print(f"-> {out}, {markdown}", highlight=False)
    return 1 if figures["lost"] or figures["seams"] or texts.mismatches else 0


def text_verdict(texts: TextCheck) -> str:
    line = (
        f"texts against an uninterrupted run on {texts.tier}: {texts.compared} compared "
        f"({texts.resumed_compared} resumed), {len(texts.mismatches)} differ "
        f"({texts.resumed_mismatches} resumed)"
    )
    for m in texts.mismatches[:3]:
        line += (
            f"\n  - {m['prompt']!r} x{m['max_new_tokens']} on {m['worker']} ({m['tier']}), resumed after "
            f"{m['resumed_after_tokens']} tokens, differs at character {m['first_difference_at']}: "
            f"expected {m['expected']!r}, got {m['got']!r}"
        )
    return line


def chaos_markdown(report: dict[str, Any]) -> str:
    """The report for people: the figures, failures by status code, the text check and the kills."""
    config, r, texts = report["config"], report["requests"], report["texts"]
    rows = [
        ("sent", r["sent"]),
        ("completed", r["completed"]),
        ("resumed after a failover (tokens had been streamed)", r["resumed_after_failover"]),
        ("retried before their first token", r["retried_before_first_token"]),
        ("refused for overload (RESOURCE_EXHAUSTED)", r["refused_for_overload"]),
        ("cancelled by their own client, on purpose", r["cancelled_by_client"]),
        ("failed by a worker fault", _codes(r["fault_failures_by_code"])),
        ("failed otherwise", _codes(r["unexpected_failures_by_code"])),
        ("streams with a seam", r["seams"]),
        ("unfinished at the end", r["unfinished"]),
        ("**lost**", f"**{r['lost']}**"),
        (f"texts compared with an uninterrupted run on {texts['tier']}", texts["compared"]),
        ("of them resumed", texts["resumed_compared"]),
        ("**texts that differ** (resumed)", f"**{texts['mismatches']}** ({texts['resumed_mismatches']})"),
    ]
    lines = [
        "# Chaos",
        "",
        f"{config['clients']} clients for {config['duration_s']:.0f} s, greedy requests pinned to "
        f"{config['tier']} (max_new_tokens {', '.join(map(str, config['request_lengths']))}), "
        f"a kill -9 every {config['kill_every_s']:.0f} s; workers {', '.join(config['workers'])}; "
        f"seed {config['seed']}.",
        "",
        "| requests | |",
        "| --- | ---: |",
        *(f"| {name} | {value} |" for name, value in rows),
        "",
        f"Failed by status code: {_codes(r['failed_by_code'])}.",
        "",
        f"{len(report['kills'])} kills, {report['restarts']} restarts:",
        "",
        "| at s | worker | pid | requests in flight |",
        "| ---: | --- | ---: | ---: |",
        *(f"| {k['at_s']} | {k['worker']} | {k['pid']} | {k['in_flight']} |" for k in report["kills"]),
    ]
    for m in texts["mismatch_examples"]:
        lines += [
            "",
            f"- {m['prompt']!r} x{m['max_new_tokens']} on {m['worker']} ({m['tier']}), resumed after "
            f"{m['resumed_after_tokens']} tokens (failed: {', '.join(m['failed_workers']) or 'none'}), "
            f"differs at character {m['first_difference_at']}: expected `{m['expected']!r}`, "
            f"got `{m['got']!r}`",
        ]
    return "\n".join(lines) + "\n"


def _codes(codes: dict[str, int]) -> str:
    return ", ".join(f"{code} {n}" for code, n in sorted(codes.items())) or "none"
