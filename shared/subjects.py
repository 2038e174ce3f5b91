"""The one definition of Strata's NATS subjects, JetStream stream names, KV buckets and object stores.

No other module spells a subject, stream or bucket name (tests/foundation/test_contracts.py checks):
they take them from here, and the service contracts (shared/contracts) say who uses which."""

EVENTS_STREAM = "EVENTS"
DEADLETTER_STREAM = "DEADLETTER"
JOBS_STREAM = "JOBS"  # infer.jobs.<model>: batch jobs, a work queue
RESULTS_STREAM = "RESULTS"  # infer.results.<request id>: their results, kept a day

EVENTS_ALL = "evt.>"
LIVE_ALL = "live.>"
DEADLETTER_ALL = "dlq.>"
RPC_ALL = "rpc.>"

# Buckets and object stores (each is a stream: KV_<bucket>, OBJ_<store>).
CATALOG_BUCKET = "strata-catalog"  # model-store: manifests, versions, aliases
BLOB_BUCKET = "strata-blobs"  # model-store: the Object Store of model and dataset files
INVENTORY_BUCKET = "strata-inventory"  # hardware-inventory: nodes and bookings
API_KEYS_BUCKET = "strata-api-keys"  # `strata key`'s: API key records
QUOTAS_BUCKET = "strata-quotas"  # api-gateway: per-key quota counters


def event(event_type: str, *, persistent: bool = True) -> str:
    """``evt.<domain>.<event>`` for events kept in EVENTS, ``live.<domain>.<event>`` for telemetry."""
    return f"{'evt' if persistent else 'live'}.{event_type}"


def is_event(subject: str) -> bool:
    """An event's subject (``evt.`` kept in EVENTS, or ``live.`` telemetry)."""
    return subject.startswith(("evt.", "live."))


def matches(pattern: str, subject: str) -> bool:
    """Whether a subscription on ``pattern`` (NATS wildcards ``*`` and ``>``) hears ``subject``."""
    want, got = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(got) > i
        if i >= len(got) or (token != "*" and token != got[i]):
            return False
    return len(want) == len(got)


def events_of(domain: str) -> str:
    """Every persistent event of one domain: ``evt.<domain>.>``."""
    return f"evt.{domain}.>"


DEPLOY_EVENTS = events_of("deploy")


def dead_letter(service: str) -> str:
    return f"dlq.{service}"


def dead_letter_service(subject: str) -> str:
    """The service a dead letter's subject names ('' when it names none)."""
    return subject.removeprefix("dlq.") if subject.startswith("dlq.") else ""


def rpc(service: str, op: str) -> str:
    return f"rpc.{service}.{op}"


def rpc_all(service: str) -> str:
    """Every RPC op of one service: ``rpc.<service>.>``."""
    return f"rpc.{service}.>"


def kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def obj_stream(store: str) -> str:
    return f"OBJ_{store}"


def kv_writes(bucket: str, prefix: str = "") -> str:
    """The subjects a KV bucket's puts and deletes go to (all of them, or those under a key prefix)."""
    return f"$KV.{bucket}.{prefix}>"


def kv_key_of(bucket: str, subject: str) -> str:
    return subject[len(f"$KV.{bucket}."):]


def obj_writes(store: str) -> str:
    return f"$O.{store}.>"


def token(name: str) -> str:
    """A name as one subject token: '.', '*', '>', '%' and whitespace are %-escaped, so that a model
    called ``qwen2.5-0.5b`` gets one token, not three."""
    return "".join(f"%{ord(c):02X}" if c in ".*>%" or c.isspace() else c for c in name)


# The last token of an attributed request's subject: one that names the API key that asked (api_key_id,
# client_request_id). Only the api-gateway may publish there (nats_auth: the others get one token after
# the model's prefix), so a NATS program cannot charge another key's quota or be logged as it.
ATTRIBUTED = "gateway"


def inference_request(model_name: str, *, attributed: bool = False) -> str:
    return f"infer.request.{token(model_name)}" + (f".{ATTRIBUTED}" if attributed else "")


def embedding_request(model_name: str, *, attributed: bool = False) -> str:
    """``infer.embed.<model>``: embeddings (shared/embeddings.py), served next to ``infer.request.<model>``."""
    return f"infer.embed.{token(model_name)}" + (f".{ATTRIBUTED}" if attributed else "")


def inference_job(model_name: str) -> str:
    return f"infer.jobs.{token(model_name)}"


def inference_result(request_id: str) -> str:
    return f"infer.results.{token(request_id)}"


def inference_requests(*, any_suffix: bool = True) -> str:
    """``infer.request.>`` (every model, attributed or not) or ``infer.request.*`` (unattributed only)."""
    return "infer.request.>" if any_suffix else "infer.request.*"


def embedding_requests(*, any_suffix: bool = True) -> str:
    return "infer.embed.>" if any_suffix else "infer.embed.*"


INFERENCE_JOBS_ALL = "infer.jobs.>"
INFERENCE_RESULTS_ALL = "infer.results.>"
CANCEL = "infer.cancel"  # InferenceCancel: stops a request wherever it runs (every worker hears it)

# The patterns as AsyncAPI and infra/SUBJECTS.md write them: a parameter per variable token.
INFERENCE_REQUEST_PATTERN = "infer.request.{model}"
ATTRIBUTED_REQUEST_PATTERN = f"infer.request.{{model}}.{ATTRIBUTED}"
EMBEDDING_REQUEST_PATTERN = "infer.embed.{model}"
ATTRIBUTED_EMBEDDING_PATTERN = f"infer.embed.{{model}}.{ATTRIBUTED}"
INFERENCE_JOB_PATTERN = "infer.jobs.{model}"
INFERENCE_RESULT_PATTERN = "infer.results.{request_id}"
