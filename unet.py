"""The Stable Diffusion UNet (diffusers UNet2DConditionModel) of SD1.5 and SDXL base, hand-written.

    config (UNetConfig, release factories) -> layers -> blocks -> UNet -> LDM key mapping -> load_unet

Parameter names equal diffusers' `UNet2DConditionModel` state-dict keys, so a diffusers pipeline folder (unet/) or
the unet/ folder itself loads as it is, including the fp16 variant and sharded weights. Original single files
(`v1-5-pruned-emaonly.safetensors`, `sd_xl_base_1.0.safetensors`, .ckpt too) hold the UNet as `model.diffusion_model.*`
in LDM naming: `ldm_unet_modules` derives the renaming from the config's block layout, `single_file_release` tells the
release from the keys. One config-driven class covers both releases: SD1.5 (conv proj_in/proj_out, one transformer
layer per attention, no added conditions) and SDXL base (linear projections, deeper transformers, `text_time`
micro-conditions). The network maps (x_t, t, text embeddings) to ε, float32; teachers.py turns that into x0.
"""
import contextlib
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import (MLP2, Attention, FeedForward, JSONConfig, build_and_load, checkpoint_shapes, checkpointed,
                    component_folder, read_state_dict, timestep_embedding)


#################################################################################
#                                 Configs                                       #
#################################################################################

DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclass
class UNetConfig(JSONConfig):
    """Hyper-parameters of the UNet; names and defaults as in diffusers' unet/config.json (its __init__ defaults).

    attention_head_dim is, as in diffusers, the number of heads (an int, or one per block); transformer_layers_per_block
    is the depth of each attention (an int, or one per down block; up blocks use the reverse, the mid block the last).
    """
    CLASS_NAMES = ("UNet2DConditionModel",)
    FIXED = {"act_fn": "silu", "mid_block_type": "UNetMidBlock2DCrossAttn", "center_input_sample": False,
             "only_cross_attention": False, "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0,
             "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
             "num_attention_heads": None, "dual_cross_attention": False, "class_embed_type": None,
             "num_class_embeds": None, "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
             "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional", "time_embedding_dim": None,
             "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
             "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
             "class_embeddings_concat": False, "mid_block_only_cross_attention": None, "cross_attention_norm": None}
    IGNORED = ("addition_embed_type_num_heads",)     # used only by addition_embed_type "text" / "text_image"

    sample_size: int = None                   # latent side the model was trained at (64 SD1.5, 128 SDXL)
    in_channels: int = 4
    out_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: object = 1  # int or one per down block
    attention_head_dim: object = 8            # heads: int or one per block
    use_linear_projection: bool = False
    addition_embed_type: str = None           # None or "text_time" (SDXL)
    addition_time_embed_dim: int = None       # 256 for SDXL
    projection_class_embeddings_input_dim: int = None   # 2816 = 1280 pooled text + 6 * 256 time ids for SDXL
    upcast_attention: bool = False

    def __post_init__(self):
        n = len(self.block_out_channels)
        self.block_out_channels, self.down_block_types = tuple(self.block_out_channels), tuple(self.down_block_types)
        self.up_block_types = tuple(self.up_block_types)
        for key in ("attention_head_dim", "transformer_layers_per_block"):
            v = getattr(self, key)
            v = tuple(v) if isinstance(v, (list, tuple)) else v
            if isinstance(v, tuple) and len(v) != n:
                raise ValueError(f"{key}={list(v)} needs one value per block ({n})")
            setattr(self, key, v)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"down_block_types / up_block_types need {n} entries (one per block_out_channels)")
        for key, allowed in (("down_block_types", DOWN_TYPES), ("up_block_types", UP_TYPES)):
            bad = [t for t in getattr(self, key) if t not in allowed]
            if bad:
                raise ValueError(f"{key}={bad} is not implemented; only {list(allowed)}")
        if not isinstance(self.layers_per_block, int) or not isinstance(self.cross_attention_dim, int):
            raise ValueError("layers_per_block and cross_attention_dim per block are not implemented; give one int")
        if self.upcast_attention:               # SD2.x; SD1.5 and SDXL store false / null
            raise ValueError("upcast_attention=True is not implemented; UNetConfig needs upcast_attention=False")
        self.upcast_attention = False
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"addition_embed_type={self.addition_embed_type!r} is not implemented; "
                             "UNetConfig needs addition_embed_type None or 'text_time' (SDXL)")
        if self.addition_embed_type and not (self.addition_time_embed_dim
                                             and self.projection_class_embeddings_input_dim):
            raise ValueError("addition_embed_type='text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim")

    def heads(self, i):
        h = self.attention_head_dim
        return h[i] if isinstance(h, tuple) else h

    def depth(self, i):
        d = self.transformer_layers_per_block
        return d[i] if isinstance(d, tuple) else d

    @property
    def time_embed_dim(self):
        return 4 * self.block_out_channels[0]

    @property
    def pooled_text_dim(self):
        """SDXL: the width of the pooled text vector in the added embedding (1280), beside the six time ids."""
        return self.projection_class_embeddings_input_dim - 6 * self.addition_time_embed_dim


def sd15_unet_config():       # runwayml / stable-diffusion-v1-5 unet/config.json: 859,520,964 parameters
    return UNetConfig(sample_size=64, cross_attention_dim=768)


def sdxl_base_unet_config():  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json: 2,567,463,684 parameters
    return UNetConfig(sample_size=128, block_out_channels=(320, 640, 1280),
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      cross_attention_dim=2048, attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                      use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=2816)


def _as_config(config):
    if isinstance(config, UNetConfig):
        return config
    return UNetConfig.from_json(config)          # a dict or a config.json path


#################################################################################
#                          Layers                                               #
#################################################################################

class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-Conv, plus the projected time embedding, GroupNorm-SiLU-Conv; 1x1 conv shortcut when the width
    changes."""
    def __init__(self, cin, cout, temb_dim, groups, eps):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb):
        """x: (B, cin, H, W); temb: (B, temb_dim) -> (B, cout, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention on the text, GEGLU MLP; q/k/v without bias."""
    def __init__(self, dim, heads, context_dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim=context_dim, bias=False)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, "geglu")

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)      # no padding mask: padded text tokens are real context
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, proj_in (1x1 conv before flattening, or linear after), `depth` blocks, proj_out, residual."""
    def __init__(self, dim, heads, depth, context_dim, groups, linear):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        proj = (lambda: nn.Linear(dim, dim)) if linear else (lambda: nn.Conv2d(dim, dim, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock(dim, heads, context_dim) for _ in range(depth))
        self.proj_out = proj()

    def forward(self, x, context):
        """x: (B, C, H, W); context: (B, L, context_dim) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)              # (B, HW, C)
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)               # (B, C, H, W)
        if not self.linear:
            h = self.proj_out(h)
        return h + x


def spatial_transformer(c, dim, heads, depth):
    """A block's Transformer2DModel as the UNetConfig `c` lays it out (context width, norm groups, projections)."""
    return Transformer2DModel(dim, heads, depth, c.cross_attention_dim, c.norm_num_groups, c.use_linear_projection)


class Downsample2D(nn.Module):
    """3x3 conv, stride 2, padding 1 (key `conv`)."""
    def __init__(self, dim):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling to `size` (2x, or the next skip's size for odd latents), then 3x3 conv."""
    def __init__(self, dim):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


#################################################################################
#                          Blocks                                               #
#################################################################################

class DownBlock(nn.Module):
    """`layers` resnets (each followed by a transformer in CrossAttnDownBlock2D), then an optional downsampler.
    Returns the output and the skips: every layer's output and the downsampler's."""
    def __init__(self, cin, cout, temb_dim, c, layers, heads, depth, attention, downsample):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(cin if i == 0 else cout, cout, temb_dim, c.norm_num_groups,
                                                   c.norm_eps) for i in range(layers))
        if attention:
            self.attentions = nn.ModuleList(spatial_transformer(c, cout, heads, depth) for _ in range(layers))
        if downsample:
            self.downsamplers = nn.ModuleList([Downsample2D(cout)])

    def forward(self, h, temb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if hasattr(self, "attentions"):
                h = self.attentions[i](h, context)
            skips.append(h)
        if hasattr(self, "downsamplers"):
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, tuple(skips)


class UpBlock(nn.Module):
    """`layers` resnets on [h, skip] (popped from the end; each followed by a transformer in CrossAttnUpBlock2D),
    then an optional upsampler to `size`."""
    def __init__(self, cin, cprev, cout, temb_dim, c, layers, heads, depth, attention, upsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D((cprev if i == 0 else cout) + (cin if i == layers - 1 else cout), cout, temb_dim,
                          c.norm_num_groups, c.norm_eps) for i in range(layers))
        if attention:
            self.attentions = nn.ModuleList(spatial_transformer(c, cout, heads, depth) for _ in range(layers))
        if upsample:
            self.upsamplers = nn.ModuleList([Upsample2D(cout)])

    def forward(self, h, skips, temb, context, size=None):
        for i, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips[-1 - i]], dim=1), temb)   # [h, skip], h first, as diffusers and LDM
            if hasattr(self, "attentions"):
                h = self.attentions[i](h, context)
        if hasattr(self, "upsamplers"):
            h = self.upsamplers[0](h, size)
        return h


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, transformer, resnet."""
    def __init__(self, dim, temb_dim, c, heads, depth):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(dim, dim, temb_dim, c.norm_num_groups, c.norm_eps) for _ in range(2))
        self.attentions = nn.ModuleList([spatial_transformer(c, dim, heads, depth)])

    def forward(self, h, temb, context):
        h = self.resnets[0](h, temb)
        return self.resnets[1](self.attentions[0](h, context), temb)


#################################################################################
#                          UNet                                                 #
#################################################################################

class UNet(nn.Module):
    """UNet2DConditionModel: (B, 4, H, W) latents, timesteps and text embeddings (plus SDXL's pooled text and
    time ids) -> ε (B, out_channels, H, W), float32 whatever the weights' dtype."""
    def __init__(self, config):
        super().__init__()
        c = self.config = _as_config(config)
        chans, n, L = c.block_out_channels, len(c.block_out_channels), c.layers_per_block
        T = self.emb_dim = c.time_embed_dim                      # width of the time embedding and of `extra_emb`
        self.gradient_checkpointing = False
        self.conv_in = nn.Conv2d(c.in_channels, chans[0], 3, padding=1)
        self.time_embedding = MLP2(chans[0], T)
        if c.addition_embed_type == "text_time":
            self.add_embedding = MLP2(c.projection_class_embeddings_input_dim, T)
        self.down_blocks = nn.ModuleList(
            DownBlock(chans[max(i - 1, 0)], chans[i], T, c, L, c.heads(i), c.depth(i),
                      attention=t == "CrossAttnDownBlock2D", downsample=i < n - 1)
            for i, t in enumerate(c.down_block_types))
        self.mid_block = MidBlock(chans[-1], T, c, c.heads(n - 1), c.depth(n - 1))
        rev = chans[::-1]
        self.up_blocks = nn.ModuleList(
            UpBlock(rev[min(i + 1, n - 1)], rev[max(i - 1, 0)], rev[i], T, c, L + 1, c.heads(n - 1 - i),
                    c.depth(n - 1 - i), attention=t == "CrossAttnUpBlock2D", upsample=i < n - 1)
            for i, t in enumerate(c.up_block_types))
        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, chans[0], eps=c.norm_eps)
        self.conv_out = nn.Conv2d(chans[0], c.out_channels, 3, padding=1)

    def _run(self, block, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpointed(block, *args)
        return block(*args)

    def time_embed(self, timestep, B, device, dtype, added_cond_kwargs=None, extra_emb=None):
        """(B, emb_dim): the timestep MLP, plus SDXL's add_embedding of [pooled text, time ids], plus extra_emb."""
        c = self.config
        t = torch.as_tensor(timestep, device=device).reshape(-1).expand(B)                # (B,)
        emb = self.time_embedding(timestep_embedding(t, c.block_out_channels[0], flip_sin_to_cos=c.flip_sin_to_cos,
                                                     shift=c.freq_shift).to(dtype))
        if c.addition_embed_type == "text_time":
            if not added_cond_kwargs or not {"text_embeds", "time_ids"} <= set(added_cond_kwargs):
                raise ValueError("this UNet uses SDXL micro-conditions: pass added_cond_kwargs={'text_embeds': (B, "
                                 "1280) pooled text, 'time_ids': (B, 6) [orig h, orig w, crop top, crop left, "
                                 "target h, target w]}")
            ids = added_cond_kwargs["time_ids"].to(device)
            time_embeds = timestep_embedding(ids.reshape(-1), c.addition_time_embed_dim,
                                             flip_sin_to_cos=c.flip_sin_to_cos, shift=c.freq_shift)
            add = torch.cat([added_cond_kwargs["text_embeds"].to(device), time_embeds.reshape(B, -1).to(device)], -1)
            emb = emb + self.add_embedding(add.to(dtype))                                  # (B, T)
        if extra_emb is not None:                                 # e.g. TDM-unify's step-count embedding
            emb = emb + extra_emb.to(dtype)
        return emb

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None, extra_emb=None):
        """sample: (B, C, H, W); timestep: (B,) or scalar in [0, 1000); encoder_hidden_states: (B, L,
        cross_attention_dim); added_cond_kwargs (SDXL): {'text_embeds': (B, 1280), 'time_ids': (B, 6)};
        extra_emb: None or (B, emb_dim), added to the time embedding (models.StepCountEmbedding passes one)."""
        B = sample.shape[0]
        dtype = self.conv_in.weight.dtype                         # run in the weights' precision (bf16 base + LoRA)
        h, context = sample.to(dtype), encoder_hidden_states.to(dtype)
        temb = self.time_embed(timestep, B, sample.device, dtype, added_cond_kwargs, extra_emb)

        h = self.conv_in(h)
        skips = [h]
        for block in self.down_blocks:
            h, res = self._run(block, h, temb, context)
            skips.extend(res)
        h = self._run(self.mid_block, h, temb, context)
        for block in self.up_blocks:
            n = len(block.resnets)
            mine, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[2:] if skips else None          # the next skip's size (2x, or odd latents)
            h = self._run(block, h, tuple(mine), temb, context, size)
        # The output head runs in fp32 whatever the weights' dtype or autocast, and returns fp32:
        # x0 = (x_t - sigma eps) / alpha multiplies eps's rounding error by sigma / alpha (docs/method.md §12).
        with torch.autocast(sample.device.type, enabled=False):
            n_out, conv = self.conv_norm_out, self.conv_out
            h = F.silu(F.group_norm(h.float(), n_out.num_groups, n_out.weight.float(), n_out.bias.float(), n_out.eps))
            return F.conv2d(h, conv.weight.float(), conv.bias.float(), padding=1)          # (B, out_channels, H, W)


def unet_from_config(config, device=None):
    """Build a UNet from a UNetConfig, dict or config.json path; device='meta' allocates no memory."""
    config = _as_config(config)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return UNet(config)


#################################################################################
#                          LDM single-file key mapping                          #
#################################################################################

LDM_PREFIX = "model.diffusion_model."          # the UNet's keys in an original SD1.5 / SDXL single file
# LDM ResBlock inner names -> diffusers ResnetBlock2D's (transformer blocks use the same inner names in both)
_LDM_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def ldm_unet_modules(config):
    """{LDM module path: diffusers module path} of the UNet of `config`, derived from its block layout.

    LDM numbers the layers of the down path input_blocks.1, 2, ... (input_blocks.0 is conv_in): each down block has
    layers_per_block layers (the resnet at `.0`, its transformer at `.1`) and, all but the last, one more whose
    `.0.op` is the downsampler. output_blocks.0, 1, ... give each up block layers_per_block + 1 layers (resnet `.0`,
    transformer `.1`); the upsampler sits in the block's last layer after them: `.1.conv`, or `.2.conv` behind a
    transformer. middle_block.0 / .1 / .2 are resnet, transformer, resnet; label_emb.0 is SDXL's add_embedding."""
    c = _as_config(config)
    n, L = len(c.block_out_channels), c.layers_per_block
    names = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "middle_block.0": "mid_block.resnets.0",
             "middle_block.1": "mid_block.attentions.0", "middle_block.2": "mid_block.resnets.1",
             "out.0": "conv_norm_out", "out.2": "conv_out"}
    if c.addition_embed_type == "text_time":
        names.update({"label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"})
    i = 1
    for b, kind in enumerate(c.down_block_types):
        for j in range(L):
            names[f"input_blocks.{i}.0"] = f"down_blocks.{b}.resnets.{j}"
            if kind == "CrossAttnDownBlock2D":
                names[f"input_blocks.{i}.1"] = f"down_blocks.{b}.attentions.{j}"
            i += 1
        if b < n - 1:
            names[f"input_blocks.{i}.0.op"] = f"down_blocks.{b}.downsamplers.0.conv"
            i += 1
    i = 0
    for b, kind in enumerate(c.up_block_types):
        attention = kind == "CrossAttnUpBlock2D"
        for j in range(L + 1):
            names[f"output_blocks.{i}.0"] = f"up_blocks.{b}.resnets.{j}"
            if attention:
                names[f"output_blocks.{i}.1"] = f"up_blocks.{b}.attentions.{j}"
            i += 1
        if b < n - 1:
            names[f"output_blocks.{i - 1}.{2 if attention else 1}.conv"] = f"up_blocks.{b}.upsamplers.0.conv"
    return names


def _rename(key, modules, inner):
    """`key` moved from the module that holds it (the longest path in `modules`, old -> new) to the new one; inside a
    resnet its inner name renamed by `inner`. None when no module holds the key or the resnet has no such name."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        old = ".".join(parts[:cut])
        new = modules.get(old)
        if new is None:
            continue
        rest = ".".join(parts[cut:])
        if ".resnets." in f".{old}.{new}":
            name = next((a for a in inner if rest.startswith(a + ".")), None)
            if name is None:
                return None
            rest = inner[name] + rest[len(name):]
        return f"{new}.{rest}"
    return None


def unet_state_dict_from_ldm(sd, config):
    """An LDM UNet state dict (keys with `model.diffusion_model.` stripped) -> diffusers keys for the UNet of
    `config`. A key no module of that layout holds keeps its name in the file (prefix included), so a load error
    names it as the file does."""
    modules = ldm_unet_modules(config)
    out = {}
    for k, v in sd.items():
        new = _rename(k, modules, _LDM_RESNET)
        out[LDM_PREFIX + k if new is None else new] = v
    return out


def unet_state_dict_to_ldm(sd, config):
    """The inverse: a diffusers UNet state dict of `config` -> LDM keys (without the prefix), as single files hold."""
    modules = {v: k for k, v in ldm_unet_modules(config).items()}
    inner = {v: k for k, v in _LDM_RESNET.items()}
    out = {}
    for k, v in sd.items():
        new = _rename(k, modules, inner)
        if new is None:
            raise ValueError(f"{k!r} is not a key of the UNet of this config; expected diffusers UNet2DConditionModel "
                             "keys of the same block layout")
        out[new] = v
    return out


# Keys (prefix stripped) -> shapes that identify a release's single file.
RELEASE_KEYS = {
    "sd15": {"input_blocks.0.0.weight": (320, 4, 3, 3), "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
             "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768)},
    "sdxl": {"input_blocks.0.0.weight": (320, 4, 3, 3), "output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
             "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
             "label_emb.0.0.weight": (1280, 2816)}}
RELEASE_CONFIGS = {"sd15": sd15_unet_config, "sdxl": sdxl_base_unet_config}


def _not_a_unet(shapes):
    """What a file without UNet keys seems to hold, for the error message."""
    keys = list(shapes)
    if any("lora" in k.lower() for k in keys):
        return "it looks like a LoRA (lora keys): LoRAs are applied to a base model, not loaded as one"
    if "conv_in.weight" in shapes:
        return "it holds diffusers UNet keys: pass the folder holding it and its config.json"
    if keys and all(k.startswith(("first_stage_model.", "encoder.", "decoder.", "quant_conv.", "post_quant_conv.",
                                  "vae.", "loss.")) for k in keys):
        return "it looks like a VAE (encoder / decoder keys): load it with vae.load_vae"
    return f"first keys: {sorted(keys)[:4]}"


def single_file_release(path):
    """"sd15" or "sdxl": the release whose UNet an original single file (.safetensors / .ckpt) holds, from its key
    names and a few shapes (RELEASE_KEYS; no tensor is read). Anything else raises, naming what the file seems to be
    (SD2.x, a refiner, an inpainting UNet, a LoRA, a VAE)."""
    path = os.fspath(path)
    shapes = checkpoint_shapes(path)
    unet = {k[len(LDM_PREFIX):]: s for k, s in shapes.items() if k.startswith(LDM_PREFIX)}
    if not unet:
        raise ValueError(f"{path!r} holds no UNet (no {LDM_PREFIX}* keys; {_not_a_unet(shapes)}); pass an SD1.5 or "
                         "SDXL single file (e.g. v1-5-pruned-emaonly.safetensors, sd_xl_base_1.0.safetensors) or a "
                         "diffusers folder")
    release = "sdxl" if "label_emb.0.0.weight" in unet else "sd15"
    want = RELEASE_KEYS[release]
    if all(unet.get(k) == s for k, s in want.items()):
        return release
    conv_in = unet.get("input_blocks.0.0.weight", (0, 4))
    width = next((s[1] for k, s in sorted(unet.items()) if k.endswith("attn2.to_k.weight")), None)
    if conv_in[1] != 4:
        found = f"a UNet with {conv_in[1]} input channels (inpainting or instruct-pix2pix)"
    elif release == "sd15" and width == 1024:
        found = "an SD2.x UNet (cross-attention width 1024)"
    elif release == "sdxl" and unet["label_emb.0.0.weight"][1] == 2560:
        found = "an SDXL refiner UNet (label_emb input 2560)"
    else:
        found = "a UNet where " + ", ".join(f"{k} is {unet.get(k)}, not {s}" for k, s in want.items()
                                           if unet.get(k) != s)
    raise ValueError(f"{path!r} holds {found}, not an SD1.5 or SDXL base UNet, the releases detected here; pass "
                     "config= (a UNetConfig or a unet/config.json; train.py / sample.py: --weights-config FOLDER, the "
                     "diffusers folder describing the file) to load another UNet of this family")


#################################################################################
#                          Checkpoint loading                                   #
#################################################################################

def load_unet(path, config=None, device="cpu", dtype=None):
    """Load the UNet from a diffusers pipeline folder (with unet/), its unet/ folder (single, sharded or variant
    weights such as `diffusion_pytorch_model.fp16.safetensors`), or an original single file (.safetensors / .ckpt:
    SD1.5's v1-5-pruned-emaonly, SDXL's sd_xl_base_1.0, or a fine-tune of them), of which only the
    `model.diffusion_model.*` tensors are read; a non-pruned file's EMA copy (`model_ema.*`) is not used.

    `config` (UNetConfig, dict or config.json path) overrides the folder's config.json, or the release a single
    file's keys show (single_file_release). dtype None keeps the checkpoint's own dtype.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"UNet weights not found: {path!r} does not exist; pass the diffusers pipeline "
                                "folder, its unet/ sub-folder or an SD1.5 / SDXL single file")
    if not os.path.isdir(path):
        release = None if config is not None else single_file_release(path)
        config = _as_config(config) if release is None else RELEASE_CONFIGS[release]()
        sd = read_state_dict(path, prefixes=(LDM_PREFIX,))
        if not sd:
            single_file_release(path)                                   # raises, naming what the file holds
        sd = unet_state_dict_from_ldm({k[len(LDM_PREFIX):]: v for k, v in sd.items()}, config)
        what = (f"UNet in {path!r} with the config given (without config= the release of the file's keys is used)"
                if release is None else f"UNet in {path!r} (an {release} single file)")
        return build_and_load(lambda: unet_from_config(config), sd, what, dtype).to(device)
    folder = component_folder(path, "unet", ", or an SD1.5 / SDXL single file")
    config = os.path.join(folder, "config.json") if config is None else config
    sd = read_state_dict(folder)
    if any(k.startswith(LDM_PREFIX) for k in sd):
        raise ValueError(f"{folder!r} holds an original single-file checkpoint ({LDM_PREFIX}* keys) next to a "
                         "config.json; pass the file itself to load_unet")
    if "conv_in.weight" not in sd:
        raise ValueError(f"unknown checkpoint layout in {folder!r}: no diffusers UNet key conv_in.weight; "
                         f"first keys: {sorted(sd)[:5]}")
    config = _as_config(config)
    return build_and_load(lambda: unet_from_config(config), sd, f"UNet from {folder!r}", dtype).to(device)
