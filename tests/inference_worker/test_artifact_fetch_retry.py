"""A deploy's fetch waits out a transient JetStream failure (a clustered model-store stream electing a
leader answers 503 for a moment) instead of failing the replica for good; anything else fails at once.
Plain Python: the fetch helper is replaced, the retry is shared/bus.retry_transient."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from nats.js.errors import ServiceUnavailableError

from services.inference_worker.adapters.artifacts import ModelStoreSource
from shared import model_fetch as fetch
from shared import bus
from shared.events import ModelId

MODEL = ModelId(name="tiny", version=1, digest="sha256:" + "ab" * 32)


def fetcher(failures: list[BaseException]):
    calls = []

    async def fetch_model(_nc, ref: str, cache_dir: Path):
        calls.append(ref)
        if failures:
            raise failures.pop(0)
        return SimpleNamespace(path=cache_dir / "tiny", resolved=SimpleNamespace(model=MODEL, aliases=["prod"]))

    return fetch_model, calls


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(bus, "RETRY_DELAYS_S", (0.01, 0.01, 0.01))


async def test_a_503_is_waited_out(monkeypatch, tmp_path):
    fetch_model, calls = fetcher([ServiceUnavailableError(), ServiceUnavailableError()])
    monkeypatch.setattr(fetch, "fetch_model", fetch_model)
    artifact = await ModelStoreSource(None, tmp_path).fetch(MODEL, "tiny")  # type: ignore[arg-type]
    assert artifact.model == MODEL and artifact.aliases == ("prod",)
    assert calls == ["tiny:1"] * 3


async def test_a_503_that_lasts_fails_with_it_and_a_bad_checkpoint_is_not_retried(monkeypatch, tmp_path):
    fetch_model, calls = fetcher([ServiceUnavailableError()] * 4)
    monkeypatch.setattr(fetch, "fetch_model", fetch_model)
    with pytest.raises(ServiceUnavailableError):
        await ModelStoreSource(None, tmp_path).fetch(MODEL, "tiny")  # type: ignore[arg-type]
    assert len(calls) == 4  # the first try and three retries

    fetch_model, calls = fetcher([fetch.VerificationError("config.json: sha256 mismatch")])
    monkeypatch.setattr(fetch, "fetch_model", fetch_model)
    with pytest.raises(fetch.VerificationError, match="sha256 mismatch"):
        await ModelStoreSource(None, tmp_path).fetch(MODEL, "tiny")  # type: ignore[arg-type]
    assert len(calls) == 1
