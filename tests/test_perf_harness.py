"""fusedopt-bench: implementations, measurement and the JSON/CSV/table reports (CPU, tiny sizes)."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from fusedopt.perf import impls, measure, report
from fusedopt.perf.cli import Progress
from fusedopt.perf.impls import Built, Impl, OptSpec
from fusedopt.perf.workloads import UnknownNameError, Workload

TINY = Workload("tiny", "tiny", ((300,), (17, 5), (1,)))
FAST = measure.Settings(warmup=1, repeats=2, target_run_s=0.001, min_steps=2, max_steps=3)


# ---------------------------------------------------------------------------
# optimizer specs and implementations
# ---------------------------------------------------------------------------


def test_optspec_parse_and_label():
    s = OptSpec.parse("adamw:amsgrad=True,weight_decay=0.1")
    assert s.name == "AdamW"
    assert s.hparams == {"lr": 1e-4, "weight_decay": 0.1, "amsgrad": True}
    assert s.label == "AdamW[amsgrad=True,weight_decay=0.1]"
    assert OptSpec.parse("SGD").hparams == {"lr": 1e-4, "momentum": 0.9}
    assert OptSpec.parse("sgd:momentum=0").hparams["momentum"] == 0
    with pytest.raises(UnknownNameError, match="valid optimizers: Adam, AdamW, SGD"):
        OptSpec.parse("Adamw2")
    with pytest.raises(ValueError, match="key=value"):
        OptSpec.parse("AdamW:amsgrad")


def test_fusedopt_optimizers_are_discovered():
    import fusedopt

    found = impls.fusedopt_optimizers()
    assert {"Adam", "AdamW", "SGD"} <= set(found)
    assert all(hasattr(fusedopt, n) for n in found)
    assert found == [n for n in impls.KNOWN_OPTIMIZERS if n in found]  # canonical order


def test_impl_registry_and_support():
    table = impls.all_impls()
    for name in ("fusedopt", "torch", "torch-foreach", "torch-fused", "torch-fused-graph",
                 "torch-compile", "apex", "bitsandbytes", "torchao", "optimi", "flashoptim"):
        assert name in table and table[name].description  # fmt: skip
    assert table["torch-compile"].opt_in
    assert table["torch-fused-graph"].unavailable("cpu") == "torch-fused-graph needs cuda"
    assert table["torch-fused"].unsupported("RMSprop", "cpu", "fp32") == (
        "torch.optim.RMSprop has no fused implementation")
    assert table["torch-fused"].unsupported("AdamW", "cpu", "fp32") is None
    assert table["torch"].unsupported("Lion", "cpu", "fp32") == "torch.optim has no Lion"
    assert table["fusedopt"].unsupported("AdamW", "cpu", "fp32") is None
    # optional libraries never raise when absent: they report why
    for tp in impls.THIRD_PARTY:
        why = tp.unavailable("cpu")
        assert why is None or isinstance(why, str)
    # on CPU the reference path is what fusedopt can run, so the default names it
    assert impls.default_impls("cpu")[:2] == ["fusedopt-reference", "torch"]
    assert "torch-fused-graph" in impls.default_impls("cuda")
    with pytest.raises(UnknownNameError, match="valid impls: fusedopt"):
        impls.resolve(["torch-fast"])


def test_construct_drops_unknown_keywords_and_says_so():
    class Narrow(torch.optim.SGD):
        def __init__(self, params, lr=1e-3):
            super().__init__(params, lr=lr)

    p = torch.nn.Parameter(torch.zeros(3))
    opt, note = impls._construct(Narrow, [p], {"lr": 0.5, "momentum": 0.9, "nesterov": False})
    assert opt.param_groups[0]["lr"] == 0.5
    assert note == "ignored: momentum,nesterov"


@pytest.mark.parametrize("impl_name", ["fusedopt-reference", "torch", "torch-foreach",
                                       "torch-fused", "torch-forloop"])  # fmt: skip
@pytest.mark.parametrize("opt", ["AdamW", "SGD"])
def test_every_cpu_impl_matches_torch_forloop(impl_name, opt):
    """Each implementation's step() really runs the optimizer (same result as torch)."""
    spec = OptSpec(opt)
    ref = measure.make_params(TINY, "fp32", "cpu", seed=3)
    mine = measure.make_params(TINY, "fp32", "cpu", seed=3)
    torch_opt = getattr(torch.optim, opt)(ref, **spec.hparams, foreach=False)
    built = impls.resolve([impl_name])[0].build(mine, spec, "cpu")
    for _ in range(3):
        torch_opt.step()
        built.step()
    for a, b in zip(ref, mine):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert not torch.equal(ref[0], measure.make_params(TINY, "fp32", "cpu", seed=3)[0])


# ---------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------


def test_make_params_random_grads_reproducible():
    a = measure.make_params(TINY, "bf16", "cpu", seed=0)
    b = measure.make_params(TINY, "bf16", "cpu", seed=0)
    assert [tuple(p.shape) for p in a] == list(TINY.shapes)
    assert all(p.dtype == torch.bfloat16 and p.grad.dtype == torch.bfloat16 for p in a)
    assert all(torch.equal(x, y) and torch.equal(x.grad, y.grad) for x, y in zip(a, b))
    assert all(bool((p.grad != 0).any()) for p in a)  # grads are never all zeros
    assert float(a[0].detach().float().std()) < 0.05  # small init, like a transformer


def test_ceiling_is_positive():
    c = measure.measure_ceiling("cpu", nbytes=1 << 20, repeats=2)
    assert c["gbps"] > 0 and c["gbps_min"] <= c["gbps"] <= c["gbps_max"]
    assert c["nbytes"] == 1 << 20


def test_measure_one_row_is_consistent():
    row = measure.measure_one(TINY, OptSpec("AdamW"), "fp32", impls.TorchOptim("default"), "cpu",
                              FAST)  # fmt: skip
    assert row["status"] == "ok", row["error"]
    assert row["numel"] == 300 + 85 + 1 and row["num_tensors"] == 3
    assert row["bytes_per_param"] == 28
    assert 2 <= row["steps"] <= 3 and row["repeats"] == 2
    assert row["ms_min"] <= row["ms_per_step"] <= row["ms_max"]
    assert math.isclose(row["gbps"], 28 * 386 / (row["ms_per_step"] / 1e3) / 1e9)
    assert row["first_step_ms"] > 0
    assert row["params_finite"] is True and row["params_changed"] is True
    # params + grads + exp_avg + exp_avg_sq, fp32 (the step counters are scalars)
    assert row["peak_mem_mb"] * 2**20 >= 4 * 386 * 4
    assert row["mem_source"] == "tensor-bytes"
    assert "ms_per_step_events" not in row  # no CUDA events on CPU


class _NoOp(Impl):
    name = "noop"

    def build(self, params, spec, device):
        return Built(lambda: None, None)


class _Boom(Impl):
    name = "boom"

    def build(self, params, spec, device):
        def step():
            raise RuntimeError("kernel exploded\nsecond line")

        return Built(step, None)


class _Nan(Impl):
    name = "nan"

    def build(self, params, spec, device):
        def step():
            for p in params:
                p.data.fill_(float("nan"))

        return Built(step, None)


def test_measure_one_flags_noop_nan_and_errors():
    noop = measure.measure_one(TINY, OptSpec("SGD"), "fp32", _NoOp(), "cpu", FAST)
    assert noop["status"] == "ok" and noop["params_changed"] is False
    nan = measure.measure_one(TINY, OptSpec("SGD"), "fp32", _Nan(), "cpu", FAST)
    assert nan["params_finite"] is False
    boom = measure.measure_one(TINY, OptSpec("SGD"), "fp32", _Boom(), "cpu", FAST)
    assert boom["status"] == "error"
    assert boom["error"] == "RuntimeError: kernel exploded"
    assert "ms_per_step" not in boom


def test_fusedopt_row_runs_the_fusedopt_class():
    row = measure.measure_one(TINY, OptSpec("AdamW"), "fp32", impls.FusedOpt("reference"), "cpu",
                              FAST)  # fmt: skip
    assert row["status"] == "ok", row["error"]
    assert row["note"] == "backend=reference"
    assert row["params_changed"] is True


# ---------------------------------------------------------------------------
# reports
# ---------------------------------------------------------------------------


def _rows():
    base = {"workload": "w", "family": "w", "num_tensors": 2, "numel": 1000, "optimizer": "AdamW",
            "dtype": "fp32", "bytes_per_param": 28, "status": "ok", "params_finite": True,
            "params_changed": True, "first_step_ms": 3.0, "peak_mem_mb": 1.5}  # fmt: skip
    return [
        {**base, "impl": "torch", "ms_per_step": 2.0, "gbps": 14.0},
        {**base, "impl": "fusedopt", "ms_per_step": 0.5, "gbps": 56.0, "params_changed": False},
        {**base, "impl": "torch-foreach", "ms_per_step": 1.0, "gbps": 28.0},
        {**base, "impl": "boom", "status": "error", "error": "RuntimeError: x"},
    ]


META = {"device": "cpu", "device_name": "Test CPU", "torch_version": "2.x",
        "triton_version": None, "fusedopt_version": "0.1.0", "ceiling_gbps": 40.0}  # fmt: skip


def test_add_derived_speedup_and_ceiling():
    rows = _rows()
    report.add_derived(rows, META, impls.BASELINE_ORDER["cpu"])
    by = {r["impl"]: r for r in rows}
    assert by["fusedopt"]["speedup"] == pytest.approx(4.0)
    assert by["torch"]["speedup"] == pytest.approx(1.0)
    assert by["fusedopt"]["baseline_impl"] == "torch"
    assert by["fusedopt"]["pct_of_ceiling"] == pytest.approx(140.0)
    assert by["torch-foreach"]["pct_of_ceiling"] == pytest.approx(70.0)
    assert "speedup" not in by["boom"] and by["boom"]["device"] == "cpu"
    # without the CPU baseline, the next one in order is used
    rows = [r for r in _rows() if r["impl"] != "torch"]
    report.add_derived(rows, META, impls.BASELINE_ORDER["cpu"])
    assert rows[0]["baseline_impl"] == "torch-foreach" and rows[0]["speedup"] == pytest.approx(2)


def test_json_and_csv_schema_round_trip(tmp_path):
    rows = _rows()
    report.add_derived(rows, META, impls.BASELINE_ORDER["cpu"])
    report.write_json(tmp_path / "r.json", META, rows, [{"impl": "apex", "reason": "absent"}])
    report.write_csv(tmp_path / "r.csv", rows)
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["schema"] == report.SCHEMA and doc["meta"]["triton_version"] is None
    assert len(doc["rows"]) == 4 and doc["skipped"][0]["impl"] == "apex"
    assert all(list(r) == report.FIELDS for r in doc["rows"])
    assert doc["rows"][1]["speedup"] == pytest.approx(4.0)
    assert doc["rows"][1]["triton_version"] is None

    header = (tmp_path / "r.csv").read_text().splitlines()[0].split(",")
    assert header == report.FIELDS
    back = report.read_csv(tmp_path / "r.csv")
    assert len(back) == 4
    assert back[1]["impl"] == "fusedopt" and back[1]["numel"] == 1000
    assert back[1]["speedup"] == pytest.approx(4.0) and back[1]["params_changed"] is False
    assert back[0]["triton_version"] is None and back[0]["ceiling_gbps"] == 40.0
    assert back[3]["status"] == "error" and back[3]["gbps"] is None


def test_read_csv_rejects_other_files(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a fusedopt-bench CSV"):
        report.read_csv(tmp_path / "x.csv")


def test_table_shows_rows_flags_and_errors():
    rows = _rows()
    report.add_derived(rows, META, impls.BASELINE_ORDER["cpu"])
    text = report.format_table(rows, META)
    assert "copy ceiling: 40.0 GB/s" in text and "speedup is vs torch" in text
    line = next(ln for ln in text.splitlines() if " fusedopt " in ln)
    assert "4.00x" in line and "140%" in line and "UNCHANGED" in line
    assert "1 configuration(s) failed" in text and "boom: RuntimeError: x" in text
    assert report.human_count(124_439_808) == "124.4M"


def test_progress_bar_plain_stream():
    buf = io.StringIO()
    bar = Progress([1.0, 1.0], stream=buf)
    bar.start("first")
    bar.advance()
    bar.start("second")
    bar.advance()
    bar.close()
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("[") and "1/2" in lines[0] and lines[0].endswith("first")
    assert "2/2" in lines[1] and lines[-1].startswith("2/2 done in")
    assert lines[-1].endswith("(planned 0:02)")
    silent = io.StringIO()
    Progress([1.0] * 3, stream=silent, enabled=False).start("x")
    assert silent.getvalue() == ""


def test_progress_eta_follows_planned_time_not_item_count():
    """One big job then nine small ones: after the big one, the ETA is the small ones' plan at
    the pace seen, not 'one item took 60 s, nine are left: 9 minutes'."""
    now = [0.0]
    buf = io.StringIO()
    bar = Progress([60.0] + [1.0] * 9, stream=buf, timer=lambda: now[0])
    assert bar.eta() == pytest.approx(69.0)  # nothing done yet: the plan
    bar.start("big")
    now[0] = 120.0  # the big job took twice its plan
    bar.advance()
    assert bar.eta() == pytest.approx(9 * 1.0 * 2)  # the rest, at that pace
    bar.start("small")
    assert "2:00<0:18" in buf.getvalue().splitlines()[-1]
