"""api-gateway's contract: the OpenAI-compatible HTTP edge. On NATS it only asks: inference requests,
jobs and cancels to the workers, and their models; it settles quotas from inference.completed."""

from __future__ import annotations

from shared import subjects
from shared.contracts import Contract, Store, Subscription
from shared.contracts import inference
from shared.events import InferenceCompleted

SERVICE = "api-gateway"

COMPLETIONS = Subscription(InferenceCompleted.subject(),
                           "services.api_gateway.service_layer.metering:Metering.on_completed",
                           "settles token reservations (every replica: the one holding the reservation settles it)",
                           registered_by="services.api_gateway.entrypoints.app:open_quotas")

CONTRACT = Contract(
    SERVICE, "OpenAI-compatible HTTP API in front of the workers.",
    subscriptions=(COMPLETIONS,),
    # Reads the API keys, never writes them: a compromised edge must not mint an admin key.
    stores=(Store(subjects.API_KEYS_BUCKET, "kv", purpose="API keys"),
            Store(subjects.QUOTAS_BUCKET, "kv", owns=True, purpose="per-key quota counters, shared by every replica"),
            Store(subjects.RESULTS_STREAM, "stream", purpose="batch jobs' results")),
    calls=(inference.MODELS,),
    sends=(subjects.inference_requests(), subjects.embedding_requests(), subjects.INFERENCE_JOBS_ALL, subjects.CANCEL),
)
