"""PixArt-α: the diffusion transformer (DiT with adaLN-single and T5 cross-attention), hand-written.

    config (PixArtConfig, release factories) -> layers -> PixArtDiT -> original .pth key mapping -> load_pixart

Parameter names equal diffusers' `PixArtTransformer2DModel` state-dict keys, so a diffusers folder loads as it
is; the original PixArt `.pth` files are renamed on load. The network maps (x_t, t, caption embeddings) to
ε and the learned variance (8 channels, float32); teachers.py turns that into x0.
"""
import contextlib
import math
import os
import re
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from models import (MLP2, Attention, FeedForward, JSONConfig, build_and_load, checkpointed, component_folder,
                    read_state_dict, timestep_embedding)


#################################################################################
#                                 Configs                                       #
#################################################################################

@dataclass
class PixArtConfig(JSONConfig):
    """Hyper-parameters of a PixArt-α transformer; names and defaults as in diffusers' transformer/config.json."""
    CLASS_NAMES = ("PixArtTransformer2DModel", "Transformer2DModel")
    FIXED = {"norm_type": "ada_norm_single", "activation_fn": "gelu-approximate", "attention_bias": True,
             "norm_elementwise_affine": False, "attention_type": "default", "dropout": 0.0, "upcast_attention": False,
             "only_cross_attention": False, "double_self_attention": False, "use_linear_projection": False,
             "num_vector_embeds": None}
    IGNORED = ("norm_num_groups", "num_embeds_ada_norm")   # stored in config.json, unused by PixArt's forward

    num_layers: int = 28
    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: int = 8                     # 4 ε channels + 4 learned-variance channels
    sample_size: int = 128                    # latent side the model was trained at
    patch_size: int = 2
    caption_channels: int = 4096              # T5-XXL width
    cross_attention_dim: int = 1152
    interpolation_scale: float = None         # pos-embed scale (`lewei_scale`); None: max(sample_size // 64, 1)
    use_additional_conditions: bool = None    # 1024-MS micro-conditions; None: sample_size == 128
    norm_eps: float = 1e-6

    def __post_init__(self):
        if self.caption_channels is None:
            raise ValueError("caption_channels=None is not supported; PixArt-α needs the T5 width (4096)")
        if self.out_channels is None:
            self.out_channels = self.in_channels
        if self.interpolation_scale is None:
            self.interpolation_scale = max(self.sample_size // 64, 1)
        if self.use_additional_conditions is None:
            self.use_additional_conditions = self.sample_size == 128
        D = self.hidden_size
        if self.cross_attention_dim != D:
            raise ValueError(f"cross_attention_dim={self.cross_attention_dim} must equal num_attention_heads * "
                             f"attention_head_dim = {D}: the caption projection outputs that width")
        if D % 4 or (self.use_additional_conditions and D % 3):
            raise ValueError(f"hidden size {D} must be divisible by 4 (2-D pos-embed) and, with "
                             "use_additional_conditions, by 3 (resolution + aspect-ratio embeddings)")

    @property
    def hidden_size(self):
        return self.num_attention_heads * self.attention_head_dim

def pixart_xl_2_512_config():      # PixArt-XL-2-512x512: 28 x 1152, 64x64 latents, no micro-conditions
    return PixArtConfig(sample_size=64, interpolation_scale=1, use_additional_conditions=False)


def pixart_xl_2_1024_ms_config():  # PixArt-XL-2-1024-MS: 128x128 latents, resolution / aspect-ratio conditions
    return PixArtConfig(sample_size=128, interpolation_scale=2, use_additional_conditions=True)


def _as_config(config):
    """A PixArtConfig from a PixArtConfig, a diffusers config dict or a config.json path."""
    return config if isinstance(config, PixArtConfig) else PixArtConfig.from_json(config)


#################################################################################
#                          Embedding layers                                     #
#################################################################################

def modulate(x, shift, scale):
    """adaLN modulation x * (1 + scale) + shift."""
    return x * (1 + scale) + shift


def _sincos_1d(dim, pos):
    """[sin(pos * w), cos(pos * w)] with w_k = 10000^(-k / (dim/2)): (M,) -> (M, dim), in float64."""
    dtype = torch.float32 if pos.device.type == "mps" else torch.float64
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=dtype, device=pos.device) / (dim / 2))
    out = pos.to(dtype)[:, None] * omega[None]                    # (M, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1)               # (M, dim)


def sincos_pos_embed_2d(dim, h, w, base_size, interpolation_scale, device=None):
    """(h*w, dim) embedding of a row-major token grid, each axis rescaled to span base_size / interpolation_scale."""
    gy = torch.arange(h, dtype=torch.float32, device=device) / (h / base_size) / interpolation_scale   # (h,)
    gx = torch.arange(w, dtype=torch.float32, device=device) / (w / base_size) / interpolation_scale   # (w,)
    gy, gx = torch.meshgrid(gy, gx, indexing="ij")                                                      # (h, w)
    emb = torch.cat([_sincos_1d(dim // 2, gx.flatten()), _sincos_1d(dim // 2, gy.flatten())], dim=1)   # (h*w, dim)
    return emb.float()


class PatchEmbed(nn.Module):
    """p x p patches -> tokens, plus the 2-D sin-cos position embedding of the actual grid."""
    def __init__(self, in_channels, dim, patch_size, base_size, interpolation_scale):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.base_size, self.interpolation_scale = base_size, interpolation_scale

    def forward(self, x):
        # The conv (kernel = stride = p) is a linear map of each flattened patch; run as one, it needs no cuDNN
        # plan per batch size (the rollout's per-sample early stop makes a new batch size almost every call).
        p, (h, w) = self.proj.stride[0], (x.shape[2] // self.proj.stride[0], x.shape[3] // self.proj.stride[1])
        x = rearrange(x, "b c (h p) (w q) -> b (h w) (c p q)", p=p, q=p)                 # (B, h*w, C*p*p)
        x = F.linear(x, self.proj.weight.flatten(1), self.proj.bias)                     # (B, h*w, D)
        D = x.shape[-1]
        pos = sincos_pos_embed_2d(D, h, w, self.base_size, self.interpolation_scale, device=x.device)
        return (x + pos[None]).to(x.dtype)


class ConditionEmbedder(nn.Module):
    """Timestep embedding, plus (1024-MS) resolution and aspect-ratio embeddings: -> emb (B, D)."""
    def __init__(self, dim, micro_conditions):
        super().__init__()
        self.timestep_embedder = MLP2(256, dim)
        self.micro_conditions = micro_conditions
        if micro_conditions:
            self.resolution_embedder = MLP2(256, dim // 3)     # applied to height and width separately
            self.aspect_ratio_embedder = MLP2(256, dim // 3)

    def forward(self, t, resolution=None, aspect_ratio=None):
        dtype = self.timestep_embedder.linear_1.weight.dtype
        emb = self.timestep_embedder(timestep_embedding(t, 256).to(dtype))                # (B, D)
        if self.micro_conditions:
            B = t.shape[0]
            res = timestep_embedding(resolution.reshape(-1), 256).to(dtype)              # (B*2, 256)
            res = self.resolution_embedder(res).reshape(B, -1)                           # (B, 2D/3)
            ar = timestep_embedding(aspect_ratio.reshape(-1), 256).to(dtype)             # (B, 256)
            ar = self.aspect_ratio_embedder(ar).reshape(B, -1)                           # (B, D/3)
            emb = emb + torch.cat([res, ar], dim=1)
        return emb


class AdaLNSingle(nn.Module):
    """adaLN-single: one Linear maps emb to the six modulation vectors shared by every block."""
    def __init__(self, dim, micro_conditions):
        super().__init__()
        self.emb = ConditionEmbedder(dim, micro_conditions)
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, t, resolution=None, aspect_ratio=None, extra_emb=None):
        emb = self.emb(t, resolution, aspect_ratio)               # (B, D)
        if extra_emb is not None:                                 # e.g. TDM-unify's step-count embedding
            emb = emb + extra_emb
        return self.linear(F.silu(emb)), emb                      # (B, 6D), (B, D)


#################################################################################
#                          Transformer blocks                                   #
#################################################################################

class PixArtBlock(nn.Module):
    """Self-attention and MLP modulated by the shared t6 plus this block's table; plain cross-attention between."""
    def __init__(self, dim, heads, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.attn1 = Attention(dim, heads)
        self.attn2 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.ff = FeedForward(dim)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim ** 0.5)

    def forward(self, x, t6, context, bias):
        """x: (B, N, D) image tokens; t6: (B, 6D); context: (B, L, D) captions; bias: (B, 1, 1, L) or None."""
        mods = self.scale_shift_table[None] + t6.reshape(x.shape[0], 6, -1)   # (B, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.chunk(6, dim=1)   # 6 x (B, 1, D)
        x = x + gate_msa * self.attn1(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.attn2(x, context, bias)                     # no norm, no modulation, no gate
        x = x + gate_mlp * self.ff(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


#################################################################################
#                          PixArt-α transformer                                 #
#################################################################################

class PixArtDiT(nn.Module):
    """PixArt-α: (B, C, H, W) latents, timesteps and T5 captions -> (B, out_channels, H, W) (ε and variance),
    float32 whatever the weights' dtype."""
    def __init__(self, config):
        super().__init__()
        c = self.config = _as_config(config)
        D, p = c.hidden_size, c.patch_size
        self.gradient_checkpointing = False
        self.pos_embed = PatchEmbed(c.in_channels, D, p, c.sample_size // p, c.interpolation_scale)
        self.adaln_single = AdaLNSingle(D, c.use_additional_conditions)
        self.caption_projection = MLP2(c.caption_channels, D, act=partial(F.gelu, approximate="tanh"))
        self.transformer_blocks = nn.ModuleList(
            PixArtBlock(D, c.num_attention_heads, c.norm_eps) for _ in range(c.num_layers))
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, D) / D ** 0.5)
        self.proj_out = nn.Linear(D, p * p * c.out_channels)
        self.register_buffer("null_caption", None, persistent=False)   # original .pth `y_embedding`, if loaded
        self.emb_dim = D                                          # width of `extra_emb`

    def forward(self, x, timestep, encoder_hidden_states, encoder_attention_mask=None, added_cond_kwargs=None,
                extra_emb=None):
        """x: (B, C, H, W); timestep: (B,) or scalar in [0, 1000); encoder_hidden_states: (B, L, caption_channels);
        encoder_attention_mask: (B, L) tokenizer mask (1 keep, 0 pad);
        added_cond_kwargs (1024-MS only): {'resolution': (B, 2) pixel height/width, 'aspect_ratio': (B, 1)};
        extra_emb: None or (B, D), added to the timestep embedding (models.StepCountEmbedding passes one)."""
        c, (B, _, H, W) = self.config, x.shape
        dtype = self.proj_out.weight.dtype                        # run in the weights' precision (bf16 base + LoRA)
        x, encoder_hidden_states = x.to(dtype), encoder_hidden_states.to(dtype)
        p = c.patch_size
        if H % p or W % p:
            raise ValueError(f"latent size {H}x{W} must be divisible by patch_size={p}")
        t = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(B)       # (B,)
        cond = {}
        if c.use_additional_conditions:
            if not added_cond_kwargs or not {"resolution", "aspect_ratio"} <= set(added_cond_kwargs):
                raise ValueError("this model uses micro-conditions: pass added_cond_kwargs={'resolution': (B, 2) "
                                 "[height, width] in pixels, 'aspect_ratio': (B, 1) height / width}")
            cond = {k: added_cond_kwargs[k] for k in ("resolution", "aspect_ratio")}
        bias = None
        if encoder_attention_mask is not None:                    # 0/1 mask -> additive bias, as diffusers
            bias = (1 - encoder_attention_mask.to(x.dtype)) * -10000.0    # (B, L)
            bias = bias[:, None, None, :]                         # (B, 1, 1, L): broadcast over heads and queries

        h, w = H // p, W // p
        tokens = self.pos_embed(x)                                # (B, h*w, D)
        t6, emb = self.adaln_single(t, **cond, extra_emb=extra_emb)   # (B, 6D), (B, D)
        context = self.caption_projection(encoder_hidden_states)  # (B, L, D)
        for block in self.transformer_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = checkpointed(block, tokens, t6, context, bias)
            else:
                tokens = block(tokens, t6, context, bias)

        shift, scale = (self.scale_shift_table[None] + emb[:, None]).chunk(2, dim=1)    # 2 x (B, 1, D); uses emb
        h_out = modulate(self.norm_out(tokens), shift, scale)                         # (B, h*w, D)
        # The output projection runs in fp32 whatever the weights' dtype or autocast, and returns fp32:
        # x0 = (x_t - sigma eps) / alpha multiplies eps's rounding error by sigma / alpha (docs/method.md §12).
        with torch.autocast(x.device.type, enabled=False):
            out = F.linear(h_out.float(), self.proj_out.weight.float(), self.proj_out.bias.float())  # (B, h*w, p*p*C)
        out = out.reshape(B, h, w, p, p, c.out_channels)                             # (B, h, w, p, p, C)
        out = out.permute(0, 5, 1, 3, 2, 4)                                          # (B, C, h, p, w, p)
        return out.reshape(B, c.out_channels, H, W)                                  # (B, C, H, W)


def dit_from_config(config, device=None):
    """Build a PixArtDiT from a PixArtConfig, dict or config.json path; device='meta' allocates no memory."""
    config = _as_config(config)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return PixArtDiT(config)


#################################################################################
#                          Checkpoint loading                                   #
#################################################################################

_ORIGINAL_RENAMES = [   # original PixArt key prefix -> diffusers key prefix (outside the blocks)
    ("x_embedder.proj.", "pos_embed.proj."),
    ("t_embedder.mlp.0.", "adaln_single.emb.timestep_embedder.linear_1."),
    ("t_embedder.mlp.2.", "adaln_single.emb.timestep_embedder.linear_2."),
    ("csize_embedder.mlp.0.", "adaln_single.emb.resolution_embedder.linear_1."),
    ("csize_embedder.mlp.2.", "adaln_single.emb.resolution_embedder.linear_2."),
    ("ar_embedder.mlp.0.", "adaln_single.emb.aspect_ratio_embedder.linear_1."),
    ("ar_embedder.mlp.2.", "adaln_single.emb.aspect_ratio_embedder.linear_2."),
    ("t_block.1.", "adaln_single.linear."),
    ("y_embedder.y_proj.fc1.", "caption_projection.linear_1."),
    ("y_embedder.y_proj.fc2.", "caption_projection.linear_2."),
    ("final_layer.linear.", "proj_out."),
    ("final_layer.scale_shift_table", "scale_shift_table"),
]
_ORIGINAL_BLOCK_RENAMES = [   # inside blocks.N. -> transformer_blocks.N.; a tuple splits a fused tensor by rows
    ("scale_shift_table", "scale_shift_table"), ("attn.proj.", "attn1.to_out.0."),
    ("attn.qkv.", ("attn1.to_q.", "attn1.to_k.", "attn1.to_v.")),              # rows [q; k; v]
    ("cross_attn.q_linear.", "attn2.to_q."), ("cross_attn.kv_linear.", ("attn2.to_k.", "attn2.to_v.")),  # [k; v]
    ("cross_attn.proj.", "attn2.to_out.0."), ("mlp.fc1.", "ff.net.0.proj."), ("mlp.fc2.", "ff.net.2."),
]
_ORIGINAL_BUFFERS = ("pos_embed", "y_embedder.y_embedding")   # fixed pos-embed (recomputed); null caption


def original_to_diffusers(sd):
    """Rename an original PixArt state dict to diffusers keys, splitting fused qkv / kv; drops the two buffers."""
    out, unknown = {}, []
    for key, v in sd.items():
        if key in _ORIGINAL_BUFFERS:
            continue
        block, rest = re.fullmatch(r"(blocks\.\d+\.)?(.+)", key).groups()
        prefix = "transformer_" + block if block else ""
        for old, new in _ORIGINAL_BLOCK_RENAMES if block else _ORIGINAL_RENAMES:
            if rest.startswith(old):
                parts = new if isinstance(new, tuple) else (new,)
                for part, chunk in zip(parts, v.chunk(len(parts), dim=0)):
                    out[prefix + part + rest[len(old):]] = chunk
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unexpected keys in original PixArt checkpoint: {unknown[:8]} ({len(unknown)} in all); "
                         "is this a PixArt-α checkpoint?")
    return out


def infer_original_config(sd, filename=""):
    """Release config of an original .pth: 1024-MS if it has micro-condition embedders, latent size from
    the stored pos_embed (else the file name)."""
    micro = any(k.startswith("csize_embedder.") for k in sd)
    if "pos_embed" in sd:
        side = round(math.sqrt(sd["pos_embed"].shape[1])) * sd["x_embedder.proj.weight"].shape[-1]
    elif "1024" in filename or "512" in filename:
        side = 128 if "1024" in filename else 64
    else:
        side = 128 if micro else 64
    return PixArtConfig(sample_size=side, use_additional_conditions=micro)


def load_pixart(path, config=None, device="cpu", dtype=None):
    """Load PixArt-α from a diffusers model folder, its transformer/ sub-folder, or an original PixArt .pth.

    `config` (PixArtConfig, dict or config.json path) overrides the folder's config.json or, for a .pth,
    the release config inferred from its keys and file name. dtype None keeps the checkpoint's own dtype.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"PixArt weights not found: {path!r} does not exist; pass the diffusers model "
                                "folder, its transformer/ sub-folder, or PixArt-XL-2-*.pth")
    if os.path.isdir(path):
        folder = component_folder(path, "transformer", ", or an original PixArt .pth file")
        config = os.path.join(folder, "config.json") if config is None else config
        sd, source = read_state_dict(folder), folder
    else:
        sd, source = read_state_dict(path), path

    null_caption = None
    if "x_embedder.proj.weight" in sd:                         # original PixArt layout
        config = config if config is not None else infer_original_config(sd, os.path.basename(path))
        null_caption = sd.get("y_embedder.y_embedding")
        sd = original_to_diffusers(sd)
    elif "pos_embed.proj.weight" not in sd:
        raise ValueError(f"unknown checkpoint layout in {source!r}: neither diffusers keys (pos_embed.proj.weight) "
                         f"nor original PixArt keys (x_embedder.proj.weight); first keys: {sorted(sd)[:5]}")
    config = _as_config(config)
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")}
    if len(blocks) != config.num_layers:
        raise ValueError(f"config num_layers={config.num_layers} but the weights in {source!r} have {len(blocks)} "
                         "transformer blocks; the config does not belong to these weights")

    model = build_and_load(lambda: dit_from_config(config), sd, f"PixArt transformer from {source!r}", dtype).to(device)
    if null_caption is not None:
        model.null_caption = null_caption.to(device=device, dtype=model.proj_out.weight.dtype)
    return model
