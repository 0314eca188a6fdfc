"""`tierserve bench soak`'s report for people: a table on the console and a markdown file, from the
report's JSON. Per process, resident memory and open descriptors before the load, after warm-up, at
their most, last under load and after the load, the growth the verdict judges and its bound."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

COLUMNS = (
    "process",
    "pid",
    "RSS MiB before / warm / max / last / after",
    "RSS growth (bound)",
    "fds before / warm / max / last / after",
    "fd growth (bound)",
    "verdict",
)


def _figure(sample: dict[str, Any] | None, key: str) -> str:
    if sample is None:
        return "-"
    return f"{sample[key]:.0f}" if key == "rss_mib" else str(sample[key])


def process_row(p: dict[str, Any]) -> list[str]:
    """One process's cells, in COLUMNS' order."""
    bounds = p["bounds"]
    if "growth" in p:
        points = (p["before_load"], p["first_after_warmup"], p["max"], p["last"], p["after_load"])
        rss = " / ".join(_figure(s, "rss_mib") for s in points)
        fds = " / ".join(_figure(s, "fds") for s in points)
        rss_growth = f"{p['growth']['rss_mib']:+.1f} (<= {bounds['rss_growth_mib']:.0f})"
        fd_growth = f"{p['growth']['fds']:+d} (<= {bounds['fd_growth']})"
    else:
        rss, fds = "-", "-"
        rss_growth = f"- (<= {bounds['rss_growth_mib']:.0f})"
        fd_growth = f"- (<= {bounds['fd_growth']})"
    verdict = "ok" if p["within_bounds"] else "; ".join(p["problems"])
    return [p["process"], str(p["pid"]), rss, rss_growth, fds, fd_growth, verdict]


def request_lines(report: dict[str, Any]) -> list[str]:
    r, recovery, mix = report["requests"], report["recovery"], report["mix"]
    lines = [
        f"requests: sent {r['sent']}, completed {r['completed']}, refused {r['refused']} "
        f"({r['refused_for_client_limit']} for the client's own limit; "
        f"refusal p50 {r['refusal_ms']['p50']} ms, p99 {r['refusal_ms']['p99']} ms; retry hints "
        f"{r['retry_hint_ms']['min']}-{r['retry_hint_ms']['max']} ms, {r['refusals_without_hint']} without), "
        f"by code {r['by_code']}, unfinished {r['unfinished']}; served by {r['served_by']}",
        f"mix: {mix['kinds']}; prompts of {mix['prompt_words']['min']}-{mix['prompt_words']['max']} words "
        f"({mix['prompt_words']['distinct']} lengths)",
    ]
    tokens = report["config"]["tokens"]
    if tokens:
        lines.append(
            "tokens on: "
            + ", ".join(
                f"{name} ({t['clients']} clients, "
                + (f"at most {t['max_streams']} streams)" if t["max_streams"] else "no limit of its own)")
                for name, t in tokens.items()
            )
        )
        lines.append(
            "calls without a valid token: "
            + "; ".join(f"{kind}: {codes}" for kind, codes in report["without_valid_token"].items())
        )
    else:
        lines.append("tokens off")
    lines.append(f"after the load: a plain request {recovery['status']} in {recovery['ms']:.0f} ms")
    return lines


def verdict_line(report: dict[str, Any]) -> str:
    bounds, verdict = report["bounds"], report["verdict"]
    return (
        f"verdict: {'PASS' if verdict['passed'] else 'FAIL'} (bounds per process after warm-up: RSS growth "
        f"<= {bounds['rss_growth_mib']:.0f} MiB, fd growth <= {bounds['fd_growth']}; refusals p99 <= "
        f"{bounds['refusal_p99_ms']:.0f} ms)" + "".join(f"\n  - {p}" for p in verdict["problems"])
    )


def title(report: dict[str, Any]) -> str:
    config = report["config"]
    return (
        f"soak: {config['duration_s']:.0f} s, warm-up {config['warmup_s']:.0f} s, "
        f"{config['clients']} clients against room for {config['admitted']}"
    )


def print_report(report: dict[str, Any], console: Console) -> None:
    table = Table(title=title(report))
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("process", "verdict") else "right")
    for p in report["processes"]:
        table.add_row(*process_row(p))
    console.print(table)
    for line in request_lines(report):
        console.print(line, highlight=False)
    console.print(verdict_line(report), highlight=False)


def soak_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# {title(report)}",
        "",
        "Before: before the first request; warm: the first sample after warm-up; last: the last under "
        "load; after: once the load stopped and a plain request completed. The growth judged is last "
        "against warm.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "| --- | " + " | ".join("---:" for _ in COLUMNS[1:-1]) + " | --- |",
        *("| " + " | ".join(process_row(p)) + " |" for p in report["processes"]),
        "",
        *(f"- {line}" for line in request_lines(report)),
        "",
        verdict_line(report).replace("\n  - ", "\n- "),
    ]
    return "\n".join(lines) + "\n"
