"""Triton code only: the multi-tensor skeleton and one element-wise update per algorithm.

Importing this package imports triton; ``fusedopt`` itself only does so when the triton backend
is chosen, so ``import fusedopt`` works where triton is not installed.
"""

from fusedopt.kernels.skeleton import (
    CHUNK,
    COLUMNS,
    launch,
    launch_count,
    work_list,
)
from fusedopt.kernels.vector import (
    Layout,
    TensorTable,
    abs_max,
    abs_sum,
    axpy,
    copy,
    dot,
    norm,
    scale,
)
from fusedopt.kernels.vector import launch_count as vector_launch_count

__all__ = ["CHUNK", "COLUMNS", "launch", "launch_count", "work_list",
           "Layout", "TensorTable", "abs_max", "abs_sum", "axpy", "copy", "dot", "norm", "scale",
           "vector_launch_count"]
