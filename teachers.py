"""Teachers: what turns a network (or a closed form) into x0_hat = E[x0 | x_t, cond].

Toy: Gaussian-mixture targets whose denoiser is exact (`GMM.denoise`), and a toy teacher that is
either that exact denoiser or an MLP fitted to the target by denoising score matching (cached).
PixArt-α: the hand-written DiT, T5 and VAE from models.py on a diffusers-layout folder.
Interface used by tdm.py / train.py: `schedule`, `sample_shape`, `network`, `denoise(x_t, t, cond)`,
`x0(net, x_t, t, cond, K)`, `encode(labels or prompts)`, `uncond(n)`, `decode(x0)`, `device`.
"""
import copy
import hashlib
import json
import math
import os
import warnings

import torch

import tdm
from models import (load_pixart, load_t5, load_vae, read_state_dict, save_safetensors, toy_mlp,
                    use_adapter)


#################################################################################
#                          Gaussian mixtures (toy targets)                      #
#################################################################################

class GMM:
    """sum_k pi_k N(mu_k, Sigma_k) with a class label per component (class-conditional = renormalised subset)."""

    def __init__(self, means, covs, weights, classes, name="gmm"):
        self.means = torch.as_tensor(means, dtype=torch.float64)            # (M, D)
        self.covs = torch.as_tensor(covs, dtype=torch.float64)              # (M, D, D)
        w = torch.as_tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()                                          # (M,)
        self.classes = torch.as_tensor(classes, dtype=torch.long)           # (M,)
        self.n_classes = int(self.classes.max()) + 1
        self.name = name
        M, D = self.means.shape
        if self.covs.shape != (M, D, D) or self.weights.shape != (M,) or self.classes.shape != (M,):
            raise ValueError(f"GMM {name!r}: {M} means of dim {D} need covs ({M},{D},{D}), weights ({M},) and "
                             f"classes ({M},); got {tuple(self.covs.shape)}, {tuple(self.weights.shape)}, "
                             f"{tuple(self.classes.shape)}")
        if set(self.classes.tolist()) != set(range(self.n_classes)):
            raise ValueError(f"GMM {name!r}: classes must be 0..C-1 with every class used; got {self.classes.tolist()}")
        self.chol, info = torch.linalg.cholesky_ex(self.covs)          # (M, D, D) lower factors, for sample()
        bad = info.nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"GMM {name!r}: the covariance of component(s) {bad} is not positive definite; "
                             "give symmetric matrices with positive eigenvalues (or use 'stds')")

    @property
    def dim(self):
        return self.means.shape[1]

    def class_prior(self):
        """(C,) probability of each class."""
        return torch.zeros(self.n_classes, dtype=torch.float64).index_add_(0, self.classes, self.weights)

    def _log_w(self, labels):
        """(B, M) log mixture weights given labels (label == n_classes: the null class, all components)."""
        lw = self.weights.log().expand(labels.shape[0], -1).clone()
        keep = (self.classes[None] == labels[:, None]) | (labels[:, None] == self.n_classes)
        return lw.masked_fill(~keep, -math.inf)

    def sample(self, n, labels=None, generator=None):
        """n samples (n, D) float32; labels (n,) drawn from the class prior when not given."""
        if labels is None:
            labels = torch.multinomial(self.class_prior(), n, replacement=True, generator=generator)
        comp = torch.multinomial(self._log_w(labels.cpu()).softmax(-1), 1, generator=generator).squeeze(1)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        x = self.means[comp] + (self.chol[comp] @ z[:, :, None]).squeeze(-1)
        return x.float(), labels

    def _posterior(self, x, alpha, sigma, labels):
        """Per-component log N(x; alpha mu_k, alpha^2 Sigma_k + sigma^2 I) + log w and the component means of x0."""
        x = x.double()
        a, s = alpha.double()[:, None, None, None], sigma.double()[:, None, None, None]   # (B,1,1,1)
        eye = torch.eye(self.dim, dtype=torch.float64)
        S = a ** 2 * self.covs[None] + s ** 2 * eye                                       # (B, M, D, D)
        r = x[:, None, :] - a[..., 0] * self.means[None]                                   # (B, M, D)
        Sinv_r = torch.linalg.solve(S, r[..., None])                                       # (B, M, D, 1)
        logp = -0.5 * (r[..., None] * Sinv_r).sum((-1, -2)) - 0.5 * torch.logdet(S) \
            - 0.5 * self.dim * math.log(2 * math.pi) + self._log_w(labels.cpu()).to(x.device)  # (B, M)
        mu0 = self.means[None] + a[..., 0] * (self.covs[None] @ Sinv_r).squeeze(-1)        # (B, M, D)
        return logp, mu0

    def denoise(self, x_t, alpha, sigma, labels):
        """Exact E[x0 | x_t, label] for x_t = alpha x0 + sigma z; alpha, sigma, labels: (B,)."""
        logp, mu0 = self._posterior(x_t, alpha, sigma, labels)
        return (logp.softmax(-1)[..., None] * mu0).sum(1).to(x_t.dtype)

    def log_prob(self, x, labels=None):
        """log p(x) (or log p(x | label)) under the mixture -> (B,)."""
        labels = torch.full((x.shape[0],), self.n_classes) if labels is None else labels
        one, zero = torch.ones(x.shape[0]), torch.zeros(x.shape[0])
        return torch.logsumexp(self._posterior(x.cpu(), one, zero, labels)[0], -1)

    def responsibilities(self, x):
        """(B, M) posterior probability of each component for clean points x (mode assignment)."""
        one, zero = torch.ones(x.shape[0]), torch.zeros(x.shape[0])
        return self._posterior(x.cpu(), one, zero, torch.full((x.shape[0],), self.n_classes))[0].softmax(-1)

    def spec(self):
        return dict(name=self.name, means=self.means.tolist(), covs=self.covs.tolist(),
                    weights=self.weights.tolist(), classes=self.classes.tolist())


def ring_target(n_modes=8, radius=2.0, std=0.1):
    """Default toy target: 8 modes on a circle, alternating between 2 classes."""
    ang = torch.arange(n_modes) * 2 * math.pi / n_modes
    means = radius * torch.stack([ang.cos(), ang.sin()], 1)
    return GMM(means, std ** 2 * torch.eye(2).expand(n_modes, 2, 2), torch.ones(n_modes),
               torch.arange(n_modes) % 2, name="ring")


def grid_target(n=5, spacing=1.0, std=0.1):
    """A 5x5 grid of modes, checkerboard classes."""
    c = (torch.arange(n) - (n - 1) / 2) * spacing
    means = torch.cartesian_prod(c, c)                                     # (n*n, 2)
    classes = (torch.arange(n)[:, None] + torch.arange(n)[None]).flatten() % 2
    return GMM(means, std ** 2 * torch.eye(2).expand(n * n, 2, 2), torch.ones(n * n), classes, name="grid")


def load_target(name):
    """'ring', 'grid', or a JSON file with `means`, `covs` or `stds`, optional `weights` and `classes`."""
    if name == "ring":
        return ring_target()
    if name == "grid":
        return grid_target()
    if not name.endswith(".json"):
        raise ValueError(f"unknown toy target {name!r}: use 'ring', 'grid' or a path to a .json GMM file")
    if not os.path.exists(name):
        raise FileNotFoundError(f"toy target file {name!r} not found")
    with open(name) as f:
        spec = json.load(f)
    if "means" not in spec or ("covs" in spec) == ("stds" in spec):
        raise ValueError(f"{name}: a GMM file needs 'means' and exactly one of 'covs' (M x D x D) or 'stds' "
                         f"(M scalars or M x D); found keys {sorted(spec)}")
    means = torch.tensor(spec["means"], dtype=torch.float64)
    if means.dim() != 2:
        raise ValueError(f"{name}: 'means' must be a list of points (M x D), got shape {tuple(means.shape)}")
    M, D = means.shape
    if "covs" in spec:
        covs = torch.tensor(spec["covs"], dtype=torch.float64)
    else:
        stds = torch.tensor(spec["stds"], dtype=torch.float64)
        stds = stds[:, None].expand(M, D) if stds.dim() == 1 else stds
        covs = torch.diag_embed(stds ** 2)
    return GMM(means, covs, spec.get("weights", [1.0] * M), spec.get("classes", [0] * M),
               name=os.path.splitext(os.path.basename(name))[0])


#################################################################################
#                          Toy teacher                                          #
#################################################################################

class ToyTeacher:
    """A class-conditional 2-D teacher: the exact GMM denoiser, or an MLP fitted to the GMM.

    `network` (a ToyMLP, v-prediction by default) is what student and fake are initialised from in both cases.
    Labels are the condition; label `n_classes` is the null class used for CFG. `.to(device)` moves the
    network; `encode` / `uncond` then hand out conditions on that device.
    """

    def __init__(self, gmm, network, exact=False, prediction="v"):
        self.gmm, self.network, self.exact, self.prediction = gmm, network, exact, prediction
        self.schedule = tdm.Schedule("linear", 1e-4, 0.02)
        self.sample_shape = (gmm.dim,)
        self.n_classes = gmm.n_classes
        self.device = torch.device("cpu") if network is None else next(network.parameters()).device

    def to(self, device):
        """Move the network (and the conditions it hands out) to `device`; the GMM stays on the CPU."""
        self.device = torch.device(device)
        if self.network is not None:
            self.network.to(self.device)
        return self

    def x0(self, net, x_t, t, cond, K=None):
        """Run a network of the teacher's architecture and convert its prediction (eps or v) to x0."""
        out = net(x_t, t, cond, K)
        a, s = self.schedule.alpha(t)[:, None], self.schedule.sigma(t)[:, None]
        return (x_t - s * out) / a if self.prediction == "eps" else a * x_t - s * out

    @torch.no_grad()
    def denoise(self, x_t, t, cond):
        if self.exact:      # the closed form runs in float64 on the CPU
            x0 = self.gmm.denoise(x_t.cpu(), self.schedule.alpha(t.cpu()), self.schedule.sigma(t.cpu()), cond.cpu())
            return x0.to(x_t.device)
        return self.x0(self.network, x_t, t, cond)

    def encode(self, labels):
        return torch.as_tensor(labels, dtype=torch.long).to(self.device)

    def uncond(self, n):
        return torch.full((n,), self.n_classes, dtype=torch.long, device=self.device)

    def sample_labels(self, n, generator=None):
        return torch.multinomial(self.gmm.class_prior(), n, replacement=True, generator=generator)

    def decode(self, x0):
        return x0


def cache_dir():
    """Where fitted toy teachers and prompt embeddings are cached ($TDM_CACHE, default ~/.cache/tdm)."""
    return os.environ.get("TDM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tdm"))


def fit_toy_teacher(gmm, iters=2000, batch=1024, lr=2e-3, p_uncond=0.1, seed=0, width=128, depth=3,
                    prediction="v", log=print):
    """Fit an MLP to the GMM by denoising score matching (eps or v target), t ~ U{0..999}, label dropout for CFG."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = toy_mlp(dim=gmm.dim, n_classes=gmm.n_classes, width=width, depth=depth)
    sch = tdm.Schedule("linear", 1e-4, 0.02)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    lr_at = lambda i: lr * 0.5 * (1 + math.cos(math.pi * i / iters))                 # cosine to zero
    for i in range(iters):
        x0, y = gmm.sample(batch, generator=gen)
        y = torch.where(torch.rand(batch, generator=gen) < p_uncond, gmm.n_classes, y)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        x_t = sch.alpha(t)[:, None] * x0 + sch.sigma(t)[:, None] * eps
        target = eps if prediction == "eps" else sch.alpha(t)[:, None] * eps - sch.sigma(t)[:, None] * x0
        loss = (net(x_t, t, y) - target).pow(2).mean()
        for g in opt.param_groups:
            g["lr"] = lr_at(i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log and (i + 1) % 1000 == 0:
            log(f"  toy teacher fit {i + 1}/{iters}: {prediction}-MSE {loss.item():.4f}")
    return net.eval().requires_grad_(False)


def toy_teacher(target="ring", exact=False, iters=None, seed=0, log=print):
    """The toy teacher for a target; the fitted MLP is cached under cache_dir() keyed by target and settings.

    Fitting runs max(2000, 250 x modes) iterations: the 8-mode ring needs 2,000 (~30 s), the 25-mode grid
    6,250 (with 2,000 its 100-step sampler left 31% of the mass between modes; with 6,000, 3.5%).
    """
    gmm = load_target(target) if isinstance(target, str) else target
    iters = iters or max(2000, 250 * len(gmm.weights))
    key = hashlib.sha1(json.dumps([gmm.spec(), iters, seed, "v-pred 128x3"]).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir(), f"toy_teacher_{gmm.name}_{key}.safetensors")
    net = toy_mlp(dim=gmm.dim, n_classes=gmm.n_classes)
    if os.path.exists(path):
        net.load_state_dict(read_state_dict(path))
        net = net.eval().requires_grad_(False)
    else:
        if log:
            log(f"fitting the toy teacher on {gmm.name!r} ({iters} iterations; cached at {path})")
        net = fit_toy_teacher(gmm, iters=iters, seed=seed, log=log)
        save_safetensors(net.state_dict(), path)      # creates the cache folder
    return ToyTeacher(gmm, net, exact=exact)


MAX_LENGTH = 120   # T5 tokens per caption (PixArt-α)
# The official TDM code hard-codes this schedule (DDPMScheduler linear 1e-4..0.02, 1000 steps, epsilon,
# tdm-method.md §2.1); the model folder's scheduler config is only checked against it.
PIXART_SCHEDULE = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000,
                       prediction_type="epsilon")
REQUIRED = {"transformer/config.json": "the PixArt transformer config",
            "text_encoder/config.json": "the T5 encoder config",
            "tokenizer/spiece.model": "the T5 sentencepiece model",
            "vae/config.json": "the VAE config"}


#################################################################################
#                          Folder checks                                        #
#################################################################################

def check_layout(folder):
    """Raise FileNotFoundError naming every missing part of a diffusers PixArt-α pipeline folder."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"PixArt folder {folder!r} does not exist; pass a diffusers PixArt-α pipeline folder "
                                "(e.g. a download of PixArt-alpha/PixArt-XL-2-512x512)")
    missing = [f"{rel} ({what})" for rel, what in REQUIRED.items() if not os.path.isfile(os.path.join(folder, rel))]
    if missing:
        raise FileNotFoundError(f"{folder!r} is not a complete diffusers PixArt-α pipeline folder: missing "
                                + "; ".join(missing) + ". Expected transformer/, text_encoder/, tokenizer/ (with "
                                "spiece.model), vae/ and scheduler/, as in PixArt-alpha/PixArt-XL-2-512x512; "
                                "download the missing sub-folders")


def check_scheduler_config(folder, strict=True):
    """Compare scheduler/scheduler_config.json (if present) with the hard-coded PixArt schedule.

    A disagreement raises ValueError (strict) or warns: the teacher would use a schedule or prediction
    type the network was not trained with. Returns the config dict, or None when the file is absent.
    """
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        cfg = json.load(f)
    bad = []
    for key, want in PIXART_SCHEDULE.items():
        got = cfg.get(key, want)
        same = math.isclose(got, want, rel_tol=1e-6) if isinstance(want, float) and isinstance(got, (int, float)) \
            else got == want
        if not same:
            bad.append(f"{key}={got!r} (expected {want!r})")
    if cfg.get("trained_betas") is not None:
        bad.append("trained_betas is set (expected null)")
    if bad:
        msg = (f"{path}: " + ", ".join(bad) + ". The PixArt teacher hard-codes the PixArt-α schedule (linear betas "
               "1e-4..0.02 over 1000 steps, epsilon prediction), as the official TDM code does; this folder's model "
               "was trained differently. Use a PixArt-α folder, or pass check_scheduler=False to use the hard-coded "
               "schedule anyway.")
        if strict:
            raise ValueError(msg)
        warnings.warn(msg)
    return cfg


def preprocess(prompt):
    """PixArt's caption preprocessing without bs4/ftfy (diffusers clean_caption=False): lowercase and strip."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompts must be strings, got {type(prompt).__name__}")
    return prompt.lower().strip()


def read_prompts(path):
    """Non-empty lines of a text file (e.g. prompts.txt)."""
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"{path!r} holds no prompts; expected one prompt per line")
    return prompts


#################################################################################
#                          PixArt-α teacher                                     #
#################################################################################

class PixArtTeacher:
    """PixArt-α (ε-prediction with learned variance) as an x0-denoiser, with cached T5 prompts and VAE decoding.

    Interface (see teachers.ToyTeacher): `schedule`, `sample_shape`, `network`, `x0(net, x_t, t, cond, K)`,
    `denoise(x_t, t, cond)`, `encode(prompts)`, `uncond(n)`, `decode(x0)`. `cond` is a tuple
    (prompt_embeds (B, 120, 4096), attention_mask (B, 120)), so tdm._take / tdm._cat work on it.

    The DiT is loaded at once, in `dtype`. T5 is loaded only when a prompt is not in the on-disk cache
    and freed after encoding (unless keep_t5); the VAE is loaded at the first decode.
    """

    def __init__(self, folder, device=None, dtype=None, resolution=None, t5_dtype=None, vae_dtype=None,
                 check_scheduler=True, keep_t5=False, t5_batch=8, autocast="auto", log=print):
        """device: default cuda when available; dtype of the DiT (and T5/VAE unless given): default bf16 on GPU,
        fp32 on CPU; autocast: a dtype (bf16) to run every network call under autocast, None, or "auto" = bf16 on
        GPU (fp32 trainable adapters or copies then run their matmuls in bf16 too), none on CPU."""
        folder = os.fspath(folder)
        check_layout(folder)
        check_scheduler_config(folder, strict=check_scheduler)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        if autocast == "auto":
            autocast = torch.bfloat16 if device.type == "cuda" else None
        self.folder, self.device, self.dtype = folder, device, dtype
        self.t5_dtype, self.vae_dtype = t5_dtype or dtype, vae_dtype or dtype
        self.keep_t5, self.t5_batch, self.log = keep_t5, t5_batch, log or (lambda *a: None)
        with open(os.path.join(folder, "vae", "config.json")) as f:
            vae_cfg = json.load(f)
        self.scaling_factor = vae_cfg.get("scaling_factor", 0.18215)
        self._init_network(load_pixart(folder, device=device, dtype=dtype),
                           2 ** (len(vae_cfg.get("block_out_channels", (128, 256, 512, 512))) - 1), resolution,
                           autocast)
        self.cache_folder = os.path.join(cache_dir(), "pixart_t5", self._t5_identity())
        self._t5 = self._vae = self._uncond = None
        self._rows = {}                                 # text -> its T5 rows, read once from the disk cache

    @classmethod
    def from_network(cls, network, vae_factor=8, resolution=None, autocast=None):
        """A teacher around an in-memory DiT, without a folder (no prompt encoding or decoding): benchmarks, tests."""
        self = cls.__new__(cls)
        self.device, self.folder = next(network.parameters()).device, None
        self._init_network(network, vae_factor, resolution, autocast)
        return self

    def _need_folder(self, what):
        if self.folder is None:
            raise ValueError(f"{what} needs the model folder (T5, VAE); this teacher was built from a network alone "
                             "(PixArtTeacher.from_network): load it with load_teacher('pixart', DIR)")

    def _init_network(self, network, vae_factor, resolution, autocast):
        self.schedule = tdm.Schedule(PIXART_SCHEDULE["beta_schedule"], PIXART_SCHEDULE["beta_start"],
                                     PIXART_SCHEDULE["beta_end"], PIXART_SCHEDULE["num_train_timesteps"])
        self.network, self.vae_factor, self.autocast = network.requires_grad_(False), vae_factor, autocast
        cfg = network.config
        self.micro_conditions = cfg.use_additional_conditions          # 1024-MS: resolution / aspect ratio
        h, w = (cfg.sample_size * vae_factor,) * 2 if resolution is None else \
            (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        unit = vae_factor * cfg.patch_size
        if h % unit or w % unit:
            raise ValueError(f"resolution {h}x{w} must be a multiple of {unit} (VAE factor {vae_factor} x "
                             f"patch size {cfg.patch_size})")
        self.sample_shape = (cfg.in_channels, h // vae_factor, w // vae_factor)

    # ---------------------------------------------------------------- denoising

    def _added_cond_kwargs(self, x_t):
        """1024-MS micro-conditions from the latent shape: resolution [H, W] in pixels, aspect ratio H / W."""
        if not self.micro_conditions:
            return None
        B, _, H, W = x_t.shape
        f = self.vae_factor
        res = torch.tensor([[H * f, W * f]], dtype=torch.float32, device=x_t.device).repeat(B, 1)    # (B, 2)
        ar = torch.tensor([[H / W]], dtype=torch.float32, device=x_t.device).repeat(B, 1)            # (B, 1)
        return {"resolution": res, "aspect_ratio": ar}

    def x0(self, net, x_t, t, cond, K=None):
        """Run a network of the teacher's architecture: eps = first 4 of its 8 output channels (the learned
        variance is discarded, as the official code's chunk(2, dim=1)[0]); x0 = (x_t - sigma_t eps) / alpha_t.
        Computed in float32, returned in x_t's dtype."""
        emb, mask = cond
        extra = {} if K is None else {"step_count": K}                   # TDM-unify students only
        # Autocast per call, not around a whole training step: autocast caches the low-precision copy of each
        # trainable weight until its outermost region ends, so a forward after an optimiser step in the same
        # region would still see the old weights (a second fake update would).
        with torch.autocast(x_t.device.type, dtype=self.autocast or torch.bfloat16, enabled=bool(self.autocast)):
            out = net(x_t, t, emb, mask, self._added_cond_kwargs(x_t), **extra)   # the DiT casts to its dtype
        eps = out.chunk(2, dim=1)[0] if out.shape[1] == 2 * x_t.shape[1] else out                  # (B, 4, H, W)
        a = self.schedule.alpha(t).reshape(-1, 1, 1, 1)
        s = self.schedule.sigma(t).reshape(-1, 1, 1, 1)
        return ((x_t.float() - s * eps.float()) / a).to(x_t.dtype)

    @torch.no_grad()
    def denoise(self, x_t, t, cond):
        """The teacher's conditional x0_hat (no CFG: tdm.cfg_denoise adds it); LoRA adapters switched off."""
        with use_adapter(self.network, None):
            return self.x0(self.network, x_t, t, cond)

    # ---------------------------------------------------------------- prompts

    def _t5_identity(self):
        """Cache folder name: a hash of the T5 and tokenizer files (path, size, mtime), max length and T5 dtype."""
        parts = []
        for sub in ("text_encoder", "tokenizer"):
            d = os.path.realpath(os.path.join(self.folder, sub))
            parts += [(d, name, os.path.getsize(os.path.join(d, name)), os.stat(os.path.join(d, name)).st_mtime_ns)
                      for name in sorted(os.listdir(d)) if os.path.isfile(os.path.join(d, name))]
        key = json.dumps([parts, MAX_LENGTH, str(self.t5_dtype), "lower-strip"])
        return hashlib.sha1(key.encode()).hexdigest()[:16]

    def _cache_path(self, text):
        return os.path.join(self.cache_folder, hashlib.sha1(text.encode()).hexdigest()[:24] + ".safetensors")

    def _load_t5(self):
        if self._t5 is None:
            self.log(f"loading T5 from {self.folder} (prompt embeddings cached in {self.cache_folder})")
            tokenizer, encoder = load_t5(self.folder, dtype=self.t5_dtype, max_length=MAX_LENGTH)
            self._t5 = tokenizer, encoder.to(self.device)
        return self._t5

    def free_t5(self):
        self._t5 = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.no_grad()
    def _run_t5(self, texts):
        """Preprocessed texts -> list of (n_tokens_i, d_model) CPU tensors: the valid rows of T5's last hidden state."""
        tokenizer, encoder = self._load_t5()
        ids, mask = tokenizer(texts)                                                 # (B, 120) each
        hidden = encoder(ids.to(self.device), mask.to(self.device))                  # (B, 120, d)
        return [hidden[b, :int(mask[b].sum())].cpu() for b in range(len(texts))]

    def _read(self, path, text):
        from safetensors import safe_open
        try:
            with safe_open(path, framework="pt") as f:
                stored, emb = (f.metadata() or {}).get("prompt"), f.get_tensor("embeds")
        except Exception as e:
            raise ValueError(f"cached prompt embedding {path!r} is unreadable ({e}); delete it to re-encode") from e
        if stored != text:
            raise ValueError(f"cache collision: {path!r} holds {stored!r}, not {text!r}; delete it to re-encode")
        return emb

    def prepare(self, prompts):
        """Make sure every prompt and the empty prompt (CFG) are in the disk cache and read into memory, running
        T5 at most once for all of them; returns the preprocessed texts."""
        self._need_folder("prompt encoding")
        texts = [preprocess(p) for p in prompts]
        todo = [t for t in dict.fromkeys(texts + [""]) if t not in self._rows and not os.path.exists(self._cache_path(t))]
        if todo:
            self.log(f"encoding {len(todo)} new prompt(s) with T5")
            for i in range(0, len(todo), self.t5_batch):
                chunk = todo[i:i + self.t5_batch]
                for text, emb in zip(chunk, self._run_t5(chunk)):
                    save_safetensors({"embeds": emb}, self._cache_path(text), {"prompt": text})
            if not self.keep_t5:
                self.free_t5()
        for t in texts:
            if t not in self._rows:
                self._rows[t] = self._read(self._cache_path(t), t)
        return texts

    def encode(self, prompts):
        """Prompts (str or list) -> (prompt_embeds (B, 120, d) in `dtype`, attention_mask (B, 120) long) on `device`.

        Each preprocessed prompt's T5 output is cached on disk (one safetensors file, valid rows only), so T5
        runs once per prompt; only prompts missing from the cache are encoded. Padded rows come back as
        zeros: the DiT masks them out (bias -10000, exp underflows to exactly 0), so only valid rows matter.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("encode() needs at least one prompt")
        texts = self.prepare(prompts)
        rows = [self._rows[t] for t in texts]
        embeds = torch.zeros(len(rows), MAX_LENGTH, rows[0].shape[1], dtype=self.dtype)     # padded rows: zeros
        mask = torch.zeros(len(rows), MAX_LENGTH, dtype=torch.long)
        for b, row in enumerate(rows):
            embeds[b, :len(row)], mask[b, :len(row)] = row.to(self.dtype), 1
        return embeds.to(self.device), mask.to(self.device)

    def uncond(self, n):
        """The empty-prompt embedding repeated n times: diffusers' PixArt negative prompt "" (its own mask)."""
        if self._uncond is None:
            self._uncond = self.encode([""])
        emb, mask = self._uncond
        return emb.repeat(n, 1, 1), mask.repeat(n, 1)

    # ---------------------------------------------------------------- images

    def _load_vae(self):
        self._need_folder("decoding")
        if self._vae is None:
            self._vae = load_vae(self.folder, dtype=self.vae_dtype).to(self.device)
        return self._vae

    @torch.no_grad()
    def decode(self, x0, batch=8):
        """Latents x0 (B, 4, h, w) -> images (B, 3, 8h, 8w) float32 in [0, 1]: VAE decode of x0 / scaling_factor."""
        vae, out = self._load_vae(), []
        for z in (x0 / self.scaling_factor).split(batch):
            img = vae.decode(z.to(device=self.device, dtype=self.vae_dtype)).float()
            out.append((img / 2 + 0.5).clamp(0, 1))
        return torch.cat(out)


def load_pixart_teacher(weights, **kw):
    """PixArt-α teacher from a diffusers pipeline folder (device, dtype defaults: see PixArtTeacher)."""
    return PixArtTeacher(weights, **kw)


def load_teacher(name, weights=None, **kw):
    """'toy' (MLP teacher fitted to the target), 'toy-exact' (closed-form GMM denoiser), 'pixart' (a model folder)."""
    if name in ("toy", "toy-exact"):
        return toy_teacher(exact=name == "toy-exact", **kw)
    if name == "pixart":
        if not weights:
            raise ValueError("--teacher pixart needs --weights DIR: the downloaded diffusers folder, "
                             "e.g. PixArt-alpha/PixArt-XL-2-512x512 (see README)")
        return load_pixart_teacher(weights, **kw)
    raise ValueError(f"unknown teacher {name!r}; available: 'toy', 'toy-exact', 'pixart'")


def copy_network(net, step_counts=()):
    """A trainable copy of the teacher network (student / fake init), with a zero step embedding for TDM-unify."""
    new = copy.deepcopy(net).train().requires_grad_(True)
    if step_counts:
        new.add_step_embedding(step_counts)
    return new
