"""fusedopt-bench: the bytes model and the workload shapes."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from fusedopt.perf import bytes_model, workloads
from fusedopt.perf.bytes_model import bytes_per_param, state_buffers
from fusedopt.perf.workloads import UnknownNameError

# ---------------------------------------------------------------------------
# bytes model
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "opt, dtype, hparams, expected",
    [
        ("AdamW", "fp32", {}, 28),  # read p,g,m,v write p,m,v
        ("Adam", "fp32", {}, 28),
        ("AdamW", "bf16", {}, 14),
        ("AdamW", "fp16", {}, 14),
        ("AdamW", "fp32", {"amsgrad": True}, 36),  # + max_exp_avg_sq read+write
        ("Adam", "bf16", {"amsgrad": True}, 18),
        ("SGD", "fp32", {"momentum": 0.9}, 20),
        ("SGD", "fp32", {"momentum": 0.9, "nesterov": True}, 20),
        ("SGD", "fp32", {}, 12),
        ("SGD", "fp32", {"momentum": 0}, 12),
        ("Adagrad", "fp32", {}, 20),
        ("RMSprop", "fp32", {}, 20),
        ("RMSprop", "fp32", {"momentum": 0.9}, 28),
        ("RMSprop", "fp32", {"momentum": 0.9, "centered": True}, 36),
        ("Adadelta", "fp32", {}, 28),
        ("NAdam", "fp32", {}, 28),
        ("RAdam", "fp32", {}, 28),
        ("Adamax", "fp32", {}, 28),
        ("Lion", "fp32", {}, 20),
        ("LAMB", "fp32", {}, 28),
        ("AdamW", "fp64", {}, 56),
    ],
)
def test_bytes_per_param(opt, dtype, hparams, expected):
    assert bytes_per_param(opt, dtype, hparams) == expected


def test_bytes_mixed_precision_and_aliases():
    # bf16 params and grads with fp32 states: 2*2 (p) + 2 (g) + 2*4*2 (m, v) = 22.
    assert bytes_per_param("AdamW", "bf16", state_dtype="fp32") == 22
    assert bytes_per_param("AdamW", "bfloat16") == bytes_per_param("AdamW", "bf16")
    assert bytes_per_param("AdamW", "float32") == 28
    assert bytes_per_param("SGD", "half", {"momentum": 0.9}) == 10


def test_bytes_with_8bit_states():
    """8-bit states: a byte per element and a float32 absmax per 256 (read and written), for
    params large enough to have them; a results CSV reads the fraction back as written."""
    from fusedopt.perf import report

    assert bytes_per_param("AdamW", "fp32", {"state_dtype": "8bit"}) == 12 + 4 * (1 + 4 / 256)
    assert bytes_per_param("AdamW", "bf16", {"state_dtype": "8bit", "master_weights": True}) \
        == 6 + 4 * (1 + 4 / 256) + 8
    assert bytes_model.state_bytes_per_param("Lion", "bf16", {"state_dtype": "8bit"}) \
        == 1 + 4 / 256
    assert report._parse("bytes_per_param", "16.0625") == 16.0625
    assert report._parse("bytes_per_param", "28") == 28


def test_bytes_model_rejects_unknown_names():
    with pytest.raises(UnknownNameError, match="valid optimizers: Adam, AdamW"):
        bytes_per_param("Adamm", "fp32")
    with pytest.raises(UnknownNameError, match="valid dtypes: fp32"):
        bytes_per_param("AdamW", "fp8")


def test_describe_lists_the_traffic():
    text = bytes_model.describe("AdamW")
    assert text == "read p,g,exp_avg,exp_avg_sq; write p,exp_avg,exp_avg_sq"


@pytest.mark.parametrize(
    "opt, hparams",
    [
        ("Adam", {}), ("Adam", {"amsgrad": True}), ("AdamW", {}), ("SGD", {"momentum": 0.9}),
        ("SGD", {}), ("Adagrad", {}), ("Adadelta", {}), ("RMSprop", {}),
        ("RMSprop", {"momentum": 0.9, "centered": True}), ("NAdam", {}), ("RAdam", {}),
        ("Adamax", {}), ("Rprop", {}), ("ASGD", {}),
    ],
)  # fmt: skip
def test_state_buffers_match_torch_optim_state(opt, hparams):
    """The model's param-sized buffers are exactly the ones torch.optim keeps."""
    p = torch.nn.Parameter(torch.randn(7, 3))
    p.grad = torch.randn(7, 3)
    o = getattr(torch.optim, opt)([p], lr=1e-3, **hparams)
    o.step()
    o.step()
    torch_keys = {k for k, v in o.state[p].items()
                  if isinstance(v, torch.Tensor) and v.shape == p.shape}  # fmt: skip
    assert set(state_buffers(opt, hparams)) == torch_keys


# ---------------------------------------------------------------------------
# workloads
# ---------------------------------------------------------------------------


def test_gpt2_shapes():
    w = workloads.gpt2_124m()
    assert w.numel == 124_439_808
    assert w.num_tensors == 148
    assert w.shapes[0] == (50257, 768) and w.shapes[1] == (1024, 768)
    assert w.shapes[2:14] == (
        (768,), (768,), (768, 2304), (2304,), (768, 768), (768,),
        (768,), (768,), (768, 3072), (3072,), (3072, 768), (768,),
    )  # fmt: skip
    assert w.shapes[-2:] == ((768,), (768,))


def test_gpt2_matches_the_e2e_model_built_on_meta():
    """An independent count: the harness's own GPT at GPT-2 size has the same params."""
    from fusedopt.perf.gpt import CONFIGS, GPT, num_params

    with torch.device("meta"):
        model = GPT(CONFIGS["gpt2"])
    assert num_params(model) == workloads.gpt2_124m().numel


def test_llama_1b_shapes():
    w = workloads.llama_1b()
    per_layer = 2 * 2048 * 2048 + 2 * 512 * 2048 + 3 * 8192 * 2048 + 2 * 2048
    assert w.numel == 2 * 32000 * 2048 + 16 * per_layer + 2048 == 1_104_218_112
    assert w.num_tensors == 1 + 16 * 9 + 2
    assert w.shapes.count((512, 2048)) == 32  # GQA k and v
    assert w.shapes.count((32000, 2048)) == 2  # untied embedding and lm_head
    # The only 1-D tensors are the 33 RMSNorm weights: no biases anywhere.
    assert [s for s in w.shapes if len(s) == 1] == [(2048,)] * 33


def test_resnet50_shapes():
    w = workloads.resnet50()
    assert w.numel == 25_557_032  # torchvision's resnet50 parameter count
    assert w.num_tensors == 161
    assert w.shapes[0] == (64, 3, 7, 7) and w.shapes[-2:] == ((1000, 2048), (1000,))
    assert sum(1 for s in w.shapes if len(s) == 4) == 1 + 16 * 3 + 4  # stem, blocks, shortcuts


def test_small_tensors_are_seeded_log_uniform():
    w = workloads.small_tensors()
    assert w.name == "small2000" and w.num_tensors == 2000
    sizes = [s[0] for s in w.shapes]
    assert all(len(s) == 1 for s in w.shapes)
    assert min(sizes) >= 1000 and max(sizes) <= 260_000
    # log-uniform: the median is near the geometric mean of the bounds (~16,125).
    assert 12_000 < statistics.median(sizes) < 21_000
    assert workloads.small_tensors() == w  # fixed seed: identical every time
    assert workloads.small_tensors(seed=1) != w


def test_flat_sweep_and_resolve():
    sweep = workloads.flat_sweep(12, 28, 2)
    assert [w.numel for w in sweep] == [2**e for e in range(12, 29, 2)]
    assert all(w.family == "flat" and w.num_tensors == 1 for w in sweep)
    names = [w.name for w in workloads.resolve(["flat:16-20", "flat:24", "small3", "GPT2"])]
    assert names == ["flat-2^16", "flat-2^18", "flat-2^20", "flat-2^24", "small3", "gpt2"]
    assert [w.name for w in workloads.resolve(["flat"], flat_range=(10, 14, 4))] == [
        "flat-2^10", "flat-2^14"]  # fmt: skip
    # duplicates collapse
    assert len(workloads.resolve(["flat:12", "flat:12-12"])) == 1


def test_unknown_workload_lists_valid_names():
    with pytest.raises(UnknownNameError) as err:
        workloads.resolve(["gpt3"])
    msg = str(err.value)
    assert "unknown workload 'gpt3'" in msg
    for name in ("flat", "gpt2", "llama1b", "resnet50", "small2000"):
        assert name in msg


def test_model_workload_uses_the_meta_device(tmp_path, monkeypatch):
    (tmp_path / "perf_user_model.py").write_text(
        "import torch\n"
        "CALLS = []\n"
        "def build():\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Linear(20, 3))\n"
        "    CALLS.append(next(m.parameters()).device.type)\n"
        "    m[1].bias.requires_grad_(False)\n"
        "    return m\n"
        "class Factory:\n"
        "    @staticmethod\n"
        "    def big():\n"
        "        return torch.nn.Linear(100_000, 100_000)  # 40 GB if it were real\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    w = workloads.from_model("perf_user_model:build")
    assert w.shapes == ((20, 10), (20,), (3, 20))  # frozen bias excluded
    assert w.numel == 200 + 20 + 60 and w.name == "model:build"
    import perf_user_model

    assert perf_user_model.CALLS == ["meta"]
    big = workloads.from_model("perf_user_model:Factory.big")
    assert big.numel == 100_000 * 100_000 + 100_000
    with pytest.raises(ValueError, match="MODULE:FACTORY"):
        workloads.from_model("perf_user_model")


def test_workload_numel_handles_scalars():
    w = workloads.Workload("x", "x", ((), (3, 4), (0,)))
    assert w.numel == 1 + 12 + 0 == math.prod(()) + 12
