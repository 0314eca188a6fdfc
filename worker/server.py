"""Run one worker process: pin, listen (NOT_SERVING), load and warm up the tier, then serve."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tierserve_client.v1 import worker_pb2, worker_pb2_grpc

from tierserve.domain.config import TierserveConfig
from tierserve.domain.latency import LatencyWindow
from tierserve.domain.requests import GenerationParams, SamplingParams
from tierserve.ops.pinning import pin_process
from tierserve.rpc.metrics import serve_metrics
from tierserve.rpc.server import serve_until_signalled, start_server
from tierserve.rpc.stalls import StalledStreamGuard
from tierserve.rpc.tls import worker_interceptors, worker_server_credentials
from tierserve.rpc.tracing import configure_tracing
from tierserve.worker.batching.startup import serves_less_than_configured, start_batching
from tierserve.worker.chat import install_chat_template
from tierserve.worker.engine import Engine
from tierserve.worker.numa import bind_memory
from tierserve.worker.preparation import THROUGH_BATCH, prepare_tier
from tierserve.worker.registration import start_heartbeat, stop_heartbeat
from tierserve.worker.service import WorkerServicer
from tierserve.worker.state import LoadReport, WorkerState
from tierserve.worker.warmup import (
    WARMUP_NEW_TOKENS,
    WARMUP_PROMPT,
    long_prefill_params,
    warm_sampling,
    warm_up,
)

log = logging.getLogger(__name__)


def load_and_warm_up(config: TierserveConfig, state: WorkerState) -> tuple[Engine, LoadReport]:
    """Load the tier, then run greedy generations (and sampled ones where batching is off) so traced
    graphs are compiled before the first client arrives; the last run's latencies are the worker's
    self-measurement."""
    started = time.perf_counter()

    def report(stage: str, done: int, total: int) -> None:
        log.info("%s%s", stage, f" ({done}/{total})" if total > 1 else "")

    prepared = prepare_tier(config, state.config.tier, report, batching=config.batching_for(state.config))
    loaded = prepared.loaded
    log.info("chat template: %s", install_chat_template(loaded.tokenizer, config.model))
    engine = Engine(loaded, config.limits.max_context_tokens)
    load_ms = (time.perf_counter() - started) * 1e3
    log.info(
        "loaded %s tier from %s (artifact %s) in %.0f ms (%s)",
        state.config.tier,
        prepared.model_dir,
        prepared.artifact_dir,
        load_ms,
        loaded.kernel,
    )
    log.info("accuracy card, scored through %s: %s", prepared.scored_through, prepared.card)

    warm_started = time.perf_counter()
    long_params = long_prefill_params(engine)
    # A batching worker samples with its own sampler: IPEX's is warmed only if it serves one at a time.
    batching = config.batching_for(state.config).enabled
    warm_up(engine, state.config.warmup_runs, long_params, sampled=not batching)
    # Then one measured run, warm, as the worker's self-measurement before any traffic.
    params = GenerationParams(WARMUP_PROMPT, WARMUP_NEW_TOKENS, SamplingParams(), (), "self-measurement")
    outcome = engine.generate(engine.prepare(params), params, emit=lambda _: None)
    prompt_tokens = outcome.prompt_tokens
    prefill = [(prompt_tokens, outcome.ttft_us)]
    if long_params is not None:
        long_outcome = engine.generate(engine.prepare(long_params), long_params, emit=lambda _: None)
        prefill.append((long_outcome.prompt_tokens, long_outcome.ttft_us))
    window = LatencyWindow()
    window.record_first_token(outcome.ttft_us)
    for latency in outcome.tpot_us:
        window.record_token(latency)
    warmup_ms = (time.perf_counter() - warm_started) * 1e3
    log.info("warmed up in %.0f ms: %s", warmup_ms, window.to_proto())
    return engine, LoadReport(
        str(prepared.model_dir),
        load_ms,
        warmup_ms,
        window,
        prepared.card,
        card_scored_through=prepared.scored_through,
        warmup_prompt_tokens=prompt_tokens,
        chars_per_token=len(WARMUP_PROMPT) / max(prompt_tokens, 1),
        warmup_prefill=prefill,
    )


async def serve_worker(config: TierserveConfig, name: str, port_file: Path | None = None) -> None:
    worker_config = config.worker(name)
    configure_tracing(config.tracing, f"tierserve-worker-{name}")
    pinning = pin_process(worker_config.cores)
    # Before the model thread and torch's pool start: they inherit this thread's memory policy.
    numa = bind_memory(pinning.cpus)
    for notice in [*pinning.notices, *numa.notices]:
        log.warning("%s", notice)
    log.info("memory: %s", numa.description)
    state = WorkerState(
        config=worker_config,
        model=config.model,
        pinning=pinning,
        numa=numa,
        max_new_tokens_limit=config.limits.max_new_tokens,
    )
    # One thread runs the model: loading, warm-up, then every generation in turn.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{name}")
    servicer = WorkerServicer(state, config.limits, executor)

    def register(server: object) -> list[str]:
        worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
        return [worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name]

    handle = await start_server(
        worker_config.host,
        worker_config.port,
        register,
        port_file,
        credentials=worker_server_credentials(config.security, name),
        # With mutual TLS, Worker calls only from the router's certificate; a stream the router
        # stops reading is ended, so it cannot keep the model slot.
        interceptors=[
            *worker_interceptors(config.security),
            StalledStreamGuard(config.limits.stream_idle_timeout_s),
        ],
        # What a drain waits for, and refuses anew (the router then sends it elsewhere).
        work_methods=[f"/{worker_pb2.DESCRIPTOR.services_by_name['Worker'].full_name}/Generate"],
    )
    # Registered while loading too: the router lists it NOT_SERVING until it is warm.
    heartbeats = start_heartbeat(worker_config, handle.port, config.security)
    # Up while the model loads, so a scrape can already see ready 0 and the queue.
    endpoint = (
        serve_metrics(
            servicer.metrics.registry,
            config.metrics.host,
            worker_config.metrics_port,
            port_file,
            max_connections=config.metrics.max_connections,
            timeout_s=config.metrics.connection_timeout_s,
        )
        if config.metrics.enabled
        else None
    )
    loop = asyncio.get_running_loop()
    try:
        engine, report = await loop.run_in_executor(executor, load_and_warm_up, config, state)
    except Exception:
        log.exception("worker %s failed to load its model", name)
        await stop_heartbeat(heartbeats)
        await handle.server.stop(0)
        if endpoint is not None:
            endpoint.close()
        raise
    state.batch, batching = await loop.run_in_executor(
        executor,
        start_batching,
        engine,
        config.batching_for(worker_config),
        worker_config.tier,
        False,
        config.model.resolved_cache_dir() / "kernels",
    )
    if state.batch is None and config.batching_for(worker_config).enabled:
        # Batching was configured but is unavailable: requests sample through IPEX's path, unwarmed.
        await loop.run_in_executor(executor, warm_sampling, engine, worker_config.warmup_runs)
    batch_loop: asyncio.Future[None] | None = None
    if state.batch is not None:
        # The batch steps on the model thread, which then runs nothing else: torch's parallel
        # work from one thread only (BatchEngine.run says why).
        batch_loop = loop.run_in_executor(executor, state.batch.run)
    log.info("%s", batching)
    if serves_less_than_configured(state.batch, config.batching_for(worker_config)):
        state.notices.append(batching)
    if state.batch is None and report.card_scored_through == THROUGH_BATCH:
        state.notices.append(
            f"the accuracy card was scored through {THROUGH_BATCH}, which the self-check refused: it "
            "describes that path, not the one-request path this worker serves through"
        )
    state.ready(engine, report)
    await handle.set_serving(True)
    log.info(
        "worker %s (%s) serving on port %d, cores %s", name, worker_config.tier, handle.port, pinning.cpus
    )
    try:
        await serve_until_signalled(handle, on_stop=lambda: stop_heartbeat(heartbeats))
    finally:
        if endpoint is not None:
            endpoint.close()
        if state.batch is not None:
            state.batch.stop()  # the loop ends once the running requests have
        if batch_loop is not None:
            await asyncio.wait({batch_loop}, timeout=30)
    executor.shutdown(wait=False, cancel_futures=True)
