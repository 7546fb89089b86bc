"""MiniViT and MiniVLM: shapes, causality, the patch embedding as unfold + matmul, gates at 0, LoRA on the
encoder's Conv2d and projections, save/load, and clear errors."""

import pytest
import torch
import torch.nn.functional as F

import lora
from vision import MiniViT, MiniVLM, VLMConfig, ViTConfig, load_vlm, save_vlm
from vision.training import caption_tokenizer, encode_captions, train_vlm

TINY_VIT = ViTConfig(embed_dim=8, n_heads=2, n_layers=1)


def tiny_vlm(cross_attention=True, seed=0):
    torch.manual_seed(seed)
    return MiniVLM(VLMConfig(vocab_size=caption_tokenizer().vocab_size, vision=TINY_VIT, embed_dim=16, n_heads=2,
                             n_layers=1, max_caption_tokens=12, cross_attention=cross_attention)).eval()


def test_logits_cover_the_caption_and_a_token_never_sees_later_tokens():
    model, images = tiny_vlm(), torch.rand(2, 3, 16, 16)
    idx = torch.randint(4, 10, (2, 7))
    logits, _ = model(images, idx)
    assert logits.shape == (2, 7, model.config.vocab_size)
    changed = idx.clone()
    changed[:, 4] = 3  # a later token changes: positions 0..3 must not move
    logits_changed, _ = model(images, changed)
    assert torch.equal(logits[:, :4], logits_changed[:, :4])
    assert not torch.allclose(logits[:, 4:], logits_changed[:, 4:])
    other_image, _ = model(torch.rand(2, 3, 16, 16), idx)  # the first word already depends on the image
    assert not torch.allclose(other_image[:, 0], logits[:, 0])


def test_patch_embedding_equals_unfold_then_matmul():
    vit = MiniViT(TINY_VIT)
    images = torch.rand(2, 3, 16, 16)
    patches = F.unfold(images, kernel_size=4, stride=4).transpose(1, 2)  # (B, P, 3*4*4), row-major patches
    weight = vit.patch_embed.weight.reshape(8, -1)  # (Cv, 3*4*4)
    explicit = patches @ weight.T + vit.patch_embed.bias  # (B, P, Cv)
    convolved = vit.patch_embed(images).flatten(2).transpose(1, 2)  # (B, P, Cv)
    torch.testing.assert_close(convolved, explicit, rtol=1e-5, atol=1e-6)


def test_closed_cross_attention_gates_leave_the_decoder_unchanged():
    with_blocks, without = tiny_vlm(cross_attention=True), tiny_vlm(cross_attention=False)
    without.load_state_dict({name: value for name, value in with_blocks.state_dict().items()
                             if not name.startswith("cross_blocks")})
    images, idx = torch.rand(2, 3, 16, 16), torch.randint(4, 10, (2, 5))
    assert torch.equal(with_blocks(images, idx)[0], without(images, idx)[0])  # tanh(0) = 0 exactly


@pytest.mark.parametrize("targets", [["patch_embed"], ["encoder.blocks.0.attn.q_proj", "encoder.blocks.0.mlp.up_proj"]])
def test_lora_on_the_encoder_starts_as_a_no_op_and_merges_exactly(targets):
    model = tiny_vlm()
    images, idx = torch.rand(2, 3, 16, 16), torch.randint(4, 10, (2, 5))
    before, _ = model(images, idx)
    adapted = lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=targets)).eval()
    assert torch.equal(adapted(images, idx)[0], before)  # B = 0: bit-identical
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    unmerged, _ = adapted(images, idx)
    assert not torch.allclose(unmerged, before)
    merged, _ = lora.merge_and_unload(adapted)(images, idx)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)


def test_a_few_steps_lower_the_caption_loss():
    model, tokenizer = tiny_vlm(), caption_tokenizer()
    captions = ["a small red circle left of a big blue square", "a big green square left of a small red triangle"] * 4
    images = torch.rand(8, 3, 16, 16)
    inputs, targets = encode_captions(tokenizer, captions, 12)
    losses = train_vlm(model, images, inputs, targets, steps=6, lr=2e-2, batch_size=8)
    assert losses[-1] < 0.8 * losses[0]


def test_save_load_round_trip(tmp_path):
    model, tokenizer = tiny_vlm(), caption_tokenizer()
    save_vlm(model, tokenizer, tmp_path / "vlm")
    loaded, loaded_tokenizer = load_vlm(tmp_path / "vlm")
    images, idx = torch.rand(2, 3, 16, 16), torch.randint(4, 10, (2, 5))
    assert loaded.config == model.config and loaded_tokenizer.vocab_size == tokenizer.vocab_size
    assert torch.equal(loaded(images, idx)[0], model(images, idx)[0])


def test_bad_inputs_say_what_is_wrong(tmp_path):
    model = tiny_vlm()
    with pytest.raises(ValueError, match=r"images must be a \(batch, 3, 16, 16\) tensor.*got \(2, 3, 32, 32\)"):
        model(torch.rand(2, 3, 32, 32), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"words outside the vocabulary: \['purple', 'star'\]"):
        encode_captions(caption_tokenizer(), ["a small purple star left of a big red circle"], 12)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vlm(tmp_path / "missing")
    save_vlm(model, caption_tokenizer(), tmp_path / "vlm")
    (tmp_path / "vlm" / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match="missing model.pt"):
        load_vlm(tmp_path / "vlm")
    with pytest.raises(ValueError, match="divisible by patch_size"):
        ViTConfig(image_size=16, patch_size=5)
