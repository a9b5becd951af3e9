"""fusedopt-bench: optimizer-step throughput against the copy-bandwidth ceiling and torch.

Modules: ``workloads`` (parameter shapes), ``bytes_model`` (minimum bytes per
param), ``impls`` (the implementations and their step callables), ``measure``
(timing), ``report`` (table/JSON/CSV), ``plots`` (PNG), ``e2e`` (small GPT
training split), ``cli`` (the ``fusedopt-bench`` command).

Importing this package is cheap: matplotlib and the optional libraries are
imported only when used.
"""

from .bytes_model import bytes_per_param, state_buffers
from .workloads import Workload

__all__ = ["Workload", "bytes_per_param", "state_buffers"]
