"""The job verbs and queries: job-*, block-job-*, query-jobs, query-block-jobs.

As QEMU 7.2's job-qmp.c and blockdev.c: ``job-*`` find any job by id
("Job not found"), ``block-job-*`` only block jobs (DeviceNotActive "Block
job '%s' not found"); then the verb's state check and the job's own rules
(``qmpgraph.jobs.core.Job``).  ``job-cancel`` always forces;
``block-job-cancel`` forces only with ``force`` and refuses a user-paused
job without it.  The job types' commands live in their own modules.
"""

from __future__ import annotations

from typing import Any

from qmpgraph.commands.context import CommandContext
from qmpgraph.commands.registry import command
from qmpgraph.errors import DeviceNotActive, GenericError
from qmpgraph.jobs.blockjob import BlockJob
from qmpgraph.jobs.core import Job, find_job


def _job(ctx: CommandContext, job_id: str) -> Job:
    job = find_job(ctx.daemon, job_id)
    if job is None:
        raise GenericError("Job not found")
    return job


def _block_job(ctx: CommandContext, job_id: str) -> BlockJob:
    job = find_job(ctx.daemon, job_id)
    if not isinstance(job, BlockJob):
        raise DeviceNotActive(f"Block job '{job_id}' not found")
    return job


@command("job-pause")
def job_pause(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Pause a job at its next pause point."""
    _job(ctx, args["id"]).user_pause()


@command("job-resume")
def job_resume(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Resume a user-paused job."""
    _job(ctx, args["id"]).user_resume()


@command("job-cancel")
def job_cancel(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Cancel a job (forced)."""
    _job(ctx, args["id"]).user_cancel(True)


@command("job-complete")
def job_complete(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Complete a ready job."""
    _job(ctx, args["id"]).user_complete()


@command("job-finalize")
def job_finalize(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Finalize a pending job (and its transaction)."""
    _job(ctx, args["id"]).user_finalize()


@command("job-dismiss")
def job_dismiss(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Remove a concluded job."""
    _job(ctx, args["id"]).user_dismiss()


@command("block-job-pause")
def block_job_pause(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Pause a block job."""
    _block_job(ctx, args["device"]).user_pause()


@command("block-job-resume")
def block_job_resume(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Resume a block job."""
    _block_job(ctx, args["device"]).user_resume()


@command("block-job-cancel")
def block_job_cancel(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Cancel a block job; without ``force`` a ready mirror completes instead."""
    device = args["device"]
    job = _block_job(ctx, device)
    force = bool(args.get("force", False))
    if job.user_paused and not force:
        raise GenericError(f"The block job for device '{device}' is currently paused")
    job.user_cancel(force)


@command("block-job-complete")
def block_job_complete(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Complete a ready block job."""
    _block_job(ctx, args["device"]).user_complete()


@command("block-job-finalize")
def block_job_finalize(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Finalize a pending block job."""
    _block_job(ctx, args["id"]).user_finalize()


@command("block-job-dismiss")
def block_job_dismiss(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Remove a concluded block job."""
    _block_job(ctx, args["id"]).user_dismiss()


@command("block-job-set-speed")
def block_job_set_speed(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Change a block job's speed limit (bytes per second, 0 = unlimited)."""
    _block_job(ctx, args["device"]).set_speed(int(args["speed"]))


def _jobs(ctx: CommandContext) -> list[Job]:
    runner = ctx.daemon.job_runner
    return [j for j in runner if j.id is not None] if runner is not None else []


@command("query-jobs")
def query_jobs(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    """Every named job, newest first."""
    return [j.query() for j in _jobs(ctx)]


@command("query-block-jobs")
def query_block_jobs(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    """Every named block job, newest first."""
    return [j.query_block() for j in _jobs(ctx) if isinstance(j, BlockJob)]
