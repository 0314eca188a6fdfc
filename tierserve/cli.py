"""The `tierserve` command: run a pool, talk to it, prepare the model."""

from __future__ import annotations

import argparse
import asyncio
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

from tierserve.client import DEFAULT_ROUTER_ADDRESS, is_serving, list_workers, stream_generate
from tierserve.config import ConfigError, TierserveConfig, config_to_toml, default_config, load_config
from tierserve.errors import StartupError
from tierserve.modelprep import ModelPreparationError, prepare_model
from tierserve.render import kernels_table, print_token, summary_table, workers_table
from tierserve.v1 import generate_pb2

DEMO_PROMPT = "The capital of France is"
NON_TTY_WIDTH = 200


def _load(path: str | None) -> TierserveConfig:
    if path:
        return load_config(Path(path))
    return default_config(sorted(os.sched_getaffinity(0)))


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_up(args: argparse.Namespace, console: Console) -> int:
    from tierserve.launcher import LaunchError, PoolLauncher, install_stop_signals

    config = _load(args.config)
    run_dir = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="tierserve-run-"))
    if args.dry_run:
        print(config_to_toml(config))
        return 0
    install_stop_signals()
    launcher = PoolLauncher(config, run_dir, console)
    try:
        address = launcher.start()
        _print_workers(console, address)
        if args.demo:
            console.print(f"\n[bold]demo request[/] to the router at {address}: {args.demo!r}")
            _generate(console, address, generate_pb2.GenerateRequest(prompt=args.demo, max_new_tokens=32))
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


def cmd_worker(args: argparse.Namespace, console: Console) -> int:
    # Before torch loads: compile in-process instead of forking a pool of compile workers per
    # worker (IPEX's traced graphs never use them; they only cost memory and processes).
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    from worker.server import serve_worker

    asyncio.run(serve_worker(_load(args.config), args.name, Path(args.port_file) if args.port_file else None))
    return 0


def cmd_router(args: argparse.Namespace, console: Console) -> int:
    from router.server import serve_router

    asyncio.run(serve_router(_load(args.config), Path(args.port_file) if args.port_file else None))
    return 0


def _generate(
    console: Console, address: str, request: generate_pb2.GenerateRequest, plain: bool = False
) -> None:
    for response in stream_generate(address, request):
        if response.HasField("token"):
            if plain:
                console.print(response.token.text, end="", soft_wrap=True, highlight=False, markup=False)
            else:
                print_token(console, response.token)
        else:
            text = response.summary.text
            console.print(f"\n[bold]text:[/] {request.prompt}[green]{text}[/]", highlight=False)
            console.print(summary_table(response.summary))


def cmd_generate(args: argparse.Namespace, console: Console) -> int:
    request = generate_pb2.GenerateRequest(
        prompt=args.prompt,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop or [],
        tier=args.tier or "",
    )
    if args.max_new_tokens is not None:
        request.max_new_tokens = args.max_new_tokens
    if args.top_p is not None:
        request.top_p = args.top_p
    _generate(console, args.address, request, plain=args.plain)
    return 0


def _print_workers(console: Console, address: str) -> None:
    workers = list(list_workers(address).workers)
    console.print(workers_table(workers))
    console.print(kernels_table(workers))


def cmd_workers(args: argparse.Namespace, console: Console) -> int:
    if args.json:
        print(json_format.MessageToJson(list_workers(args.address), indent=2))
    else:
        _print_workers(console, args.address)
    return 0


def cmd_health(args: argparse.Namespace, console: Console) -> int:
    serving = is_serving(args.address, args.service)
    console.print(f"{args.address}: {'SERVING' if serving else 'NOT SERVING'}")
    return 0 if serving else 1


def cmd_model_prepare(args: argparse.Namespace, console: Console) -> int:
    console.print(str(prepare_model(_load(args.config).model, console)))
    return 0


def cmd_quantize(args: argparse.Namespace, console: Console) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from worker.preparation import prepare_tier

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


def cmd_config(args: argparse.Namespace, console: Console) -> int:
    print(config_to_toml(_load(args.config)))
    return 0


def cmd_bench_tiers(args: argparse.Namespace, console: Console) -> int:
    from tierserve.benchmarks.tiers import run_tiers_benchmark

    return run_tiers_benchmark(
        Path(args.out), args.config, args.tiers, args.runs, args.new_tokens, not args.no_llamacpp, console
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
    up.add_argument("--demo", nargs="?", const=DEMO_PROMPT, help="send one demo request once serving")
    up.add_argument("--dry-run", action="store_true", help="print the pool's config and exit")
    up.set_defaults(run=cmd_up)

    worker = with_config(commands.add_parser("worker", help="run one worker in the foreground"))
    worker.add_argument("--name", required=True, help="the worker's name in the config")
    worker.add_argument("--port-file", help="write the bound port here once listening")
    worker.set_defaults(run=cmd_worker)

    router = with_config(commands.add_parser("router", help="run the router in the foreground"))
    router.add_argument("--port-file", help="write the bound port here once listening")
    router.set_defaults(run=cmd_router)

    generate = commands.add_parser("generate", help="stream a generation from the router")
    generate.add_argument("prompt")
    generate.add_argument("--address", default=DEFAULT_ROUTER_ADDRESS)
    generate.add_argument("--tier", help="pin a tier (fp32, bf16, ...)")
    generate.add_argument("--max-new-tokens", type=int)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    generate.add_argument("--top-p", type=float)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--stop", action="append", help="stop string (repeatable)")
    generate.add_argument("--plain", action="store_true", help="print only the text as it streams")
    generate.set_defaults(run=cmd_generate)

    workers = commands.add_parser("workers", help="print the router's worker table")
    workers.add_argument("--address", default=DEFAULT_ROUTER_ADDRESS)
    workers.add_argument("--json", action="store_true", help="print the ListWorkers reply as JSON")
    workers.set_defaults(run=cmd_workers)

    health = commands.add_parser("health", help="exit 0 if a server reports SERVING (grpc.health.v1)")
    health.add_argument("--address", default=DEFAULT_ROUTER_ADDRESS)
    health.add_argument("--service", default="", help="service name; empty = the whole server")
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

    config = with_config(commands.add_parser("config", help="print the effective config as TOML"))
    config.set_defaults(run=cmd_config)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    to_stderr = args.command not in ("generate", "workers", "config", "model", "quantize")
    stream = sys.stderr if to_stderr else sys.stdout
    # Logs and pipes get wide tables rather than columns folded at 80 characters.
    console = Console(stderr=to_stderr, width=None if stream.isatty() else NON_TTY_WIDTH)
    try:
        return int(args.run(args, console))
    except (ConfigError, ModelPreparationError, StartupError) as error:
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
