"""TDM training: build teacher, student and fake score, then call tdm.tdm_step once per iteration.

    python train.py                                  # toy: 8-mode ring, 4-step student, ~2.5 minutes on 2 CPU cores
    python train.py --toy-target grid --unify 1,2,4  # one student for 1, 2 and 4 steps
    python train.py --resume runs/toy-ring --iters 4000   # continue a run exactly
    python train.py --teacher pixart --weights PixArt-XL-2-512x512 --lora 64   # the real thing (GPU)
    python train.py --teacher sd15 --weights v1-5-pruned-emaonly.safetensors --lora 64   # SD1.5, a single file
    python train.py --teacher sdxl --weights stable-diffusion-xl-base-1.0 --lora 64      # SDXL, 512 px first
    torchrun --standalone --nproc_per_node 2 train.py --teacher pixart --weights ...   # data parallel (DDP), 2 GPUs
    torchrun --standalone --nproc_per_node 8 train.py --teacher sdxl --weights ... --parallel fsdp   # sharded (FSDP2)

Writes runs/<name>/: student.safetensors + student.json (the student to sample; the EMA when on),
ckpt.safetensors + ckpt.json (everything needed to resume), and for the toy metrics.jsonl (the
metric curve), metrics.json, figure.png, curve.png; for image teachers previews/<iteration>.png.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
from tqdm import tqdm

import eval as ev
import export
import parallel
import sample
import tdm
from models import read_state_dict, save_safetensors, trainable_lora_views, unify_keys_from_flat
from teachers import TEACHERS, copy_network, load_teacher, read_prompts

DEFAULT_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts.txt")


#################################################################################
#                          Arguments                                            #
#################################################################################

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)', except for flags whose default depends on the teacher (None until parse_args)."""
    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _per_teacher(key):
    """'toy 512; pixart 32; ...': a flag's default for each teacher, for --help."""
    values = {name: cls.DEFAULTS[key] for name, cls in TEACHERS.items() if name != "toy-exact" and key in cls.DEFAULTS}
    return "; ".join(f"{name} {v if v is not None else 'native'}" for name, v in values.items())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Distil a diffusion teacher into a K-step student with TDM.",
                                formatter_class=_HelpFormatter, allow_abbrev=False)
    p.error = lambda msg: p.exit(2, f"{p.prog}: error: {msg} (--help lists the flags)\n")   # one line, no usage
    g = p.add_argument_group("teacher and run")
    g.add_argument("--teacher", default="toy", choices=list(TEACHERS),
                   help="toy (MLP fitted to the target) | toy-exact (closed-form GMM) | pixart (--weights DIR) | "
                   "sd15, sdxl (--weights DIR or single .safetensors / .ckpt file)")
    g.add_argument("--toy-target", default=None, help="toy teachers: ring (default) | grid | FILE.json (means, "
                   "covs|stds, weights, classes)")
    g.add_argument("--weights", default=None, help="image teachers: the diffusers model folder (transformer/ or "
                   "unet/, ...); sd15 and sdxl also take the model's single checkpoint file")
    g.add_argument("--weights-config", default=None, help="sd15, sdxl with a single-file --weights: a diffusers "
                   "folder whose config.json files and tokenizers describe it (default: the release's configs, "
                   "detected from the file, and the bundled CLIP tokenizer)")
    g.add_argument("--resolution", type=int, default=None, help="image teachers: training resolution in pixels "
                   f"({_per_teacher('resolution')}); may change on --resume (SDXL: 512, then 1024)")
    g.add_argument("--prompts", default=DEFAULT_PROMPTS, help="image teachers: training prompts, one per line")
    g.add_argument("--name", default=None, help="run folder name under --out (default: toy-<target>, or the "
                   "teacher's name)")
    g.add_argument("--out", default="runs", help="folder holding the run folders")
    g.add_argument("--seed", type=int, default=0, help="random seed of the run (x_T, labels or prompts, tau, noise)")
    g.add_argument("--iters", type=int, default=None,
                   help=f"total iterations, also when resuming ({_per_teacher('iters')})")
    g.add_argument("--resume", default=None, help="a run folder to continue from its ckpt.safetensors")
    g.add_argument("--device", default=None, help="cpu | cuda | auto (cuda when available). Default: image teachers "
                   "auto, the toy cpu (cuda pays off at large --batch, e.g. 16384)")
    g = p.add_argument_group("TDM (docs/method.md; defaults = official code unless noted)")
    g.add_argument("--steps", type=int, default=4, help="student steps K")
    g.add_argument("--unify", default="", help="TDM-unify: step counts to support, e.g. 1,2,4 (K drawn per batch)")
    g.add_argument("--t-max", type=int, default=899, help="first grid time: 899 official, 999 = paper's uniform grid")
    g.add_argument("--cfg", type=float, default=None, help=f"guidance of the teacher score ({_per_teacher('cfg')})")
    g.add_argument("--interval", default=None, choices=["separate", "shared"],
                   help="diffusing interval of tau: the step's own [t_m, t_g - margin) (official) or [t_m, t_max + 1 - "
                        "margin) shared by all steps (toy shared; pixart separate)")
    g.add_argument("--randmid", action="store_true", help="random landing time (official --use_randmid)")
    g.add_argument("--importance", default="tempered", choices=["tempered", "exact", "off"],
                   help="fake-loss importance weight: official per-dimension tempered ratio, the exact density "
                        "ratio (toy: low dimension only), or none")
    g.add_argument("--loss", default="huber", choices=["huber", "huber-sample", "mse"],
                   help="generator loss: official element-wise pseudo-Huber, the paper's per-sample one, or MSE")
    g.add_argument("--huber-c", type=float, default=1e-3, help="element-wise pseudo-Huber constant (official)")
    g.add_argument("--no-normalise", action="store_true", help="drop the DMD normaliser 1/mean|x0_hat - r_cfg|")
    g.add_argument("--tau-min", type=int, default=20, help="smallest tau drawn (official 20)")
    g.add_argument("--margin", type=int, default=10, help="tau stays this far below t_g (or T) (official 10)")
    g.add_argument("--snr-clamp", type=float, default=None,
                   help="fake-loss weight min(SNR, this): 5 official (pixart); "
                   "toy 1000 = no cap in the sampled tau range (plain eps-MSE)")
    g.add_argument("--fake-updates", type=int, default=1, help="fake-score updates per generator update")
    g.add_argument("--fake-reg", type=float, default=0.0, help="weight of (fake - teacher)^2 in the fake loss "
                   "(authors' follow-up 0.02; official 0)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch", type=int, default=None, help=f"global batch ({_per_teacher('batch')})")
    g.add_argument("--lr-fake", type=float, default=None, help=f"fake-score lr ({_per_teacher('lr_fake')})")
    g.add_argument("--lr-ratio", type=float, default=None, help="generator lr = lr-fake / this "
                   f"({_per_teacher('lr_ratio')}; official PixArt code 5)")
    g.add_argument("--beta1", type=float, default=0.0, help="Adam beta1 of both optimisers (official and paper 0)")
    g.add_argument("--beta2", type=float, default=0.95, help="official 0.95, paper 0.999")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (official)")
    g.add_argument("--warmup", type=int, default=50, help="generator lr warm-up iterations")
    g.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"],
                   help="generator lr after warm-up")
    g.add_argument("--grad-clip", type=float, default=1.0, help="student grad-norm clip (fake: none, as official)")
    g.add_argument("--ema", type=float, default=None, help="student EMA decay, 0 = off (toy 0.995; pixart off, as "
                   "official); the EMA is what is saved and evaluated")
    g.add_argument("--lora", type=int, default=0, help="image teachers: LoRA rank for student and fake on one shared "
                   "frozen base (0 = full fine-tune of two copies)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="image teachers: auto = bf16 autocast on GPU; fp16 = fp16 autocast with a gradient scaler, "
                   "as the official code (x0 8x closer to fp32 than bf16, docs/method.md §12); the toy runs in fp32")
    g.add_argument("--grad-checkpointing", default="auto", choices=["auto", "on", "off"],
                   help="image teachers: auto = on for GPU")
    g = p.add_argument_group("data parallel (under torchrun; docs/method.md §14)")
    g.add_argument("--parallel", default=None, choices=parallel.MODES,
                   help="ddp (default): DistributedDataParallel; fsdp: FSDP2, weights, gradients and AdamW states "
                   "sharded over the GPUs (full fine-tunes too big for one); hooks: per-parameter all-reduce "
                   "(the baseline of benchmark.py --parallel). A resumed run keeps its own unless given")
    g.add_argument("--fsdp-teacher", default=None, choices=["shard", "replicate"],
                   help="--parallel fsdp: the frozen teacher sharded too (default; least memory) or whole on every "
                   "GPU (no gathers in its forwards)")
    g = p.add_argument_group("logging")
    g.add_argument("--eval-every", type=int, default=200, help="toy: iterations between metric-curve points (0 = off)")
    g.add_argument("--eval-n", type=int, default=20000, help="toy: samples per curve point")
    g.add_argument("--final-eval-n", type=int, default=50000, help="toy: samples for the final metrics (0 = skip)")
    g.add_argument("--figure-n", type=int, default=20000, help="toy: points per panel of figure.png (0 = no figure)")
    g.add_argument("--preview-every", type=int, default=50, help="image teachers: iterations between previews")
    g.add_argument("--save-every", type=int, default=None, help=f"checkpoint interval ({_per_teacher('save_every')})")
    args = p.parse_args(argv)
    check_args(p, args)
    for k, v in TEACHERS[args.teacher].DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.snr_clamp <= 0:
        p.error("--snr-clamp must be positive: the fake loss is weighted by min(SNR, this)")
    return args


def check_args(p, args):
    """One `error:` line, naming the fix, for every flag value that cannot run (argparse exits with status 2)."""
    points = TEACHERS[args.teacher].OUTPUT == "points"
    for name in ("batch", "save_every", "iters"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 1 <= args.t_max <= 999:
        p.error(f"--t-max {args.t_max}: the first grid time must be a training timestep in 1..999 (official 899)")
    if not 1 <= args.steps <= args.t_max + 1:
        p.error(f"--steps {args.steps}: the student needs 1 to {args.t_max + 1} steps below --t-max {args.t_max}")
    try:
        args.unify_steps = sample.parse_step_counts(args.unify, "--unify", args.t_max)
    except ValueError as e:
        p.error(str(e))
    if args.figure_n < 0 or args.eval_n < 1 and args.eval_every or args.final_eval_n < 0:
        p.error("--figure-n and --final-eval-n must be 0 (off) or more; --eval-n at least 1 while --eval-every is on")
    if args.fake_reg < 0:
        p.error("--fake-reg must be 0 (off) or more: it weights a squared distance to the teacher")
    if args.fake_updates < 1:
        p.error("--fake-updates must be at least 1 (the fake score must follow the student)")
    if (args.lr_ratio is not None and args.lr_ratio <= 0) or (args.lr_fake is not None and args.lr_fake <= 0):
        p.error("--lr-fake and --lr-ratio must be positive")
    if args.importance == "exact" and not points:
        p.error("--importance exact is for the toy: at image sizes the true density ratio under- or overflows "
                "(d = 16384 dimensions); use tempered (official) or off")
    if args.unify and args.lora:
        p.error("--unify needs a full fine-tune: the step-count embedding belongs to the student and the fake, "
                "not to a shared LoRA base; drop --lora (or --unify)")
    if points and (args.lora or args.weights or (args.weights_config or args.resolution) and not args.resume
                   or args.precision in ("bf16", "fp16") or args.grad_checkpointing == "on"):
        p.error("--lora, --weights, --resolution, --precision bf16|fp16 and --grad-checkpointing on are for image "
                "teachers (e.g. --teacher pixart); the toy MLP runs in full, in fp32")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        p.error(f"--resolution {args.resolution}: pass a multiple of 8 pixels (the VAE's factor), e.g. 512 or 1024")
    if conflict := parallel_conflict(args):
        p.error(conflict)
    if not points and args.toy_target:
        p.error(f"--toy-target is for the toy teachers, not --teacher {args.teacher}")
    args.toy_target = args.toy_target or ("ring" if points else None)


def parallel_conflict(args):
    """The one-line reason the run's settings cannot run under --parallel, or None (checked again on --resume)."""
    if args.parallel == "fsdp" and args.lora:
        return ("--parallel fsdp shards full fine-tunes; a --lora run trains small adapters on one shared base: "
                "use --parallel ddp (the default)")
    if args.parallel == "fsdp" and args.unify:
        return ("--unify with --parallel fsdp: each rank draws its own K, so the ranks would run different numbers "
                "of sharded forwards; use --parallel ddp")
    if args.parallel == "fsdp" and args.precision == "fp16":
        return ("--precision fp16 with --parallel fsdp: the gradient scaler would see only each rank's shard of the "
                "gradients and skip steps on some ranks only; use --precision bf16 (the GPU default)")
    if args.fsdp_teacher and args.parallel != "fsdp":
        return "--fsdp-teacher is for --parallel fsdp"
    return None


def resume_settings(args, argv):
    """The run's own saved settings, except these when given again on this command line; and its checkpoint."""
    state, old = load_checkpoint(args.resume)
    keep = {"iters", "resume", "eval_every", "eval_n", "final_eval_n", "figure_n", "save_every", "preview_every",
            "device", "resolution", "parallel", "fsdp_teacher"}
    given = {a[2:].split("=")[0].replace("-", "_") for a in (sys.argv[1:] if argv is None else argv)
             if a.startswith("--")}
    saved = dict(old["args"])
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:       # one process: the run's data-parallel engine does not apply
        for k in ("parallel", "fsdp_teacher"):
            saved.pop(k, None)
    if "no_importance" in saved:                # written before --importance replaced --no-importance
        saved["importance"] = "off" if saved.pop("no_importance") else "tempered"
    if "shared_interval" in saved:              # written before --interval replaced --shared-interval
        saved["interval"] = "shared" if saved.pop("shared_interval") else "separate"
    if TEACHERS[saved.get("teacher", "toy")].OUTPUT != "points":
        saved["toy_target"] = None              # written when --toy-target defaulted to ring for every teacher
    defaults = vars(parse_args(["--teacher", saved.get("teacher", "toy")]))   # flags added since the run
    if given - keep:
        raise ValueError(f"--resume continues a run with its own settings; these cannot change on resume: "
                         f"{', '.join('--' + k.replace('_', '-') for k in sorted(given - keep))} (allowed: "
                         f"{', '.join('--' + k.replace('_', '-') for k in sorted(keep - {'resume'}))})")
    args = argparse.Namespace(**{**defaults, **saved, **{k: v for k, v in vars(args).items() if k in keep & given}})
    if TEACHERS[args.teacher].OUTPUT == "points" and args.resolution:
        raise ValueError(f"--resolution is for image teachers; {args.resume!r} is a --teacher {args.teacher} run")
    args.unify_steps = sample.parse_step_counts(args.unify, "--unify", args.t_max)
    if conflict := parallel_conflict(args):
        raise ValueError(f"--resume {args.resume}: {conflict}")
    args.out, args.name = os.path.split(os.path.normpath(args.resume))
    return args, state


#################################################################################
#                          Checkpoints                                          #
#################################################################################

def _flatten(prefix, obj, tensors):
    """Nested dict/list with tensor leaves -> JSON-able structure; tensors go to `tensors` under dotted keys."""
    if torch.is_tensor(obj):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {str(k): _flatten(f"{prefix}.{k}", v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_flatten(f"{prefix}.{i}", v, tensors) for i, v in enumerate(obj)]
    return obj


def _unflatten(obj, tensors):
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict):   # optimizer state is keyed by int parameter index
        return {int(k) if k.isdigit() else k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def _write_json(obj, path):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def save_checkpoint(run_dir, state, meta):
    """ckpt.safetensors (+ ckpt.json) for resuming; student.safetensors (+ student.json) for sampling.

    ckpt.safetensors carries its own ckpt.json in its metadata and is replaced in one rename, so a process killed
    at any moment leaves a whole checkpoint, old or new, that resume reads consistently (ckpt.json beside it is for
    people and may lag one write behind)."""
    tensors = {}
    sidecar = {**meta, "structure": {k: _flatten(k, v, tensors) for k, v in state.items()}}
    save_safetensors(tensors, os.path.join(run_dir, "ckpt.safetensors"), {"tdm_checkpoint": json.dumps(sidecar)})
    _write_json(sidecar, os.path.join(run_dir, "ckpt.json"))
    save_safetensors(state["ema" if "ema" in state else "student"], os.path.join(run_dir, "student.safetensors"))
    _write_json(meta, os.path.join(run_dir, "student.json"))


def load_checkpoint(run_dir):
    """(state, meta) of a run's checkpoint: the sidecar embedded in ckpt.safetensors, or ckpt.json for runs
    written before it was embedded."""
    path, tensors_path = os.path.join(run_dir, "ckpt.json"), os.path.join(run_dir, "ckpt.safetensors")
    if not os.path.exists(path) and not os.path.exists(tensors_path):
        raise FileNotFoundError(f"--resume {run_dir!r}: no ckpt.json there; pass a run folder written by train.py")
    tensors = read_state_dict(tensors_path)
    from safetensors import safe_open
    with safe_open(tensors_path, framework="pt") as f:
        embedded = (f.metadata() or {}).get("tdm_checkpoint")
    if embedded:
        meta = json.loads(embedded)
    else:
        with open(path) as f:
            meta = json.load(f)
    state = {k: _unflatten(v, tensors) for k, v in meta.pop("structure").items()}
    for k in ("student", "fake", "ema"):       # TDM-unify runs written with the step embedding inside the network
        if k in state:
            state[k] = unify_keys_from_flat(state[k])
    return state, meta


#################################################################################
#                          Teacher, student, fake score and EMA                 #
#################################################################################

def pick_device(args):
    """--device, or the teacher's default ('auto' = cuda when available); cuda without a GPU raises."""
    name = args.device or TEACHERS[args.teacher].DEFAULTS["device"]
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA GPU is visible to torch here; pass --device cpu "
                         "(also to resume a run trained on a GPU)")
    return device


def half_precision(args, device):
    """The autocast dtype of the image teachers' network calls: bf16 (--precision bf16, or auto on a GPU), fp16
    (--precision fp16, with a gradient scaler) or None (fp32)."""
    if args.precision == "fp16":
        return torch.float16
    return torch.bfloat16 if args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda") else None


def build_teacher(args, device, log):
    """The teacher, on `device`. Image teachers: weights in fp32, except a --lora base (shared, frozen) in the
    half precision; every network call under autocast in that precision (bf16 autocast only on a GPU); the
    training prompts encoded once (and cached)."""
    if TEACHERS[args.teacher].OUTPUT == "points":
        return load_teacher(args.teacher, target=args.toy_target, device=device, log=log)
    half = half_precision(args, device)
    teacher = load_teacher(args.teacher, args.weights, device=device, log=log, resolution=args.resolution,
                           weights_config=args.weights_config, dtype=half if half and args.lora else torch.float32,
                           autocast=half if half == torch.float16 or device.type == "cuda" else None)
    teacher.use_prompts(read_prompts(args.prompts))
    if args.grad_checkpointing == "on" or (args.grad_checkpointing == "auto" and device.type == "cuda"):
        teacher.network.gradient_checkpointing = True   # student and fake copies inherit it
    return teacher


def build_student_and_fake(teacher, args):
    """Student and fake start as the teacher network (docs/method.md §5): two trainable copies, or two LoRA
    adapters on the teacher's own frozen base (`--lora`). Under TDM-unify both get a zero-initialised step
    embedding (models.StepCountEmbedding), so at iteration 0 student = fake = teacher either way."""
    if args.lora:
        return trainable_lora_views(teacher.network, args.lora, args.lora_alpha)
    return copy_network(teacher.network, args.unify_steps), copy_network(teacher.network, args.unify_steps)


def build_optimisers(student, fake, args):
    """AdamW for both, as the official code: the generator at lr_fake / lr_ratio, betas (0, 0.95), decay 0.01."""
    betas = (args.beta1, args.beta2)
    return (torch.optim.AdamW(student.parameters(), lr=args.lr_fake / args.lr_ratio, betas=betas,
                              weight_decay=args.weight_decay),
            torch.optim.AdamW(fake.parameters(), lr=args.lr_fake, betas=betas, weight_decay=args.weight_decay))


def tdm_config(args):
    return tdm.TDMConfig(K=args.steps, t_max=args.t_max, unify=args.unify_steps, cfg=args.cfg,
                         separate=args.interval == "separate", randmid=args.randmid, importance=args.importance,
                         loss=args.loss, huber_c=args.huber_c, normalise=not args.no_normalise, tau_min=args.tau_min,
                         margin=args.margin, snr_clamp=args.snr_clamp, fake_updates=args.fake_updates,
                         fake_reg=args.fake_reg, grad_clip=args.grad_clip, lockstep=args.parallel == "fsdp")


def generator_lr(args, i):
    """Generator lr at iteration i: linear warm-up, then constant or cosine (official: cosine, 50 warm-up steps)."""
    warm = min(1.0, (i + 1) / max(1, args.warmup))
    if args.lr_schedule == "cosine":
        warm *= 0.5 * (1 + math.cos(math.pi * min(1.0, i / max(1, args.iters))))
    return args.lr_fake / args.lr_ratio * warm


@contextlib.contextmanager
def weights_swapped(module, state):
    """Run with `state` (e.g. the EMA) loaded into `module`, then put its own weights back."""
    if state is None:
        yield module
        return
    own = {k: v.clone() for k, v in module.state_dict().items()}
    module.load_state_dict(state)
    try:
        yield module
    finally:
        module.load_state_dict(own)


#################################################################################
#                          Training                                             #
#################################################################################

def main(argv=None):
    args = parse_args(argv)
    args, resume_state = resume_settings(args, argv) if args.resume else (args, None)
    rank, world, device = parallel.init_distributed(pick_device(args))
    if world == 1 and args.parallel:
        raise ValueError(f"--parallel {args.parallel} is for runs under torchrun with 2 or more processes, e.g. "
                         "torchrun --standalone --nproc_per_node 8 train.py ...")
    if args.batch % world:
        raise ValueError(f"--batch {args.batch} is the global batch: it must divide by the {world} processes")
    batch, main_proc = args.batch // world, rank == 0         # only rank 0 logs and writes
    progress = Progress(args.iters, main_proc)
    torch.manual_seed(args.seed)

    with parallel.rank0_first(rank, world):
        teacher = build_teacher(args, device, progress.log)
    run_dir = os.path.join(args.out or ".", args.name or teacher.run_name)
    if main_proc:
        os.makedirs(run_dir, exist_ok=True)
    student, fake = build_student_and_fake(teacher, args)
    # DDP wrappers (or the networks, sharded in place) for training; the networks themselves to save and sample.
    # FSDP: until here every GPU held the three networks whole (docs/method.md §14)
    train_nets = parallel.parallelise(student, fake, teacher, args.parallel or "ddp", world, rank, args.seed,
                                      shard_teacher=args.fsdp_teacher != "replicate")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)          # the peak reported at the end: training, not set-up
    sharded = parallel.is_sharded(student)       # FSDP: evaluations and previews need every rank's forward
    opt_student, opt_fake = build_optimisers(student, fake, args)
    scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None   # fp16: scaled losses
    config = tdm_config(args)
    start, ema = restore(resume_state, student, fake, opt_student, opt_fake, scaler, args, device, rank, world,
                         sharded, progress.log)
    watch = (ToyWatch if teacher.OUTPUT == "points" else ImagePreviews)(teacher, student, ema, args, run_dir, start,
                                                                        main_proc) if main_proc or sharded else None

    as_x0 = tuple(sample.student_x0(teacher, net) for net in train_nets)   # tdm.py's denoisers
    t0, step_time = progress.begin(start), 0.0  # step_time: the TDM steps alone (no evaluations, checkpoints)
    saved = start                                # the iteration of the checkpoint on disk (0: none yet)
    for it in range(start, args.iters):
        for group in opt_student.param_groups:
            group["lr"] = generator_lr(args, it)
        cond, uncond = teacher.training_conditions(batch)
        t_step = time.time()
        logs = tdm.tdm_step(*as_x0, teacher, cond, uncond, opt_student, opt_fake, config, scaler=scaler)
        done = it + 1
        stop_if_not_finite(logs, scaler, done, saved, run_dir, world)
        update_ema(ema, student, args.ema)
        step_time += time.time() - t_step       # tdm_step's .item() calls have synchronised the GPU already
        progress.update(done, logs)
        if watch:
            watch.after(done, progress.log)
        if done % args.save_every == 0 or done == args.iters:
            checkpoint(run_dir, done, student, fake, opt_student, opt_fake, scaler, ema, teacher, args, config,
                       device, world)
            saved = done
    progress.close()
    train_time = time.time() - t0

    if watch:
        watch.finish(train_time)
    if dist.is_initialized():
        dist.barrier()                           # leave together: rank 0 may still be writing the last checkpoint
        dist.destroy_process_group()
    if main_proc:
        peak = f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" \
            if device.type == "cuda" else ""
        print(f"wrote {run_dir}/; training took {train_time:.0f} s: {step_time / max(1, args.iters - start):.3f} "
              f"s/iter in TDM steps, {train_time - step_time:.0f} s in evaluations, previews and checkpoints{peak}"
              + (f" ({world} processes, {batch} samples each, {args.parallel or 'ddp'})" if world > 1 else ""))
    return run_dir


def update_ema(ema, student, decay):
    """ema <- decay * ema + (1 - decay) * student, tensor by tensor (no-op when the EMA is off)."""
    if ema is not None:
        with torch.no_grad():
            for k, v in student.state_dict().items():
                ema[k].lerp_(v.to(ema[k].dtype), 1 - decay)


def stop_if_not_finite(logs, scaler, done, saved, run_dir, world):
    """Stop the run, without saving, when an iteration's loss (or, without a gradient scaler, the student's gradient
    norm) is NaN or infinite on any rank: the weights it updated are lost, the checkpoint on disk is the last good
    one. (With --precision fp16 an infinite gradient is the scaler's business: it skips that step.)"""
    keys = ["loss_gen", "loss_fake"] + (["grad_norm"] if scaler is None else [])
    bad = {k: logs[k] for k in keys if k in logs and not math.isfinite(logs[k])}
    flag = torch.tensor(float(bool(bad)))
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)         # every rank stops together
    if flag.item():
        what = ", ".join(f"{k} = {v}" for k, v in bad.items()) or "a non-finite loss on another process"
        last = (f"the last good checkpoint is iteration {saved} in {run_dir!r} (continue with --resume {run_dir})"
                if saved else "no checkpoint was written yet")
        raise FloatingPointError(f"iteration {done}: {what}; the run stopped without saving: {last}. Lower --lr-fake "
                                 "or use --precision fp32")


def checkpoint(run_dir, done, student, fake, opt_student, opt_fake, scaler, ema, teacher, args, config, device,
               world):
    """Every rank: check the weights agree (or gather the shards) and the RNG streams; rank 0 writes ckpt.* and
    student.*. The files hold whole tensors in every mode, so a run resumes under any number of processes."""
    parallel.check_in_sync(student, world)
    parallel.check_in_sync(fake, world)
    rank_rng = parallel.rng_states(device, world)
    main_proc = not dist.is_initialized() or dist.get_rank() == 0
    state = dict(student=student.state_dict(), fake=fake.state_dict(), opt_student=opt_student.state_dict(),
                 opt_fake=opt_fake.state_dict(), **({"ema": ema} if ema is not None else {}))
    state = parallel.full_state(state, keep=main_proc)         # FSDP: shards -> whole tensors on rank 0
    if main_proc:
        state.update(iteration=torch.tensor(done), rank_rng=rank_rng,
                     **({"scaler": scaler.state_dict()} if scaler else {}))
        meta = run_meta(teacher, args, config, done)
        save_checkpoint(run_dir, state, meta)
        if teacher.OUTPUT == "images":                 # the student for diffusers / ComfyUI, next to it
            base = export.base_state(teacher.network) if args.lora and args.teacher == "pixart" else None
            export.export_run(run_dir, state=state.get("ema", state["student"]), meta=meta, base=base)


def restore(state, student, fake, opt_student, opt_fake, scaler, args, device, rank, world, sharded, log):
    """-> (first iteration, EMA state or None). Loads a resumed run's networks, optimisers, gradient scaler, EMA
    and RNG streams (whole tensors, split here when the networks are sharded). A fresh run with --ema starts the
    EMA at the student's weights. Rank 0 alone keeps, saves and samples the EMA; under FSDP each rank keeps the
    EMA of its own shards."""
    start, ema, keeper = 0, None, rank == 0 or sharded
    if state is not None:
        parallel.load_state(student, state["student"])
        parallel.load_state(fake, state["fake"])
        parallel.load_optimizer_state(opt_student, state["opt_student"])
        parallel.load_optimizer_state(opt_fake, state["opt_fake"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        if keeper and "ema" in state:
            own = student.state_dict()
            # a shard is cut on the CPU and arrives on the device; a whole tensor (rank 0, ddp) moves there
            ema = {k: parallel.sharded_like(v, own[k]).to(device) for k, v in state["ema"].items()}
        start = int(state["iteration"])
        parallel.set_rng_states(state, device, rank, world, args.seed, start, log)
    if ema is None and args.ema > 0 and keeper:
        ema = {k: v.detach().clone() for k, v in student.state_dict().items()}
    return start, ema


def run_meta(teacher, args, config, iteration):
    """student.json / ckpt.json: what sample.load_run needs to rebuild the student, and the run's settings."""
    return dict(teacher=args.teacher, **teacher.run_meta(), lora=args.lora, lora_alpha=args.lora_alpha or args.lora,
                t_max=args.t_max, K=args.steps, unify=list(args.unify_steps),
                grid=tdm.time_grid(args.steps, args.t_max), cfg=args.cfg, iteration=iteration,
                args={k: v for k, v in vars(args).items() if k != "unify_steps"}, tdm=asdict(config))


class Progress:
    """On a terminal, a tqdm bar with the losses; otherwise (a log file, CI) a plain line at every tenth of the
    run, so logs do not fill with redraws. `log` writes a line either way (rank 0 only)."""
    def __init__(self, total, main_proc):
        self.total, self.main_proc = total, main_proc
        self.bar = tqdm(total=total, desc="TDM", dynamic_ncols=True) if main_proc and sys.stderr.isatty() else None
        self.every, self.t0 = max(1, total // 10), time.time()

    def begin(self, start):
        """The loop starts at iteration `start`; -> the start time."""
        self.t0 = time.time()
        if self.bar is not None:
            self.bar.n = start
        return self.t0

    def log(self, *msg):
        line = " ".join(str(m) for m in msg)
        if self.bar is not None:
            self.bar.write(line)
        elif self.main_proc:
            print(line, flush=True)

    def update(self, done, logs):
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix(fake=f"{logs['loss_fake']:.4f}", gen=f"{logs['loss_gen']:.4f}", K=logs["K"])
        elif self.main_proc and (done % self.every == 0 or done == self.total):
            print(f"TDM {done}/{self.total} ({time.time() - self.t0:.0f} s): loss_fake {logs['loss_fake']:.4f}, "
                  f"loss_gen {logs['loss_gen']:.4f}, K {logs['K']}", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


#################################################################################
#                          What a run reports                                   #
#################################################################################

class ToyWatch:
    """Toy runs: a metric curve (metrics.jsonl) every --eval-every iterations; at the end the final metric table
    (metrics.json), figure.png and curve.png. Under FSDP every rank runs it (the sharded student needs them all in
    its forwards) and rank 0 (`main`) writes."""
    def __init__(self, teacher, student, ema, args, run_dir, start, main=True):
        self.teacher, self.student, self.ema, self.args, self.run_dir = teacher, student, ema, args, run_dir
        self.main, self.path = main, os.path.join(run_dir, "metrics.jsonl")
        K_list = args.unify_steps or (args.steps,)
        self.point = ev.curve_logger(teacher, student, K_list, args.cfg, args.t_max, bool(args.unify_steps),
                                     self.path if main else None, n=args.eval_n) if args.eval_every else None
        if start == 0 and main:
            open(self.path, "w").close()
        if start == 0:
            self.after(0, print)

    def after(self, done, log):
        if self.point and done % self.args.eval_every == 0:
            with weights_swapped(self.student, self.ema):
                row = self.point(done)
            if done and self.main:
                log(f"iter {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "iteration"))

    def finish(self, train_time):
        a, unify = self.args, bool(self.args.unify_steps)
        with weights_swapped(self.student, self.ema) as net:
            if a.final_eval_n:
                rows = ev.evaluate(self.teacher, net, n=a.final_eval_n, cfg=a.cfg, t_max=a.t_max, unify=unify,
                                   student_steps=a.unify_steps or (1, 2, 4))
            if a.final_eval_n and self.main:
                print(ev.format_table(rows))
                _write_json(dict(rows=rows, cfg=a.cfg, train_seconds=train_time, iters=a.iters),
                            os.path.join(self.run_dir, "metrics.json"))
            if a.figure_n:
                K = max(a.unify_steps) if unify else a.steps
                figure = sample.toy_figure(self.teacher, net, a.cfg, K, a.t_max, unify, n=a.figure_n)
                if self.main:
                    figure.save(os.path.join(self.run_dir, "figure.png"))
        if self.main and os.path.exists(self.path) and os.path.getsize(self.path):   # (a resumed run: maybe none)
            sample.curve_plot(self.path).save(os.path.join(self.run_dir, "curve.png"))


class ImagePreviews:
    """Image runs: previews/<iteration>.png every --preview-every iterations and at the end: the first 4 prompts
    at 1 step (top) and K steps (bottom), or one row per K of TDM-unify; fixed noise, no CFG (as the official
    code's 1- and 4-step previews). Under FSDP every rank samples and rank 0 (`main`) writes."""
    def __init__(self, teacher, student, ema, args, run_dir, start, main=True, n=4):
        self.teacher, self.student, self.ema, self.args, self.main = teacher, student, ema, args, main
        self.folder = os.path.join(run_dir, "previews")
        if main:
            os.makedirs(self.folder, exist_ok=True)
        prompts = teacher.prompts[:n]
        self.x_T = torch.randn((len(prompts), *teacher.sample_shape),
                               generator=torch.Generator().manual_seed(args.seed)).to(teacher.device)
        self.cond, self.cols = teacher.encode(prompts), len(prompts)

    @torch.no_grad()
    def after(self, done, log=None):
        if not self.args.preview_every or done % self.args.preview_every:
            return
        a = self.args
        with weights_swapped(self.student, self.ema) as net:
            rows = [sample.student_sample(self.teacher, net, self.x_T, self.cond, K, a.t_max, bool(a.unify_steps))
                    for K in (a.unify_steps or (1, a.steps))]
        if not self.main:
            return
        images = self.teacher.decode(torch.cat(rows))
        sample.image_grid(images, cols=self.cols).save(os.path.join(self.folder, f"{done:06d}.png"))

    def finish(self, train_time):
        if self.args.preview_every and self.args.iters % self.args.preview_every:   # the loop has not drawn the last
            self.after(self.args.iters)


if __name__ == "__main__":
    sample.command_line(main)
