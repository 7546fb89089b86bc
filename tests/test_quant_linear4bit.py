"""Linear4bit: the frozen NF4 base layer of QLoRA."""

import pytest
import torch
import torch.nn as nn

from quant import Linear4bit, quantize_nf4

torch.manual_seed(0)


def make_linear(in_features=64, out_features=24, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)


def test_protocol_attributes_used_by_lora():
    linear = make_linear()
    layer = Linear4bit.from_linear(linear, block_size=32, double_quant=False, compute_dtype=torch.bfloat16)
    assert (layer.in_features, layer.out_features) == (64, 24)
    assert layer.block_size == 32 and layer.double_quant is False and layer.compute_dtype == torch.bfloat16
    assert isinstance(layer.bias, nn.Parameter) and not layer.bias.requires_grad
    assert torch.equal(layer.bias, linear.bias)  # full precision, copied exactly
    assert not hasattr(layer, "weight")  # no float weight parameter: the packed data are buffers
    assert hasattr(layer, "dequantize_weight")
    assert [name for name, _ in layer.named_parameters()] == ["bias"]


def test_dequantize_weight_equals_nf4_round_trip():
    linear = make_linear()
    layer = Linear4bit.from_linear(linear)
    expected = quantize_nf4(linear.weight.detach()).dequantize()  # [out, in]
    assert layer.dequantize_weight().shape == (24, 64)
    assert torch.equal(layer.dequantize_weight(), expected)
    assert torch.equal(layer.dequantize_weight(torch.bfloat16), quantize_nf4(linear.weight.detach()).dequantize(torch.bfloat16))
    assert torch.equal(layer.quantized_weight.dequantize(), expected)


def test_forward_is_x_times_dequantized_weight_plus_bias():
    linear = make_linear()
    layer = Linear4bit.from_linear(linear)
    x = torch.randn(2, 5, 64)
    weight = layer.dequantize_weight()  # [out, in]
    assert torch.equal(layer(x), x @ weight.t() + linear.bias)
    # and it stays close to the original layer (NF4 error, not a bug): relative error a few percent
    relative = (layer(x) - linear(x)).norm() / linear(x).norm()
    assert relative < 0.15


def test_gradient_reaches_the_input_only():
    layer = Linear4bit.from_linear(make_linear())
    x = torch.randn(3, 64, requires_grad=True)
    grad_output = torch.randn(3, 24)
    layer(x).backward(grad_output)
    assert torch.allclose(x.grad, grad_output @ layer.dequantize_weight(), atol=1e-6)
    assert layer.bias.grad is None
    assert all(not buffer.requires_grad for buffer in layer.buffers())


def test_backward_does_not_keep_a_dequantized_weight():
    # QLoRA's memory argument: only the 4-bit form is saved for backward, never the [out, in] matrix.
    layer = Linear4bit.from_linear(make_linear(in_features=128, out_features=96))
    saved = []

    def pack(tensor):
        saved.append((tensor.dtype, tuple(tensor.shape)))
        return tensor

    x = torch.randn(4, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = layer(x)
    y.sum().backward()
    assert (torch.float32, (96, 128)) not in saved
    assert all(dtype in (torch.uint8, torch.float32) and (dtype == torch.uint8 or shape != (96, 128))
               for dtype, shape in saved)


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_saves_quantized_form_and_loads_bit_identical(tmp_path, double_quant):
    layer = Linear4bit.from_linear(make_linear(in_features=40, out_features=30), double_quant=double_quant)
    state = layer.state_dict()
    expected_keys = {"bias", "packed"} | ({"absmax_q", "absmax_scale", "absmax_offset"} if double_quant else {"absmax"})
    assert set(state) == expected_keys
    assert state["packed"].dtype == torch.uint8 and state["packed"].numel() == 40 * 30 // 2
    path = tmp_path / "layer.pt"
    torch.save(state, path)
    loaded_state = torch.load(path, weights_only=True)
    fresh = Linear4bit(40, 30, bias=True, double_quant=double_quant)  # empty buffers of the right shapes
    fresh.load_state_dict(loaded_state)
    for name, tensor in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor) and fresh.state_dict()[name].dtype == tensor.dtype
    x = torch.randn(2, 40)
    assert torch.equal(fresh(x), layer(x))


def test_half_and_bf16_casts_leave_block_scales_untouched():
    layer = Linear4bit.from_linear(make_linear())
    before = {name: tensor.clone() for name, tensor in layer.state_dict().items()}
    layer.to(torch.bfloat16)
    assert layer.absmax_scale.dtype == torch.float32 and layer.absmax_offset.dtype == torch.float32
    assert torch.equal(layer.absmax_scale, before["absmax_scale"])
    assert torch.equal(layer.absmax_offset, before["absmax_offset"]) and layer.absmax_offset.dim() == 0
    assert layer.bias.dtype == torch.bfloat16  # the bias follows the cast, like nn.Linear's would
    plain = Linear4bit.from_linear(make_linear(), double_quant=False).half()
    assert plain.absmax.dtype == torch.float32
    moved = layer.to("cpu")  # device moves still work
    assert moved.packed.device.type == "cpu"


def test_compute_dtype_bf16():
    linear = make_linear()
    layer = Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16)
    x = torch.randn(3, 64)
    y = layer(x)
    assert y.dtype == torch.float32  # returned in the input's dtype
    expected = (x.bfloat16() @ layer.dequantize_weight(torch.bfloat16).t() + linear.bias.bfloat16()).float()
    assert torch.equal(y, expected)


def test_from_bf16_linear_without_bias():
    linear = make_linear(bias=False, dtype=torch.bfloat16)
    layer = Linear4bit.from_linear(linear)
    assert layer.bias is None
    assert layer.dequantize_weight().dtype == torch.bfloat16
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    assert torch.equal(layer(x), x @ layer.dequantize_weight().t())


def test_from_linear_rejects_other_modules():
    with pytest.raises(ValueError, match="expects an nn.Linear"):
        Linear4bit.from_linear(nn.Embedding(10, 4))


def test_repr_names_the_settings():
    assert "block_size=64, double_quant=True" in repr(Linear4bit.from_linear(make_linear()))


def test_backward_under_bf16_autocast():
    """finetune.py trains QLoRA under bf16 autocast on GPUs: dy comes back in bf16 while W is float32."""
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(64, 32))
    x = torch.randn(4, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    expected = torch.ones(4, 32) @ layer.dequantize_weight(torch.float32)  # dy = 1 -> dx = 1 · W
    assert torch.allclose(x.grad, expected, rtol=1e-2, atol=1e-2)  # bf16 matmul in backward


def test_block_sizes_are_validated_and_normalised():
    numpy = pytest.importorskip("numpy")
    for bad in (0, -1, 48, True, 64.0):
        with pytest.raises(ValueError, match="block_size must be one of"):
            Linear4bit(64, 24, block_size=bad)
        with pytest.raises(ValueError, match="block_size must be one of"):
            Linear4bit.from_linear(make_linear(), block_size=bad)
        with pytest.raises(ValueError, match="dq_block_size must be one of"):
            Linear4bit(64, 24, dq_block_size=bad)
    layer = Linear4bit.from_linear(make_linear(), block_size=numpy.int64(32))
    fresh = Linear4bit(64, 24, block_size=numpy.int64(32), dq_block_size=numpy.int64(256))
    assert type(layer.block_size) is int and type(fresh.block_size) is int and type(fresh.dq_block_size) is int
    reference = Linear4bit.from_linear(make_linear(), block_size=32)
    assert torch.equal(layer.dequantize_weight(), reference.dequantize_weight())
