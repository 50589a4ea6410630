"""``python -m qmpgraph``: the same entry point as the ``qmpgraph`` console script."""

from qmpgraph.cli import main

raise SystemExit(main())
