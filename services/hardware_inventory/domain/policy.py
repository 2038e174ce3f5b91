"""The admission policy: what a model must have before it may be deployed (compliance gates).

Rules, each optional (a policy file names only the ones it wants):

- ``require_signature`` + ``trusted_keys``: the model's DSSE envelope holds a valid signature, by one
  of the trusted Ed25519 keys, over exactly the manifest its digest names (shared/dsse.py verifies);
- ``require_datasets``: the manifest declares at least one training dataset;
- ``allowed_licenses``: the manifest's license is one of these (case-insensitive);
- ``node_labels``: per label selector (``tier=edge``, or ``tier=edge,zone=a`` for all of them) limits
  (``max_parameters``, ``max_weight_bytes``, ``allowed_licenses``). A model over a selector's limits
  is kept off the nodes that match it; the request is rejected by that rule only when this leaves no
  eligible node.

``evaluate`` is pure: it returns one result per configured rule, and the selectors the model may not
be placed under. Reading the file is adapters/policy_file.py.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from collections.abc import Iterable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.catalog import ModelManifest, ResolvedModel
from shared.dsse import VerificationError, envelope_key_ids, verify_resolved
from shared.errors import StrataError
from shared.events import PolicyRuleResult
from shared.signing_keys import key_id

SIGNATURE, DATASETS, LICENSES = "require_signature", "require_datasets", "allowed_licenses"


class PolicyFileError(StrataError):
    """The policy file cannot be used; the message names the file and the offending key."""

    code, http_status = "invalid_policy", 500


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LabelLimits(_Strict):
    max_parameters: int | None = Field(default=None, ge=0, description="at most this many parameters")
    max_weight_bytes: int | None = Field(default=None, ge=0, description="at most this many bytes of tensor data")
    allowed_licenses: list[str] | None = Field(default=None, description="only these licenses (case-insensitive)")

    def breaches(self, manifest: ModelManifest) -> list[str]:
        """What of the manifest is over these limits, one phrase per limit."""
        found, meta = [], manifest.metadata
        if self.max_parameters is not None and meta.parameters > self.max_parameters:
            found.append(f"max_parameters {self.max_parameters:,} (the model has {meta.parameters:,})")
        if self.max_weight_bytes is not None and meta.weight_bytes > self.max_weight_bytes:
            found.append(f"max_weight_bytes {self.max_weight_bytes:,} (the model has {meta.weight_bytes:,})")
        if self.allowed_licenses is not None and (why := license_problem(manifest.license, self.allowed_licenses)):
            found.append(f"allowed_licenses: {why}")
        return found


class PolicyRules(_Strict):
    """The policy file's content."""

    require_signature: bool = False
    trusted_keys: list[str] = Field(default=[], description="Ed25519 public keys: PEM text, or a path to a PEM file")
    require_datasets: bool = False
    allowed_licenses: list[str] | None = Field(default=None, description="None: any license, or none")
    node_labels: dict[str, LabelLimits] = Field(default={}, description="label selector (tier=edge) -> limits")

    @field_validator("node_labels")
    @classmethod
    def _selectors(cls, value: dict[str, LabelLimits]) -> dict[str, LabelLimits]:
        for selector in value:
            parse_selector(selector)
        return value

    @model_validator(mode="after")
    def _keys_for_signatures(self) -> PolicyRules:
        if self.require_signature and not self.trusted_keys:
            raise ValueError("require_signature needs at least one entry in trusted_keys")
        return self


def parse_selector(selector: str) -> dict[str, str]:
    """``tier=edge,zone=a`` -> {tier: edge, zone: a}; ValueError names the expected syntax."""
    pairs = {}
    for part in selector.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"label selector {selector!r} is not LABEL=VALUE[,LABEL=VALUE...] (e.g. tier=edge)")
        pairs[key.strip()] = value.strip().lower()
    return pairs


def selector_matches(selector: str, labels: dict[str, str]) -> bool:
    return all(labels.get(k, "").lower() == v for k, v in parse_selector(selector).items())


def excluding_selector(exclusions: dict[str, str], labels: dict[str, str]) -> str | None:
    """The first selector in ``exclusions`` that a node with ``labels`` matches, or None."""
    return next((s for s in exclusions if selector_matches(s, labels)), None)


def label_rule(selector: str) -> str:
    return f"node_labels[{selector}]"


def license_problem(license: str | None, allowed: list[str]) -> str | None:
    """None when ``license`` is in ``allowed`` (case-insensitive), else why not."""
    listing = ", ".join(allowed) or "(none)"
    if not license or not license.strip():
        return f"the model declares no license (allowed: {listing})"
    if license.strip().lower() not in {a.strip().lower() for a in allowed}:
        return f"license {license!r} is not allowed (allowed: {listing})"
    return None


@dataclass(frozen=True)
class TrustedKey:
    public: Ed25519PublicKey
    source: str  # where the key came from (a file, "trusted_keys[0]"), for messages

    @property
    def key_id(self) -> str:
        return key_id(self.public)


@dataclass(frozen=True)
class AdmissionPolicy:
    rules: PolicyRules
    digest: str  # sha256:<hex> of the file's bytes: the ledger shows which policy decided
    keys: tuple[TrustedKey, ...] = ()
    source: str = "<policy>"

    @classmethod
    def of(
        cls, rules: PolicyRules, keys: Iterable[TrustedKey] = (), raw: bytes = b"", source: str = "<policy>"
    ) -> AdmissionPolicy:
        return cls(rules=rules, digest="sha256:" + hashlib.sha256(raw).hexdigest(), keys=tuple(keys), source=source)


@dataclass(frozen=True)
class Decision:
    results: list[PolicyRuleResult]
    exclusions: dict[str, str] = field(default_factory=dict)  # selector -> why this model is kept off its nodes

    @property
    def admitted(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def reason(self) -> str | None:
        """``policy: <rule>: <why>`` for the first failed rule, else None."""
        failed = next((r for r in self.results if not r.passed), None)
        return f"policy: {failed.rule}: {failed.reason}" if failed else None

    def no_node_left(self, eligible_labels: list[dict[str, str]]) -> Decision:
        """This decision, with the label rules failed when they exclude every eligible node (a node
        alive and matching the request's constraints). Unchanged when some node remains, or none was eligible."""
        if not self.exclusions or not eligible_labels:
            return self
        matched = {excluding_selector(self.exclusions, labels) for labels in eligible_labels}
        if None in matched:
            return self
        count = len(eligible_labels)
        results = []
        for result in self.results:
            selector = next((sel for sel in matched if result.rule == label_rule(sel)), None)
            if selector is not None:
                where = f"is labelled {selector}" if len(matched) == 1 else "matches a label this model is kept off"
                why = f"{self.exclusions[selector]}, and every eligible node ({count}) {where}"
                result = PolicyRuleResult(rule=result.rule, passed=False, reason=why)
            results.append(result)
        return Decision(results, self.exclusions)


def evaluate(policy: AdmissionPolicy, resolved: ResolvedModel) -> Decision:
    """One result per configured rule, and the label selectors whose nodes this model may not use."""
    rules, manifest = policy.rules, resolved.manifest
    results: list[PolicyRuleResult] = []
    if rules.require_signature:
        results.append(_signature(policy.keys, resolved))
    if rules.require_datasets:
        count = len(manifest.datasets)
        results.append(
            PolicyRuleResult(
                rule=DATASETS,
                passed=count > 0,
                reason=f"declares {count} training dataset(s)" if count else "the model declares no training datasets",
            )
        )
    if rules.allowed_licenses is not None:
        why = license_problem(manifest.license, rules.allowed_licenses)
        results.append(
            PolicyRuleResult(
                rule=LICENSES, passed=why is None, reason=why or f"license {manifest.license!r} is allowed"
            )
        )
    exclusions: dict[str, str] = {}
    for selector, limits in rules.node_labels.items():
        breaches = limits.breaches(manifest)
        if breaches:
            exclusions[selector] = "over " + "; ".join(breaches)
            reason = f"{exclusions[selector]}: kept off nodes labelled {selector}"
        else:
            reason = f"within the limits for nodes labelled {selector}"
        results.append(PolicyRuleResult(rule=label_rule(selector), passed=True, reason=reason))
    return Decision(results, exclusions)


def _signature(keys: tuple[TrustedKey, ...], resolved: ResolvedModel) -> PolicyRuleResult:
    if not resolved.signature:
        return PolicyRuleResult(rule=SIGNATURE, passed=False, reason="the model carries no signature")
    problems = []
    for key in keys:
        try:
            verify_resolved(resolved, key.public, signer="trusted key")
        except VerificationError as exc:
            problems.append(exc.message)
            continue
        return PolicyRuleResult(
            rule=SIGNATURE, passed=True, reason=f"signed by trusted key {key.key_id[:16]}… ({key.source})"
        )
    # Every key failed: a problem other than "not this key" (a changed manifest, a malformed envelope)
    # is the same for every key and says more than the key mismatch.
    specific = next((p for p in problems if "no valid signature" not in p), None)
    if specific:
        return PolicyRuleResult(rule=SIGNATURE, passed=False, reason=specific)
    claimed = ", ".join(k[:16] + "…" for k in envelope_key_ids(resolved.signature)) or "none"
    trusted = ", ".join(k.key_id[:16] + "…" for k in keys)
    return PolicyRuleResult(
        rule=SIGNATURE,
        passed=False,
        reason=f"no valid signature by a trusted key (trusted: {trusted}; the envelope names: {claimed})",
    )
