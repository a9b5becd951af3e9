"""Storage at every alignment: params, grads and states that start 4, 8 or 16 bytes past a
16-byte boundary, each independently (DDP's bucket-view grads and flat-buffer params are not
16-byte aligned). The kernel takes 16-byte accesses after a common shift where every tensor is
misaligned alike, and element accesses where they differ; each combination must give the
reference's result, element for element, on chunk bodies, tails and the elements before the
first 16-byte boundary."""

import itertools

import pytest
import torch
from cases import TOL, assert_states_close

import fusedopt

SIZES = (5003, 37)  # two chunks of fp32 (4096 elements) with a tail; one short tensor
OFFSETS = {16: 0, 4: 1, 8: 2}  # alignment in bytes -> offset in fp32 elements


def _view(values: torch.Tensor, offset: int, device) -> torch.Tensor:
    """``values`` copied into a buffer at ``offset`` elements past a 16-byte boundary."""
    buffer = torch.zeros(values.numel() + 8, dtype=values.dtype, device=device)
    view = buffer[offset:offset + values.numel()].view(values.shape)
    view.copy_(values)
    return view


# LAMB also runs the read-only sums kernel, whose element paths keep their own sums: aligned,
# misaligned alike (the shifted frame), and misaligned differently (element accesses)
COMBINATIONS = [("AdamW", *a) for a in itertools.product(OFFSETS, repeat=3)] + [
    ("LAMB", 16, 16, 16), ("LAMB", 8, 8, 8), ("LAMB", 16, 4, 8), ("LAMB", 4, 16, 16)]


@pytest.mark.parametrize(("optimizer", "param_align", "grad_align", "state_align"),
                         COMBINATIONS, ids=lambda a: f"{a}B" if isinstance(a, int) else a)
def test_every_alignment_of_param_grad_and_state(optimizer, param_align, grad_align,
                                                 state_align, kernel_device):
    gen = torch.Generator().manual_seed(param_align * 100 + grad_align * 10 + state_align)
    starts = [torch.randn(n, generator=gen) for n in SIZES]
    results = []
    for backend in ("triton", "reference"):
        device = kernel_device if backend == "triton" else "cpu"
        params = [torch.nn.Parameter(_view(s, OFFSETS[param_align], device)) for s in starts]
        opt = getattr(fusedopt, optimizer)(params, lr=1e-2, weight_decay=0.1, backend=backend)
        for p in params:  # states at the chosen alignment, before the first step
            for name in ("exp_avg", "exp_avg_sq"):
                opt.state[p][name] = _view(torch.zeros_like(p, device="cpu"),
                                           OFFSETS[state_align], device)
        for step in range(3):
            grads = [torch.randn(n, generator=torch.Generator().manual_seed(step * 7 + i))
                     for i, n in enumerate(SIZES)]
            for p, g in zip(params, grads):
                p.grad = _view(g, OFFSETS[grad_align], device)
            opt.step()
        results.append((opt, params))
    (opt, params), (ref, ref_params) = results
    assert all(p.data_ptr() % 16 == OFFSETS[param_align] * 4 for p in params)
    assert all(opt.state[p]["exp_avg"].data_ptr() % 16 == OFFSETS[state_align] * 4
               for p in params)
    assert_states_close(opt, params, ref, ref_params, **TOL[torch.float32])
