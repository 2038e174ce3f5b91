"""The built-in model: the shipped artifact, and `train()` on tiny settings.

The shipped checkpoint must load with HF transformers and with our engine, give the same
logits in both, and hash to what its training record says. A short training run must write a
complete HF checkpoint + record, be bitwise repeatable with the same seed on this machine, and
refuse bad arguments with a clear message.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from builtin_model import artifact as A  # noqa: E402
from builtin_model import config as C  # noqa: E402
from builtin_model import data as D  # noqa: E402
from builtin_model import train as T  # noqa: E402

SHIPPED = T.SHIPPED_MODEL_DIR

# A run small enough for a unit test (~2-3 s, most of it the tokenizer on the 1.6 MB corpus).
TINY = dict(vocab_size=320, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
            intermediate_size=64, seq_len=32, batch_size=4, log_every=2, eval_batches=1,
            warmup_steps=1)


def _engine_available() -> bool:
    try:
        from services.inference_worker.engine.loader import load_checkpoint  # noqa: F401
    except ImportError:
        return False
    return True


def _hf_logits(model_dir: Path, ids: list[int]):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float(), model


def _engine_logits(model_dir: Path, ids: list[int]):
    from services.inference_worker.engine.loader import load_checkpoint

    ck = load_checkpoint(model_dir, device="cpu", dtype="float32")
    return ck.model.logits_without_cache(torch.tensor(ids)).float(), ck


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "ckpt"
    record = T.train(out, steps=4, seed=7, save_dtype="float32", log=None, **TINY)
    return out, record


# ---------------------------------------------------------------------------- shipped artifact


def test_shipped_artifact_matches_its_record():
    record = A.verify_artifact(SHIPPED)  # every listed file hashes to the recorded sha256
    assert set(record["files"]) == set(C.ARTIFACT_FILES)
    assert record["corpus"]["sha256"] == C.CORPUS_SHA256 == D.sha256_file(C.CORPUS_PATH)
    assert record["corpus"]["bytes"] == C.CORPUS_PATH.stat().st_size
    assert record["tokenizer"]["sha256"] == D.sha256_file(SHIPPED / "tokenizer.json")
    # the shipped model is the default run: same hyper-parameters as TrainConfig() today
    assert record["hyperparameters"] == {**T.dataclasses.asdict(C.TrainConfig())}
    assert record["seed"] == C.TrainConfig().seed
    assert record["loss_curve"][-1]["step"] == record["hyperparameters"]["steps"]
    total = sum(p.stat().st_size for p in SHIPPED.iterdir() if p.is_file())
    assert total <= 10 * 1024 * 1024, f"shipped artifact is {total} bytes"


def test_shipped_artifact_loads_with_transformers_and_generates_corpus_text():
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(SHIPPED)
    ids = tok("And God said", add_special_tokens=False)["input_ids"]
    model = transformers.AutoModelForCausalLM.from_pretrained(SHIPPED)
    assert model.config.model_type == "llama"
    out = model.generate(torch.tensor([[tok.bos_token_id] + ids]), max_new_tokens=24,
                         do_sample=False)
    text = tok.decode(out[0], skip_special_tokens=True)
    assert text.startswith("And God said")
    words = text.split()
    assert len(words) >= 8
    vocab = set(D.load_corpus().split())
    assert sum(w in vocab for w in words) / len(words) > 0.8, text

    messages = [{"role": "user", "content": "Genesis 1"}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == D.render_chat(messages, add_generation_prompt=True)
    assert rendered == "<|bos|><|user|>\nGenesis 1\n<|assistant|>\n"


def test_shipped_artifact_answers_a_chat_and_stops_at_eos():
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(SHIPPED)
    model = transformers.AutoModelForCausalLM.from_pretrained(SHIPPED)
    chapters = D.split_chapters(D.load_corpus())
    held_out = [verses for i, (_, verses) in enumerate(chapters) if i % 25 == 24][:4]
    stopped = 0
    for verses in held_out:
        ids = tok.apply_chat_template([{"role": "user", "content": verses[3]}],
                                      add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
        torch.manual_seed(0)  # the shipped generation_config: temperature 0.8, top_p 0.95
        out = model.generate(ids, max_new_tokens=80, do_sample=True, temperature=0.8, top_p=0.95,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        reply = out[0, ids.shape[1]:].tolist()
        stopped += reply[-1] == tok.eos_token_id
        assert len(tok.decode(reply, skip_special_tokens=True).split()) >= 3
    assert stopped >= 3, f"only {stopped} of 4 chat replies ended with <|eos|>"


@pytest.mark.skipif(not _engine_available(), reason="engine not importable")
def test_shipped_artifact_same_logits_in_engine_and_transformers():
    ids = D.load_corpus()[:400]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(SHIPPED / "tokenizer.json"))
    token_ids = [tok.token_to_id(C.BOS)] + tok.encode(ids).ids[:60]
    hf, _ = _hf_logits(SHIPPED, token_ids)
    ours, ck = _engine_logits(SHIPPED, token_ids)
    torch.testing.assert_close(ours, hf, atol=1e-4, rtol=1e-4)
    assert ck.tokenizer.encode_chat([{"role": "user", "content": "Genesis 1"}]) == \
        tok.encode(D.render_chat([{"role": "user", "content": "Genesis 1"}], True),
                   add_special_tokens=False).ids


# ---------------------------------------------------------------------------- a training run


def test_short_run_writes_complete_hf_checkpoint_and_record(tiny_run):
    out, record = tiny_run
    for name in (*C.ARTIFACT_FILES, C.RECORD_NAME):
        assert (out / name).is_file(), name
    assert A.verify_artifact(out) == record
    on_disk = json.loads((out / C.RECORD_NAME).read_text())
    assert on_disk == record

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    from safetensors.torch import load_file

    weights = load_file(str(out / "model.safetensors"))
    assert "model.embed_tokens.weight" in weights
    assert "model.layers.1.self_attn.q_proj.weight" in weights
    assert "model.layers.0.mlp.down_proj.weight" in weights
    assert all(w.dtype == torch.float32 for w in weights.values())

    assert record["corpus"]["sha256"] == C.CORPUS_SHA256
    assert record["tokenizer"]["vocab_size"] == TINY["vocab_size"]
    assert record["tokenizer"]["sha256"] == D.sha256_file(out / "tokenizer.json")
    assert record["seed"] == 7
    assert record["hyperparameters"]["steps"] == 4
    assert record["hyperparameters"]["hidden_size"] == TINY["hidden_size"]
    assert [p["step"] for p in record["loss_curve"]] == [2, 4]
    assert record["parameters"] == sum(w.numel() for w in weights.values())
    assert record["environment"]["torch"] == torch.__version__
    assert record["code"]["trainer_sha256"] == T.trainer_digest()
    assert "git_commit" in record["code"]
    assert record["wall_time_s"]["total"] > 0


def test_short_run_loads_in_transformers_with_same_logits_as_engine(tiny_run):
    out, record = tiny_run
    ids = [1, 10, 200, 33, 45, 2, 1, 17, 300, 5, 6, 7]
    hf, model = _hf_logits(out, ids)
    assert hf.shape == (len(ids), TINY["vocab_size"])
    assert model.config.tie_word_embeddings
    if not _engine_available():
        pytest.skip("engine not importable: checked transformers only")
    ours, _ = _engine_logits(out, ids)
    torch.testing.assert_close(ours, hf, atol=1e-4, rtol=1e-4)
    assert record["trainer"] == "strata.engine.Transformer"


def _cli_settings() -> list[str]:
    return [f"--set={k}={v}" for k, v in TINY.items()] + ["--set=save_dtype=float32"]


def test_same_seed_gives_identical_weights(tmp_path, tiny_run, capsys):
    out, record = tiny_run
    # the same run again, through the CLI entry point, comparing with the first
    assert T.main(["--out", str(tmp_path / "again"), "--steps", "4", "--seed", "7", "--quiet",
                   "--compare", str(out), *_cli_settings()]) == 0
    assert "bitwise identical" in capsys.readouterr().out
    again = A.verify_artifact(tmp_path / "again")
    for name in C.ARTIFACT_FILES:  # every file, not only the weights, is bitwise the same
        assert again["files"][name] == record["files"][name], name
    assert [p["train_loss"] for p in again["loss_curve"]] == \
        [p["train_loss"] for p in record["loss_curve"]]
    assert again["val_loss"] == record["val_loss"]


def test_bf16_save_is_loadable(tmp_path):
    T.train(tmp_path / "bf16", steps=1, log=None, **TINY)  # default save_dtype: bfloat16
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert all(w.dtype == torch.bfloat16 for w in weights.values())
    hf, _ = _hf_logits(tmp_path / "bf16", [1, 5, 9])
    assert torch.isfinite(hf).all()


# ---------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps must be a positive number"),
    ({"steps": -3}, "steps must be a positive number"),
    ({"steps": 2.5}, "steps must be an integer"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"lr": 0.0}, "lr must be a positive number"),
    ({"vocab_size": 100}, "vocab_size must be at least"),
    ({"hidden_size": 30, "num_heads": 4}, "not a multiple of num_heads"),
    ({"num_heads": 4, "num_kv_heads": 3}, "not a multiple of num_kv_heads"),
    ({"save_dtype": "float16"}, "save_dtype must be"),
    ({"trainer": "jax"}, "trainer must be one of"),
    ({"no_such_option": 1}, "unknown training option(s): no_such_option"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, kwargs, message):
    args = {**TINY, "steps": 1, **kwargs}
    with pytest.raises(C.TrainError, match=_escape(message)):
        T.train(tmp_path / "out", log=None, **args)
    assert not (tmp_path / "out").exists()


def _escape(s: str) -> str:
    import re

    return re.escape(s)


def test_unwritable_out_dir_is_refused(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(C.TrainError, match="is not a directory"):
        T.train(blocker, steps=1, log=None, **TINY)
    with pytest.raises(C.TrainError, match="is not writable"):
        T.train(blocker / "sub", steps=1, log=None, **TINY)


def test_existing_checkpoint_needs_overwrite(tiny_run):
    out, _ = tiny_run
    with pytest.raises(C.TrainError, match="already holds a checkpoint"):
        T.train(out, steps=1, log=None, **TINY)


def test_cli_reports_bad_arguments(tmp_path, capsys):
    assert T.main(["--out", str(tmp_path / "o"), "--steps", "0"]) == 2
    assert "steps must be a positive number" in capsys.readouterr().err
    assert T.main(["--out", str(tmp_path / "o"), "--set", "nonsense=1"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert T.main(["--out", str(tmp_path / "o"), "--set", "lr=abc"]) == 2
    assert "not a valid float" in capsys.readouterr().err
    assert T.main(["--", "--out", str(tmp_path / "o"), "--steps", "-1"]) == 2  # `strata train --`
    assert "steps must be a positive number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        T.main(["--steps", "many"])  # argparse's own error, exit status 2


def test_cli_trains_and_compares_other_seed(tmp_path, tiny_run, capsys):
    base, record = tiny_run
    out = tmp_path / "cli"
    sets = _cli_settings()
    # same settings as tiny_run but another seed: trains, writes, and --compare exits 1
    assert T.main(["--out", str(out), "--steps", "4", "--seed", "8", "--quiet",
                   "--compare", str(base), *sets]) == 1
    assert "weights differ" in capsys.readouterr().out
    other = A.verify_artifact(out)
    assert other["seed"] == 8
    assert other["files"]["model.safetensors"] != record["files"]["model.safetensors"]
    assert other["tokenizer"]["sha256"] == record["tokenizer"]["sha256"]  # seed-independent
    # and against itself it reports identical weights
    assert A.compare_weights(out, out)["identical"]
