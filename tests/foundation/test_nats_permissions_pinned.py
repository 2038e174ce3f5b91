"""The per-role NATS permissions, pinned: nats_auth derives them from the service contracts
(shared/contracts), and that derivation must grant and deny exactly what the hand-written table did.
The snapshot (data/nats_permissions.json) was taken from the hand-written table before the change;
a deliberate change of permissions updates it in the same commit."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from shared import nats_auth

PINNED = json.loads((Path(__file__).parent / "data" / "nats_permissions.json").read_text())


def test_every_role_keeps_its_pinned_permissions():
    assert sorted(PINNED) == sorted(nats_auth.ROLES)
    for role in nats_auth.ROLES:
        assert _plain(nats_auth.permissions(role)) == {k: _as_set(v) for k, v in PINNED[role]["permissions"].items()}, (
            role
        )
        assert _plain(nats_auth.NEEDS[role]) == {k: _as_set(v) for k, v in PINNED[role]["needs"].items()}, role


def _plain(value: object) -> dict[str, object]:
    """Each field as a set: the order of a permission list has no effect on what nats-server allows."""
    return {name: _as_set(items) for name, items in dataclasses.asdict(value).items()}  # type: ignore[call-overload]


def _as_set(items: object) -> set[str]:
    return {json.dumps(item) for item in items}  # type: ignore[attr-defined]
