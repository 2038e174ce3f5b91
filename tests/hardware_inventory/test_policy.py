"""The admission policy, rule by rule (domain/policy.py), placement around its label limits, and
reading its file (adapters/policy_file.py). End to end (real NATS, model-store, registry, ledger):
test_policy_e2e.py.
"""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from services.hardware_inventory.adapters.policy_file import load_policy
from services.hardware_inventory.config import InventoryConfig
from services.hardware_inventory.domain import placement
from services.hardware_inventory.domain.fit import predict, shape_from_metadata
from services.hardware_inventory.domain.model import Allocations
from services.hardware_inventory.domain.policy import (
    AdmissionPolicy, PolicyFileError, PolicyRules, TrustedKey, evaluate, selector_matches,
)
from services.model_store.domain.signing import Signer
from shared.catalog import FileEntry, ModelManifest, ModelMetadata, ResolvedModel, manifest_digest
from shared.events import DeviceInfo, ModelId
from shared.inventory import NodeRecord
from tests.hardware_inventory.conftest import GB, MODELS

META = ModelMetadata(architecture="LlamaForCausalLM", parameters=12_000_000, dtype="BF16", weight_bytes=24_000_000)
DATASET = "sha256:" + "d" * 64


def manifest(**changes) -> ModelManifest:
    base = dict(name="m", version=1, files=[FileEntry(path="model.safetensors", sha256="a" * 64, size=10)],
                metadata=META, license="MIT", datasets=[DATASET])
    return ModelManifest(**{**base, **changes})


def resolved(man: ModelManifest, signer: Signer | None) -> ResolvedModel:
    return ResolvedModel(model=ModelId(name=man.name, version=man.version, digest=manifest_digest(man)), manifest=man,
                         signature=signer.sign(man) if signer else {})


@pytest.fixture(scope="module")
def store_key(tmp_path_factory) -> Signer:
    return Signer.load_or_create(tmp_path_factory.mktemp("keys") / "store.pem")


@pytest.fixture(scope="module")
def other_key(tmp_path_factory) -> Signer:
    return Signer.load_or_create(tmp_path_factory.mktemp("keys") / "other.pem")


def policy(*keys: Signer, **rules) -> AdmissionPolicy:
    parsed = PolicyRules.model_validate({"trusted_keys": ["(in memory)"] * bool(keys), **rules})
    return AdmissionPolicy.of(parsed, [TrustedKey(k.public, f"key{i}") for i, k in enumerate(keys)], b"rules")


def result(decision, rule: str):
    [found] = [r for r in decision.results if r.rule == rule]
    return found


# -- require_signature + trusted_keys ------------------------------------------------------------

def test_a_model_signed_by_a_trusted_key_passes(store_key, other_key):
    decision = evaluate(policy(other_key, store_key, require_signature=True), resolved(manifest(), store_key))
    assert decision.admitted and decision.reason is None
    r = result(decision, "require_signature")
    assert r.passed and store_key.key_id[:16] in r.reason and "key1" in r.reason


def test_an_unsigned_model_fails_the_signature_rule(store_key):
    decision = evaluate(policy(store_key, require_signature=True), resolved(manifest(), None))
    assert not decision.admitted
    assert decision.reason == "policy: require_signature: the model carries no signature"


def test_a_signature_by_an_untrusted_key_fails_naming_both_keys(store_key, other_key):
    decision = evaluate(policy(store_key, require_signature=True), resolved(manifest(), other_key))
    r = result(decision, "require_signature")
    assert not r.passed and "no valid signature by a trusted key" in r.reason
    assert store_key.key_id[:16] in r.reason and other_key.key_id[:16] in r.reason


def test_a_forged_signature_fails(store_key):
    model = resolved(manifest(), store_key)
    sig = bytearray(base64.b64decode(model.signature["signatures"][0]["sig"]))
    sig[0] ^= 0xFF  # the trusted key id, a signature it never made
    model.signature["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    r = result(evaluate(policy(store_key, require_signature=True), model), "require_signature")
    assert not r.passed and "no valid signature by a trusted key" in r.reason


def test_a_manifest_changed_after_signing_fails_with_that_reason(store_key):
    signed = resolved(manifest(), store_key)
    relicensed = manifest(license="Apache-2.0")
    forged = ResolvedModel(model=ModelId(name="m", version=1, digest=manifest_digest(relicensed)), manifest=relicensed,
                           signature=signed.signature)
    r = result(evaluate(policy(store_key, require_signature=True), forged), "require_signature")
    assert not r.passed and "differs from the one that was signed" in r.reason


def test_a_malformed_envelope_fails_with_that_reason(store_key):
    model = resolved(manifest(), None).model_copy(update={"signature": {"payloadType": "x"}})
    r = result(evaluate(policy(store_key, require_signature=True), model), "require_signature")
    assert not r.passed and "malformed" in r.reason


# -- require_datasets -------------------------------------------------------------------------

def test_a_model_without_datasets_fails_the_dataset_rule():
    decision = evaluate(policy(require_datasets=True), resolved(manifest(datasets=[]), None))
    assert decision.reason == "policy: require_datasets: the model declares no training datasets"
    assert result(evaluate(policy(require_datasets=True), resolved(manifest(), None)), "require_datasets").passed


# -- allowed_licenses -------------------------------------------------------------------------

def test_licenses_are_compared_case_insensitively():
    r = result(
        evaluate(policy(allowed_licenses=["apache-2.0", "mit"]), resolved(manifest(license="MIT"), None)),
        "allowed_licenses",
    )
    assert r.passed


def test_a_license_outside_the_list_fails_naming_it_and_the_list():
    decision = evaluate(policy(allowed_licenses=["apache-2.0", "mit"]), resolved(manifest(license="proprietary"), None))
    assert (
        decision.reason == "policy: allowed_licenses: license 'proprietary' is not allowed (allowed: apache-2.0, mit)"
    )


def test_a_model_with_no_license_fails_saying_so():
    decision = evaluate(policy(allowed_licenses=["mit"]), resolved(manifest(license=None), None))
    assert decision.reason == "policy: allowed_licenses: the model declares no license (allowed: mit)"


def test_no_rules_admit_everything_and_report_nothing():
    decision = evaluate(policy(), resolved(manifest(license=None, datasets=[]), None))
    assert decision.admitted and decision.results == [] and decision.exclusions == {}


# -- node_labels --------------------------------------------------------------------------------


def test_a_model_over_a_label_limit_is_kept_off_those_nodes_but_admitted():
    rules = {
        "node_labels": {
            "tier=edge": {"max_parameters": 1_000_000, "max_weight_bytes": 10**9},
            "zone=eu,tier=core": {"allowed_licenses": ["apache-2.0"]},
            "tier=big": {"max_parameters": 10**12},
        }
    }
    decision = evaluate(policy(**rules), resolved(manifest(), None))
    assert decision.admitted
    assert set(decision.exclusions) == {"tier=edge", "zone=eu,tier=core"}
    assert "max_parameters 1,000,000 (the model has 12,000,000)" in decision.exclusions["tier=edge"]
    assert "max_weight_bytes" not in decision.exclusions["tier=edge"]
    assert "license 'MIT' is not allowed" in decision.exclusions["zone=eu,tier=core"]
    assert result(decision, "node_labels[tier=big]").reason == "within the limits for nodes labelled tier=big"


def test_weight_bytes_limit():
    decision = evaluate(policy(node_labels={"tier=edge": {"max_weight_bytes": 1000}}), resolved(manifest(), None))
    assert "max_weight_bytes 1,000 (the model has 24,000,000)" in decision.exclusions["tier=edge"]


def test_when_every_eligible_node_is_excluded_the_label_rule_rejects_naming_the_limit():
    decision = evaluate(policy(node_labels={"tier=edge": {"max_parameters": 1000}}), resolved(manifest(), None))
    some_left = decision.no_node_left([{"tier": "edge"}, {"tier": "core"}])
    assert some_left.admitted
    none_left = decision.no_node_left([{"tier": "EDGE", "zone": "a"}, {"tier": "edge"}])
    assert not none_left.admitted
    assert none_left.reason.startswith(
        "policy: node_labels[tier=edge]: over max_parameters 1,000 (the model has 12,000,000)"
    )
    assert "every eligible node (2) is labelled tier=edge" in none_left.reason
    assert decision.no_node_left(
        []
    ).admitted  # no node at all is placement's "no nodes are registered", not the policy's


def test_selectors_need_every_label():
    assert selector_matches("tier=edge,zone=a", {"tier": "edge", "zone": "A"})
    assert not selector_matches("tier=edge,zone=a", {"tier": "edge"})


def test_placement_skips_excluded_nodes_and_says_why_when_nothing_else_fits():
    def node(node_id: str, ram: int, labels: dict) -> NodeRecord:
        cpu = DeviceInfo(id="cpu", kind="cpu", name="cpu", memory_total=ram, memory_free=ram)
        return NodeRecord(
            node_id=node_id, hostname=node_id, cpu_model="x", cpu_cores=1, ram_total=ram, devices=[cpu], labels=labels
        )

    shape = shape_from_metadata(MODELS["tiny"])
    need = lambda kind: predict(shape, kind, context_length=256)  # noqa: E731
    exclusions = {"tier=edge": "over max_parameters 100"}
    slots = placement.slots(
        [node("edge", 4 * GB, {"tier": "edge"}), node("core", 64 * GB, {"tier": "core"})],
        Allocations(),
        {},
        {"cpu": 0.85},
    )
    assert placement.place(1, slots, need, {}, "binpack")[0].node_id == "edge"  # binpack's choice without the policy
    assert placement.place(1, slots, need, {}, "binpack", exclusions=exclusions)[0].node_id == "core"
    small = placement.slots(
        [node("edge", 4 * GB, {"tier": "edge"}), node("core", GB // 10, {})], Allocations(), {}, {"cpu": 0.85}
    )
    with pytest.raises(placement.NoFit) as nofit:
        placement.place(1, small, need, {}, "binpack", exclusions=exclusions)
    assert "edge/cpu: excluded by policy node_labels[tier=edge] (over max_parameters 100)" in nofit.value.reason
    assert "core/cpu: 0.09 GB free" in nofit.value.reason


# -- the file ---------------------------------------------------------------------------------


def write_key(path, signer: Signer) -> str:
    path.write_text(signer.public_key_info().pem)
    return str(path)


def test_a_file_with_every_rule_loads_with_its_digest_and_keys(tmp_path, store_key, other_key):
    (tmp_path / "keys").mkdir()
    write_key(tmp_path / "keys" / "store.pem", store_key)
    text = (
        "require_signature: true\ntrusted_keys:\n  - keys/store.pem\n  - |\n"
        + "".join(f"    {line}\n" for line in other_key.public_key_info().pem.splitlines())
        + "require_datasets: true\nallowed_licenses: [MIT]\nnode_labels:\n  tier=edge: {max_parameters: 5}\n"
    )
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    loaded = load_policy(path)
    assert loaded.digest == "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    assert [k.key_id for k in loaded.keys] == [store_key.key_id, other_key.key_id]
    assert loaded.keys[0].source == str(tmp_path / "keys" / "store.pem")
    assert loaded.rules.node_labels["tier=edge"].max_parameters == 5
    assert evaluate(loaded, resolved(manifest(), other_key)).admitted


def test_a_missing_file_is_no_policy(tmp_path):
    assert load_policy(tmp_path / "nope.yaml") is None


@pytest.mark.parametrize(
    "text, names",
    [
        ("require_signatures: true\n", "require_signatures: Extra inputs are not permitted"),
        (
            "node_labels:\n  tier=edge: {max_params: 5}\n",
            "node_labels.tier=edge.max_params: Extra inputs are not permitted",
        ),
        (
            "node_labels:\n  edge: {max_parameters: 5}\n",
            "node_labels: Value error, label selector 'edge' is not LABEL=VALUE",
        ),
        ("allowed_licenses: mit\n", "allowed_licenses: Input should be a valid list"),
        ("require_signature: true\n", "require_signature needs at least one entry in trusted_keys"),
        ("require_datasets: [true\n", "not valid YAML"),
        ("- require_datasets\n", "expected a mapping of rules at the top, found list"),
        ("trusted_keys: [missing.pem]\n", "trusted_keys[0]: "),
        (
            "trusted_keys: ['-----BEGIN PUBLIC KEY-----\n\n  garbage\n\n  -----END PUBLIC KEY-----']\n",
            "trusted_keys[0]: not a PEM public key",
        ),
    ],
)
def test_an_invalid_file_is_an_error_naming_the_file_and_the_key(tmp_path, text, names):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyFileError) as error:
        load_policy(path)
    assert str(path) in error.value.message and names in error.value.message, error.value.message


def test_a_trusted_key_that_is_not_ed25519_is_refused(tmp_path):
    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    (tmp_path / "ec.pem").write_bytes(pem)
    (tmp_path / "policy.yaml").write_text("trusted_keys: [ec.pem]\n")
    with pytest.raises(PolicyFileError, match=r"trusted_keys\[0\]: not an Ed25519 public key"):
        load_policy(tmp_path / "policy.yaml")


def test_the_service_stops_at_start_on_an_invalid_file_and_starts_without_one(tmp_path, monkeypatch):
    from services.hardware_inventory.entrypoints.app import create_service
    from tests.support.helpers import settings_for

    path = tmp_path / "policy.yaml"
    path.write_text(json.dumps({"allowed_licences": ["mit"]}))
    monkeypatch.setenv("STRATA_INVENTORY_ROLES", "registry")
    monkeypatch.setenv("STRATA_ADMISSION_POLICY", str(path))
    assert InventoryConfig.from_env().admission_policy == path
    settings = settings_for("hardware-inventory", "nats://127.0.0.1:1", tmp_path / "data")
    with pytest.raises(SystemExit) as stopped:
        create_service(settings)
    assert str(path) in str(stopped.value.code) and "allowed_licences" in str(stopped.value.code)
    path.unlink()
    assert not create_service(settings).has(AdmissionPolicy)
