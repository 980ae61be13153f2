"""The SD VAE (diffusers AutoencoderKL, kl-f8): SD1.x, SDXL and PixArt-α's latent space, hand-written.

    config (VAEConfig, release factory) -> layers -> VAE -> LDM key mapping -> load_vae

Parameter names equal diffusers' `AutoencoderKL` state-dict keys; LDM single files (`first_stage_model.*` in a
full SD1.5 / SDXL checkpoint, of which only those tensors are read, or a VAE-only file) are renamed on load.
"""
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from models import (Attention, JSONConfig, build_and_load, checkpoint_shapes, component_folder,
                    read_state_dict)


#################################################################################
#                          Config                                               #
#################################################################################

@dataclass
class VAEConfig(JSONConfig):
    """AutoencoderKL hyper-parameters; names and defaults as in diffusers' vae/config.json (SD1.x values)."""
    CLASS_NAMES = ("AutoencoderKL",)
    FIXED = {"act_fn": "silu"}
    IGNORED = ("latents_mean", "latents_std")              # SDXL / SD3 folders; unused by encode/decode
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    shift_factor: float = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        n = len(self.block_out_channels)
        bad = [t for t in self.down_block_types if t != "DownEncoderBlock2D"]
        bad += [t for t in self.up_block_types if t != "UpDecoderBlock2D"]
        if bad or len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"down_block_types={list(self.down_block_types)}, up_block_types="
                             f"{list(self.up_block_types)} is not implemented; only {n} DownEncoderBlock2D / "
                             "UpDecoderBlock2D each (the SD / SDXL VAE)")


def sd_vae_config():    # SD1.x / sd-vae-ft-ema / sd-vae-ft-mse (kl-f8), also PixArt-α's
    return VAEConfig()


def sdxl_vae_config():  # stabilityai/stable-diffusion-xl-base-1.0 vae/: the same network, another latent scale
    return VAEConfig(sample_size=1024, scaling_factor=0.13025)


#################################################################################
#                          Layers                                               #
#################################################################################

class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-Conv twice, with a 1x1 conv shortcut when the width changes."""
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class AttentionBlock(Attention):
    """Single-head self-attention over all pixels, GroupNorm first, residual added (models.Attention's keys plus
    `group_norm`)."""
    def __init__(self, c, groups):
        super().__init__(c, heads=1)
        self.group_norm = nn.GroupNorm(groups, c, eps=1e-6)

    def forward(self, x):
        H, W = x.shape[-2:]
        h = rearrange(self.group_norm(x), "b c h w -> b (h w) c")                  # (B, HW, C)
        return x + rearrange(super().forward(h), "b (h w) c -> b c h w", h=H, w=W)


class Resample(nn.Module):
    """Down: zero-pad right and bottom by one, 3x3 conv with stride 2. Up: nearest x2, 3x3 conv."""
    def __init__(self, c, down):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(c, c, 3, stride=2 if down else 1, padding=0 if down else 1)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.down else F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResnetStage(nn.Module):
    """Resnets then an optional resampler (diffusers DownEncoderBlock2D / UpDecoderBlock2D)."""
    def __init__(self, cin, cout, n, groups, resample=None):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(cin if i == 0 else cout, cout, groups) for i in range(n))
        if resample:                                              # downsamplers.0 / upsamplers.0
            self.add_module(f"{resample}samplers", nn.ModuleList([Resample(cout, down=resample == "down")]))

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        for s in getattr(self, "downsamplers", getattr(self, "upsamplers", [])):
            x = s(x)
        return x


class MidBlock(nn.Module):
    """Resnet, attention, resnet."""
    def __init__(self, c, groups, attention=True):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(c, c, groups), ResnetBlock2D(c, c, groups)])
        self.attentions = nn.ModuleList([AttentionBlock(c, groups)] if attention else [])

    def forward(self, x):
        x = self.resnets[0](x)
        for a in self.attentions:
            x = a(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> mean and logvar (B, 2*latent, H/f, W/f)."""
    def __init__(self, cin, latent, chans, layers, groups, attention):
        super().__init__()
        self.conv_in = nn.Conv2d(cin, chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            ResnetStage(chans[max(i - 1, 0)], c, layers, groups, "down" if i < len(chans) - 1 else None)
            for i, c in enumerate(chans))
        self.mid_block = MidBlock(chans[-1], groups, attention)
        self.conv_norm_out = nn.GroupNorm(groups, chans[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chans[-1], 2 * latent, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    """Latent (B, latent, h, w) -> image (B, 3, h*f, w*f)."""
    def __init__(self, latent, cout, chans, layers, groups, attention):
        super().__init__()
        rev = list(reversed(chans))
        self.conv_in = nn.Conv2d(latent, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], groups, attention)
        self.up_blocks = nn.ModuleList(
            ResnetStage(rev[max(i - 1, 0)], c, layers + 1, groups, "up" if i < len(rev) - 1 else None)
            for i, c in enumerate(rev))
        self.conv_norm_out = nn.GroupNorm(groups, chans[0], eps=1e-6)
        self.conv_out = nn.Conv2d(chans[0], cout, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAE(nn.Module):
    """KL autoencoder: encode images in [-1, 1] to latents, decode latents back. No scaling inside."""
    def __init__(self, config):
        super().__init__()
        c = self.config = config
        # latent = (z - shift) * scale
        self.scaling_factor, self.shift_factor = c.scaling_factor, c.shift_factor or 0.0
        args = (list(c.block_out_channels), c.layers_per_block, c.norm_num_groups, c.mid_block_add_attention)
        self.encoder = Encoder(c.in_channels, c.latent_channels, *args)
        self.decoder = Decoder(c.latent_channels, c.out_channels, *args)
        L = c.latent_channels
        self.quant_conv = nn.Conv2d(2 * L, 2 * L, 1) if c.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(L, L, 1) if c.use_post_quant_conv else None

    def encode_moments(self, x):
        """Image (B, 3, H, W) -> posterior mean and logvar (clamped to [-30, 20]), each (B, latent, H/f, W/f)."""
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x, sample=False, generator=None):
        """Image -> posterior mean, or a posterior sample (mean + std * noise drawn from `generator`)."""
        mean, logvar = self.encode_moments(x)
        if not sample:
            return mean
        device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype).to(mean.device)
        return mean + torch.exp(0.5 * logvar) * noise

    def decode(self, z):
        """Latent (B, latent, h, w), unscaled -> image (B, 3, 8h, 8w) in about [-1, 1]."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


#################################################################################
#                          LDM key mapping and loader                           #
#################################################################################

_VAE_RENAMES = [  # (pattern, replacement) from LDM / deprecated diffusers names to current diffusers names
    (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
    (r"^(encoder|decoder)\.mid\.attn_1\.norm\.", r"\1.mid_block.attentions.0.group_norm."),
    (r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.", r"\1.mid_block.attentions.0.to_\2."),
    (r"^(encoder|decoder)\.mid\.attn_1\.proj_out\.", r"\1.mid_block.attentions.0.to_out.0."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
    (r"\.attentions\.0\.query\.", ".attentions.0.to_q."), (r"\.attentions\.0\.key\.", ".attentions.0.to_k."),
    (r"\.attentions\.0\.value\.", ".attentions.0.to_v."), (r"\.attentions\.0\.proj_attn\.", ".attentions.0.to_out.0."),
]


def vae_state_dict_from_any(sd, num_blocks=4):
    """Rename an LDM (`first_stage_model.` or bare) or old diffusers VAE state dict to diffusers keys."""
    if any(k.startswith("first_stage_model.") for k in sd):  # full SD checkpoint: keep the VAE only
        sd = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    out = {}
    for k, v in sd.items():
        if k.startswith(("loss.", "model_ema.")):               # training leftovers in LDM VAE checkpoints
            continue
        m = re.match(r"^decoder\.up\.(\d+)\.(block|upsample)\.", k)  # LDM counts up blocks from the lowest resolution
        if m:
            i = num_blocks - 1 - int(m.group(1))
            k = f"decoder.up_blocks.{i}." + ("resnets." if m.group(2) == "block" else "upsamplers.0.") + k[m.end():]
        for pattern, repl in _VAE_RENAMES:
            k = re.sub(pattern, repl, k)
        if re.search(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", k) and v.ndim > 2:
            v = v.flatten(1)                                    # 1x1 conv (or conv1d) -> linear
        out[k] = v
    return out


# Where single files keep the VAE: full SD checkpoints under first_stage_model.; some VAE-only files under vae.;
# the others (e.g. vae-ft-mse-840000-ema-pruned) bare.
VAE_PREFIXES = ("first_stage_model.", "vae.")


def load_vae(path, dtype=None, config=None):
    """Load the VAE from a diffusers pipeline folder (vae/), the vae/ folder itself, or a single file: a full SD1.5 /
    SDXL checkpoint (only its `first_stage_model.*` tensors are read) or a VAE-only file, LDM or diffusers names.
    `config` defaults to the folder's config.json, else sdxl_vae_config() for an SDXL checkpoint (conditioner.* keys)
    and sd_vae_config() otherwise: the same network, only the scaling factor differs (0.13025 / 0.18215); pass
    config=sdxl_vae_config() for an SDXL VAE-only file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"VAE path {path!r} does not exist; pass the diffusers pipeline folder, its vae/ "
                                "sub-folder, or a VAE checkpoint file")
    if os.path.isdir(path):
        path = component_folder(path, "vae", ", or a VAE checkpoint file")
        config = config or VAEConfig.from_json(os.path.join(path, "config.json"))
        sd = read_state_dict(path)
    else:
        shapes = checkpoint_shapes(path)
        prefix = next((p for p in VAE_PREFIXES if any(k.startswith(p) for k in shapes)), "")
        if not any(k.startswith((prefix + "encoder.", prefix + "decoder.")) for k in shapes):
            raise ValueError(f"{path!r} holds no VAE: no first_stage_model.*, vae.* or encoder.* / decoder.* keys "
                             f"(first keys: {sorted(shapes)[:4]}); pass an SD1.5 / SDXL checkpoint or a VAE file")
        sd = read_state_dict(path, prefixes=(prefix,) if prefix else None)
        sd = {k[len(prefix):]: v for k, v in sd.items()}
        if config is None and any(k.startswith("conditioner.") for k in shapes):
            config = sdxl_vae_config()
    config = config or sd_vae_config()
    sd = vae_state_dict_from_any(sd, len(config.block_out_channels))
    return build_and_load(lambda: VAE(config), sd, f"VAE in {path!r}", dtype)
