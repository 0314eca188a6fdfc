"""How far the router's predictions were from what clients saw, in `tierserve bench routing` results:
per offered rate and run, the median and 90th percentile of actual over predicted TTFT and TPOT, and
the requests whose first token came much later than predicted (over 1.5x and 250 ms late).

    .venv/bin/python tools/profiling/routing_prediction_error.py old.json new.json --policy slo

A router that predicts short sends requests where they miss their budgets; one that predicts long
refuses or steers away requests that would have met them. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

# A first token this much later than predicted, and by at least this much, counts as a miss of the
# prediction (not of the budget).
LATE_RATIO, LATE_MS = 1.5, 250.0


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ratios(requests: list[dict[str, Any]], actual: str, predicted: str) -> list[float]:
    return [
        r[actual] / r[predicted]
        for r in requests
        if r.get("status") == "OK" and r.get(predicted, 0) > 0 and r.get(actual, 0) > 0
    ]


def late(requests: list[dict[str, Any]]) -> int:
    return sum(
        1
        for r in requests
        if r.get("status") == "OK"
        and r.get("predicted_ttft_ms", 0) > 0
        and r["ttft_ms"] > LATE_RATIO * r["predicted_ttft_ms"]
        and r["ttft_ms"] - r["predicted_ttft_ms"] > LATE_MS
    )


def row(name: str, result: dict[str, Any]) -> str:
    requests = result["requests"]
    ttft = ratios(requests, "ttft_ms", "predicted_ttft_ms")
    tpot = ratios(requests, "tpot_ms", "predicted_tpot_ms")

    def spread(values: list[float]) -> str:
        if not values:
            return "-"
        return f"{statistics.median(values):.2f} / {quantile(values, 0.9):.2f}"

    return (
        f"| {float(result['rate_rps']):.2f} | {name} | {spread(ttft)} | {spread(tpot)} | "
        f"{late(requests)} of {len(requests)} | {100 * result['service_level_attainment']:.1f}% |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", nargs="+", type=Path, help="bench routing JSON files")
    parser.add_argument("--policy", default="slo")
    args = parser.parse_args()
    runs = {path.stem: json.loads(path.read_text())["results"] for path in args.results}
    print(
        "| req/s | run | TTFT actual / predicted, p50 / p90 | TPOT actual / predicted, p50 / p90 "
        f"| first token > {LATE_RATIO}x and {LATE_MS:.0f} ms late | full service level |"
    )
    print("|---:|---|---:|---:|---:|---:|")
    rates = sorted({round(float(r["rate_rps"]), 2) for results in runs.values() for r in results})
    for rate in rates:
        for name, results in runs.items():
            for result in results:
                if result["policy"] == args.policy and round(float(result["rate_rps"]), 2) == rate:
                    print(row(name, result))


if __name__ == "__main__":
    main()
