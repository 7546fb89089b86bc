"""MiniGPT: a GPT-2 style decoder small enough to read in one sitting and train on a laptop CPU.

Follows nanoGPT (Karpathy) and GPT-2 (Radford et al., 2019): token + learned position embeddings,
pre-LayerNorm blocks of causal self-attention and an MLP, a final LayerNorm and a linear head.

    idx (B, T) ──tok_emb──┐
                          + ── drop ── [Block] x n_layers ── ln_f ── lm_head ──> logits (B, T, vocab)
    positions ──pos_emb───┘
    Block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))
    attn:   q_proj, k_proj, v_proj -> softmax(q kᵀ / sqrt(hs) + causal mask) v -> o_proj
    mlp:    up_proj -> GELU -> down_proj

The leaf names (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `up_proj`, `down_proj`, `tok_emb`, `pos_emb`,
`lm_head`) are the ones LoRA users type in `target_modules`, the same as in Llama-style models.

Shape notation used in comments: B batch, T time (sequence length), C embed_dim, nh n_heads,
hs head_dim = C / nh, V vocab_size.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minigpt.config import GPTConfig


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, written out by hand with SDPA as the fast path."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.use_sdpa = config.use_sdpa
        # Separate q/k/v projections (rather than nanoGPT's fused c_attn) so LoRA can target each one.
        self.q_proj = nn.Linear(config.embed_dim, config.embed_dim, bias=config.bias)
        self.k_proj = nn.Linear(config.embed_dim, config.embed_dim, bias=config.bias)
        self.v_proj = nn.Linear(config.embed_dim, config.embed_dim, bias=config.bias)
        self.o_proj = nn.Linear(config.embed_dim, config.embed_dim, bias=config.bias)
        self.resid_drop = nn.Dropout(config.dropout)
        # Set record_attention = True to keep the last attention map (the course plots it).
        self.record_attention = False
        self.attention_weights = None  # (B, nh, T, T) after a forward with record_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, C) -> (B, T, nh, hs) -> (B, nh, T, hs)
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        dropout_p = self.dropout if self.training else 0.0
        if self.use_sdpa and not self.record_attention:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)  # (B, nh, T, hs)
        else:
            y = self.manual_attention(q, k, v, dropout_p)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return self.resid_drop(self.o_proj(y))

    def manual_attention(self, q, k, v, dropout_p: float) -> torch.Tensor:
        """softmax(q kᵀ / sqrt(hs) + mask) v (Vaswani et al., 2017, eq. 1) with a causal mask."""
        T = q.size(-2)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, nh, T, hs) @ (B, nh, hs, T) -> (B, nh, T, T)
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(diagonal=1)  # (T, T), True above the diagonal
        scores = scores.masked_fill(future, float("-inf"))  # a token never looks at later tokens
        weights = scores.softmax(dim=-1)  # (B, nh, T, T), each row sums to 1
        if self.record_attention:
            self.attention_weights = weights.detach()
        weights = F.dropout(weights, p=dropout_p, training=dropout_p > 0)
        return weights @ v  # (B, nh, T, T) @ (B, nh, T, hs) -> (B, nh, T, hs)


class MLP(nn.Module):
    """Position-wise feed-forward network: up_proj -> GELU -> down_proj."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden_dim = config.mlp_ratio * config.embed_dim
        self.up_proj = nn.Linear(config.embed_dim, hidden_dim, bias=config.bias)
        self.act = nn.GELU()
        self.down_proj = nn.Linear(hidden_dim, config.embed_dim, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down_proj(self.act(self.up_proj(x))))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """One pre-LayerNorm transformer block (GPT-2 layout)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.embed_dim, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.embed_dim, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


class MiniGPT(nn.Module):
    """A small GPT.

    Example:
        >>> model = MiniGPT(GPTConfig(vocab_size=100))
        >>> logits, loss = model(torch.zeros(2, 5, dtype=torch.long))
        >>> logits.shape, loss
        (torch.Size([2, 5, 100]), None)
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.embed_dim)
        self.pos_emb = nn.Embedding(config.context_length, config.embed_dim)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layers)])
        self.ln_f = nn.LayerNorm(config.embed_dim, bias=config.bias)
        # Not tied to tok_emb (GPT-2 ties them): separate rows keep vocabulary expansion and LoRA on
        # lm_head simple to explain.
        self.lm_head = nn.Linear(config.embed_dim, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layers) so the residual stream's
        # variance does not grow with depth.
        for name, param in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Next-token logits for every position, and the cross-entropy loss if targets are given.

        Args:
            idx: (B, T) token ids, T <= context_length.
            targets: optional (B, T) next-token ids; -100 marks positions to ignore.

        Returns:
            (logits (B, T, V), loss: scalar tensor or None)
        """
        B, T = idx.shape
        if T > self.config.context_length:
            raise ValueError(
                f"sequence of {T} tokens is longer than the model's context_length "
                f"({self.config.context_length}); crop the input to its last {self.config.context_length} tokens")
        positions = torch.arange(T, device=idx.device)  # (T,)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(positions))  # (B, T, C) + (T, C) -> (B, T, C)
        for block in self.blocks:
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)  # keep only x; recompute inside in backward
            else:
                x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, C) -> (B, T, V)
        loss = None
        if targets is not None:
            # (B, T, V) -> (B*T, V) against (B*T,)
            loss = F.cross_entropy(logits.reshape(B * T, -1).float(), targets.reshape(B * T), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Extend idx (B, T) by sampling max_new_tokens tokens one at a time.

        Each step feeds the last context_length tokens, takes the logits of the last position and
        samples the next token from softmax(logits / temperature).

        Args:
            idx: (B, T) token ids, the prompts; T may exceed context_length (only the end is seen).
            max_new_tokens: how many tokens to append (0 returns idx unchanged).
            temperature: > 0 scales the logits (below 1: surer, above 1: more varied); 0 always picks
                the most likely token (greedy, no randomness). Any finite value works: 1e-300 is as
                good as greedy, 1e300 as good as uniform.
            top_k: sample only among the k most likely tokens (k >= 1; 1 is greedy); None: among all.
            generator: a seeded torch.Generator repeats the same samples.

        Returns:
            (B, T + max_new_tokens) token ids: idx followed by the new tokens.

        Example: greedy decoding past the context window (context_length 4, 6 new tokens).

            >>> _ = torch.manual_seed(0)
            >>> model = MiniGPT(GPTConfig(vocab_size=10, context_length=4, embed_dim=8, n_heads=2)).eval()
            >>> idx = torch.tensor([[2, 5, 7]])  # (B=1, T=3)
            >>> out = model.generate(idx, max_new_tokens=6, temperature=0)
            >>> out.shape, out[:, :3].tolist(), bool((out < 10).all())
            (torch.Size([1, 9]), [[2, 5, 7]], True)
            >>> torch.equal(out, model.generate(idx, max_new_tokens=6, top_k=1))  # top_k=1 is greedy too
            True
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                or not 0 <= temperature < math.inf):  # subtle: NaN fails the comparison too
            raise ValueError(f"temperature must be a number >= 0 and finite (0 = greedy, 1 = the model's own "
                             f"probabilities), got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1 (the k most likely tokens; 1 = greedy) or None "
                             f"(no limit), got {top_k!r}")
        for _ in range(max_new_tokens):
            window = idx[:, -self.config.context_length:]  # (B, <= context_length)
            logits, _ = self(window)
            logits = logits[:, -1, :].float()  # (B, V), the last position only
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                # subtle: logits / 1e-30 overflows to inf, and softmax of inf is NaN. Shifted by their max the
                # logits are <= 0, so dividing can only underflow to -inf (probability 0); in float64, as
                # float32 would turn a temperature below ~1e-45 into 0 (and 0 / 0 into NaN)
                logits = logits.double()
                logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # (B, V), max 0
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat([idx, next_id], dim=1)  # (B, T + 1)
        return idx

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
