"""TDM training: build teacher, student and fake score, then call tdm.tdm_step once per iteration.

    python train.py                                  # toy: 8-mode ring, 4-step student, ~2.5 minutes on 2 CPU cores
    python train.py --toy-target grid --unify 1,2,4  # one student for 1, 2 and 4 steps
    python train.py --resume runs/toy-ring --iters 4000   # continue a run exactly
    python train.py --teacher pixart --weights PixArt-XL-2-512x512 --lora 64   # the real thing (GPU)
    torchrun --standalone --nproc_per_node 2 train.py --teacher pixart --weights ...   # data parallel, 2 GPUs

Writes runs/<name>/: student.safetensors + student.json (the student to sample; the EMA when on),
ckpt.safetensors + ckpt.json (everything needed to resume), and for the toy metrics.jsonl (the
metric curve), metrics.json, figure.png, curve.png; for PixArt previews/<iteration>.png.
"""
import argparse
import contextlib
import datetime
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
import sample
import tdm
import teachers
from models import read_state_dict, save_safetensors, trainable_lora_views

# Defaults that differ between the toy and PixArt (official PixArt recipe: tdm-method.md Sec. 4.1, 6.1). The toy
# departs from the official interval and fake weighting: with them its modes narrow and SW2 creeps up over long
# runs; the shared interval with a plain eps-MSE fake holds (README, "Stability"; 3 seeds each).
DEFAULTS = dict(toy=dict(cfg=1.0, lr_fake=3e-4, batch=512, iters=2000, ema=0.995, save_every=1000,
                         interval="shared", snr_clamp=1000.0),
                pixart=dict(cfg=4.5, lr_fake=2e-5, batch=32, iters=500, ema=0.0, save_every=500,
                            interval="separate", snr_clamp=5.0))


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)', except for flags whose default depends on the teacher (None until parse_args)."""
    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Distil a diffusion teacher into a K-step student with TDM.",
                                formatter_class=_HelpFormatter, allow_abbrev=False)
    g = p.add_argument_group("teacher and run")
    g.add_argument("--teacher", default="toy", choices=["toy", "toy-exact", "pixart"],
                   help="toy (MLP fitted to the target) | toy-exact (closed-form GMM) | pixart (--weights DIR)")
    g.add_argument("--toy-target", default="ring", help="ring | grid | FILE.json (means, covs|stds, weights, classes)")
    g.add_argument("--weights", default=None, help="pixart: the diffusers model folder (transformer/, text_encoder/, ...)")
    g.add_argument("--prompts", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts.txt"),
                   help="pixart: training prompts, one per line")
    g.add_argument("--name", default=None, help="run folder name under --out (default: toy-<target> or pixart)")
    g.add_argument("--out", default="runs", help="folder holding the run folders")
    g.add_argument("--seed", type=int, default=0, help="random seed of the run (x_T, labels or prompts, tau, noise)")
    g.add_argument("--iters", type=int, default=None, help="total iterations, also when resuming (toy 2000, pixart 500)")
    g.add_argument("--resume", default=None, help="a run folder to continue from its ckpt.safetensors")
    g.add_argument("--device", default=None, help="pixart: default cuda when available, else cpu; the toy: default "
                   "cpu (cuda pays off at large --batch, e.g. 16384, with the fitted teacher)")
    g = p.add_argument_group("TDM (tdm-method.md Sec. 8; defaults = official code unless noted)")
    g.add_argument("--steps", type=int, default=4, help="student steps K")
    g.add_argument("--unify", default="", help="TDM-unify: step counts to support, e.g. 1,2,4 (K drawn per batch)")
    g.add_argument("--t-max", type=int, default=899, help="first grid time: 899 official, 999 = paper's uniform grid")
    g.add_argument("--cfg", type=float, default=None, help="guidance of the teacher score (toy 1; pixart 4.5 official)")
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
    g.add_argument("--snr-clamp", type=float, default=None, help="fake-loss weight min(SNR, this): 5 official (pixart); "
                   "toy 1000 = no cap in the sampled tau range (plain eps-MSE)")
    g.add_argument("--fake-updates", type=int, default=1, help="fake-score updates per generator update")
    g.add_argument("--fake-reg", type=float, default=0.0, help="weight of (fake - teacher)^2 in the fake loss "
                   "(authors' follow-up 0.02; official 0)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch", type=int, default=None, help="toy 512; pixart 32 (paper)")
    g.add_argument("--lr-fake", type=float, default=None, help="fake-score lr (toy 3e-4; pixart 2e-5 official)")
    g.add_argument("--lr-ratio", type=float, default=5.0, help="generator lr = lr-fake / this (official 5, paper 10)")
    g.add_argument("--beta1", type=float, default=0.0, help="Adam beta1 of both optimisers (official and paper 0)")
    g.add_argument("--beta2", type=float, default=0.95, help="official 0.95, paper 0.999")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (official)")
    g.add_argument("--warmup", type=int, default=50, help="generator lr warm-up iterations")
    g.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"], help="generator lr after warm-up")
    g.add_argument("--grad-clip", type=float, default=1.0, help="student grad-norm clip (fake: none, as official)")
    g.add_argument("--ema", type=float, default=None, help="student EMA decay, 0 = off (toy 0.995; pixart off, as "
                   "official); the EMA is what is saved and evaluated")
    g.add_argument("--lora", type=int, default=0, help="pixart: LoRA rank for student and fake on one shared frozen "
                   "base (0 = full fine-tune of two copies)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="pixart: auto = bf16 autocast on GPU (the toy always runs in fp32)")
    g.add_argument("--grad-checkpointing", default="auto", choices=["auto", "on", "off"], help="pixart: auto = on for GPU")
    g = p.add_argument_group("logging")
    g.add_argument("--eval-every", type=int, default=200, help="toy: iterations between metric-curve points (0 = off)")
    g.add_argument("--eval-n", type=int, default=20000, help="toy: samples per curve point")
    g.add_argument("--final-eval-n", type=int, default=50000, help="toy: samples for the final metrics (0 = skip)")
    g.add_argument("--figure-n", type=int, default=20000, help="toy: points per panel of figure.png (0 = no figure)")
    g.add_argument("--preview-every", type=int, default=50, help="pixart: iterations between 1- and 4-step previews")
    g.add_argument("--save-every", type=int, default=None, help="checkpoint interval (toy 1000, pixart 500)")
    args = p.parse_args(argv)
    for name in ("batch", "save_every", "iters"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.figure_n < 0:
        p.error("--figure-n must be 0 (no figure) or more")
    if args.fake_reg < 0:
        p.error("--fake-reg must be 0 (off) or more: it weights a squared distance to the teacher")
    if args.fake_updates < 1:
        p.error("--fake-updates must be at least 1 (the fake score must follow the student)")
    kind = "pixart" if args.teacher == "pixart" else "toy"
    if args.importance == "exact" and kind == "pixart":
        p.error("--importance exact is for the toy: at image sizes the true density ratio under- or overflows "
                "(d = 16384 dimensions); use tempered (official) or off")
    if args.unify and args.lora:
        p.error("--unify needs a full fine-tune: the step-count embedding belongs to the student and the fake, "
                "not to a shared LoRA base; drop --lora (or --unify)")
    if args.lora and kind == "toy":
        p.error("--lora is for --teacher pixart (the toy MLP is fine-tuned in full)")
    for k, v in DEFAULTS[kind].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.snr_clamp <= 0:
        p.error("--snr-clamp must be positive: the fake loss is weighted by min(SNR, this)")
    return args


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
    """ckpt.safetensors (+ ckpt.json) for resuming; student.safetensors (+ student.json) for sampling."""
    tensors = {}
    structure = {k: _flatten(k, v, tensors) for k, v in state.items()}
    save_safetensors(tensors, os.path.join(run_dir, "ckpt.safetensors"))
    _write_json({**meta, "structure": structure}, os.path.join(run_dir, "ckpt.json"))
    save_safetensors(state["ema" if "ema" in state else "student"], os.path.join(run_dir, "student.safetensors"))
    _write_json(meta, os.path.join(run_dir, "student.json"))


def load_checkpoint(run_dir):
    path = os.path.join(run_dir, "ckpt.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume {run_dir!r}: no ckpt.json there; pass a run folder written by train.py")
    with open(path) as f:
        meta = json.load(f)
    tensors = read_state_dict(os.path.join(run_dir, "ckpt.safetensors"))
    return {k: _unflatten(v, tensors) for k, v in meta.pop("structure").items()}, meta


#################################################################################
#                          Student, fake score and EMA                          #
#################################################################################

def build_student_and_fake(teacher, args, unify):
    """Student and fake start as the teacher network (Sec. 4.1): two trainable copies, or two LoRA adapters on
    the teacher's own frozen base (`--lora`). Under TDM-unify both get a zero-initialised step embedding, so at
    iteration 0 student = fake = teacher either way."""
    if args.lora:
        return trainable_lora_views(teacher.network, args.lora, args.lora_alpha)
    return teachers.copy_network(teacher.network, unify), teachers.copy_network(teacher.network, unify)


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
#                          Data parallel (torchrun)                             #
#################################################################################

def init_distributed(device):
    """Under torchrun (RANK set): join the process group, one GPU per process. -> (rank, world, device).
    Without torchrun: (0, 1, device), and nothing below does anything."""
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    # generous timeout: the other ranks wait while rank 0 runs T5 over a large prompt file or writes a checkpoint
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    return dist.get_rank(), dist.get_world_size(), device


def average_gradients(params, world):
    """Data parallel without a wrapper: each gradient is averaged over the processes as soon as backward has
    accumulated it, so gradient clipping and the optimiser step see the global batch's gradient on every rank
    (and the weights stay identical). Every rank runs the same backwards, so the collectives line up."""
    def hook(p):
        dist.all_reduce(p.grad)
        p.grad.div_(world)
    for p in params:
        p.register_post_accumulate_grad_hook(hook)


@contextlib.contextmanager
def rank0_first(rank, world):
    """Rank 0 runs the block first (it fills the disk caches: toy teacher fit, T5 prompt embeddings), then the
    other ranks run it and find the caches filled."""
    if world > 1 and rank > 0:
        dist.barrier()
    yield
    if world > 1 and rank == 0:
        dist.barrier()


def check_in_sync(net, world):
    """Raise if the processes' copies of `net` differ (a checksum, compared at every checkpoint)."""
    if world == 1:
        return
    c = sum(p.detach().double().sum() for p in net.parameters())
    both = torch.stack([c, -c]).to(next(net.parameters()).device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    if both[0] != c or -both[1] != c:
        raise RuntimeError("data-parallel ranks out of sync: a network's weights differ between processes")


def rank_seed(seed, rank, iteration=0):
    """The seed of one process's own noise stream (rank 0 of a fresh run keeps `seed` itself)."""
    return seed + 1_000_003 * rank + iteration


def rng_states(device, world):
    """[the RNG states of every process] (one entry without torchrun), so a resume continues each stream."""
    s = dict(rng=torch.get_rng_state())
    if device.type == "cuda":
        s["cuda_rng"] = torch.cuda.get_rng_state(device).cpu()
    ranks = [s] if world == 1 else [None] * world
    if world > 1:
        dist.all_gather_object(ranks, s)
    return ranks


def set_rng_states(saved, device, rank, world, seed, iteration, log):
    """Restore the RNG streams of a checkpoint; if it was written by another number of processes, reseed
    (the run goes on, but not bit-exactly as an uninterrupted one would; likewise on another device type)."""
    ranks = saved.get("rank_rng") or [{k: saved[k] for k in ("rng", "cuda_rng") if k in saved}]   # or older format
    if len(ranks) != world:
        log(f"warning: the checkpoint was written by {len(ranks)} process(es), this run has {world}: "
            "reseeding each process; the resumed run is not bit-exact")
        torch.manual_seed(rank_seed(seed, rank, iteration))
        return
    if ("cuda_rng" in ranks[rank]) != (device.type == "cuda"):
        log(f"warning: the checkpoint was written on {'cuda' if 'cuda_rng' in ranks[rank] else 'cpu'}, this run is on "
            f"{device.type}: its noise comes from another generator; the resumed run is not bit-exact")
    torch.set_rng_state(ranks[rank]["rng"])
    if device.type == "cuda" and "cuda_rng" in ranks[rank]:
        torch.cuda.set_rng_state(ranks[rank]["cuda_rng"], device)


#################################################################################
#                          Training                                             #
#################################################################################

def main(argv=None):
    args = parse_args(argv)
    resume_state = None
    if args.resume:
        resume_state, old = load_checkpoint(args.resume)
        # the run's own settings, except these when given again on this command line
        keep = {"iters", "resume", "eval_every", "eval_n", "final_eval_n", "figure_n", "save_every", "preview_every",
                "device"}
        given = {a[2:].split("=")[0].replace("-", "_") for a in (sys.argv[1:] if argv is None else argv)
                 if a.startswith("--")}
        saved = dict(old["args"])
        if "no_importance" in saved:                # written before --importance replaced --no-importance
            saved["importance"] = "off" if saved.pop("no_importance") else "tempered"
        if "shared_interval" in saved:              # written before --interval replaced --shared-interval
            saved["interval"] = "shared" if saved.pop("shared_interval") else "separate"
        defaults = vars(parse_args(["--teacher", saved.get("teacher", "toy")]))   # flags added since the run
        if given - keep:
            raise ValueError(f"--resume continues a run with its own settings; these cannot change on resume: "
                             f"{', '.join('--' + k.replace('_', '-') for k in sorted(given - keep))} (allowed: "
                             f"{', '.join('--' + k.replace('_', '-') for k in sorted(keep - {'resume'}))})")
        args = argparse.Namespace(**{**defaults, **saved,
                                     **{k: v for k, v in vars(args).items() if k in keep & given}})
        args.out, args.name = os.path.split(os.path.normpath(args.resume))
    toy = args.teacher != "pixart"
    name = args.name or (f"toy-{os.path.splitext(os.path.basename(args.toy_target))[0]}" if toy else "pixart")
    run_dir = os.path.join(args.out or ".", name)
    os.makedirs(run_dir, exist_ok=True)
    unify = tuple(int(k) for k in args.unify.split(",") if k) if args.unify else ()
    # The toy runs on the CPU unless --device is given (cuda pays off only at large batches); pixart on cuda if any.
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not toy else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA GPU is visible to torch here; pass --device cpu "
                         "(also to resume a run trained on a GPU)")
    rank, world, device = init_distributed(device)
    if args.batch % world:
        raise ValueError(f"--batch {args.batch} is the global batch: it must divide by the {world} processes")
    batch = args.batch // world                 # per process
    main_proc = rank == 0                       # only it logs, evaluates, previews and writes checkpoints
    log = tqdm.write if main_proc else (lambda *a: None)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    torch.manual_seed(args.seed)

    # Teacher, student and fake score.
    with rank0_first(rank, world):
        if toy:
            teacher = teachers.load_teacher(args.teacher, target=args.toy_target, log=log).to(device)
            prompts = None
        else:
            prompts = teachers.read_prompts(args.prompts)
            teacher = teachers.load_teacher("pixart", args.weights, device=device, log=log,
                                            dtype=torch.bfloat16 if bf16 and args.lora else torch.float32,
                                            autocast=torch.bfloat16 if bf16 and device.type == "cuda" else None)
            teacher.prepare(prompts)            # T5 once per prompt (and ""), cached on disk and in memory
    if not toy and (args.grad_checkpointing == "on" or (args.grad_checkpointing == "auto" and device.type == "cuda")):
        teacher.network.gradient_checkpointing = True   # student and fake copies inherit it
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)      # the peak reported at the end: training, not the T5 pass
    student, fake = build_student_and_fake(teacher, args, unify)
    if world > 1:                               # rank 0's initial weights everywhere; then each its own noise
        params = list(student.parameters()) + list(fake.parameters())
        for p in params:
            dist.broadcast(p.data, 0)
        average_gradients(params, world)
        torch.manual_seed(rank_seed(args.seed, rank))
    betas = (args.beta1, args.beta2)
    lr_student = args.lr_fake / args.lr_ratio
    opt_student = torch.optim.AdamW(student.parameters(), lr=lr_student,
                                    betas=betas, weight_decay=args.weight_decay)
    opt_fake = torch.optim.AdamW(fake.parameters(), lr=args.lr_fake, betas=betas,
                                 weight_decay=args.weight_decay)
    config = tdm.TDMConfig(K=args.steps, t_max=args.t_max, unify=unify, cfg=args.cfg,
                           separate=args.interval == "separate", randmid=args.randmid,
                           importance=args.importance, loss=args.loss, huber_c=args.huber_c,
                           normalise=not args.no_normalise, tau_min=args.tau_min, margin=args.margin,
                           snr_clamp=args.snr_clamp, fake_updates=args.fake_updates, fake_reg=args.fake_reg,
                           grad_clip=args.grad_clip)
    start, ema = 0, None                        # the student EMA: rank 0 alone saves and samples it
    if resume_state is not None:
        student.load_state_dict(resume_state["student"])
        fake.load_state_dict(resume_state["fake"])
        opt_student.load_state_dict(resume_state["opt_student"])
        opt_fake.load_state_dict(resume_state["opt_fake"])
        if main_proc and "ema" in resume_state:
            ema = {k: v.to(device) for k, v in resume_state["ema"].items()}
        start = int(resume_state["iteration"])
        set_rng_states(resume_state, device, rank, world, args.seed, start, log)
    if ema is None and args.ema > 0 and main_proc:
        ema = {k: v.detach().clone() for k, v in student.state_dict().items()}

    def lr_at(i):   # generator: linear warm-up, then constant or cosine (official: cosine, 50 warm-up steps)
        warm = min(1.0, (i + 1) / max(1, args.warmup))
        if args.lr_schedule == "cosine":
            warm *= 0.5 * (1 + math.cos(math.pi * min(1.0, i / max(1, args.iters))))
        return lr_student * warm

    x0_of = lambda net: (lambda x, t, c, K: teacher.x0(net, x, t, c, K))      # network -> x0 denoiser
    meta = lambda it: dict(teacher=args.teacher, target=args.toy_target, weights=args.weights,
                           network=student.config if toy else None, lora=args.lora,
                           lora_alpha=args.lora_alpha or args.lora, t_max=args.t_max, K=args.steps,
                           unify=list(unify), grid=tdm.time_grid(args.steps, args.t_max), cfg=args.cfg,
                           iteration=it, args=vars(args), tdm=asdict(config))

    def state(it, rank_rng):
        s = dict(student=student.state_dict(), fake=fake.state_dict(), opt_student=opt_student.state_dict(),
                 opt_fake=opt_fake.state_dict(), iteration=torch.tensor(it), rank_rng=rank_rng)
        if ema is not None:
            s["ema"] = ema
        return s

    log_curve = preview = None
    if toy and main_proc:
        log_curve = toy_curve_logger(teacher, student, ema, args, unify, run_dir)
        if start == 0:
            open(os.path.join(run_dir, "metrics.jsonl"), "w").close()
            if args.eval_every:
                log_curve(0)
    elif main_proc:
        preview = pixart_previewer(teacher, student, ema, prompts, args, run_dir, unify)

    t0, step_time = time.time(), 0.0          # step_time: the TDM steps alone (no previews, evals, checkpoints)
    bar = tqdm(range(start, args.iters), initial=start, total=args.iters, desc="TDM", dynamic_ncols=True,
               disable=not main_proc)
    for it in bar:
        for group in opt_student.param_groups:
            group["lr"] = lr_at(it)
        if toy:
            labels = teacher.sample_labels(batch)
            cond, uncond = teacher.encode(labels), teacher.uncond(batch)
        else:
            texts = [prompts[i] for i in torch.randint(len(prompts), (batch,)).tolist()]
            cond, uncond = teacher.encode(texts), teacher.uncond(batch)
        t_step = time.time()
        logs = tdm.tdm_step(x0_of(student), x0_of(fake), teacher, cond, uncond, opt_student, opt_fake, config)
        if ema is not None:
            with torch.no_grad():
                for k, v in student.state_dict().items():
                    ema[k].lerp_(v.to(ema[k].dtype), 1 - args.ema)
        step_time += time.time() - t_step       # tdm_step's .item() calls have synchronised the GPU already
        bar.set_postfix(fake=f"{logs['loss_fake']:.4f}", gen=f"{logs['loss_gen']:.4f}", K=logs["K"])
        done = it + 1
        if log_curve and args.eval_every and done % args.eval_every == 0:
            row = log_curve(done)
            tqdm.write(f"iter {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "iteration"))
        if preview and args.preview_every and done % args.preview_every == 0:
            preview(done)
        if done % args.save_every == 0 or done == args.iters:
            check_in_sync(student, world)
            check_in_sync(fake, world)
            rank_rng = rng_states(device, world)          # on every rank: it gathers their RNG states
            if main_proc:
                save_checkpoint(run_dir, state(done, rank_rng), meta(done))
    train_time = time.time() - t0

    if dist.is_initialized():
        dist.destroy_process_group()
    if not main_proc:
        return run_dir
    if toy:
        toy_report(teacher, student, ema, args, unify, run_dir, train_time)
    elif args.preview_every and args.iters % args.preview_every:     # the loop has not drawn the last one
        preview(args.iters)
    peak = f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
    n = max(1, args.iters - start)
    print(f"wrote {run_dir}/; training took {train_time:.0f} s: {step_time / n:.3f} s/iter in TDM steps, "
          f"{train_time - step_time:.0f} s in evaluations, previews and checkpoints{peak}"
          + (f" ({world} processes, {batch} samples each)" if world > 1 else ""))
    return run_dir


#################################################################################
#                          Toy: metric curve, figure, final metrics            #
#################################################################################

def toy_curve_logger(teacher, student, ema, args, unify, run_dir):
    """A function it -> row that appends the student's SW2 / mode error at each K (fixed labels and noise) to
    metrics.jsonl; row 0 also holds the teacher's 4- and 100-step SW2 on the same reference."""
    labels = teacher.sample_labels(args.eval_n, torch.Generator().manual_seed(123))
    ref = teacher.gmm.sample(args.eval_n, labels=labels, generator=torch.Generator().manual_seed(124))[0] \
        if args.cfg == 1.0 else ev.teacher_samples(teacher, labels, 100, args.cfg, seed=125)
    ref_sorted = ev.sorted_projections(ref)                    # sorted once for every curve point

    def log(it):
        row = {"iteration": it}
        if it == 0:
            for N in (4, 100):
                row[f"teacher_sw2_{N}"] = ev.sliced_w2_sorted(ev.teacher_samples(teacher, labels, N, args.cfg),
                                                              ref_sorted)
        with weights_swapped(student, ema) as net:
            for K in (unify or (args.steps,)):
                x = ev.student_samples(teacher, net, labels, K, args.t_max, bool(unify))
                row[f"sw2_{K}"] = ev.sliced_w2_sorted(x, ref_sorted)
                row[f"mode_{K}"] = ev.mode_coverage_error(x, teacher.gmm)
        with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        return row
    return log


def toy_report(teacher, student, ema, args, unify, run_dir, train_time):
    """Final metric table (metrics.json), figure.png and curve.png."""
    with weights_swapped(student, ema) as net:
        if args.final_eval_n:
            rows = ev.evaluate(teacher, net, n=args.final_eval_n, cfg=args.cfg, t_max=args.t_max, unify=bool(unify),
                               student_steps=unify or (1, 2, 4))
            print(ev.format_table(rows))
            _write_json(dict(rows=rows, cfg=args.cfg, train_seconds=train_time, iters=args.iters),
                        os.path.join(run_dir, "metrics.json"))
        if args.figure_n:
            figure(teacher, net, args, unify, n=args.figure_n).save(os.path.join(run_dir, "figure.png"))
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path) and os.path.getsize(path):          # a resumed run may have had no curve points
        curve(path).save(os.path.join(run_dir, "curve.png"))


def curve(metrics_path):
    """SW2 of the student over iterations (one line per K), teacher 4- and 100-step as grey references."""
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f]
    its = [r["iteration"] for r in rows]
    series = {f"student {k[4:]} step": (its, [r[k] for r in rows]) for k in rows[-1] if k.startswith("sw2_")}
    for N in (4, 100):
        if f"teacher_sw2_{N}" in rows[0]:
            series[f"teacher {N}-step*"] = ([its[0], its[-1]], [rows[0][f"teacher_sw2_{N}"]] * 2)
    return sample.line_plot(series, title="sliced W2 to the reference (lower is better)", ylabel="SW2", log_y=True)


@torch.no_grad()
def figure(teacher, net, args, unify, n=20000):
    """ground truth | teacher 100-step | teacher 4-step DDIM | student 1/2/4 steps | the student's trajectory."""
    labels = teacher.sample_labels(n, torch.Generator().manual_seed(7))
    gt = teacher.gmm.sample(n, labels=labels, generator=torch.Generator().manual_seed(8))[0]
    panels = [sample.scatter_panel(gt, labels, title="ground truth"),
              sample.scatter_panel(ev.teacher_samples(teacher, labels, 100, args.cfg), labels,
                                   title=f"teacher 100-step (cfg {args.cfg:g})"),
              sample.scatter_panel(ev.teacher_samples(teacher, labels, 4, args.cfg), labels, title="teacher 4-step DDIM")]
    for K in (1, 2, 4):
        x = ev.student_samples(teacher, net, labels, K, args.t_max, bool(unify))
        panels.append(sample.scatter_panel(x, labels, title=f"TDM student {K} step{'s' * (K > 1)}"))
    K = args.steps if not unify else max(unify)
    x_T, cond = ev.noise_and_labels(teacher, labels, seed=9)
    xs, x0s, _ = tdm.rollout(sample.student_denoiser(teacher, net, K, bool(unify)), x_T, cond,
                             teacher.schedule, tdm.time_grid(K, args.t_max))
    panels.append(sample.trajectory_panel([x.cpu() for x in xs + [x0s[-1]]], labels,
                                          title=f"student trajectory ({K} steps)"))
    return sample.hstack(panels)


#################################################################################
#                          PixArt: previews                                     #
#################################################################################

def pixart_previewer(teacher, student, ema, prompts, args, run_dir, unify=(), n=4):
    """A function it -> None saving previews/<it>.png: the first n prompts at 1 step (top) and K steps (bottom),
    or one row per K of TDM-unify; fixed noise, no CFG (as the official code's 1- and 4-step previews)."""
    os.makedirs(os.path.join(run_dir, "previews"), exist_ok=True)
    fixed = prompts[:n]
    n = len(fixed)
    x_T = torch.randn((n, *teacher.sample_shape), generator=torch.Generator().manual_seed(args.seed)).to(teacher.device)
    cond = teacher.encode(fixed)

    @torch.no_grad()
    def preview(it):
        with weights_swapped(student, ema) as net:
            rows = [sample.student_sample(teacher, net, x_T, cond, K, args.t_max, bool(unify))
                    for K in (unify or (1, args.steps))]
        images = teacher.decode(torch.cat(rows))
        sample.image_grid(images, cols=n).save(os.path.join(run_dir, "previews", f"{it:06d}.png"))
    return preview


if __name__ == "__main__":
    main()
