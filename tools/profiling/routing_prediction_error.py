"""How far the router's predictions were from what clients saw, in `tierserve bench routing` results:
per offered rate and run, the median and 90th percentile of actual over predicted TTFT and TPOT, and
the requests whose first token came much later than predicted (over 1.5x and 250 ms late).

    .venv/bin/python tools/profiling/routing_prediction_error.py old.json new.json --policy slo \
        [--json summary.json]

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


def summary(name: str, result: dict[str, Any]) -> dict[str, Any]:
    requests = result["requests"]
    ttft = ratios(requests, "ttft_ms", "predicted_ttft_ms")
    tpot = ratios(requests, "tpot_ms", "predicted_tpot_ms")
    return {
        "rate_rps": round(float(result["rate_rps"]), 2),
        "run": name,
        "ttft_ratio_p50": round(statistics.median(ttft), 3) if ttft else None,
        "ttft_ratio_p90": round(quantile(ttft, 0.9), 3) if ttft else None,
        "tpot_ratio_p50": round(statistics.median(tpot), 3) if tpot else None,
        "tpot_ratio_p90": round(quantile(tpot, 0.9), 3) if tpot else None,
        "late_first_tokens": late(requests),
        "requests": len(requests),
        "full_service_level": round(float(result["service_level_attainment"]), 4),
    }


def row(line: dict[str, Any]) -> str:
    def spread(kind: str) -> str:
        p50, p90 = line[f"{kind}_ratio_p50"], line[f"{kind}_ratio_p90"]
        return "-" if p50 is None else f"{p50:.2f} / {p90:.2f}"

    return (
        f"| {line['rate_rps']:.2f} | {line['run']} | {spread('ttft')} | {spread('tpot')} | "
        f"{line['late_first_tokens']} of {line['requests']} | {100 * line['full_service_level']:.1f}% |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", nargs="+", type=Path, help="bench routing JSON files")
    parser.add_argument("--policy", default="slo")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    runs = {path.stem: json.loads(path.read_text())["results"] for path in args.results}
    rates = sorted({round(float(r["rate_rps"]), 2) for results in runs.values() for r in results})
    lines = [
        summary(name, result)
        for rate in rates
        for name, results in runs.items()
        for result in results
        if result["policy"] == args.policy and round(float(result["rate_rps"]), 2) == rate
    ]
    print(
        "| req/s | run | TTFT actual / predicted, p50 / p90 | TPOT actual / predicted, p50 / p90 "
        f"| first token > {LATE_RATIO}x and {LATE_MS:.0f} ms late | full service level |"
    )
    print("|---:|---|---:|---:|---:|---:|")
    for line in lines:
        print(row(line))
    if args.json:
        args.json.write_text(json.dumps({"policy": args.policy, "rows": lines}, indent=1) + "\n")


if __name__ == "__main__":
    main()
