"""The one definition of Strata's NATS subjects and JetStream stream names."""

EVENTS_STREAM = "EVENTS"
DEADLETTER_STREAM = "DEADLETTER"

EVENTS_ALL = "evt.>"
LIVE_ALL = "live.>"
DEADLETTER_ALL = "dlq.>"


def event(event_type: str, *, persistent: bool = True) -> str:
    """``evt.<domain>.<event>`` for events kept in EVENTS, ``live.<domain>.<event>`` for telemetry."""
    return f"{'evt' if persistent else 'live'}.{event_type}"


def dead_letter(service: str) -> str:
    return f"dlq.{service}"


def rpc(service: str, op: str) -> str:
    return f"rpc.{service}.{op}"


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
