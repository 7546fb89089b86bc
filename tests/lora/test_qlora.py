"""QLoRA: LoRA (and DoRA) adapters on a frozen NF4 base (QLoRA, Dettmers et al. 2023, eq. 5).

    y = x · doubleDequant(W_NF4)ᵀ + b + s · B(A x)        W frozen in 4 bits, A and B train

Merging into a 4-bit base is dequantize + add (exact in full precision); re-quantizing the merged
weight is optional and not exact (docs/reference.md#qlora): `test_requantized_merge_error` measures
and reports what it adds.
"""

import pytest
import torch
import torch.nn.functional as F
import torch.nn as nn

import lora
from quant import Linear4bit, NF4_CODE, dequantize_model, quantize_model, quantize_nf4, unpack_nibbles
from tests.tiny_models import TinyModel

RANK, ALPHA = 4, 8
SCALING = ALPHA / RANK


def qlora_model(seed=0, use_dora=False, compute_dtype=None, targets=("q_proj", "v_proj")):
    """A TinyModel with every Linear but lm_head in NF4, then LoRA on `targets`."""
    torch.manual_seed(seed)
    model = TinyModel()
    quantize_model(model, compute_dtype=compute_dtype)
    config = lora.LoRAConfig(r=RANK, alpha=ALPHA, target_modules=list(targets), use_dora=use_dora)
    returned = lora.apply_lora(model, config)
    return returned if isinstance(returned, nn.Module) else model


def adapter_parameters(model, kind):
    """{module path: tensor} of every lora_A / lora_B in the model (stored as a Parameter or a Linear)."""
    found = {}
    for name, parameter in model.named_parameters():
        for suffix in (f".{kind}", f".{kind}.weight", f".{kind}.default.weight", f".{kind}.default"):
            if name.endswith(suffix):
                found[name[: -len(suffix)]] = parameter
    return found


def randomize_lora_b(model, scale=0.05, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapter_parameters(model, "lora_B").values():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def four_bit_base(wrapper: nn.Module) -> Linear4bit:
    return next(module for module in wrapper.modules() if isinstance(module, Linear4bit))


def tokens(seed=0):
    return torch.randint(0, 20, (3, 6), generator=torch.Generator().manual_seed(seed))


def test_adapters_start_as_a_no_op_on_the_4bit_base():
    torch.manual_seed(0)
    plain = TinyModel()
    quantize_model(plain)
    model = qlora_model(seed=0)
    assert torch.equal(model(tokens()), plain(tokens()))  # B = 0: exactly the quantized model
    assert len(adapter_parameters(model, "lora_A")) == 4  # q_proj and v_proj in 2 blocks
    assert all(isinstance(four_bit_base(model.get_submodule(path)), Linear4bit)
               for path in adapter_parameters(model, "lora_A"))


def test_only_the_adapters_train_and_the_4bit_base_stays_bit_identical():
    model = qlora_model()
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and all("lora_" in name for name in trainable if name.startswith("blocks"))
    frozen_4bit = {name: tensor.clone() for name, tensor in model.state_dict().items()
                   if any(key in name for key in ("packed", "absmax"))}
    assert frozen_4bit
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    targets = tokens(seed=1)
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(tokens()).reshape(-1, 20), targets.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, tensor in model.state_dict().items():
        if name in frozen_4bit:
            assert torch.equal(tensor, frozen_4bit[name]), name
    assert all(not torch.equal(b, torch.zeros_like(b)) for b in adapter_parameters(model, "lora_B").values())


def test_forward_is_base_plus_scaled_lora_branch():
    model = qlora_model()
    randomize_lora_b(model)
    path = "blocks.0.q_proj"
    wrapper = model.get_submodule(path)
    base = four_bit_base(wrapper)
    lora_a = adapter_parameters(model, "lora_A")[path]  # [r, in]
    lora_b = adapter_parameters(model, "lora_B")[path]  # [out, r]
    x = torch.randn(5, 32)
    expected = base(x) + SCALING * (x @ lora_a.t()) @ lora_b.t()
    assert torch.allclose(wrapper(x), expected, atol=1e-6)


def test_4bit_base_in_bf16_compute_dtype_with_lora():
    model = qlora_model(compute_dtype=torch.bfloat16)
    randomize_lora_b(model)
    path = "blocks.0.v_proj"
    wrapper = model.get_submodule(path)
    base = four_bit_base(wrapper)
    lora_a = adapter_parameters(model, "lora_A")[path]
    lora_b = adapter_parameters(model, "lora_B")[path]
    x = torch.randn(5, 32)
    y = wrapper(x)
    assert y.dtype == torch.float32 and torch.all(torch.isfinite(y))
    base_out = base(x)  # the frozen 4-bit matmul ran in bfloat16
    assert torch.equal(base_out, F.linear(x.bfloat16(), base.dequantize_weight(torch.bfloat16),
                                          base.bias.bfloat16()).float())  # the bias in the matmul's epilogue
    branch_dtype = lora_a.dtype  # the LoRA branch runs in the adapters' dtype
    branch = SCALING * ((x.to(branch_dtype) @ lora_a.detach().t()) @ lora_b.detach().t())
    assert torch.allclose(y, base_out + branch.float(), atol=1e-2 if branch_dtype == torch.bfloat16 else 1e-6)
    y.sum().backward()
    assert lora_a.grad is not None and lora_b.grad is not None


def test_lora_branch_runs_in_the_compute_dtype():
    """docs/reference.md#qlora: on a bf16-compute 4-bit base, A and B are bf16 and the branch runs in bf16
    (PEFT's autocast_adapter_dtype would upcast them to float32: a deliberate difference, see lora/layer.py)."""
    model = qlora_model(compute_dtype=torch.bfloat16)
    for kind in ("lora_A", "lora_B"):
        assert {tensor.dtype for tensor in adapter_parameters(model, kind).values()} == {torch.bfloat16}
    randomize_lora_b(model)
    layer = model.blocks[0].q_proj
    x = torch.randn(3, 32)
    lora_a, lora_b = layer.lora_A["default"], layer.lora_B["default"]
    branch = x.to(torch.bfloat16) @ lora_a.T @ lora_b.T  # (3, r) then (3, out), all in bf16
    expected = layer.base_layer(x) + (branch * SCALING).to(torch.float32)
    assert torch.equal(layer(x), expected)
    assert {tensor.dtype for tensor in adapter_parameters(qlora_model(), "lora_A").values()} == {torch.float32}


def test_merge_and_unload_of_a_bf16_compute_base_is_full_precision():
    model = qlora_model(compute_dtype=torch.bfloat16)
    randomize_lora_b(model)
    paths = list(adapter_parameters(model, "lora_A"))
    expected = {}
    for path in paths:
        base = four_bit_base(model.get_submodule(path))
        lora_a = adapter_parameters(model, "lora_A")[path].detach()  # [r, in], bf16
        lora_b = adapter_parameters(model, "lora_B")[path].detach()  # [out, r], bf16
        assert lora_a.dtype == lora_b.dtype == torch.bfloat16
        # the update s·B@A is formed in the adapters' dtype (docs/reference.md#qlora), then added to the
        # float32 dequantized weight; s = 2 is a power of two, so where the scaling is applied is exact
        delta_float32 = SCALING * (lora_b.float() @ lora_a.float())  # [out, in]
        exact = base.dequantize_weight(torch.float32) + (SCALING * (lora_b @ lora_a)).float()  # [out, in]
        expected[path] = (exact, base.dequantize_weight(torch.float32) + delta_float32, delta_float32)
    merged = lora.merge_and_unload(model)
    layer = merged.blocks[0].q_proj
    assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32  # the weight's original dtype
    for path, (exact, in_float32, delta_float32) in expected.items():
        layer = merged.get_submodule(path)
        assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32
        assert torch.equal(layer.weight, exact), path
        # and against float32 math: no further than one bf16 rounding of the update (2^-8 relative)
        assert torch.all((layer.weight - in_float32).abs() <= 2 ** -8 * delta_float32.abs() + 1e-7), path


def expected_merged_weight(model, path):
    base = four_bit_base(model.get_submodule(path))
    lora_a = adapter_parameters(model, "lora_A")[path].detach()
    lora_b = adapter_parameters(model, "lora_B")[path].detach()
    return base.dequantize_weight(torch.float32) + SCALING * lora_b @ lora_a  # [out, in]


def test_merge_and_unload_gives_full_precision_linears():
    model = qlora_model()
    randomize_lora_b(model)
    expected = {path: expected_merged_weight(model, path) for path in adapter_parameters(model, "lora_A")}
    reference = model(tokens())
    k_proj_before = model.blocks[0].k_proj.dequantize_weight()  # a 4-bit layer without an adapter
    merged = lora.merge_and_unload(model)
    for path, weight in expected.items():
        layer = merged.get_submodule(path)
        assert type(layer) is nn.Linear, f"{path} is {type(layer).__name__}"
        assert torch.equal(layer.weight, weight), path  # dequantize + s·B@A, the same float32 ops: same bits
    assert torch.allclose(merged(tokens()), reference, atol=1e-5)
    assert not adapter_parameters(merged, "lora_A")
    # layers without adapters are dequantized too, bit for bit: one full-precision model comes back
    assert not [module for module in merged.modules() if isinstance(module, Linear4bit)]
    assert torch.equal(merged.blocks[0].k_proj.weight, k_proj_before)


def test_requantized_merge_error(record_property, capsys):
    model = qlora_model()
    randomize_lora_b(model)
    paths = list(adapter_parameters(model, "lora_A"))
    expected = {path: expected_merged_weight(model, path) for path in paths}
    reference = model(tokens())
    merged = lora.merge_and_unload(model, requantize=True)
    worst_weight_error = 0.0
    for path in paths:
        layer = merged.get_submodule(path)
        assert isinstance(layer, Linear4bit), f"{path} is {type(layer).__name__}"
        requantized = quantize_nf4(expected[path], block_size=layer.block_size, double_quant=layer.double_quant)
        # re-quantizing is deterministic: the same merged weight gives the same codes and scales
        assert torch.equal(layer.packed, requantized.packed) and torch.equal(layer.absmax_q, requantized.absmax_q)
        assert torch.equal(layer.dequantize_weight(), requantized.dequantize())
        # each element moves by at most half an NF4 step times its block's absmax (plus double-quant slack)
        error = (layer.dequantize_weight() - expected[path]).abs().reshape(-1)
        plain = quantize_nf4(expected[path], block_size=layer.block_size, double_quant=False)
        absmax = plain.absmax[torch.arange(error.numel()) // layer.block_size]
        codes = unpack_nibbles(plain.packed, error.numel()).long()
        gaps = NF4_CODE[1:] - NF4_CODE[:-1]
        half_step = 0.5 * torch.maximum(torch.cat([gaps[:1], gaps])[codes], torch.cat([gaps, gaps[-1:]])[codes])
        assert torch.all(error <= half_step * absmax * 1.01 + 1e-6)
        worst_weight_error = max(worst_weight_error, error.max().item())
    output_error = ((merged(tokens()) - reference).norm() / reference.norm()).item()
    assert 0 < output_error < 0.1
    record_property("requantize_max_weight_error", worst_weight_error)
    record_property("requantize_relative_output_error", output_error)
    with capsys.disabled():
        print(f"\n[QLoRA] re-quantizing the merged weights adds: max |dW| = {worst_weight_error:.3e}, "
              f"relative output error = {output_error:.3%}")


def test_dequantize_model_swaps_the_4bit_bases_under_the_adapters():
    model = qlora_model()
    randomize_lora_b(model)
    reference = model(tokens())
    bases = {path: four_bit_base(model.get_submodule(path)).dequantize_weight()
             for path in adapter_parameters(model, "lora_A")}
    dequantize_model(model)
    assert not any(isinstance(module, Linear4bit) for module in model.modules())
    for path, weight in bases.items():
        wrapper = model.get_submodule(path)
        assert type(wrapper.base_layer) is nn.Linear and torch.equal(wrapper.base_layer.weight, weight)
    assert len(adapter_parameters(model, "lora_A")) == 4  # the adapters stay
    assert torch.equal(model(tokens()), reference)  # float32: the same bits through the same ops


def test_dora_on_a_4bit_base():
    torch.manual_seed(0)
    plain = TinyModel()
    quantize_model(plain)
    model = qlora_model(seed=0, use_dora=True)
    assert torch.allclose(model(tokens()), plain(tokens()), atol=1e-6)  # DoRA starts as a no-op
    randomize_lora_b(model)
    reference = model(tokens())
    reference.sum().backward()
    merged = lora.merge_and_unload(model)
    assert torch.allclose(merged(tokens()), reference.detach(), atol=1e-5)


def test_minigpt_qlora_step():
    from minigpt import GPTConfig, MiniGPT

    torch.manual_seed(0)
    model = MiniGPT(GPTConfig(vocab_size=30))
    report = quantize_model(model)
    assert len(report.quantized) == 12
    config = lora.LoRAConfig(r=RANK, alpha=ALPHA, target_modules=["q_proj", "v_proj"], use_dora=False)
    returned = lora.apply_lora(model, config)
    model = returned if isinstance(returned, nn.Module) else model
    idx = torch.randint(0, 30, (2, 8))
    _, loss = model(idx, targets=idx)
    loss.backward()
    grads = adapter_parameters(model, "lora_A")
    assert len(grads) == 4 and all(parameter.grad is not None for parameter in grads.values())
    assert type(model.lm_head) is nn.Linear
