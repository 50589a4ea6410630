"""Background jobs: QEMU's job.c and blockjob.c, run as trio tasks.

* ``state``: JobStatus, JobVerb and QEMU's two tables (synchronous).
* ``clock``: the wall clock and the virtual clock of ``--clock virtual``
  (synchronous; the daemon imports it).
* ``core``: ``Job`` (status machine, verbs, completion, events); its
  docstring says how a job type plugs in.
* ``runner``: ``JobRunner`` (the daemon's job list, the trio tasks, the
  order of job steps against replies, the virtual clock's settling).
* ``blockjob``: ``BlockJob`` (the nodes it holds through job edges, speed
  limit, on-error, BLOCK_JOB_* events, query-block-jobs).
* ``dataplane``: allocation along a chain and write-back for copying jobs.
* ``mirror``, ``mirror_graph``, ``backup``, ``drain``: the mirror and
  backup jobs and what they share.

The QMP commands live in ``qmpgraph.commands`` (``jobs`` for the verbs and
queries; the stream, commit and create jobs live with their commands in
``stream``, ``commit``, ``commit_active`` and ``create``).

Importing this package imports nothing else: ``clock`` must stay trio-free.
"""
