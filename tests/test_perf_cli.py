"""fusedopt-bench end to end on CPU: a tiny run writes every output, plots redraw from CSV,
the e2e mode runs, and bad names fail with the valid ones listed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fusedopt.perf import report
from fusedopt.perf.cli import build_parser, main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Tiny and short: two flat sizes (256 and 1024 elements), a few steps each.
TINY_ARGS = ["--device", "cpu", "--workloads", "flat:8-10", "--optimizers", "AdamW", "SGD",
             "--impls", "fusedopt", "fusedopt-reference", "torch", "torch-fused",
             "--warmup", "1", "--repeats", "2", "--target-ms", "1", "--max-steps", "3",
             "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = main([*TINY_ARGS, "--quick", "--out", str(out)])
    return rc, out


def test_quick_run_writes_every_output(quick_run, capsys):
    rc, out = quick_run
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    expected = {"results.json", "results.csv", "gbps_AdamW_fp32.png", "gbps_SGD_fp32.png",
                "speedup_flat.png", "first_step.png"}  # fmt: skip
    assert expected <= names
    for name in expected - {"results.json", "results.csv"}:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    summary = (out / "README.md").read_text()
    import torch

    assert f"torch {torch.__version__}" in summary and "copy-bandwidth ceiling" in summary
    assert "flat-2^10" in summary  # the table is in it
    assert "timing: 1 intra-op thread(s)" in summary
    legend = summary[summary.index("columns:"):]
    for column in ("ms/step", "spread%", "%ceil", "1st ms", "peak MB", "vs torch", "check"):
        assert f"  {column} " in legend  # every column explained where the table is


def test_quick_run_json_rows(quick_run):
    _, out = quick_run
    doc = json.loads((out / "results.json").read_text())
    meta, rows = doc["meta"], doc["rows"]
    assert meta["device"] == "cpu" and meta["ceiling_gbps"] > 0
    assert meta["torch_version"] and "triton_version" in meta
    # one row per (workload, optimizer, dtype, impl): 2 x 2 x 1 x 4
    keys = {(r["workload"], r["optimizer"], r["dtype"], r["impl"]) for r in rows}
    assert len(rows) == len(keys) == 16
    assert {r["workload"] for r in rows} == {"flat-2^8", "flat-2^10"}
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    assert meta["timing_threads"] == 1 and meta["cache_bytes"] > 0
    for r in rows:
        assert r["gbps"] > 0 and r["ms_per_step"] > 0 and r["first_step_ms"] > 0
        assert r["params_finite"] is True and r["params_changed"] is True
        assert r["baseline_impl"] == "torch" and r["speedup"] > 0
        assert r["bytes_per_param"] == {"AdamW": 28, "SGD": 20}[r["optimizer"]]
        # 1024 elements fit in any cache: no % of a copy ceiling that does not bound them
        assert r["cache_resident"] is True and r["pct_of_ceiling"] is None
        assert isinstance(r["noisy"], bool) and isinstance(r["speedup_noisy"], bool)
        # checked against torch.optim after the first steps, from the same params and grads
        assert r["check_ok"] is True and r["check_steps"] == 2  # first step + 1 warm-up
        assert r["check_max_diff"] < 1e-6 < r["check_max_update"]
    fused = {r["note"] for r in rows if r["impl"] == "fusedopt-reference"}
    assert fused == {"backend=reference"}


def test_quick_run_csv_matches_json(quick_run):
    _, out = quick_run
    rows = report.read_csv(out / "results.csv")
    doc = json.loads((out / "results.json").read_text())
    assert len(rows) == len(doc["rows"])
    for a, b in zip(rows, doc["rows"]):
        assert (a["workload"], a["impl"], a["optimizer"]) == (b["workload"], b["impl"],
                                                              b["optimizer"])  # fmt: skip
        assert a["gbps"] == pytest.approx(b["gbps"])
        assert a["device"] == "cpu" and a["torch_version"] == b["torch_version"]


def test_plot_from_csv_without_measuring(quick_run, tmp_path, capsys):
    _, out = quick_run
    assert main(["plot", str(out / "results.csv"), "--out", str(tmp_path)]) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(["first_step.png", "gbps_AdamW_fp32.png", "gbps_SGD_fp32.png",
                              "speedup_flat.png"])  # fmt: skip
    assert all((tmp_path / n).read_bytes()[:8] == PNG_MAGIC for n in written)
    assert str(tmp_path / "speedup_flat.png") in capsys.readouterr().out


def test_table_printed(tmp_path, capsys):
    rc = main(["--device", "cpu", "--workloads", "flat:8", "--optimizers", "SGD:momentum=0",
               "--impls", "torch", "torch-foreach", "--warmup", "0", "--repeats", "1",
               "--target-ms", "1", "--max-steps", "2", "--quiet", "--no-plots",
               "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "copy ceiling:" in text and "SGD[momentum=0]" in text and "torch-foreach" in text
    assert not list(tmp_path.glob("*.png"))
    row = json.loads((tmp_path / "results.json").read_text())["rows"][0]
    assert row["bytes_per_param"] == 12


def test_e2e_mode(tmp_path, capsys):
    rc = main(["--device", "cpu", "--e2e", "--e2e-steps", "2", "--e2e-warmup", "0",
               "--e2e-batch", "1", "--optimizers", "AdamW", "--impls", "fusedopt-reference",
               "torch", "--quiet", "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    doc = json.loads((tmp_path / "e2e.json").read_text())
    rows = doc["rows"]
    assert [r["impl"] for r in rows] == ["fusedopt-reference", "torch"]
    for r in rows:
        assert r["status"] == "ok", r["error"]
        assert r["model"] == "tiny" and r["steps"] == 2
        assert r["step_ms"] == pytest.approx(r["fwd_bwd_ms"] + r["opt_ms"] + r["other_ms"],
                                             rel=0.5)  # medians of parts vs median of sums
        assert 0 < r["opt_pct"] < 100 and r["tokens_per_s"] > 0
        assert r["loss_last"] < r["loss_first"]  # it trains
    # same init, same data, same math: the two implementations agree
    assert rows[0]["loss_last"] == pytest.approx(rows[1]["loss_last"], rel=1e-4)
    assert (tmp_path / "e2e.png").read_bytes()[:8] == PNG_MAGIC
    header = (tmp_path / "e2e.csv").read_text().splitlines()[0]
    assert header.startswith("model,num_params,optimizer,dtype,impl,status")
    assert "tokens/s" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--workloads", "gpt3"], ["unknown workload 'gpt3'", "gpt2", "llama1b", "small2000",
                                   "resnet50", "flat"]),
        (["--optimizers", "AdamX"], ["unknown optimizer 'AdamX'", "AdamW", "Lion", "LAMB"]),
        (["--impls", "torch-turbo"], ["unknown impl 'torch-turbo'", "torch-fused", "fusedopt"]),
        (["--dtypes", "fp8"], ["unknown dtype 'fp8'", "bf16"]),
        (["--flat", "a:b"], ["LO:HI[:STEP]"]),
        (["--model", "no_such_module_xyz:build"], ["no_such_module_xyz"]),
    ],
)  # fmt: skip
def test_cli_errors_list_valid_names(args, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*args, "--device", "cpu", "--out", str(tmp_path / "never")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err
    assert not (tmp_path / "never").exists()  # failed before measuring anything


def test_plot_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["plot", str(tmp_path / "missing.csv")])
    assert exc.value.code == 2 and "no such file" in capsys.readouterr().err
    (tmp_path / "other.csv").write_text("x,y\n1,2\n")
    with pytest.raises(SystemExit):
        main(["plot", str(tmp_path / "other.csv")])
    assert "not a fusedopt-bench CSV" in capsys.readouterr().err


def test_help_documents_every_option():
    parser = build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"
    text = parser.format_help()
    for opt in ("--device", "--workloads", "--optimizers", "--dtypes", "--impls", "--quick",
                "--out", "--model", "--compile", "--e2e", "--threads", "plot RESULTS.csv",
                "fusedopt-bench host"):
        assert opt in text  # fmt: skip


def test_list_and_python_m(capsys):
    assert main(["--list", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "124,439,808" in text and "torch-fused-graph" in text and "28 / 14 B" in text
    proc = subprocess.run([sys.executable, "-m", "fusedopt.perf", "--help"], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0 and "usage: fusedopt-bench" in proc.stdout


def test_console_script_installed():
    exe = shutil.which("fusedopt-bench")
    if exe is None:
        pytest.skip("fusedopt-bench is not on PATH (package not installed with pip)")
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--workloads" in proc.stdout
    assert Path(exe).name == "fusedopt-bench"


def test_host_overhead_subcommand(tmp_path, capsys):
    import torch

    from fusedopt import kernels

    launch, threads = kernels.launch, torch.get_num_threads()
    rc = main(["host", "--device", "cpu", "--workloads", "small30", "--optimizers", "AdamW,SGD",
               "--steps", "3", "--repeats", "2", "--quiet", "--out", str(tmp_path)])
    assert rc == 0 and kernels.launch is launch  # the stub is undone
    assert torch.get_num_threads() == threads  # and the thread count restored
    table = capsys.readouterr().out
    assert "small30" in table and "AdamW" in table and "SGD" in table
    head = table.splitlines()[0].split()
    assert head[:5] == ["workload", "tensors", "optimizer", "dtype", "device"]
    for column in ("floor ms", "steady/floor", "new/floor"):
        assert column in table.splitlines()[0] and f"  {column} " in table  # legend too
    rows = json.loads((tmp_path / "host.json").read_text())["rows"]
    assert [(r["optimizer"], r["tensors"]) for r in rows] == [("AdamW", 30), ("SGD", 30)]
    for r in rows:
        assert r["status"] == "ok", r["error"]
        assert 0 < r["floor_ms"] < r["steady_ms"] < 1e3 and 0 < r["new_grads_ms"] < 1e3
        assert r["steady_per_floor"] == pytest.approx(r["steady_ms"] / r["floor_ms"])
        assert r["new_grads_per_floor"] == pytest.approx(r["new_grads_ms"] / r["floor_ms"])
        assert f"{r['steady_per_floor']:.1f}x" in table
    header = (tmp_path / "host.csv").read_text().splitlines()[0].split(",")
    assert header[:2] == ["workload", "tensors"]
    assert {"floor_ms", "steady_per_floor", "new_grads_per_floor"} <= set(header)


def test_host_overhead_refuses_optimizers_fusedopt_lacks(capsys, monkeypatch):
    """Every optimizer the harness knows is in fusedopt now; an older or partial fusedopt
    (here: one without Lion) is refused with what it does have."""
    from fusedopt.perf import impls

    monkeypatch.setattr(impls, "fusedopt_optimizers", lambda: ["Adam", "AdamW", "SGD"])
    with pytest.raises(SystemExit):
        main(["host", "--optimizers", "Lion"])
    assert "fusedopt has Adam" in capsys.readouterr().err


def test_harness_knows_every_fusedopt_optimizer():
    import fusedopt
    from fusedopt.perf import impls

    elementwise = [n for n in fusedopt.__all__ if isinstance(getattr(fusedopt, n), type)
                   and issubclass(getattr(fusedopt, n), fusedopt.FusedOptimizer)
                   and n != "FusedOptimizer" and not getattr(fusedopt, n).whole_tensors
                   and getattr(fusedopt, n).sparse_grads != "only"]
    assert sorted(impls.fusedopt_optimizers()) == sorted(elementwise)


def test_every_other_optimizer_has_the_matrix_benchmark():
    """What the main harness does not take (whole-tensor and sparse-row optimizers) is what
    ``fusedopt-bench matrix`` measures."""
    import fusedopt
    from fusedopt.perf import impls, matrix

    specs = [n for n in fusedopt.__all__ if isinstance(getattr(fusedopt, n), type)
             and issubclass(getattr(fusedopt, n), fusedopt.FusedOptimizer)
             and n != "FusedOptimizer"]
    others = sorted(set(specs) - set(impls.fusedopt_optimizers()))
    assert others == sorted(matrix.OPTIMIZERS)


def test_matrix_quick_runs_and_checks_against_torch(tmp_path, capsys):
    assert main(["matrix", "--quick", "--quiet", "--device", "cpu", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    for name in ("Muon", "Adafactor", "SparseAdam", "NS TFLOP/s", "%matmul", "columns:"):
        assert name in text
    rows = json.loads((tmp_path / "matrix.json").read_text())["rows"]
    assert {(r["optimizer"], r["impl"]) for r in rows} == {
        (o, i) for o in ("Muon", "Adafactor", "SparseAdam")
        for i in ("fusedopt-reference", "torch")}
    for r in rows:
        assert r["status"] == "ok" and r["ms_step"] > 0 and r["launches"] > 0
        if r["impl"] != "torch":
            assert r["vs_torch"] == 0.0  # the reference path is torch's arithmetic
    muon = next(r for r in rows if r["optimizer"] == "Muon" and r["impl"] == "torch")
    assert muon["ns_tflops"] > 0 and muon["pct_matmul"] > 0
