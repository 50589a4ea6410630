"""The job state machine of QEMU 7.2's job.c: statuses, verbs and their tables.

Rules:

* A job moves only along ``TRANSITIONS``; any other move is a bug in the
  caller (``transition_allowed`` is asserted by ``Job``), never a QMP error.
* A QMP verb is accepted only in the statuses ``VERBS`` lists for it;
  otherwise the command fails with ``verb_error``'s message and nothing
  changes.

Synchronous and trio-free: the runtime lives in ``qmpgraph.jobs.core``.
"""

from __future__ import annotations

from enum import Enum

from qmpgraph.errors import GenericError


class JobStatus(Enum):
    """QAPI JobStatus (the wire name is the value)."""

    UNDEFINED = "undefined"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


class JobVerb(Enum):
    """QAPI JobVerb (the wire name is the value)."""

    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    SET_SPEED = "set-speed"
    COMPLETE = "complete"
    FINALIZE = "finalize"
    DISMISS = "dismiss"


S = JobStatus

TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.UNDEFINED: frozenset({S.CREATED}),
    S.CREATED: frozenset({S.RUNNING, S.ABORTING, S.NULL}),
    S.RUNNING: frozenset({S.PAUSED, S.READY, S.WAITING, S.ABORTING}),
    S.PAUSED: frozenset({S.RUNNING}),
    S.READY: frozenset({S.STANDBY, S.WAITING, S.ABORTING}),
    S.STANDBY: frozenset({S.READY}),
    S.WAITING: frozenset({S.PENDING, S.ABORTING}),
    S.PENDING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.ABORTING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.CONCLUDED: frozenset({S.NULL}),
    S.NULL: frozenset(),
}
"""Which status may follow which (QEMU's JobSTT)."""

_LIVE = frozenset({S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY})

VERBS: dict[JobVerb, frozenset[JobStatus]] = {
    JobVerb.CANCEL: _LIVE | {S.WAITING, S.PENDING},
    JobVerb.PAUSE: _LIVE,
    JobVerb.RESUME: _LIVE,
    JobVerb.SET_SPEED: _LIVE,
    # Since QEMU 6.2 a job on standby (paused while ready) may be completed too.
    JobVerb.COMPLETE: frozenset({S.READY, S.STANDBY}),
    JobVerb.FINALIZE: frozenset({S.PENDING}),
    JobVerb.DISMISS: frozenset({S.CONCLUDED}),
}
"""In which statuses a verb is accepted (QEMU's JobVerbTable)."""

COMPLETED = frozenset({S.WAITING, S.PENDING, S.ABORTING, S.CONCLUDED, S.NULL})
"""job_is_completed: the job's run is over."""

READY = frozenset({S.READY, S.STANDBY})
"""job_is_ready."""


def transition_allowed(old: JobStatus, new: JobStatus) -> bool:
    """Whether ``old`` -> ``new`` is in the transition table."""
    return new in TRANSITIONS[old]


def check_verb(job_id: str | None, status: JobStatus, verb: JobVerb) -> None:
    """job_apply_verb: raise QEMU's error when ``verb`` is refused in ``status``."""
    if status not in VERBS[verb]:
        raise GenericError(
            f"Job '{job_id}' in state '{status.value}' cannot accept command verb '{verb.value}'"
        )
