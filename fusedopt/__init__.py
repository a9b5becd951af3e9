"""fusedopt: drop-in torch.optim optimizers whose whole step is one Triton kernel launch.

``import fusedopt`` needs only torch; triton is imported when the triton backend is used.
"""

from fusedopt.backend import BACKENDS, resolve_backend
from fusedopt.engine import FusedOptimizer
from fusedopt.lbfgs import LBFGS
from fusedopt.optimizers import (
    ASGD,
    LAMB,
    SGD,
    Adadelta,
    Adafactor,
    Adagrad,
    Adam,
    Adamax,
    AdamW,
    Lion,
    Muon,
    NAdam,
    RAdam,
    RMSprop,
    Rprop,
    SparseAdam,
)
from fusedopt.precision import master_params, torch_state_dict

__version__ = "0.1.0"

__all__ = ["Adam", "AdamW", "SGD", "Adagrad", "Adadelta", "RMSprop", "NAdam", "RAdam", "Adamax",
           "Rprop", "ASGD", "Adafactor", "Muon", "SparseAdam", "Lion", "LAMB", "LBFGS",
           "FusedOptimizer", "BACKENDS", "resolve_backend", "torch_state_dict", "master_params"]
