"""LoRALinear's two DoRA paths compute one function; the split files keep every old import working.

lora/dora.py has the formula as one plain code path (`dora_forward_plain`) and, after it, the fused
path forward runs when no dropout is active (`dora_forward_fused`: "the same numbers, faster"). These
tests hold the fused path to the plain one: outputs and gradients, over several shapes, with and without
bias, in float32 and bfloat16, with several stacked adapters, in training and in (cached) eval. With
dropout in training forward runs the plain path itself, so there it is bitwise equal under one seed.

Tolerances: the fused path orders the sums differently ((m/n) ⊙ result + [...] instead of
result + (m/n - 1)(result - b) + ...), so it agrees to rounding, not bitwise: float32 within
rtol = atol = 1e-5; bfloat16 (8 significant bits, one rounding is 2^-8 = 0.4%) within 3e-2 times the
largest entry of the tensor compared (outputs and gradients both go through several roundings).
"""

import inspect
import pathlib
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
from lora.dora import DoRACache, dora_forward_fused, dora_forward_plain
from lora.inits import gaussian_init, kaiming_init, olora_init, pissa_init
from lora.layer import LoRALinear

SHAPES = [(16, 12), (8, 32), (64, 48)]  # (in, out)
STACKS = [("dora",), ("lora", "dora"), ("dora", "dora", "lora")]  # adapter kinds, in active order


def stacked_layer(in_features, out_features, bias, dtype, kinds, dropout=0.0):
    """A LoRALinear with adapters a0, a1, ... of `kinds`, all active, B and m made non-trivial."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(in_features, out_features, bias=bias).to(dtype), adapter_name="a0", rank=4,
                       alpha=8, dropout=dropout, use_dora=kinds[0] == "dora")
    for index, kind in enumerate(kinds[1:], start=1):
        layer.add_adapter(f"a{index}", rank=2, alpha=3, dropout=dropout, use_dora=kind == "dora")
    layer.set_adapter([f"a{index}" for index in range(len(kinds))])
    with torch.no_grad():
        for lora_B in layer.lora_B.values():
            lora_B.normal_(0, 0.5)
        for magnitude in layer.lora_magnitude.values():
            magnitude.mul_(torch.linspace(0.5, 1.5, magnitude.numel(), dtype=dtype))  # m / n != 1
    return layer


def plain_forward(layer, x):
    """LoRALinear.forward with every DoRA adapter run through the plain path (the formula)."""
    result = layer.base_layer(x)  # W x + b   (..., out)
    for name in layer.active_adapters:
        if layer.use_dora[name]:
            result = dora_forward_plain(layer, name, x, result)
        else:
            lora_out = F.linear(F.linear(layer.lora_dropout[name](x), layer.lora_A[name]), layer.lora_B[name])
            result = torch.add(result, lora_out, alpha=layer.scaling[name])
    return result


def assert_close(actual, expected, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    else:
        scale = expected.abs().max().item()
        assert (actual.float() - expected.float()).abs().max().item() <= 3e-2 * scale


def outputs_and_grads(layer, x, forward):
    layer.zero_grad()
    y = forward(layer, x)
    y.float().square().sum().backward()
    return [y.detach()] + [p.grad for p in layer.parameters() if p.requires_grad]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kinds", STACKS)
def test_fused_path_equals_plain_path_in_training(shape, bias, dtype, kinds):
    layer = stacked_layer(*shape, bias, dtype, kinds).train()
    x = torch.randn(3, 5, shape[0], dtype=dtype)
    fused = outputs_and_grads(layer, x, LoRALinear.forward)  # no dropout: forward takes the fused path
    plain = outputs_and_grads(layer, x, plain_forward)
    assert len(fused) == len(plain) == 1 + 2 * len(kinds) + kinds.count("dora")  # y, A and B of each, every m
    for actual, expected in zip(fused, plain):
        assert_close(actual, expected, dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kinds", STACKS)
def test_cached_eval_path_equals_plain_path(shape, bias, dtype, kinds):
    layer = stacked_layer(*shape, bias, dtype, kinds).eval()
    x = torch.randn(4, shape[0], dtype=dtype)
    with torch.no_grad():
        first = layer(x)  # fills the DoRA cache
        assert set(layer.dora_cache.factors) == {f"a{i}" for i, kind in enumerate(kinds) if kind == "dora"}
        again = layer(x)  # from the cache
        plain = plain_forward(layer, x)
    assert torch.equal(first, again)
    assert_close(first, plain, dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kinds", STACKS)
def test_with_dropout_in_training_forward_is_the_plain_path_bitwise(shape, bias, dtype, kinds):
    layer = stacked_layer(*shape, bias, dtype, kinds, dropout=0.3).train()
    x = torch.randn(3, shape[0], dtype=dtype)
    torch.manual_seed(11)
    ours = outputs_and_grads(layer, x, LoRALinear.forward)
    torch.manual_seed(11)  # the same dropout masks
    plain = outputs_and_grads(layer, x, plain_forward)
    for actual, expected in zip(ours, plain):
        assert torch.equal(actual, expected)


def test_one_adapter_fused_equals_plain_directly():
    layer = stacked_layer(16, 12, True, torch.float32, ("dora",)).eval()
    x = torch.randn(6, 16)
    result = layer.base_layer(x)
    with torch.no_grad():
        fused = dora_forward_fused(layer, "a0", x, result)
        plain = dora_forward_plain(layer, "a0", x, result)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    W, b = layer.base_layer.weight, layer.base_layer.bias  # and both are eq. 5: (m / n) (W x + s B A x) + b
    A, B, m, s = layer.lora_A["a0"], layer.lora_B["a0"], layer.lora_magnitude["a0"], layer.scaling["a0"]
    adapted = W + s * B @ A
    expected = (m / torch.linalg.norm(adapted, dim=1)) * F.linear(x, adapted) + b
    torch.testing.assert_close(plain, expected.detach(), rtol=1e-5, atol=1e-5)


def test_lora_forward_is_the_formula():
    layer = stacked_layer(16, 12, True, torch.float32, ("lora", "lora"))
    x = torch.randn(5, 16)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    expected = F.linear(x, W, b) + sum(F.linear(x, layer.lora_delta(name)) for name in ("a0", "a1"))  # eq. 3
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_dora_cache_key_changes_with_any_change_and_clear_empties_it():
    layer = stacked_layer(16, 12, True, torch.float32, ("dora",)).eval()
    cache = layer.dora_cache
    key = DoRACache.key(layer, "a0")
    cache.put("norm", "a0", key, torch.ones(12))
    assert torch.equal(cache.get("norm", "a0", key), torch.ones(12))
    with torch.no_grad():
        layer.lora_A["a0"].mul_(2.0)  # in place: bumps the version counter
    assert DoRACache.key(layer, "a0") != key and cache.get("norm", "a0", DoRACache.key(layer, "a0")) is None
    layer.train()
    assert not cache.norms and not cache.factors
    assert layer._norm_cache is cache.norms and layer._factor_cache is cache.factors  # the old names


@pytest.mark.parametrize("init", [kaiming_init, gaussian_init])
def test_random_inits_start_as_a_no_op(init):
    lora_A, lora_B = init(rank=3, in_features=16, out_features=12)
    assert lora_A.shape == (3, 16) and lora_B.shape == (12, 3) and not lora_B.any() and lora_A.any()


def test_kaiming_init_is_nn_linear_init_of_a():
    torch.manual_seed(4)
    lora_A, _ = kaiming_init(rank=3, in_features=16, out_features=12)
    torch.manual_seed(4)
    assert torch.equal(lora_A, nn.Linear(16, 3, bias=False).weight.detach())  # fan-in = in, as A is [r, in]


@pytest.mark.parametrize("init", [pissa_init, olora_init])
def test_pissa_and_olora_residual_plus_update_is_w(init):
    torch.manual_seed(0)
    weight = torch.randn(12, 16)
    lora_A, lora_B, residual = init(weight, rank=3, scaling=2.0)
    assert lora_A.shape == (3, 16) and lora_B.shape == (12, 3)
    torch.testing.assert_close(residual + 2.0 * lora_B @ lora_A, weight, rtol=1e-5, atol=1e-5)


def test_old_imports_still_work():
    from lora.base_layer import base_weight, is_4bit_linear, is_linear_like
    from lora.bookkeeping import LoRALayerBase
    from lora import layer
    assert (layer.LoRALayerBase, layer.base_weight, layer.is_4bit_linear, layer.is_linear_like) == (
        LoRALayerBase, base_weight, is_4bit_linear, is_linear_like)
    assert lora.LoRALinear is layer.LoRALinear and lora.base_weight is base_weight
    assert issubclass(lora.LoRAEmbedding, LoRALayerBase)


def test_a_reader_meets_the_lora_forward_early():
    """Issue "Redesign for reading": the LoRA forward is within layer.py's first 100 lines."""
    _, first_line = inspect.getsourcelines(LoRALinear.forward)
    assert first_line < 100, f"LoRALinear.forward starts at line {first_line} of lora/layer.py"


ANCHORS = {"lora", "rslora", "initialisations", "dora", "several-adapters", "merging", "lora-on-embeddings",
           "lora-on-convolutions",
           "lora-plus", "combining-adapters", "adapter-files-and-peft-key-names", "qlora", "where-we-differ"}


def test_lora_files_cite_docs_reference_md_with_known_anchors():
    for path in sorted((pathlib.Path(lora.__file__).parent).glob("*.py")):
        text = path.read_text()
        assert "REFERENCE" + ".md" not in text and "../" + "shared" not in text, path
        for anchor in re.findall(r"docs/reference\.md#([\w-]+)", text):
            assert anchor in ANCHORS, (path, anchor)
