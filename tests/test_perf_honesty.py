"""fusedopt-bench tells the truth on its own: every column explained, noise flagged in the table
and never drawn as a bar, caches and mismatches called out, --help defaults taken from the
constants the run uses, and a bare CPU run planned to fit in two minutes (CPU, tiny sizes)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from fusedopt.perf import cli, host, impls, measure, plan, plots, report
from fusedopt.perf.impls import Built, Impl, OptSpec
from fusedopt.perf.workloads import Workload

TINY = Workload("tiny", "tiny", ((300,), (17, 5), (1,)))
FAST = measure.Settings(warmup=1, repeats=3, target_run_s=0.001, min_steps=2, max_steps=3)
META = {"device": "cpu", "device_name": "Test CPU", "torch_version": "2.x", "triton_version": None,
        "fusedopt_version": "0.1.0", "ceiling_gbps": 40.0, "cache_bytes": 1 << 20,
        "timing_threads": 1, "ceiling": {"nbytes": 256 << 20}}  # fmt: skip


def _row(impl: str, ms: float, iqr: float, *, workload: str = "w", numel: int = 1 << 20,
         **extra) -> dict:
    return {"workload": workload, "family": "flat", "num_tensors": 1, "numel": numel,
            "optimizer": "AdamW", "dtype": "fp32", "impl": impl, "status": "ok",
            "bytes_per_param": 28, "ms_per_step": ms, "iqr_pct": iqr,
            "gbps": 28 * numel / ms / 1e6, "working_set_mb": 16 * numel / 2**20,
            "first_step_ms": 1.0, "peak_mem_mb": 16.0, "params_finite": True,
            "params_changed": True, "check_max_diff": 0.0, "check_ok": True, **extra}  # fmt: skip


def _header_and_legend(text: str) -> tuple[list[str], str]:
    lines = text.splitlines()
    rule = next(i for i, ln in enumerate(lines) if ln.startswith("---"))
    head = lines[rule - 1]
    # columns are separated by two spaces; names like "ms/step" or "1st ms" have at most one
    columns = [c for c in re.split(r"\s{2,}", head.strip()) if c]
    return columns, text[text.index("\ncolumns:"):]


# ---------------------------------------------------------------------------
# the table explains itself
# ---------------------------------------------------------------------------


def test_every_table_column_has_a_legend_entry():
    assert [c[0] for c in report._COLUMNS if c[0] not in report.COLUMN_LEGEND] == []
    rows = [_row("torch", 2.0, 1.0), _row("fusedopt", 1.0, 2.0, ms_per_step_events=0.9)]
    report.add_derived(rows, {**META, "device": "cuda"}, impls.BASELINE_ORDER["cuda"])
    columns, legend = _header_and_legend(report.format_table(rows, META))
    assert "ms(ev)" in columns and "check" in columns and len(columns) == len(report._COLUMNS)
    for column in columns:
        line = next((ln for ln in legend.splitlines() if ln.startswith(f"  {column}  ")), None)
        assert line is not None, f"column {column!r} is not in the legend"
        assert len(line.split(column, 1)[1].strip()) > 10  # and says something


def test_host_table_legend_names_every_column():
    row = {"workload": "small3", "tensors": 3, "optimizer": "AdamW", "dtype": "fp32",
           "device": "cpu", "status": "ok", "floor_ms": 0.01, "steady_ms": 0.02,
           "new_grads_ms": 0.04, "steady_per_floor": 2.0, "new_grads_per_floor": 4.0,
           "steady_us_per_tensor": 6.7, "noisy": "new_grads"}  # fmt: skip
    text = host.format_host_table([row])
    columns, legend = _header_and_legend(text)
    assert columns == list(host.COLUMN_LEGEND)
    for column in columns:
        assert f"\n  {column}  " in legend
    assert "2.0x" in text and "4.0x" in text and "noisy: new_grads" in text


# ---------------------------------------------------------------------------
# noise
# ---------------------------------------------------------------------------


def test_spread_ignores_one_outlier_but_not_a_wide_middle():
    assert measure.spread_of([1.0, 1.01, 0.99, 1.0, 1.0, 1.02, 9.0]) < 5  # one preempted run
    assert measure.too_noisy(measure.spread_of([1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]))
    assert not measure.too_noisy(None)


def test_noisy_row_is_flagged_in_the_table():
    rows = [_row("torch", 2.0, 3.0), _row("fusedopt", 0.00578, 210.0),  # the 346x
            _row("torch-foreach", 1.0, 4.0)]
    report.add_derived(rows, META, impls.BASELINE_ORDER["cpu"])
    by = {r["impl"]: r for r in rows}
    assert by["fusedopt"]["noisy"] and by["fusedopt"]["speedup_noisy"]
    assert not by["torch-foreach"]["noisy"] and not by["torch-foreach"]["speedup_noisy"]
    text = report.format_table(rows, META)
    line = next(ln for ln in text.splitlines() if " fusedopt " in ln)
    assert line.rstrip().endswith("noisy")  # in the check column, on the row itself
    assert "346.02x?" in line  # and its speedup is marked as leaning on noise
    foreach = next(ln for ln in text.splitlines() if " torch-foreach " in ln)
    assert "2.00x " in foreach + " " and foreach.rstrip().endswith("ok")
    assert "noisy: 1 of 3 rows" in text and "not results" in text  # the footnote


def test_noisy_baseline_marks_every_speedup_against_it():
    rows = [_row("torch", 2.0, 80.0), _row("fusedopt", 1.0, 1.0)]
    report.add_derived(rows, META, impls.BASELINE_ORDER["cpu"])
    assert rows[1]["noisy"] is False and rows[1]["speedup_noisy"] is True


def _bars_drawn(monkeypatch) -> list[float]:
    """Heights of every bar the plots draw, recorded through matplotlib's Axes.bar."""
    from matplotlib.axes import Axes

    heights: list[float] = []
    real_bar = Axes.bar

    def bar(self, x, height, *args, **kwargs):
        heights.extend(height if hasattr(height, "__len__") else [height])
        return real_bar(self, x, height, *args, **kwargs)

    monkeypatch.setattr(Axes, "bar", bar)
    return heights


def test_noisy_speedup_is_not_drawn_as_a_bar(tmp_path, monkeypatch):
    rows = [_row("torch", 2.0, 3.0, workload="flat-2^18"),
            _row("fusedopt", 0.00578, 210.0, workload="flat-2^18"),
            _row("torch", 2.0, 3.0, workload="flat-2^20"),
            _row("fusedopt", 1.0, 2.0, workload="flat-2^20")]  # fmt: skip
    report.add_derived(rows, META, impls.BASELINE_ORDER["cpu"])
    heights = _bars_drawn(monkeypatch)
    notes: list[str] = []
    from matplotlib.axes import Axes

    real_annotate = Axes.annotate
    monkeypatch.setattr(Axes, "annotate", lambda self, text, *a, **k: (
        notes.append(text), real_annotate(self, text, *a, **k))[1])
    [path] = plots.plot_speedups(rows, tmp_path)
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert sorted(heights) == pytest.approx([1.0, 1.0, 2.0])  # the 346x bar is not there
    assert notes.count("noisy") == 1  # a mark stands where it would have been


def test_noisy_rows_read_back_from_csv_are_still_not_drawn(tmp_path, monkeypatch):
    rows = [_row("torch", 2.0, 3.0), _row("fusedopt", 0.00578, 210.0)]
    report.add_derived(rows, META, impls.BASELINE_ORDER["cpu"])
    report.write_csv(tmp_path / "results.csv", rows)
    back = report.read_csv(tmp_path / "results.csv")
    assert [r["noisy"] for r in back] == [False, True]
    assert [r["speedup_noisy"] for r in back] == [False, True]
    heights = _bars_drawn(monkeypatch)
    plots.plot_speedups(back, tmp_path)
    assert heights == [1.0]  # torch against itself; not fusedopt's 346x


def test_a_plot_whose_every_row_is_noisy_still_draws(tmp_path, monkeypatch):
    """Every bar withheld (a busy machine): the figure, with its legend, is still written."""
    rows = [_row("torch", 2.0, 90.0), _row("fusedopt", 1.0, 80.0)]
    report.add_derived(rows, META, impls.BASELINE_ORDER["cpu"])
    heights = _bars_drawn(monkeypatch)
    [path] = plots.plot_speedups(rows, tmp_path)
    assert path.read_bytes()[:4] == b"\x89PNG" and heights == []


# ---------------------------------------------------------------------------
# caches, correctness, threads
# ---------------------------------------------------------------------------


def test_cache_resident_rows_have_no_percent_of_ceiling():
    small, big = _row("torch", 0.01, 1.0, numel=4096), _row("torch", 20.0, 1.0, numel=1 << 22)
    report.add_derived([small, big], META, impls.BASELINE_ORDER["cpu"])
    assert small["cache_resident"] and small["pct_of_ceiling"] is None
    assert not big["cache_resident"] and big["pct_of_ceiling"] == pytest.approx(
        100 * big["gbps"] / META["ceiling_gbps"])
    text = report.format_table([small, big], META)
    assert "%ceil '-' on 1 rows" in text and "1 MiB last-level cache" in text


def test_cache_size_is_read():
    assert measure.cache_bytes("cpu") >= 64 << 10


class _WrongLr(Impl):
    """torch.optim with 10x the lr: runs, changes the params, finite, and wrong."""

    name = "wrong-lr"

    def build(self, params, spec, device):
        opt = getattr(torch.optim, spec.name)(params, **{**spec.hparams, "lr": 1e-3})
        return Built(opt.step, opt)


def test_check_against_torch_catches_a_wrong_update():
    good = measure.measure_one(TINY, OptSpec("AdamW"), "fp32", impls.FusedOpt("reference"),
                               "cpu", FAST)  # fmt: skip
    assert good["check_ok"] is True and good["check_steps"] == 2
    assert good["check_max_diff"] <= 1e-3 * good["check_max_update"]
    bad = measure.measure_one(TINY, OptSpec("AdamW"), "fp32", _WrongLr(), "cpu", FAST)
    assert bad["status"] == "ok" and bad["check_ok"] is False
    assert bad["check_max_diff"] > good["check_max_update"]
    report.add_derived([bad], META, impls.BASELINE_ORDER["cpu"])
    text = report.format_table([bad], META)
    assert "MISMATCH" in next(ln for ln in text.splitlines() if " wrong-lr " in ln)
    lion = measure.measure_one(TINY, OptSpec("Lion"), "fp32", impls.FusedOpt("reference"), "cpu",
                               FAST)  # fmt: skip
    assert lion["status"] == "ok" and "check_ok" not in lion  # torch.optim has no Lion


def test_check_counts_the_steps_a_graph_impl_takes_on_its_first_call():
    class Warmed(Impl):  # like torch-fused-graph: warm-up steps inside the first call
        name = "warmed"

        def build(self, params, spec, device):
            opt = torch.optim.SGD(params, **spec.hparams)
            calls = []

            def step():
                for _ in range(1 if calls else 3):
                    opt.step()
                calls.append(1)

            return Built(step, opt, first_call_steps=3)

    row = measure.measure_one(TINY, OptSpec("SGD"), "fp32", Warmed(), "cpu", FAST)
    assert row["check_ok"] is True and row["check_steps"] == 4 and row["check_max_diff"] == 0


class _ThreadSpy(Impl):
    name = "thread-spy"
    seen: list[int] = []

    def build(self, params, spec, device):
        opt = torch.optim.SGD(params, **spec.hparams)

        def step():
            self.seen.append(torch.get_num_threads())
            opt.step()

        return Built(step, opt)


def test_timing_runs_on_pinned_threads_and_restores_them(tmp_path, monkeypatch):
    known = impls.all_impls()
    monkeypatch.setattr(impls, "all_impls", lambda: {**known, "thread-spy": _ThreadSpy()})
    before = torch.get_num_threads()
    _ThreadSpy.seen.clear()
    rc = cli.main(["--device", "cpu", "--workloads", "flat:8", "--optimizers", "SGD",
                   "--impls", "thread-spy", "--quick", "--quiet", "--no-plots",
                   "--threads", "1", "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0 and _ThreadSpy.seen and set(_ThreadSpy.seen) == {1}
    assert torch.get_num_threads() == before
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    assert meta["timing_threads"] == 1 and meta["torch_num_threads"] == before



# ---------------------------------------------------------------------------
# --help says what the run does
# ---------------------------------------------------------------------------


def _flat(text: str) -> str:
    """Help text on one line: argparse wraps at spaces and after hyphens (torch-fused-|graph)."""
    return " ".join(re.sub(r"-\n\s*", "-", text).split())


def test_help_lists_every_subcommand_and_the_real_defaults():
    text = _flat(cli.build_parser().format_help())
    for command in ("fusedopt-bench plot RESULTS.csv", "fusedopt-bench host"):
        assert command in text
    for (device, _quick), (lo, hi, step) in cli.DEFAULT_FLAT.items():
        assert f"{device}: {lo}:{hi}:{step}" in text
    for (device, _quick), names in cli.DEFAULT_WORKLOADS.items():
        assert f"{device}: {' '.join(names)}" in text
    for device, names in impls.DEFAULT_IMPLS.items():
        assert f"{device}: {' '.join(names)}" in text
    for device in ("cpu", "cuda"):
        s = measure.Settings.for_device(device)
        assert f"{device}: {s.warmup}" in text.split("--warmup", 2)[2]
        assert f"{device}: {s.repeats}" in text.split("--repeats", 2)[2]
        assert f"{device}: {s.target_run_s * 1e3:g}" in text.split("--target-ms", 2)[2]
    assert f"(default: {measure.TIMING_THREADS};" in text
    for key, value in cli.E2E_DEFAULTS[False].items():
        assert f"(default: {value}; {cli.E2E_DEFAULTS[True][key]} with --quick)" in text
    assert "12:22:2" not in text  # the old, wrong CPU default


def test_host_help_shows_its_real_defaults():
    text = _flat(cli.build_host_parser().format_help())
    steps, repeats = host.DEFAULT_STEPS[False]
    assert f"(default: {','.join(host.DEFAULT_WORKLOADS)})" in text
    assert f"(default: {','.join(host.DEFAULT_OPTIMIZERS)})" in text
    assert f"(default: {steps};" in text and f"(default: {repeats};" in text
    assert "p.grad.data_ptr()" in text  # the floor is described
    for action in cli.build_host_parser()._actions:
        assert action.help, f"{action.option_strings} has no help"


def test_help_subcommands_run(capsys):
    for argv in (["--help"], ["host", "--help"], ["plot", "--help"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 0
    assert "usage: fusedopt-bench plot" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# the bare CPU run
# ---------------------------------------------------------------------------


def _cpu_default_plan(argv: list[str], copy_gbps: float) -> list[plan.Section]:
    args = cli.build_parser().parse_args(argv)
    return cli.build_sections(args, "cpu", cli.resolve_request(args, "cpu"), {}, copy_gbps)


@pytest.mark.parametrize("copy_gbps", [5.0, 25.0])  # a slow machine's copy, and this kind
def test_cpu_default_plan_fits_in_two_minutes(copy_gbps):
    sections = _cpu_default_plan([], copy_gbps)
    assert [s.title for s in sections] == [cli.HOST_TITLE, cli.STEPS_TITLE["cpu"],
                                           cli.STATIC_TITLE]
    host_jobs = [j.label for j in sections[0].jobs]
    assert host_jobs == [f"host {w} AdamW fp32" for w in host.DEFAULT_WORKLOADS]
    assert all(j.label.endswith(("fusedopt-reference", "torch")) for j in sections[1].jobs)
    total = sum(s.planned_s for s in sections)
    assert 20 < total < 120, plan.describe(sections)
    quick = sum(s.planned_s for s in _cpu_default_plan(["--quick"], copy_gbps))
    assert quick < total / 2


def test_plan_weighs_big_rows_more():
    settings = measure.Settings.for_device("cpu")
    mid = plan.row_seconds(Workload("m", "m", ((1 << 16,),)), 28, "torch", "cpu", settings, 20)
    big = plan.row_seconds(Workload("b", "b", ((1 << 26,),)), 28, "torch", "cpu", settings, 20)
    assert big > 10 * mid
    # a row whose steps are neither capped nor too slow: its timed runs are most of its time
    assert mid == pytest.approx(settings.repeats * settings.target_run_s, rel=0.5)


def test_explicit_workloads_run_only_the_step_section():
    sections = _cpu_default_plan(["--workloads", "flat:12"], 20.0)
    assert [s.title for s in sections] == [cli.STEPS_TITLE["cpu"]]


def test_bare_cpu_run_end_to_end(tmp_path, capsys, monkeypatch):
    """The bare CPU run's shape, on tiny stand-ins for its workloads."""
    monkeypatch.setattr(host, "DEFAULT_WORKLOADS", ("small30",))
    monkeypatch.setitem(cli.DEFAULT_WORKLOADS, ("cpu", True), ["flat:8"])
    rc = cli.main(["--device", "cpu", "--quick", "--optimizers", "AdamW", "--no-plots",
                   "--out", str(tmp_path)])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0
    assert "plan: about" in captured.err and "(planned" in captured.err
    out = captured.out
    assert out.index(f"== 1. {cli.HOST_TITLE} ==") < out.index(f"== 2. {cli.STEPS_TITLE['cpu']}")
    assert "floor ms" in out and "fusedopt-reference" in out
    assert "not fusedopt's GPU performance" in out
    assert out.index(f"== 2. {cli.STEPS_TITLE['cpu']}") < out.index(f"== 3. {cli.STATIC_TITLE}")
    assert out.count("\ncolumns:") == 3  # a legend under each table
    readme = (tmp_path / "README.md").read_text()
    assert f"## {cli.HOST_TITLE}" in readme and readme.count("columns:") == 3
    static_rows = json.loads((tmp_path / "static.json").read_text())["rows"]
    assert [(r["variant"], r["dtype"], r["kernel"]) for r in static_rows] == [
        ("AdamW", "fp32", "step")]
    assert static_rows[0]["status"] == "ok" and static_rows[0]["vec16_loads_per_elem"] == 1
    assert "measuring took" in readme
    host_rows = json.loads((tmp_path / "host.json").read_text())["rows"]
    assert [r["workload"] for r in host_rows] == ["small30"] and host_rows[0]["floor_ms"] > 0
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    assert meta["sections"] == [cli.HOST_TITLE, cli.STEPS_TITLE["cpu"], cli.STATIC_TITLE]
    assert meta["planned_s"] > 0 and meta["elapsed_s"] > 0
