"""Where a prompt chunk's prefill time goes, op by op, and how fast the same matmuls run on
oneDNN alone: what bounds bf16's prefill, and so its share of `bench throughput` (issue 15). A
diagnostic, not a benchmark of record.

    .venv/bin/python tools/profiling/prefill_ops.py --tier bf16 --length 256 --out prefill-ops.json

Prefills one chunk of `--length` random tokens through the batch's path (paged cache, the graph
that computes logits at the last position only), prints the median milliseconds and the ops
taking the most self time under torch's profiler; then times `torch.nn.functional.linear` in the
tier's dtype (oneDNN) on the decoder's matmul shapes at that many rows, with one weight per
layer called in turn, and reports TFLOPS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tierserve.domain.config import default_config
from tierserve.worker.kernels import decode_attention, last_logits
from tierserve.worker.kernels.paged_kv import BlockPool, PagedRow, blocks_for, cache_shape, paged_forward
from tierserve.worker.preparation import prepare_tier

TOP_OPS = 12


def median_s(call: Callable[[], Any], repeats: int) -> float:
    for _ in range(3):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """(out, in) of each decoder matmul of a Llama-like model."""
    hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
    head_dim = hidden // heads
    kv = int(getattr(config, "num_key_value_heads", heads)) * head_dim
    intermediate = int(config.intermediate_size)
    return {
        "q/k/v": (hidden + 2 * kv, hidden),
        "o_proj": (hidden, hidden),
        "gate/up": (2 * intermediate, hidden),
        "down_proj": (hidden, intermediate),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tier", default="bf16")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    loaded = prepare_tier(default_config([0, 1]), args.tier).loaded
    model = loaded.model
    kernel = decode_attention.load(decode_attention.default_dir()).kernel
    ids = torch.randint(100, 20000, (1, args.length), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(args.length).unsqueeze(0)
    with torch.inference_mode(), loaded.run_context():
        graph = last_logits.prefill_graph(model) or model.trace_graph
        keep = {"keep_from": args.length - 1} if graph is not model.trace_graph else {}
        pool = BlockPool(cache_shape(model), blocks_for(args.length) + 1, kernel)

        def prefill() -> None:
            row = PagedRow()
            paged_forward(graph, pool, [row], ids, positions, **keep)
            pool.release(row)

        prefill_ms = 1e3 * median_s(prefill, args.repeats)
        with torch.profiler.profile() as profile:
            for _ in range(4):
                prefill()
    events = sorted(profile.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    ops = [
        {
            "op": e.key,
            "ms_per_prefill": round(e.self_cpu_time_total / 4e3, 2),
            "calls_per_prefill": e.count // 4,
        }
        for e in events[:TOP_OPS]
    ]
    print(f"{args.tier}, {args.length} tokens: {prefill_ms:.1f} ms per prefill\n")
    print("| op | ms per prefill | calls |\n|---|---:|---:|")
    for op in ops:
        print(f"| `{op['op']}` | {op['ms_per_prefill']} | {op['calls_per_prefill']} |")
    dtype = torch.bfloat16 if args.tier == "bf16" else torch.float32
    layers = int(model.config.num_hidden_layers)
    matmuls = []
    print(f"\noneDNN alone ({dtype}), {args.length} rows, {layers} weights in turn:\n")
    print("| matmul | out x in | us per call | TFLOPS |\n|---|---|---:|---:|")
    for name, (out_features, in_features) in matmul_shapes(model.config).items():
        x = torch.randn(args.length, in_features).to(dtype)
        weights = [torch.randn(out_features, in_features).to(dtype) for _ in range(layers)]

        def all_layers(x: torch.Tensor = x, weights: list[torch.Tensor] = weights) -> None:
            for weight in weights:
                torch.nn.functional.linear(x, weight)

        seconds = median_s(all_layers, args.repeats) / layers
        tflops = 2 * args.length * in_features * out_features / seconds / 1e12
        matmuls.append({"matmul": name, "shape": [out_features, in_features], "us": round(1e6 * seconds, 1)})
        matmuls[-1]["tflops"] = round(tflops, 2)
        print(f"| {name} | {out_features} x {in_features} | {1e6 * seconds:.1f} | {tflops:.2f} |")
    report = {"tier": args.tier, "length": args.length, "prefill_ms": round(prefill_ms, 1), "ops": ops}
    report["onednn_matmuls"] = matmuls
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
