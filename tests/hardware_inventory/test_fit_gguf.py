"""Fit for a GGUF model (llama.cpp): weights as stored, type by type; the KV cache from n_layer,
n_head_kv, head_dim and f16 cells for context x batch; llama.cpp's compute buffer."""

from __future__ import annotations

import pytest

pytest.importorskip("gguf")

from shared.errors import Invalid  # noqa: E402
from services.hardware_inventory.domain.fit import predict, refusal, shape_from_metadata  # noqa: E402
from services.hardware_inventory.domain.fit_gguf import compute_buffer  # noqa: E402
from services.model_store.adapters.gguf_file import inspect_gguf  # noqa: E402
from services.model_store.domain.metadata import gguf_metadata  # noqa: E402
from tests.support.gguf_model import write_random_gguf  # noqa: E402


@pytest.fixture(scope="module")
def meta(tmp_path_factory):
    path = write_random_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q8_0.gguf", "q8_0")
    return gguf_metadata({"tiny.Q8_0.gguf": inspect_gguf("tiny.Q8_0.gguf", path)})


def test_weights_are_counted_as_stored_and_the_kv_cache_by_context_and_batch(meta):
    assert refusal(meta) is None
    shape = shape_from_metadata(meta)
    assert (shape.format, shape.dtype) == ("gguf", "Q8_0")
    one = predict(shape, "cpu", context_length=200, batch=1)
    assert one.weights == meta.weight_bytes == sum(meta.bytes_by_type.values())
    per_cell = 2 * 2 * 2 * 16 * 2  # K and V x 2 layers x 2 kv heads x head_dim 16 x f16
    assert one.kv_bytes_per_token == per_cell and one.kv_cache == per_cell * 256  # 200 cells padded to 256
    four = predict(shape, "cpu", context_length=200, batch=4)
    assert four.kv_cache == per_cell * 1024
    assert four.activations == compute_buffer(shape, 1024, 800) > one.activations
    assert four.total == four.weights + four.kv_cache + four.activations + four.workspace


def test_a_dtype_or_a_context_beyond_the_model_is_refused(meta):
    shape = shape_from_metadata(meta)
    with pytest.raises(Invalid, match="does not apply"):
        predict(shape, "cpu", dtype="bfloat16")
    with pytest.raises(Invalid, match="outside"):
        predict(shape, "cpu", context_length=257)
