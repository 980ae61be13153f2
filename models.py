"""Networks and their weights: the toy MLP denoiser, checkpoint I/O and loaders.

Every network here is plain PyTorch. The project never imports diffusers or transformers;
the tests use them as parity references only. Networks know nothing about TDM: they map
(x_t, t, condition) to their raw prediction, and teachers.py turns that into x0.
"""
import glob
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F


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
        self.config["step_counts"] = sorted(int(k) for k in step_counts)
        self.step_emb = nn.Embedding(len(step_counts), self.inp.out_features)
        nn.init.zeros_(self.step_emb.weight)
        self.step_emb.to(self.inp.weight.device)

    def forward(self, x, t, y, K=None):
        """x: (B, dim), t: (B,) timesteps in [0, 999], y: (B,) labels, K: None or (B,) step counts."""
        h = self.inp(x) + self.t_mlp(timestep_embedding(t, 128)) + self.class_emb(y)   # (B, width)
        if K is not None:
            if self.step_emb is None:
                raise ValueError("step count K given to a network without a step embedding; "
                                 "build it with step_counts=... (train.py --unify does this)")
            ks = torch.tensor(self.config["step_counts"], device=x.device)
            idx = (K[:, None] == ks[None]).float().argmax(1)   # (B,) row of each K
            h = h + self.step_emb(idx)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def toy_mlp(**kw):
    """The toy denoiser used for the 2-D teacher, student and fake score."""
    return ToyMLP(**kw)


#################################################################################
#                          Checkpoint I/O                                       #
#################################################################################

def save_safetensors(tensors, path, metadata=None):
    """Write tensors to `path` atomically (temporary name, then rename)."""
    from safetensors.torch import save_file
    tmp = path + ".tmp"
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
        with open(index_name) as f:
            weight_map = json.load(f).get("weight_map")
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


def load_exact(module, state_dict, what):
    """Load `state_dict` into `module`, raising one error that lists missing, unexpected and mis-shaped keys."""
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
    module.load_state_dict(state_dict, strict=True)
    return module
