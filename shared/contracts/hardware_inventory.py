"""hardware-inventory's contract: nodes, devices, memory fit and placement of deployments."""

from __future__ import annotations

from shared import subjects
from shared.assignments import Assigned, AssignedRequest
from shared.contracts import Consumes, Contract, RpcOp, Store, Subscription
from shared.contracts import model_store
from shared.events import (
    DeployFailed,
    DeployReady,
    DeployRequested,
    DeployUnloaded,
    ModelLoaded,
    ModelUnloaded,
    NodeHeartbeat,
    NodeRegistered,
    UndeployRequested,
)
from shared.inventory import (
    CorrectionList, DeploymentList, DeployOutcome, DeployRequest, Empty, FitReport, FitRequest, NodeList,
    UndeployOutcome, UndeployRequest,
)

SERVICE = "hardware-inventory"
_RPC = "services.hardware_inventory.entrypoints.rpc"
_EVENTS = "services.hardware_inventory.entrypoints.events"

NODES = RpcOp(SERVICE, "nodes", Empty, NodeList, f"{_RPC}:nodes", "every node, live")
FIT = RpcOp(SERVICE, "fit", FitRequest, FitReport, f"{_RPC}:fit", "where a model would fit")
DEPLOY = RpcOp(
    SERVICE,
    "deploy",
    DeployRequest,
    DeployOutcome,
    f"{_RPC}:deploy",
    "place a deployment's replicas",
)
DEPLOYMENTS = RpcOp(
    SERVICE, "deployments", Empty, DeploymentList, f"{_RPC}:deployments", "every deployment"
)
UNDEPLOY = RpcOp(
    SERVICE,
    "undeploy",
    UndeployRequest,
    UndeployOutcome,
    f"{_RPC}:undeploy",
    "release a deployment, or every deployment of a model",
)
CORRECTIONS = RpcOp(
    SERVICE,
    "corrections",
    Empty,
    CorrectionList,
    f"{_RPC}:corrections",
    "the memory-fit corrections learnt from measurements",
)
ASSIGNED = RpcOp(
    SERVICE,
    "assigned",
    AssignedRequest,
    Assigned,
    f"{_RPC}:assigned",
    "what the registry books on a node (its worker asks at start)",
)

DEPLOY_CONSUMER = Consumes(
    SERVICE,
    subjects.DEPLOY_EVENTS,
    {
        DeployRequested: f"{_EVENTS}:deploy_requested",
        UndeployRequested: f"{_EVENTS}:undeploy_requested",
        DeployReady: f"{_EVENTS}:deploy_ready",
        ModelLoaded: f"{_EVENTS}:residency_changed",
        ModelUnloaded: f"{_EVENTS}:residency_changed",
        DeployFailed: f"{_EVENTS}:deploy_failed",
        DeployUnloaded: f"{_EVENTS}:deploy_unloaded",
    },
    purpose="the registry: deploys, undeploys and what the workers did with them",
)
NODE_CONSUMER = Consumes(
    f"{SERVICE}-nodes",
    NodeRegistered.subject(),
    {NodeRegistered: f"{_EVENTS}:node_registered"},
    purpose="the registry: a node's first heartbeat, with its devices",
)
AGENT_DEPLOYS = Subscription(
    subjects.DEPLOY_EVENTS,
    f"{_EVENTS}:agent_deploy_event",
    "the agent: what is deployed on its node (every replica hears it)",
)
HEARTBEATS = Subscription(NodeHeartbeat.subject(), f"{_EVENTS}:heartbeat", "the registry: node liveness and telemetry")

INVENTORY = Store(subjects.INVENTORY_BUCKET, "kv", owns=True, purpose="nodes and bookings")
API_KEYS = Store(subjects.API_KEYS_BUCKET, "kv", purpose="API keys, read to guard deploys and undeploys")

CONTRACT = Contract(
    SERVICE,
    "Nodes, devices, memory fit and placement.",
    rpc=(NODES, FIT, DEPLOY, DEPLOYMENTS, UNDEPLOY, CORRECTIONS, ASSIGNED),
    consumes=(DEPLOY_CONSUMER, NODE_CONSUMER),
    subscriptions=(AGENT_DEPLOYS, HEARTBEATS),
    stores=(INVENTORY, API_KEYS),
    calls=(model_store.RESOLVE,),
)
