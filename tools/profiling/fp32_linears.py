"""The fp32 tier's linear layers alone, a decode step's worth: tierserve's float32 kernel
(`fp32_linear.cpp`) against oneDNN's prepacked linear (what IPEX's fp32 graph runs) on every
matrix of the default model's shapes, and the lm_head alone on oneDNN against aten::mm (what IPEX's
graph ran for a head tied to the embedding). Each matrix is its own tensor, so the weights stream
from memory as in a real step. A diagnostic for the fp32 kernel path, not a benchmark of record.

    taskset -c 1 .venv/bin/python tools/profiling/fp32_linears.py --out fp32-linears.json

Prints, per number of rows, the median ms of each over `--repeats` calls of the whole set, and the
bytes read per ms (weights only).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import intel_extension_for_pytorch  # noqa: F401  (registers torch.ops.ipex_prepack)
import torch
from prefill_paths import median_ms
from transformers import AutoConfig

from tierserve.domain.config import default_config
from tierserve.worker.kernels.linears import pack_for_fp32_lanes, tierserve_fp32_kernel
from tierserve.worker.preparation import prepare_model


def model_shapes(model_dir: Path) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """(out, in) of every decoder layer's fused matrices (qkv, o, gate_up, down), and the lm_head's."""
    config = AutoConfig.from_pretrained(model_dir)
    hidden, inter = int(config.hidden_size), int(config.intermediate_size)
    head_dim = hidden // int(config.num_attention_heads)
    kv = int(config.num_key_value_heads) * head_dim
    layer = [(hidden + 2 * kv, hidden), (hidden, hidden), (2 * inter, hidden), (hidden, inter)]
    return layer * int(config.num_hidden_layers), (int(config.vocab_size), hidden)


def parse_rows(text: str) -> list[int]:
    return [int(rows) for rows in text.split(",")]


def measured(
    rows: int,
    weights: list[torch.Tensor],
    packed: list[torch.Tensor],
    onednn: list[Any],
    repeats: int,
    generator: torch.Generator,
) -> dict[str, float]:
    """Median ms of the whole set of matrices at `rows` rows on each kernel, and of the lm_head alone."""
    kernel = tierserve_fp32_kernel()
    xs = [torch.randn(rows, w.shape[1], generator=generator) for w in weights]
    head = weights[-1]
    with torch.inference_mode():
        row = {
            "rows": rows,
            "tierserve ms": median_ms(
                lambda: [kernel(x, p) for x, p in zip(xs, packed, strict=True)], repeats
            ),
            "oneDNN ms": median_ms(
                lambda: [torch.ops.ipex_prepack.linear_run(x, c) for x, c in zip(xs, onednn, strict=True)],
                repeats,
            ),
            "lm_head oneDNN ms": median_ms(
                lambda: torch.ops.ipex_prepack.linear_run(xs[-1], onednn[-1]), repeats
            ),
            "lm_head aten::mm ms": median_ms(lambda: torch.mm(xs[-1], head.t()), repeats),
        }
    print(json.dumps({k: round(v, 2) for k, v in row.items()}), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,2,3,4,6,8,12,16")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    kernel = tierserve_fp32_kernel()
    if kernel is None:
        raise SystemExit("tierserve's fp32 kernel is not built here (it needs AVX-512F)")
    from rich.console import Console

    model_dir = prepare_model(default_config([0]).model, Console(stderr=True))
    layer_shapes, head_shape = model_shapes(model_dir)
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=generator) * 0.05 for shape in [*layer_shapes, head_shape]]
    packed = [pack_for_fp32_lanes(w) for w in weights]
    onednn = [torch.ops.ipex_prepack.linear_prepack(w, None, None) for w in weights]
    megabytes = sum(w.numel() * 4 for w in weights) / 1e6
    rows_out = [
        measured(rows, weights, packed, onednn, args.repeats, generator) for rows in parse_rows(args.rows)
    ]
    for row in rows_out:
        row["tierserve GB/s"] = megabytes / row["tierserve ms"]
        row["oneDNN GB/s"] = megabytes / row["oneDNN ms"]
    report = {"weights_mb": megabytes, "threads": torch.get_num_threads(), "rows": rows_out}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{megabytes:.0f} MB of fp32 weights, {torch.get_num_threads()} thread(s)\n")
    print(
        "| rows | tierserve ms | oneDNN ms | oneDNN / tierserve | lm_head oneDNN ms | lm_head aten::mm ms |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows_out:
        ratio = r["oneDNN ms"] / r["tierserve ms"]
        print(
            f"| {r['rows']} | {r['tierserve ms']:.2f} | {r['oneDNN ms']:.2f} | {ratio:.2f}x"
            f" | {r['lm_head oneDNN ms']:.2f} | {r['lm_head aten::mm ms']:.2f} |"
        )


if __name__ == "__main__":
    main()
