"""``python -m fusedopt.perf`` is the same as ``fusedopt-bench``."""

from .cli import main

raise SystemExit(main())
