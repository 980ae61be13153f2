"""What every network shares, in plain PyTorch. The networks themselves live one family per file:

    pixart.py   the PixArt-α transformer (DiT with adaLN-single and cross-attention), `load_pixart`
    t5.py       the T5 v1.1 encoder and its sentencepiece tokenizer, `load_t5`
    vae.py      the SD VAE (AutoencoderKL), `load_vae`
    unet.py     the SD1.5 / SDXL UNet (UNet2DConditionModel), `load_unet`
    clip.py     CLIP: the text encoders (ViT-L/14, OpenCLIP bigG/14), the vision tower and whole models (OpenAI
                ViT-L/14, OpenCLIP ViT-H/14, HPS v2), image preprocessing, the LAION aesthetic MLP; `load_clip_text`,
                `load_clip_vision`, `load_clip_model`, `load_aesthetic`
    clip_tokenizer.py   the CLIP BPE tokenizer (transformers' and open_clip's variants)

Each family file reads config -> layers -> model -> key mapping of other checkpoint formats -> `load_*`,
and imports only this file (clip.py also clip_tokenizer.py). This file holds:

  - configs: `JSONConfig`, the base of every network config (fields = the config.json keys);
  - weights: reading single, sharded and legacy checkpoints (or one component of a single file, by key prefix, or
    only its key names and shapes), one exact key/shape check, atomic saving, building on the meta device;
  - layers: sinusoidal timestep embedding, its two-layer MLP, one attention module and one feed-forward
    (diffusers key names);
  - LoRA: adapters on a frozen base, views that make one adapter a network, their state dicts;
  - gradient checkpointing that keeps the active LoRA adapters in the recomputation;
  - TDM-unify's step-count embedding, around any network that accepts an extra time embedding;
  - the toy 2-D MLP denoiser.

Networks know nothing about TDM or LoRA: they map (x_t, t, condition, extra_emb) to their raw
prediction (teachers.py turns it into x0), where `extra_emb` is an optional (B, D) tensor added to their
time embedding. The project never imports diffusers or transformers; the tests use them as parity
references. Parameter names equal the diffusers / transformers state-dict keys, so their folders load as
they are.
"""
import contextlib
import glob
import json
import math
import os
from dataclasses import fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


#################################################################################
#                          Configs                                              #
#################################################################################

def read_json(path):
    with open(path) as f:
        return json.load(f)


class JSONConfig:
    """Base of the network configs. A subclass is a dataclass whose fields are the keys of the diffusers /
    transformers `config.json` it reads, with their defaults; `from_json` builds it from that file.

    CLASS_NAMES: the diffusers `_class_name`s accepted (empty: not checked); FIXED: keys whose value is the only
    one implemented (another value raises); IGNORED: keys stored in config.json that do not change the
    network; STRICT: whether any other unknown key raises (diffusers configs: yes; transformers configs carry
    many generic keys (generation, token ids), so no).
    """
    CLASS_NAMES = ()
    FIXED = {}
    IGNORED = ()
    STRICT = True

    @classmethod
    def from_json(cls, config, source=None):
        """From a config.json path or an already-read dict; raises ValueError naming what is not implemented."""
        if isinstance(config, (str, os.PathLike)):
            source = source or os.fspath(config)
            config = read_json(config)
        source = source or f"{cls.__name__} dict"
        if cls.CLASS_NAMES and config.get("_class_name", cls.CLASS_NAMES[0]) not in cls.CLASS_NAMES:
            raise ValueError(f"{source} is the config of a {config['_class_name']!r}, not of a {cls.CLASS_NAMES[0]}: "
                             "pass the pipeline folder or the right sub-folder")
        d = {k: v for k, v in config.items() if not k.startswith("_") and k not in cls.IGNORED}
        for key, want in cls.FIXED.items():
            got = d.pop(key, want)
            if got != want and not (isinstance(want, tuple) and isinstance(got, list) and tuple(got) == want):
                raise ValueError(f"{source}: {key}={got!r} is not implemented; {cls.__name__} needs {key}={want!r}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown and cls.STRICT:
            raise ValueError(f"{source}: unknown config key(s) {unknown}; expected a config.json with keys like "
                             f"{sorted(names)[:6]} ({cls.__name__})")
        return cls(**{k: v for k, v in d.items() if k in names})


#################################################################################
#                          Weights: read, check, save                           #
#################################################################################

def save_safetensors(tensors, path, metadata=None):
    """Write tensors to `path` atomically (a per-process temporary name, then rename)."""
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def cache_dir():
    """Where fitted toy teachers and prompt embeddings are cached ($TDM_CACHE, default ~/.cache/tdm)."""
    return os.environ.get("TDM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tdm"))


def read_state_dict(path, prefixes=None):
    """Read a checkpoint: a .safetensors / .bin / .pth / .ckpt file, or a folder of (possibly sharded) weights.

    Folders may hold `*.safetensors`, an `*.safetensors.index.json` with its shards, or legacy
    `*.bin` files with `pytorch_model.bin.index.json`. Variants such as `.fp16.` are accepted when
    they are the only weights present. `prefixes` (a tuple of str): keep only the keys starting with one of them,
    reading only those tensors (one component of an original single-file checkpoint: safetensors reads just their
    bytes, torch pickles are memory-mapped, so a 7 GB file is not read once per component).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights not found: {path!r} does not exist; pass the folder you downloaded "
                                "(e.g. the model folder or its transformer/ sub-folder) or a checkpoint file")
    prefixes = tuple(prefixes) if prefixes is not None else None
    if os.path.isdir(path):
        return _read_folder(path, prefixes)
    return _read_file(path, prefixes)


def checkpoint_shapes(path):
    """{key: shape} of a checkpoint file without reading its tensors (the safetensors header, or a memory-mapped
    torch pickle): what a loader inspects to tell which model a single file holds."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with _reading(path):
            with safe_open(path, framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return {k: tuple(v.shape) for k, v in _read_file(path).items()}


def _wanted(key, prefixes):
    return prefixes is None or key.startswith(prefixes)


@contextlib.contextmanager
def _reading(path):
    """Turn a library's failure to parse a checkpoint (a truncated or foreign file, pickled objects that weights-only
    loading refuses) into one ValueError line naming the file and the fix."""
    try:
        yield
    except Exception as e:       # truncated or foreign files surface here with the library's own message
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "Weights only load failed" in first:
            raise ValueError(f"could not read checkpoint {path!r}: it holds pickled Python objects besides tensors "
                             "(e.g. training state), which are not loaded for safety; save its state dict as "
                             ".safetensors with a tool you trust, or get the .safetensors release") from e
        raise ValueError(f"could not read checkpoint {path!r}: {first}. The file may be truncated or not a "
                         "torch/safetensors checkpoint; download it again.") from e


def _torch_load(path):
    """torch.load, memory-mapped when the file is a zip archive (torch >= 1.6 format) so unread tensors cost nothing."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap can only be used" not in str(e):      # the legacy (non-zip) pickle format cannot be mapped
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def _read_file(path, prefixes=None):
    with _reading(path):
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(path, framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys() if _wanted(k, prefixes)}
        sd = _torch_load(path)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]                      # original PixArt / LDM checkpoints
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path!r} is not a state dict of tensors (found {type(sd).__name__}); "
                         "pass a model checkpoint, not a training checkpoint or pipeline object")
    return {k: v for k, v in sd.items() if _wanted(k, prefixes)}


def _read_folder(folder, prefixes=None):
    for index_name in sorted(glob.glob(os.path.join(folder, "*.index.json"))):
        weight_map = read_json(index_name).get("weight_map")
        if not weight_map:
            raise ValueError(f"{index_name!r} has no 'weight_map'; the sharded checkpoint index is malformed")
        sd = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(folder, shard)
            if not os.path.exists(shard_path):
                raise FileNotFoundError(f"shard {shard!r} listed in {index_name!r} is missing; "
                                        "the download is incomplete")
            sd.update(_read_file(shard_path, prefixes))
        return sd
    for pattern in ("*.safetensors", "*.bin", "*.pth", "*.pt"):
        files = sorted(glob.glob(os.path.join(folder, pattern)))
        plain = [f for f in files if os.path.basename(f).count(".") == 1]   # skip variants like x.fp16.safetensors
        files = plain or files
        if len(files) == 1:
            return _read_file(files[0], prefixes)
        if len(files) > 1:
            raise ValueError(f"{folder!r} holds several weight files {[os.path.basename(f) for f in files]} "
                             "and no index json; pass the one file to use")
    raise FileNotFoundError(f"no weights in {folder!r}: expected *.safetensors (single or sharded with an "
                            "index json) or *.bin; is this the right folder?")


def component_folder(path, sub, alternative=""):
    """The folder of one component of a diffusers pipeline: `path/sub` when `path` is the pipeline folder, else
    `path` itself; it must hold the component's config.json (`alternative`: what else the caller accepts)."""
    folder = os.path.join(path, sub) if os.path.isdir(os.path.join(path, sub)) else path
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"no config.json in {folder!r}: pass the diffusers pipeline folder (with {sub}/) or "
                                f"its {sub}/ sub-folder{alternative}")
    return folder


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


def build_and_load(build, sd, what, dtype=None, keep_fp32=()):
    """Build a model on the meta device (no memory), check the keys with load_exact, then take over the
    checkpoint's tensors, cast to `dtype` except keys containing one of `keep_fp32`. Frozen, in eval mode."""
    for k in sd:
        if dtype is not None and sd[k].is_floating_point() and not any(s in k for s in keep_fp32):
            sd[k] = sd[k].to(dtype)
    with torch.device("meta"):
        model = build()
    return load_exact(model, sd, what, assign=True).eval().requires_grad_(False)


#################################################################################
#                          Shared layers                                        #
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


class Attention(nn.Module):
    """Multi-head attention with q/k/v/out projections under diffusers' key names (to_q, to_k, to_v, to_out.0);
    scale 1/sqrt(head dim). Self-attention without `context`, cross-attention with it."""
    def __init__(self, dim, heads, context_dim=None, bias=True):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x, context=None, bias=None):
        """x: (B, N, D); context: (B, L, D_c) or None (self-attention); bias: additive (B, 1, 1, L) or None."""
        context = x if context is None else context
        B, N, D = x.shape
        def split(z):                                                          # (B, L, D) -> (B, heads, L, hd)
            return z.view(B, -1, self.heads, D // self.heads).transpose(1, 2)
        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)          # (B, heads, N, hd)
        return self.to_out[0](out.transpose(1, 2).reshape(B, N, D))            # (B, N, D)


class MLP2(nn.Module):
    """Linear -> act -> Linear: SiLU for the timestep, size and SDXL added embeddings, GELU(tanh) for PixArt's
    caption projection (diffusers' TimestepEmbedding and PixArtAlphaTextProjection: keys linear_1, linear_2)."""
    def __init__(self, in_dim, out_dim, act=F.silu):
        super().__init__()
        self.linear_1, self.linear_2, self.act = nn.Linear(in_dim, out_dim), nn.Linear(out_dim, out_dim), act

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class FeedForward(nn.Module):
    """diffusers' transformer MLP: D -> mult*D -> D, the first layer an activation projection (key `net.0.proj`):
    "gelu-tanh" = Linear then tanh-approximate GELU (PixArt), "geglu" = Linear to 2 x inner, value * GELU(gate)
    (SD UNets). Index 1 of `net` is diffusers' dropout slot, kept so the keys read ff.net.0 / ff.net.2."""
    def __init__(self, dim, activation="gelu-tanh", mult=4):
        super().__init__()
        if activation not in ("gelu-tanh", "geglu"):
            raise ValueError(f"feed-forward activation {activation!r}: expected 'gelu-tanh' or 'geglu'")
        inner = mult * dim
        first = nn.Module()
        first.proj = nn.Linear(dim, 2 * inner if activation == "geglu" else inner)
        self.activation = activation
        self.net = nn.Sequential(first, nn.Identity(), nn.Linear(inner, dim))

    def forward(self, x):
        h = self.net[0].proj(x)                                              # (B, N, inner or 2 inner)
        if self.activation == "geglu":
            value, gate = h.chunk(2, dim=-1)                                 # value first, as diffusers' GEGLU
            h = value * F.gelu(gate)
        else:
            h = F.gelu(h, approximate="tanh")
        return self.net[2](h)


#################################################################################
#                          LoRA                                                 #
#################################################################################

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


# The linear layers of a diffusers transformer block that get adapters (attention and feed-forward).
LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


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

    def load_state_dict(self, state_dict, strict=True, assign=False):
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
#                          Gradient checkpointing                               #
#################################################################################

def _run_with_adapters(block, adapters, *args):
    """Run `block` with its LoRA layers set to `adapters` (one name or None per layer), then restore them."""
    layers = lora_layers(block)
    previous = [m.active for m in layers]
    try:
        for m, name in zip(layers, adapters):
            m.active = name
        return block(*args)
    finally:
        for m, name in zip(layers, previous):
            m.active = name


def checkpointed(block, *args):
    """block(*args) under activation checkpointing: its activations are recomputed in the backward pass. The
    recomputation runs with the LoRA adapters that were active in the forward (a LoRAView switches them back
    off when its forward returns, before backward runs)."""
    adapters = [m.active for m in lora_layers(block)]
    return checkpoint(_run_with_adapters, block, adapters, *args, use_reentrant=False)


#################################################################################
#                          TDM-unify: the step-count embedding                  #
#################################################################################

class StepCountEmbedding(nn.Module):
    """A network conditioned on the sampler's step count K (TDM-unify, paper Eq. (8); docs/method.md §8).

    Wraps `net` (any network whose forward takes `extra_emb`, a (B, emb_dim) tensor added to its time
    embedding) and a table with one row per supported K, initialised to zero: the wrapped network computes
    exactly the function of `net` until the table trains, so student = fake = teacher at iteration 0.
    forward(*args, step_count=K (B,) long, **kw) = net(*args, extra_emb=table[K], **kw).
    """
    def __init__(self, net, step_counts):
        super().__init__()
        self.net = net
        self.step_counts = sorted(int(k) for k in step_counts)
        like = next(net.parameters())
        self.table = nn.Embedding(len(self.step_counts), net.emb_dim, device=like.device, dtype=like.dtype)
        nn.init.zeros_(self.table.weight)

    def embed(self, K):
        """(B,) step counts -> (B, emb_dim) rows of the table; a K the student was not trained for raises."""
        ks = torch.as_tensor(self.step_counts, device=K.device)
        match = K[:, None] == ks[None]                                              # (B, n_K)
        if not match.any(1).all():
            raise ValueError(f"step count(s) {sorted(set(K[~match.any(1)].tolist()))} not supported: this student "
                             f"was trained for K in {self.step_counts}")
        return self.table(match.float().argmax(1))                                  # (B, emb_dim)

    def forward(self, *args, step_count, **kw):
        return self.net(*args, extra_emb=self.embed(step_count), **kw)


def unify_keys_from_flat(state_dict):
    """A TDM-unify student written with the step embedding inside the network (keys `step_emb.weight` and the
    network's own) -> this file's layout (`table.weight`, `net.<key>`)."""
    if "step_emb.weight" not in state_dict:
        return state_dict
    return {("table.weight" if k == "step_emb.weight" else "net." + k): v for k, v in state_dict.items()}


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
    """MLP denoiser for 2-D points (v- or eps-prediction, set by the teacher): timestep and class (index
    n_classes = the null class of CFG)."""
    def __init__(self, dim=2, n_classes=2, width=128, depth=3):
        super().__init__()
        self.config = dict(dim=dim, n_classes=n_classes, width=width, depth=depth)
        self.emb_dim = width
        self.inp = nn.Linear(dim, width)
        self.t_mlp = nn.Sequential(nn.Linear(128, width), nn.SiLU(), nn.Linear(width, width))
        self.class_emb = nn.Embedding(n_classes + 1, width)      # last row = null class (CFG)
        self.blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x, t, y, extra_emb=None):
        """x: (B, dim), t: (B,) timesteps in [0, 999], y: (B,) labels, extra_emb: None or (B, width)."""
        h = self.inp(x) + self.t_mlp(timestep_embedding(t, 128)) + self.class_emb(y)   # (B, width)
        if extra_emb is not None:
            h = h + extra_emb
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def toy_mlp(dim=2, n_classes=2, width=128, depth=3):
    """The toy denoiser used for the 2-D teacher, student and fake score."""
    return ToyMLP(dim, n_classes, width, depth)
