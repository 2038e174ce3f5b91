"""The batch-job streams of the serving contract (shared/inference.py), and the client side of a job.

``JOBS`` holds ``infer.jobs.<model>`` with work-queue retention: a job is one unit of work that is
gone once a worker acknowledged it (after its result is stored), and the stream then allows exactly
one consumer per model subject, the durable ``jobs-<model>`` that every worker hosting the model
shares, so each job goes to one worker at a time. ``RESULTS`` keeps ``infer.results.<request id>``
(limits retention, a day) so a client can read a result whenever it comes back. Both drop a message
whose ``Nats-Msg-Id`` (the request id) they saw within the duplicate window."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import PubAck, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from shared import subjects
from shared.bus import declare_streams
from shared.inference import JOBS_STREAM, RESULTS_STREAM, InferenceRequest
from shared.rpc import RpcReply

DUPLICATE_WINDOW_S = 600.0
RESULTS_MAX_AGE_S = 24 * 3600.0


def job_stream_configs(replicas: int = 1) -> list[StreamConfig]:
    return [
        StreamConfig(name=JOBS_STREAM, subjects=[subjects.INFERENCE_JOBS_ALL], retention=RetentionPolicy.WORK_QUEUE,
                     storage=StorageType.FILE, duplicate_window=DUPLICATE_WINDOW_S, num_replicas=replicas),
        StreamConfig(name=RESULTS_STREAM, subjects=[subjects.INFERENCE_RESULTS_ALL], retention=RetentionPolicy.LIMITS,
                     storage=StorageType.FILE, duplicate_window=DUPLICATE_WINDOW_S, max_age=RESULTS_MAX_AGE_S,
                     max_msgs_per_subject=1, num_replicas=replicas),
    ]


async def ensure_job_streams(js: JetStreamContext, replicas: int = 1) -> None:
    """A worker's start: JOBS and RESULTS exist (see bus.ensure_streams)."""
    await declare_streams(js, job_stream_configs(replicas), update=False)


async def submit_job(js: JetStreamContext, request: InferenceRequest) -> PubAck:
    """Queue a job for the workers of ``request.model``; ``duplicate`` is set on the PubAck when
    the same request id was submitted within the duplicate window."""
    from shared.catalog import parse_ref

    name = parse_ref(request.model).name
    return await js.publish(subjects.inference_job(name), request.model_dump_json().encode(), stream=JOBS_STREAM,
                            headers={"Nats-Msg-Id": request.request_id})


async def job_result(js: JetStreamContext, request_id: str) -> RpcReply | None:
    """The stored result of a job (an RpcReply whose result is an InferenceReply), None if not yet."""
    try:
        msg = await js.get_last_msg(RESULTS_STREAM, subjects.inference_result(request_id))
    except NotFoundError:
        return None
    return RpcReply.model_validate_json(msg.data or b"{}")
