"""Each control request served once: the control channel and the REST API hand the same typed request to `Operations`.

The session-bound requests (ping, subscribe, unsubscribe) stay with the WebSocket session; everything else is here,
with the checks both doors share: the operator's request rate and the least role of the request's table entry.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import trio

from device_client.twin import TwinError
from hub import fleet
from hub.control._codec import (
    CancelCommand,
    Command,
    Commands,
    ControlError,
    Device,
    DeviceAdd,
    DeviceLabel,
    DeviceLabels,
    DeviceRevoke,
    DeviceRotate,
    Devices,
    Empty,
    ErrorCode,
    HubStatus,
    Job,
    JobCancel,
    JobCreate,
    JobDetail,
    Jobs,
    NewToken,
    Request,
    RequestSpec,
    Result,
    SendCommand,
    Status,
    Twin,
    TwinSet,
)
from hub.control_codes import twin_error
from hub.fleet import (
    BadLabel,
    BadName,
    CommandRecord,
    CommandRecordDict,
    DeviceDetail,
    DeviceExists,
    DeviceLedger,
    DeviceStatus,
    DeviceSummary,
    JobRecordDict,
    JobRunner,
    TwinDict,
    UnknownDevice,
    VersionConflict,
    parse_selector,
    role_allows,
)

if TYPE_CHECKING:
    from hub.control._server import ControlServer

__all__ = ["HANDLERS", "Caller", "Operations", "retry_seconds"]

log = logging.getLogger("hub.control")

#: Most recent commands shown in a `device` reply.
DETAIL_COMMANDS = 20

try:
    VERSION = importlib.metadata.version("trio-telemetry-hub")
except importlib.metadata.PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "0+unknown"


@attrs.frozen
class Caller:
    """Who makes a request, and through which door ("control": the WebSocket channel, "rest": HTTP)."""

    operator: str
    role: str
    remote: str = ""
    via: str = "control"

    def kv(self, **extra: object) -> dict[str, dict[str, object]]:
        """Log context of the caller (never a token)."""
        return {"kv": {"operator": self.operator, "role": self.role, "remote": self.remote, "via": self.via, **extra}}


#: The request argument is untyped here: the table holds handlers of different request classes.
_Handler = Callable[["Operations", Caller, Any], Awaitable[Result]]
#: Request class -> the `Operations` method that serves it (registered with `@_handles`).
HANDLERS: dict[type[Request], _Handler] = {}


_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])


def _handles(kind: type[Request]) -> Callable[[_F], _F]:
    """Register the decorated method as the handler of requests of class `kind`."""

    def register(handler: _F) -> _F:
        HANDLERS[kind] = handler
        return handler

    return register


class Operations:
    """The requests of `hub.control.REQUESTS` that need no session, for any caller: `admit`, then `run`."""

    def __init__(self, server: ControlServer) -> None:
        self.server = server

    def retry_after(self, operator: str) -> float:
        """Take one request from the operator's bucket: 0.0 if it had one, else the seconds until it will."""
        bucket = self.server.bucket(operator)
        now = trio.current_time()
        if bucket.try_take(1, now):
            return 0.0
        self.server.stats.requests_rate_limited += 1
        return max(1.0 - bucket.tokens, 0.0) / bucket.per_second

    def rate_error(self) -> ControlError:
        """The refusal of a request over the operator's rate."""
        return ControlError(
            ErrorCode.RATE_LIMITED, f"more than {self.server.config.control.request_rate:g} requests/s: slow down"
        )

    @staticmethod
    def check_role(caller: Caller, spec: RequestSpec) -> None:
        """ControlError(forbidden) unless the caller's role may make requests of `spec`."""
        if not role_allows(caller.role, spec.role):
            raise ControlError(ErrorCode.FORBIDDEN, f"role {caller.role!r} may not {spec.type}")

    async def run(self, caller: Caller, request: Request) -> Result:
        """Serve `request` (its role already checked); ControlError or StoreUnavailable when refused.

        A `send_command` with `wait` is only submitted here: the caller waits with `wait_final`.
        """
        return await HANDLERS[type(request)](self, caller, request)

    async def wait_final(self, request: SendCommand, command_id: str) -> CommandRecordDict:
        """The command's record once final, or as it is at `request.wait_timeout`."""
        record = await self.server.commands.wait_final(command_id, request.wait_timeout)
        return record.as_dict()

    # ------------------------------------------------------------------ reads

    @_handles(Status)
    async def _status(self, caller: Caller, req: Status) -> HubStatus:
        server = self.server
        stats = server.stats
        records = await server.registry.list()
        statuses = await self._statuses([r.name for r in records])
        return {
            "version": VERSION,
            "uptime": round(time.time() - server.started_at, 3),
            "connections": stats.connections,
            "devices": {**fleet.state_counts(statuses.values()), "registered": len(records)},
            "ingest": {
                "points_in": stats.points_in,
                "points_written": stats.points_written,
                "points_spooled": stats.points_spooled,
                "points_replayed": stats.points_replayed,
                "points_dropped": stats.points_dropped,
                "spool_bytes": stats.spool_bytes,
                "sink_up": server.pipeline.sink_up,
            },
            "commands": server.commands.counts(),
            "control_sessions": server.sessions,
        }

    @_handles(Devices)
    async def _devices(self, caller: Caller, req: Devices) -> list[DeviceSummary]:
        records = await self.server.registry.list()
        names = [r.name for r in records]
        statuses = await self._statuses(names)
        selector = None if req.selector is None else parse_selector(req.selector)
        return fleet.list_summaries(records, statuses, await self._ledgers(names), req.state, selector)

    async def _ledgers(self, names: list[str]) -> Callable[[str], DeviceLedger | None]:
        """Each device's ledger here, or (in a cluster) what its hub last saved of it: last_seen, latest points."""
        find = self.server.ledgers.find
        if self.server.cluster is None:
            return find
        saved = await self.server.registry.latest([name for name in names if find(name) is None])
        elsewhere = {
            name: DeviceLedger(name, 0, 0, last_seen=last_seen, latest=latest)
            for name, (last_seen, latest) in saved.items()
        }
        return lambda name: find(name) or elsewhere.get(name)

    async def _statuses(self, names: list[str]) -> Mapping[str, DeviceStatus]:
        """Presence of the fleet: this hub's, or the cluster's (where this hub's own sessions are the freshest)."""
        local = self.server.presence.status
        cluster = self.server.cluster
        if cluster is None:
            return local
        return {**await cluster.statuses(names), **local}

    @_handles(Device)
    async def _device(self, caller: Caller, req: Device) -> DeviceDetail:
        name = req.name
        server = self.server
        record = await server.registry.get(name)
        status = (await self._statuses([name])).get(name)
        if record is None and status is None:
            raise ControlError(ErrorCode.NOT_FOUND, f"no device {name[:64]!r}")
        commands = [r.as_dict() for r in await server.commands.list(device=name, limit=DETAIL_COMMANDS)]
        ledger = (await self._ledgers([name]))(name)
        return fleet.device_detail(name, record, status, ledger, commands)

    @_handles(Commands)
    async def _commands(self, caller: Caller, req: Commands) -> list[CommandRecordDict]:
        records = await self.server.commands.list(device=req.device, state=req.state, limit=req.limit)
        return [r.as_dict() for r in records]

    @_handles(Command)
    async def _command(self, caller: Caller, req: Command) -> CommandRecordDict:
        record = await self.server.commands.get(req.command_id)
        if record is None:
            raise ControlError(ErrorCode.NOT_FOUND, f"no command {req.command_id[:64]!r}")
        return record.as_dict()

    # ------------------------------------------------------------------ commands

    @_handles(SendCommand)
    async def submit(self, caller: Caller, req: SendCommand) -> CommandRecordDict:
        """Queue the command (idempotent with its key); its record. `wait` is the caller's: see `wait_final`."""
        return (await self.submit_record(caller, req)).as_dict()

    async def submit_record(self, caller: Caller, req: SendCommand) -> CommandRecord:
        """`submit`, the record as the command service keeps it."""
        record = await self.server.commands.submit(
            req.device,
            req.name,
            req.args,
            ttl=req.ttl,
            timeout=req.timeout,
            idempotency_key=req.idempotency_key,
            operator=caller.operator,
        )
        # At debug, as a job's commands and every transition are: the record keeps who sent what when (`commands`,
        # `command`); one info line per command was 7-10 % of the hub's CPU per command, most of it the log's write.
        log.debug(
            "command submitted",
            extra=caller.kv(command_id=record.command_id, device=req.device, name=req.name, state=record.state),
        )
        return record

    @_handles(CancelCommand)
    async def _cancel_command(self, caller: Caller, req: CancelCommand) -> CommandRecordDict:
        record = await self.server.commands.cancel(req.command_id)
        log.info("command cancelled by operator", extra=caller.kv(command_id=req.command_id))
        return record.as_dict()

    # ------------------------------------------------------------------ devices (admin)

    @_handles(DeviceAdd)
    async def _device_add(self, caller: Caller, req: DeviceAdd) -> NewToken:
        name = req.name
        try:
            token = await self.server.registry.add(name, req.labels)
        except BadName as exc:
            raise ControlError(ErrorCode.BAD_REQUEST, str(exc)) from None
        except BadLabel as exc:
            raise ControlError(ErrorCode.BAD_LABEL, str(exc)) from None
        except DeviceExists:
            raise ControlError(ErrorCode.EXISTS, f"device {name!r} already exists") from None
        log.info("device added by operator", extra=caller.kv(device=name, labels=req.labels or {}))
        return {"name": name, "token": token}

    @_handles(DeviceRevoke)
    async def _device_revoke(self, caller: Caller, req: DeviceRevoke) -> Empty:
        name = req.name
        try:
            await self.server.registry.revoke(name)
        except UnknownDevice:
            raise ControlError(ErrorCode.NOT_FOUND, f"no device {name[:64]!r}") from None
        log.info("device revoked by operator", extra=caller.kv(device=name))
        self.server.revoke_device(name)
        return {}

    @_handles(DeviceRotate)
    async def _device_rotate(self, caller: Caller, req: DeviceRotate) -> NewToken:
        name = req.name
        try:
            token = await self.server.registry.rotate(name)
        except UnknownDevice:
            raise ControlError(ErrorCode.NOT_FOUND, f"no device {name[:64]!r}") from None
        log.info("device token rotated by operator", extra=caller.kv(device=name))
        return {"name": name, "token": token}

    @_handles(DeviceLabel)
    async def _device_label(self, caller: Caller, req: DeviceLabel) -> DeviceLabels:
        name = req.name
        try:
            labels = await self.server.registry.set_labels(name, req.set or {}, list(req.remove or ()))
        except UnknownDevice:
            raise ControlError(ErrorCode.NOT_FOUND, f"no device {name[:64]!r}") from None
        except BadLabel as exc:
            raise ControlError(ErrorCode.BAD_LABEL, str(exc)) from None
        log.info("device labels changed by operator", extra=caller.kv(device=name, labels=labels))
        return {"name": name, "labels": labels}

    # ------------------------------------------------------------------ twins

    @_handles(Twin)
    async def _twin(self, caller: Caller, req: Twin) -> TwinDict:
        try:
            rec = await self.server.twins.get(req.device)
        except UnknownDevice:
            raise ControlError(ErrorCode.NOT_FOUND, f"no device {req.device[:64]!r}") from None
        return rec.to_dict(req.device)

    @_handles(TwinSet)
    async def _twin_set(self, caller: Caller, req: TwinSet) -> TwinDict:
        device = req.device
        try:
            rec = await self.server.twins.set_desired(device, req.patch, if_version=req.if_version)
        except UnknownDevice:
            raise ControlError(ErrorCode.NOT_FOUND, f"no device {device[:64]!r}") from None
        except VersionConflict as exc:
            raise ControlError(ErrorCode.VERSION_CONFLICT, str(exc)) from None
        except TwinError as exc:
            raise twin_error(exc) from None
        log.info("desired twin changed by operator", extra=caller.kv(device=device, version=rec.desired_version))
        return rec.to_dict(device)

    # ------------------------------------------------------------------ jobs (hub/fleet/_job_runner.py)

    def _jobs(self) -> JobRunner:
        jobs = self.server.jobs
        if jobs is None:
            raise ControlError(ErrorCode.UNAVAILABLE, "this hub runs no jobs")
        return jobs

    @_handles(JobCreate)
    async def _job_create(self, caller: Caller, req: JobCreate) -> JobRecordDict:
        record = await self._jobs().create(req.selector, req.action, req.rollout(), caller.operator)
        log.info("job created by operator", extra=caller.kv(job_id=record.job_id, devices=record.total))
        return record.as_dict()

    @_handles(Jobs)
    async def _jobs_list(self, caller: Caller, req: Jobs) -> list[JobRecordDict]:
        return [r.as_dict() for r in await self._jobs().list(req.state, req.limit)]

    @_handles(Job)
    async def _job(self, caller: Caller, req: Job) -> JobDetail:
        jobs = self._jobs()
        record = await jobs.get(req.job_id)
        if record is None:
            raise ControlError(ErrorCode.NOT_FOUND, f"no job {req.job_id[:64]!r}")
        devices = await jobs.devices(req.job_id, req.state, req.limit, req.offset)
        return {**record.as_dict(), "devices": [d.as_dict() for d in devices], "offset": req.offset}

    @_handles(JobCancel)
    async def _job_cancel(self, caller: Caller, req: JobCancel) -> JobRecordDict:
        record = await self._jobs().cancel(req.job_id, caller.operator)
        log.info("job cancelled by operator", extra=caller.kv(job_id=req.job_id))
        return record.as_dict()


def retry_seconds(seconds: float) -> int:
    """A Retry-After value: whole seconds, at least 1."""
    return max(1, math.ceil(seconds))
