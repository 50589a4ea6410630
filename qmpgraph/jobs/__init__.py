"""Background jobs: QEMU's job.c and blockjob.c, run as trio tasks.

* ``state``: JobStatus, JobVerb and QEMU's two tables (synchronous).
* ``clock``: the wall clock and the virtual clock of ``--clock virtual``
  (synchronous; the daemon imports it).
* ``core``: ``Job`` (status machine, verbs, completion, events) and
  ``JobRunner`` (the daemon's job list and the trio tasks); its docstring
  says how a job type plugs in.
* ``blockjob``: ``BlockJob`` (the job's BlockBackend, the nodes it holds,
  speed limit, BLOCK_JOB_* events, query-block-jobs).

The job types themselves and their commands live in ``qmpgraph.commands``
(``jobs``, ``create``, ``stream``, ``commit``, ...).

Importing this package imports nothing else: ``clock`` must stay trio-free.
"""
