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

# one worker compiles the report for every test here (pytest -n 2 --dist loadgroup)
pytestmark = pytest.mark.xdist_group("codegen")
from fusedopt.kernels.codegen import VARIANTS, variant  # noqa: E402

DTYPES = ["fp32", "bf16", "fp64"]
# Every variant in fp32; the other widths for one of each kind (compiling costs ~2 s each):
# bf16 changes the vector widths, fp64 the opmath dtype and its float64 atomics.
WIDE = ("adamw", "sgd-momentum-nesterov", "rmsprop-momentum-centered", "nadam-decoupled",
        "lamb", "adamw+amp")
PAIRS = [(name, dtype) for name in VARIANTS for dtype in DTYPES
         if dtype == "fp32" or name in WIDE]


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "fusedopt.kernels.codegen",
                           *(f"{name}/{dtype}" for name, dtype in PAIRS)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["variants"]


@pytest.mark.parametrize(("name", "dtype"), PAIRS, ids=[f"{n}-{d}" for n, d in PAIRS])
def test_sm90_codegen(report, name, dtype):
    spec = variant(name)
    counts = report[f"{name}/{dtype}"]
    # Every element of an aligned chunk moves in 16-byte vectors: param, grad and states are
    # read, all but the grad written (the element-by-element paths add none).
    tensors = 2 + len(spec.states)
    assert counts["ld_16B"] == tensors * _vectors(dtype)
    assert counts["st_16B"] == (tensors - 1) * _vectors(dtype)
    # the per-tensor hand-off of step (and mu_product, the cleared sums, the cleared flag of
    # new state) to the next step: in every variant, taken where there is something to hand off
    assert counts["atomic_acq_rel"] > 0
    if name not in ("sgd-momentum-nesterov", "sgd-plain-maximize", "lion", "rprop",
                    "asgd-maximize"):
        # the adaptive ones divide and take square roots, IEEE-rounded as in torch
        assert counts["div_rn"] > 0
        assert counts["div_approx"] == 0 and counts["sqrt_approx"] == 0
    if not name.startswith(("sgd", "lion", "adamax", "rprop", "asgd")):
        assert counts["sqrt_rn"] > 0


SUMS_PAIRS = [(n, d) for n, d in PAIRS if variant(n).algorithm.sums]


@pytest.mark.parametrize(("name", "dtype"), SUMS_PAIRS, ids=[f"{n}-{d}" for n, d in SUMS_PAIRS])
def test_sm90_codegen_sums_launch(report, name, dtype):
    """LAMB's norms launch reads what the update reads, in 16-byte vectors, and writes only
    the per-tensor sums (atomically)."""
    counts = report[f"{name}/sums/{dtype}"]
    assert counts["ld_16B"] == (2 + len(variant(name).states)) * _vectors(dtype)
    assert counts["st_16B"] == 0
    assert counts["atomic_acq_rel"] > 0


def _vectors(dtype: str) -> int:
    """16-byte vectors per thread for one tensor: one per block, on both 16-byte paths (a full
    chunk, and a tail up to its last whole vector)."""
    return 2 * skeleton.ITERS


@pytest.fixture(scope="module")
def others():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "fusedopt.kernels.codegen", "--others", "fp32",
                           "bf16"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["kernels"]


def test_tile_and_sparse_row_kernels_compile_for_sm90_without_spills(others):
    """Adafactor's and Muon's tile kernels and the sparse-rows kernel lower for an H100 (the
    interpreter would take code the compiler refuses), spill nothing, and keep registers to
    what lets several programs share an SM: the tile kernels at most 96, the sparse-rows
    kernel (int64 row offsets, the updates' float64 step sizes) at most 128. (fp64 compiles
    too, without spills: ``python -m fusedopt.kernels.codegen --others fp64``.)"""
    from fusedopt.kernels.codegen import other_kernels

    expected = {f"{name}/{dtype}" for dtype in ("fp32", "bf16") for name in other_kernels(dtype)}
    assert set(others) == expected
    for name, usage in others.items():
        assert usage["spills"] == 0, (name, usage)
        limit = 128 if name.startswith("sparse_rows") else 96
        assert usage["REG"] <= limit, (name, usage)


@pytest.fixture(scope="module")
def precision_modes():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "fusedopt.kernels.codegen", "--precision",
                           "adamw+amp"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["kernels"]


def test_precision_modes_compile_for_sm90_without_spills(precision_modes):
    """The precision modes' kernels (AdamW with AMP's inputs: the most code) lower for an
    H100 and spill nothing. States of another width than the param (master weights, fp32
    states of bf16 params, bf16 or 8-bit states of fp32 params, 8-bit states with master
    weights: code gathers, a binary search, block maxima) keep to the register cap (16 bytes of
    the widest tensor per thread per block); Kahan's fifth tensor (at most 128) and stochastic
    rounding's Philox bits (at most 160: 128 with triton 3.8, 140 with 3.6) take more: fewer
    programs per SM; the 16-byte accesses stay. (Every optimizer:
    ``python -m fusedopt.kernels.codegen --precision``.)"""
    from fusedopt.kernels.codegen import PRECISION_MODES

    assert set(precision_modes) == {f"adamw+amp/{mode}" for mode in PRECISION_MODES}
    for name, usage in precision_modes.items():
        assert usage["spills"] == 0, (name, usage)
        limit = 160 if "stochastic" in name else 128 if "kahan" in name else skeleton.REGISTER_CAP
        assert usage["regs"] <= limit, (name, usage)
        assert usage["ld_16B"] > 0, (name, usage)
