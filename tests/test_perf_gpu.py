"""fusedopt-bench on CUDA: events timing, allocator peak memory, CUDA-graph replay, fusedopt's
triton backend. Skipped without a GPU (marker ``gpu``)."""

from __future__ import annotations

import json

import pytest
import torch

from fusedopt.perf import impls, measure
from fusedopt.perf.cli import main
from fusedopt.perf.impls import OptSpec
from fusedopt.perf.workloads import Workload

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SMALL = Workload("small", "small", ((4096,), (1000, 3), (7,)))
FAST = measure.Settings(warmup=2, repeats=3, target_run_s=0.005, min_steps=3, max_steps=20)


@pytest.mark.parametrize("impl_name", ["fusedopt", "torch-foreach", "torch-fused",
                                       "torch-fused-graph"])  # fmt: skip
@pytest.mark.parametrize("opt", ["AdamW", "SGD"])
def test_cuda_rows(impl_name, opt):
    impl = impls.resolve([impl_name])[0]
    row = measure.measure_one(SMALL, OptSpec(opt), "fp32", impl, "cuda", FAST)
    assert row["status"] == "ok", row["error"]
    assert row["ms_per_step_events"] > 0 and row["gbps_events"] > 0
    assert row["mem_source"] == "cuda-allocator" and row["peak_mem_mb"] > 0
    assert row["params_finite"] and row["params_changed"]
    # same params, grads and number of steps as torch.optim's for-loop (the graph impl's first
    # call takes its warm-up steps too): within 1e-3 of the update
    assert row["check_ok"] is True, (row["check_max_diff"], row["check_max_update"])
    if impl_name == "fusedopt":
        assert row["note"] == "backend=triton"


def test_graph_replay_matches_eager_fused():
    spec = OptSpec("AdamW")
    a = measure.make_params(SMALL, "fp32", "cuda", seed=1)
    b = measure.make_params(SMALL, "fp32", "cuda", seed=1)
    eager = impls.TorchOptim("fused").build(a, spec, "cuda")
    graph = impls.TorchFusedGraph().build(b, spec, "cuda")
    graph.step()  # warm-up steps + capture + one replay
    for _ in range(impls.TorchFusedGraph.warmup_steps + 1):
        eager.step()
    for _ in range(3):
        graph.step()
        eager.step()
    torch.cuda.synchronize()
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x)


def test_cuda_quick_cli_run(tmp_path):
    rc = main(["--device", "cuda", "--workloads", "flat:16", "small50", "--optimizers", "AdamW",
               "--dtypes", "fp32", "bf16", "--quick", "--quiet", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["meta"]["device"] == "cuda" and doc["meta"]["ceiling_gbps"] > 100
    ours = [r for r in doc["rows"] if r["impl"].startswith(("torch", "fusedopt"))]
    assert {r["impl"] for r in ours} >= {"fusedopt", "torch-fused", "torch-fused-graph"}
    assert all(r["status"] == "ok" for r in ours), [r["error"] for r in ours]
    assert all(r["baseline_impl"] == "torch-fused" for r in doc["rows"] if r["status"] == "ok")
    # fp32 and bf16 against torch.optim's for-loop (bf16: within 16 eps of the update)
    assert all(r["check_ok"] is True for r in ours), [(r["impl"], r["dtype"]) for r in ours
                                                     if r["check_ok"] is not True]
    assert doc["meta"]["cache_bytes"] > 0
    assert rc in (0, 1)  # 1 only if an optional library failed; its row says why
