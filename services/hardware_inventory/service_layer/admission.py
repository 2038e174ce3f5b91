"""The admission policy applied to one deploy request: decide, and publish the decision.

``policy.decided`` goes out before the deploy.scheduled / deploy.rejected it leads to, with an id
derived from the deployment, so a redelivered request republishes the same event (JetStream drops
the duplicate) and the ledger records one decision per deployment.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from services.hardware_inventory.domain import placement
from services.hardware_inventory.domain.policy import AdmissionPolicy, Decision, evaluate
from shared.catalog import ResolvedModel
from shared.events import EventData, PolicyDecided
from shared.inventory import NodeRecord

Emit = Callable[[EventData, str], Awaitable[None]]


def eligible_labels(nodes: list[NodeRecord], constraints: dict[str, str]) -> list[dict[str, str]]:
    """Labels of the nodes the request could use but for the policy: alive, with a device matching the constraints."""
    return [n.labels for n in nodes
            if n.status == "alive" and any(placement.constraint_mismatch(constraints, n, d) is None for d in n.devices)]


async def admit(policy: AdmissionPolicy | None, resolved: ResolvedModel, *, deployment_id: str, model_ref: str,
                nodes: list[NodeRecord], constraints: dict[str, str], emit: Emit) -> Decision | None:
    """The decision (None without a policy), announced as ``policy.decided``."""
    if policy is None:
        return None
    decision = evaluate(policy, resolved)
    if decision.admitted:
        decision = decision.no_node_left(eligible_labels(nodes, constraints))
    await emit(
        PolicyDecided(
            deployment_id=deployment_id,
            model=resolved.model,
            model_ref=model_ref,
            admitted=decision.admitted,
            rules=decision.results,
            policy_digest=policy.digest,
        ),
        f"{deployment_id}.policy",
    )
    return decision
