"""The `tierserve` command: run a pool, talk to it, prepare the model."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import grpc
from google.protobuf import json_format
from rich.console import Console
from rich.markup import escape
from rich.progress import TaskID
from tierserve_client import Client, ClientOptions, RetryPolicy
from tierserve_client.v1 import generate_pb2

from tierserve.cli.render import (
    cache_table,
    kernels_table,
    mib,
    print_token,
    summary_table,
    top_table,
    workers_table,
)
from tierserve.domain.config import ConfigError, TierserveConfig, config_to_toml, default_config, load_config
from tierserve.domain.errors import StartupError
from tierserve.ops.capacity import PlanningError
from tierserve.ops.modelprep import ModelPreparationError, prepare_model
from tierserve.rpc.calls import DEFAULT_ROUTER_ADDRESS, is_serving, list_workers, watch_stats

# The demo asks the default (instruction-tuned) model a question, as a chat; a model without a chat
# template gets the prompt instead.
DEMO_QUESTION = "What is the capital of France?"
DEMO_SYSTEM = "Answer in one short sentence."
DEMO_PROMPT = "The capital of France is"
NON_TTY_WIDTH = 200


def _load(path: str | None) -> TierserveConfig:
    if path:
        return load_config(Path(path))
    return default_config(sorted(os.sched_getaffinity(0)))


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_up(args: argparse.Namespace, console: Console) -> int:
    from tierserve.ops.launcher import LaunchError, PoolLauncher, install_stop_signals, router_client_options
    from tierserve.ops.placement import apply_plan, plan_pool
    from tierserve.ops.placement_report import print_plan
    from tierserve.ops.topology import read_topology

    config = _load(args.config)
    run_dir = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="tierserve-run-"))
    topology = read_topology(Path(args.topology_root)) if args.topology_root else read_topology()
    plan = plan_pool(config, topology)
    config = apply_plan(config, plan)
    if args.dry_run:
        print_plan(console, plan)
        print(config_to_toml(config))
        return 0
    if args.topology_root:
        raise ConfigError("--topology-root describes another machine: use it with --dry-run only")
    for warning in plan.warnings:
        console.print(f"[yellow]note:[/] {escape(warning)}", highlight=False)
    install_stop_signals()
    launcher = PoolLauncher(config, run_dir, console)
    try:
        address = launcher.start()
        own = router_client_options(config.security, address)
        _print_workers(console, address, own)
        if args.demo:
            _demo(console, address, args.demo, own)
        if launcher.http_url:
            console.print(f"OpenAI-compatible API at {launcher.http_url}", highlight=False)
        console.print(f"\n[green]serving[/] on {address} (run dir {run_dir}); press Ctrl-C to stop")
        launcher.watch()
    except KeyboardInterrupt:
        console.print("stopping")
    except LaunchError as error:
        console.print(f"[red]error:[/] {escape(str(error))}")
        return 1
    finally:
        launcher.stop()
    return 0


def _demo(console: Console, address: str, question: str, options: ClientOptions) -> None:
    """One chat request (a prompt where the model has no chat template) once the pool serves."""
    console.print(f"\n[bold]demo chat[/] to the router at {address}: {question!r}")
    chat = _chat_request(question, DEMO_SYSTEM)
    chat.max_new_tokens = 32
    try:
        _generate(console, address, chat, options=options)
    except grpc.RpcError as error:
        if not isinstance(error, grpc.Call) or error.code() != grpc.StatusCode.FAILED_PRECONDITION:
            raise
        console.print(f"[yellow]note:[/] {escape(error.details() or '')}; sending a prompt instead")
        demo = generate_pb2.GenerateRequest(prompt=DEMO_PROMPT, max_new_tokens=32)
        _generate(console, address, demo, options=options)


def _chat_request(user: str, system: str | None = None) -> generate_pb2.GenerateRequest:
    """A request of one user message, after a system message when one is given."""
    request = generate_pb2.GenerateRequest()
    if system:
        request.messages.add(role="system", content=system)
    request.messages.add(role="user", content=user)
    return request


def cmd_worker(args: argparse.Namespace, console: Console) -> int:
    # Before torch loads: compile in-process instead of forking a pool of compile workers per
    # worker (IPEX's traced graphs never use them; they only cost memory and processes).
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    from tierserve.worker.server import serve_worker

    asyncio.run(serve_worker(_load(args.config), args.name, Path(args.port_file) if args.port_file else None))
    return 0


def cmd_router(args: argparse.Namespace, console: Console) -> int:
    from tierserve.router.server import serve_router

    asyncio.run(serve_router(_load(args.config), Path(args.port_file) if args.port_file else None))
    return 0


def _generate(
    console: Console,
    address: str,
    request: generate_pb2.GenerateRequest,
    plain: bool = False,
    options: ClientOptions | None = None,
) -> None:
    with Client(options or ClientOptions(address)) as client:
        stream = client.stream(request)
        for token in stream:
            if plain:
                console.print(token.text, end="", soft_wrap=True, highlight=False, markup=False)
            else:
                print_token(console, token.proto)
        if stream.summary is not None:
            text = escape(stream.summary.text)
            if request.messages:
                for message in request.messages:
                    console.print(f"\n[bold]{message.role}:[/] {escape(message.content)}", highlight=False)
                console.print(f"[bold]assistant:[/] [green]{text}[/]", highlight=False)
            else:
                console.print(f"\n[bold]text:[/] {escape(request.prompt)}[green]{text}[/]", highlight=False)
            console.print(summary_table(stream.summary.proto))


# Environment defaults of the client security options, so scripts need not repeat them.
CLIENT_SECURITY_ENV = {
    "tls": "TIERSERVE_TLS",
    "ca_cert": "TIERSERVE_CA_CERT",
    "client_cert": "TIERSERVE_CLIENT_CERT",
    "client_key": "TIERSERVE_CLIENT_KEY",
    "token_file": "TIERSERVE_TOKEN_FILE",
}
TOKEN_ENV = "TIERSERVE_TOKEN"


def _add_client_security(parser: argparse.ArgumentParser) -> None:
    """TLS, mutual TLS and bearer-token options of a command that dials the router."""
    env = {key: os.environ.get(name) for key, name in CLIENT_SECURITY_ENV.items()}
    parser.add_argument(
        "--tls",
        action="store_true",
        default=(env["tls"] or "").lower() in ("1", "true", "yes"),
        help="use TLS with the system's root certificates (env TIERSERVE_TLS=1)",
    )
    options = (
        ("--ca-cert", "ca_cert", "PEM file of the root certificates to verify the router (TLS)"),
        ("--client-cert", "client_cert", "PEM client certificate chain (mutual TLS)"),
        ("--client-key", "client_key", "PEM private key of the client certificate (mutual TLS)"),
        ("--token-file", "token_file", f"file holding a bearer token (or the token itself in ${TOKEN_ENV})"),
    )
    for flag, key, text in options:
        parser.add_argument(flag, default=env[key], help=f"{text} (env {CLIENT_SECURITY_ENV[key]})")


def _client_options(args: argparse.Namespace, address: str | None = None) -> ClientOptions:
    """TLS, token and retries from the command line or the environment; the token comes from a file
    (never the command line, where other users could read it) or $TIERSERVE_TOKEN."""
    if args.token_file:
        token = Path(args.token_file).read_text(encoding="utf-8").strip()
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    return ClientOptions(
        address or args.address,
        tls=args.tls,
        root_certificates=args.ca_cert,
        certificate_chain=args.client_cert,
        private_key=args.client_key,
        token=token,
        retry=RetryPolicy(max_attempts=max(1, getattr(args, "retries", 0) + 1)),
    )


def cmd_generate(args: argparse.Namespace, console: Console) -> int:
    request = generate_pb2.GenerateRequest(
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop or [],
        tier=args.tier or "",
        max_token_latency_ms=args.max_token_latency_ms,
        max_first_token_latency_ms=args.max_first_token_latency_ms,
        strict=args.strict,
    )
    # --system makes a chat on its own: a system message means something only to a chat template.
    if args.chat or args.system is not None:
        request.messages.extend(_chat_request(args.prompt, args.system).messages)
    else:
        request.prompt = args.prompt
    if args.max_quality_loss_pct is not None:
        request.max_quality_loss_pct = args.max_quality_loss_pct
    if args.max_new_tokens is not None:
        request.max_new_tokens = args.max_new_tokens
    if args.top_p is not None:
        request.top_p = args.top_p
    _generate(console, args.address, request, plain=args.plain, options=_client_options(args))
    return 0


def _print_workers(console: Console, address: str, options: ClientOptions | None = None) -> None:
    if options is None:
        workers = list(list_workers(address).workers)
    else:
        with Client(options) as client:
            workers = list(client.list_workers().workers)
    console.print(workers_table(workers))
    console.print(kernels_table(workers))


def cmd_workers(args: argparse.Namespace, console: Console) -> int:
    with Client(_client_options(args)) as client:
        reply = client.list_workers()
    if args.json:
        print(json_format.MessageToJson(reply, indent=2))
    else:
        console.print(workers_table(list(reply.workers)))
        console.print(kernels_table(list(reply.workers)))
    return 0


def cmd_top(args: argparse.Namespace, console: Console) -> int:
    """A live dashboard over WatchStats until Ctrl-C (or --once / --iterations N)."""
    from rich.live import Live

    limit = 1 if args.once else args.iterations
    updates = watch_stats(args.router, args.interval_ms, _client_options(args, args.router))
    try:
        with Live(console=console, auto_refresh=False) as live:
            for count, stats in enumerate(updates, start=1):
                live.update(top_table(stats), refresh=True)
                if limit and count >= limit:
                    break
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a dashboard ends: not an error
    finally:
        updates.close()  # closes the channel, which cancels the stream on the router
    return 0


def cmd_health(args: argparse.Namespace, console: Console) -> int:
    serving = is_serving(args.address, args.service, options=_client_options(args))
    console.print(f"{args.address}: {'SERVING' if serving else 'NOT SERVING'}")
    return 0 if serving else 1


def cmd_model_prepare(args: argparse.Namespace, console: Console) -> int:
    console.print(str(prepare_model(_load(args.config).model, console)))
    return 0


def cmd_quantize(args: argparse.Namespace, console: Console) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tierserve.worker.preparation import prepare_tier

    config = _load(args.config)
    tiers = list(config.served_tiers()) if args.tier == "all" else [args.tier]
    for tier in tiers:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as bar:
            task = bar.add_task(tier, total=1)

            def report(stage: str, done: int, total: int, task: TaskID = task, name: str = tier) -> None:
                bar.update(task, description=f"{name}: {stage}", completed=done, total=max(total, 1))

            prepared = prepare_tier(config, tier, report, console)
        card = prepared.card
        console.print(
            f"{tier}: artifact {prepared.artifact_dir}\n  {prepared.loaded.kernel}\n"
            f"  perplexity {card.perplexity:.3f} ({card.perplexity_delta_pct:+.2f}% vs fp32), "
            f"KL {card.kl_divergence:.5f}, top-1 agreement {card.top1_agreement:.1%}, "
            f"{card.eval_tokens} tokens",
            highlight=False,
        )
    return 0


def cmd_certs(args: argparse.Namespace, console: Console) -> int:
    from tierserve.ops.certs import make_pool_certificates, security_toml

    config = _load(args.config)
    names = [w.name for w in config.workers]
    # Named as this config's [security] expects (worker_server_name, router_client_name).
    certs = make_pool_certificates(Path(args.out), names, args.host or [], config.security)
    console.print(
        f"wrote a pool CA (servers, the router's client certificate), a client CA (the router's "
        f"callers) and certificates for the router, a client and {len(names)} workers "
        f"({', '.join(names)}) to {args.out}; add this to the config:\n",
        highlight=False,
    )
    print(security_toml(certs, config.security))
    return 0


def cmd_cache(args: argparse.Namespace, console: Console) -> int:
    from tierserve.worker.cache import in_use, prune, survey

    config = _load(args.config)
    cache_dir = config.model.resolved_cache_dir()
    with console.status("working out what this config's pool uses (hashing the model)"):
        entries = survey(cache_dir, in_use(config))
    if args.json:
        for entry in entries:
            record = {"path": str(entry.path), "kind": entry.kind.value, "size_bytes": entry.size_bytes}
            print(json.dumps({**record, "used": entry.kept, "why": entry.reason}))
        return 0
    console.print(cache_table(cache_dir, entries))
    stale = [entry for entry in entries if not entry.kept]
    reclaimable = sum(entry.size_bytes for entry in stale)
    if args.cache_command == "list" or args.dry_run:
        verb = "would free" if args.cache_command == "prune" else "`tierserve cache prune` frees"
        console.print(f"{len(stale)} not used by this config; {verb} {mib(reclaimable)}")
        return 0
    outcomes = prune(cache_dir, entries)
    freed = sum(entry.size_bytes for entry, skipped in outcomes if skipped is None)
    for entry, skipped in outcomes:
        if skipped is not None:
            console.print(f"[yellow]kept[/] {escape(str(entry.path))}: {escape(skipped)}")
    deleted = sum(skipped is None for _, skipped in outcomes)
    console.print(f"deleted {deleted} of {len(outcomes)}; freed {mib(freed)}")
    return 0 if deleted == len(outcomes) else 1


def cmd_config(args: argparse.Namespace, console: Console) -> int:
    print(config_to_toml(_load(args.config)))
    return 0


def cmd_bench_tiers(args: argparse.Namespace, console: Console) -> int:
    from tierserve.benchmarks.tiers.run import run_tiers_benchmark

    return run_tiers_benchmark(
        Path(args.out), args.config, args.tiers, args.runs, args.new_tokens, not args.no_llamacpp, console
    )


def cmd_plan(args: argparse.Namespace, console: Console) -> int:
    import json

    from tierserve.ops.capacity import Requirements, TierFigures, figures_from_workers, make_plan
    from tierserve.ops.capacity_bench import figures_from_files
    from tierserve.ops.capacity_report import print_plan

    requirements = Requirements(
        sessions_per_hour=args.sessions_per_hour,
        requests_per_session=args.requests_per_session,
        tokens_per_request=args.tokens_per_request,
        prompt_tokens=args.prompt_tokens,
        session_overhead_s=args.overhead_s,
        think_time_s=args.think_time_s,
        session_length_s=args.session_length_s,
        target_utilization=args.utilization,
        max_quality_loss_pct=args.max_quality_loss_pct,
    )
    figures: list[TierFigures] = []
    notes: list[str] = []
    if args.from_bench:
        figures, notes = figures_from_files([Path(name) for name in args.from_bench])
    elif args.router:
        reply = list_workers(args.router, options=_client_options(args, args.router))
        figures, notes = figures_from_workers(list(reply.workers))
    plan = make_plan(requirements, figures)
    plan.notes[:0] = notes
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
    else:
        print_plan(console, plan)
    return 0 if plan.budget.feasible else 1


def cmd_bench_routing(args: argparse.Namespace, console: Console) -> int:
    from tierserve.benchmarks.routing import run_routing_benchmark

    return run_routing_benchmark(
        Path(args.out),
        args.config,
        policies=args.policies,
        tiers=args.tiers,
        loads=args.loads,
        rates=args.rates,
        requests=args.requests,
        seed=args.seed,
        prompt_words_mix=args.prompt_words,
        new_tokens_mix=args.new_tokens,
        budgets=args.budgets,
        timeout_s=args.timeout_s,
        tight_share=args.tight_share,
        strict_share=args.strict_share,
        tight_tolerances=args.tight_tolerances,
        tolerances=args.tolerances,
        run_dir=Path(args.run_dir) if args.run_dir else None,
        console=console,
        calibrate_only=args.calibrate_only,
    )


def cmd_bench_overhead(args: argparse.Namespace, console: Console) -> int:
    from tierserve.benchmarks.overhead import run_overhead_benchmark

    return run_overhead_benchmark(
        Path(args.out),
        args.config,
        router=args.router,
        http=args.http,
        tier=args.tier,
        requests=args.requests,
        new_tokens=args.new_tokens,
        timeout_s=args.timeout_s,
        run_dir=Path(args.run_dir) if args.run_dir else None,
        console=console,
        concurrency=args.concurrency,
    )


def cmd_bench_chaos(args: argparse.Namespace, console: Console) -> int:
    from tierserve.benchmarks.chaos import run_chaos_benchmark

    return run_chaos_benchmark(
        Path(args.out),
        args.config,
        duration_s=args.duration_s,
        clients=args.clients,
        kill_every_s=args.kill_every_s,
        new_tokens=args.new_tokens,
        seed=args.seed,
        run_dir=Path(args.run_dir) if args.run_dir else None,
        console=console,
        tier=args.tier,
    )


def cmd_bench_soak(args: argparse.Namespace, console: Console) -> int:
    from tierserve.benchmarks.soak import run_soak_benchmark

    return run_soak_benchmark(
        Path(args.out),
        args.config,
        duration_s=args.duration_s,
        clients=args.clients,
        new_tokens=args.new_tokens,
        seed=args.seed,
        run_dir=Path(args.run_dir) if args.run_dir else None,
        console=console,
        with_tokens=not args.no_tokens,
        warmup=args.warmup_s,
    )


def cmd_bench_throughput(args: argparse.Namespace, console: Console) -> int:
    from tierserve.benchmarks.throughput.run import run_throughput_benchmark

    return run_throughput_benchmark(
        Path(args.out),
        args.config,
        tiers=args.tiers,
        concurrency=args.concurrency,
        requests_per_level=args.requests_per_level,
        new_tokens=args.new_tokens,
        timeout_s=args.timeout_s,
        run_dir=Path(args.run_dir) if args.run_dir else None,
        console=console,
    )


def cmd_bench_prefill_stall(args: argparse.Namespace, console: Console) -> int:
    from tierserve.benchmarks.prefill_stall import run_prefill_stall_benchmark

    return run_prefill_stall_benchmark(
        Path(args.out),
        args.config,
        tier=args.tier,
        streams=args.streams,
        prompt_words_count=args.prompt_words,
        chunks=args.chunks,
        stream_tokens=args.stream_tokens,
        timeout_s=args.timeout_s,
        run_dir=Path(args.run_dir) if args.run_dir else None,
        console=console,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tierserve", description=__doc__)
    parser.add_argument("--log-level", default="info", help="debug, info, warning or error")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", help="TOML config file (default: a pool that fits this machine)")
        return p

    up = with_config(commands.add_parser("up", help="start the router and the workers; Ctrl-C stops them"))
    up.add_argument("--run-dir", help="where logs, port files and resolved configs go (default: a temp dir)")
    up.add_argument(
        "--demo", nargs="?", const=DEMO_QUESTION, help="ask one question (a chat request) once serving"
    )
    up.add_argument(
        "--dry-run", action="store_true", help="print the placement plan and the pool's config, and exit"
    )
    up.add_argument(
        "--topology-root",
        help="plan for the sysfs tree under this directory instead of this machine (with --dry-run)",
    )
    up.set_defaults(run=cmd_up)

    worker = with_config(commands.add_parser("worker", help="run one worker in the foreground"))
    worker.add_argument("--name", required=True, help="the worker's name in the config")
    worker.add_argument("--port-file", help="write the bound port here once listening")
    worker.set_defaults(run=cmd_worker)

    router = with_config(commands.add_parser("router", help="run the router in the foreground"))
    router.add_argument("--port-file", help="write the bound port here once listening")
    router.set_defaults(run=cmd_router)

    generate = commands.add_parser("generate", help="stream a generation from the router")
    generate.add_argument("prompt", help="the prompt to continue; with --chat, the user's message")
    generate.add_argument(
        "--chat",
        action="store_true",
        help="send PROMPT as a user message, rendered by the model's chat template",
    )
    generate.add_argument("--system", help="a system message before the user's (implies --chat)")
    generate.add_argument("--address", default=DEFAULT_ROUTER_ADDRESS)
    generate.add_argument("--tier", help="pin a tier (fp32, bf16, ...)")
    generate.add_argument("--max-new-tokens", type=int)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    generate.add_argument("--top-p", type=float)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--stop", action="append", help="stop string (repeatable)")
    generate.add_argument("--plain", action="store_true", help="print only the text as it streams")
    generate.add_argument("--max-token-latency-ms", type=float, default=0.0, help="TPOT budget (0: default)")
    generate.add_argument(
        "--max-first-token-latency-ms", type=float, default=0.0, help="TTFT budget incl. waiting (0: default)"
    )
    generate.add_argument("--max-quality-loss-pct", type=float, help="accuracy tolerance (default: config)")
    generate.add_argument("--strict", action="store_true", help="refuse rather than serve best effort")
    _add_client_security(generate)
    generate.add_argument(
        "--retries", type=int, default=3, help="retries when the router is overloaded (default 3)"
    )
    generate.set_defaults(run=cmd_generate)

    workers = commands.add_parser("workers", help="print the router's worker table")
    workers.add_argument("--address", default=DEFAULT_ROUTER_ADDRESS)
    workers.add_argument("--json", action="store_true", help="print the ListWorkers reply as JSON")
    _add_client_security(workers)
    workers.set_defaults(run=cmd_workers)

    top = commands.add_parser("top", help="live dashboard of every worker's latency, load and throughput")
    top.add_argument("--router", "--address", dest="router", default=DEFAULT_ROUTER_ADDRESS)
    top.add_argument("--interval-ms", type=int, default=1000, help="update interval (at least 100)")
    top.add_argument("--iterations", type=int, default=0, help="stop after N updates (0: Ctrl-C)")
    top.add_argument("--once", action="store_true", help="print one snapshot and exit")
    _add_client_security(top)
    top.set_defaults(run=cmd_top)

    health = commands.add_parser("health", help="exit 0 if a server reports SERVING (grpc.health.v1)")
    health.add_argument("--address", default=DEFAULT_ROUTER_ADDRESS)
    health.add_argument("--service", default="", help="service name; empty = the whole server")
    _add_client_security(health)
    health.set_defaults(run=cmd_health)

    model = commands.add_parser("model", help="manage the served model")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    prepare = with_config(
        model_commands.add_parser("prepare", help="convert the default model into the cache")
    )
    prepare.set_defaults(run=cmd_model_prepare)

    quantize = with_config(
        commands.add_parser("quantize", help="build a tier's cached artifact and accuracy card ahead of time")
    )
    quantize.add_argument(
        "--tier", required=True, help="a tier name, or `all` for every tier the config serves"
    )
    quantize.set_defaults(run=cmd_quantize)

    certs = with_config(
        commands.add_parser(
            "certs", help="make a local CA and TLS certificates for the router and workers (development)"
        )
    )
    certs.add_argument("--out", required=True, help="directory for the PEM files")
    certs.add_argument(
        "--host", action="append", help="another name or address the servers are reached by (repeatable)"
    )
    certs.set_defaults(run=cmd_certs)

    cache = commands.add_parser(
        "cache", help="list the cached artifacts, kernels and models; prune what this config does not use"
    )
    cache_commands = cache.add_subparsers(dest="cache_command", required=True)
    listing = with_config(cache_commands.add_parser("list", help="what the cache holds, and what is in use"))
    listing.add_argument("--json", action="store_true", help="one JSON object per entry instead of a table")
    listing.set_defaults(run=cmd_cache, dry_run=True)
    pruning = with_config(
        cache_commands.add_parser(
            "prune",
            help="delete the artifacts, kernel builds and model conversions this config's pool would not "
            "load (after an upgrade); builds in progress are skipped",
        )
    )
    pruning.add_argument("--dry-run", action="store_true", help="list what would be deleted; delete nothing")
    pruning.set_defaults(run=cmd_cache, json=False)

    config = with_config(commands.add_parser("config", help="print the effective config as TOML"))
    config.set_defaults(run=cmd_config)

    plan = commands.add_parser(
        "plan",
        help="capacity planning: the per-token budget your application implies, the tiers that meet it, "
        "the concurrent streams each worker serves within it, and the workers each tier needs",
    )
    plan.add_argument("--sessions-per-hour", type=float, default=1000.0, help="user sessions per hour")
    plan.add_argument("--requests-per-session", type=float, default=5.0, help="requests per session")
    plan.add_argument("--tokens-per-request", type=float, default=128.0, help="output tokens per request")
    plan.add_argument("--prompt-tokens", type=float, help="prompt tokens per request (informational)")
    plan.add_argument("--overhead-s", type=float, default=10.0, help="per-session overhead, seconds")
    plan.add_argument("--think-time-s", type=float, default=20.0, help="user think time between requests")
    plan.add_argument("--session-length-s", type=float, default=150.0, help="target session length")
    plan.add_argument(
        "--utilization", type=float, default=0.7, help="target worker utilization in (0, 1] (default 0.7)"
    )
    plan.add_argument("--max-quality-loss-pct", type=float, help="only recommend tiers within this loss")
    measured = plan.add_mutually_exclusive_group()
    measured.add_argument(
        "--router",
        help="measured figures from a live pool's ListWorkers (host:port), with TPOT by concurrent streams",
    )
    measured.add_argument(
        "--from-bench",
        action="append",
        metavar="FILE",
        help="measured figures from a `tierserve bench tiers` or `bench throughput` JSON file (repeat to "
        "combine: tiers for the accuracy cards, throughput for streams per worker)",
    )
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    _add_client_security(plan)
    plan.set_defaults(run=cmd_plan)

    bench = commands.add_parser("bench", help="run a benchmark")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    bench_tiers = with_config(
        bench_commands.add_parser(
            "tiers", help="every tier, HF eager fp32 and llama.cpp on this machine: speed against accuracy"
        )
    )
    bench_tiers.add_argument("--out", required=True, help="results JSON (also writes .meta.json, .md, .png)")
    bench_tiers.add_argument("--tiers", help="comma-separated tiers (default: every registered tier)")
    bench_tiers.add_argument("--runs", type=int, default=5, help="measured runs per path (after warm-up)")
    bench_tiers.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per measured run")
    bench_tiers.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp peer")
    bench_tiers.set_defaults(run=cmd_bench_tiers)

    routing = with_config(
        bench_commands.add_parser(
            "routing", help="every routing policy on the same open-loop Poisson trace at several loads"
        )
    )
    routing.add_argument("--out", required=True, help="results JSON (also writes .md and .png)")
    routing.add_argument("--policies", help="comma-separated policies (default: every registered one)")
    routing.add_argument("--tiers", help="comma-separated tiers of the started pool (default: all)")
    routing.add_argument(
        "--loads", help="offered loads as fractions of the estimated capacity (default 0.25,0.5,0.75,1,1.25)"
    )
    routing.add_argument("--rates", help="offered loads in requests/s instead of --loads")
    routing.add_argument("--requests", type=int, default=120, help="requests per policy and load")
    routing.add_argument("--seed", type=int, default=7, help="seed of the arrival trace and request mix")
    routing.add_argument("--prompt-words", default="8,48,160", help="prompt lengths in words to mix")
    routing.add_argument("--new-tokens", default="16,32,64", help="output lengths in tokens to mix")
    routing.add_argument(
        "--budgets", help="TIGHT_TTFT,TIGHT_TPOT,LOOSE_TTFT,LOOSE_TPOT in ms (default: from measured figures)"
    )
    routing.add_argument(
        "--tight-share", type=float, default=0.5, help="share of requests with tight budgets (default 0.5)"
    )
    routing.add_argument(
        "--tolerances",
        help="tolerances (%%) drawn uniformly; repeat one to weight it, e.g. 0,1,1,10,10 (default 0,1,10)",
    )
    routing.add_argument(
        "--tight-tolerances",
        help="tolerances (%%) of tight-budget requests, e.g. 1,10 (default: the same 0,1,10 as the rest)",
    )
    routing.add_argument(
        "--strict-share",
        type=float,
        default=0.0,
        help="share of requests sent strict: refused rather than served late (default 0)",
    )
    routing.add_argument("--timeout-s", type=float, default=300.0, help="deadline of each request")
    routing.add_argument(
        "--calibrate-only",
        action="store_true",
        help="measure each tier's service rate and the pool's capacity, write them to --out, and stop",
    )
    routing.add_argument("--run-dir", help="the pool's run dir (default: a new temp dir)")
    routing.set_defaults(run=cmd_bench_routing)

    overhead = with_config(
        bench_commands.add_parser(
            "overhead", help="the same requests through the router and straight to a worker"
        )
    )
    overhead.add_argument("--out", required=True, help="results JSON (also writes .md)")
    overhead.add_argument("--router", help="an existing pool's router (default: start a one-worker pool)")
    overhead.add_argument(
        "--http",
        help="with --router: its OpenAI-compatible API's base URL (http://HOST:8000/v1), measured too",
    )
    overhead.add_argument("--tier", default="fp32", help="the worker's tier (default fp32)")
    overhead.add_argument(
        "--requests",
        type=int,
        default=40,
        help="rounds measured (each gives --concurrency router/direct pairs)",
    )
    overhead.add_argument(
        "--concurrency", type=int, default=1, help="streams sent at once on each path per round (default 1)"
    )
    overhead.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per request")
    overhead.add_argument("--timeout-s", type=float, default=300.0, help="deadline of each request")
    overhead.add_argument("--run-dir", help="the pool's run dir (default: a new temp dir)")
    overhead.set_defaults(run=cmd_bench_overhead)

    chaos = with_config(
        bench_commands.add_parser(
            "chaos", help="load while workers are killed and restarted: nothing may be lost"
        )
    )
    chaos.add_argument("--out", required=True, help="report JSON")
    chaos.add_argument("--duration-s", type=float, default=60.0, help="how long to send load")
    chaos.add_argument("--clients", type=int, default=4, help="clients sending in closed loop")
    chaos.add_argument("--kill-every-s", type=float, default=10.0, help="seconds between kill -9s")
    chaos.add_argument("--new-tokens", type=int, default=64, help="largest max_new_tokens of a request")
    chaos.add_argument(
        "--tier",
        default="fp32",
        help="the tier every request is pinned to (the pool needs two workers of it; default pool: two)",
    )
    chaos.add_argument("--seed", type=int, default=7, help="seed of the request mix and the victims")
    chaos.add_argument("--run-dir", help="the pool's run dir (default: a new temp dir)")
    chaos.set_defaults(run=cmd_bench_chaos)

    soak = with_config(
        bench_commands.add_parser(
            "soak", help="load above capacity for a while: memory and descriptors must stay flat"
        )
    )
    soak.add_argument("--out", required=True, help="report JSON")
    soak.add_argument("--duration-s", type=float, default=600.0, help="how long to send load (default 600)")
    soak.add_argument(
        "--clients", type=int, help="closed-loop clients (default: twice what the pool admits, +4)"
    )
    soak.add_argument(
        "--warmup-s",
        type=float,
        help="seconds of load before memory and descriptors are held to their bounds "
        "(default: a sixth of the run, at most 60)",
    )
    soak.add_argument("--new-tokens", type=int, default=16, help="largest max_new_tokens of a request")
    soak.add_argument("--seed", type=int, default=7, help="seed of the request mix")
    soak.add_argument(
        "--no-tokens",
        action="store_true",
        help="no bearer tokens (default: the router checks the soak's own tokens on every call)",
    )
    soak.add_argument("--run-dir", help="the pool's run dir (default: a new temp dir)")
    soak.set_defaults(run=cmd_bench_soak)

    throughput = with_config(
        bench_commands.add_parser(
            "throughput",
            help="tokens/s, TPOT and TTFT by concurrent streams per tier, continuous batching on and off",
        )
    )
    throughput.add_argument("--out", required=True, help="results JSON (also writes .md and .png)")
    throughput.add_argument("--tiers", help="comma-separated tiers (default: every tier of the pool)")
    throughput.add_argument(
        "--concurrency", default="1,2,4,8,16", help="concurrent streams per level (default 1,2,4,8,16)"
    )
    throughput.add_argument(
        "--requests-per-level",
        type=int,
        default=0,
        help="requests per level (default: two per stream, at least eight)",
    )
    throughput.add_argument("--new-tokens", type=int, default=128, help="greedy tokens per request")
    throughput.add_argument("--timeout-s", type=float, default=1800.0, help="deadline of each request")
    throughput.add_argument("--run-dir", help="the pools' run dir (default: a new temp dir each)")
    throughput.set_defaults(run=cmd_bench_throughput)

    stall = with_config(
        bench_commands.add_parser(
            "prefill-stall",
            help="how long a long prompt holds the decoding streams, with chunked prefill and without",
        )
    )
    stall.add_argument("--out", required=True, help="results JSON (also writes .md)")
    stall.add_argument("--tier", default="bf16", help="the tier measured (default bf16)")
    stall.add_argument("--streams", type=int, default=8, help="streams decoding when the prompt arrives")
    stall.add_argument(
        "--prompt-words", type=int, default=1500, help="words of the long prompt (1500: ~2,000 tokens)"
    )
    stall.add_argument(
        "--chunks", default="256,off", help="prefill_chunk_tokens values; off: one forward (default 256,off)"
    )
    stall.add_argument("--stream-tokens", type=int, default=384, help="greedy tokens per decoding stream")
    stall.add_argument("--timeout-s", type=float, default=900.0, help="deadline of each request")
    stall.add_argument("--run-dir", help="the pools' run dir (default: a new temp dir each)")
    stall.set_defaults(run=cmd_bench_prefill_stall)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    to_stderr = args.command not in (
        "generate",
        "workers",
        "config",
        "model",
        "quantize",
        "plan",
        "top",
        "cache",
    )
    stream = sys.stderr if to_stderr else sys.stdout
    # Logs and pipes get wide tables rather than columns folded at 80 characters.
    console = Console(stderr=to_stderr, width=None if stream.isatty() else NON_TTY_WIDTH)
    try:
        return int(args.run(args, console))
    except (ConfigError, ModelPreparationError, PlanningError, StartupError) as error:
        console.print(f"[red]error:[/] {escape(str(error))}")
        return 2
    except grpc.RpcError as error:
        code = error.code() if hasattr(error, "code") else None
        details = error.details() if hasattr(error, "details") else str(error)
        console.print(f"[red]error:[/] {code.name if code else 'RPC'}: {escape(str(details))}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
