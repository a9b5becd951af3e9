"""fusedopt-bench: optimizer-step throughput against the copy-bandwidth ceiling and torch.

Modules: ``workloads`` (parameter shapes), ``bytes_model`` (minimum bytes per
param), ``impls`` (the implementations and their step callables), ``measure``
(timing, noise, the check against torch.optim), ``plan`` (sections, time estimate,
progress), ``host`` (the engine's host time per step against its floor), ``report``
(tables with legends, JSON/CSV), ``plots`` (PNG), ``e2e`` (small GPT training split),
``example`` (a complete training loop), ``cli`` (the ``fusedopt-bench`` command).

Importing this package is cheap: matplotlib and the optional libraries are
imported only when used.
"""

from .bytes_model import bytes_per_param, state_buffers
from .workloads import Workload

__all__ = ["Workload", "bytes_per_param", "state_buffers"]
