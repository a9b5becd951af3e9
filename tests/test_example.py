"""The training example (fusedopt.perf.example) runs end to end and learns: bf16 and fp16
(with its GradScaler), clipping, OneCycleLR, and the compiled step."""

import pytest
import torch

from fusedopt.perf.example import main, train
from fusedopt.perf.gpt import GPTConfig

TINY = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)


@pytest.mark.parametrize(("dtype", "compile_step"),
                         [("bf16", False), ("fp16", False), ("fp16", True)],
                         ids=["bf16", "fp16", "fp16-compiled"])
def test_example_trains(dtype, compile_step):
    lines = []
    losses = train(steps=12, dtype=dtype, device="cpu", compile_step=compile_step,
                   config=TINY, log=lines.append)
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-3:]) < losses[0], losses  # it learns the synthetic token statistics
    assert any("grad norm" in line for line in lines)


def test_example_cli_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "training loop" in capsys.readouterr().out
