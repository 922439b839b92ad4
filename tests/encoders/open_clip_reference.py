"""OpenCLIP's CLIP (open_clip.model.CLIP with a ViT image tower), in PyTorch, for the converter's parity test.

open_clip_torch cannot be installed beside the CPU PyTorch here (it needs torchvision, whose PyPI build does
not load with torch's CPU build), so this is its module tree, with its parameter names and its computation,
written from open_clip/transformer.py (3.3.0): ResidualAttentionBlock (torch MultiheadAttention, q/k/v packed
in in_proj), VisionTransformer (conv1 without bias, class token, ln_pre, ln_post on the class token,
`@ proj`), TextTransformer's causal mask and argmax pooling, the text tower's parts at the top level. The
state_dict's names and the embeddings were checked equal to open_clip 3.3.0's own (the closing note of the
session that added it says how).
"""

from collections import OrderedDict

import torch
from torch import nn


class QuickGELU(nn.Module):
  def forward(self, x):
    return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
  def __init__(self, width, heads, mlp_width, act):
    super().__init__()
    self.ln_1 = nn.LayerNorm(width)
    self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
    self.ln_2 = nn.LayerNorm(width)
    self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, mlp_width)), ("gelu", act()),
                                          ("c_proj", nn.Linear(mlp_width, width))]))

  def forward(self, x, attn_mask=None):
    y = self.ln_1(x)
    x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
    return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
  def __init__(self, width, layers, heads, mlp_width, act):
    super().__init__()
    self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_width, act) for _ in range(layers)])

  def forward(self, x, attn_mask=None):
    for block in self.resblocks:
      x = block(x, attn_mask)
    return x


class VisionTransformer(nn.Module):
  def __init__(self, image_size, patch_size, width, layers, heads, mlp_width, output_dim, act):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)
    self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5)
    self.positional_embedding = nn.Parameter(torch.randn((image_size // patch_size) ** 2 + 1, width) * width ** -0.5)
    self.ln_pre = nn.LayerNorm(width)
    self.transformer = Transformer(width, layers, heads, mlp_width, act)
    self.ln_post = nn.LayerNorm(width)
    self.proj = nn.Parameter(torch.randn(width, output_dim) * width ** -0.5)

  def forward(self, x):  # (B, 3, S, S)
    x = self.conv1(x)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = self.class_embedding.expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + self.positional_embedding
    x = self.transformer(self.ln_pre(x))
    x = self.ln_post(x)
    return x[:, 0] @ self.proj


class CLIP(nn.Module):
  def __init__(self, *, embed_dim, image_size, patch_size, vision_width, vision_layers, vision_heads,
               vocab_size, context_length, text_width, text_layers, text_heads, quick_gelu=False, mlp_ratio=4.0):
    super().__init__()
    act = QuickGELU if quick_gelu else nn.GELU
    self.visual = VisionTransformer(image_size, patch_size, vision_width, vision_layers, vision_heads,
                                    int(vision_width * mlp_ratio), embed_dim, act)
    self.transformer = Transformer(text_width, text_layers, text_heads, int(text_width * mlp_ratio), act)
    self.token_embedding = nn.Embedding(vocab_size, text_width)
    self.positional_embedding = nn.Parameter(torch.randn(context_length, text_width) * 0.01)
    self.ln_final = nn.LayerNorm(text_width)
    self.text_projection = nn.Parameter(torch.randn(text_width, embed_dim) * text_width ** -0.5)
    self.logit_scale = nn.Parameter(torch.ones([]) * 2.659)
    mask = torch.full((context_length, context_length), float("-inf")).triu(1)
    self.register_buffer("attn_mask", mask, persistent=False)

  def encode_image(self, pixels):
    return self.visual(pixels)

  def encode_text(self, text):
    x = self.token_embedding(text) + self.positional_embedding
    x = self.ln_final(self.transformer(x, self.attn_mask))
    return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection
