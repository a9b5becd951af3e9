"""Compile the real kernel for an H100 (sm_90) on this machine, no GPU needed, and read the PTX.

This checks what the interpreter cannot: that every variant lowers (fp64 scalar math, pointer
casts from the table, the atomic step hand-off), that the aligned path really issues 16-byte
vector loads and stores, and that division and sqrt are IEEE-rounded, as in torch. It runs in a
subprocess because the suite runs under TRITON_INTERPRET=1, which cannot compile.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from fusedopt.kernels import skeleton  # noqa: E402
from fusedopt.kernels.codegen import VARIANTS  # noqa: E402

DTYPES = ["fp32", "bf16", "fp64"]


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "fusedopt.kernels.codegen", *DTYPES],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["variants"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_sm90_codegen(report, variant, dtype):
    name, update, num_states, uses_step, _flags = variant
    counts = report[f"{name}/{dtype}"]
    # Every element of a full aligned chunk moves in 16-byte vectors: param, grad and states
    # are read, all but the grad written. (The masked tail path adds no 16-byte accesses.)
    element_bytes = {"fp32": 4, "bf16": 2, "fp64": 8}[dtype]
    threads = 32 * skeleton.NUM_WARPS
    vectors = skeleton.ITERS * skeleton.BLOCK * element_bytes // (16 * threads)
    tensors = 2 + num_states
    assert counts["ld_16B"] == tensors * vectors
    assert counts["st_16B"] == (tensors - 1) * vectors
    assert (counts["atomic_acq_rel"] > 0) == uses_step  # the per-tensor step hand-off
    if update == "adam":
        assert counts["div_rn"] > 0 and counts["sqrt_rn"] > 0
        assert counts["div_approx"] == 0 and counts["sqrt_approx"] == 0
