"""Inference receipts and their offline verification: nothing but the receipt and the public key.

A receipt holds the ``inference.completed`` event as published, its leaf index, the inclusion proof
and a signed tree head that covers the leaf. Verifying rebuilds the leaf bytes from the event and
the index, hashes them, walks the proof to the head's root and checks the head's signature: any
changed field (in the event, the index, the proof or the head) makes one of those steps fail.

With the prompt and the salt that the requester got in its reply (``x-strata-prompt-salt``), the
check also recomputes the event's ``prompt_commitment`` (shared/prompt_commitment.py): the receipt is
then about *that* prompt. Nobody without the salt can test a guessed prompt against it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from services.provenance_ledger.domain.canonical import leaf_bytes
from services.provenance_ledger.domain.merkle import leaf_hash, verify_inclusion
from services.provenance_ledger.domain.tree_head import head_signature_problem, load_public_pem
from shared.provenance import Receipt
from shared.prompt_commitment import BadSalt, matches

# the events a request's receipt holds: a generation's, or an embeddings request's (its commitment covers
# the inputs as shared/embeddings.input_bytes writes them)
RECEIPT_TYPES = ("inference.completed", "inference.embedded")


class ReceiptInvalid(ValueError):
    """The receipt does not verify; the message says which check failed."""


class ReceiptCheck(BaseModel):
    ok: bool
    request_id: str | None = None
    leaf_index: int | None = None
    tree_size: int | None = None
    key_id: str | None = None
    prompt_checked: bool = Field(default=False, description="the prompt and salt given match the event's commitment")
    reason: str | None = None


def verify_receipt(receipt: Receipt | dict[str, Any], public_key_pem: str | bytes, *, prompt: bytes | None = None,
                   salt: str | None = None) -> ReceiptCheck:
    """Check a receipt offline, and with ``prompt`` (its bytes: shared.prompt_commitment.prompt_bytes)
    and ``salt``, that it commits to that prompt. Raises ReceiptInvalid with the reason when not."""
    try:
        r = receipt if isinstance(receipt, Receipt) else Receipt.model_validate(receipt)
    except ValueError as exc:
        raise ReceiptInvalid(f"not a receipt: {exc}") from None
    try:
        key = load_public_pem(public_key_pem)
    except ValueError as exc:
        raise ReceiptInvalid(str(exc)) from None
    if r.event.get("type") not in RECEIPT_TYPES:
        raise ReceiptInvalid(
            f"a receipt is for an inference.completed or inference.embedded event, this one is {r.event.get('type')!r}"
        )
    problem = head_signature_problem(r.tree_head, key)
    if problem:
        raise ReceiptInvalid(f"tree head: {problem}")
    try:
        proof = [bytes.fromhex(p) for p in r.inclusion_proof]
    except ValueError:
        raise ReceiptInvalid("the inclusion proof is not hex") from None
    leaf = leaf_hash(leaf_bytes(r.event, r.leaf_index, r.conflict_of))
    if not verify_inclusion(leaf, r.leaf_index, r.tree_head.tree_size, proof, bytes.fromhex(r.tree_head.root_hash)):
        raise ReceiptInvalid(
            f"the event at leaf {r.leaf_index} is not included in the signed tree of size {r.tree_head.tree_size}"
            " (the event, the index or the proof was changed)"
        )
    data = r.event.get("data") if isinstance(r.event.get("data"), dict) else {}
    if prompt is not None:
        _check_prompt(data, prompt, salt)
    return ReceiptCheck(
        ok=True,
        request_id=data.get("request_id"),
        leaf_index=r.leaf_index,
        tree_size=r.tree_head.tree_size,
        key_id=r.tree_head.key_id,
        prompt_checked=prompt is not None,
    )


def _check_prompt(data: dict[str, Any], prompt: bytes, salt: str | None) -> None:
    commitment = data.get("prompt_commitment")
    if not isinstance(commitment, str):
        raise ReceiptInvalid("this receipt's event carries no prompt commitment (an event from before #19)")
    if salt is None:
        raise ReceiptInvalid("checking the prompt needs its salt (the x-strata-prompt-salt of the reply)")
    try:
        ok = matches(commitment, prompt, salt)
    except BadSalt as exc:
        raise ReceiptInvalid(str(exc)) from None
    if not ok:
        raise ReceiptInvalid("the prompt and salt given do not match the event's prompt commitment")
