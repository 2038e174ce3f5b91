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
        assert _plain(nats_auth.permissions(role)) == PINNED[role]["permissions"], role
        assert _plain(nats_auth.NEEDS[role]) == PINNED[role]["needs"], role


def _plain(value: object) -> object:
    """As the snapshot holds it: JSON, where a tuple is a list (order kept: it is the config's order)."""
    return json.loads(json.dumps(dataclasses.asdict(value)))  # type: ignore[call-overload]
