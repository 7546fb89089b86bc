"""MiniGPT: shapes, causality, the hand-written attention against SDPA, checkpointing, generation."""

import pytest
import torch

from minigpt import GPTConfig, MiniGPT


def tiny_model(**overrides) -> MiniGPT:
    torch.manual_seed(0)
    fields = dict(vocab_size=50, context_length=16, embed_dim=32, n_layers=2, n_heads=4)
    fields.update(overrides)
    return MiniGPT(GPTConfig(**fields)).eval()


def test_shapes_and_loss():
    model = tiny_model()
    idx = torch.randint(0, 50, (3, 10))
    logits, loss = model(idx)
    assert logits.shape == (3, 10, 50) and loss is None
    _, loss = model(idx, idx)
    # an untrained model is close to uniform: loss near ln(50)
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.5


def test_leaf_module_names_are_the_ones_lora_users_type():
    names = {name.split(".")[-1] for name, _ in tiny_model().named_modules()}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "tok_emb", "pos_emb", "lm_head"} <= names


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_causality_future_tokens_never_change_earlier_logits(use_sdpa):
    model = tiny_model(use_sdpa=use_sdpa)
    idx = torch.randint(0, 50, (2, 12))
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 50  # change every token from position 7 on
    before, _ = model(idx)
    after, _ = model(changed)
    torch.testing.assert_close(before[:, :7], after[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, 7:], after[:, 7:])


def test_manual_attention_equals_sdpa():
    fast = tiny_model(use_sdpa=True)
    manual = tiny_model(use_sdpa=False)
    manual.load_state_dict(fast.state_dict())
    idx = torch.randint(0, 50, (4, 16))
    torch.testing.assert_close(fast(idx)[0], manual(idx)[0], rtol=1e-5, atol=1e-5)


def test_record_attention_keeps_a_causal_map():
    model = tiny_model()
    attn = model.blocks[0].attn
    attn.record_attention = True
    model(torch.randint(0, 50, (1, 6)))
    weights = attn.attention_weights  # (1, nh, 6, 6)
    assert weights.shape == (1, 4, 6, 6)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 4, 6))
    assert torch.all(weights.triu(diagonal=1) == 0)


def test_gradient_checkpointing_gives_the_same_gradients():
    plain = tiny_model()
    checkpointed = tiny_model(gradient_checkpointing=True)
    idx = torch.randint(0, 50, (2, 8))
    for model in (plain, checkpointed):
        model.train()
        model(idx, idx)[1].backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_generate_greedy_is_deterministic_and_crops_context():
    model = tiny_model()
    idx = torch.randint(0, 50, (2, 3))
    out = model.generate(idx, max_new_tokens=20, temperature=0)  # runs past context_length 16
    assert out.shape == (2, 23)
    assert torch.equal(out[:, :3], idx)
    assert torch.equal(out, model.generate(idx, max_new_tokens=20, temperature=0))
    sampled = model.generate(idx, 5, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 8)


def test_too_long_context_is_a_clear_error():
    with pytest.raises(ValueError, match="longer than the model's context_length"):
        tiny_model()(torch.zeros(1, 17, dtype=torch.long))


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        GPTConfig(vocab_size=10, embed_dim=30, n_heads=4)
    with pytest.raises(ValueError, match="vocab_size"):
        GPTConfig(vocab_size=0)


@pytest.mark.parametrize("arguments, message", [
    (dict(max_new_tokens=2, top_k=0), "top_k must be an integer >= 1"),
    (dict(max_new_tokens=2, top_k=2.5), "top_k must be an integer >= 1"),
    (dict(max_new_tokens=2, temperature=-0.5), "temperature must be a number >= 0"),
    (dict(max_new_tokens=2, temperature=float("nan")), "temperature must be a number >= 0"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
])
def test_generate_refuses_bad_sampling_arguments_clearly(arguments, message):
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        model.generate(torch.zeros(1, 2, dtype=torch.long), **arguments)
    assert model.generate(torch.zeros(1, 2, dtype=torch.long), max_new_tokens=0).shape == (1, 2)


@pytest.mark.parametrize("field, value, message", [
    ("bias", "no", "bias must be true or false"), ("use_sdpa", 1, "use_sdpa must be true or false"),
    ("dropout", None, "dropout must be a number"), ("n_layers", True, "n_layers must be a positive integer"),
])
def test_config_field_types_are_checked(field, value, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(vocab_size=10, **{field: value})
