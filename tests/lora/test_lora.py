"""LoRA / DoRA layer and model API: exact oracles first (docs/reference.md), then whole-tensor comparisons.

Tolerances: fp32 on unit-scale inputs, merged vs unmerged and formula vs layer agree to 1e-5 (docs/reference.md#merging).
"""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
from lora import LoRAConfig, LoRALinear

ATOL = 1e-5


class TinyAttention(nn.Module):
    """Attention-shaped module with MiniGPT's leaf names, to show apply_lora is not MiniGPT-specific."""

    def __init__(self, dim=16):
        super().__init__()
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x):  # x (B, T, C)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        attention = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)  # (B, T, T)
        return self.o_proj(attention @ v)


class TinyLM(nn.Module):
    """Embedding + two attention blocks + lm_head."""

    def __init__(self, vocab=12, dim=16):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([TinyAttention(dim) for _ in range(2)])
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):  # idx (B, T)
        x = self.tok_emb(idx)
        for block in self.blocks:
            x = x + block(x)
        return self.lm_head(x)  # (B, T, vocab)


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    return TinyLM()


def tokens(seed=0):
    return torch.randint(0, 12, (2, 5), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model, seed=1, scale=0.3):
    """Give every B (and embedding A) non-zero values so that the adapters do something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            for container in (layer.lora_A, layer.lora_B):
                for parameter in container.values():
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def lora_linear(use_dora=False, use_rslora=False, rank=4, alpha=8, dropout=0.0, init="kaiming", seed=0):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(16, 12), rank=rank, alpha=alpha, dropout=dropout, use_dora=use_dora,
                       use_rslora=use_rslora, init=init)
    return layer


# ----- exact oracles ------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_dora", [False, True])
def test_fresh_adapter_is_bit_for_bit_the_base(use_dora):
    model = tiny_lm()
    reference = model(tokens())
    lora.apply_lora(model, LoRAConfig(r=4, target_modules="all-linear", use_dora=use_dora))
    # DoRA too: m and n are the same norm of the same W, so m / n is exactly 1 and the output is the base's
    assert torch.equal(model(tokens()), reference)


def test_linear_layer_formula_and_shapes():
    layer = lora_linear(rank=4, alpha=8)
    assert layer.lora_A["default"].shape == (4, 16) and layer.lora_B["default"].shape == (12, 4)
    assert torch.count_nonzero(layer.lora_B["default"]) == 0
    bound = 1 / math.sqrt(16)  # kaiming_uniform_(a=sqrt(5)) on [r, in] = U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A["default"].abs().max() <= bound
    randomize_adapters(layer)
    x = torch.randn(3, 16)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    expected = layer.base_layer(x) + (8 / 4) * (x @ A.t()) @ B.t()
    assert torch.allclose(layer(x), expected, atol=ATOL)


def test_rslora_scaling():
    assert lora_linear(rank=4, alpha=8, use_rslora=True).scaling["default"] == 8 / math.sqrt(4)
    assert lora_linear(rank=4, alpha=8).scaling["default"] == 2.0


def test_gaussian_init():
    layer = lora_linear(rank=4, init="gaussian")
    assert torch.count_nonzero(layer.lora_B["default"]) == 0
    assert 0.1 < layer.lora_A["default"].std().item() < 0.5  # N(0, (1/r)^2), std 0.25


@pytest.mark.parametrize("use_dora,use_rslora", [(False, False), (False, True), (True, False), (True, True)])
def test_merged_equals_unmerged_and_unmerge_restores_w(use_dora, use_rslora):
    layer = lora_linear(use_dora=use_dora, use_rslora=use_rslora)
    randomize_adapters(layer)
    if use_dora:
        with torch.no_grad():
            layer.lora_magnitude["default"].mul_(torch.linspace(0.5, 1.5, 12))
    original = layer.base_layer.weight.detach().clone()
    x = torch.randn(5, 16)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged_adapters == ["default"]
    assert torch.allclose(layer(x), unmerged, atol=ATOL)
    assert torch.allclose(F.linear(x, layer.base_layer.weight, layer.base_layer.bias), unmerged, atol=ATOL)
    layer.merge()  # repeat-safe
    assert torch.allclose(layer(x), unmerged, atol=ATOL)
    with pytest.raises(ValueError, match="already merged"):
        layer.merge(["default"])
    layer.unmerge()
    layer.unmerge()  # repeat-safe
    assert torch.allclose(layer.base_layer.weight, original, atol=1e-6)
    assert torch.allclose(layer(x), unmerged, atol=ATOL)


@pytest.mark.parametrize("targets,use_dora", [(["q_proj", "v_proj", "tok_emb"], False), (["q_proj", "v_proj"], True)])
def test_one_optimizer_step_changes_only_adapters(targets, use_dora):
    model = tiny_lm()
    lora.apply_lora(model, LoRAConfig(r=4, target_modules=targets, use_dora=use_dora))
    randomize_adapters(model)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(tokens()).square().mean().backward()
    optimizer.step()
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}
    adapter_names = {name for name in before if ".lora_" in name}
    assert changed and changed <= adapter_names
    assert any("lora_magnitude" in name for name in changed) == use_dora
    assert {name.rsplit(".lora_", 1)[0] for name in changed} == {name for name, _ in lora.lora_layers(model)}


def dora_by_hand(x, weight, bias, lora_A, lora_B, magnitude, scaling):
    """DoRA eq. 5 with the norm detached (section 4.3): y = (m / n) (W + sBA) x + b."""
    adapted = weight + scaling * lora_B @ lora_A  # [out, in]
    norm = torch.linalg.norm(adapted, dim=1).detach()  # [out]
    return (magnitude / norm) * F.linear(x, adapted) + bias


@pytest.mark.parametrize("training", [True, False])
def test_dora_forward_and_gradients_match_the_paper_formula(training):
    layer = lora_linear(use_dora=True)
    randomize_adapters(layer)
    with torch.no_grad():
        layer.lora_magnitude["default"].mul_(torch.linspace(0.5, 1.5, 12))
    layer.train(training)
    x = torch.randn(5, 16, requires_grad=True)
    parameters = [layer.lora_A["default"], layer.lora_B["default"], layer.lora_magnitude["default"]]
    copies = [p.detach().clone().requires_grad_(True) for p in parameters]
    x_copy = x.detach().clone().requires_grad_(True)
    grad_output = torch.randn(5, 12)
    y = layer(x)
    y.backward(grad_output)
    expected = dora_by_hand(x_copy, layer.base_layer.weight, layer.base_layer.bias, copies[0], copies[1], copies[2],
                            layer.scaling["default"])
    expected.backward(grad_output)
    assert torch.allclose(y, expected, atol=ATOL)
    for parameter, copy in zip(parameters + [x], copies + [x_copy]):
        assert torch.allclose(parameter.grad, copy.grad, atol=ATOL)


def test_dora_with_dropout_uses_one_mask():
    layer = lora_linear(use_dora=True, dropout=0.5)
    randomize_adapters(layer)
    with torch.no_grad():
        layer.lora_magnitude["default"].mul_(1.3)
    layer.train()
    x = torch.randn(6, 16)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    x_dropped = layer.lora_dropout["default"](x)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B, m, s = layer.lora_A["default"], layer.lora_B["default"], layer.lora_magnitude["default"], layer.scaling["default"]
    ratio = m / torch.linalg.norm(W + s * B @ A, dim=1)
    expected = F.linear(x, W, b) + (ratio - 1) * F.linear(x_dropped, W) + ratio * s * F.linear(x_dropped, B @ A)
    assert torch.allclose(y, expected, atol=ATOL)


def test_dora_eval_norm_is_cached_and_invalidated():
    layer = lora_linear(use_dora=True)
    randomize_adapters(layer)
    layer.eval()
    x = torch.randn(3, 16)

    def by_hand():
        return dora_by_hand(x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A["default"],
                            layer.lora_B["default"], layer.lora_magnitude["default"], layer.scaling["default"])

    with torch.no_grad():
        first = layer(x)
        assert "default" in layer._norm_cache and "default" in layer._factor_cache
        assert torch.allclose(layer(x), first) and torch.allclose(first, by_hand(), atol=ATOL)
        layer.lora_B["default"].mul_(2.0)  # an in-place change (like an optimizer step) bumps the version
        assert torch.allclose(layer(x), by_hand(), atol=ATOL) and not torch.allclose(first, by_hand(), atol=1e-3)
        layer.lora_magnitude["default"].mul_(0.5)
        assert torch.allclose(layer(x), by_hand(), atol=ATOL)
        layer.base_layer.weight.add_(0.1)
        assert torch.allclose(layer(x), by_hand(), atol=ATOL)
        layer.set_scale("default", 0.5)
        assert torch.allclose(layer(x), by_hand(), atol=ATOL)
    layer.eval()  # eval() again keeps the cache; train() drops it
    assert layer._norm_cache
    layer.train()
    assert not layer._norm_cache and not layer._factor_cache


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_residual_plus_update_is_w(init):
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    original = base.weight.detach().clone()
    x = torch.randn(4, 16)
    reference = base(x)
    layer = LoRALinear(base, rank=4, alpha=8, init=init)
    residual = layer.base_layer.weight
    assert not torch.allclose(residual, original, atol=1e-3)  # the base now holds the residual
    assert torch.allclose(residual + layer.lora_delta("default"), original, atol=ATOL)
    assert torch.allclose(layer(x), reference, atol=ATOL)


def test_pissa_factors_are_the_top_singular_directions():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    U, S, Vh = torch.linalg.svd(base.weight.detach(), full_matrices=False)
    layer = LoRALinear(base, rank=3, alpha=6, init="pissa")  # s = 2
    assert torch.allclose(layer.lora_delta("default"), (U[:, :3] * S[:3]) @ Vh[:3], atol=ATOL)
    assert torch.allclose(torch.linalg.svdvals(layer.base_layer.weight.detach())[:9], S[3:], atol=1e-4)


def test_embedding_lora():
    torch.manual_seed(0)
    layer = lora.LoRAEmbedding(nn.Embedding(12, 8), rank=2, alpha=4)
    idx = torch.tensor([[0, 3, 11]])
    assert torch.equal(layer(idx), layer.base_layer(idx))  # A = 0
    assert layer.lora_A["default"].shape == (2, 12) and layer.lora_B["default"].shape == (8, 2)
    randomize_adapters(layer)
    table = layer.base_layer.weight + 2.0 * (layer.lora_B["default"] @ layer.lora_A["default"]).t()  # [vocab, dim]
    assert torch.allclose(layer(idx), table[idx], atol=ATOL)
    expected = layer(idx)
    layer.merge()
    assert torch.allclose(layer(idx), expected, atol=ATOL)
    layer.unmerge()
    assert torch.allclose(layer(idx), expected, atol=ATOL)


# ----- model-level API ------------------------------------------------------------------------------------
def test_apply_lora_on_sequential_and_trainable_line(capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    returned = lora.apply_lora(model, LoRAConfig(r=4, target_modules=["0", "2"]))
    assert returned is model and isinstance(model[0], LoRALinear) and isinstance(model[2], LoRALinear)
    lora.print_trainable_parameters(model)
    # A, B: 4*16 + 32*4 + 4*32 + 4*4 = 336; base: 16*32+32 + 32*4+4 = 676
    assert capsys.readouterr().out == "trainable params: 336 || all params: 1,012 || trainable%: 33.2016\n"


def test_target_matching_rules():
    def names(config):
        return lora.find_targets(tiny_lm(), config)

    assert names(LoRAConfig(target_modules=["q_proj"])) == ["blocks.0.q_proj", "blocks.1.q_proj"]
    assert names(LoRAConfig(target_modules=["1.v_proj"])) == ["blocks.1.v_proj"]
    assert names(LoRAConfig(r=4, target_modules=r"blocks\.0\.[qk]_proj")) == ["blocks.0.q_proj", "blocks.0.k_proj"]
    all_linear = names(LoRAConfig(target_modules="all-linear"))
    assert len(all_linear) == 8 and "lm_head" not in all_linear and "tok_emb" not in all_linear


def test_regex_must_match_the_whole_name():
    with pytest.raises(ValueError, match="matched no module"):
        lora.find_targets(tiny_lm(), LoRAConfig(target_modules="q_proj"))


def test_no_match_lists_modules_and_suggests():
    with pytest.raises(ValueError) as error:
        lora.apply_lora(tiny_lm(), LoRAConfig(target_modules=["q_prj"]))
    message = str(error.value)
    assert "blocks.0.q_proj" in message and "'q_prj' -> 'q_proj'" in message


@pytest.mark.parametrize("kwargs,match", [(dict(r=0), "r must be a positive integer"),
                                          (dict(alpha=0), "alpha must be a positive"),
                                          (dict(alpha=-1.0), "alpha must be a positive"),
                                          (dict(init="xavier"), "init must be one of"),
                                          (dict(dropout=1.0), "dropout")])
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**kwargs)


def test_rank_larger_than_layer_is_refused_before_touching_the_model():
    model = tiny_lm()
    with pytest.raises(ValueError, match="r=13 .* larger than min"):
        lora.apply_lora(model, LoRAConfig(r=13, target_modules=["q_proj", "lm_head"]))
    assert not list(lora.lora_layers(model))
    lora.apply_lora(model, LoRAConfig(r=13, target_modules=["q_proj", "lm_head"], rank_pattern={"lm_head": 4}))
    assert model.lm_head.rank["default"] == 4 and model.blocks[0].q_proj.rank["default"] == 13


def test_container_target_is_refused():
    with pytest.raises(ValueError, match="TinyAttention"):
        lora.apply_lora(tiny_lm(), LoRAConfig(target_modules=["blocks.0"]))


def test_freezing_and_modules_to_save():
    model = tiny_lm()
    lora.apply_lora(model, LoRAConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    # lm_head trains as the adapter's own copy (PEFT's name for it); the original lm_head stays frozen
    assert trainable == {"blocks.0.q_proj.lora_A.default", "blocks.0.q_proj.lora_B.default",
                         "blocks.1.q_proj.lora_A.default", "blocks.1.q_proj.lora_B.default",
                         "lm_head.modules_to_save.default.weight"}
    assert not model.lm_head.original_module.weight.requires_grad


def test_model_merge_unmerge_merge_and_unload_unload():
    model = tiny_lm()
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    lora.apply_lora(model, LoRAConfig(r=4, target_modules="all-linear", use_dora=True))
    randomize_adapters(model)
    expected = model(tokens())
    lora.merge(model)
    lora.merge(model)  # repeat-safe
    assert torch.allclose(model(tokens()), expected, atol=ATOL)
    lora.unmerge(model)
    lora.unmerge(model)
    assert torch.allclose(model(tokens()), expected, atol=ATOL)
    merged = lora.merge_and_unload(model)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert all(type(module) in (nn.Linear, nn.Embedding, nn.ModuleList, TinyAttention, TinyLM)
               for module in merged.modules())
    assert torch.allclose(merged(tokens()), expected, atol=ATOL)
    model = tiny_lm()
    lora.apply_lora(model, LoRAConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model)
    lora.merge(model)
    plain = lora.unload(model)
    for name, tensor in plain.state_dict().items():
        assert torch.allclose(tensor, original[name], atol=1e-6), name


def test_several_adapters_switch_disable_scale_delete():
    model = tiny_lm()
    base_out = model(tokens())
    lora.apply_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), adapter_name="first")
    lora.add_adapter(model, LoRAConfig(r=2, alpha=4, target_modules=["v_proj", "o_proj"]), adapter_name="second")
    randomize_adapters(model)
    first = model(tokens())
    lora.set_adapter(model, "second")
    second = model(tokens())
    assert not torch.allclose(first, second)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"blocks.{i}.{m}.lora_{k}.second" for i in (0, 1) for m in ("v_proj", "o_proj") for k in "AB"}
    layer = model.blocks[0].v_proj
    x = torch.randn(3, 16)
    lora.set_adapter(model, ["first", "second"])  # deltas add up
    expected = layer.base_layer(x) + layer.lora_delta("first").matmul(x.t()).t() + layer.lora_delta("second").matmul(x.t()).t()
    assert torch.allclose(layer(x), expected, atol=ATOL)
    with lora.disable_adapters(model):
        assert torch.equal(model(tokens()), base_out)
    assert not torch.equal(model(tokens()), base_out)
    lora.set_adapter(model, "first")
    lora.set_adapter_scale(model, "first", 0.0)
    assert torch.equal(model(tokens()), base_out)
    lora.set_adapter_scale(model, "first", 1.0)
    assert torch.allclose(model(tokens()), first, atol=ATOL)
    lora.delete_adapter(model, "second")
    assert "second" not in model.blocks[0].o_proj.lora_A and list(model.lora_configs) == ["first"]
    with pytest.raises(ValueError, match="does not exist"):
        lora.set_adapter(model, "second")
    with pytest.raises(ValueError, match="already exists"):
        lora.add_adapter(model, LoRAConfig(target_modules=["q_proj"]), adapter_name="first")


def test_disable_refused_while_merged():
    model = tiny_lm()
    lora.apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj"]))
    lora.merge(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        with lora.disable_adapters(model):
            pass


# ----- combinations ---------------------------------------------------------------------------------------
def two_adapter_model():
    model = tiny_lm()
    lora.apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), adapter_name="a")
    lora.add_adapter(model, LoRAConfig(r=2, alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"]), "b")
    randomize_adapters(model)
    return model


def test_cat_combination_is_exact():
    model = two_adapter_model()
    lora.combine_adapters(model, ["a", "b"], [0.7, -0.4], method="cat", new_name="mix")
    for _, layer in lora.lora_layers(model):
        expected = 0.7 * layer.lora_delta("a") - 0.4 * layer.lora_delta("b")
        assert layer.rank["mix"] == 6 and layer.scaling["mix"] == 1.0
        assert torch.allclose(layer.lora_delta("mix"), expected, atol=ATOL)


def test_svd_combination_is_the_best_low_rank_approximation():
    model = two_adapter_model()
    lora.combine_adapters(model, ["a", "b"], [1.0, 1.0], method="svd", new_name="mix", svd_rank=6)
    lora.combine_adapters(model, ["a", "b"], [1.0, 1.0], method="svd", new_name="small", svd_rank=3)
    layer = model.blocks[0].q_proj
    total = layer.lora_delta("a") + layer.lora_delta("b")
    assert torch.allclose(layer.lora_delta("mix"), total, atol=1e-4)  # rank 6 holds all of it
    singular = torch.linalg.svdvals(total.detach())
    error = torch.linalg.matrix_norm(total - layer.lora_delta("small")).item()
    assert math.isclose(error, singular[3:].norm().item(), rel_tol=1e-3)  # Eckart-Young


def test_linear_combination_formula_and_errors():
    model = tiny_lm()
    lora.apply_lora(model, LoRAConfig(r=4, target_modules=["q_proj"]), adapter_name="a")
    lora.add_adapter(model, LoRAConfig(r=4, alpha=2, target_modules=["q_proj"]), "b")
    randomize_adapters(model)
    lora.combine_adapters(model, ["a", "b"], [0.5, 2.0], method="linear", new_name="mix")
    layer = model.blocks[1].q_proj
    c_a, c_b = math.sqrt(0.5 * layer.scaling["a"]), math.sqrt(2.0 * layer.scaling["b"])
    A = c_a * layer.lora_A["a"] + c_b * layer.lora_A["b"]
    B = c_a * layer.lora_B["a"] + c_b * layer.lora_B["b"]
    assert torch.allclose(layer.lora_delta("mix"), B @ A, atol=ATOL)
    with pytest.raises(ValueError, match="negative"):
        lora.combine_adapters(model, ["a", "b"], [0.5, -1.0], method="linear", new_name="bad")
    with pytest.raises(ValueError, match="method must be one of"):
        lora.combine_adapters(model, ["a", "b"], [0.5, 1.0], method="ties", new_name="bad")


# ----- LoRA+ ----------------------------------------------------------------------------------------------
def test_lora_plus_groups():
    model = tiny_lm()
    lora.apply_lora(model, LoRAConfig(r=4, target_modules=["q_proj"], use_dora=True))
    groups = lora.lora_plus_param_groups(model, lr=1e-3, ratio=16)
    slow, fast = groups
    assert slow["lr"] == 1e-3 and fast["lr"] == 16e-3
    assert {id(p) for p in slow["params"]} == {id(model.blocks[i].q_proj.lora_A["default"]) for i in (0, 1)}
    assert len(fast["params"]) == 4  # two B, two magnitudes
    torch.optim.AdamW(groups)


def test_minigpt_gets_lora():
    from minigpt import GPTConfig, MiniGPT

    torch.manual_seed(0)
    model = MiniGPT(GPTConfig(vocab_size=30, context_length=8, embed_dim=16, n_layers=2, n_heads=2, mlp_ratio=2))
    idx = torch.randint(0, 30, (2, 8))
    reference, _ = model(idx)
    lora.apply_lora(model, LoRAConfig(r=4, target_modules="all-linear", use_dora=True))
    assert not isinstance(model.lm_head, LoRALinear)
    assert isinstance(model.blocks[0].attn.q_proj, LoRALinear) and isinstance(model.blocks[1].mlp.down_proj, LoRALinear)
    logits, loss = model(idx, targets=idx)
    assert torch.allclose(logits, reference, atol=1e-5)
    loss.backward()
    assert model.blocks[0].attn.q_proj.lora_B["default"].grad is not None


# ----- the QLoRA protocol, duck-typed (quant.Linear4bit is tested against lora in test_qlora.py) -------------
class FakeLinear4bit(nn.Module):
    """Stands in for a 4-bit layer: no `.weight`, a dequantize_weight(), from_linear(); rounds W to 1/8."""

    def __init__(self, linear, block_size=64, double_quant=True, compute_dtype=None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.block_size, self.double_quant, self.compute_dtype = block_size, double_quant, compute_dtype
        self.register_buffer("codes", torch.round(linear.weight.detach() * 8))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear, block_size=64, double_quant=True, compute_dtype=None):
        return cls(linear, block_size, double_quant, compute_dtype)

    def dequantize_weight(self, dtype=None):
        return (self.codes / 8).to(dtype or torch.float32)

    def forward(self, x):
        return F.linear(x, self.dequantize_weight(x.dtype), self.bias)


def fake_qlora_model(use_dora=False):
    model = tiny_lm()
    for block in model.blocks:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(block, name, FakeLinear4bit(getattr(block, name), block_size=32, double_quant=False))
    return model


def test_4bit_layers_count_as_linear_and_in_parameter_counts(capsys):
    model = fake_qlora_model()
    assert len(lora.find_targets(model, LoRAConfig(target_modules="all-linear"))) == 8
    lora.apply_lora(model, LoRAConfig(r=2, target_modules="all-linear"))
    trainable, total = lora.count_parameters(model)
    assert trainable == 8 * (2 * 16 + 16 * 2)
    # 4-bit weights count as in * out (PEFT counts a Params4bit as 2 * its packed bytes = in * out)
    assert total == trainable + 8 * (16 * 16) + 16 * 3 * 2 + 12 * 16 + 12 * 16


@pytest.mark.parametrize("use_dora", [False, True])
def test_4bit_base_merge_refused_and_merge_and_unload(use_dora):
    model = fake_qlora_model()
    lora.apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj", "v_proj"], use_dora=use_dora))
    randomize_adapters(model)
    expected = model(tokens())
    layer = model.blocks[0].q_proj
    with pytest.raises(RuntimeError, match="4-bit base"):
        lora.merge(model)
    with pytest.raises(RuntimeError, match="4-bit base"):
        layer.merge()
    assert not layer.merged_adapters
    weight = layer.merged_weight()[0]
    if not use_dora:
        assert torch.allclose(weight, layer.base_layer.dequantize_weight() + layer.lora_delta("default"), atol=1e-6)
    requantized = lora.merge_and_unload(copy.deepcopy(model), requantize=True)  # a copy: unload twice
    assert isinstance(requantized.blocks[0].q_proj, FakeLinear4bit)
    assert requantized.blocks[0].q_proj.block_size == 32 and not requantized.blocks[0].q_proj.double_quant
    merged = lora.merge_and_unload(model)
    assert type(merged.blocks[0].q_proj) is nn.Linear and merged.blocks[0].q_proj.weight.dtype == torch.float32
    assert isinstance(merged.blocks[0].k_proj, FakeLinear4bit)
    assert torch.allclose(merged(tokens()), expected, atol=ATOL)


def test_4bit_base_rejects_pissa():
    with pytest.raises(ValueError, match="4-bit"):
        lora.apply_lora(fake_qlora_model(), LoRAConfig(r=2, target_modules=["q_proj"], init="pissa"))


def test_rank_and_alpha_patterns_by_suffix_or_regex():
    model = tiny_lm()
    config = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                        rank_pattern={"blocks.1.q_proj": 2}, alpha_pattern={r"blocks\.\d\.v_proj": 1.0})
    lora.apply_lora(model, config)
    assert model.blocks[0].q_proj.scaling["default"] == 2.0 and model.blocks[1].q_proj.rank["default"] == 2
    assert model.blocks[1].q_proj.scaling["default"] == 4.0  # alpha 8 / r 2
    assert model.blocks[0].v_proj.scaling["default"] == 0.25 and model.blocks[1].v_proj.scaling["default"] == 0.25


# ----- config types (a hand-edited or corrupt lora_config.json meets the same checks) ---------------------------
def test_config_names_given_as_one_string():
    config = LoRAConfig(target_modules=["q_proj"], modules_to_save="lm_head")
    assert config.modules_to_save == ("lm_head",)  # one name, not the characters 'l', 'm', ...
    assert LoRAConfig(target_modules=r".*\.q_proj").target_modules == r".*\.q_proj"  # a string is a regex, as in PEFT
    assert LoRAConfig(target_modules=["q_proj", "v_proj"]).target_modules == ("q_proj", "v_proj")


@pytest.mark.parametrize("kwargs,match", [
    (dict(target_modules=5), "target_modules must be a non-empty list"),
    (dict(target_modules=["q_proj", 5]), "target_modules must be a non-empty list"),
    (dict(target_modules=[]), "target_modules must be a non-empty list"),
    (dict(target_modules="q_proj("), "not a valid regular expression"),
    (dict(use_dora="false"), "use_dora must be True or False, got 'false'"),
    (dict(use_rslora=1), "use_rslora must be True or False, got 1"),
    (dict(modules_to_save=7), "modules_to_save must be a list of module names"),
    (dict(modules_to_save=["lm_head", ""]), "modules_to_save must be a list of module names"),
    (dict(rank_pattern=["q_proj"]), "rank_pattern must be a dict"),
    (dict(alpha_pattern={"v_proj[": 2.0}), "alpha_pattern key 'v_proj\\[' is not a valid regular expression"),
    (dict(dropout=True), "dropout must be a number"),
])
def test_bad_config_types(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**kwargs)


def test_pattern_keys_match_a_whole_dotted_suffix_as_in_peft():
    model = tiny_lm()
    config = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                        rank_pattern={r"1\.v_proj": 3, "v_.*": 2}, alpha_pattern={r"\d\.q_proj": 1.0})
    lora.apply_lora(model, config)
    ranks = {name: layer.rank["default"] for name, layer in lora.lora_layers(model)}
    assert ranks == {"blocks.0.q_proj": 4, "blocks.0.v_proj": 2, "blocks.1.q_proj": 4, "blocks.1.v_proj": 3}
    assert {name: layer.alpha["default"] for name, layer in lora.lora_layers(model)}["blocks.1.q_proj"] == 1.0


def test_pattern_key_matching_no_target_warns_as_in_peft():
    config = LoRAConfig(r=4, target_modules=["q_proj"], rank_pattern={"proj": 2, "q_proj": 3},
                        alpha_pattern={"v_proj": 1.0})
    with pytest.warns(RuntimeWarning) as record:
        model = lora.apply_lora(tiny_lm(), config)
    messages = [str(warning.message) for warning in record]
    assert any("rank_pattern keys did not match any targeted module and were ignored: ['proj']" in m for m in messages)
    assert any("alpha_pattern keys did not match any targeted module and were ignored: ['v_proj']" in m
               for m in messages)
    assert model.blocks[0].q_proj.rank["default"] == 3  # "proj" must end at a dot: it does not match "q_proj"


def test_combined_adapter_is_built_as_its_config_says():
    model = tiny_lm()
    lora.apply_lora(model, LoRAConfig(r=4, dropout=0.25, target_modules=["q_proj"]), adapter_name="a")
    lora.add_adapter(model, LoRAConfig(r=2, dropout=0.0, target_modules=["q_proj"]), "b")
    lora.combine_adapters(model, ["a", "b"], [1.0, 1.0], method="cat", new_name="mix")
    config = model.lora_configs["mix"]
    assert (config.r, config.alpha, config.dropout, config.use_rslora) == (6, 6.0, 0.25, False)  # a's dropout, as PEFT
    for _, layer in lora.lora_layers(model):
        dropout = layer.lora_dropout["mix"]
        assert isinstance(dropout, nn.Dropout) and dropout.p == config.dropout
        assert layer.rank["mix"] == config.r and layer.scaling["mix"] == config.scaling_for(config.r, config.alpha)


def test_dora_norm_cached_under_inference_mode_does_not_break_a_later_backward():
    layer = lora_linear(use_dora=True)
    randomize_adapters(layer)
    layer.eval()
    x = torch.randn(3, 16)
    with torch.inference_mode():
        cached_output = layer(x)  # caches n (and m/n, scaled B) as inference tensors
    y = layer(x)  # eval, gradients wanted: must not reuse those
    y.square().sum().backward()
    assert torch.equal(y.detach(), cached_output)
    assert layer.lora_B["default"].grad is not None and layer.lora_magnitude["default"].grad is not None
    layer.requires_grad_(False)  # frozen adapter, gradient for the input only: the factor cache is used
    with torch.inference_mode():
        layer(x)
    x.requires_grad_(True)
    layer(x).sum().backward()
    assert x.grad is not None


def several_adapters_layer(kinds):
    """One LoRALinear holding adapters "a0", "a1", ... of the given kinds ("lora" / "dora"), all active."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 12), adapter_name="a0", rank=4, alpha=8, use_dora=kinds[0] == "dora")
    for i, kind in enumerate(kinds[1:], start=1):
        layer.add_adapter(f"a{i}", rank=2, alpha=3, use_dora=kind == "dora")
    randomize_adapters(layer, scale=0.5)
    with torch.no_grad():  # m / n between 0.5 and 1.5, row by row
        for i, (name, magnitude) in enumerate(layer.lora_magnitude.items()):
            norm = torch.linalg.norm(layer.base_layer.weight + layer.lora_delta(name), dim=1)
            magnitude.copy_(norm * torch.linspace(0.5, 1.5, 12).roll(3 * i))
    layer.set_adapter([f"a{i}" for i in range(len(kinds))])
    return layer


@pytest.mark.parametrize("kinds", [("dora", "dora"), ("lora", "dora"), ("dora", "lora"), ("dora", "lora", "dora")])
def test_several_active_dora_adapters_merged_equals_unmerged(kinds):
    layer = several_adapters_layer(kinds)
    original = layer.base_layer.weight.detach().clone()
    x = torch.randn(5, 16)
    unmerged = layer(x)
    # forward, by hand: each adapter in turn updates the running y; DoRA rescales it, n of W alone (as PEFT)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    expected = F.linear(x, W, b)
    for name in layer.active_adapters:
        delta = layer.lora_delta(name)
        if layer.use_dora[name]:
            ratio = layer.lora_magnitude[name] / torch.linalg.norm(W + delta, dim=1)
            expected = ratio * (expected - b + F.linear(x, delta)) + b
        else:
            expected = expected + F.linear(x, delta)
    assert torch.allclose(unmerged, expected, atol=ATOL)
    layer.merge()
    assert torch.allclose(layer(x), unmerged, atol=ATOL)
    layer.unmerge()
    assert torch.allclose(layer.base_layer.weight, original, atol=1e-6)
    layer.merge(["a0"])  # one at a time gives the same merged weight: n is always taken of W alone
    layer.merge([name for name in layer.active_adapters if name != "a0"])
    assert torch.allclose(layer(x), unmerged, atol=ATOL)
    layer.unmerge()
    assert torch.allclose(layer.base_layer.weight, original, atol=1e-6)


def test_set_adapter_on_a_merged_model_warns_and_unmerges_as_peft():
    model = tiny_lm()
    original = model.blocks[0].q_proj.weight.detach().clone()
    lora.apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj"]), adapter_name="a")
    lora.add_adapter(model, LoRAConfig(r=2, target_modules=["q_proj"]), "b")
    randomize_adapters(model)
    lora.set_adapter(model, "b")
    b_only = model(tokens())
    lora.set_adapter(model, "a")
    lora.merge(model)
    with pytest.warns(UserWarning, match="Unmerging the model first"):
        lora.set_adapter(model, "b")
    assert not any(layer.merged_adapters for _, layer in lora.lora_layers(model))
    assert torch.allclose(model.blocks[0].q_proj.base_layer.weight, original, atol=1e-6)  # a is out of W
    assert torch.allclose(model(tokens()), b_only, atol=ATOL)


# ----- a call that fails changes nothing ------------------------------------------------------------------------
def model_snapshot(model):
    """Everything a half-applied call could have changed: tensors, module types, adapter bookkeeping."""
    return ({name: tensor.clone() for name, tensor in model.state_dict().items()},
            [(name, type(module).__name__) for name, module in model.named_modules()],
            dict(getattr(model, "lora_configs", {})), list(getattr(model, "active_lora_adapters", [])),
            {name: (layer.adapter_names, list(layer.active_adapters), list(layer.merged_adapters))
             for name, layer in lora.lora_layers(model)},
            {name: p.requires_grad for name, p in model.named_parameters()})


def assert_unchanged(model, snapshot):
    tensors, *rest = model_snapshot(model)
    assert tensors.keys() == snapshot[0].keys()
    assert all(torch.equal(tensor, snapshot[0][name]) for name, tensor in tensors.items())
    assert rest == list(snapshot[1:])


def model_with_one_merged_layer():
    """Adapter "a" on both q_proj layers, merged into blocks.1.q_proj only (the later one in model order)."""
    model = tiny_lm()
    lora.apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj"]), adapter_name="a")
    randomize_adapters(model)
    model.blocks[1].q_proj.merge()
    return model


def test_add_adapter_onto_a_merged_layer_changes_nothing():
    model = model_with_one_merged_layer()
    snapshot = model_snapshot(model)
    with pytest.raises(RuntimeError, match=r"'blocks.1.q_proj' has adapters \['a'\] merged .* unmerge"):
        lora.add_adapter(model, LoRAConfig(r=2, target_modules=["q_proj", "k_proj"]), "b")
    assert_unchanged(model, snapshot)  # blocks.0.q_proj and the k_proj layers come first: none is wrapped


def test_load_adapter_onto_a_merged_layer_changes_nothing(tmp_path):
    other = tiny_lm()
    lora.apply_lora(other, LoRAConfig(r=2, target_modules=["k_proj", "q_proj"]))
    lora.save_adapter(other, tmp_path / "adapter")
    model = model_with_one_merged_layer()
    snapshot = model_snapshot(model)
    with pytest.raises(RuntimeError, match="'blocks.1.q_proj' has adapters"):
        lora.load_adapter(model, tmp_path / "adapter", adapter_name="b")
    assert_unchanged(model, snapshot)


def test_combine_adapters_onto_a_merged_layer_changes_nothing():
    model = model_with_one_merged_layer()
    snapshot = model_snapshot(model)
    with pytest.raises(RuntimeError, match="'blocks.1.q_proj' has adapters"):
        lora.combine_adapters(model, ["a"], [0.5], method="cat", new_name="half")
    assert_unchanged(model, snapshot)


def test_failed_add_adapter_leaves_a_plain_model_plain():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Embedding(10, 8))
    snapshot = model_snapshot(model)
    with pytest.raises(ValueError, match="init='pissa' rewrites the base weight .* embedding '1'"):
        lora.apply_lora(model, LoRAConfig(r=2, target_modules=["0", "1"], init="pissa"))
    assert_unchanged(model, snapshot)  # not even the PiSSA residual in the Linear before the embedding
    assert not hasattr(model, "lora_configs")


# ----- modules_to_save: the original module plus one trained copy per adapter (PEFT's ModulesToSaveWrapper) ----
def model_with_saved_lm_head():
    """Adapters "a" and "b", each with its own trained lm_head copy (made different from the original)."""
    model = tiny_lm()
    for name, sign in (("a", -1.0), ("b", 2.0)):
        lora.add_adapter(model, LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), name)
        with torch.no_grad():
            model.lm_head.modules_to_save[name].weight.mul_(sign)
    randomize_adapters(model)
    lora.set_adapter(model, "a")
    return model


def test_modules_to_save_never_trains_the_original():
    base = tiny_lm()
    base_out, original = base(tokens()), base.lm_head.weight.detach().clone()
    model = model_with_saved_lm_head()
    assert torch.equal(model.lm_head.original_module.weight, original)
    assert model.lm_head.weight is model.lm_head.modules_to_save["a"].weight  # attributes: the active copy's
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(tokens()).square().mean().backward()
    optimizer.step()
    b_copy = model.lm_head.modules_to_save["b"].weight.detach().clone()
    assert torch.equal(model.lm_head.original_module.weight, original)
    assert torch.equal(b_copy, 2.0 * original)  # the other adapter's copy is its own
    with lora.disable_adapters(model):
        assert torch.equal(model(tokens()), base_out)  # the original lm_head runs
    lora.set_adapter(model, "b")
    assert torch.equal(model.lm_head(torch.ones(1, 16)), F.linear(torch.ones(1, 16), b_copy))
    plain = lora.unload(model)
    assert type(plain.lm_head) is nn.Linear and torch.equal(plain.lm_head.weight, original)
    assert torch.equal(plain(tokens()), base_out)


def test_merge_and_unload_keeps_the_active_adapters_copy_as_peft():
    model = model_with_saved_lm_head()
    expected = model(tokens())
    a_copy = model.lm_head.modules_to_save["a"]
    merged = lora.merge_and_unload(model)
    assert merged.lm_head is a_copy and type(merged.lm_head) is nn.Linear
    assert torch.allclose(merged(tokens()), expected, atol=ATOL)


def test_two_adapters_with_their_own_copies_cannot_both_be_active():
    model = model_with_saved_lm_head()
    snapshot = model_snapshot(model)
    with pytest.raises(ValueError, match=r"adapters \['a', 'b'\] each train their own copy of 'lm_head'"):
        lora.set_adapter(model, ["a", "b"])
    assert_unchanged(model, snapshot)


def test_delete_adapter_drops_its_copy_and_the_last_one_gives_the_original_back():
    model = model_with_saved_lm_head()
    original = model.lm_head.original_module
    lora.delete_adapter(model, "a")
    assert model.lm_head.adapter_names == ["b"] and model.lm_head.active_module is original
    lora.delete_adapter(model, "b")
    assert model.lm_head is original


def test_modules_to_save_that_overlaps_a_lora_target_is_refused():
    model = tiny_lm()
    snapshot = model_snapshot(model)
    with pytest.raises(ValueError, match="'blocks.0' overlaps the LoRA layer or saved module 'blocks.0.q_proj'"):
        lora.apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["blocks.0"]))
    with pytest.raises(ValueError, match="'blocks.1.q_proj' overlaps"):
        lora.apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["1.q_proj"]))
    assert_unchanged(model, snapshot)
