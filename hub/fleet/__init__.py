"""The fleet: what the hub knows of its devices and operators, and the commands sent to them.

`_store` (`RegistryStore`: devices with their labels, operators, tokens, acked seqs, epochs, latest values, over
SQLite `_registry` or Redis `_redis_store` with its handshake cache `_cache`; `_accounts` holds what both share,
`_labels` the label and selector rules, `_twins` the device twins), `_ledger` (per-device progress), `_presence`
with its state table `_presence_states`, the command service `_commands` with its store `_command_store` and state
table `_command_states`, `_subscriptions` (events for operators) and `_summary` (device summaries for operators).
Jobs: `_jobs` (values and the rollout's decisions), `_job_states` (their tables), `_job_store` (SQLite), `_job_runner`.
"""

from hub.fleet._accounts import (
    NAME_RE,
    ROLES,
    BadName,
    BadRole,
    DeviceExists,
    DeviceRecord,
    OperatorExists,
    OperatorRecord,
    RegistryError,
    UnknownDevice,
    UnknownOperator,
    role_allows,
)
from hub.fleet._command_states import (
    FINAL_STATES as COMMAND_FINAL_STATES,
)
from hub.fleet._command_states import (
    STATES as COMMAND_STATES,
)
from hub.fleet._command_states import (
    TTL_STATES as COMMAND_TTL_STATES,
)
from hub.fleet._command_states import (
    CommandEvent,
    CommandState,
)
from hub.fleet._command_store import CommandHistoryEntry, CommandRecord, CommandRecordDict, CommandStore
from hub.fleet._commands import CommandError, CommandService, Elsewhere, Relay, Sender
from hub.fleet._job_runner import (
    ActionResult,
    CommandAction,
    DesiredAction,
    DesiredActionFactory,
    JobAction,
    JobRunner,
)
from hub.fleet._job_states import (
    DEVICE_FINAL_STATES as JOB_DEVICE_FINAL_STATES,
)
from hub.fleet._job_states import (
    DEVICE_STATES as JOB_DEVICE_STATES,
)
from hub.fleet._job_states import (
    JOB_FINAL_STATES,
    JOB_STATES,
    DeviceEvent,
    DeviceState,
    JobEvent,
    JobState,
)
from hub.fleet._job_store import JOBS_FILE, JobStore
from hub.fleet._jobs import (
    ABORT_MIN_OUTCOMES,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_RATE,
    MAX_IN_FLIGHT,
    MAX_RATE,
    CommandSpec,
    DesiredSpec,
    DeviceOutcome,
    DeviceOutcomeDict,
    JobRecord,
    JobRecordDict,
    Rollout,
    parse_action,
)
from hub.fleet._labels import (
    LABEL_RE,
    MAX_LABELS,
    BadLabel,
    Selector,
    apply_labels,
    check_label_key,
    check_labels,
    parse_label,
    parse_selector,
)
from hub.fleet._ledger import DeviceLedger, Ledgers
from hub.fleet._presence import DeviceStatus, Presence
from hub.fleet._presence_states import SEEN_STATES, PresenceEvent, PresenceState
from hub.fleet._presence_states import STATES as DEVICE_STATES
from hub.fleet._registry import REGISTRY_FILE, Registry, registry_path
from hub.fleet._store import RegistryStore, SQLiteStore, StoreUnavailable, open_registry_store
from hub.fleet._subscriptions import (
    Broadcaster,
    EventBuffer,
    Subscription,
    SubscriptionEvent,
    SubscriptionItem,
    TelemetryEvent,
    telemetry_event,
)
from hub.fleet._summary import (
    DeviceDetail,
    DeviceSummary,
    LatestPoint,
    device_detail,
    device_summary,
    latest_points,
    list_summaries,
    state_counts,
)
from hub.fleet._twins import (
    REPORTED_MEASUREMENT,
    Side,
    TwinChange,
    TwinDict,
    TwinRecord,
    TwinService,
    VersionConflict,
    patch_twin,
    reported_point,
)

__all__ = [
    "ABORT_MIN_OUTCOMES",
    "COMMAND_FINAL_STATES",
    "COMMAND_STATES",
    "COMMAND_TTL_STATES",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_RATE",
    "DEVICE_STATES",
    "JOBS_FILE",
    "JOB_DEVICE_FINAL_STATES",
    "JOB_DEVICE_STATES",
    "JOB_FINAL_STATES",
    "JOB_STATES",
    "LABEL_RE",
    "MAX_IN_FLIGHT",
    "MAX_LABELS",
    "MAX_RATE",
    "NAME_RE",
    "REGISTRY_FILE",
    "REPORTED_MEASUREMENT",
    "ROLES",
    "SEEN_STATES",
    "ActionResult",
    "BadLabel",
    "BadName",
    "BadRole",
    "Broadcaster",
    "CommandAction",
    "CommandError",
    "CommandEvent",
    "CommandHistoryEntry",
    "CommandRecord",
    "CommandRecordDict",
    "CommandService",
    "CommandSpec",
    "CommandState",
    "CommandStore",
    "DesiredAction",
    "DesiredActionFactory",
    "DesiredSpec",
    "DeviceDetail",
    "DeviceEvent",
    "DeviceExists",
    "DeviceLedger",
    "DeviceOutcome",
    "DeviceOutcomeDict",
    "DeviceRecord",
    "DeviceState",
    "DeviceStatus",
    "DeviceSummary",
    "Elsewhere",
    "EventBuffer",
    "JobAction",
    "JobEvent",
    "JobRecord",
    "JobRecordDict",
    "JobRunner",
    "JobState",
    "JobStore",
    "LatestPoint",
    "Ledgers",
    "OperatorExists",
    "OperatorRecord",
    "Presence",
    "PresenceEvent",
    "PresenceState",
    "Registry",
    "RegistryError",
    "RegistryStore",
    "Relay",
    "Rollout",
    "SQLiteStore",
    "Selector",
    "Sender",
    "Side",
    "StoreUnavailable",
    "Subscription",
    "SubscriptionEvent",
    "SubscriptionItem",
    "TelemetryEvent",
    "TwinChange",
    "TwinDict",
    "TwinRecord",
    "TwinService",
    "UnknownDevice",
    "UnknownOperator",
    "VersionConflict",
    "apply_labels",
    "check_label_key",
    "check_labels",
    "device_detail",
    "device_summary",
    "latest_points",
    "list_summaries",
    "open_registry_store",
    "parse_action",
    "parse_label",
    "parse_selector",
    "patch_twin",
    "registry_path",
    "reported_point",
    "role_allows",
    "state_counts",
    "telemetry_event",
]
