"""Frozen PixArt-α conditioning networks: the T5 v1.1 encoder with its tokenizer, and the SD VAE.

Plain PyTorch; parameter names equal the transformers `T5EncoderModel` and diffusers `AutoencoderKL`
state-dict keys, so released checkpoints load without renaming (the original LDM VAE names are mapped).
The tokenizer uses the `sentencepiece` package on `spiece.model`. To be folded into models.py.
"""
import inspect
import json
import math
import os
import re
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from models import load_exact, read_state_dict


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
    with warnings.catch_warnings():                           # copying into meta tensors is a no-op: a check only
        warnings.simplefilter("ignore")
        load_exact(model, sd, what)
    model.load_state_dict(sd, assign=True)
    return model.eval().requires_grad_(False)


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
