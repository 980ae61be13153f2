"""Networks and their weights, hand-written in plain PyTorch.

  - the toy 2-D MLP denoiser;
  - checkpoint I/O: single, sharded and legacy checkpoints, exact key checks with clear errors;
  - the PixArt-α transformer (DiT with adaLN-single and cross-attention), LoRA adapters, `load_pixart`;
  - the T5 v1.1 encoder with its sentencepiece tokenizer, `load_t5`;
  - the SD VAE (AutoencoderKL), `load_vae`.

The project never imports diffusers or transformers; the tests use them as parity references only.
Parameter names equal the diffusers / transformers state-dict keys, so their folders load as they are.
Networks know nothing about TDM: they map (x_t, t, condition) to their raw prediction, and
teachers.py turns that into x0.
"""
import contextlib
import glob
import inspect
import json
import math
import os
import re
from dataclasses import dataclass, fields
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint


#################################################################################
#                          Embedding layers                                     #
#################################################################################

def timestep_embedding(t, dim, max_period=10000, flip_sin_to_cos=True, shift=0.0):
    """Sinusoidal embedding of a (B,) tensor of (possibly fractional) timesteps -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - shift))
    args = t.float()[:, None] * freqs[None]                      # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if not flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


#################################################################################
#                          Toy 2-D MLP denoiser                                 #
#################################################################################

class ResBlock(nn.Module):
    """Pre-norm residual MLP block."""
    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h):
        return h + self.fc2(F.silu(self.fc1(F.silu(self.norm(h)))))


class ToyMLP(nn.Module):
    """MLP denoiser for 2-D points (v- or eps-prediction, set by the teacher): timestep, class (index
    n_classes = null class) and optional step count K.

    The step-count embedding (TDM-unify, Sec. 3.4 / Eq. 8) is initialised to zero, so a fresh copy
    with `step_counts` computes exactly the same function as the network it was copied from.
    """
    def __init__(self, dim=2, n_classes=2, width=128, depth=3, step_counts=()):
        super().__init__()
        self.config = dict(dim=dim, n_classes=n_classes, width=width, depth=depth, step_counts=list(step_counts))
        self.inp = nn.Linear(dim, width)
        self.t_mlp = nn.Sequential(nn.Linear(128, width), nn.SiLU(), nn.Linear(width, width))
        self.class_emb = nn.Embedding(n_classes + 1, width)      # last row = null class (CFG)
        self.blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, dim))
        self.step_emb = None
        if step_counts:
            self.add_step_embedding(step_counts)

    def add_step_embedding(self, step_counts):
        """Add a zero-initialised embedding of the step count K (one row per supported K)."""
        self.config["step_counts"], self.step_emb = zero_step_embedding(step_counts, self.inp.out_features,
                                                                        self.inp.weight)

    def forward(self, x, t, y, K=None):
        """x: (B, dim), t: (B,) timesteps in [0, 999], y: (B,) labels, K: None or (B,) step counts."""
        h = self.inp(x) + self.t_mlp(timestep_embedding(t, 128)) + self.class_emb(y)   # (B, width)
        if K is not None:
            h = h + step_embedding(self.step_emb, self.config["step_counts"], K)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def zero_step_embedding(step_counts, dim, like):
    """TDM-unify: (sorted step counts, a zero-initialised nn.Embedding with one row per K on `like`'s device/dtype)."""
    counts = sorted(int(k) for k in step_counts)
    table = nn.Embedding(len(counts), dim, device=like.device, dtype=like.dtype)
    nn.init.zeros_(table.weight)
    return counts, table


def step_embedding(table, step_counts, K):
    """TDM-unify (Eq. 8): the row of `table` (an nn.Embedding, one row per supported K) for each K. -> (B, D)"""
    if table is None:
        raise ValueError("step count K given to a network without a step embedding; build the student with "
                         "step counts (train.py --unify does this)")
    ks = torch.as_tensor(step_counts, device=K.device)
    match = K[:, None] == ks[None]                                              # (B, n_K)
    if not match.any(1).all():
        raise ValueError(f"step count(s) {sorted(set(K[~match.any(1)].tolist()))} not supported: this student was "
                         f"trained for K in {list(step_counts)}")
    return table(match.float().argmax(1))                                       # (B, D)


def toy_mlp(**kw):
    """The toy denoiser used for the 2-D teacher, student and fake score."""
    return ToyMLP(**kw)


#################################################################################
#                          Checkpoint I/O                                       #
#################################################################################

def save_safetensors(tensors, path, metadata=None):
    """Write tensors to `path` atomically (a per-process temporary name, then rename)."""
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def read_state_dict(path):
    """Read a checkpoint: a .safetensors / .bin / .pth file, or a folder of (possibly sharded) weights.

    Folders may hold `*.safetensors`, an `*.safetensors.index.json` with its shards, or legacy
    `*.bin` files with `pytorch_model.bin.index.json`. Variants such as `.fp16.` are accepted when
    they are the only weights present.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights not found: {path!r} does not exist; pass the folder you downloaded "
                                "(e.g. the model folder or its transformer/ sub-folder) or a checkpoint file")
    if os.path.isdir(path):
        return _read_folder(path)
    return _read_file(path)


def _read_file(path):
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # truncated or foreign files surface here with the library's own message
        raise ValueError(f"could not read checkpoint {path!r}: {e}. The file may be truncated or not a "
                         "torch/safetensors checkpoint; download it again.") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]                      # original PixArt / LDM checkpoints
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path!r} is not a state dict of tensors (found {type(sd).__name__}); "
                         "pass a model checkpoint, not a training checkpoint or pipeline object")
    return sd


def _read_folder(folder):
    for index_name in sorted(glob.glob(os.path.join(folder, "*.index.json"))):
        weight_map = _read_json(index_name).get("weight_map")
        if not weight_map:
            raise ValueError(f"{index_name!r} has no 'weight_map'; the sharded checkpoint index is malformed")
        sd = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(folder, shard)
            if not os.path.exists(shard_path):
                raise FileNotFoundError(f"shard {shard!r} listed in {index_name!r} is missing; "
                                        "the download is incomplete")
            sd.update(_read_file(shard_path))
        return sd
    for pattern in ("*.safetensors", "*.bin", "*.pth", "*.pt"):
        files = sorted(glob.glob(os.path.join(folder, pattern)))
        plain = [f for f in files if os.path.basename(f).count(".") == 1]   # skip variants like x.fp16.safetensors
        files = plain or files
        if len(files) == 1:
            return _read_file(files[0])
        if len(files) > 1:
            raise ValueError(f"{folder!r} holds several weight files {[os.path.basename(f) for f in files]} "
                             "and no index json; pass the one file to use")
    raise FileNotFoundError(f"no weights in {folder!r}: expected *.safetensors (single or sharded with an "
                            "index json) or *.bin; is this the right folder?")


def load_exact(module, state_dict, what, assign=False):
    """Load `state_dict` into `module`, raising one error that lists missing, unexpected and mis-shaped keys
    (assign=True: the module, e.g. built on the meta device, takes over the checkpoint's tensors)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def head(xs):
            return ", ".join(xs[:8]) + (f" ... ({len(xs)} in all)" if len(xs) > 8 else "")
        parts = [f"missing keys: {head(missing)}" if missing else "",
                 f"unexpected keys: {head(unexpected)}" if unexpected else "",
                 f"shape mismatches: {head(shapes)}" if shapes else ""]
        raise ValueError(f"{what}: the checkpoint does not match the model config. "
                         + "; ".join(p for p in parts if p)
                         + ". Check that the config.json belongs to these weights.")
    module.load_state_dict(state_dict, strict=True, assign=assign)
    return module


#################################################################################
#                                 Configs                                       #
#################################################################################

# diffusers config keys whose value is fixed for PixArt-α: any other value raises
_FIXED = {"norm_type": "ada_norm_single", "activation_fn": "gelu-approximate", "attention_bias": True,
          "norm_elementwise_affine": False, "attention_type": "default", "dropout": 0.0, "upcast_attention": False,
          "only_cross_attention": False, "double_self_attention": False, "use_linear_projection": False,
          "num_vector_embeds": None}
_IGNORED = {"norm_num_groups", "num_embeds_ada_norm"}   # stored in config.json, unused by PixArt's forward


@dataclass
class PixArtConfig:
    """Hyper-parameters of a PixArt-α transformer; names and defaults as in diffusers' transformer/config.json."""
    num_layers: int = 28
    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: int = 8                     # 4 ε channels + 4 learned-variance channels
    sample_size: int = 128                    # latent side the model was trained at
    patch_size: int = 2
    caption_channels: int = 4096              # T5-XXL width
    cross_attention_dim: int = 1152
    interpolation_scale: float = None         # pos-embed scale (original `lewei_scale`); None: max(sample_size // 64, 1)
    use_additional_conditions: bool = None    # 1024-MS micro-conditions; None: sample_size == 128
    norm_eps: float = 1e-6

    def __post_init__(self):
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

    @classmethod
    def from_dict(cls, d, source="config"):
        """Build from a diffusers config dict; unsupported values and unknown keys raise ValueError."""
        d = {k: v for k, v in d.items() if not k.startswith("_") and k not in _IGNORED}
        for key, want in _FIXED.items():
            got = d.pop(key, want)
            if got != want:
                raise ValueError(f"{source}: {key}={got!r} is not supported; PixArt-α needs {key}={want!r}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{source}: unknown config key(s) {unknown}; expected a PixArt-α transformer "
                             f"config.json with keys like {[f.name for f in fields(cls)][:5]}")
        if d.get("caption_channels", 0) is None:
            raise ValueError(f"{source}: caption_channels=None is not supported; PixArt-α needs the T5 width (4096)")
        if d.get("out_channels", 0) is None:
            d["out_channels"] = d.get("in_channels", cls.in_channels)
        return cls(**d)


def pixart_xl_2_512_config():
    """PixArt-XL-2-512x512: 28 x 1152, 64x64 latents, pos-embed scale 1, no micro-conditions."""
    return PixArtConfig(sample_size=64, interpolation_scale=1, use_additional_conditions=False)


def pixart_xl_2_1024_ms_config():
    """PixArt-XL-2-1024-MS: 28 x 1152, 128x128 latents, pos-embed scale 2, resolution/aspect-ratio conditions."""
    return PixArtConfig(sample_size=128, interpolation_scale=2, use_additional_conditions=True)


def _as_config(config):
    """A PixArtConfig from a PixArtConfig, a diffusers config dict or a config.json path."""
    if isinstance(config, (str, os.PathLike)):
        return PixArtConfig.from_dict(_read_json(config), source=os.fspath(config))
    return config if isinstance(config, PixArtConfig) else PixArtConfig.from_dict(config)


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


class MLP2(nn.Module):
    """Linear -> act -> Linear: SiLU for the timestep / size embedders, GELU(tanh) for the caption projection."""
    def __init__(self, in_dim, out_dim, act=F.silu):
        super().__init__()
        self.linear_1, self.linear_2, self.act = nn.Linear(in_dim, out_dim), nn.Linear(out_dim, out_dim), act

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


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

    def forward(self, t, resolution=None, aspect_ratio=None, extra=None):
        emb = self.emb(t, resolution, aspect_ratio)               # (B, D)
        if extra is not None:                                     # TDM-unify: the step-count embedding
            emb = emb + extra
        return self.linear(F.silu(emb)), emb                      # (B, 6D), (B, D)


#################################################################################
#                          Transformer blocks                                   #
#################################################################################

class Attention(nn.Module):
    """Multi-head attention with biased q/k/v/out projections (diffusers key names)."""
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x, context=None, bias=None):
        """x: (B, N, D); context: (B, L, D) or None (self-attention); bias: additive (B, 1, 1, L) or None."""
        context = x if context is None else context
        B, N, D = x.shape
        def split(z):                                                          # (B, L, D) -> (B, heads, L, hd)
            return z.view(B, -1, self.heads, D // self.heads).transpose(1, 2)
        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)          # (B, heads, N, hd)
        return self.to_out[0](out.transpose(1, 2).reshape(B, N, D))            # (B, N, D)


class GELUProj(nn.Module):
    """Linear followed by tanh-approximated GELU (diffusers `GELU`, key `proj`)."""
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """D -> 4D -> D MLP; index 1 of `net` is diffusers' dropout slot, kept so the keys read ff.net.0 / ff.net.2."""
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.Sequential(GELUProj(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim))

    def forward(self, x):
        return self.net(x)


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
    """PixArt-α: (B, C, H, W) latents, timesteps and T5 captions -> (B, out_channels, H, W) (ε and variance)."""
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
        self.step_emb, self.step_counts = None, []                # TDM-unify students only

    def add_step_embedding(self, step_counts):
        """TDM-unify: a zero-initialised embedding of the step count K added to the timestep embedding (so the
        network is unchanged until it trains); one row per supported K. Not part of the PixArt checkpoint."""
        self.step_counts, self.step_emb = zero_step_embedding(step_counts, self.config.hidden_size,
                                                              self.proj_out.weight)

    def forward(self, x, timestep, encoder_hidden_states, encoder_attention_mask=None, added_cond_kwargs=None,
                step_count=None):
        """x: (B, C, H, W); timestep: (B,) or scalar in [0, 1000); encoder_hidden_states: (B, L, caption_channels);
        encoder_attention_mask: (B, L) tokenizer mask (1 keep, 0 pad);
        added_cond_kwargs (1024-MS only): {'resolution': (B, 2) pixel height/width, 'aspect_ratio': (B, 1)};
        step_count (TDM-unify students only): (B,) the sampler's step count K."""
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
        extra = None if step_count is None else step_embedding(self.step_emb, self.step_counts, step_count)
        t6, emb = self.adaln_single(t, **cond, extra=extra)       # (B, 6D), (B, D)
        context = self.caption_projection(encoder_hidden_states)  # (B, L, D)
        for block in self.transformer_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                adapters = [m.active for m in lora_layers(block)]
                tokens = checkpoint(_run_block, block, adapters, tokens, t6, context, bias,
                                    use_reentrant=False)
            else:
                tokens = block(tokens, t6, context, bias)

        shift, scale = (self.scale_shift_table[None] + emb[:, None]).chunk(2, dim=1)    # 2 x (B, 1, D); uses emb
        out = self.proj_out(modulate(self.norm_out(tokens), shift, scale))           # (B, h*w, p*p*C)
        out = out.reshape(B, h, w, p, p, c.out_channels)                             # (B, h, w, p, p, C)
        out = out.permute(0, 5, 1, 3, 2, 4)                                          # (B, C, h, p, w, p)
        return out.reshape(B, c.out_channels, H, W)                                  # (B, C, H, W)


def dit_from_config(config, device=None):
    """Build a PixArtDiT from a PixArtConfig, dict or config.json path; device='meta' allocates no memory."""
    config = _as_config(config)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return PixArtDiT(config)


#################################################################################
#                          LoRA                                                 #
#################################################################################

LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


class LoRALinear(nn.Module):
    """A frozen Linear plus named low-rank adapters; `active` picks one (None = base only).

    The base `weight` / `bias` are the wrapped layer's own Parameters (shared, not copied), so their
    state-dict keys do not change; adapters add `lora_A.<name>.weight` and `lora_B.<name>.weight`.
    """
    def __init__(self, base):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight.requires_grad_(False)
        self.register_parameter("bias", None if base.bias is None else base.bias.requires_grad_(False))
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        self.scaling = {}
        self.active = None

    def add_adapter(self, name, rank, alpha, dtype=None):
        """Add adapter `name` (in `dtype`, default the base's): A kaiming-uniform (as peft), B zeros, so it starts
        as the identity edit."""
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists")
        kw = dict(device=self.weight.device, dtype=dtype or self.weight.dtype)
        self.lora_A[name] = nn.Linear(self.in_features, rank, bias=False, **kw)
        self.lora_B[name] = nn.Linear(rank, self.out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.scaling[name] = alpha / rank

    def set_active(self, name):
        if name is not None and name not in self.lora_A:
            raise ValueError(f"unknown adapter {name!r}; this layer has {sorted(self.lora_A)} (None = base only)")
        self.active = name

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.active is None:
            return y
        A, B = self.lora_A[self.active], self.lora_B[self.active]
        # Adapters may be fp32 on a bf16 base: outside autocast, run them in their own dtype. Under autocast
        # F.linear already computes in bf16; an fp32 copy of x would only add memory traffic and saved tensors.
        x_a = x if torch.is_autocast_enabled(x.device.type) else x.to(A.weight.dtype)
        delta = B(A(x_a) * self.scaling[self.active])                 # scale the rank-r features: fewer elements
        return y + delta.to(y.dtype)


def lora_layers(model):
    """All LoRALinear modules of `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def add_lora(model, rank, alpha=None, names=("student", "fake"), targets=LORA_TARGETS, dtype=None):
    """Freeze `model`, then give every Linear whose name ends with a target the adapters `names` (inactive;
    in `dtype`, default the base's)."""
    alpha = rank if alpha is None else alpha
    model.requires_grad_(False)
    hits = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            path = f"{parent_name}.{child_name}" if parent_name else child_name
            if not any(path == t or path.endswith("." + t) for t in targets):
                continue
            if isinstance(child, nn.Linear):
                child = LoRALinear(child)
                setattr(parent, child_name, child)
            elif not isinstance(child, LoRALinear):
                raise TypeError(f"LoRA target {path!r} is a {type(child).__name__}, not an nn.Linear")
            for name in names:
                child.add_adapter(name, rank, alpha, dtype)
            hits += 1
    if not hits:
        raise ValueError(f"no module of {type(model).__name__} matches the LoRA targets {targets}")
    return model


class use_adapter:
    """Switch every LoRALinear of `model` to adapter `name` (None = base only); as a `with`, restore on exit."""
    def __init__(self, model, name):
        self.layers = lora_layers(model)
        if name is not None and not self.layers:
            raise ValueError(f"adapter {name!r} requested but the model has no LoRA layers; call add_lora first")
        self.previous = [m.active for m in self.layers]
        for m in self.layers:
            m.set_active(name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for m, name in zip(self.layers, self.previous):
            m.active = name


def _run_block(block, adapters, *args):
    """Run `block` with its LoRA layers set to `adapters`: a checkpoint recomputation then uses the forward's."""
    layers = lora_layers(block)
    previous = [m.active for m in layers]
    try:
        for m, name in zip(layers, adapters):
            m.active = name
        return block(*args)
    finally:
        for m, name in zip(layers, previous):
            m.active = name


class LoRAView(nn.Module):
    """One adapter of a shared LoRA model seen as a network: forward runs with adapter `name` active;
    parameters() and state_dict() are that adapter's only. Teacher (LoRA off), student and fake then share
    one frozen base."""
    def __init__(self, model, name):
        super().__init__()
        self.__dict__["model"] = model                  # not a submodule: its base weights are not ours
        self.name = name
        self.adapter = nn.ParameterList(lora_parameters(model, name))

    def forward(self, *args, **kw):
        with use_adapter(self.model, self.name):
            return self.model(*args, **kw)

    def state_dict(self, *args, **kw):
        return lora_state_dict(self.model, self.name)

    def load_state_dict(self, state_dict, strict=True):
        load_lora_state_dict(self.model, state_dict, self.name)


def trainable_lora_views(model, rank, alpha=None, names=("student", "fake")):
    """Add adapters `names` to `model` (base frozen) and return one LoRAView per name, adapters in fp32 and
    trainable whatever the base precision: student and fake on one shared base, the teacher = adapters off."""
    add_lora(model, rank, alpha, names=names, dtype=torch.float32)
    views = [LoRAView(model, name) for name in names]
    for v in views:
        v.adapter.requires_grad_(True)
    return views


def lora_parameters(model, name):
    """The trainable tensors of adapter `name` (for its optimizer)."""
    return [p for m in lora_layers(model) if name in m.lora_A
            for p in (m.lora_A[name].weight, m.lora_B[name].weight)]


def lora_state_dict(model, name):
    """Adapter `name` as {'<layer>.lora_A.weight': ..., '<layer>.lora_B.weight': ...} (adapter name dropped)."""
    sd = {}
    for path, m in model.named_modules():
        if isinstance(m, LoRALinear) and name in m.lora_A:
            sd[f"{path}.lora_A.weight"] = m.lora_A[name].weight.detach()
            sd[f"{path}.lora_B.weight"] = m.lora_B[name].weight.detach()
    if not sd:
        raise ValueError(f"the model has no adapter {name!r}")
    return sd


def load_lora_state_dict(model, state_dict, name):
    """Copy a `lora_state_dict` into adapter `name` (created beforehand by add_lora with the same rank)."""
    own = lora_state_dict(model, name)
    missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    shapes = [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
              for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"LoRA state dict does not fit adapter {name!r}: missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}, shape mismatches {shapes[:4]}; use the same targets and rank")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state_dict[k])


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
        folder = os.path.join(path, "transformer") if os.path.isdir(os.path.join(path, "transformer")) else path
        if config is None:
            config = os.path.join(folder, "config.json")
            if not os.path.isfile(config):
                raise FileNotFoundError(f"no config.json in {folder!r}: pass a diffusers PixArt model folder (with "
                                        "transformer/), its transformer/ sub-folder, or an original .pth file")
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

    model = _load_into(lambda: dit_from_config(config), sd, f"PixArt transformer from {source!r}", dtype).to(device)
    if null_caption is not None:
        model.null_caption = null_caption.to(device=device, dtype=model.proj_out.weight.dtype)
    return model


#################################################################################
#                          T5 v1.1 encoder                                      #
#################################################################################

def gelu_new(x):
    """tanh-approximate GELU written out as transformers does; bit-exact with it in bf16/fp16 (F.gelu is not)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


_T5_ACTS = {"gelu_new": gelu_new, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu,
            "relu": F.relu, "silu": F.silu}


def relative_position_bucket(rel, num_buckets=32, max_distance=128):
    """Bidirectional T5 bucket of key-minus-query offsets: exact near 0, log-spaced up to max_distance."""
    half = num_buckets // 2                                       # one half per sign; rel > 0 adds `half`
    exact = half // 2
    n = rel.abs()
    log_bucket = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                          * (half - exact)).long()                 # float -> long truncates toward zero
    return (rel > 0).long() * half + torch.where(n < exact, n, log_bucket.clamp(max=half - 1))


class T5LayerNorm(nn.Module):
    """RMSNorm without mean subtraction or bias; the variance is computed in fp32."""
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5Attention(nn.Module):
    """Multi-head self-attention without 1/sqrt(d) scaling; block 0 also owns the relative-position table."""
    def __init__(self, d_model, num_heads, d_kv, has_relative_bias, num_buckets, max_distance):
        super().__init__()
        self.num_heads, self.num_buckets, self.max_distance = num_heads, num_buckets, max_distance
        self.q, self.k, self.v = (nn.Linear(d_model, num_heads * d_kv, bias=False) for _ in range(3))
        self.o = nn.Linear(num_heads * d_kv, d_model, bias=False)
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(num_buckets, num_heads)

    def position_bias(self, length):
        """Relative position bias (1, heads, L, L), computed once and shared by every layer."""
        pos = torch.arange(length, device=self.relative_attention_bias.weight.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance)  # (L, L)
        return rearrange(self.relative_attention_bias(buckets), "q k h -> 1 h q k")

    def forward(self, x, bias):
        q, k, v = (rearrange(f(x), "b l (h d) -> b h l d", h=self.num_heads) for f in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2)                          # (B, H, L, L), no scaling
        scores += bias
        attn = F.softmax(scores.float(), dim=-1).type_as(scores)  # softmax in fp32
        return self.o(rearrange(attn @ v, "b h l d -> b l (h d)"))


class T5DenseGatedAct(nn.Module):
    """Gated feed-forward: wo(act(wi_0 x) * wi_1 x)."""
    def __init__(self, d_model, d_ff, act):
        super().__init__()
        self.act = _T5_ACTS[act]
        self.wi_0 = nn.Linear(d_model, d_ff, bias=False)
        self.wi_1 = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        h = self.act(self.wi_0(x)) * self.wi_1(x)
        return self.wo(h.to(self.wo.weight.dtype))                # wo stays fp32 in fp16 models


class T5SubLayer(nn.Module):
    """Pre-norm residual wrapper; `name` gives the transformers key (SelfAttention or DenseReluDense)."""
    def __init__(self, name, inner, d_model, eps):
        super().__init__()
        self.name = name
        self.add_module(name, inner)
        self.layer_norm = T5LayerNorm(d_model, eps)

    def forward(self, x, *args):
        x = x + getattr(self, self.name)(self.layer_norm(x), *args)
        if x.dtype == torch.float16:                              # clamp away from inf, as transformers does
            big = torch.finfo(torch.float16).max - (1000 if torch.isinf(x).any() else 0)
            x = x.clamp(-big, big)
        return x


class T5Block(nn.Module):
    """One encoder layer: `layer.0` self-attention, `layer.1` feed-forward."""
    def __init__(self, d_model, d_kv, d_ff, num_heads, num_buckets, max_distance, eps, act, has_relative_bias):
        super().__init__()
        attn = T5Attention(d_model, num_heads, d_kv, has_relative_bias, num_buckets, max_distance)
        self.layer = nn.ModuleList([T5SubLayer("SelfAttention", attn, d_model, eps),
                                    T5SubLayer("DenseReluDense", T5DenseGatedAct(d_model, d_ff, act), d_model, eps)])

    def forward(self, x, bias):
        return self.layer[1](self.layer[0](x, bias))


class T5Encoder(nn.Module):
    """T5 v1.1 encoder: token ids (B, L) and attention mask (B, L) -> last hidden states (B, L, d_model)."""
    def __init__(self, vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                 relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
                 dense_act_fn="gelu_new"):
        super().__init__()
        self.shared = nn.Embedding(vocab_size, d_model)
        self.encoder = nn.Module()                                # transformers names: encoder.{embed_tokens,block,...}
        self.encoder.embed_tokens = self.shared                   # tied: one module under two names
        self.encoder.block = nn.ModuleList(
            T5Block(d_model, d_kv, d_ff, num_heads, relative_attention_num_buckets, relative_attention_max_distance,
                    layer_norm_epsilon, dense_act_fn, has_relative_bias=i == 0) for i in range(num_layers))
        self.encoder.final_layer_norm = T5LayerNorm(d_model, layer_norm_epsilon)

    def forward(self, input_ids, attention_mask=None):
        x = self.shared(input_ids)                                # (B, L, d); no scaling, no absolute positions
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(input_ids.shape[1])  # (1, H, L, L)
        if attention_mask is not None:                            # padded keys get finfo.min added
            keep = attention_mask[:, None, None, :].to(x.dtype)   # (B, 1, 1, L)
            bias = bias + (1.0 - keep) * torch.finfo(x.dtype).min  # (B, H, L, L)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


def t5_v1_1_xxl_config():
    """google/t5-v1_1-xxl (DeepFloyd copy): PixArt-α's text encoder."""
    return dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
                dense_act_fn="gelu_new")


def t5_config_from_json(cfg):
    """T5Encoder keyword arguments from a transformers T5Config dict (config.json)."""
    proj = cfg.get("feed_forward_proj", "relu")
    act = cfg.get("dense_act_fn") or ("gelu_new" if proj == "gated-gelu" else proj.split("-")[-1])
    if cfg.get("model_type", "t5") not in ("t5", "mt5") or not cfg.get("is_gated_act", proj.startswith("gated-")):
        raise ValueError(f"config (model_type {cfg.get('model_type')!r}, feed_forward_proj {proj!r}) does not hold a "
                         "T5 v1.1 encoder; only gated-FFN T5/mT5 encoders are supported")
    if act not in _T5_ACTS:
        raise ValueError(f"T5 activation {act!r} is not supported (known: {sorted(_T5_ACTS)})")
    return dict({k: cfg[k] for k in t5_v1_1_xxl_config() if k in cfg}, dense_act_fn=act)


#################################################################################
#                          T5 tokenizer (sentencepiece)                         #
#################################################################################

class T5Tokenizer:
    """T5 tokenizer on `spiece.model`, equal to transformers' T5Tokenizer called with max_length, padding="max_length",
    truncation=True. Special-token strings in the text (<pad>, </s>, <unk>, <extra_id_N>) map to their ids; the rest
    goes through sentencepiece, one piece of text between special tokens at a time. legacy=False reproduces
    transformers' newer handling of text right after a special token (no "▁" prefix); plain prompts are unaffected."""
    def __init__(self, spiece_path, max_length=120, extra_ids=100, legacy=True, add_prefix_space=True,
                 pad_token="<pad>", eos_token="</s>", unk_token="<unk>", added_tokens=None):
        import sentencepiece
        if not os.path.isfile(spiece_path):
            raise FileNotFoundError(f"no tokenizer model {spiece_path!r}: the T5 tokenizer needs spiece.model; "
                                    "download it (with tokenizer_config.json) into the pipeline's tokenizer/ folder, "
                                    "or next to the T5 config.json")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=spiece_path)
        self.max_length, self.legacy, self.add_prefix_space = max_length, legacy, add_prefix_space
        self.unk_token = unk_token
        self.pad_id, self.eos_id, n = self.sp.piece_to_id(pad_token), self.sp.piece_to_id(eos_token), len(self.sp)
        self.specials = {t: (self.sp.piece_to_id(t), False, False) for t in (pad_token, eos_token, unk_token)}
        self.specials.update({f"<extra_id_{i}>": (n - 1 + extra_ids - i, True, True) for i in range(extra_ids)})
        self.specials.update(added_tokens or {})                  # content -> (id, lstrip, rstrip)
        longest_first = sorted(self.specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")
        if not legacy:                                            # a copy of the model without the "▁" prefix
            from sentencepiece import sentencepiece_model_pb2    # needs protobuf
            proto = sentencepiece_model_pb2.ModelProto.FromString(self.sp.serialized_model_proto())
            proto.normalizer_spec.add_dummy_prefix = False
            self.sp_raw = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())

    @classmethod
    def from_folder(cls, folder, max_length=120):
        """Read spiece.model and the optional tokenizer_config.json / added_tokens.json of a tokenizer folder."""
        def read(name):
            return _read_json(os.path.join(folder, name)) if os.path.isfile(os.path.join(folder, name)) else {}
        cfg = read("tokenizer_config.json")
        added = {content: (i, False, False) for content, i in read("added_tokens.json").items()}
        added.update({t["content"]: (int(i), t.get("lstrip", False), t.get("rstrip", False))
                      for i, t in cfg.get("added_tokens_decoder", {}).items()})
        names = {k: (v["content"] if isinstance(v, dict) else v) for k, v in cfg.items()
                 if k in ("pad_token", "eos_token", "unk_token") and v is not None}
        return cls(os.path.join(folder, "spiece.model"), max_length, cfg.get("extra_ids", 100),
                   cfg.get("legacy") is not False, cfg.get("add_prefix_space", True), added_tokens=added, **names)

    def _encode_text(self, text):
        """sentencepiece ids of text without special tokens."""
        if self.legacy:
            return self.sp.encode(text)
        if not text.startswith(("▁", " ")):
            return self.sp_raw.encode(text)
        n_unk = len(self.sp_raw.encode(self.unk_token))           # keep the leading "▁": encode "<unk>" + text
        return self.sp_raw.encode(self.unk_token + text)[n_unk:]

    def encode_one(self, text):
        """Token ids of one prompt: at most max_length - 1 ids, then </s> unless already last."""
        if not self.legacy and text:
            text = "▁" * self.add_prefix_space + text.replace("▁", " ")
        parts = self._split.split(text)                           # odd entries are special-token strings
        for i in range(1, len(parts), 2):                         # extra ids swallow the whitespace around them
            _, lstrip, rstrip = self.specials[parts[i]]
            parts[i - 1] = parts[i - 1].rstrip() if lstrip else parts[i - 1]
            parts[i + 1] = parts[i + 1].lstrip() if rstrip else parts[i + 1]
        ids = [[self.specials[p][0]] if i % 2 else self._encode_text(p) if p else [] for i, p in enumerate(parts)]
        if not self.legacy and ids[0] == [self.sp.piece_to_id("▁")] and len(parts) > 1:
            ids[0] = []                                           # lone prefix before a leading special token
        ids = sum(ids, [])[:self.max_length - 1]
        return ids if ids and ids[-1] == self.eos_id else ids + [self.eos_id]

    def __call__(self, prompts):
        """prompts (str or list of B str) -> input_ids (B, max_length) long, attention_mask (B, max_length) long."""
        rows = [self.encode_one(p) for p in ([prompts] if isinstance(prompts, str) else prompts)]
        ids = torch.full((len(rows), self.max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), self.max_length, dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, :len(row)], mask[b, :len(row)] = torch.tensor(row), 1
        return ids, mask


#################################################################################
#                          SD VAE (AutoencoderKL)                               #
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


class AttentionBlock(nn.Module):
    """Single-head self-attention over all pixels, GroupNorm first, residual added."""
    def __init__(self, c, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])

    def forward(self, x):
        H, W = x.shape[-2:]
        h = rearrange(self.group_norm(x), "b c h w -> b 1 (h w) c")              # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h))  # scale 1/sqrt(C)
        return x + rearrange(self.to_out[0](h), "b 1 (h w) c -> b c h w", h=H, w=W)


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
    def __init__(self, in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 latent_channels=4, norm_num_groups=32, scaling_factor=0.18215, shift_factor=None,
                 use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True):
        super().__init__()
        self.scaling_factor, self.shift_factor = scaling_factor, shift_factor or 0.0   # latent = (z - shift) * scale
        args = (list(block_out_channels), layers_per_block, norm_num_groups, mid_block_add_attention)
        self.encoder = Encoder(in_channels, latent_channels, *args)
        self.decoder = Decoder(latent_channels, out_channels, *args)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None

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


def sd_vae_config():
    """The SD1.x / sd-vae-ft-ema / sd-vae-ft-mse VAE (kl-f8), also PixArt-α's."""
    return dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=4, norm_num_groups=32, scaling_factor=0.18215)


def vae_config_from_json(cfg):
    """VAE keyword arguments from a diffusers AutoencoderKL config dict (vae/config.json)."""
    if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"config is for {cfg['_class_name']!r}, not AutoencoderKL: pass the pipeline folder or "
                         "its vae/ folder")
    bad = [t for t in cfg.get("down_block_types", []) if t != "DownEncoderBlock2D"]
    bad += [t for t in cfg.get("up_block_types", []) if t != "UpDecoderBlock2D"]
    if bad or cfg.get("act_fn", "silu") != "silu":
        raise ValueError(f"unsupported AutoencoderKL variant (blocks {bad}, act_fn {cfg.get('act_fn')!r}); only "
                         "DownEncoderBlock2D/UpDecoderBlock2D with silu (the SD / SDXL VAE) are implemented")
    return {k: cfg[k] for k in inspect.signature(VAE).parameters if k in cfg}


#################################################################################
#                          Loaders                                              #
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


def _load_into(build, sd, what, dtype=None, keep_fp32=()):
    """Build a model on the meta device, check the keys with load_exact, then take over the checkpoint tensors."""
    for k in sd:
        if dtype is not None and sd[k].is_floating_point() and not any(s in k for s in keep_fp32):
            sd[k] = sd[k].to(dtype)
    with torch.device("meta"):
        model = build()
    return load_exact(model, sd, what, assign=True).eval().requires_grad_(False)


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def load_t5(path, dtype=None, max_length=120):
    """Load (tokenizer, encoder) from a diffusers pipeline folder (text_encoder/ + tokenizer/) or a folder holding
    a transformers T5 config.json, its (possibly sharded) weights and spiece.model. fp16 keeps `wo` in fp32."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"T5 folder {path!r} does not exist; pass the diffusers pipeline folder (with "
                                "text_encoder/ and tokenizer/) or a folder with config.json, weights and spiece.model")
    if os.path.isdir(os.path.join(path, "text_encoder")):
        enc_dir, tok_dir = os.path.join(path, "text_encoder"), os.path.join(path, "tokenizer")
    elif os.path.isfile(os.path.join(path, "config.json")):
        enc_dir = tok_dir = path
    else:
        raise FileNotFoundError(f"{path!r} has neither a text_encoder/ sub-folder nor a config.json: unknown layout. "
                                "Pass the diffusers pipeline folder or the T5 folder itself (e.g. t5-v1_1-xxl/)")
    if not os.path.isfile(os.path.join(enc_dir, "config.json")):
        raise FileNotFoundError(f"no config.json in {enc_dir!r}: the T5 encoder config is needed to build the model")
    tokenizer = T5Tokenizer.from_folder(tok_dir, max_length)    # raises first if spiece.model is missing
    config = t5_config_from_json(_read_json(os.path.join(enc_dir, "config.json")))
    sd = {k: v for k, v in read_state_dict(enc_dir).items() if not k.startswith(("decoder.", "lm_head."))}
    emb = sd.get("shared.weight", sd.get("encoder.embed_tokens.weight"))  # tied: files may hold either or both
    if emb is not None:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"] = emb
    keep = (".DenseReluDense.wo.",) if dtype == torch.float16 else ()
    encoder = _load_into(lambda: T5Encoder(**config), sd, f"T5 encoder in {enc_dir!r}", dtype, keep)
    return tokenizer, encoder


def load_vae(path, dtype=None, config=None):
    """Load the VAE from a diffusers pipeline folder (vae/), the vae/ folder itself, or an LDM single file
    (VAE-only or a full SD checkpoint with `first_stage_model.` keys; `config` defaults to sd_vae_config())."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"VAE path {path!r} does not exist; pass the diffusers pipeline folder, its vae/ "
                                "sub-folder, or a VAE checkpoint file")
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, "vae")):
            path = os.path.join(path, "vae")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"no config.json in {path!r}: unknown layout. Pass the diffusers pipeline folder "
                                    "(with vae/) or the vae/ folder holding config.json and the weights")
        config = config or vae_config_from_json(_read_json(os.path.join(path, "config.json")))
    config = config or sd_vae_config()
    sd = vae_state_dict_from_any(read_state_dict(path), len(config["block_out_channels"]))
    return _load_into(lambda: VAE(**config), sd, f"VAE in {path!r}", dtype)
