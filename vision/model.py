"""MiniViT (a Vision Transformer) and MiniVLM (MiniViT + projector + MiniGPT), small enough for a laptop CPU.

MiniViT follows Dosovitskiy et al. (2021), "An Image is Worth 16x16 Words": cut the image into patches,
embed each with one linear map (a Conv2d whose stride is the patch size), add learned position embeddings,
run bidirectional transformer blocks (minigpt's Block without the causal mask) and classify the mean.

    image (B, 3, H, W) ──patch_embed (Conv2d, stride p)──► (B, Cv, H/p, W/p) ──flatten──► (B, P, Cv)
                       + pos_emb ──► [ViTBlock] x n_layers ──► ln_f ──► features (B, P, Cv) ──mean──► head

MiniVLM follows LLaVA (Liu et al., 2023): the image's patch features, mapped by a small MLP projector
into the decoder's embedding space, are prefix tokens before the caption; and, optionally, Flamingo
(Alayrac et al., 2022): a gated cross-attention block before each decoder block, whose gates tanh(g)
start at g = 0, so the block is an exact no-op until training opens it.

    features ──projector (linear_1, GELU, linear_2)──► prefix (B, P, C)
    [prefix ; tok_emb(caption)] + pos_emb ──► [cross_blocks[i] (attends to prefix) ; decoder.blocks[i]] x L
                                         ──► ln_f ──► lm_head on the caption positions ──► (B, T, V)

The projections keep MiniGPT's names (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `up_proj`, `down_proj`)
in every component, so a LoRA target names a component by its path:

    encoder.patch_embed, encoder.blocks.0.attn.q_proj      the vision encoder
    decoder.blocks.0.attn.q_proj, decoder.blocks.0.mlp.up_proj   the language decoder
    cross_blocks.0.attn.q_proj                             the cross-attention layers

Shapes: B batch, P patches, T caption tokens, Cv encoder width, C decoder width, V vocabulary.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt.model import MLP, Block, CausalSelfAttention, MiniGPT
from vision.config import VLMConfig, ViTConfig


class SelfAttention(CausalSelfAttention):
    """minigpt's attention without the causal mask: in an image every patch may look at every patch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, P, C = x.shape
        # (B, P, C) -> (B, P, nh, hs) -> (B, nh, P, hs)
        q = self.q_proj(x).view(B, P, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, P, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, P, self.n_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=False)  # (B, nh, P, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, P, C))  # (B, nh, P, hs) -> (B, P, C)


class ViTBlock(Block):
    """minigpt's pre-LayerNorm Block (ln_1, attn, ln_2, mlp) with bidirectional attention."""

    def __init__(self, config: ViTConfig):
        super().__init__(config.block_config())
        self.attn = SelfAttention(config.block_config())


class MiniViT(nn.Module):
    """A small Vision Transformer with a classification head.

    Example:
        >>> vit = MiniViT(ViTConfig())
        >>> logits, loss = vit(torch.zeros(2, 3, 16, 16), torch.tensor([0, 5]))
        >>> vit.features(torch.zeros(2, 3, 16, 16)).shape, logits.shape
        (torch.Size([2, 16, 32]), torch.Size([2, 9]))
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        # one linear map per patch, written as a convolution: kernel = stride = patch size, so the patches
        # do not overlap (tests/vision/test_models.py checks it equals unfold + matmul)
        self.patch_embed = nn.Conv2d(config.channels, config.embed_dim, kernel_size=config.patch_size,
                                     stride=config.patch_size)
        self.pos_emb = nn.Embedding(config.n_patches, config.embed_dim)
        self.blocks = nn.ModuleList([ViTBlock(config) for _ in range(config.n_layers)])
        self.ln_f = nn.LayerNorm(config.embed_dim)
        self.head = nn.Linear(config.embed_dim, config.n_classes)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def check_images(self, images: torch.Tensor) -> None:
        size, channels = self.config.image_size, self.config.channels
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (channels, size, size):
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a (batch, {channels}, {size}, {size}) tensor (channels first, "
                             f"as torchvision's ToTensor gives), got {got}")

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, P, Cv) patch features."""
        self.check_images(images)
        x = self.patch_embed(images)  # (B, 3, H, W) -> (B, Cv, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, Cv, H/p, W/p) -> (B, P, Cv), patches in row-major order
        x = x + self.pos_emb(torch.arange(x.size(1), device=x.device))  # (B, P, Cv) + (P, Cv)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        """(logits (B, n_classes), cross-entropy loss or None)."""
        logits = self.head(self.features(images).mean(dim=1))  # (B, P, Cv) -> (B, Cv) -> (B, n_classes)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return logits, loss


class CrossAttention(nn.Module):
    """Text positions (queries) attend to the image prefix (keys, values); no mask: the image is all there."""

    def __init__(self, embed_dim: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, embed_dim // n_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.o_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        P = image.size(1)
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(image).view(B, P, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, P, hs)
        v = self.v_proj(image).view(B, P, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, P, hs)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, P) weights @ (B, nh, P, hs) -> (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's GATED XATTN-DENSE block: x + tanh(g_attn) * xattn(x, image); x + tanh(g_mlp) * mlp(x).

    Both gates start at 0 (tanh(0) = 0), so inserting the block leaves the decoder's output unchanged.
    """

    def __init__(self, config: VLMConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.embed_dim)
        self.attn = CrossAttention(config.embed_dim, config.n_heads)
        self.ln_2 = nn.LayerNorm(config.embed_dim)
        self.mlp = MLP(config.decoder_config())
        self.attn_gate = nn.Parameter(torch.zeros(1))  # Flamingo: gates initialised at 0
        self.mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = x + torch.tanh(self.attn_gate) * self.attn(self.ln_1(x), image)  # (B, T, C)
        return x + torch.tanh(self.mlp_gate) * self.mlp(self.ln_2(x))  # (B, T, C)


class Projector(nn.Module):
    """LLaVA-1.5's two-layer MLP from the encoder's width Cv to the decoder's C."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))  # (B, P, Cv) -> (B, P, C)


class MiniVLM(nn.Module):
    """Image encoder + projector + MiniGPT decoder: next-token logits of a caption given its image.

    Example:
        >>> model = MiniVLM(VLMConfig(vocab_size=20))
        >>> logits, loss = model(torch.zeros(2, 3, 16, 16), torch.zeros(2, 5, dtype=torch.long))
        >>> logits.shape, loss
        (torch.Size([2, 5, 20]), None)
    """

    def __init__(self, config: VLMConfig):
        super().__init__()
        self.config = config
        self.encoder = MiniViT(config.vision)
        self.projector = Projector(config.vision.embed_dim, config.embed_dim)
        self.decoder = MiniGPT(config.decoder_config())  # its tok_emb, pos_emb, blocks, ln_f, lm_head
        self.cross_blocks = (nn.ModuleList([GatedCrossAttentionBlock(config) for _ in range(config.n_layers)])
                             if config.cross_attention else None)

    def forward(self, images: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Args: images (B, 3, H, W); idx (B, T) caption ids; targets optional (B, T), -100 = ignore.

        Returns: (logits (B, T, V) for the caption positions only, loss or None).
        """
        if idx.dim() != 2 or idx.size(0) != images.size(0):
            raise ValueError(f"idx must be (batch, tokens) with the images' batch size {images.size(0)}, "
                             f"got {tuple(idx.shape)}")
        B, T = idx.shape
        if T > self.config.max_caption_tokens:
            raise ValueError(f"caption of {T} tokens is longer than max_caption_tokens "
                             f"({self.config.max_caption_tokens}); shorten it or build a VLMConfig with more")
        prefix = self.projector(self.encoder.features(images))  # (B, P, Cv) -> (B, P, C)
        P = prefix.size(1)
        x = torch.cat([prefix, self.decoder.tok_emb(idx)], dim=1)  # (B, P + T, C)
        x = x + self.decoder.pos_emb(torch.arange(P + T, device=idx.device))  # (B, P + T, C) + (P + T, C)
        for layer, block in enumerate(self.decoder.blocks):
            if self.cross_blocks is not None:
                x = self.cross_blocks[layer](x, prefix)
            x = block(x)  # causal: a caption token sees the whole image and the words before it
        logits = self.decoder.lm_head(self.decoder.ln_f(x[:, P:]))  # (B, T, C) -> (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(B * T), ignore_index=-100)
        return logits, loss

    def num_parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.parameters())
