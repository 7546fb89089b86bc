"""ViTConfig and VLMConfig: every number that decides MiniViT's and MiniVLM's shape, frozen dataclasses.

Saved next to the weights (config.json), like GPTConfig, so a checkpoint rebuilds its own model.

    >>> ViTConfig().n_patches, VLMConfig(vocab_size=20).prefix_length
    (16, 16)
"""

from dataclasses import dataclass

from minigpt.config import GPTConfig


def _check_positive(owner: str, fields: dict) -> None:
    for name, value in fields.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:  # subtle: True is an int too
            raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 16  # pixels per side of the square RGB input
    patch_size: int = 4  # pixels per side of one patch: (16 / 4)^2 = 16 patch tokens
    channels: int = 3  # RGB
    embed_dim: int = 32  # Cv, the width of a patch token; the encoder is smaller than the decoder
    n_layers: int = 2  # transformer blocks (bidirectional: every patch sees every patch)
    n_heads: int = 4  # embed_dim must divide by it
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * embed_dim
    n_classes: int = 9  # the classification head: (colour, shape) of the left object, 3 x 3

    def __post_init__(self):
        _check_positive("ViTConfig", {name: getattr(self, name) for name in
                                      ("image_size", "patch_size", "channels", "embed_dim", "n_layers",
                                       "n_heads", "mlp_ratio", "n_classes")})
        if self.image_size % self.patch_size:
            raise ValueError(f"ViTConfig.image_size ({self.image_size}) must be divisible by patch_size "
                             f"({self.patch_size}): patches tile the image with no remainder")
        self.block_config()  # embed_dim must divide by n_heads: GPTConfig says so

    @property
    def n_patches(self) -> int:
        """P, the number of patch tokens."""
        return (self.image_size // self.patch_size) ** 2

    def block_config(self) -> GPTConfig:
        """The GPTConfig that minigpt's Block and MLP read (width, heads, MLP ratio); vocab_size is unused."""
        return GPTConfig(vocab_size=1, context_length=self.n_patches, embed_dim=self.embed_dim,
                         n_layers=self.n_layers, n_heads=self.n_heads, mlp_ratio=self.mlp_ratio)


@dataclass(frozen=True)
class VLMConfig:
    vocab_size: int  # the caption tokenizer's size: rows of tok_emb and lm_head
    vision: ViTConfig = ViTConfig()  # the image encoder
    embed_dim: int = 64  # C, the decoder's width; the projector maps Cv -> C
    n_layers: int = 2  # decoder blocks
    n_heads: int = 4  # decoder heads
    max_caption_tokens: int = 16  # caption tokens after the image prefix; context = P + this
    cross_attention: bool = True  # a tanh-gated cross-attention block before each decoder block (Flamingo)

    def __post_init__(self):
        if isinstance(self.vision, dict):  # from config.json
            object.__setattr__(self, "vision", ViTConfig(**self.vision))
        if not isinstance(self.vision, ViTConfig):
            raise ValueError(f"VLMConfig.vision must be a ViTConfig, got {self.vision!r}")
        _check_positive("VLMConfig", {name: getattr(self, name) for name in
                                      ("vocab_size", "embed_dim", "n_layers", "n_heads", "max_caption_tokens")})
        if not isinstance(self.cross_attention, bool):
            raise ValueError(f"VLMConfig.cross_attention must be true or false, got {self.cross_attention!r}")
        self.decoder_config()

    @property
    def prefix_length(self) -> int:
        """The image's prefix tokens in the decoder: one per patch."""
        return self.vision.n_patches

    def decoder_config(self) -> GPTConfig:
        """The MiniGPT decoder: its context holds the image prefix and then the caption."""
        return GPTConfig(vocab_size=self.vocab_size, context_length=self.prefix_length + self.max_caption_tokens,
                         embed_dim=self.embed_dim, n_layers=self.n_layers, n_heads=self.n_heads)
