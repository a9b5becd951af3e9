"""The precision study's harness (fusedopt.perf.study): runs join an earlier table only when
they were made with the same settings; the memory rows measure what the optimizers hold."""

import json

import pytest

from fusedopt.perf import study


def test_runs_join_the_earlier_table_of_the_same_settings(tmp_path):
    common = ["--steps", "2", "--eval-every", "1", "--batch", "2", "--out", str(tmp_path)]
    assert study.main(["--runs", "fp32 + state_dtype=8bit", *common]) == 0
    assert study.main(["--runs", "fp32", *common]) == 0
    saved = json.loads((tmp_path / "study.json").read_text())
    # in RUNS order, each run's own loss curve; the state of fp32 params with 8-bit states
    # is about 2 bytes per param (the layer norms and biases keep fp32 states)
    assert [r["name"] for r in saved["runs"]] == ["fp32", "fp32 + state_dtype=8bit"]
    fp32, quantized = saved["runs"]
    assert fp32["state_bytes_per_param"] == 8.0
    assert 2.0 < quantized["state_bytes_per_param"] < 2.2
    assert len(saved["meta"]["commands"]) == 2
    table = (tmp_path / "study.md").read_text()
    assert "fp32 + state_dtype=8bit" in table and "| fp32 |" in table
    with pytest.raises(SystemExit, match="other settings"):
        study.main(["--runs", "fp32", *common[:-4], "--batch", "3", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        study.main(["--runs", "no such run", *common])
