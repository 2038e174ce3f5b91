"""What hardware-inventory holds for a node, asked by that node's worker when it starts
(``rpc.hardware-inventory.assigned``): a worker that was killed comes back with the deployments the
registry still books on its node, without waiting for anyone to deploy them again."""

from __future__ import annotations

from pydantic import BaseModel, Field

from shared.events import DeployScheduled


class AssignedRequest(BaseModel):
    node_id: str = Field(min_length=1)


class Assigned(BaseModel):
    """Each replica placed on the node (scheduled or ready), as the deploy.scheduled that placed it."""

    scheduled: list[DeployScheduled]
