"""fusedopt: drop-in torch.optim optimizers whose whole step is one Triton kernel launch.

``import fusedopt`` needs only torch; triton is imported when the triton backend is used.
"""

from fusedopt.backend import BACKENDS, resolve_backend
from fusedopt.engine import FusedOptimizer
from fusedopt.optimizers import SGD, Adam, AdamW

__version__ = "0.1.0"

__all__ = ["Adam", "AdamW", "SGD", "FusedOptimizer", "BACKENDS", "resolve_backend"]
