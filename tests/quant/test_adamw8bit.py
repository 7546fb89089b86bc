"""8-bit and paged AdamW (quant/adamw8bit.py) against bitsandbytes 0.50's `AdamW8bit` on CPU.

What is equal and what is not (docs/reference.md#8-bit-adamw):
- Given the same state going in, one step gives the same parameters bit for bit and the same float32
  block scales (absmax): the dequantize, the AdamW arithmetic and its order are bitsandbytes' CPU kernel.
- The new 8-bit codes are equal except a few: bitsandbytes' native `quantize_blockwise` finds the code
  through a lookup table with a 2/65535 grid instead of an exact nearest search, so where the dynamic
  map's entries lie closer than that (near zero, most of all in the unsigned map of v) it can pick a
  neighbour. Wherever a code differs, ours is strictly nearer, and theirs farther by at most 2/65535.
- Run freely, the first differing byte of v changes that element's next steps: the parameters then
  differ by less than half a learning rate (a whole Adam step is about lr).
- Tensors under 4096 elements keep float32 moments and equal bitsandbytes bit for bit at every step.
"""

import pytest
import torch

import bitsandbytes as bnb

from quant.adamw8bit import (BLOCK_SIZE, AdamW8bit, PagedAdamW8bit, dequantize_blockwise_8bit,
                             quantize_blockwise_8bit)
from quant.nf4_code import DYNAMIC_MAP_SIGNED, DYNAMIC_MAP_UNSIGNED

LOOKUP_SPACING = 2 / 65535  # bitsandbytes' CPU code search grid on [-1, 1]
LR = 1e-2


def _pair(shapes, seed=0, paged=False):
    torch.manual_seed(seed)
    initial = [torch.randn(shape) for shape in shapes]
    ours = [torch.nn.Parameter(tensor.clone()) for tensor in initial]
    theirs = [torch.nn.Parameter(tensor.clone()) for tensor in initial]
    optimizer = (PagedAdamW8bit if paged else AdamW8bit)(ours, lr=LR)
    return ours, theirs, optimizer, bnb.optim.AdamW8bit(theirs, lr=LR)


def _give_gradients(ours, theirs):
    for mine, other in zip(ours, theirs):
        gradient = torch.randn_like(mine)
        mine.grad, other.grad = gradient.clone(), gradient.clone()


def _their_quantize(values, code):
    """The op bitsandbytes' CPU optimizer calls to store a moment: (codes, absmax)."""
    return torch.ops.bitsandbytes.quantize_blockwise(values, code.clone(), BLOCK_SIZE)


def _check_codes_nearer(ours, theirs, moment, absmax, code):
    """Where the codes differ, ours is strictly nearer the normalised value, theirs farther by < the grid."""
    differ = ours != theirs
    normed = (moment.reshape(-1) / absmax.repeat_interleave(BLOCK_SIZE)[:moment.numel()])[differ.reshape(-1)]
    ours_distance = (normed - code[ours.reshape(-1)[differ.reshape(-1)].long()]).abs()
    theirs_distance = (normed - code[theirs.reshape(-1)[differ.reshape(-1)].long()]).abs()
    assert (ours_distance < theirs_distance).all()
    assert ((theirs_distance - ours_distance) <= LOOKUP_SPACING).all()
    return int(differ.sum())


def test_unsigned_map_equals_bitsandbytes():
    assert torch.equal(DYNAMIC_MAP_UNSIGNED, bnb.functional.create_dynamic_map(signed=False))


def test_blockwise_roundtrip_and_zero_block():
    values = torch.randn(3 * BLOCK_SIZE + 7)
    values[:BLOCK_SIZE] = 0.0  # a block of zeros: 0 / 0 inside, stored as code 0, rebuilt as 0
    codes, absmax = quantize_blockwise_8bit(values, DYNAMIC_MAP_SIGNED)
    assert codes.dtype == torch.uint8 and absmax.shape == (4,)
    assert (codes[:BLOCK_SIZE] == 0).all()
    rebuilt = dequantize_blockwise_8bit(codes, absmax, DYNAMIC_MAP_SIGNED)
    assert (rebuilt[:BLOCK_SIZE] == 0).all()
    torch.testing.assert_close(rebuilt, values, atol=0.02 * absmax.max().item(), rtol=0)  # map gap < 2%
    theirs_codes, theirs_absmax = _their_quantize(values, DYNAMIC_MAP_SIGNED)
    assert torch.equal(absmax, theirs_absmax)
    assert _check_codes_nearer(codes, theirs_codes, values, absmax, DYNAMIC_MAP_SIGNED) < 0.01 * values.numel()


def test_lockstep_parameters_and_scales_equal_bitsandbytes():
    """Each step starts both from bitsandbytes' state: parameters and absmax equal, codes nearly all equal."""
    ours, theirs, optimizer, reference = _pair([(64, 80)])  # 5120 elements: 8-bit state, 20 blocks
    differing = 0
    for step in range(4):
        if step > 0:
            mine, other = optimizer.state[ours[0]], reference.state[theirs[0]]
            for name, their_name in (("exp_avg", "state1"), ("exp_avg_absmax", "absmax1"),
                                     ("exp_avg_sq", "state2"), ("exp_avg_sq_absmax", "absmax2")):
                mine[name].copy_(other[their_name])
            ours[0].data.copy_(theirs[0].data)
        _give_gradients(ours, theirs)
        optimizer.step()
        reference.step()
        mine, other = optimizer.state[ours[0]], reference.state[theirs[0]]
        assert torch.equal(ours[0], theirs[0]), f"step {step + 1}: parameters differ"
        assert torch.equal(mine["exp_avg_absmax"], other["absmax1"])
        assert torch.equal(mine["exp_avg_sq_absmax"], other["absmax2"])
        differing += int((mine["exp_avg"] != other["state1"]).sum() + (mine["exp_avg_sq"] != other["state2"]).sum())
    assert differing < 0.02 * 2 * 4 * ours[0].numel()


def test_codes_differ_only_where_ours_is_nearer():
    """Quantize the same float32 moments both ways: every differing code of ours is the nearer one."""
    torch.manual_seed(1)
    gradient = torch.randn(5120)
    exp_avg = 0.1 * gradient  # the moments after a first step from zero
    exp_avg_sq = 0.001 * gradient * gradient
    for moment, code in ((exp_avg, DYNAMIC_MAP_SIGNED), (exp_avg_sq, DYNAMIC_MAP_UNSIGNED)):
        codes, absmax = quantize_blockwise_8bit(moment, code)
        theirs, their_absmax = _their_quantize(moment, code)
        assert torch.equal(absmax, their_absmax)
        assert _check_codes_nearer(codes, theirs, moment, absmax, code) < 0.05 * moment.numel()


def test_free_running_parameters_stay_within_half_a_learning_rate():
    ours, theirs, optimizer, reference = _pair([(64, 80)], seed=2)
    for _ in range(5):
        _give_gradients(ours, theirs)
        optimizer.step()
        reference.step()
    assert (ours[0] - theirs[0]).abs().max() < 0.5 * LR


@pytest.mark.parametrize("paged", [False, True])
def test_small_tensors_keep_float32_moments_equal_to_bitsandbytes(paged):
    ours, theirs, optimizer, reference = _pair([(64,), (16, 32)], paged=paged)  # both under 4096 elements
    for _ in range(3):
        _give_gradients(ours, theirs)
        optimizer.step()
        reference.step()
        for mine, other in zip(ours, theirs):
            assert torch.equal(mine, other)
            assert torch.equal(optimizer.state[mine]["exp_avg"], reference.state[other]["state1"])
            assert torch.equal(optimizer.state[mine]["exp_avg_sq"], reference.state[other]["state2"])


def test_paged_equals_unpaged_on_cpu():
    torch.manual_seed(3)
    initial = torch.randn(64, 80)
    plain, paged = torch.nn.Parameter(initial.clone()), torch.nn.Parameter(initial.clone())
    optimizers = AdamW8bit([plain]), PagedAdamW8bit([paged])
    for _ in range(3):
        gradient = torch.randn_like(initial)
        plain.grad, paged.grad = gradient.clone(), gradient.clone()
        for optimizer in optimizers:
            optimizer.step()
    assert torch.equal(plain, paged)
    assert optimizers[1].state[paged]["exp_avg"].device.type == "cpu"


def test_state_is_two_bytes_per_parameter_plus_block_scales():
    weight = torch.nn.Parameter(torch.randn(256, 64))  # 16384 elements, 64 blocks
    optimizer = AdamW8bit([weight])
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    assert optimizer.state_bytes() == 2 * weight.numel() + 2 * 4 * (weight.numel() // BLOCK_SIZE)
    assert 8 * weight.numel() / optimizer.state_bytes() > 3.9  # vs 8 bytes per parameter in float32


def test_bad_hyperparameters_are_named():
    with pytest.raises(ValueError, match="betas"):
        AdamW8bit([torch.nn.Parameter(torch.zeros(2))], betas=(0.9, 1.0))
