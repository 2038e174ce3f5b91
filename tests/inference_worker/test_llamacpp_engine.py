"""The llama.cpp runtime on GGUF files the tests write (no hub): the same model as our engine's
safetensors checkpoint gives the same greedy tokens; concurrent requests, decoded together in one
llama_decode with one sequence id each, give what each gives alone; the context, stop strings,
seeds, logprobs and cancel behave as on the engine."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from services.inference_worker.engine import ContextLengthError, EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from services.inference_worker.llamacpp import LlamaCppEngine  # noqa: E402
from tests.engine.conftest import _one_torch_thread, build_checkpoint, tokenizer_dir  # noqa: E402,F401
from tests.support.gguf_model import write_llama_gguf, write_random_gguf  # noqa: E402

GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def q8(tmp_path_factory) -> LlamaCppEngine:
    path = write_random_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q8_0.gguf", "q8_0", seed=3)
    engine = LlamaCppEngine(path, max_model_len=128, max_num_seqs=8, n_threads=1)
    yield engine
    engine.close()


def test_the_same_weights_give_the_engines_greedy_tokens(tmp_path, tokenizer_dir):  # noqa: F811
    ckpt = build_checkpoint(tmp_path / "hf", tokenizer_dir, arch="llama", seed=1).path
    gguf_path = write_llama_gguf(ckpt, tmp_path / "tiny.F32.gguf", "f32")
    ours = LLMEngine.from_pretrained(ckpt, EngineConfig(device="cpu", dtype="float32", num_blocks=64))
    theirs = LlamaCppEngine(gguf_path, max_model_len=256, n_threads=1, kv_type="f32", flash_attn=False)
    try:
        for prompt in ("The quick brown fox", "Once upon a time there was a small model that wanted to"):
            a = ours.generate([prompt], GREEDY)[0]
            b = theirs.generate([prompt], GREEDY)[0]
            assert b.prompt_token_ids == a.prompt_token_ids  # the same vocabulary, merges and BOS
            assert b.token_ids == a.token_ids and b.text == a.text
        chat = [{"role": "user", "content": "Call me Ishmael."}]
        rid_a = ours.add_request(None, GREEDY, messages=chat)
        rid_b = theirs.add_request(None, GREEDY, messages=chat)
        done_a = _run(ours, rid_a)
        done_b = _run(theirs, rid_b)
        assert done_b.prompt_token_ids == done_a.prompt_token_ids and done_b.text == done_a.text
    finally:
        theirs.close()


@pytest.fixture(scope="module")
def exact(tmp_path_factory) -> LlamaCppEngine:
    """F32 weights and cells, no flash attention: what llama.cpp computes does not depend on the batch
    (with f16 rounding a random model's near-tied logits may flip one way alone and the other in a batch)."""
    path = write_random_gguf(tmp_path_factory.mktemp("gguf") / "tiny.F32.gguf", "f32", seed=3)
    engine = LlamaCppEngine(path, max_model_len=128, max_num_seqs=8, n_threads=1, kv_type="f32", flash_attn=False)
    yield engine
    engine.close()


def test_concurrent_requests_are_decoded_together_and_each_gets_what_it_gets_alone(exact):
    prompts = ["a", "hello there", "the quick brown fox jumps", "0123456789" * 3, "xyz", "zz top"]
    alone = [exact.generate([p], GREEDY)[0] for p in prompts]
    together = exact.generate(prompts, GREEDY)
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert [o.text for o in together] == [o.text for o in alone]
    assert exact.stats()["num_running"] == 0


def test_a_prompt_longer_than_the_batch_is_prefilled_in_chunks(exact, tmp_path):
    small = LlamaCppEngine(exact.path, max_model_len=128, max_num_seqs=4, n_threads=1, kv_type="f32", flash_attn=False,
                           n_batch=16)
    try:
        assert small.n_batch == 16
        prompts = ["a long prompt of more than sixteen tokens, " * 2, "short"]
        assert [o.token_ids for o in small.generate(prompts, GREEDY)] == [
            o.token_ids for o in exact.generate(prompts, GREEDY)
        ]
    finally:
        small.close()


def test_the_batch_really_holds_every_request(q8):
    for p in ("one", "two", "three"):
        q8.add_request(p, SamplingParams(max_tokens=5, temperature=0))
    q8.step()  # admits all three and prefills them in one llama_decode
    assert q8.stats()["num_running"] == 3
    while q8.has_unfinished():
        q8.step()
    assert q8.stats()["num_running"] == 0 and q8.stats()["kv_blocks_used"] == 0


def test_context_overflow_is_the_engines_context_length_error(q8):
    with pytest.raises(ContextLengthError) as info:
        q8.add_request(list(range(5, 133)), GREEDY, reject_invalid=True)
    assert (info.value.max_model_len, info.value.prompt_tokens) == (128, 128)
    with pytest.raises(ContextLengthError):
        q8.add_request("hi", SamplingParams(max_tokens=200), reject_invalid=True, cap_max_tokens=False)
    out = q8.generate(["hi"], SamplingParams(max_tokens=None, temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.prompt_token_ids) + len(out.token_ids) == 128


def test_seeds_logprobs_stop_strings_and_cancel(q8):
    seeded = SamplingParams(max_tokens=10, temperature=1.0, seed=7, logprobs=2)
    a, b = q8.generate(["seed me"], seeded)[0], q8.generate(["seed me"], seeded)[0]
    assert a.token_ids == b.token_ids and len(a.logprobs) == 10 and len(a.logprobs[0].top) == 2
    full = q8.generate(["stop"], SamplingParams(max_tokens=12, temperature=0))[0]
    cut = full.text[3:6]
    if cut:
        stopped = q8.generate(["stop"], SamplingParams(max_tokens=12, temperature=0, stop=[cut]))[0]
        assert stopped.finish_reason == "stop" and stopped.text == full.text[: full.text.find(cut)]
    events = []
    rid = q8.add_request("cancel me", SamplingParams(max_tokens=50, temperature=0), callback=events.append)
    q8.step()
    assert q8.cancel(rid)
    q8.step()
    assert events[-1].finished and events[-1].finish_reason == "cancelled" and not q8.has_unfinished()


def _run(engine, rid):
    while True:
        for out in engine.step():
            if out.request_id == rid:
                return out


def test_device_placement_of_the_layers():
    """CPU offloads nothing (a CUDA build of llama.cpp would otherwise put every layer on the GPU);
    cuda[:N] offloads every layer to that one GPU, or says how to get a build that can."""
    import llama_cpp as C

    from services.inference_worker.llamacpp.engine import offload_params

    assert offload_params("cpu").n_gpu_layers == 0
    with pytest.raises(ValueError, match="cpu or cuda"):
        offload_params("rocm:0")
    if C.llama_supports_gpu_offload():
        p = offload_params("cuda:1")
        assert (p.n_gpu_layers, p.main_gpu, p.split_mode) == (0x7FFFFFFF, 1, C.LLAMA_SPLIT_MODE_NONE)
    else:  # this machine's build: the refusal names the build option
        with pytest.raises(RuntimeError, match="GGML_CUDA=on"):
            offload_params("cuda:0")
