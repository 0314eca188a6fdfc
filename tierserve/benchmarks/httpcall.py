"""One streamed request to the router's OpenAI-compatible HTTP API, timed by the client exactly as
streamcall.py times a gRPC call: when each token's event arrived, and what the summary (the last
event's `tierserve` field) said, into the same CallResult, so the two paths compare figure by figure.
"""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
from tierserve_client.v1 import generate_pb2

from tierserve.benchmarks.streamcall import CallResult

DATA = b"data: "
DONE = b"[DONE]"


async def served_model(session: aiohttp.ClientSession, base_url: str) -> str:
    """The model the API serves (the first of GET /v1/models)."""
    async with session.get(f"{base_url}/models") as response:
        response.raise_for_status()
        listing = await response.json()
    return str(listing["data"][0]["id"])


def completion_body(model: str, request: generate_pb2.GenerateRequest) -> dict[str, Any]:
    """The /v1/completions body asking for what `request` asks a Router for."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": request.prompt,
        "max_tokens": request.max_new_tokens,
        "temperature": request.temperature,
        "stream": True,
    }
    if request.tier:
        body["tier"] = request.tier
    for name in ("max_token_latency_ms", "max_first_token_latency_ms"):
        if getattr(request, name):
            body[name] = getattr(request, name)
    return body


def _record_summary(result: CallResult, summary: dict[str, Any]) -> None:
    result.tier, result.worker_id = summary["tier"], summary["worker_id"]
    result.budget_met, result.generated_tokens = summary["budget_met"], summary["generated_tokens"]
    result.predicted_ttft_ms = summary["predicted_ttft_us"] / 1e3
    result.predicted_tpot_ms = summary["predicted_tpot_us"] / 1e3
    result.best_effort = summary["best_effort"]
    if not summary["failovers"]:  # a resumed summary's TTFT is not one worker's
        result.worker_ttft_ms = (summary["queue_time_us"] + summary["ttft_us"]) / 1e3


async def timed_http_generate(
    session: aiohttp.ClientSession, base_url: str, body: dict[str, Any], timeout_s: float | None = None
) -> CallResult:
    """Send one streamed completion and time its events; an error status is recorded, not raised."""
    result = CallResult(sent_s=time.perf_counter())
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with session.post(f"{base_url}/completions", json=body, timeout=timeout) as response:
            if response.status != 200:
                error = (await response.json()).get("error", {})
                result.status, result.error = (
                    str(error.get("code", response.status)).upper(),
                    error.get("message", ""),
                )
                retry = response.headers.get("retry-after-ms")
                result.retry_after_ms = int(retry) if retry and retry.isdigit() else None
            else:
                async for line in response.content:
                    if not line.startswith(DATA):
                        continue
                    data = line[len(DATA) :].strip()
                    if data == DONE:
                        break
                    event = json.loads(data)
                    extra = event.get("tierserve", {})
                    if "token" in extra:
                        result.token_times_s.append(time.perf_counter())
                    if "summary" in extra:
                        _record_summary(result, extra["summary"])
                    if "error" in event:
                        result.status = str(event["error"].get("code", "ERROR")).upper()
                        result.error = event["error"].get("message", "")
    except (aiohttp.ClientError, TimeoutError) as error:
        result.status, result.error = type(error).__name__.upper(), str(error)
    result.done_s = time.perf_counter()
    if result.status == "OK" and result.budget_met is None:
        result.status, result.error = "NO_SUMMARY", "the stream ended without a summary"
    return result
