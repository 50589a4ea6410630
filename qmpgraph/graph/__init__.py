"""The block graph model (synchronous, no trio, no QMP).

Modules:

* ``perms``: ``Perm``, ``Role``, ``OpenFlag`` bits; ``perm_message_names``,
  ``perm_qapi_names``.
* ``model``: ``Node``, ``Edge``, ``BlockBackend``, ``Job``, ``ParentKind``.
  ``Node.file``/``Node.backing`` are read-only, derived by ``attach``.
* ``attach``: the only code that sets ``file``/``backing`` (child_of_bds
  attach/detach) and the backing op blockers.
* ``graph``: ``BlockGraph`` (``lookup(name)``, ``named_nodes_newest_first()``,
  ``named_nodes_oldest_first()``, ``backends``, ``jobs``, ``names``: the
  ``#block`` name generator) and walks (``cow_child``, ``filter_child``,
  ``filter_or_cow_child``, ``primary_child``, ``skip_filters``,
  ``skip_implicit_filters``, ``recursive_has_child``, ``topological_sort``).
* ``names``: ``check_node_name`` (QEMU's order and messages), ``NameGenerator``.
* ``permissions``: cumulative perms, ``default_perms``, conflict message.
* ``digest``: ``graph_digest(graph)``, ``graph_state(graph)``.
* ``invariants``: ``check_invariants(graph)``.

All mutation goes through ``qmpgraph.transactions``.
"""
