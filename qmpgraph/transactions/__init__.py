"""The transaction engine and the block-graph actions (synchronous, no trio).

Modules:

* ``engine``: ``Transaction`` (``add``, ``on_commit``, ``commit``, ``abort``,
  ``finalize``, ``mark``/``rollback_to``, ``log``; a context manager that
  commits on success and aborts on exception; ``fail_at=n`` injects a fault
  after the n-th action), ``Action`` (base of the frozen undo records).
* ``actions``: primitives, each changing the graph at once and registering its
  undo record: ``ref_node``, ``unref_node`` (deletes at zero, cascading),
  ``add_node``, ``create_edge``, ``replace_child``, ``remove_child``,
  ``set_edge_perm``, ``set_edge_role``, ``set_frozen``, ``set_open_flags``,
  ``set_options``, ``set_runtime``, ``set_inherits_from``,
  ``set_monitor_owned``, ``add_root_parent``, ``remove_root_parent``.
* ``refresh``: ``refresh_subtrees`` / ``refresh_node_list`` (section 3.6).
* ``composite``: ``attach_child``, ``root_attach``, ``detach_child``,
  ``set_edge_perms_checked``, ``set_file_or_backing_noperm``, ``set_backing``,
  ``replace_node``, ``drop_filter``, ``append``, ``insert_node``,
  ``replace_child_bs``.
* ``reopen``: ``ReopenRequest``, ``reopen_multiple`` (graph part of reopen).

Typical use::

    with Transaction() as tran:
        node = open_node_tree(graph, options, tran)   # qmpgraph.drivers.open
        tran.on_commit(lambda: daemon.emit_event(...))
"""
