"""Two `tierserve bench routing` results on the same trace (batching off, then on), side by side at
equal offered loads: the issue-15 routing comparison.

    .venv/bin/python tools/profiling/routing_side_by_side.py off.json on.json --policy slo

Prints a markdown table: per offered rate, the share served at full service level (both budgets
and the tolerance) off and on, TPOT and TTFT p50, accuracy violations and rejections; then the
highest offered rate at which each run served >= 90% at full service level (none if no rate did)
and their ratio where both exist (the issue's target: >= 4x).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

FULL_SERVICE = 0.90


def rows_by_rate(path: Path, policy: str) -> dict[float, dict[str, Any]]:
    results = json.loads(path.read_text())["results"]
    # Rounded as the reports print them: a run given --loads offers capacity x load (0.4397 req/s),
    # and the other run is given that rate as printed (--rates 0.44).
    return {round(float(r["rate_rps"]), 2): r for r in results if r["policy"] == policy}


def highest_rate_served(rows: dict[float, dict[str, Any]]) -> float | None:
    served = [rate for rate, r in rows.items() if r["service_level_attainment"] >= FULL_SERVICE]
    return max(served) if served else None


def pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def table(off: dict[float, dict[str, Any]], on: dict[float, dict[str, Any]]) -> list[str]:
    lines = [
        "| req/s | full service level, off | on | TPOT p50 off / on ms | TTFT p50 off / on ms "
        "| accuracy violations off / on | rejected off / on |",
        "|---:|---:|---:|---:|---:|---|---|",
    ]
    for rate in sorted(set(off) & set(on)):
        a, b = off[rate], on[rate]
        lines.append(
            f"| {rate:g} | {pct(a['service_level_attainment'])} | {pct(b['service_level_attainment'])} "
            f"| {a['tpot_p50_ms']:.2f} / {b['tpot_p50_ms']:.2f} "
            f"| {a['ttft_p50_ms']:.1f} / {b['ttft_p50_ms']:.1f} "
            f"| {a['accuracy_violations']} / {b['accuracy_violations']} "
            f"| {a['rejected_total']} / {b['rejected_total']} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("off", type=Path, help="bench routing JSON with batching off")
    parser.add_argument("on", type=Path, help="bench routing JSON with batching on, same trace")
    parser.add_argument("--policy", default="slo")
    args = parser.parse_args()
    off, on = rows_by_rate(args.off, args.policy), rows_by_rate(args.on, args.policy)
    print("\n".join(table(off, on)))
    best_off, best_on = highest_rate_served(off), highest_rate_served(on)
    print()
    print(f"- highest offered rate served >= 90% at full service level: off {best_off}, on {best_on} req/s")
    if best_off and best_on:
        print(f"- ratio on / off: {best_on / best_off:.2f}x (target >= 4x)")
    else:
        print("- ratio on / off: not computed (a run served no offered rate at >= 90%)")


if __name__ == "__main__":
    main()
