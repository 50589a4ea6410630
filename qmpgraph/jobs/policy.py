"""on-source-error / on-target-error for jobs with two policies (QEMU 7.2).

Mirror and backup choose the policy by the failed request's direction: a
read error is the source's, a write error the target's (QEMU's
mirror_error_action and backup_error_action).  ``error_action`` is
block_job_error_action with that policy passed in:

* ``enospc`` stops on ENOSPC and reports anything else; ``stop``,
  ``report`` and ``ignore`` are what they say;
* BLOCK_JOB_ERROR (device, operation, action) is sent unless the job was
  cancelled (a forced cancel);
* ``stop`` pauses the job as a user pause (block-job-resume retries) unless
  the user had paused it already, and sets the job's I/O status ("nospace"
  for ENOSPC, else "failed") if it was "ok".

Synchronous.  BlockJob.error_action (stream, commit) calls it with its one
``on-error`` policy.  What does not live here: the retry logic of each job
(``mirror``, ``backup``).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from qmpgraph.io.request import BlockIOError

if TYPE_CHECKING:
    from qmpgraph.jobs.blockjob import BlockJob


def error_action(job: BlockJob, policy: str, is_read: bool, error: int) -> str:
    """What ``policy`` does about ``error`` (an errno): "report", "ignore" or "stop"."""
    if policy in ("enospc", "auto"):
        action = "stop" if error == errno.ENOSPC else "report"
    elif policy in ("stop", "ignore"):
        action = policy
    else:
        action = "report"
    if job.id is not None and not job.is_cancelled():
        job.daemon.emit_event(
            "BLOCK_JOB_ERROR",
            {"device": job.id, "operation": "read" if is_read else "write", "action": action},
        )
    if action == "stop":
        if not job.user_paused:
            job.pause()
            job.user_paused = True
        if job.iostatus == "ok":
            job.iostatus = "nospace" if error == errno.ENOSPC else "failed"
    return action


def io_errno(exc: BlockIOError | OSError) -> int:
    """The errno of a failed request (EIO when it carries none)."""
    return exc.errno or errno.EIO
