"""`strata model convert`: a safetensors Llama imported from the Hugging Face cache becomes a Q4_K_M GGUF,
a new signed version whose source names the version it came from; the ledger shows source -> derived,
and the result loads in the llama.cpp runtime and generates. What cannot be converted faithfully is
refused, and nothing is stored."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

from cli.main import main  # noqa: E402
from services.provenance_ledger.service_layer.ledger_app import LedgerApp
from services.model_store.client import StoreClient  # noqa: E402
from services.model_store.convert.hf_to_gguf import Unconvertible, write_llama_gguf  # noqa: E402
from shared.errors import Invalid  # noqa: E402
from shared.model_source import ModelSource  # noqa: E402
from tests.model_store.conftest import make_checkpoint  # noqa: E402
from tests.support.gguf_model import write_random_gguf, write_random_pair  # noqa: E402
from tests.support.helpers import eventually, make_service  # noqa: E402
from tests.support.local_caches import make_hf_snapshot  # noqa: E402

# k-quants work on rows of 256: a model this wide is really Q4_K_M, not llama.cpp's fallbacks for narrow rows
SHAPE = dict(hidden=256, intermediate=512, heads=4, kv_heads=2, layers=2, seed=5)


def strata(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def test_a_safetensors_model_converted_to_q4_k_m_keeps_its_lineage_and_generates(
        live_store, nats_server, tmp_path, capsys, monkeypatch):
    from services.inference_worker.engine import SamplingParams
    from services.inference_worker.llamacpp import LlamaCppEngine
    from services.provenance_ledger.service_layer.queries import model_lineage

    ckpt, _ = write_random_pair(tmp_path / "made", ftypes=(), **SHAPE)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    make_hf_snapshot(tmp_path / "hub", "acme/tiny-llama", {p.name: p.read_bytes() for p in ckpt.iterdir()})
    url = ("--url", live_store.url)
    ledger = make_service("provenance-ledger", nats_server.url, tmp_path / "ledger")
    async with ledger.running():
        code, out, err = await asyncio.to_thread(strata, capsys, "model", "import", "hf:acme/tiny-llama", *url)
        assert code == 0, err
        code, out, err = await asyncio.to_thread(strata, capsys, "model", "convert", "tiny-llama", "--to", "gguf",
                                                 "--quant", "q4_k_m", "--threads", "1", *url)
        assert code == 0, err
        assert re.match(
            r"converted tiny-llama:1 -> tiny-llama:2 sha256:[0-9a-f]{64} "
            r"\(Q4_K_M, \d+ bytes in [\d.]+s: F16 [\d.]+s, quantize [\d.]+s\)",
            out,
        ), out
        client = StoreClient(live_store.url)
        source, derived = client.resolve("tiny-llama:1"), client.resolve("tiny-llama:2")
        meta = derived.manifest.metadata
        assert (meta.format, meta.quantization, meta.architecture) == ("gguf", "Q4_K_M", "llama")
        assert set(meta.bytes_by_type) >= {"Q4_K", "Q6_K", "F32"}
        s = derived.manifest.source
        assert (s.kind, s.name, s.reference, s.derived_from) == ("conversion", "tiny-llama", "1", source.model.digest)
        assert (
            s.digests["model.safetensors"]
            == f"sha256:{next(f.sha256 for f in source.manifest.files if f.path == 'model.safetensors')}"
        )
        assert "llama.cpp quantize" in s.recipe
        # converting again gives the same bytes: the same version
        code, out, _ = await asyncio.to_thread(
            strata,
            capsys,
            "model",
            "convert",
            "tiny-llama:1",
            "--to",
            "gguf",
            "--quant",
            "q4_k_m",
            "--threads",
            "1",
            *url,
        )
        assert code == 0 and "already converted tiny-llama:1 -> tiny-llama:2" in out

        store = ledger.part(LedgerApp).ledger.store
        await eventually(
            lambda: (
                model_lineage(store, "tiny-llama:2")["models"][0]["derived_from"][:1]
                and model_lineage(store, "tiny-llama:2")["models"][0]["derived_from"][0]["in_ledger"]
            ),
            20,
            "the conversion's model.registered and its source's in the ledger",
        )
        nats_url = ("--nats-url", nats_server.url)
        code, out, err = await asyncio.to_thread(
            strata, capsys, "lineage", "--model", "tiny-llama:2", "--json", *nats_url
        )
        assert code == 0, err
        down = json.loads(out)["models"][0]
        code, out, _ = await asyncio.to_thread(
            strata, capsys, "lineage", "--model", "tiny-llama:1", "--json", *nats_url
        )
        up = json.loads(out)["models"][0]
        code, table, _ = await asyncio.to_thread(strata, capsys, "lineage", "--model", "tiny-llama:2", *nats_url)
    assert down["digest"] == derived.model.digest and down["source"]["kind"] == "conversion"
    parent = down["derived_from"][0]
    assert (parent["name"], parent["version"], parent["digest"]) == ("tiny-llama", 1, source.model.digest)
    assert parent["source"]["kind"] == "huggingface" and parent["source"]["name"] == "acme/tiny-llama"
    assert [d["digest"] for d in up["derivatives"]] == [derived.model.digest] and "Q4_K_M" in up["derivatives"][0][
        "recipe"
    ]
    assert f"from      tiny-llama:1  {source.model.digest}" in table and "recipe    safetensors -> GGUF F16" in table

    pulled = tmp_path / "pulled"
    client.pull("tiny-llama:2", pulled)
    (gguf_file,) = pulled.glob("*.gguf")
    engine = LlamaCppEngine(gguf_file, max_model_len=128, n_threads=1)
    try:
        out = engine.generate(["The quick brown fox"], SamplingParams(max_tokens=8, temperature=0))[0]
    finally:
        engine.close()
    assert len(out.token_ids) == 8 and out.finish_reason == "length" and isinstance(out.text, str)


def test_an_f16_gguf_is_quantized_as_is(live_store, tmp_path, capsys):
    (tmp_path / "g").mkdir()
    f16 = write_random_gguf(tmp_path / "g" / "tiny.F16.gguf", "f16", **SHAPE)
    url = ("--url", live_store.url)
    assert strata(capsys, "model", "push", str(f16), "--name", "tiny", *url)[0] == 0
    code, out, err = strata(
        capsys, "model", "convert", "tiny", "--to", "gguf", "--quant", "q8_0", "--name", "tiny-q8", *url
    )
    assert code == 0 and out.startswith("converted tiny:1 -> tiny-q8:1"), err
    client = StoreClient(live_store.url)
    derived = client.resolve("tiny-q8").manifest
    assert (
        derived.metadata.quantization == "Q8_0" and derived.source.derived_from == client.resolve("tiny:1").model.digest
    )
    assert derived.source.recipe.startswith("GGUF F16 -> Q8_0 (llama.cpp quantize")
    code, _, err = strata(capsys, "model", "convert", "tiny", "--to", "gguf", "--quant", "f16", *url)
    assert code == 1 and "tiny:1 is already a GGUF F16" in err


def test_what_cannot_be_converted_faithfully_is_refused_and_nothing_is_stored(live_store, tmp_path, capsys):
    url = ("--url", live_store.url)
    client = StoreClient(live_store.url)
    qwen = make_checkpoint(tmp_path / "qwen", config={"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"})
    assert strata(capsys, "model", "push", str(qwen), "--name", "qwen", *url)[0] == 0
    code, _, err = strata(capsys, "model", "convert", "qwen", "--to", "gguf", "--quant", "f16", *url)
    assert code == 1 and "architecture Qwen2ForCausalLM cannot be converted to GGUF here (only LlamaForCausalLM)" in err

    llama = make_checkpoint(tmp_path / "llama")  # its tokenizer.json is no byte-level BPE
    assert strata(capsys, "model", "push", str(llama), "--name", "llama", *url)[0] == 0
    code, _, err = strata(capsys, "model", "convert", "llama", "--to", "gguf", "--quant", "q8_0", *url)
    assert code == 1 and "tokenizer.json: a None tokenizer; only byte-level BPE is converted" in err

    (tmp_path / "q8").mkdir()
    q8 = write_random_gguf(tmp_path / "q8" / "tiny.Q8_0.gguf", "q8_0")
    assert strata(capsys, "model", "push", str(q8), "--name", "tiny-q8", *url)[0] == 0
    code, _, err = strata(capsys, "model", "convert", "tiny-q8", "--to", "gguf", "--quant", "q4_k_m", *url)
    assert code == 1 and "tiny-q8:1 is already Q8_0: quantizing it again loses quality" in err
    code, _, err = strata(capsys, "model", "convert", "nosuch", "--to", "gguf", "--quant", "q4_k_m", *url)
    assert code == 1 and "no model named 'nosuch'" in err
    assert sorted((m.model.name, m.model.version) for m in client.list_models().models) == [
        ("llama", 1),
        ("qwen", 1),
        ("tiny-q8", 1),
    ]


def test_a_conversion_must_name_a_version_of_this_store_as_its_source(live_store, tmp_path):
    client = StoreClient(live_store.url)
    (tmp_path / "g").mkdir()
    gguf = write_random_gguf(tmp_path / "g" / "tiny.F16.gguf", "f16")
    real = client.push_model(gguf, "tiny").model
    forged = ModelSource(kind="conversion", name="tiny", reference="1", derived_from="sha256:" + "0" * 64)
    with pytest.raises(Invalid, match=r"source tiny:1 \(sha256:0{64}\) is not a version in this store"):
        client.push_model(gguf, "tiny", source=forged)
    with pytest.raises(Invalid, match="is not a version in this store"):
        client.push_model(
            gguf, "tiny", source=forged.model_copy(update={"reference": "7", "derived_from": real.digest})
        )
    assert [m.model.version for m in client.list_models().models] == [1]


def test_the_writer_refuses_tensors_and_settings_it_does_not_know(tmp_path):
    ckpt, _ = write_random_pair(tmp_path / "made", ftypes=(), seed=1)
    write_llama_gguf(ckpt, tmp_path / "ok.gguf", "f16")
    assert (tmp_path / "ok.gguf").stat().st_size > 0
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}))
    with pytest.raises(Unconvertible, match="rope_scaling"):
        write_llama_gguf(ckpt, tmp_path / "scaled.gguf", "f16")
    (ckpt / "config.json").write_text(json.dumps(cfg))
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.bias"] = tensors["model.norm.weight"]
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(
        Unconvertible, match="tensors the Llama conversion does not know: model.layers.0.self_attn.q_proj.bias"
    ):
        write_llama_gguf(ckpt, tmp_path / "bias.gguf", "f16")
    assert not (tmp_path / "bias.gguf").exists()
    del tensors["model.layers.0.self_attn.q_proj.bias"], tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(Unconvertible, match="tensor model.layers.1.mlp.down_proj.weight is missing"):
        write_llama_gguf(ckpt, tmp_path / "short.gguf", "f16")
    assert not (tmp_path / "short.gguf").exists()
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": []}
    (ckpt / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(Unconvertible, match="the pre-tokenizer is not GPT-2's byte-level split"):
        write_llama_gguf(ckpt, tmp_path / "pre.gguf", "f16")


def test_a_bf16_checkpoint_converts_to_the_same_f16_weights(tmp_path):
    import gguf
    import numpy as np
    import torch
    from safetensors.numpy import load_file
    from safetensors.torch import save_file

    ckpt, _ = write_random_pair(tmp_path / "made", ftypes=(), seed=2)
    f32 = load_file(str(ckpt / "model.safetensors"))
    save_file({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in f32.items()}, str(ckpt / "model.safetensors"))
    out = write_llama_gguf(ckpt, tmp_path / "bf16.F16.gguf", "f16")
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    down = tensors["blk.1.ffn_down.weight"]
    assert down.tensor_type == gguf.GGMLQuantizationType.F16
    expected = torch.from_numpy(f32["model.layers.1.mlp.down_proj.weight"]).to(torch.bfloat16).float().numpy()
    assert np.array_equal(
        np.asarray(down.data).reshape(expected.shape).astype(np.float32), expected.astype(np.float16).astype(np.float32)
    )
