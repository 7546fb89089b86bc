"""Tiny models several test files share: a two-block attention-like model whose Linear leaves carry the
names MiniGPT and Llama use (q_proj, k_proj, v_proj, o_proj), an embedding and an output layer."""

import torch.nn as nn


class TinyAttention(nn.Module):
    """Linear leaves with the names MiniGPT and Llama use."""

    def __init__(self, dim=32):
        super().__init__()
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x):
        return self.o_proj(self.q_proj(x) + self.k_proj(x) * self.v_proj(x))


class TinyModel(nn.Module):
    def __init__(self, dim=32, vocab=20):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([TinyAttention(dim) for _ in range(2)])
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        x = self.tok_emb(idx)
        for block in self.blocks:
            x = x + block(x)
        return self.lm_head(x)
