"""Linear4bit: the frozen NF4 base layer of QLoRA."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from quant import Linear4bit, quantize_nf4

torch.manual_seed(0)


def make_linear(in_features=64, out_features=24, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)


def test_dequantize_weight_equals_nf4_round_trip():
    linear = make_linear()
    layer = Linear4bit.from_linear(linear)
    expected = quantize_nf4(linear.weight.detach()).dequantize()  # [out, in]
    assert layer.dequantize_weight().shape == (24, 64)
    assert torch.equal(layer.dequantize_weight(), expected)
    assert torch.equal(layer.dequantize_weight(torch.bfloat16), quantize_nf4(linear.weight.detach()).dequantize(torch.bfloat16))
    assert torch.equal(layer.quantized_weight.dequantize(), expected)


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_saves_quantized_form_and_loads_bit_identical(tmp_path, double_quant):
    layer = Linear4bit.from_linear(make_linear(in_features=40, out_features=30), double_quant=double_quant)
    state = layer.state_dict()
    expected_keys = {"bias", "packed"} | ({"absmax_q", "absmax_scale", "absmax_offset"} if double_quant else {"absmax"})
    assert set(state) == expected_keys | {"_extra_state"}  # + the settings, as uint8 JSON (get_extra_state)
    assert state["_extra_state"].dtype == torch.uint8
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


def test_the_plain_path_undoes_double_quantization_once_per_forward_and_backward(monkeypatch):
    # forward rebuilds the float32 block scales and saves them; backward reuses them (quant/linear4bit.py)
    import quant.linear4bit
    import quant.nf4

    layer = Linear4bit.from_linear(make_linear())  # double quantization on, the default
    calls = []
    for module in (quant.linear4bit, quant.nf4):
        real = module.dequantize_absmax
        monkeypatch.setattr(module, "dequantize_absmax", lambda *args, real=real: calls.append(1) or real(*args))
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).sum().backward()
    assert len(calls) == 1 and x.grad is not None


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
    # the bias is added in the matmul's epilogue (F.linear), as bitsandbytes' MatMul4Bit adds it
    expected = F.linear(x.bfloat16(), layer.dequantize_weight(torch.bfloat16), linear.bias.bfloat16()).float()
    assert torch.equal(y, expected)


def test_from_bf16_linear_without_bias():
    linear = make_linear(bias=False, dtype=torch.bfloat16)
    layer = Linear4bit.from_linear(linear)
    assert layer.bias is None
    assert layer.dequantize_weight().dtype == torch.bfloat16
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    assert torch.equal(layer(x), x @ layer.dequantize_weight().t())


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


def test_from_linear_rejects_other_modules():
    with pytest.raises(ValueError, match="expects an nn.Linear"):
        Linear4bit.from_linear(nn.Embedding(10, 4))


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


# ----------------------------------------------------------------------------------------------------
# state_dict metadata (_extra_state)
# ----------------------------------------------------------------------------------------------------

def saved_metadata(layer):
    return json.loads(bytes(layer.state_dict()["_extra_state"].tolist()))


def test_extra_state_holds_the_settings():
    layer = Linear4bit.from_linear(make_linear(dtype=torch.bfloat16), block_size=32, double_quant=False)
    assert saved_metadata(layer) == {"format_version": 1, "in_features": 64, "out_features": 24, "bias": True,
                                     "block_size": 32, "double_quant": False, "dq_block_size": 256,
                                     "weight_dtype": "bfloat16"}


@pytest.mark.parametrize("saved_settings, built_settings, message", [
    (dict(block_size=32), dict(), r"saved from a Linear4bit with block_size=32, but this layer was built with "
                                  r"block_size=64; build it with block_size=32"),
    (dict(double_quant=False), dict(), r"with double_quant=False, but .* built with double_quant=True"),
    (dict(dtype=torch.bfloat16), dict(),
     r"with weight_dtype=torch.bfloat16, but .* built with weight_dtype=torch.float32"),
    (dict(block_size=128, dtype=torch.float16), dict(block_size=32),
     r"with block_size=128, weight_dtype=torch.float16, but .* built with block_size=32, weight_dtype=torch.float32"),
    (dict(), dict(out_features=23), r"with out_features=24, but .* built with out_features=23"),
])
def test_loading_into_a_layer_built_otherwise_names_the_field(saved_settings, built_settings, message):
    dtype = saved_settings.pop("dtype", torch.float32)
    saved = Linear4bit.from_linear(make_linear(dtype=dtype), **saved_settings)
    fresh = Linear4bit(64, built_settings.pop("out_features", 24), **built_settings)
    before = {name: tensor.clone() for name, tensor in fresh.state_dict().items()}
    with pytest.raises(RuntimeError, match=message):
        fresh.load_state_dict(saved.state_dict())
    with pytest.raises(RuntimeError, match=message):
        fresh.load_state_dict(saved.state_dict(), strict=False)  # like a shape mismatch: never ignored
    # checked before anything is copied: the layer is untouched (a bf16 bias is not silently cast)
    assert all(torch.equal(tensor, before[name]) for name, tensor in fresh.state_dict().items())
    with pytest.raises(ValueError, match=message):
        fresh.set_extra_state(saved.get_extra_state())


def test_a_layer_built_with_the_saved_settings_loads_bf16_bit_identical():
    saved = Linear4bit.from_linear(make_linear(dtype=torch.bfloat16), block_size=128)
    fresh = Linear4bit(64, 24, block_size=128, weight_dtype=torch.bfloat16)
    fresh.load_state_dict(saved.state_dict())
    assert fresh.bias.dtype == torch.bfloat16 and torch.equal(fresh.bias, saved.bias)
    assert fresh.dequantize_weight().dtype == torch.bfloat16
    assert torch.equal(fresh.dequantize_weight(), saved.dequantize_weight())
    fresh.set_extra_state(saved.get_extra_state())  # matching metadata: accepted


def test_state_dicts_saved_before_the_metadata_still_load_strictly():
    saved = Linear4bit.from_linear(make_linear(), block_size=32)
    old_state = {name: tensor for name, tensor in saved.state_dict().items() if name != "_extra_state"}
    fresh = Linear4bit(64, 24, block_size=32)
    result = fresh.load_state_dict(old_state)  # strict=True would report "Missing key(s): _extra_state"
    assert result.missing_keys == [] and result.unexpected_keys == []
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), saved(x))
    # without metadata a wrong block size is only a shape mismatch; the message adds what to check
    with pytest.raises(RuntimeError, match=r"(?s)size mismatch for absmax_q.*has no Linear4bit metadata"):
        Linear4bit(64, 24).load_state_dict(old_state)


def test_metadata_errors_name_the_layer_in_a_model(tmp_path):
    from quant import quantize_model

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))

    saved = model()
    quantize_model(saved, block_size=32)
    torch.save(saved.state_dict(), tmp_path / "model.pt")
    state = torch.load(tmp_path / "model.pt", weights_only=True)  # the metadata loads as a plain tensor
    same = model()
    quantize_model(same, block_size=32)
    same.load_state_dict(state)
    assert torch.equal(same(torch.ones(1, 64)), saved(torch.ones(1, 64)))
    other = model()
    quantize_model(other)
    with pytest.raises(RuntimeError, match=r"(?s)\t0: the state_dict .* block_size=32.*\t2: the state_dict"):
        other.load_state_dict(state)


def test_corrupt_or_newer_metadata_is_refused_clearly():
    layer = Linear4bit.from_linear(make_linear())
    state = layer.state_dict()
    with pytest.raises(RuntimeError, match="is not Linear4bit metadata"):
        Linear4bit(64, 24).load_state_dict({**state, "_extra_state": torch.zeros(3)})
    newer = torch.tensor(list(json.dumps({**saved_metadata(layer), "format_version": 2}).encode()),
                         dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="format 2, newer than this code reads"):
        Linear4bit(64, 24).load_state_dict({**state, "_extra_state": newer})


def test_a_bias_set_to_train_gets_its_gradient():
    linear = make_linear()
    layer = Linear4bit.from_linear(linear)
    layer.bias.requires_grad_(True)  # frozen by default; bias="all"-style training turns it on
    x = torch.randn(2, 5, 64, requires_grad=True)
    grad_y = torch.randn(2, 5, linear.out_features)
    layer(x).backward(grad_y)
    torch.testing.assert_close(layer.bias.grad, grad_y.sum((0, 1)))
    torch.testing.assert_close(x.grad, grad_y @ layer.dequantize_weight())
