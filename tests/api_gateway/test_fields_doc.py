"""docs/api-fields.md lists every field the gateway's request models know, and the fields it says are
refused are refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.api_gateway.domain.embeddings import EmbeddingsRequest
from services.api_gateway.domain.requests import ChatCompletionRequest, CompletionRequest

DOC = Path(__file__).resolve().parents[2] / "docs" / "api-fields.md"
ROUTES = {"chat": ChatCompletionRequest, "completions": CompletionRequest, "embeddings": EmbeddingsRequest}
BASE = {
    "chat": {"model": "m", "messages": [{"role": "user", "content": "x"}]},
    "completions": {"model": "m", "prompt": "x"},
}
REFUSED = {"suffix": "x", "best_of": 2, "functions": [], "function_call": "auto"}


def rows() -> list[tuple[list[str], list[str], str]]:
    out = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            routes = ["chat", "completions"] if cells[1] == "both" else [cells[1]]
            out.append((re.findall(r"`(\w+)`", cells[0]), routes, cells[2]))
    return out


def test_every_model_field_is_in_the_table_and_nothing_else_is_called_supported():
    documented = {(f, r) for fields, routes, _ in rows() for f in fields for r in routes}
    supported = {(f, r) for fields, routes, status in rows() for f in fields for r in routes if status != "refused"}
    known = {(f, r) for r, model in ROUTES.items() for f in model.model_fields}
    assert known <= documented
    assert supported <= known


@pytest.mark.parametrize("route", ["chat", "completions"])  # embeddings refuses nothing it knows
def test_fields_the_table_calls_refused_are_refused(route):
    refused = [
        f
        for fields, routes, status in rows()
        if route in routes and ("refused" in status or status == "1 only")
        for f in fields
    ]
    assert refused
    for field in refused:
        with pytest.raises(ValidationError):
            ROUTES[route].model_validate({**BASE[route], field: REFUSED[field]})
