"""Use cases of placement: fit, deploy, undeploy, measured feedback, re-placement after a node loss.

Every change to bookings is one compare-and-set on the allocations document (adapters/state.py);
the functions passed to it are pure, and events are published after the write with ids derived
from the deployment, replica and generation, so a redelivered request republishes the same events
(JetStream drops the duplicates) instead of booking twice.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from services.hardware_inventory.adapters.catalog import ModelCatalog
from services.hardware_inventory.adapters.state import InventoryState, Unchanged
from services.hardware_inventory.config import InventoryConfig
from services.hardware_inventory.domain import placement
from services.hardware_inventory.domain import correction as corrections
from services.hardware_inventory.domain.correction import IgnoredMeasurement
from services.hardware_inventory.domain.fit import predict, refusal, shape_from_metadata
from services.hardware_inventory.domain.model import Allocations
from services.hardware_inventory.domain.policy import AdmissionPolicy
from services.hardware_inventory.service_layer.admission import admit
from services.hardware_inventory.service_layer.nodes import NodeTable
from services.hardware_inventory.service_layer.views import estimate_view
from shared import errors
from shared.catalog import ResolvedModel
from shared.events import (
    DEFAULT_KEEP_ALIVE_S,
    DeployReady,
    DeployRejected,
    DeployReleased,
    DeployScheduled,
    EventData,
    MeasuredMemory,
    ModelLoaded,
    ModelUnloaded,
    new_id,
    utcnow,
)
from shared.inventory import (
    Correction, DeployOutcome, DeployRequest, Deployment, EstimateView, FitEstimate, FitReport, FitRequest, FitRow,
    ModelShape, NodeRecord, Replica, correction_key,
)

log = logging.getLogger(__name__)
Publish = Callable[..., Awaitable[object]]


@dataclass
class Placed:
    """What one allocations write did, to be announced after it."""

    scheduled: list[tuple[Deployment, Replica]] = field(default_factory=list)
    released: list[tuple[Deployment, Replica, str]] = field(default_factory=list)
    rejected: list[tuple[Deployment, int, str]] = field(default_factory=list)


class Deployments:
    def __init__(
        self,
        state: InventoryState,
        nodes: NodeTable,
        catalog: ModelCatalog,
        publish: Publish,
        config: InventoryConfig,
        admission: AdmissionPolicy | None = None,
    ) -> None:
        self.state, self.nodes, self.catalog, self.publish, self.config = state, nodes, catalog, publish, config
        self.admission = admission
        # told (architecture, device kind, booked / measured) of each loaded replica: how well the fit did
        self.on_measured: list[Callable[[str, str, float], None]] = []

    # -- prediction ----------------------------------------------------------------------------
    async def _resolve(self, ref: str) -> ResolvedModel:
        try:
            return await self.catalog.resolve(ref)
        except errors.NotFound as exc:
            raise errors.NotFound(f"model {ref!r} not found in model-store: {exc.message}") from None
        except errors.Unavailable as exc:
            raise errors.Unavailable(
                f"model-store unavailable, cannot resolve {ref!r} (try again): {exc.message}"
            ) from None

    async def estimator(
        self, shape: ModelShape, context: int, batch: int, dtype: str | None, quantize: str | None = None
    ) -> Callable[[str], EstimateView]:
        """device kind -> corrected estimate, with the corrections read once."""
        views: dict[str, EstimateView] = {}
        for kind in ("cuda", "cpu"):
            raw = predict(shape, kind, context_length=context, batch=batch, dtype=dtype, quantize=quantize)  # type: ignore[arg-type]
            views[kind] = estimate_view(
                raw, await self.state.correction(correction_key(shape.architecture, raw.dtype, kind))
            )
        return views.__getitem__

    def _context(self, shape: ModelShape, requested: int | None) -> int:
        return requested or min(self.config.default_context or shape.context_length, shape.context_length)

    async def fit(self, request: FitRequest) -> FitReport:
        placement.validate_constraints(request.constraints)
        resolved = await self._resolve(request.model_ref)
        model, meta = resolved.model, resolved.manifest.metadata
        if refused := refusal(meta):
            return FitReport(
                model_ref=request.model_ref,
                model=model,
                architecture=meta.architecture,
                refused=refused,
                batch=request.batch,
                estimates={},
                rows=[],
            )
        shape = shape_from_metadata(meta)
        context = self._context(shape, request.context_length)
        estimate = await self.estimator(shape, context, request.batch, request.dtype, request.quantize)
        nodes = await self.state.nodes()
        slots = placement.slots(
            nodes, await self.state.allocations(), self.nodes.telemetry, self.config.utilisation_cap
        )
        rows = []
        for slot in slots:
            need = estimate(slot.device.kind).booked
            mismatch = placement.constraint_mismatch(request.constraints, slot.node, slot.device)
            fits = slot.node.status == "alive" and mismatch is None and need <= slot.available
            reason = (
                "node lost"
                if slot.node.status != "alive"
                else f"excluded by {mismatch}"
                if mismatch
                else f"fits, {placement.gb(slot.available - need)} left"
                if fits
                else f"short by {placement.gb(need - slot.available)}"
            )
            rows.append(
                FitRow(
                    node_id=slot.node.node_id,
                    device=slot.device.id,
                    kind=slot.device.kind,
                    name=slot.device.name,
                    node_status=slot.node.status,
                    need=need,
                    available=slot.available,
                    capacity=slot.capacity,
                    fits=fits,
                    reason=reason,
                )
            )
        return FitReport(
            model_ref=request.model_ref,
            model=model,
            architecture=shape.architecture,
            context_length=context,
            batch=request.batch,
            estimates={k: estimate(k) for k in ("cuda", "cpu")},
            rows=rows,
        )

    # -- deploy ----------------------------------------------------------------------------------
    async def deploy(self, request: DeployRequest) -> DeployOutcome:
        deployment_id = request.deployment_id or new_id()
        existing = (await self.state.allocations()).deployments.get(deployment_id)
        if existing is not None:  # a redelivered request: announce again what was decided
            await self._announce(Placed(scheduled=[(existing, r) for r in existing.replicas if r.holds_memory]))
            return DeployOutcome(
                deployment_id=deployment_id, model_ref=request.model_ref, scheduled=True, deployment=existing
            )
        try:
            placement.validate_constraints(request.constraints)
            resolved = await self._resolve(request.model_ref)
            if refused := refusal(resolved.manifest.metadata):  # before the policy, any booking or event to a worker
                return await self._reject(deployment_id, request.model_ref, refused, "unsupported")
            shape = shape_from_metadata(resolved.manifest.metadata)
            context = self._context(shape, request.context_length)
            estimate = await self.estimator(shape, context, request.batch, request.dtype, request.quantize)
        except errors.StrataError as exc:
            return await self._reject(deployment_id, request.model_ref, exc.message, exc.code)
        nodes = await self.state.nodes()
        decision = await admit(
            self.admission,
            resolved,
            deployment_id=deployment_id,
            model_ref=request.model_ref,
            nodes=nodes,
            constraints=request.constraints,
            emit=self._emit,
        )
        if decision is not None and not decision.admitted:
            return await self._reject(deployment_id, request.model_ref, decision.reason or "policy", "forbidden")
        deployment = Deployment(
            deployment_id=deployment_id,
            model_ref=request.model_ref,
            model=resolved.model,
            shape=shape,
            context_length=context,
            batch=request.batch,
            dtype=request.dtype,
            quantize=request.quantize,
            constraints=request.constraints,
            embedding_pooling=request.embedding_pooling,
            on_demand=request.on_demand,
            keep_alive_s=DEFAULT_KEEP_ALIVE_S if request.keep_alive_s is None else request.keep_alive_s,
            policy_exclusions=decision.exclusions if decision else {},
            policy=request.policy or self.config.policy,
            replicas=[Replica(index=i, status="pending") for i in range(request.replicas)],
        )

        def book(allocations: Allocations) -> tuple[Allocations, Placed]:
            if deployment_id in allocations.deployments:
                raise Unchanged(
                    Placed(
                        scheduled=[
                            (allocations.deployments[deployment_id], r)
                            for r in allocations.deployments[deployment_id].replicas
                        ]
                    )
                )
            evicted: list[Deployment] = []
            candidates = sorted(
                (d for d in allocations.deployments.values() if d.state == "ready" and not d.on_demand),
                key=lambda d: d.last_used,
            )  # on-demand ones book nothing: evicting them frees nothing here
            while True:
                slots = placement.slots(nodes, allocations, self.nodes.telemetry, self.config.utilisation_cap)
                try:
                    choices = placement.place(
                        request.replicas,
                        slots,
                        lambda k: estimate(k).corrected,
                        deployment.constraints,
                        deployment.policy,
                        exclusions=deployment.policy_exclusions,
                    )
                    break
                except placement.NoFit as nofit:
                    if not self.config.evict_lru or not candidates:  # optional policy: evict the least recently used
                        raise Unchanged(Placed(rejected=[(deployment, -1, nofit.reason)])) from None
                    victim = candidates.pop(0)
                    evicted.append(victim)
                    allocations = Allocations(
                        deployments={k: v for k, v in allocations.deployments.items() if k != victim.deployment_id}
                    )
            placed = deployment.model_copy(update={"replicas": [_replica(i, c) for i, c in enumerate(choices)]})
            updated = allocations.model_copy(update={"deployments": {**allocations.deployments, deployment_id: placed}})
            released = [
                (d, r, f"evicted (least recently used) for {request.model_ref}")
                for d in evicted
                for r in d.replicas
                if r.holds_memory
            ]
            return updated, Placed(scheduled=[(placed, r) for r in placed.replicas], released=released)

        done = await self.state.change_allocations(book)
        await self._announce(done)
        if done.rejected:
            return DeployOutcome(
                deployment_id=deployment_id,
                model_ref=request.model_ref,
                scheduled=False,
                reason=done.rejected[0][2],
                code="no_fit",
            )
        return DeployOutcome(
            deployment_id=deployment_id, model_ref=request.model_ref, scheduled=True, deployment=done.scheduled[0][0]
        )

    async def _reject(self, deployment_id: str, model_ref: str, reason: str, code: str) -> DeployOutcome:
        await self._emit(
            DeployRejected(deployment_id=deployment_id, model_ref=model_ref, reason=reason), f"{deployment_id}.rejected"
        )
        return DeployOutcome(
            deployment_id=deployment_id, model_ref=model_ref, scheduled=False, reason=reason, code=code
        )

    async def undeploy(self, model_ref: str | None, deployment_id: str | None) -> list[str]:
        if not model_ref and not deployment_id:
            raise errors.Invalid("undeploy needs a model reference or a deployment id")

        def release(allocations: Allocations) -> tuple[Allocations, tuple[Placed, list[str]]]:
            if deployment_id:
                gone = [allocations.deployments[deployment_id]] if deployment_id in allocations.deployments else []
            else:
                gone = allocations.by_ref(model_ref or "")
            if not gone:
                raise Unchanged((Placed(), []))
            ids = sorted(d.deployment_id for d in gone)
            remaining = {k: v for k, v in allocations.deployments.items() if k not in ids}
            released = [(d, r, "undeployed") for d in gone for r in d.replicas if r.holds_memory]
            return Allocations(deployments=remaining), (Placed(released=released), ids)

        done, ids = await self.state.change_allocations(release)
        if not ids:
            raise errors.NotFound(f"no deployment of {deployment_id or model_ref!r}")
        await self._announce(done)
        await self.reconcile()  # freed memory may let waiting replicas in
        return ids

    async def assigned(self, node_id: str) -> list[DeployScheduled]:
        """Every replica booked on ``node_id`` (scheduled or ready), as the deploy.scheduled that placed it:
        what a worker that starts there must hold."""
        allocations = await self.state.allocations()
        return [
            _scheduled(d, r)
            for d in allocations.deployments.values()
            for r in d.replicas
            if r.node_id == node_id and r.holds_memory
        ]

    # -- feedback from workers -----------------------------------------------------------------
    async def ready(self, event: DeployReady) -> None:
        """Mark the replica loaded and learn from its measured memory."""

        def mark(allocations: Allocations) -> tuple[Allocations, tuple[Deployment, Replica] | None]:
            deployment = allocations.deployments.get(event.deployment_id)
            replica = _replica_on(deployment, event.node_id, event.device)
            if deployment is None or replica is None or replica.status == "ready":
                raise Unchanged(None)
            updated = replica.model_copy(
                update={
                    "status": "ready",
                    "measured_peak": event.measured.peak or None,
                    "runtime": event.runtime,
                    "loaded": False if event.on_demand else None,
                }
            )
            placed = _with_replica(deployment, updated).model_copy(update={"last_used": utcnow()})
            return allocations.model_copy(
                update={"deployments": {**allocations.deployments, deployment.deployment_id: placed}}
            ), (placed, replica)

        found = await self.state.change_allocations(mark)
        if found is None:
            log.info(
                "deploy.ready for %s on %s: no such scheduled replica (undeployed or moved)",
                event.deployment_id,
                event.node_id,
            )
            return
        deployment, replica = found
        if not event.on_demand:  # an on-demand one is measured at each load (deploy.model_loaded)
            await self._learn(deployment, replica, event.measured)

    async def residency(self, event: ModelLoaded | ModelUnloaded) -> None:
        """An on-demand replica loaded (with its measured memory, learned from as at deploy.ready) or unloaded."""
        loaded = isinstance(event, ModelLoaded)

        def mark(allocations: Allocations) -> tuple[Allocations, tuple[Deployment, Replica] | None]:
            deployment = allocations.deployments.get(event.deployment_id)
            replica = _replica_on(deployment, event.node_id, event.device)
            if deployment is None or replica is None or replica.loaded is loaded:
                raise Unchanged(None)
            update: dict = {"loaded": loaded}
            if isinstance(event, ModelLoaded):
                update.update(measured_peak=event.measured.peak, runtime=event.runtime)
            placed = _with_replica(deployment, replica.model_copy(update=update))
            if loaded:
                placed = placed.model_copy(update={"last_used": utcnow()})
            return allocations.model_copy(
                update={"deployments": {**allocations.deployments, deployment.deployment_id: placed}}
            ), (placed, replica)

        found = await self.state.change_allocations(mark)
        if found is not None and isinstance(event, ModelLoaded):
            await self._learn(*found, event.measured)

    async def _learn(self, deployment: Deployment, replica: Replica, measured: MeasuredMemory) -> None:
        """The worker's measurement after a load corrects the fit of this architecture on this device kind."""
        for tell in self.on_measured:
            tell(deployment.shape.architecture, replica.device_kind, replica.predicted_bytes / measured.peak)
        raw = predict(
            deployment.shape,
            replica.device_kind,
            context_length=deployment.context_length,  # type: ignore[arg-type]
            batch=deployment.batch,
            dtype=replica.dtype,
            quantize=deployment.quantize,
        )
        key = correction_key(deployment.shape.architecture, raw.dtype, raw.device_kind)
        sample = f"{deployment.deployment_id}.{replica.index}.{replica.generation}"

        def learn(current: Correction | None) -> tuple[Correction, Correction | IgnoredMeasurement]:
            base = current or Correction(
                architecture=deployment.shape.architecture, dtype=raw.dtype, device_kind=raw.device_kind
            )
            if sample in base.applied:
                raise Unchanged(base)
            try:
                learned = corrections.learn(
                    base, raw, replica.predicted_bytes, measured.weights, measured.kv_cache, measured.peak, sample
                )
            except IgnoredMeasurement as ignored:
                return corrections.ignore(base, ignored, sample), ignored
            return learned, learned

        outcome = await self.state.change(f"correction.{key}", Correction, learn)
        if isinstance(outcome, IgnoredMeasurement):
            log.warning(
                "not learning from the measurement of %s on %s: %s", deployment.deployment_id, replica.node_id, outcome
            )
            return
        log.info(
            "%s: predicted %d B, measured %d B (error %+.1f%%); factors now w=%.3f o=%.3f",
            key,
            replica.predicted_bytes,
            measured.peak,
            100 * (outcome.last_error or 0),
            outcome.weights_factor,
            outcome.overhead_factor,
        )

    async def worker_let_go(self, deployment_id: str, node_id: str, why: str, *, failed: bool) -> None:
        """deploy.failed / deploy.unloaded: the replica holds no memory there any more. An unloaded
        replica waits to be placed again; a failed one stays failed (no retry loop on a bad model)."""

        def free(allocations: Allocations) -> tuple[Allocations, bool]:
            deployment = allocations.deployments.get(deployment_id)
            replicas = [
                r for r in (deployment.replicas if deployment else []) if r.node_id == node_id and r.holds_memory
            ]
            if deployment is None or not replicas:
                raise Unchanged(False)
            for r in replicas:
                deployment = _with_replica(
                    deployment,
                    Replica(index=r.index, status="failed" if failed else "pending", generation=r.generation),
                )
            return allocations.model_copy(
                update={"deployments": {**allocations.deployments, deployment_id: deployment}}
            ), True

        if await self.state.change_allocations(free):
            log.warning("deployment %s: replica on %s freed (%s)", deployment_id, node_id, why)

    # -- re-placement ------------------------------------------------------------------------------
    async def node_lost(self, node_id: str) -> None:
        nodes = await self.state.nodes()
        estimators = await self._estimators(await self.state.allocations())

        def move(allocations: Allocations) -> tuple[Allocations, Placed]:
            done = Placed()
            deployments = dict(allocations.deployments)
            for dep_id, deployment in allocations.deployments.items():
                for replica in deployment.replicas:
                    if replica.node_id == node_id and replica.holds_memory:
                        done.released.append((deployment, replica, f"node {node_id} lost"))
                        deployment = _with_replica(
                            deployment, Replica(index=replica.index, status="pending", generation=replica.generation)
                        )
                deployments[dep_id] = deployment
            if not done.released:
                raise Unchanged(done)
            current = allocations.model_copy(update={"deployments": deployments})
            return _place_pending(current, nodes, self.nodes.telemetry, self.config, estimators, done)

        await self._announce(await self.state.change_allocations(move))

    async def reconcile(self) -> None:
        """Place replicas that wait for room (after a node loss found none): on node return, undeploy."""
        allocations = await self.state.allocations()
        if not any(r.status == "pending" for d in allocations.deployments.values() for r in d.replicas):
            return
        nodes = await self.state.nodes()
        estimators = await self._estimators(allocations)

        def place(current: Allocations) -> tuple[Allocations, Placed]:
            updated, done = _place_pending(
                current, nodes, self.nodes.telemetry, self.config, estimators, Placed(), quiet=True
            )
            if not done.scheduled:
                raise Unchanged(done)
            return updated, done

        await self._announce(await self.state.change_allocations(place))

    async def _estimators(self, allocations: Allocations) -> dict[str, Callable[[str], EstimateView]]:
        return {
            d.deployment_id: await self.estimator(d.shape, d.context_length, d.batch, d.dtype, d.quantize)
            for d in allocations.deployments.values()
        }

    # -- announcing ----------------------------------------------------------------------------
    async def _announce(self, done: Placed) -> None:
        for deployment, replica, reason in done.released:
            await self._emit(
                DeployReleased(
                    deployment_id=deployment.deployment_id,
                    model=deployment.model,
                    node_id=replica.node_id or "",
                    device=replica.device or "",
                    replica=replica.index,
                    reason=reason,
                ),
                f"{deployment.deployment_id}.{replica.index}.{replica.generation}.released",
            )
        for deployment, replica in done.scheduled:
            await self._emit(
                _scheduled(deployment, replica),
                f"{deployment.deployment_id}.{replica.index}.{replica.generation}.scheduled",
            )
        for deployment, index, reason in done.rejected:
            suffix = "rejected" if index < 0 else f"{index}.{deployment.replicas[index].generation}.rejected"
            await self._emit(
                DeployRejected(
                    deployment_id=deployment.deployment_id,
                    model_ref=deployment.model_ref,
                    reason=reason,
                    replica=None if index < 0 else index,
                ),
                f"{deployment.deployment_id}.{suffix}",
            )

    async def _emit(self, data: EventData, event_id: str) -> None:
        await self.publish(data, event_id="".join(c if c.isalnum() or c in "-_." else "_" for c in event_id)[:128])


def _place_pending(
    allocations: Allocations,
    nodes: list[NodeRecord],
    telemetry,
    config: InventoryConfig,
    estimators: dict,
    done: Placed,
    quiet: bool = False,
) -> tuple[Allocations, Placed]:
    deployments = dict(allocations.deployments)
    for dep_id, deployment in allocations.deployments.items():
        for replica in [r for r in deployment.replicas if r.status == "pending"]:
            current = allocations.model_copy(update={"deployments": deployments})
            slots = placement.slots(nodes, current, telemetry, config.utilisation_cap)
            holders = [r for r in deployment.replicas if r.holds_memory]
            estimate = estimators[dep_id]
            try:
                [choice] = placement.place(
                    1,
                    slots,
                    lambda k, estimate=estimate: estimate(k).corrected,
                    deployment.constraints,
                    deployment.policy,
                    taken=[(r.node_id, r.device) for r in holders],
                    used_nodes=[r.node_id for r in holders],
                    exclusions=deployment.policy_exclusions,
                )
            except placement.NoFit as nofit:
                if not quiet:
                    done.rejected.append(
                        (
                            deployment,
                            replica.index,
                            f"replica {replica.index} of {deployment.model_ref} cannot be placed again: {nofit.reason}",
                        )
                    )
                continue
            placed = _replica(replica.index, choice, generation=replica.generation + 1)
            deployment = _with_replica(deployment, placed)
            deployments[dep_id] = deployment
            done.scheduled.append((deployment, placed))
    return allocations.model_copy(update={"deployments": deployments}), done


def _replica(index: int, choice: placement.Choice, generation: int = 0) -> Replica:
    e: FitEstimate = choice.estimate
    return Replica(
        index=index,
        status="scheduled",
        node_id=choice.node_id,
        device=choice.device.id,
        device_kind=choice.device.kind,
        dtype=e.dtype,
        predicted_bytes=e.total,
        booked_bytes=choice.booked_bytes,
        kv_cache_bytes=e.kv_cache,
        generation=generation,
    )


def _replica_on(deployment: Deployment | None, node_id: str, device: str) -> Replica | None:
    if deployment is None:
        return None
    return next(
        (r for r in deployment.replicas if r.node_id == node_id and r.device == device and r.holds_memory), None
    )


def _with_replica(deployment: Deployment, replica: Replica) -> Deployment:
    return deployment.model_copy(
        update={"replicas": [replica if r.index == replica.index else r for r in deployment.replicas]}
    )


def _scheduled(deployment: Deployment, replica: Replica) -> DeployScheduled:
    return DeployScheduled(
        deployment_id=deployment.deployment_id,
        model=deployment.model,
        node_id=replica.node_id or "",
        device=replica.device or "",
        predicted_bytes=replica.predicted_bytes,
        context_length=deployment.context_length,
        model_ref=deployment.model_ref,
        replica=replica.index,
        replicas=len(deployment.replicas),
        generation=replica.generation,
        # on CPU without a dtype asked for, the worker picks its fastest 16-bit dtype (same bytes as booked)
        dtype=deployment.dtype or (replica.dtype if replica.device_kind != "cpu" else None),
        quantize=deployment.quantize,
        batch=deployment.batch,
        kv_cache_bytes=replica.kv_cache_bytes,
        booked_bytes=replica.booked_bytes,
        embedding_pooling=deployment.embedding_pooling,
        on_demand=deployment.on_demand,
        keep_alive_s=deployment.keep_alive_s,
    )
