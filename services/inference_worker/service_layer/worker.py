"""The worker: the models scheduled on its node, and the requests, embeddings, jobs and cancels for
them. Deploy events → deployments.py; ``infer.request.<model>`` → serving.py; ``infer.embed.<model>`` →
embedding.py; ``infer.jobs.<model>`` → jobs.py; ``infer.cancel``; ``rpc.inference-worker.models``
(shared/contracts/inference.py declares each, with its handler here).

Its request subjects come and go with the deployments, so it subscribes with nats-py as a model gains
its first ready deployment and unsubscribes as it loses its last one."""

from __future__ import annotations

import asyncio
import logging

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from shared import errors, rpc, subjects
from shared.assignments import Assigned, AssignedRequest
from shared.catalog import parse_ref
from shared.contracts import hardware_inventory
from shared.events import DeployReleased, DeployScheduled, Event, UndeployRequested
from shared.inference import InferenceCancel, LoadedDeployment, LoadedModels, LoadedModelsRequest
from shared.inference_jobs import ensure_job_streams
from shared.service import Service
from services.inference_worker.adapters.artifacts import ArtifactSource, ModelStoreSource
from services.inference_worker.adapters.inflight_journal import InflightJournal
from services.inference_worker.config import WorkerOptions
from services.inference_worker.service_layer.deployments import Deployments
from services.inference_worker.service_layer.embedding import Embedder
from services.inference_worker.service_layer.jobs import JobRunner
from services.inference_worker.service_layer.residency import Budget, Residency
from services.inference_worker.service_layer.serving import Server

log = logging.getLogger("inference-worker")
DRAIN_TIMEOUT_S = 60.0


class Worker:
    """The started worker, built whole when the service starts (NATS connected): app.py provides it at
    once, so the contract's handlers answer "not started yet" only until then."""

    def __init__(self, service: Service, artifacts: ArtifactSource, options: WorkerOptions) -> None:
        self.service, self.options = service, options
        self.node_id = service.settings.node_id
        self.deployments = Deployments(self.node_id, artifacts, service.publish, self._serving, options.engine)
        budget = options.ondemand_memory_bytes
        self.residency = Residency(
            self.deployments,
            service.publish,
            self.node_id,
            Budget(budget) if budget is not None else None,
            load_timeout_s=options.load_timeout_s,
            tick_s=options.keep_alive_tick_s,
        )
        self.deployments.make_room = self.residency.room_for_always_on
        self.server = Server(
            self.deployments,
            self.node_id,
            service.publish,
            max_inflight=options.max_inflight,
            journal=InflightJournal(service.settings.service_dir / "inflight.jsonl"),
            residency=self.residency,
        )
        self.embedder = Embedder(
            self.deployments,
            self.node_id,
            service.publish,
            max_inflight=options.max_inflight,
            residency=self.residency,
        )
        self.jobs = JobRunner(service.broker.connection.jetstream(), self.server, options.jobs)
        self.stopping = False
        self._subs: dict[str, list[Subscription]] = {}  # a model's request and embedding subjects, plain and attributed
        self._cancel_sub: Subscription | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._reconciling: asyncio.Future[None] | None = None

    @classmethod
    def build(cls, service: Service, artifacts: ArtifactSource | None, options: WorkerOptions) -> Worker:
        """The worker of this service; ``artifacts`` defaults to model-store's verified fetch."""
        nc = service.broker.connection
        return cls(service, artifacts or ModelStoreSource(nc, service.settings.service_dir / "cache"), options)

    async def start(self) -> None:
        """Report what an earlier worker left unfinished, make the job streams, and subscribe the cancels
        (registered here, not by Service: the Worker answers them from its own Server and Embedder, with
        nats-py like its request subjects), then load what the registry books on this node."""
        nc = self.service.broker.connection
        self.residency.start()
        if cut := await self.server.report_cut_short():
            log.warning(
                "published inference.failed for %d request(s) an earlier worker on this node left unfinished", cut
            )
        await ensure_job_streams(nc.jetstream())
        # nats-py directly: these subscriptions come and go with the deployments, which FastStream's
        # subscribers (declared before the broker starts) are too static for.
        self._cancel_sub = await nc.subscribe(subjects.CANCEL, cb=self.on_cancel)
        self._reconciling = asyncio.ensure_future(self._reconcile())

    async def _reconcile(self, attempts: int = 60, wait_s: float = 2.0) -> None:
        """Load what the registry books on this node: after a crash or kill -9 the durable consumer has
        long acknowledged those deploy.scheduled, so nothing else would bring them back."""
        request = AssignedRequest(node_id=self.node_id)
        for _ in range(attempts):
            try:
                assigned = await rpc.call(
                    self.service.broker.connection, hardware_inventory.ASSIGNED.subject, request, Assigned, timeout=5
                )
                break
            except errors.Unavailable:  # the registry is starting too, or NATS is back in a moment
                await asyncio.sleep(wait_s)
        else:
            log.warning(
                "could not ask hardware-inventory what this node holds; deployments come with the next deploy.scheduled"
            )
            return
        loading = [e for e in assigned.scheduled if self.deployments.schedule(e)]
        if loading:
            log.info(
                "loading %d deployment(s) the registry books on this node: %s",
                len(loading),
                ", ".join(f"{e.model_ref or e.model.name} ({e.deployment_id})" for e in loading),
            )

    async def stop(self) -> None:
        """SIGTERM: take no new requests or jobs, let those in flight finish, unload everything
        (deploy.unloaded for each), then let the process exit."""
        self.stopping = True
        if self._reconciling is not None:
            self._reconciling.cancel()
        for subs in self._subs.values():
            for sub in subs:
                await sub.unsubscribe()
        self._subs.clear()
        await self.jobs.stop_all()
        deadline = asyncio.get_running_loop().time() + DRAIN_TIMEOUT_S
        while self.server.inflight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.residency.stop()
        await self.deployments.shutdown()
        if self._cancel_sub is not None:
            await self._cancel_sub.unsubscribe()

    # ---- deploy events ----------------------------------------------------------------------
    async def on_scheduled(self, event: Event[DeployScheduled]) -> None:
        if self.stopping and event.data.node_id == self.node_id:
            raise RuntimeError("the worker is shutting down; the deployment is retried after its restart")
        self.deployments.schedule(event.data)

    async def on_undeploy(self, event: Event[UndeployRequested]) -> None:
        ref = parse_ref(event.data.model_ref)
        for dep in self.deployments.matching(deployment_id=event.data.deployment_id, ref=ref):
            self.deployments.request_unload(dep)

    async def on_released(self, event: Event[DeployReleased]) -> None:
        if event.data.node_id != self.node_id:
            return
        for dep in self.deployments.matching(deployment_id=event.data.deployment_id, replica=event.data.replica):
            self.deployments.request_unload(dep)

    async def _serving(self, name: str, serving: bool) -> None:
        """The first ready deployment of ``name`` subscribes its request subjects, and starts its jobs'
        consumer; the last one gone unsubscribes (the contract's ``registered_by`` for those subjects)."""
        nc = self.service.broker.connection
        if serving and not self.stopping and name not in self._subs:
            self._subs[name] = []
            for attributed in (False, True):  # attributed: from the api-gateway, naming the key that asked
                for subject, embed in (
                    (subjects.inference_request(name, attributed=attributed), False),
                    (subjects.embedding_request(name, attributed=attributed), True),
                ):

                    async def receive(msg: Msg, embed: bool = embed, attributed: bool = attributed) -> None:
                        self._spawn(self.on_request(name, msg, embed=embed, attributed=attributed))

                    self._subs[name].append(await nc.subscribe(subject, queue=subjects.token(name), cb=receive))
            await self.jobs.start(name)
        elif not serving:
            for sub in self._subs.pop(name, []):
                await sub.unsubscribe()
            self._spawn(self.jobs.stop(name))

    # ---- requests ---------------------------------------------------------------------------
    async def on_request(self, name: str, msg: Msg, *, embed: bool, attributed: bool) -> None:
        nc = self.service.broker.connection
        if not msg.reply:
            log.warning("a request on %s without a reply subject was dropped", msg.subject)
            return

        async def send(data: bytes) -> None:
            await nc.publish(msg.reply, data)

        try:
            await (self.embedder if embed else self.server).handle(
                msg.data, msg.headers, name, send, attributed=attributed
            )
        except Exception:  # the reply inbox is gone or NATS is down: nothing left to tell the caller
            log.exception("request on %s failed", msg.subject)

    async def on_cancel(self, msg: Msg) -> None:
        try:
            cancel = InferenceCancel.model_validate_json(msg.data)
        except ValueError:
            return
        if self.server.cancel(cancel.request_id) or self.embedder.cancel(cancel.request_id):
            log.info("cancelled %s: %s", cancel.request_id, cancel.reason)

    async def loaded(self, _request: LoadedModelsRequest) -> LoadedModels:
        return LoadedModels(
            node_id=self.node_id,
            deployments=[
                LoadedDeployment(
                    deployment_id=d.deployment_id,
                    replica=d.replica,
                    model=d.model,
                    aliases=list(d.aliases),
                    device=d.device,
                    state=d.state,
                    requests_in_flight=len(d.inflight),
                    reason=d.reason,
                    max_model_len=d.loop.engine.max_model_len if d.loop is not None else None,
                    runtime=d.loop.runtime if d.loop is not None else None,
                    on_demand=d.on_demand,
                    loaded=d.loop is not None,
                    keep_alive_s=d.keep_alive_s if d.on_demand else None,
                )
                for d in self.deployments.by_key.values()
            ],
        )

    def _spawn(self, coro) -> None:
        # nats-py runs one subscription's callbacks one after another: each request gets its own
        # task, so concurrent requests reach the engine together and share its steps.
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
