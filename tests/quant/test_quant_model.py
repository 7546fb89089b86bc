"""quantize_model and memory_report on small models."""

import pytest
import torch
import torch.nn as nn

from quant import Linear4bit, dequantize_model, memory_report, nf4_storage_bytes, quantize_model
from tests.tiny_models import TinyModel


def linear_paths(model, kind):
    return [path for path, module in model.named_modules() if type(module) is kind]


def test_sequential_all_linears_swapped_and_bytes_reported():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
    x = torch.randn(4, 64)
    reference = model(x)
    report = quantize_model(model)
    assert report.quantized == ("0", "2")
    assert linear_paths(model, Linear4bit) == ["0", "2"] and linear_paths(model, nn.Linear) == []
    # exact bookkeeping: fp32 weights replaced by their NF4 storage, biases unchanged
    weights_fp32 = 4 * (64 * 64 + 64 * 16)
    assert report.bytes_before == weights_fp32 + 4 * (64 + 16)
    assert report.bytes_after == report.bytes_before - weights_fp32 + nf4_storage_bytes(64 * 64) + nf4_storage_bytes(64 * 16)
    assert "quantized 2 Linear layers" in str(report)
    assert (model(x) - reference).norm() / reference.norm() < 0.15


def test_skip_lm_head_by_default_and_target_modules():
    model = TinyModel()
    report = quantize_model(model)
    assert "lm_head" not in report.quantized and type(model.lm_head) is nn.Linear
    assert len(report.quantized) == 8

    model = TinyModel()
    report = quantize_model(model, target_modules=["q_proj", "v_proj"])
    assert report.quantized == ("blocks.0.q_proj", "blocks.0.v_proj", "blocks.1.q_proj", "blocks.1.v_proj")
    assert type(model.blocks[0].k_proj) is nn.Linear

    model = TinyModel()
    report = quantize_model(model, skip=())
    assert "lm_head" in report.quantized


def test_full_path_targets_and_block_size_pass_through():
    model = TinyModel()
    report = quantize_model(model, target_modules=["blocks.1.o_proj"], block_size=32, double_quant=False)
    assert report.quantized == ("blocks.1.o_proj",)
    assert model.blocks[1].o_proj.block_size == 32 and model.blocks[1].o_proj.absmax is not None


def test_quantized_model_trains_the_rest():
    torch.manual_seed(0)
    model = TinyModel()
    quantize_model(model)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(torch.randint(0, 20, (2, 5))).square().mean()
    loss.backward()
    optimizer.step()
    assert model.tok_emb.weight.grad is not None  # gradients flow through the 4-bit layers
    for name, tensor in model.state_dict().items():
        if "blocks" in name:  # the frozen 4-bit layers (codes, scales, biases) are bit-identical
            assert torch.equal(tensor, before[name]), name
    assert not torch.equal(model.tok_emb.weight, before["tok_emb.weight"])


def test_unknown_target_names_the_layers_there_are():
    with pytest.raises(ValueError, match=r"'qproj' matches no nn.Linear.*\['k_proj', 'lm_head', 'o_proj', 'q_proj', 'v_proj'\]"):
        quantize_model(TinyModel(), target_modules=["qproj"])


def test_models_without_linears_and_a_bare_linear():
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_model(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)))
    with pytest.raises(ValueError, match="Linear4bit.from_linear"):
        quantize_model(nn.Linear(4, 4))


def test_memory_report_of_a_4096_weight():
    report = memory_report([(4096, 4096)])
    assert report.fp32_bytes == 4 * 4096 * 4096 and report.bf16_bytes == 2 * 4096 * 4096
    assert report.bits_per_parameter("fp32") == 32 and report.bits_per_parameter("bf16") == 16
    assert report.bits_per_parameter("nf4") == 4.5
    assert round(report.bits_per_parameter("nf4_dq"), 3) == 4.127
    assert "NF4 + double quant" in str(report) and "4.127" in str(report)
    with pytest.raises(ValueError, match="valid formats"):
        report.bits_per_parameter("int8")


def test_memory_report_predicts_quantize_model():
    model = TinyModel()
    predicted = memory_report(model)
    assert predicted.num_quantized_params == 8 * 32 * 32  # lm_head skipped, like quantize_model
    assert predicted.num_other_params == 20 * 32 + 8 * 32 + 32 * 20  # embedding, biases, lm_head
    report = quantize_model(model)
    assert report.bytes_before - report.bytes_after == predicted.fp32_bytes - predicted.nf4_dq_bytes
    assert memory_report(model) == predicted  # a quantized model reports the same figures


def test_minigpt_quantizes_and_runs():
    from minigpt import GPTConfig, MiniGPT

    torch.manual_seed(0)
    model = MiniGPT(GPTConfig(vocab_size=50))
    idx = torch.randint(0, 50, (2, 8))
    reference, _ = model(idx)
    report = quantize_model(model)
    leaves = {path.rsplit(".", 1)[-1] for path in report.quantized}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}
    assert type(model.lm_head) is nn.Linear
    logits, loss = model(idx, targets=idx)
    assert logits.shape == reference.shape
    assert (logits - reference).norm() / reference.norm() < 0.1
    loss.backward()
    assert model.tok_emb.weight.grad is not None


def test_memory_report_applies_target_modules_to_linear4bit_layers_too():
    model = TinyModel()
    before = memory_report(model, target_modules=["k_proj"])
    assert before.num_quantized_params == 2 * 32 * 32  # the two k_proj layers
    quantize_model(model, target_modules=["k_proj", "v_proj"])  # partly quantized: k_proj, v_proj 4-bit
    after = memory_report(model, target_modules=["k_proj"])
    assert after.num_quantized_params == 2 * 32 * 32  # was 4 * 32 * 32: every Linear4bit counted
    assert after.nf4_dq_bytes == before.nf4_dq_bytes == 2 * nf4_storage_bytes(32 * 32)
    assert memory_report(model, target_modules=["q_proj", "k_proj"]).num_quantized_params == 4 * 32 * 32
    assert memory_report(model).num_quantized_params == 8 * 32 * 32  # lm_head still skipped
    with pytest.raises(ValueError, match=r"'kproj' matches no nn.Linear \(or Linear4bit\)"):
        memory_report(model, target_modules=["kproj"])


def test_targets_that_are_already_4bit_are_left_alone_and_reported():
    model = TinyModel()
    quantize_model(model, target_modules=["k_proj"], block_size=32)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    report = quantize_model(model, target_modules=["k_proj"])  # used to raise "matches no nn.Linear"
    assert report.quantized == () and report.already_quantized == ("blocks.0.k_proj", "blocks.1.k_proj")
    assert report.bytes_before == report.bytes_after
    assert "2 targeted layers were already Linear4bit and were left as they were" in str(report)
    assert model.blocks[0].k_proj.block_size == 32  # not re-quantized with the new block size
    assert all(torch.equal(tensor, state[name]) for name, tensor in model.state_dict().items())
    # a mixed target list quantizes the rest; a second full pass is a no-op
    report = quantize_model(model, target_modules=["k_proj", "q_proj"])
    assert report.quantized == ("blocks.0.q_proj", "blocks.1.q_proj") and len(report.already_quantized) == 2
    quantize_model(model)
    again = quantize_model(model)
    assert again.quantized == () and len(again.already_quantized) == 8 and type(model.lm_head) is nn.Linear
    # a fully quantized model (lm_head too) is no longer "a model without Linear layers"
    quantize_model(model, skip=())
    assert quantize_model(model, skip=()).already_quantized[-1] == "lm_head"
    assert "already" not in str(quantize_model(TinyModel()))  # the note only when it applies


# ----------------------------------------------------------------------------------------------------
# dequantize_model
# ----------------------------------------------------------------------------------------------------

def test_dequantize_model_gives_linears_with_the_exact_4bit_weights_and_outputs():
    torch.manual_seed(0)
    model = TinyModel()
    quantize_model(model)
    idx = torch.randint(0, 20, (3, 7))
    four_bit_output = model(idx)
    four_bit = {path: (module.dequantize_weight(), module.bias.detach().clone())
                for path, module in model.named_modules() if isinstance(module, Linear4bit)}
    assert dequantize_model(model) is model  # in place, returned for chaining
    assert linear_paths(model, Linear4bit) == []
    for path, (weight, bias) in four_bit.items():
        layer = model.get_submodule(path)
        assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32
        assert torch.equal(layer.weight, weight) and torch.equal(layer.bias, bias)  # bit-identical
        assert not layer.weight.requires_grad and not layer.bias.requires_grad  # frozen, as the 4-bit layer
    assert torch.equal(model(idx), four_bit_output)  # float32: the same matmuls on the same bits
    assert dequantize_model(model) is model and torch.equal(model(idx), four_bit_output)  # a repeat is a no-op


def test_dequantize_model_keeps_the_original_weight_dtype_and_missing_biases():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32, bias=False), nn.ReLU(), nn.Linear(32, 8)).to(torch.bfloat16)
    quantize_model(model)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    first_4bit, four_bit_output = model[0](x), model(x)
    weights = [model[0].dequantize_weight(), model[2].dequantize_weight()]
    dequantize_model(model)
    assert model[0].bias is None and model[2].weight.dtype == model[2].bias.dtype == torch.bfloat16
    assert torch.equal(model[0].weight, weights[0]) and torch.equal(model[2].weight, weights[1])
    assert torch.equal(model[0](x), first_4bit)  # no bias: the same bf16 matmul
    # with a bias, nn.Linear adds it inside one bf16 addmm, Linear4bit after rounding the matmul to bf16:
    # the outputs may differ by one bf16 rounding (2^-8 relative) on these unit-scale values
    assert torch.allclose(model(x).float(), four_bit_output.float(), rtol=2 ** -7, atol=2 ** -7)


def test_dequantize_then_quantize_gives_back_the_same_codes():
    torch.manual_seed(0)
    model = TinyModel()
    quantize_model(model, double_quant=False, block_size=32)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    quantize_model(dequantize_model(model), double_quant=False, block_size=32)
    # NF4 values re-quantize to themselves: each block's absmax is its own +-1.0 code, the rest sit on codes
    assert all(torch.equal(tensor, state[name]) for name, tensor in model.state_dict().items())


def test_dequantize_model_refuses_a_bare_linear4bit_and_ignores_plain_models():
    with pytest.raises(ValueError, match="dequantize_weight"):
        dequantize_model(Linear4bit.from_linear(nn.Linear(64, 8)))
    plain = TinyModel()
    state = {name: tensor.clone() for name, tensor in plain.state_dict().items()}
    assert dequantize_model(plain) is plain
    assert all(torch.equal(tensor, state[name]) for name, tensor in plain.state_dict().items())
