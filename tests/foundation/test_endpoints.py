"""shared/endpoints.py: where `strata up` serves each HTTP API, for the strata commands on the machine."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from services.model_store import client
from shared import endpoints, http_tls


@pytest.mark.parametrize(("served", "reached"), [
    ("http://0.0.0.0:8002", "http://127.0.0.1:8002"),
    ("https://[::]:8443", "https://[::1]:8443"),
    ("http://127.0.0.1:8002", "http://127.0.0.1:8002"),
    ("https://gpu-box.lan:9000", "https://gpu-box.lan:9000"),
])
def test_a_bind_everything_address_is_reached_over_loopback(served, reached):
    assert endpoints.local(served) == reached


def test_written_read_and_removed(tmp_path):
    assert endpoints.read(tmp_path) is None
    endpoints.write(tmp_path, endpoints.Endpoints(urls={"model-store": "https://127.0.0.1:9002"}, ca="/x/ca.pem"))
    assert endpoints.read(tmp_path) == endpoints.Endpoints(
        urls={"model-store": "https://127.0.0.1:9002"}, ca="/x/ca.pem"
    )
    assert not list(tmp_path.glob("*.tmp"))
    endpoints.remove(tmp_path)
    endpoints.remove(tmp_path)  # twice: no error
    assert endpoints.read(tmp_path) is None


def test_a_file_strata_up_cannot_have_written_is_ignored_with_a_warning(tmp_path, caplog):
    (tmp_path / endpoints.FILE).write_text('{"urls": "not a mapping"}')
    with caplog.at_level(logging.WARNING):
        assert endpoints.read(tmp_path) is None
    assert endpoints.FILE in caplog.text


def test_the_environment_wins_then_the_file_then_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATA_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("STRATA_MODEL_STORE_URL", raising=False)
    assert client.default_url() == client.DEFAULT_URL
    endpoints.write(tmp_path, endpoints.Endpoints(urls={"model-store": "https://127.0.0.1:9002"}))
    assert client.default_url() == "https://127.0.0.1:9002"
    assert (
        endpoints.url("monitor", "STRATA_MONITOR_URL", "http://127.0.0.1:8005") == "http://127.0.0.1:8005"
    )  # not served
    monkeypatch.setenv("STRATA_MODEL_STORE_URL", "http://elsewhere:1")
    assert client.default_url() == "http://elsewhere:1"


def test_the_ca_strata_up_names_is_trusted_after_the_environments(tmp_path, monkeypatch):
    monkeypatch.delenv(http_tls.CA_ENV, raising=False)
    given = tmp_path / "given-ca.pem"
    endpoints.write(tmp_path, endpoints.Endpoints(urls={}, ca=str(given)))
    assert http_tls.trusted_ca(data_dir=tmp_path) == given  # e.g. strata up --https-ca: nothing under http/tls/
    monkeypatch.setenv(http_tls.CA_ENV, "/from/env.pem")
    assert http_tls.trusted_ca(data_dir=tmp_path) == Path("/from/env.pem")
    endpoints.remove(tmp_path)
    monkeypatch.delenv(http_tls.CA_ENV)
    assert http_tls.trusted_ca(data_dir=tmp_path) is None  # plain HTTP: the system's roots
