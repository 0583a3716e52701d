"""A small pre-norm transformer encoder whose every linear layer comes from `linear_factory(in, out)`.

Used for the model-level case: the same network with nn.Linear, bayes_ext or BLiTZ layers shows
what the per-layer costs add up to next to attention, layer norms and activations.
"""
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, linear_factory, d_model, n_heads, d_mlp):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = linear_factory(d_model, 3 * d_model)  # fused q, k, v projection
        self.proj = linear_factory(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = linear_factory(d_model, d_mlp)
        self.fc2 = linear_factory(d_mlp, d_model)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        # (b, t, d) -> (b, heads, t, d / heads)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Transformer(nn.Module):
    def __init__(self, linear_factory, n_blocks=4, d_model=512, n_heads=8, d_mlp=2048):
        super().__init__()
        self.blocks = nn.ModuleList(Block(linear_factory, d_model, n_heads, d_mlp)
                                    for _ in range(n_blocks))
        self.ln_f = nn.LayerNorm(d_model)

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.ln_f(x)


def build_transformer(linear_factory, **cfg):
    return Transformer(linear_factory, **cfg)


def transformer_input(batch=8, tokens=128, d_model=512, **_):
    # Continuous inputs stand in for token embeddings: the embedding table is not Bayesian here.
    return torch.randn(batch, tokens, d_model)
