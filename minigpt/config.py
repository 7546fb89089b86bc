"""GPTConfig: every number that decides MiniGPT's shape, in one frozen dataclass.

The config is saved next to the weights (`config.json`), so a checkpoint always knows how to rebuild
its own model. Frozen, because a model's shape must not change behind its back: to grow the vocabulary
(fine-tuning on new words) make a new config with `dataclasses.replace(config, vocab_size=...)`.

    >>> config = GPTConfig(vocab_size=200)
    >>> config.embed_dim, config.n_heads, config.head_dim
    (64, 4, 16)
"""

from dataclasses import dataclass


MAX_DIVISOR_SEARCH = 10**4  # divisors looks at most this many candidates, so a huge embed_dim costs nothing


def divisors(number: int, limit: int = 12) -> list[int]:
    """Up to `limit` of the smallest divisors of `number` (the n_heads that fit embed_dim), found cheaply.

    Only candidates up to MAX_DIVISOR_SEARCH are tried, with their co-divisors, so the cost is bounded
    whatever `number` is (a config.json from elsewhere may say embed_dim = 10**18).

    Example:
        >>> divisors(64), divisors(10**18, limit=5)
        ([1, 2, 4, 8, 16, 32, 64], [1, 2, 4, 5, 8])
    """
    found = set()
    candidate = 1
    while candidate * candidate <= number and candidate <= MAX_DIVISOR_SEARCH:
        if number % candidate == 0:
            found.update((candidate, number // candidate))
        candidate += 1
    return sorted(found)[:limit]


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int  # rows of tok_emb and lm_head: one per token the tokenizer knows
    context_length: int = 32  # the longest sequence the model sees; sizes pos_emb (sentences here are short)
    embed_dim: int = 64  # C, the width of every token vector; small enough to train on a laptop CPU
    n_layers: int = 2  # transformer blocks; two already learn the course's fact patterns
    n_heads: int = 4  # attention heads per block; embed_dim must divide by it (head size hs = C / nh)
    mlp_ratio: int = 4  # hidden width of the MLP is mlp_ratio * embed_dim, as in GPT-2
    dropout: float = 0.0  # off by default: the corpus is small and we want to memorise its facts
    bias: bool = True  # biases in Linear layers and LayerNorms, as in GPT-2
    use_sdpa: bool = True  # fast path: F.scaled_dot_product_attention; False runs the hand-written attention
    gradient_checkpointing: bool = False  # recompute block activations in backward: less memory, more time

    def __post_init__(self):
        positive = {name: getattr(self, name) for name in
                    ("vocab_size", "context_length", "embed_dim", "n_layers", "n_heads", "mlp_ratio")}
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:  # subtle: True is an int too
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        for name in ("bias", "use_sdpa", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):  # "no" or 0 would silently mean something else
                raise ValueError(f"GPTConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise ValueError(f"GPTConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        if self.embed_dim % self.n_heads != 0:
            raise ValueError(
                f"GPTConfig.embed_dim ({self.embed_dim}) must be divisible by n_heads ({self.n_heads}); "
                f"try n_heads in {divisors(self.embed_dim)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def head_dim(self) -> int:
        """hs, the width of one attention head."""
        return self.embed_dim // self.n_heads
