"""The fit formula against hand computations, and the correction from measurements (no NATS)."""

import pytest

from services.hardware_inventory.domain.correction import (
    MAX_FACTOR, MIN_FACTOR, IgnoredMeasurement, apply, ignore, learn, note,
)
from services.hardware_inventory.domain.fit import FitParams, activation_bytes, predict, refusal
from shared.architectures import ENGINE, unsupported_reason
from shared.catalog import ModelMetadata
from shared.errors import Invalid
from shared.inventory import Correction, ModelShape

# Llama-3-8B: 8,030,261,248 parameters in bf16.
LLAMA3_8B = ModelShape(
    architecture="LlamaForCausalLM", dtype="bfloat16", parameters=8_030_261_248, weight_bytes=16_060_522_496,
    num_layers=32, hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8, head_dim=128,
    vocab_size=128256, context_length=8192,
)


def test_llama3_8b_weights_and_kv_cache_match_the_hand_computation():
    est = predict(LLAMA3_8B, "cuda", context_length=8192, batch=1)
    assert est.dtype == "bfloat16"
    assert est.weights == 16_060_522_496  # ~16.06 GB
    assert est.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131_072
    assert est.kv_cache == 131_072 * (8192 + 16)  # 1 GiB for 8k tokens, plus the engine's null block
    # activations: a 4096-token prefill chunk through one layer + logits/softmax of 256 rows in fp32
    per_token = 3 * 4096 + (32 + 2 * 8) * 128 + 3 * 14336
    assert est.activations == 4096 * per_token * 2 + 2 * 256 * 128256 * 4
    assert est.total == est.weights + est.kv_cache + est.activations + est.workspace
    assert est.booked == est.total + est.runtime_overhead
    assert 17.5e9 < est.total < 18.2e9


def test_batch_and_context_scale_the_kv_cache_rounded_to_blocks():
    one = predict(LLAMA3_8B, "cuda", context_length=1000, batch=1)
    four = predict(LLAMA3_8B, "cuda", context_length=1000, batch=4)
    assert one.kv_cache == 131_072 * (1008 + 16)  # 63 blocks of 16, and the null block
    assert four.kv_cache == 131_072 * (4 * 1008 + 16)  # one null block for the whole cache
    assert four.weights == one.weights


def test_cpu_serves_a_16_bit_checkpoint_in_16_bits_and_float32_on_request():
    cpu = predict(LLAMA3_8B, "cpu", context_length=2048)
    assert cpu.dtype == "bfloat16" and cpu.weights == 16_060_522_496 and cpu.kv_bytes_per_token == 131_072
    f32 = predict(LLAMA3_8B, "cpu", context_length=2048, dtype="float32")
    assert f32.weights == 2 * 16_060_522_496 and f32.kv_bytes_per_token == 262_144
    assert (
        predict(LLAMA3_8B.model_copy(update={"dtype": "float32", "weight_bytes": 2 * 16_060_522_496}), "cpu").dtype
        == "float32"
    )


def test_int8_counts_one_byte_per_quantized_weight():
    """Llama 3 8B: 32 layers of q/k/v/o (4096 x 6144 + 4096 x 4096) and MLP (3 x 4096 x 14336) go to one
    byte a weight plus a bf16 scale per output row; embeddings and the head (2 x 128256 x 4096) stay bf16."""
    q8 = predict(LLAMA3_8B, "cuda", context_length=2048, quantize="int8")
    linear = 32 * (4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336)
    rows = 32 * (6144 + 4096 + 2 * 14336 + 4096)
    assert q8.quantize == "int8" and q8.dtype == "bfloat16"
    assert q8.weights == 16_060_522_496 - linear + 2 * rows
    assert q8.kv_cache == predict(LLAMA3_8B, "cuda", context_length=2048).kv_cache  # the cache is not quantized
    assert (
        predict(
            LLAMA3_8B.model_copy(update={"dtype": "float32", "weight_bytes": 2 * 16_060_522_496}),
            "cpu",
            quantize="int8",
        ).dtype
        == "bfloat16"
    )  # the CPU int8 kernel is fast with bf16 activations
    q4 = predict(LLAMA3_8B, "cuda", context_length=2048, quantize="int4")
    assert q4.weights == 16_060_522_496 - 2 * linear + linear // 2 + linear // 8  # bf16 scale + zero per 32
    with pytest.raises(Invalid, match="unsupported quantization"):
        predict(LLAMA3_8B, "cpu", quantize="int3")


def test_short_requests_use_a_smaller_activation_step():
    assert activation_bytes(LLAMA3_8B, 2, 16, FitParams()) < activation_bytes(LLAMA3_8B, 2, 4096, FitParams())


def meta(architecture: str, **runtime) -> ModelMetadata:
    return ModelMetadata(architecture=architecture, parameters=1, dtype="BF16", weight_bytes=2, **runtime)


def test_the_runtime_push_recorded_decides_else_the_architecture_as_served_now():
    assert refusal(meta("NopeForCausalLM", runtime=ENGINE)) is None  # push recorded a runtime that serves it
    assert refusal(meta("LlamaForCausalLM", runtime=None)) is None  # none at push time; served now
    assert refusal(meta("LlamaForCausalLM")) is None  # a manifest from before the field: by its architecture
    assert (
        refusal(meta("FalconForCausalLM"))
        == refusal(meta("FalconForCausalLM", runtime=None))
        == unsupported_reason(["FalconForCausalLM"])
    )
    assert refusal(meta("FalconForCausalLM", runtime="some-runtime-not-here")) == unsupported_reason(
        ["FalconForCausalLM"]
    )
    assert "supported: LlamaForCausalLM, " in refusal(meta("FalconForCausalLM"))


# Mixtral-8x7B: 8 experts of intermediate 14336 per layer, 2 per token.
MIXTRAL = LLAMA3_8B.model_copy(
    update={
        "architecture": "MixtralForCausalLM",
        "vocab_size": 32000,
        "context_length": 32768,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "expert_intermediate_size": 14336,
    }
)
# Qwen3-30B-A3B: 128 experts of 768, 8 per token; intermediate_size (6144) is the dense MLP's.
QWEN3_MOE = ModelShape(
    architecture="Qwen3MoeForCausalLM",
    dtype="bfloat16",
    parameters=30_532_122_624,
    weight_bytes=61_064_245_248,
    num_layers=48,
    hidden_size=2048,
    intermediate_size=6144,
    num_heads=32,
    num_kv_heads=4,
    head_dim=128,
    vocab_size=151936,
    context_length=40960,
    num_experts=128,
    num_experts_per_tok=8,
    expert_intermediate_size=768,
)


def test_moe_activations_count_each_routed_copy_one_expert_at_a_time_and_the_router():
    """As engine/moe.py runs a layer: per routed copy of a token's row, the copy, its expert output, the
    weighted output in fp32 and its cast (5 x hidden); one expert's gate, up, act at a time; the router's
    logits and fp32 probabilities (3 x experts)."""
    mixtral = predict(MIXTRAL, "cuda", context_length=8192)
    moe = 2 * 5 * 4096 + 3 * 14336 + 3 * 8
    assert mixtral.activations == 4096 * (3 * 4096 + (32 + 2 * 8) * 128 + moe) * 2 + 2 * 256 * 32000 * 4
    dense = predict(
        MIXTRAL.model_copy(update={"num_experts": None, "num_experts_per_tok": None}), "cuda", context_length=8192
    )
    assert mixtral.activations - dense.activations == 4096 * (moe - 3 * 14336) * 2  # the routed copies, the router
    qwen = predict(QWEN3_MOE, "cuda", context_length=4096)  # 8 copies of a 2048 row outweigh a 768-wide expert
    moe = 8 * 5 * 2048 + 3 * 768 + 3 * 128
    assert moe > 3 * 6144  # wider than its dense MLP would be
    assert qwen.activations == 4096 * (3 * 2048 + (32 + 2 * 4) * 128 + moe) * 2 + 2 * 256 * 151936 * 4
    assert qwen.weights == 61_064_245_248  # every expert's weights: what the checkpoint holds


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"context_length": 100_000}, "exceeds the model's maximum of 8192"),
        ({"batch": 0}, "batch must be >= 1"),
        ({"dtype": "float7"}, "unsupported dtype"),
    ],
)
def test_bad_prediction_inputs_are_refused_with_the_reason(kwargs, message):
    with pytest.raises(Invalid, match=message):
        predict(LLAMA3_8B, "cuda", **kwargs)


def measured(raw, overhead: float) -> int:
    """A peak as a worker reports it: the weights, the KV cache it was told to allocate, and ``overhead``
    x the activations and workspace the formula predicted."""
    return raw.weights + raw.kv_cache + int(overhead * (raw.activations + raw.workspace))


def test_a_measurement_moves_the_next_prediction_to_it_and_the_error_shrinks():
    raw = predict(LLAMA3_8B, "cuda", context_length=8192)
    measured_peak = measured(raw, 1.5)  # activations and workspace took half again what the formula said
    c0 = Correction(architecture="LlamaForCausalLM", dtype="bfloat16", device_kind="cuda")
    c1 = learn(c0, raw, raw.total, raw.weights, raw.kv_cache, measured_peak, "d1.0.0")
    assert c1.samples == 1 and c1.last_error == pytest.approx(raw.total / measured_peak - 1, abs=1e-6)
    corrected = apply(c1, raw)
    assert abs(corrected.total - measured_peak) / measured_peak < 0.001
    c2 = learn(c1, raw, corrected.total, raw.weights, raw.kv_cache, measured_peak, "d2.0.0")
    assert abs(c2.last_error) < abs(c1.last_error) and abs(c2.last_error) < 0.001
    assert (
        learn(c2, raw, corrected.total, raw.weights, raw.kv_cache, measured_peak, "d2.0.0") is c2
    )  # idempotent per sample
    # the correction carries over to another context length of the same kind of model
    other = apply(c2, predict(LLAMA3_8B, "cuda", context_length=2048))
    assert other.total > predict(LLAMA3_8B, "cuda", context_length=2048).total


def test_the_kv_cache_is_never_corrected():
    """The worker allocates exactly the KV cache it is told to, and its context is what that cache holds:
    scaling it by what measurements taught fed each measurement back into the next (256 -> 224 -> 176 -> 144)."""
    raw = predict(LLAMA3_8B, "cuda", context_length=8192)
    c = Correction(architecture="LlamaForCausalLM", dtype="bfloat16", device_kind="cuda")
    for i in range(5):
        c = learn(c, raw, apply(c, raw).total, raw.weights, raw.kv_cache, measured(raw, 0.6), f"d{i}.0.0")
        assert apply(c, raw).kv_cache == raw.kv_cache
    assert c.overhead_factor == pytest.approx(0.6, abs=0.01)


def test_an_implausible_measurement_is_refused_and_factors_are_clamped():
    raw = predict(LLAMA3_8B, "cuda", context_length=8192)
    c0 = Correction(architecture="LlamaForCausalLM", dtype="bfloat16", device_kind="cuda")
    with pytest.raises(IgnoredMeasurement, match="implausible"):
        learn(c0, raw, raw.total, raw.weights * 2, raw.kv_cache, raw.weights, "x")
    high = learn(c0, raw, raw.total, raw.weights, raw.kv_cache, measured(raw, 2.8), "y")
    assert high.overhead_factor == MAX_FACTOR == 2.0
    low = learn(c0, raw, raw.total, raw.weights, raw.kv_cache, measured(raw, 0.4), "z")
    assert low.overhead_factor == MIN_FACTOR == 0.5


TINY_F32 = ModelShape(
    architecture="LlamaForCausalLM",
    dtype="float32",
    num_layers=4,
    hidden_size=256,
    intermediate_size=768,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    vocab_size=32000,
    context_length=256,
    weight_bytes=48_000_000,
    parameters=12_000_000,
)


def test_a_measurement_too_small_to_mean_anything_is_ignored():
    raw = predict(TINY_F32, "cpu")  # the built-in model on a CPU: the process grew by 17.5 MiB (+1091 %)
    peak = int(17.5 * 2**20)
    c0 = Correction(architecture="LlamaForCausalLM", dtype="float32", device_kind="cpu")
    with pytest.raises(IgnoredMeasurement, match="too small to learn from") as caught:
        learn(c0, raw, raw.total, 12 * 2**20, raw.kv_cache, peak, "x")
    ignored = ignore(c0, caught.value, "x")
    assert (ignored.samples, ignored.ignored, apply(ignored, raw)) == (0, 1, raw)
    assert ignore(ignored, caught.value, "x") is ignored  # counted once per replica
    assert "too small to learn from" in note(raw, ignored) and note(raw, ignored).startswith("no correction")


def test_a_measurement_too_far_from_the_formula_is_ignored():
    raw = predict(LLAMA3_8B, "cuda", context_length=8192)
    c0 = Correction(architecture="LlamaForCausalLM", dtype="bfloat16", device_kind="cuda")
    with pytest.raises(IgnoredMeasurement, match="too far from the formula"):
        learn(c0, raw, raw.total, raw.weights, raw.kv_cache, 4 * raw.total, "x")  # another process counted in


def test_the_note_says_by_how_much_and_from_how_many():
    raw = predict(LLAMA3_8B, "cuda", context_length=8192)
    c = Correction(architecture="LlamaForCausalLM", dtype="bfloat16", device_kind="cuda")
    assert note(raw, None).startswith("no correction yet")
    c = learn(c, raw, raw.total, raw.weights, raw.kv_cache, measured(raw, 1.5), "a")
    c = learn(c, raw, raw.total, raw.weights, raw.kv_cache, measured(raw, 1.5), "b")
    factor = apply(c, raw).total / raw.total
    assert note(raw, c).startswith(f"corrected by x{factor:.2f} from 2 measurements")
