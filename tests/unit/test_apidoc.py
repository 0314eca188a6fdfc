"""docs/api.md is generated from the protos, is up to date, and documents every field."""

from __future__ import annotations

import re

from tierserve.rpc.apidoc import API_DOC, parse_protos, render


def test_api_doc_is_up_to_date_and_complete() -> None:
    rendered = render(parse_protos())
    assert API_DOC.read_text(encoding="utf-8") == rendered, "docs/api.md is stale: run `make proto`"
    rows = [line for line in rendered.splitlines() if line.startswith("| `")]
    undocumented = [row for row in rows if re.search(r"\|\s*\|$", row)]
    assert not undocumented, f"fields without a `///` comment: {undocumented}"
    for name in ("GenerateRequest", "Summary", "Token", "WorkerInfo", "FinishReason", "Router", "Worker"):
        assert f"`{name}`" in rendered
    assert "| `max_token_latency_ms` | 9 | `float` |" in rendered
