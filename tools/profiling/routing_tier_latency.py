"""Per tier, what clients saw in `tierserve bench routing` results: for each run and offered rate,
how many requests each tier served and their TPOT and TTFT p50, and how many met their full service
level. Shows which worker a pool's misses come from (e.g. a faster fp32 kernel moving them to the
tight requests' worker).

    .venv/bin/python tools/profiling/routing_tier_latency.py run-a.json run-b.json --policy slo \
        [--json tiers.json]

Prints a markdown table per tier: one row per run, one cell per rate ("n / TPOT p50 / TTFT p50").
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def tier_cells(results: list[dict[str, Any]], policy: str, tier: str) -> list[dict[str, Any]]:
    """Per rate: the requests `tier` served, with their TPOT and TTFT p50 (ms; None if none)."""
    cells = []
    for result in (r for r in results if r["policy"] == policy):
        served = [q for q in result["requests"] if q.get("tier") == tier and q.get("tpot_ms") is not None]
        cells.append(
            {
                "rate_rps": result["rate_rps"],
                "requests": len(served),
                "tpot_p50_ms": statistics.median(q["tpot_ms"] for q in served) if served else None,
                "ttft_p50_ms": statistics.median(q["ttft_ms"] for q in served) if served else None,
            }
        )
    return cells


def cell_text(cell: dict[str, Any]) -> str:
    if not cell["requests"]:
        return "0"
    return f"{cell['requests']} / {cell['tpot_p50_ms']:.1f} / {cell['ttft_p50_ms']:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--policy", default="slo")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report: dict[str, dict[str, Any]] = {}
    for path in args.runs:
        results = json.loads(path.read_text())["results"]
        tiers = sorted({q["tier"] for r in results for q in r["requests"] if q.get("tier")})
        served = [r["service_level_met"] for r in results if r["policy"] == args.policy]
        report[path.stem] = {
            "full_service_level_by_rate": served,
            "tiers": {tier: tier_cells(results, args.policy, tier) for tier in tiers},
        }
    all_tiers = sorted({tier for run in report.values() for tier in run["tiers"]})
    for tier in all_tiers:
        rates = next(
            [c["rate_rps"] for c in run["tiers"][tier]] for run in report.values() if tier in run["tiers"]
        )
        print(f"\n{tier}: requests served / TPOT p50 ms / TTFT p50 ms, by offered rate (req/s)\n")
        print("| run | " + " | ".join(str(rate) for rate in rates) + " |")
        print("|---|" + "---|" * len(rates))
        for name, run in report.items():
            cells = run["tiers"].get(tier, [])
            print(f"| {name} | " + " | ".join(cell_text(c) for c in cells) + " |")
    print("\nfull service level, by offered rate:\n")
    for name, run in report.items():
        by_rate = run["full_service_level_by_rate"]
        print(f"- {name}: {', '.join(map(str, by_rate))} (all {sum(by_rate)})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
