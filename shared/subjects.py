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


def inference_request(model: str) -> str:
    return f"infer.request.{model}"


def inference_job(model: str) -> str:
    return f"infer.jobs.{model}"
