"""Every way a checkpoint directory can be wrong gets a typed error naming the file (and tensor)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.inference_worker.engine import (CheckpointError, ConfigError, MissingFileError,
                                              MissingTensorError, ModelConfig, PickleCheckpointError,
                                              ShapeMismatchError, UnexpectedTensorError,
                                              UnsupportedArchitectureError, load_checkpoint)
from services.inference_worker.engine.config import rope_inv_freq


@pytest.fixture
def ckdir(ckpts, tmp_path) -> Path:
    """A private copy of the llama checkpoint to break."""
    dst = tmp_path / "ck"
    shutil.copytree(ckpts("llama").path, dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def edit_weights(path: Path, fn) -> None:
    f = path / "model.safetensors"
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_loads_clean_copy(ckdir):
    ck = load_checkpoint(ckdir)
    assert ck.config.architecture == "LlamaForCausalLM" and ck.generation.eos_token_ids == [1]


def test_pickle_checkpoint_refused_without_opening_it(ckdir):
    (ckdir / "model.safetensors").unlink()
    # Not even a valid pickle: if the loader tried to open it, the error would differ.
    (ckdir / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")
    with pytest.raises(PickleCheckpointError) as e:
        load_checkpoint(ckdir)
    assert "pytorch_model.bin" in str(e.value) and "arbitrary code" in str(e.value)
    assert e.value.path.endswith("pytorch_model.bin")


@pytest.mark.parametrize("name", ["model.pt", "weights.pth", "model.pkl"])
def test_other_pickle_suffixes_refused(ckdir, name):
    (ckdir / "model.safetensors").unlink()
    (ckdir / name).write_bytes(b"junk")
    with pytest.raises(PickleCheckpointError, match=name):
        load_checkpoint(ckdir)


def test_index_pointing_at_pickle_refused(ckdir):
    (ckdir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "pytorch_model-00001.bin"}}))
    with pytest.raises(PickleCheckpointError, match="pytorch_model-00001.bin"):
        load_checkpoint(ckdir)


def test_safetensors_preferred_when_pickle_also_present(ckdir):
    (ckdir / "pytorch_model.bin").write_bytes(b"junk that must never be unpickled")
    assert load_checkpoint(ckdir).config.num_layers == 2


def test_unknown_architecture(ckdir):
    edit_json(ckdir / "config.json", architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(UnsupportedArchitectureError) as e:
        load_checkpoint(ckdir)
    assert "config.json" in str(e.value) and "GPT2LMHeadModel" in str(e.value)


def test_unknown_rope_type(ckdir):
    edit_json(ckdir / "config.json", rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                      "rope_theta": 10000.0})
    with pytest.raises(ConfigError, match=r"config\.json.*'yarn'"):
        load_checkpoint(ckdir)


def test_unsupported_activation(ckdir):
    edit_json(ckdir / "config.json", hidden_act="gelu")
    with pytest.raises(ConfigError, match="gelu"):
        load_checkpoint(ckdir)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_missing_file(ckdir, name):
    (ckdir / name).unlink()
    with pytest.raises(MissingFileError, match=name):
        load_checkpoint(ckdir)


def test_no_weights_at_all(ckdir):
    (ckdir / "model.safetensors").unlink()
    with pytest.raises(MissingFileError, match="safetensors"):
        load_checkpoint(ckdir)


def test_missing_directory(tmp_path):
    with pytest.raises(MissingFileError, match="nope"):
        load_checkpoint(tmp_path / "nope")


def test_bad_json(ckdir):
    (ckdir / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        load_checkpoint(ckdir)


def test_missing_tensor(ckdir):
    edit_weights(ckdir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(MissingTensorError) as e:
        load_checkpoint(ckdir)
    assert "model.layers.1.mlp.up_proj.weight" in str(e.value) and "model.safetensors" in str(e.value)
    assert e.value.tensor == "model.layers.1.mlp.up_proj.weight"


def test_unexpected_tensor(ckdir):
    edit_weights(ckdir, lambda t: t.__setitem__("model.layers.0.self_attn.q_norm.weight",
                                                torch.ones(16)))
    with pytest.raises(UnexpectedTensorError, match=r"model\.safetensors.*q_norm"):
        load_checkpoint(ckdir)


def test_shape_mismatch_in_file(ckdir):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:16]
    edit_weights(ckdir, shrink)
    with pytest.raises(ShapeMismatchError) as e:
        load_checkpoint(ckdir)
    msg = str(e.value)
    assert "model.layers.0.self_attn.k_proj.weight" in msg and "model.safetensors" in msg
    assert "[16, 64]" in msg and "[32, 64]" in msg


def test_shape_mismatch_from_config(ckdir):
    edit_json(ckdir / "config.json", intermediate_size=100)
    with pytest.raises(ShapeMismatchError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight"):
        load_checkpoint(ckdir)


def test_sharded_missing_shard(ckpts, tmp_path):
    dst = tmp_path / "sh"
    shutil.copytree(ckpts("sharded").path, dst)
    shards = sorted(dst.glob("model-*.safetensors"))
    assert len(shards) > 1  # the fixture really is sharded
    shards[-1].unlink()
    with pytest.raises(MissingFileError, match=shards[-1].name):
        load_checkpoint(dst)


def test_sharded_missing_tensor_names_index(ckpts, tmp_path):
    dst = tmp_path / "sh"
    shutil.copytree(ckpts("sharded").path, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    name, shard = next((k, v) for k, v in index["weight_map"].items() if "v_proj.bias" in k)
    tensors = load_file(dst / shard)
    del tensors[name]
    save_file(tensors, dst / shard, metadata={"format": "pt"})
    with pytest.raises(MissingTensorError, match=rf"index\.json.*{name}"):
        load_checkpoint(dst)


def test_corrupt_safetensors(ckdir):
    (ckdir / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(ckdir)


def test_all_errors_share_one_base():
    for cls in (ConfigError, MissingFileError, MissingTensorError, PickleCheckpointError,
                ShapeMismatchError, UnexpectedTensorError, UnsupportedArchitectureError):
        assert issubclass(cls, CheckpointError)


def test_legacy_and_v5_rope_layouts_agree():
    base = dict(architectures=["LlamaForCausalLM"], vocab_size=10, hidden_size=64,
                intermediate_size=100, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=131072)
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    legacy = ModelConfig.from_dict({**base, "rope_theta": 500000.0,
                                    "rope_scaling": {**scaling, "type": "llama3"}})
    v5 = ModelConfig.from_dict({**base, "rope_parameters": {**scaling, "rope_type": "llama3",
                                                           "rope_theta": 500000.0}})
    assert legacy.rope_theta == v5.rope_theta == 500000.0
    assert legacy.rope_scaling == v5.rope_scaling
    scaled, plain = rope_inv_freq(v5), rope_inv_freq(ModelConfig.from_dict({**base, "rope_theta": 500000.0}))
    assert torch.equal(scaled[:2], plain[:2]) and torch.allclose(scaled[-1], plain[-1] / 8)
    default = ModelConfig.from_dict({**base, "rope_scaling": {"rope_type": "default"}})
    assert default.rope_scaling is None and default.head_dim == 16


def test_sliding_window_does_not_cap_context_length(ckpts, tmp_path):
    """With windowed attention a Mistral's context is max_position_embeddings (512 here), even
    past the cache (16 blocks x 16 tokens): it only ever holds about a window's worth."""
    from services.inference_worker.engine import EngineConfig, LLMEngine

    dst = tmp_path / "m"
    shutil.copytree(ckpts("mistral").path, dst)
    edit_json(dst / "config.json", sliding_window=64)
    eng = LLMEngine.from_pretrained(dst, EngineConfig(device="cpu", num_blocks=16,
                                                      max_num_batched_tokens=64))
    assert eng.model_config.sliding_window == 64 and eng.max_model_len == 512
    assert eng.block_manager.window == 64
    # a cache too small for a window plus a chunk caps the context at the cache, as without one
    small = LLMEngine.from_pretrained(dst, EngineConfig(device="cpu", num_blocks=8,
                                                        max_num_batched_tokens=64))
    assert small.max_model_len == 8 * 16
    qwen = ModelConfig.from_dict({**json.loads((ckpts("qwen2").path / "config.json").read_text()),
                                  "sliding_window": 64, "use_sliding_window": False})
    assert qwen.sliding_window is None and qwen.qkv_bias and not qwen.o_bias


def test_generation_config_eos_list_and_sampling_defaults(ckdir):
    from services.inference_worker.engine import EngineConfig, LLMEngine

    edit_json(ckdir / "generation_config.json", eos_token_id=[1, 5], temperature=0.6, top_p=0.9,
              top_k=20)
    eng = LLMEngine.from_pretrained(ckdir, EngineConfig(device="cpu", num_blocks=16))
    assert eng.generation.eos_token_ids == [1, 5] and eng.eos_ids == {1, 5}
    p = eng.default_sampling_params()
    assert (p.temperature, p.top_p, p.top_k) == (0.6, 0.9, 20)
    (ckdir / "generation_config.json").unlink()  # optional: falls back to config.json's eos
    assert load_checkpoint(ckdir).generation.eos_token_ids == [1]
