"""Teachers: what turns a network (or a closed form) into x0_hat = E[x0 | x_t, cond], and what each teacher
brings to a run (its schedule, conditions, output kind and default hyper-parameters).

    x0_from_prediction    network output -> x0 for eps, v and eps-with-learned-variance (docs/method.md §1)
    GMM, ToyTeacher       2-D Gaussian-mixture targets with an exact denoiser, and the toy teacher: an MLP fitted
                          to the mixture (or the closed form itself, ExactToyTeacher)
    LatentTextToImageTeacher   the base of the image teachers: folder and scheduler checks, per-call autocast,
                          prompt embeddings cached on disk, the empty-prompt uncond, lazy VAE decoding
    PixArtTeacher         PixArt-α on a diffusers folder (pixart.py, t5.py, vae.py)
    TEACHERS              the dict of teachers: train.py's --teacher choices

Interface used by tdm.py / train.py / sample.py / eval.py: `schedule`, `sample_shape`, `network`, `device`,
`x0(net, x_t, t, cond, K)`, `denoise(x_t, t, cond)`, `encode(labels or prompts)`, `uncond(n)`,
`training_conditions(n)`, `decode(x0)`; the class attributes DEFAULTS (train.py's per-teacher defaults) and
OUTPUT ("points" or "images").
"""
import copy
import hashlib
import json
import math
import os
import warnings

import torch

import tdm
from models import StepCountEmbedding, read_json, read_state_dict, save_safetensors, toy_mlp, use_adapter
from pixart import load_pixart
from t5 import load_t5
from vae import VAEConfig, load_vae


#################################################################################
#                          Network output -> x0                                 #
#################################################################################

PREDICTIONS = ("epsilon", "v_prediction", "epsilon+variance")


def x0_from_prediction(out, x_t, schedule, t, prediction):
    """x0_hat from a network's raw output at (x_t, t) (docs/method.md §1), computed in float32 and returned in
    x_t's dtype:  epsilon: x0 = (x_t - sigma_t eps) / alpha_t;  v_prediction: x0 = alpha_t x_t - sigma_t v;
    epsilon+variance: eps is the first half of the output channels (the learned variance is dropped, as the
    official code's chunk(2, dim=1)[0]); an output with as many channels as x_t is eps itself."""
    if prediction == "epsilon+variance":
        out = out.chunk(2, dim=1)[0] if out.shape[1] == 2 * x_t.shape[1] else out            # (B, C, ...)
    a, s = tdm._bc(schedule.alpha(t), x_t), tdm._bc(schedule.sigma(t), x_t)
    x, out = x_t.float(), out.float()
    if prediction in ("epsilon", "epsilon+variance"):
        x0 = (x - s * out) / a
    elif prediction == "v_prediction":
        x0 = a * x - s * out
    else:
        raise ValueError(f"prediction type {prediction!r}: expected one of {PREDICTIONS}")
    return x0.to(x_t.dtype)


def prediction_target(x0, eps, schedule, t, prediction):
    """The inverse: what a network of this prediction type regresses on for x_t = alpha x0 + sigma eps
    (epsilon: eps; v_prediction: v = alpha eps - sigma x0). Used to fit the toy teacher."""
    if prediction == "epsilon":
        return eps
    if prediction == "v_prediction":
        return tdm._bc(schedule.alpha(t), x0) * eps - tdm._bc(schedule.sigma(t), x0) * x0
    raise ValueError(f"prediction type {prediction!r}: expected 'epsilon' or 'v_prediction'")


def _step_count_kwargs(net, K):
    """{'step_count': K} for a TDM-unify network (models.StepCountEmbedding), {} when K is None."""
    if K is None:
        return {}
    if not isinstance(net, StepCountEmbedding):
        raise ValueError("a step count K was given to a network without a step embedding; build the student with "
                         "step counts (train.py --unify does this)")
    return {"step_count": K}


def copy_network(net, step_counts=()):
    """A trainable copy of the teacher network (student / fake init); under TDM-unify wrapped with a zero
    step-count embedding, so the copy computes exactly the teacher's function (docs/method.md §8)."""
    new = copy.deepcopy(net).train().requires_grad_(True)
    return StepCountEmbedding(new, step_counts) if step_counts else new


def cache_dir():
    """Where fitted toy teachers and prompt embeddings are cached ($TDM_CACHE, default ~/.cache/tdm)."""
    return os.environ.get("TDM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tdm"))


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
    """A class-conditional 2-D teacher: an MLP fitted to a Gaussian mixture (v-prediction).

    `network` (a ToyMLP) is what student and fake are initialised from. Labels are the condition; label
    `n_classes` is the null class used for CFG. `.to(device)` moves the network; `encode` / `uncond` then hand
    out conditions on that device.
    """
    OUTPUT = "points"
    # train.py's defaults for this teacher. The toy departs from the official interval and fake weighting: with
    # them its modes narrow and SW2 creeps up over long runs; the shared interval with a plain eps-MSE fake
    # holds (docs/toy-results.md, "Stability"; 3 seeds each).
    DEFAULTS = dict(cfg=1.0, lr_fake=3e-4, batch=512, iters=2000, ema=0.995, save_every=1000,
                    interval="shared", snr_clamp=1000.0, device="cpu")
    exact = False

    def __init__(self, gmm, network, prediction="v_prediction"):
        self.gmm, self.network, self.prediction = gmm, network, prediction
        self.schedule = tdm.Schedule("linear", 1e-4, 0.02)
        self.sample_shape = (gmm.dim,)
        self.n_classes = gmm.n_classes
        self.run_name, self.target = f"toy-{gmm.name}", gmm.name     # target: what load() was given
        self.device = next(network.parameters()).device

    @classmethod
    def load(cls, weights=None, target="ring", device=None, log=print, **kw):
        """The toy teacher of a target (`ring`, `grid` or a GMM .json file); fitted once, then cached."""
        if weights:
            raise ValueError(f"the toy teachers take no weights (got {weights!r}); use --toy-target for the target")
        gmm = load_target(target) if isinstance(target, str) else target
        teacher = cls(gmm, fitted_toy_network(gmm, log=log, **kw))
        teacher.target = target if isinstance(target, str) else gmm.name
        return teacher.to(device) if device is not None else teacher

    def run_meta(self):
        """What a run records to rebuild this teacher (student.json)."""
        return dict(target=self.target, weights=None, network=self.network.config)

    def to(self, device):
        """Move the network (and the conditions it hands out) to `device`; the GMM stays on the CPU."""
        self.device = torch.device(device)
        self.network.to(self.device)
        return self

    def x0(self, net, x_t, t, cond, K=None):
        """Run a network of the teacher's architecture and convert its prediction to x0."""
        return x0_from_prediction(net(x_t, t, cond, **_step_count_kwargs(net, K)), x_t, self.schedule, t,
                                  self.prediction)

    @torch.no_grad()
    def denoise(self, x_t, t, cond):
        return self.x0(self.network, x_t, t, cond)

    def encode(self, labels):
        return torch.as_tensor(labels, dtype=torch.long).to(self.device)

    def uncond(self, n):
        return torch.full((n,), self.n_classes, dtype=torch.long, device=self.device)

    def sample_labels(self, n, generator=None):
        return torch.multinomial(self.gmm.class_prior(), n, replacement=True, generator=generator)

    def training_conditions(self, n):
        """(cond, uncond) of one training batch: labels drawn from the class prior, and the null class."""
        return self.encode(self.sample_labels(n)), self.uncond(n)

    def decode(self, x0):
        return x0


class ExactToyTeacher(ToyTeacher):
    """The toy teacher whose denoiser is the closed form E[x0 | x_t, label] of the mixture (float64, on the CPU).
    Student and fake still start as copies of the fitted MLP (`network`)."""
    exact = True

    @torch.no_grad()
    def denoise(self, x_t, t, cond):
        x0 = self.gmm.denoise(x_t.cpu(), self.schedule.alpha(t.cpu()), self.schedule.sigma(t.cpu()), cond.cpu())
        return x0.to(x_t.device)


def fit_toy_teacher(gmm, iters=2000, batch=1024, lr=2e-3, p_uncond=0.1, seed=0, width=128, depth=3,
                    prediction="v_prediction", log=print):
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
        loss = (net(x_t, t, y) - prediction_target(x0, eps, sch, t, prediction)).pow(2).mean()
        for g in opt.param_groups:
            g["lr"] = lr_at(i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log and (i + 1) % 1000 == 0:
            log(f"  toy teacher fit {i + 1}/{iters}: {prediction}-MSE {loss.item():.4f}")
    return net.eval().requires_grad_(False)


def fitted_toy_network(gmm, iters=None, seed=0, log=print):
    """The toy teacher's MLP for a target, fitted once and cached under cache_dir() by target and settings.

    Fitting runs max(2000, 250 x modes) iterations: the 8-mode ring needs 2,000 (~30 s), the 25-mode grid
    6,250 (with 2,000 its 100-step sampler left 31% of the mass between modes; with 6,000, 3.5%).
    """
    iters = iters or max(2000, 250 * len(gmm.weights))
    key = hashlib.sha1(json.dumps([gmm.spec(), iters, seed, "v-pred 128x3"]).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir(), f"toy_teacher_{gmm.name}_{key}.safetensors")
    # Built on both paths: its initialisation draws from the global RNG, so a run draws the same noise whether
    # the fit was cached or not.
    net = toy_mlp(dim=gmm.dim, n_classes=gmm.n_classes)
    if os.path.exists(path):
        net.load_state_dict(read_state_dict(path))
        return net.eval().requires_grad_(False)
    if log:
        log(f"fitting the toy teacher on {gmm.name!r} ({iters} iterations; cached at {path})")
    net = fit_toy_teacher(gmm, iters=iters, seed=seed, log=log)
    save_safetensors(net.state_dict(), path)      # creates the cache folder
    return net


#################################################################################
#                          Prompts                                              #
#################################################################################

def preprocess(prompt):
    """Caption preprocessing without bs4/ftfy (diffusers' clean_caption=False for PixArt): lowercase and strip."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompts must be strings, got {type(prompt).__name__}")
    return prompt.lower().strip()


def read_prompts(path):
    """Non-empty lines of a text file (e.g. prompts.txt)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} not found; pass --prompts FILE with one prompt per line")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"{path!r} holds no prompts; expected one prompt per line")
    return prompts


#################################################################################
#                          Latent text-to-image teachers                        #
#################################################################################

class LatentTextToImageTeacher:
    """The base of the image teachers: a denoising network on VAE latents, conditioned on text embeddings.

    A subclass sets NAME, REQUIRED (files of the diffusers folder), SCHEDULE (the schedule it hard-codes and
    checks the folder's scheduler config against), PREDICTION, MAX_LENGTH, ENCODER_FOLDERS, and implements
    `load_network(folder, device, dtype)`, `load_encoder()` -> texts -> list of (n_i, d) CPU tensors, and
    `call(net, x_t, t, cond, **kw)` -> the network's raw output.

    `cond` is a tuple (prompt_embeds (B, L, d), attention_mask (B, L)), so tdm._take / tdm._cat work on it. The
    network is loaded at once, in `dtype`; the text encoder only when a prompt is not in the on-disk cache (and
    freed after encoding unless keep_encoder); the VAE at the first decode.
    """
    OUTPUT = "images"
    NAME, REQUIRED, SCHEDULE, PREDICTION, MAX_LENGTH, ENCODER_FOLDERS = "", {}, {}, "epsilon", 77, ()

    def __init__(self, folder, device=None, dtype=None, resolution=None, encoder_dtype=None, vae_dtype=None,
                 check_scheduler=True, keep_encoder=False, encoder_batch=8, autocast="auto", log=print):
        """device: default cuda when available; dtype of the network (and text encoder / VAE unless given):
        default bf16 on GPU, fp32 on CPU; autocast: a dtype (bf16) to run every network call under autocast,
        None, or "auto" = bf16 on GPU (fp32 trainable adapters or copies then run their matmuls in bf16 too)."""
        folder = os.fspath(folder)
        self.check_layout(folder)
        self.check_scheduler_config(folder, strict=check_scheduler)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        if autocast == "auto":
            autocast = torch.bfloat16 if device.type == "cuda" else None
        self.folder, self.device, self.dtype = folder, device, dtype
        self.encoder_dtype, self.vae_dtype = encoder_dtype or dtype, vae_dtype or dtype
        self.keep_encoder, self.encoder_batch, self.log = keep_encoder, encoder_batch, log or (lambda *a: None)
        vae_cfg = VAEConfig.from_json(os.path.join(folder, "vae", "config.json"))
        self.scaling_factor = vae_cfg.scaling_factor
        self._init_network(self.load_network(folder, device, dtype), 2 ** (len(vae_cfg.block_out_channels) - 1),
                           resolution, autocast)
        self.cache_folder = os.path.join(cache_dir(), f"{self.NAME}_text", self._encoder_identity())
        self._encoder = self._vae = self._uncond = None
        self._rows = {}                                 # text -> its encoder rows, read once from the disk cache
        self.prompts = None

    @classmethod
    def load(cls, weights=None, target=None, device=None, log=print, **kw):
        """The teacher of a downloaded diffusers folder (train.py --weights)."""
        if not weights:
            raise ValueError(f"--teacher {cls.NAME} needs --weights DIR: the downloaded diffusers folder (see README)")
        return cls(weights, device=device, log=log, **kw)

    @classmethod
    def from_network(cls, network, vae_factor=8, resolution=None, autocast=None):
        """A teacher around an in-memory network, without a folder (no prompt encoding or decoding): benchmarks,
        tests."""
        self = cls.__new__(cls)
        self.device, self.folder = next(network.parameters()).device, None
        self._init_network(network, vae_factor, resolution, autocast)
        return self

    def _init_network(self, network, vae_factor, resolution, autocast):
        s = self.SCHEDULE
        self.schedule = tdm.Schedule(s["beta_schedule"], s["beta_start"], s["beta_end"], s["num_train_timesteps"])
        self.network, self.vae_factor, self.autocast = network.requires_grad_(False), vae_factor, autocast
        self.run_name = self.NAME
        h, w = (network.config.sample_size * vae_factor,) * 2 if resolution is None else \
            (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        unit = vae_factor * getattr(network.config, "patch_size", 1)
        if h % unit or w % unit:
            raise ValueError(f"resolution {h}x{w} must be a multiple of {unit} (VAE factor {vae_factor} x "
                             f"patch size {unit // vae_factor})")
        self.sample_shape = (network.config.in_channels, h // vae_factor, w // vae_factor)

    def run_meta(self):
        """What a run records to rebuild this teacher (student.json)."""
        return dict(target=None, weights=self.folder, network=None)

    # ---------------------------------------------------------------- folder checks

    @classmethod
    def check_layout(cls, folder):
        """Raise FileNotFoundError naming every missing part of the diffusers pipeline folder."""
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{cls.NAME} folder {folder!r} does not exist; pass the downloaded diffusers "
                                    f"pipeline folder ({cls.EXAMPLE})")
        missing = [f"{rel} ({what})" for rel, what in cls.REQUIRED.items()
                   if not os.path.isfile(os.path.join(folder, rel))]
        if missing:
            subs = ", ".join(sorted({rel.split("/")[0] + "/" for rel in cls.REQUIRED}))
            raise FileNotFoundError(f"{folder!r} is not a complete diffusers {cls.NAME} pipeline folder: missing "
                                    + "; ".join(missing) + f". Expected {subs} and scheduler/, as in {cls.EXAMPLE}; "
                                    "download the missing sub-folders")

    @classmethod
    def check_scheduler_config(cls, folder, strict=True):
        """Compare scheduler/scheduler_config.json (if present) with the hard-coded SCHEDULE.

        A disagreement raises ValueError (strict) or warns: the teacher would use a schedule or prediction
        type the network was not trained with. Returns the config dict, or None when the file is absent.
        """
        path = os.path.join(folder, "scheduler", "scheduler_config.json")
        if not os.path.isfile(path):
            return None
        cfg, bad = read_json(path), []
        for key, want in cls.SCHEDULE.items():
            got = cfg.get(key, want)
            same = math.isclose(got, want, rel_tol=1e-6) if isinstance(want, float) and \
                isinstance(got, (int, float)) else got == want
            if not same:
                bad.append(f"{key}={got!r} (expected {want!r})")
        if cfg.get("trained_betas") is not None:
            bad.append("trained_betas is set (expected null)")
        if bad:
            msg = (f"{path}: " + ", ".join(bad) + f". The {cls.NAME} teacher hard-codes its schedule ("
                   + ", ".join(f"{k} {v}" for k, v in cls.SCHEDULE.items()) + "), as the official TDM code does; "
                   "this folder's model was trained differently. Use the right folder, or pass "
                   "check_scheduler=False to use the hard-coded schedule anyway.")
            if strict:
                raise ValueError(msg)
            warnings.warn(msg)
        return cfg

    def _need_folder(self, what):
        if self.folder is None:
            raise ValueError(f"{what} needs the model folder (text encoder, VAE); this teacher was built from a "
                             f"network alone (from_network): load it with load_teacher({self.NAME!r}, DIR)")

    # ---------------------------------------------------------------- denoising

    def x0(self, net, x_t, t, cond, K=None):
        """Run a network of the teacher's architecture and convert its output to x0 (in float32, returned in
        x_t's dtype). Autocast wraps each call, not a whole training step: autocast caches the low-precision
        copy of each trainable weight until its outermost region ends, so a forward after an optimiser step in
        the same region would still see the old weights (a second fake update would)."""
        with torch.autocast(x_t.device.type, dtype=self.autocast or torch.bfloat16, enabled=bool(self.autocast)):
            out = self.call(net, x_t, t, cond, **_step_count_kwargs(net, K))
        return x0_from_prediction(out, x_t, self.schedule, t, self.PREDICTION)

    @torch.no_grad()
    def denoise(self, x_t, t, cond):
        """The teacher's conditional x0_hat (no CFG: tdm.cfg_denoise adds it); LoRA adapters switched off."""
        with use_adapter(self.network, None):
            return self.x0(self.network, x_t, t, cond)

    # ---------------------------------------------------------------- prompts

    def _encoder_identity(self):
        """Cache folder name: a hash of the text encoder and tokenizer files (path, size, mtime), the max length,
        the encoder dtype and the preprocessing."""
        parts = []
        for sub in self.ENCODER_FOLDERS:
            d = os.path.realpath(os.path.join(self.folder, sub))
            parts += [(d, name, os.path.getsize(os.path.join(d, name)), os.stat(os.path.join(d, name)).st_mtime_ns)
                      for name in sorted(os.listdir(d)) if os.path.isfile(os.path.join(d, name))]
        key = json.dumps([parts, self.MAX_LENGTH, str(self.encoder_dtype), "lower-strip"])
        return hashlib.sha1(key.encode()).hexdigest()[:16]

    def _cache_path(self, text):
        return os.path.join(self.cache_folder, hashlib.sha1(text.encode()).hexdigest()[:24] + ".safetensors")

    def free_encoder(self):
        self._encoder = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.no_grad()
    def _run_encoder(self, texts):
        """Preprocessed texts -> list of (n_tokens_i, d) CPU tensors: the valid rows of the encoder's output."""
        if self._encoder is None:
            self.log(f"loading the text encoder from {self.folder} (prompt embeddings cached in {self.cache_folder})")
            self._encoder = self.load_encoder()
        return self._encoder(texts)

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
        the text encoder at most once for all of them; returns the preprocessed texts."""
        self._need_folder("prompt encoding")
        texts = [preprocess(p) for p in prompts]
        todo = [t for t in dict.fromkeys(texts + [""])
                if t not in self._rows and not os.path.exists(self._cache_path(t))]
        if todo:
            self.log(f"encoding {len(todo)} new prompt(s) with the text encoder")
            for i in range(0, len(todo), self.encoder_batch):
                chunk = todo[i:i + self.encoder_batch]
                for text, emb in zip(chunk, self._run_encoder(chunk)):
                    save_safetensors({"embeds": emb}, self._cache_path(text), {"prompt": text})
            if not self.keep_encoder:
                self.free_encoder()
        for t in texts:
            if t not in self._rows:
                self._rows[t] = self._read(self._cache_path(t), t)
        return texts

    def use_prompts(self, prompts):
        """The training prompts: encoded once now (and cached), drawn from by training_conditions."""
        self.prepare(prompts)
        self.prompts = list(prompts)

    def training_conditions(self, n):
        """(cond, uncond) of one training batch: n prompts drawn with replacement from use_prompts'."""
        texts = [self.prompts[i] for i in torch.randint(len(self.prompts), (n,)).tolist()]
        return self.encode(texts), self.uncond(n)

    def encode(self, prompts):
        """Prompts (str or list) -> (prompt_embeds (B, L, d) in `dtype`, attention_mask (B, L) long) on `device`,
        L = MAX_LENGTH. Each preprocessed prompt's encoder output is cached on disk (valid rows only), so the
        encoder runs once per prompt. Padded rows come back as zeros: the network masks them out."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("encode() needs at least one prompt")
        texts = self.prepare(prompts)
        rows = [self._rows[t] for t in texts]
        embeds = torch.zeros(len(rows), self.MAX_LENGTH, rows[0].shape[1], dtype=self.dtype)   # padded rows: zeros
        mask = torch.zeros(len(rows), self.MAX_LENGTH, dtype=torch.long)
        for b, row in enumerate(rows):
            embeds[b, :len(row)], mask[b, :len(row)] = row.to(self.dtype), 1
        return embeds.to(self.device), mask.to(self.device)

    def uncond(self, n):
        """The empty-prompt embedding repeated n times: the diffusers pipelines' negative prompt ""."""
        if self._uncond is None:
            self._uncond = self.encode([""])
        emb, mask = self._uncond
        return emb.repeat(n, 1, 1), mask.repeat(n, 1)

    # ---------------------------------------------------------------- images

    @torch.no_grad()
    def decode(self, x0, batch=8):
        """Latents x0 (B, 4, h, w) -> images (B, 3, 8h, 8w) float32 in [0, 1]: VAE decode of x0 / scaling_factor."""
        self._need_folder("decoding")
        if self._vae is None:
            self._vae = load_vae(self.folder, dtype=self.vae_dtype).to(self.device)
        out = []
        for z in (x0 / self.scaling_factor).split(batch):
            img = self._vae.decode(z.to(device=self.device, dtype=self.vae_dtype)).float()
            out.append((img / 2 + 0.5).clamp(0, 1))
        return torch.cat(out)


class PixArtTeacher(LatentTextToImageTeacher):
    """PixArt-α (eps-prediction with learned variance, T5 captions of 120 tokens) on a diffusers folder."""
    NAME, EXAMPLE = "pixart", "e.g. a download of PixArt-alpha/PixArt-XL-2-512x512"
    # train.py's defaults: the official TDM recipe (docs/method.md §11).
    DEFAULTS = dict(cfg=4.5, lr_fake=2e-5, batch=32, iters=500, ema=0.0, save_every=500,
                    interval="separate", snr_clamp=5.0, device="auto")
    # The official TDM code hard-codes this schedule (DDPMScheduler linear 1e-4..0.02, 1000 steps, epsilon);
    # the model folder's scheduler config is only checked against it.
    SCHEDULE = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000,
                    prediction_type="epsilon")
    PREDICTION = "epsilon+variance"
    MAX_LENGTH = 120                  # T5 tokens per caption
    ENCODER_FOLDERS = ("text_encoder", "tokenizer")
    REQUIRED = {"transformer/config.json": "the PixArt transformer config",
                "text_encoder/config.json": "the T5 encoder config",
                "tokenizer/spiece.model": "the T5 sentencepiece model",
                "vae/config.json": "the VAE config"}

    def load_network(self, folder, device, dtype):
        return load_pixart(folder, device=device, dtype=dtype)

    def load_encoder(self):
        tokenizer, encoder = load_t5(self.folder, dtype=self.encoder_dtype, max_length=self.MAX_LENGTH)
        encoder = encoder.to(self.device)

        def run(texts):                                                      # -> [(n_tokens_i, d)] on the CPU
            ids, mask = tokenizer(texts)                                     # (B, 120) each
            hidden = encoder(ids.to(self.device), mask.to(self.device))     # (B, 120, d)
            return [hidden[b, :int(mask[b].sum())].cpu() for b in range(len(texts))]
        return run

    def call(self, net, x_t, t, cond, **kw):
        """The DiT on (x_t, t, T5 rows, mask), with the 1024-MS micro-conditions from the latent shape."""
        emb, mask = cond
        added = None
        if self.network.config.use_additional_conditions:            # resolution [H, W] in pixels, aspect H / W
            B, _, H, W = x_t.shape
            f = self.vae_factor
            added = {"resolution": torch.tensor([[H * f, W * f]], dtype=torch.float32, device=x_t.device).repeat(B, 1),
                     "aspect_ratio": torch.tensor([[H / W]], dtype=torch.float32, device=x_t.device).repeat(B, 1)}
        return net(x_t, t, emb, mask, added, **kw)                    # the DiT casts to its own dtype


#################################################################################
#                          The teachers                                         #
#################################################################################

TEACHERS = {"toy": ToyTeacher, "toy-exact": ExactToyTeacher, "pixart": PixArtTeacher}


def load_teacher(name, weights=None, target="ring", device=None, log=print, **kw):
    """A teacher by name: 'toy' (MLP fitted to the target), 'toy-exact' (closed-form GMM denoiser), 'pixart'
    (a diffusers folder given as `weights`). Keyword arguments go to the teacher's constructor."""
    if name not in TEACHERS:
        raise ValueError(f"unknown teacher {name!r}; available: {', '.join(repr(k) for k in TEACHERS)}")
    return TEACHERS[name].load(weights=weights, target=target, device=device, log=log, **kw)
