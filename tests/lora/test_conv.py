"""LoRAConv (lora/conv.py) on small Conv1d / Conv2d networks, against PEFT 0.21's `lora.Conv1d` / `lora.Conv2d`.

Exact oracles first (B = 0 is the base bit for bit; merged equals unmerged; the delta weight is the
weight of the composed convolution B∘A), then PEFT on the same base and adapter tensors: outputs and
A / B / m gradients (max abs diff <= 1e-5 in float32), merged weights, the trainable-parameter line,
the saved adapter, and the refusals (dilation, padding_mode, grouped merge / DoRA).
"""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
from lora.conv import LoRAConv

peft = pytest.importorskip("peft")

TOL = 1e-5
VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


class ConvNet2d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 8, kernel_size=1)  # the 1x1 case
        self.conv3 = nn.Conv2d(8, 6, kernel_size=(3, 2), padding="same", bias=False)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        return self.head(self.conv3(x).mean(dim=(2, 3)))


class ConvNet1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(4, 8, kernel_size=5, stride=2, padding=2)
        self.conv2 = nn.Conv1d(8, 8, kernel_size=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.conv2(F.gelu(self.conv1(x))).mean(dim=2))


NETS = {"conv2d": (ConvNet2d, (2, 3, 9, 9)), "conv1d": (ConvNet1d, (2, 4, 17))}
TARGETS = {"conv2d": ["conv1", "conv2", "conv3"], "conv1d": ["conv1", "conv2"]}


def build(net):
    torch.manual_seed(0)
    model_class, shape = NETS[net]
    return model_class().eval(), torch.randn(shape, generator=torch.Generator().manual_seed(1))


def randomize_B(model, seed=2):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            B = layer.lora_B["default"]
            B.copy_(0.3 * torch.randn(B.shape, generator=generator))


def pair(net, variant, r=4):
    base, x = build(net)
    ours = lora.apply_lora(copy.deepcopy(base), lora.LoRAConfig(r=r, alpha=8, target_modules=TARGETS[net],
                                                                  **VARIANTS[variant]))
    randomize_B(ours)
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=8, target_modules=TARGETS[net],
                                                       **VARIANTS[variant]))
    result = peft.set_peft_model_state_dict(theirs, lora.to_peft_state_dict(lora.adapter_state_dict(ours)))
    assert not result.unexpected_keys
    return ours, theirs, x


def grads(model):
    return {name.removesuffix(".default"): p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("net", NETS)
def test_zero_B_is_the_base_bit_for_bit(net):
    base, x = build(net)
    ours = lora.apply_lora(copy.deepcopy(base), lora.LoRAConfig(r=4, alpha=8, target_modules=TARGETS[net]))
    assert all(isinstance(ours.get_submodule(name), LoRAConv) for name in TARGETS[net])
    with torch.no_grad():
        assert torch.equal(ours(x), base(x))


@pytest.mark.parametrize("kernel", [1, 3])
def test_delta_is_the_weight_of_the_composed_convolution(kernel):
    torch.manual_seed(0)
    layer = LoRAConv(nn.Conv2d(3, 5, kernel, padding=kernel // 2), rank=2, alpha=4)
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        composed = layer.lora_branch("default", x) * layer.scaling["default"]  # s · B(A(x))
        direct = F.conv2d(x, layer.lora_delta("default"), None, 1, kernel // 2)  # conv(x, ΔW)
    assert (composed - direct).abs().max() <= 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("training", [False, True])
def test_outputs_and_gradients_match_peft(net, variant, training):
    ours, theirs, x = pair(net, variant)
    ours.train(training), theirs.train(training)
    ours_out, their_out = ours(x), theirs(x)
    assert (ours_out - their_out).abs().max() <= TOL
    ours_out.square().mean().backward()
    their_out.square().mean().backward()
    ours_grads = lora.from_peft_state_dict(lora.to_peft_state_dict(grads(ours)))
    their_grads = lora.from_peft_state_dict(grads(theirs))
    assert ours_grads.keys() == their_grads.keys() and ours_grads
    for key in ours_grads:
        assert ours_grads[key].shape == their_grads[key].shape
        assert (ours_grads[key] - their_grads[key]).abs().max() <= TOL, key


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("net", NETS)
def test_merged_equals_unmerged_and_peft_merged(net, variant):
    ours, theirs, x = pair(net, variant)
    with torch.no_grad():
        unmerged = ours(x)
        lora.merge(ours)
        assert (ours(x) - unmerged).abs().max() <= TOL
        lora.unmerge(ours)
        assert (ours(x) - unmerged).abs().max() <= TOL
        merged_ours, merged_theirs = lora.merge_and_unload(ours), theirs.merge_and_unload()
        assert (merged_ours(x) - merged_theirs(x)).abs().max() <= TOL
    assert merged_ours.state_dict().keys() == merged_theirs.state_dict().keys()
    for key, weight in merged_ours.state_dict().items():
        assert (weight - merged_theirs.state_dict()[key]).abs().max() <= TOL, key


def test_trainable_parameter_line_matches_peft(capsys):
    ours, theirs, _ = pair("conv2d", "dora")
    lora.print_trainable_parameters(ours)
    theirs.print_trainable_parameters()
    mine, peft_line = capsys.readouterr().out.strip().splitlines()
    assert mine == peft_line


def test_adapter_saves_and_loads(tmp_path):
    ours, _, x = pair("conv2d", "dora")
    lora.save_adapter(ours, tmp_path / "adapter")
    fresh = lora.load_adapter(build("conv2d")[0], tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh(x), ours(x))


def test_grouped_conv_matches_peft_and_refuses_to_merge():
    def grouped():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2))

    base = grouped()
    ours = lora.apply_lora(copy.deepcopy(base), lora.LoRAConfig(r=4, alpha=8, target_modules=["0"]))
    randomize_B(ours)
    assert ours[0].lora_B["default"].shape == (8, 2, 1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "groups > 1. Merging is not supported."
        theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    peft.set_peft_model_state_dict(theirs, lora.to_peft_state_dict(lora.adapter_state_dict(ours)))
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() <= TOL
    with pytest.raises(NotImplementedError, match="groups=2"):
        lora.merge(ours)
    with pytest.raises(ValueError, match="divisible by its groups=2"):
        lora.apply_lora(grouped(), lora.LoRAConfig(r=3, target_modules=["0"]))
    with pytest.raises(ValueError, match="DoRA .* groups=2"):
        lora.apply_lora(grouped(), lora.LoRAConfig(r=4, use_dora=True, target_modules=["0"]))


@pytest.mark.parametrize("layer, message", [
    (nn.Conv2d(3, 4, 3, dilation=2), "dilation"),
    (nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
])
def test_refused_convolutions_say_why(layer, message):
    with pytest.raises(ValueError, match=message):
        lora.apply_lora(nn.Sequential(layer), lora.LoRAConfig(r=2, target_modules=["0"]))


def test_rank_is_checked_against_the_flattened_kernel():
    model = nn.Sequential(nn.Conv2d(1, 16, 3))  # ΔW is [16, 1·3·3]: rank at most 9
    lora.apply_lora(copy.deepcopy(model), lora.LoRAConfig(r=9, target_modules=["0"]))
    with pytest.raises(ValueError, match="r=10"):
        lora.apply_lora(model, lora.LoRAConfig(r=10, target_modules=["0"]))


def test_dropout_in_training_matches_peft_with_the_same_seed():
    base, x = build("conv2d")
    for use_dora in (False, True):
        config = dict(r=4, target_modules=TARGETS["conv2d"], use_dora=use_dora)
        ours = lora.apply_lora(copy.deepcopy(base), lora.LoRAConfig(alpha=8, dropout=0.3, **config))
        randomize_B(ours)
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(lora_alpha=8, lora_dropout=0.3, **config))
        peft.set_peft_model_state_dict(theirs, lora.to_peft_state_dict(lora.adapter_state_dict(ours)))
        ours.train(), theirs.train()
        torch.manual_seed(5)
        ours_out = ours(x)
        torch.manual_seed(5)
        assert (ours_out - theirs(x)).abs().max() <= TOL


def test_combine_adapters_refuses_convolutions():
    model = lora.apply_lora(build("conv2d")[0], lora.LoRAConfig(r=2, target_modules=["conv1"]))
    with pytest.raises(ValueError, match="'conv1' is a convolution"):
        lora.combine_adapters(model, ["default"], [1.0])


def test_a_class_named_conv1d_without_the_gpt2_layout_is_not_taken_for_one():
    class Conv1D(nn.Linear):  # an nn.Linear named Conv1D: no `nf`, weight [out, in]
        pass

    model = lora.apply_lora(nn.Sequential(Conv1D(6, 4)), lora.LoRAConfig(r=2, target_modules=["0"]))
    assert model[0].lora_A["default"].shape == (2, 6)  # treated as the nn.Linear it is
    assert not lora.base_layer.is_fan_in_fan_out(model[0].base_layer)


def test_a_training_step_changes_only_the_adapters():
    base, x = build("conv2d")
    model = lora.apply_lora(copy.deepcopy(base), lora.LoRAConfig(r=4, target_modules=TARGETS["conv2d"],
                                                                   use_dora=True))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(x).square().mean().backward()
    optimizer.step()
    for name, parameter in model.named_parameters():
        changed = not torch.equal(parameter, before[name])
        assert changed == (".lora_B." in name or ".lora_magnitude." in name), name  # B = 0: A gets no gradient yet
