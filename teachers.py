"""Teachers: what turns a network (or a closed form) into x0_hat = E[x0 | x_t, cond], and what each teacher
brings to a run (its schedule, conditions, output kind and default hyper-parameters).

    x0_from_prediction    network output -> x0 for eps, v and eps-with-learned-variance (docs/method.md §1)
    ToyTeacher            the 2-D toy teacher: an MLP fitted to a Gaussian mixture of toy.py (ExactToyTeacher:
                          the mixture's closed-form denoiser itself)
    LatentTextToImageTeacher   the base of the image teachers: folder and scheduler checks, per-call autocast,
                          prompt embeddings cached on disk, the empty-prompt uncond, lazy VAE decoding
    PixArtTeacher         PixArt-α on a diffusers folder (pixart.py, t5.py, vae.py)
    SD15Teacher, SDXLTeacher   Stable Diffusion 1.x and SDXL base on a diffusers folder or a single checkpoint
                          file (unet.py, clip.py, vae.py; docs/sd.md)
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
from models import StepCountEmbedding, cache_dir, checkpoint_shapes, read_json, save_safetensors, use_adapter
from clip import load_clip_text
from pixart import load_pixart
from t5 import load_t5
from toy import fitted_toy_network, load_target
from unet import RELEASE_CONFIGS, load_unet, single_file_release
from vae import VAEConfig, load_vae, sd_vae_config, sdxl_vae_config


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


def _step_count_kwargs(net, K):
    """{'step_count': K} for a TDM-unify network (models.StepCountEmbedding), {} when K is None."""
    if K is None:
        return {}
    if isinstance(net, torch.nn.parallel.DistributedDataParallel):      # train.py under torchrun: the wrapper
        net = net.module
    if not isinstance(net, StepCountEmbedding):
        raise ValueError("a step count K was given to a network without a step embedding; build the student with "
                         "step counts (train.py --unify does this)")
    return {"step_count": K}


def copy_network(net, step_counts=()):
    """A trainable copy of the teacher network (student / fake init); under TDM-unify wrapped with a zero
    step-count embedding, so the copy computes exactly the teacher's function (docs/method.md §8)."""
    new = copy.deepcopy(net).train().requires_grad_(True)
    return StepCountEmbedding(new, step_counts) if step_counts else new


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
    DEFAULTS = dict(cfg=1.0, lr_fake=3e-4, lr_ratio=5.0, batch=512, iters=2000, ema=0.995, save_every=1000,
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
    def load(cls, weights=None, target="ring", device=None, log=print, resolution=None, weights_config=None, **kw):
        """The toy teacher of a target (`ring`, `grid` or a GMM .json file); fitted once, then cached. The image
        teachers' options are accepted unset (None), so callers pass them through whatever the teacher."""
        if weights or weights_config or resolution:
            raise ValueError(f"the toy teachers take no weights, weights config or resolution (got {weights!r}, "
                             f"{weights_config!r}, {resolution!r}); use --toy-target for the target")
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


#################################################################################
#                          Prompts                                              #
#################################################################################

def preprocess(prompt):
    """Caption preprocessing without bs4/ftfy (diffusers' clean_caption=False for PixArt): lowercase and strip."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompts must be strings, got {type(prompt).__name__}")
    return prompt.lower().strip()


def read_prompts(path):
    """Non-empty lines of a text file (e.g. prompts.txt), without '#' comment lines."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} not found; pass --prompts FILE with one prompt per line")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip() and not line.startswith("#")]
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
    `load_network(weights, device, dtype)`, `load_encoder()` -> texts -> one dict of CPU tensors per text,
    `make_cond(rows)` -> the batched condition, and `call(net, x_t, t, cond, **kw)` -> the network's raw output.
    A teacher that also reads original single-file checkpoints implements `check_single_file(path)`.

    `cond` is a tensor or a tuple of tensors, batch first, so tdm._take / tdm._cat work on it. The network is
    loaded at once, in `dtype`; the text encoder only when a prompt is not in the on-disk cache (and freed after
    encoding unless keep_encoder); the VAE at the first decode.
    """
    OUTPUT = "images"
    NAME, REQUIRED, SCHEDULE, PREDICTION, MAX_LENGTH, ENCODER_FOLDERS = "", {}, {}, "epsilon", 77, ()

    def __init__(self, weights, device=None, dtype=None, resolution=None, encoder_dtype=None, vae_dtype=None,
                 check_scheduler=True, keep_encoder=False, encoder_batch=8, autocast="auto", weights_config=None,
                 log=print):
        """weights: the diffusers pipeline folder (or, where the teacher reads them, a single checkpoint file);
        weights_config: with a single file, a diffusers pipeline folder whose config.json files and tokenizers
        describe it (default: the release's own configs and the bundled CLIP tokenizer);
        device: default cuda when available; dtype of the network (and text encoder / VAE unless given): default
        bf16 on GPU, fp32 on CPU (an fp16 VAE whose config asks for force_upcast decodes in fp32, as diffusers);
        autocast: a dtype (bf16) to run every network call under autocast, None, or "auto" = bf16 on GPU (fp32
        trainable adapters or copies then run their matmuls in bf16 too)."""
        weights = os.fspath(weights)
        self.weights_config = weights_config and os.fspath(weights_config)
        if os.path.isfile(weights):
            vae_cfg = self.check_single_file(weights, self.weights_config)
            if self.weights_config:
                self.check_scheduler_config(self.weights_config, strict=check_scheduler)
        elif weights_config:
            raise ValueError(f"weights_config describes a single checkpoint file; {weights!r} is not a file (a "
                             "folder brings its own config.json files)")
        else:
            self.check_layout(weights)
            self.check_scheduler_config(weights, strict=check_scheduler)
            vae_cfg = VAEConfig.from_json(os.path.join(weights, "vae", "config.json"))
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        if autocast == "auto":
            autocast = torch.bfloat16 if device.type == "cuda" else None
        self.weights, self.device, self.dtype = weights, device, dtype
        self.encoder_dtype = encoder_dtype or dtype
        self.vae_dtype = vae_dtype or (torch.float32 if dtype == torch.float16 and vae_cfg.force_upcast else dtype)
        self.keep_encoder, self.encoder_batch, self.log = keep_encoder, encoder_batch, log or (lambda *a: None)
        self.vae_config = vae_cfg
        self._init_network(self.load_network(weights, device, dtype), 2 ** (len(vae_cfg.block_out_channels) - 1),
                           resolution, autocast)
        self.cache_folder = os.path.join(cache_dir(), f"{self.NAME}_text", self._encoder_identity())

    @property
    def scaling_factor(self):
        return self.vae_config.scaling_factor

    @classmethod
    def load(cls, weights=None, target=None, device=None, log=print, **kw):
        """The teacher of a downloaded diffusers folder or checkpoint file (train.py --weights)."""
        if not weights:
            raise ValueError(f"--teacher {cls.NAME} needs --weights PATH: the downloaded diffusers folder "
                             f"({cls.EXAMPLE}; see README)")
        return cls(weights, device=device, log=log, **kw)

    @classmethod
    def from_network(cls, network, vae_factor=8, resolution=None, autocast=None):
        """A teacher around an in-memory network, without a folder (no prompt encoding or decoding): benchmarks,
        tests."""
        self = cls.__new__(cls)
        like = next(network.parameters())
        self.device, self.dtype, self.weights, self.weights_config = like.device, like.dtype, None, None
        self._init_network(network, vae_factor, resolution, autocast)
        return self

    def _init_network(self, network, vae_factor, resolution, autocast):
        s = self.SCHEDULE
        self.schedule = tdm.Schedule(s["beta_schedule"], s["beta_start"], s["beta_end"], s["num_train_timesteps"])
        self.network, self.vae_factor, self.autocast = network.requires_grad_(False), vae_factor, autocast
        self.run_name = self.NAME
        self._encoder = self._vae = self._uncond = None
        self._rows = {}                                 # text -> its encoder outputs, read once from the disk cache
        self.prompts = None
        h, w = (network.config.sample_size * vae_factor,) * 2 if resolution is None else \
            (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        unit = vae_factor * getattr(network.config, "patch_size", 1)
        if h % unit or w % unit:
            raise ValueError(f"resolution {h}x{w} must be a multiple of {unit} (VAE factor {vae_factor} x "
                             f"patch size {unit // vae_factor})")
        self.sample_shape = (network.config.in_channels, h // vae_factor, w // vae_factor)

    def run_meta(self):
        """What a run records to rebuild this teacher (student.json)."""
        return dict(target=None, weights=self.weights, network=None, weights_config=self.weights_config)

    # ---------------------------------------------------------------- folder and file checks

    @classmethod
    def check_single_file(cls, path, config_folder=None):
        """Check a single checkpoint file given as weights (and the folder describing it); return its VAE config.
        Teachers that read only diffusers folders refuse files."""
        raise ValueError(f"--teacher {cls.NAME} reads a diffusers pipeline folder ({cls.EXAMPLE}), not the single "
                         f"file {path!r}; pass the folder")

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
                   "this folder's model was trained differently. Use the right folder, or (in Python) pass "
                   "check_scheduler=False to use the hard-coded schedule anyway.")
            if strict:
                raise ValueError(msg)
            warnings.warn(msg)
        return cfg

    def _need_folder(self, what):
        if self.weights is None:
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
        if os.path.isfile(self.weights):                   # a single checkpoint file holds the text encoders
            files = [os.path.realpath(self.weights)]
            if self.weights_config:                        # ... and the folder describing it, the tokenizers
                dirs = [os.path.realpath(os.path.join(self.weights_config, s)) for s in self.ENCODER_FOLDERS]
                files += [os.path.join(d, n) for d in dirs if os.path.isdir(d) for n in sorted(os.listdir(d))]
        else:
            dirs = [os.path.realpath(os.path.join(self.weights, sub)) for sub in self.ENCODER_FOLDERS]
            files = [os.path.join(d, name) for d in dirs for name in sorted(os.listdir(d))
                     if os.path.isfile(os.path.join(d, name))]
        parts = [(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]
        key = json.dumps([parts, self.MAX_LENGTH, str(self.encoder_dtype), "lower-strip"])
        return hashlib.sha1(key.encode()).hexdigest()[:16]

    def _cache_path(self, text):
        return os.path.join(self.cache_folder, hashlib.sha1(text.encode()).hexdigest()[:24] + ".safetensors")

    def free_encoder(self):
        self._encoder = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.no_grad()
    def run_encoder(self, texts):
        """Preprocessed texts -> one dict of CPU tensors per text (e.g. {'embeds': (n_tokens, d)})."""
        if self._encoder is None:
            self.log(f"loading the text encoder from {self.weights} (prompt embeddings cached in {self.cache_folder})")
            self._encoder = self.load_encoder()
        return self._encoder(texts)

    def _read(self, path, text):
        from safetensors import safe_open
        try:
            with safe_open(path, framework="pt") as f:
                stored, row = (f.metadata() or {}).get("prompt"), {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise ValueError(f"cached prompt embedding {path!r} is unreadable ({e}); delete it to re-encode") from e
        if stored != text:
            raise ValueError(f"cache collision: {path!r} holds {stored!r}, not {text!r}; delete it to re-encode")
        return row

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
                for text, row in zip(chunk, self.run_encoder(chunk)):
                    save_safetensors(row, self._cache_path(text), {"prompt": text})
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
        """Prompts (str or list) -> the batched condition (make_cond) on `device`. Each preprocessed prompt's
        encoder output is cached on disk, so the encoder runs once per prompt."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("encode() needs at least one prompt")
        return self.make_cond([self._rows[t] for t in self.prepare(prompts)])

    def uncond(self, n):
        """The unconditional branch of CFG (make_uncond, made once) repeated n times."""
        if self._uncond is None:
            self._uncond = self.make_uncond()
        return tdm._take(self._uncond, torch.zeros(n, dtype=torch.long, device=self.device))

    def make_uncond(self):
        """The empty prompt's condition for one sample: the diffusers pipelines' negative prompt ""."""
        return self.encode([""])

    # ---------------------------------------------------------------- images

    @torch.no_grad()
    def decode(self, x0, batch=8):
        """Latents x0 (B, 4, h, w) -> images (B, 3, 8h, 8w) float32 in [0, 1]: VAE decode of x0 / scaling_factor."""
        self._need_folder("decoding")
        if self._vae is None:
            self._vae = load_vae(self.weights, dtype=self.vae_dtype, config=self.vae_config).to(self.device)
        out = []
        for z in (x0 / self.scaling_factor).split(batch):
            img = self._vae.decode(z.to(device=self.device, dtype=self.vae_dtype)).float()
            out.append((img / 2 + 0.5).clamp(0, 1))
        return torch.cat(out)


class PixArtTeacher(LatentTextToImageTeacher):
    """PixArt-α (eps-prediction with learned variance, T5 captions of 120 tokens) on a diffusers folder."""
    NAME, EXAMPLE = "pixart", "e.g. a download of PixArt-alpha/PixArt-XL-2-512x512"
    # train.py's defaults: the official TDM recipe (docs/method.md §11).
    DEFAULTS = dict(cfg=4.5, lr_fake=2e-5, lr_ratio=5.0, batch=32, iters=500, ema=0.0, save_every=500,
                    interval="separate", snr_clamp=5.0, device="auto", resolution=None)
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

    def load_network(self, weights, device, dtype):
        return load_pixart(weights, device=device, dtype=dtype)

    def load_encoder(self):
        tokenizer, encoder = load_t5(self.weights, dtype=self.encoder_dtype, max_length=self.MAX_LENGTH)
        encoder = encoder.to(self.device)

        def run(texts):                                                      # -> [{'embeds': (n_tokens_i, d)}]
            ids, mask = tokenizer(texts)                                     # (B, 120) each
            hidden = encoder(ids.to(self.device), mask.to(self.device))     # (B, 120, d)
            return [{"embeds": hidden[b, :int(mask[b].sum())].cpu()} for b in range(len(texts))]
        return run

    def make_cond(self, rows):
        """(prompt_embeds (B, 120, d) in `dtype`, attention_mask (B, 120) long): each prompt's valid T5 rows,
        zero-padded; the DiT masks the padding out."""
        embeds = torch.zeros(len(rows), self.MAX_LENGTH, rows[0]["embeds"].shape[1], dtype=self.dtype)
        mask = torch.zeros(len(rows), self.MAX_LENGTH, dtype=torch.long)
        for b, row in enumerate(rows):
            n = len(row["embeds"])
            embeds[b, :n], mask[b, :n] = row["embeds"].to(self.dtype), 1
        return embeds.to(self.device), mask.to(self.device)

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


def _folder_is_sdxl(folder):
    """Whether a diffusers folder's unet/config.json is SDXL's (addition_embed_type "text_time"); None without one."""
    path = os.path.join(folder, "unet", "config.json")
    return read_json(path).get("addition_embed_type") == "text_time" if os.path.isfile(path) else None


class StableDiffusionTeacher(LatentTextToImageTeacher):
    """The Stable Diffusion teachers' common part: the UNet (unet.py) on CLIP text (clip.py), eps-prediction on
    the scaled-linear schedule, from a diffusers folder or the original single-file checkpoint (.safetensors /
    .ckpt) community models are shared as; 77 CLIP tokens, no attention mask (padding tokens are context too)."""
    SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                    prediction_type="epsilon")
    PREDICTION = "epsilon"
    MAX_LENGTH = 77
    SDXL = False                       # which release: the UNet's micro-conditions tell them apart

    @classmethod
    def check_single_file(cls, path, config_folder=None):
        """The file's release (from its keys and shapes: unet.single_file_release; with a config folder, from its
        text-encoder keys) must be this teacher's; -> the VAE config (the folder's, or the release's)."""
        if config_folder:
            sdxl = any(k.startswith("conditioner.embedders.1.") for k in checkpoint_shapes(path))
            release = "sdxl" if sdxl else "sd15"
            if bool(_folder_is_sdxl(config_folder)) != sdxl:
                raise ValueError(f"{path!r} is an {release.upper()} checkpoint but --weights-config {config_folder!r} "
                                 f"describes the other release: pass the folder of a model like the file")
            cls.check_layout(config_folder)
        else:
            release = single_file_release(path)              # "sd15" or "sdxl"; anything else raises
        if release != cls.NAME:
            raise ValueError(f"{path!r} is an {release.upper()} checkpoint, not {cls.NAME.upper()}: use --teacher "
                             f"{release}")
        if config_folder:
            return VAEConfig.from_json(os.path.join(config_folder, "vae", "config.json"))
        return sdxl_vae_config() if cls.SDXL else sd_vae_config()

    @classmethod
    def check_layout(cls, folder):
        """As the base, and first: a folder of the other SD release is named as such."""
        sdxl = _folder_is_sdxl(folder)
        if sdxl is not None and sdxl != cls.SDXL:
            kind, other = ("an SDXL", "sdxl") if sdxl else ("an SD1.x", "sd15")
            raise ValueError(f"{folder!r} holds {kind} pipeline (unet/config.json addition_embed_type), not an "
                             f"{cls.NAME.upper()} one: use --teacher {other}")
        super().check_layout(folder)

    def load_network(self, weights, device, dtype):
        if self.weights_config:
            config = os.path.join(self.weights_config, "unet", "config.json")
        else:                                # a single file: check_single_file found the release already
            config = RELEASE_CONFIGS[self.NAME]() if os.path.isfile(weights) else None
        return load_unet(weights, config=config, device=device, dtype=dtype)

    def load_clip(self, which):
        """(tokenizer, encoder) `which` (1: CLIP-L, 2: bigG) from the folder, or the single file (with its
        describing folder's config and tokenizer when given)."""
        kw = {}
        if self.weights_config:
            sub = "" if which == 1 else "_2"
            kw = dict(config=os.path.join(self.weights_config, f"text_encoder{sub}", "config.json"),
                      tokenizer_path=os.path.join(self.weights_config, f"tokenizer{sub}"))
        return load_clip_text(self.weights, which=which, dtype=self.encoder_dtype, **kw)

    def call(self, net, x_t, t, cond, **kw):
        return net(x_t, t, cond, **kw)                       # the UNet casts to its own dtype, returns fp32 eps


class SD15Teacher(StableDiffusionTeacher):
    """Stable Diffusion 1.x (and its community fine-tunes): the CLIP ViT-L/14 last hidden state as context,
    CFG against the empty prompt's encoding."""
    NAME, EXAMPLE = "sd15", "e.g. a download of stable-diffusion-v1-5, or a single .safetensors of an SD1.5 model"
    # train.py's defaults: the paper's SD-v1.5 recipe (lr 2e-6 / 2e-5, CFG 3.5), except the batch: the paper's
    # 256 needs several GPUs; 32 is the single-GPU default (docs/sd.md: states computed, activations not measured).
    DEFAULTS = dict(cfg=3.5, lr_fake=2e-5, lr_ratio=10.0, batch=32, iters=3000, ema=0.0, save_every=500,
                    interval="separate", snr_clamp=5.0, device="auto", resolution=512)
    ENCODER_FOLDERS = ("text_encoder", "tokenizer")
    REQUIRED = {"unet/config.json": "the UNet config", "text_encoder/config.json": "the CLIP text encoder config",
                "tokenizer/vocab.json": "the CLIP vocabulary", "tokenizer/merges.txt": "the CLIP BPE merges",
                "vae/config.json": "the VAE config"}

    def load_encoder(self):
        tokenizer, encoder = self.load_clip(1)
        encoder = encoder.to(self.device)

        def run(texts):                                                       # -> [{'embeds': (77, 768)}]
            hidden = encoder(tokenizer(texts).to(self.device))["last_hidden_state"]      # (B, 77, 768)
            return [{"embeds": h.cpu()} for h in hidden]
        return run

    def make_cond(self, rows):
        """(B, 77, 768) text context in `dtype`."""
        return torch.stack([r["embeds"] for r in rows]).to(self.device, self.dtype)


class SDXLTeacher(StableDiffusionTeacher):
    """SDXL base: the penultimate hidden states of CLIP ViT-L/14 and OpenCLIP bigG/14 concatenated as context
    (B, 77, 2048), bigG's projected pooled vector (B, 1280), and the micro-conditions (original size, crop (0, 0),
    target size) = the sampled resolution. CFG against zeros for both, as diffusers does for SDXL base
    (force_zeros_for_empty_prompt)."""
    NAME, EXAMPLE = "sdxl", "e.g. a download of stable-diffusion-xl-base-1.0, or a single .safetensors of an SDXL model"
    # train.py's defaults: the paper's SDXL recipe (lr 1e-6 / 5e-6, CFG 8; stage 1 at 512 px, then resume at
    # --resolution 1024), except the batch: the paper's 64 needs several GPUs; 8 is the single-GPU default, with
    # --lora (a full SDXL fine-tune holds 86 GiB of weight states: more than one GPU; docs/sd.md).
    DEFAULTS = dict(cfg=8.0, lr_fake=5e-6, lr_ratio=5.0, batch=8, iters=1000, ema=0.0, save_every=250,
                    interval="separate", snr_clamp=5.0, device="auto", resolution=512)
    SDXL = True
    zero_uncond = True                 # diffusers' force_zeros_for_empty_prompt; a folder's model_index.json may say no
    ENCODER_FOLDERS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    REQUIRED = {**SD15Teacher.REQUIRED, "text_encoder_2/config.json": "the OpenCLIP bigG text encoder config",
                "tokenizer_2/vocab.json": "the second CLIP vocabulary", "tokenizer_2/merges.txt": "its BPE merges"}

    def load_network(self, weights, device, dtype):
        index = os.path.join(self.weights_config or weights, "model_index.json")
        self.zero_uncond = read_json(index).get("force_zeros_for_empty_prompt", True) if os.path.isfile(index) \
            else True
        return super().load_network(weights, device, dtype)

    def load_encoder(self):
        (tok1, enc1), (tok2, enc2) = self.load_clip(1), self.load_clip(2)
        enc1, enc2 = enc1.to(self.device), enc2.to(self.device)

        def run(texts):                                            # -> [{'embeds': (77, 2048), 'pooled': (1280,)}]
            h1 = enc1(tok1(texts).to(self.device))["penultimate_hidden_state"]           # (B, 77, 768)
            out2 = enc2(tok2(texts).to(self.device))
            context = torch.cat([h1, out2["penultimate_hidden_state"]], -1)             # (B, 77, 2048)
            return [{"embeds": c.cpu(), "pooled": p.cpu()} for c, p in zip(context, out2["text_embeds"])]
        return run

    def make_cond(self, rows):
        """(context (B, 77, 2048), pooled (B, 1280)) in `dtype`."""
        return tuple(torch.stack([r[k] for r in rows]).to(self.device, self.dtype) for k in ("embeds", "pooled"))

    def make_uncond(self):
        """Zeros of the condition's shapes (no encoder call), unless the folder's model_index.json sets
        force_zeros_for_empty_prompt false: then the empty prompt's encoding."""
        if not self.zero_uncond:
            return super().make_uncond()
        c = self.network.config
        return (torch.zeros(1, self.MAX_LENGTH, c.cross_attention_dim, dtype=self.dtype, device=self.device),
                torch.zeros(1, c.pooled_text_dim, dtype=self.dtype, device=self.device))

    def call(self, net, x_t, t, cond, **kw):
        """The UNet with SDXL's added conditions: the pooled text and time_ids [h, w, 0, 0, h, w] in pixels."""
        context, pooled = cond
        B, _, H, W = x_t.shape
        h, w = H * self.vae_factor, W * self.vae_factor
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=x_t.device).expand(B, 6)
        return net(x_t, t, context, {"text_embeds": pooled, "time_ids": time_ids}, **kw)


#################################################################################
#                          The teachers                                         #
#################################################################################

TEACHERS = {"toy": ToyTeacher, "toy-exact": ExactToyTeacher, "pixart": PixArtTeacher, "sd15": SD15Teacher,
            "sdxl": SDXLTeacher}


def load_teacher(name, weights=None, target="ring", device=None, log=print, **kw):
    """A teacher by name: 'toy' (MLP fitted to the target), 'toy-exact' (closed-form GMM denoiser), 'pixart'
    (a diffusers folder given as `weights`), 'sd15' / 'sdxl' (a diffusers folder or a single checkpoint file).
    Keyword arguments go to the teacher's constructor."""
    if name not in TEACHERS:
        raise ValueError(f"unknown teacher {name!r}; available: {', '.join(repr(k) for k in TEACHERS)}")
    return TEACHERS[name].load(weights=weights, target=target, device=device, log=log, **kw)
