"""inference-worker's contract: the serving contract (shared/inference.py, shared/embeddings.py) and the
deploy events a worker acts on. Its typed client is shared/inference_client.py (``InferenceClient``)."""

from __future__ import annotations

from shared import subjects
from shared.contracts import Consumes, Contract, RpcOp, Store, Subscription
from shared.contracts import hardware_inventory, model_store
from shared.events import DeployReleased, DeployScheduled, UndeployRequested
from shared.inference import InferenceRequest, LoadedModels, LoadedModelsRequest

SERVICE = "inference-worker"
_WORKER = "services.inference_worker.service_layer.worker:Worker"

MODELS = RpcOp(SERVICE, "models", LoadedModelsRequest, LoadedModels, f"{_WORKER}.loaded",
               "what this worker holds",
               every_replica=True)

DEPLOYS = Consumes(f"{SERVICE}-{{node}}", subjects.DEPLOY_EVENTS, {
    DeployScheduled: f"{_WORKER}.on_scheduled", UndeployRequested: f"{_WORKER}.on_undeploy",
    DeployReleased: f"{_WORKER}.on_released",
}, purpose="every worker sees every deploy event: a durable per node")
JOBS = Consumes("jobs-{model}", subjects.INFERENCE_JOB_PATTERN,
                {InferenceRequest: "services.inference_worker.service_layer.jobs:JobRunner.process"},
                stream=subjects.JOBS_STREAM, purpose="batch jobs: one durable per model, shared by its workers",
                registered_by="services.inference_worker.service_layer.jobs:JobRunner.start")

_PER_MODEL = "per model (the model's name as one token)"
_SERVING = f"{_WORKER}._serving"  # subscribes a model's subjects as it gains its first ready deployment
REQUESTS = Subscription(subjects.INFERENCE_REQUEST_PATTERN, f"{_WORKER}.on_request",
                        "inference requests (request-reply), while the model is deployed here", _PER_MODEL,
                        permits=subjects.inference_requests(), registered_by=_SERVING)
ATTRIBUTED_REQUESTS = Subscription(subjects.ATTRIBUTED_REQUEST_PATTERN, f"{_WORKER}.on_request",
                                   "the api-gateway's requests, naming the API key that asked", _PER_MODEL,
                                   permits=subjects.inference_requests(), registered_by=_SERVING)
EMBEDDINGS = Subscription(subjects.EMBEDDING_REQUEST_PATTERN, f"{_WORKER}.on_request",
                          "embedding requests (request-reply)", _PER_MODEL, permits=subjects.embedding_requests(),
                          registered_by=_SERVING)
ATTRIBUTED_EMBEDDINGS = Subscription(subjects.ATTRIBUTED_EMBEDDING_PATTERN, f"{_WORKER}.on_request",
                                     "the api-gateway's embedding requests", _PER_MODEL,
                                     permits=subjects.embedding_requests(), registered_by=_SERVING)
CANCELS = Subscription(
    subjects.CANCEL, f"{_WORKER}.on_cancel", "stop a request wherever it runs (every worker hears it)",
    registered_by=f"{_WORKER}.start",
)

CONTRACT = Contract(
    SERVICE,
    "Loads the models scheduled on its node and serves them.",
    rpc=(MODELS,),
    consumes=(DEPLOYS, JOBS),
    subscriptions=(REQUESTS, ATTRIBUTED_REQUESTS, EMBEDDINGS, ATTRIBUTED_EMBEDDINGS, CANCELS),
    # Reads blobs (never writes them): a worker cannot change what it is about to verify.
    stores=(
        Store(subjects.JOBS_STREAM, "stream", purpose="batch jobs, a work queue"),
        Store(subjects.RESULTS_STREAM, "stream", purpose="the jobs' results, kept a day"),
        Store(subjects.BLOB_BUCKET, "object", purpose="model files, fetched and verified"),
    ),
    calls=(model_store.RESOLVE, model_store.PUBLIC_KEY, hardware_inventory.ASSIGNED),
    sends=(subjects.INFERENCE_RESULTS_ALL,),
    client="shared.inference_client:InferenceClient",
)
