"""The training example (fusedopt.perf.example) runs end to end and learns real text: bf16 and
fp16 (with its GradScaler), clipping, OneCycleLR, and the compiled step."""

import math

import pytest
import torch

from fusedopt.perf.example import MAX_LR, CharData, main, train
from fusedopt.perf.gpt import GPTConfig

TINY = GPTConfig(vocab_size=128, block_size=16, n_layer=1, n_head=2, n_embd=32)
STEPS = 20


def test_corpus_is_real_text():
    data = CharData.load()
    assert len(data.train) > 100_000 and len(data.val) > 10_000
    text = "".join(data.vocab[i] for i in data.train[:2000].tolist())
    assert " the " in text and "Args:" in text


@pytest.mark.parametrize(("dtype", "compile_step"),
                         [("bf16", False), ("fp16", False), ("fp16", True)],
                         ids=["bf16", "fp16", "fp16-compiled"])
def test_example_trains(dtype, compile_step):
    lines = []
    history = train(steps=STEPS, dtype=dtype, device="cpu", compile_step=compile_step,
                    config=TINY, log=lines.append)
    assert len(history["train"]) == STEPS and all(map(math.isfinite, history["train"]))
    # the held-out loss falls well below chance (ln 128 = 4.85 nats per character)
    assert history["val"][0] > 4.5 and history["val"][-1] < history["val"][0] - 0.5, history
    assert any("grad norm" in line for line in lines)
    # the schedule ends where OneCycleLR says: max_lr / (div_factor * final_div_factor)
    last_lr = float(lines[-1].split("lr ")[1].split()[0])
    assert last_lr == pytest.approx(MAX_LR / 100, rel=1e-2)


def test_example_cli_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "training loop" in capsys.readouterr().out


def test_vocabulary_must_fit():
    with pytest.raises(ValueError, match="characters"):
        train(steps=1, device="cpu", config=GPTConfig(vocab_size=8, block_size=8, n_layer=1,
                                                      n_head=1, n_embd=8))
    assert torch.is_grad_enabled()
