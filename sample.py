"""Sampling: the samplers of teachers and students, a trained run loaded back, images and 2-D plots, and a CLI.

    python sample.py --teacher toy --steps 100 --out teacher.png
    python sample.py --student runs/toy-ring --steps 4 --out student.png             # DDIM on the student's grid
    python sample.py --student runs/toy-ring --steps 4 --solver dpm --out s.png      # DPM-Solver++(2M), same grid
    python sample.py --teacher pixart --weights PixArt-XL-2-512x512 --solver dpm --steps 25 --out t.png
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw

import tdm
from models import load_exact, read_state_dict, trainable_lora_views, unify_keys_from_flat
from teachers import TEACHERS, copy_network, load_teacher, read_prompts

DEFAULT_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts.txt")


#################################################################################
#                          Loading a training run                               #
#################################################################################

def read_run_meta(run_dir):
    """student.json of a run folder written by train.py (checking that student.safetensors is there too)."""
    weights, sidecar = os.path.join(run_dir, "student.safetensors"), os.path.join(run_dir, "student.json")
    if not os.path.exists(sidecar) or not os.path.exists(weights):
        raise FileNotFoundError(f"{run_dir!r} has no student.safetensors + student.json; pass a run folder "
                                "written by train.py (e.g. runs/toy-ring)")
    with open(sidecar) as f:
        return json.load(f)


def load_run(run_dir, teacher=None, device=None, meta=None, weights=None, weights_config=None):
    """(teacher, student network, meta) from a run folder written by train.py (student.safetensors + student.json;
    `meta`: its read_run_meta, when the caller has it already; `teacher`: another teacher name to load instead of
    the run's, e.g. toy-exact; `weights`: another model of the same architecture to load the teacher from, e.g. a
    community fine-tune that an SD1.5 LoRA student is plugged into (paper Table 2); `weights_config`: the folder
    describing that single file, see train.py --weights-config). Image students sample at the resolution they
    were trained at.

    The student is the teacher's network with the student's weights (full fine-tune; under TDM-unify with its
    step-count embedding), or the teacher's network with the student LoRA adapter (a LoRAView: the teacher
    itself stays available with the adapter off).
    """
    meta = meta or read_run_meta(run_dir)
    path = os.path.join(run_dir, "student.safetensors")
    state = read_state_dict(path)
    name = teacher or meta["teacher"]
    kw = dict(resolution=meta.get("args", {}).get("resolution"),           # None (unset) for the toy
              weights_config=weights_config if weights else meta.get("weights_config"))
    if weights and not meta.get("lora"):
        raise ValueError(f"weights={weights!r} plugs a LoRA student into another model, but {run_dir!r} is a full "
                         "fine-tune: its network replaces the model's whole UNet / transformer; sample it without "
                         "--weights")
    try:
        t = load_teacher(name, weights or meta.get("weights"), target=meta.get("target"), device=device, log=None,
                         **kw)
    except ValueError as e:
        if not weights:
            raise
        raise ValueError(f"{e} (a LoRA student moves only to a model of its own architecture: {run_dir!r} is a "
                         f"--teacher {name} run)") from None
    try:
        if meta.get("lora"):   # the adapter as trained: fp32 on the teacher's own base
            net = trainable_lora_views(t.network, meta["lora"], meta["lora_alpha"], names=("student",))[0]
            load_exact(net, state, f"student weights {path!r}")
        else:
            net = copy_network(t.network, meta.get("unify") or ())
            load_exact(net, unify_keys_from_flat(state), f"student weights {path!r}")
    except ValueError as e:
        if not weights:
            raise
        raise ValueError(f"{e} A student moves only to a model of its own architecture: this one was trained on "
                         f"{meta.get('weights')!r}, not on one like {weights!r} (an SD1.5 LoRA goes to SD1.5 "
                         "fine-tunes)") from None
    return t, net.eval().requires_grad_(False), meta


#################################################################################
#                          Samplers                                             #
#################################################################################

@torch.no_grad()
def teacher_sample(teacher, x_T, cond, uncond, n_steps, cfg=1.0, solver="ddim"):
    """The teacher's N-step deterministic sampler with CFG (one batched call per step): DDIM on the trailing
    grid from t = 999, or DPM-Solver++ 2M (docs/method.md §10)."""
    denoise = lambda x, t, c: tdm.cfg_denoise(teacher.denoise, x, t, c, uncond, cfg)
    if solver == "dpm":
        return dpm_solver_pp(denoise, x_T, cond, teacher.schedule, n_steps)
    return tdm.sample(denoise, x_T, cond, teacher.schedule, tdm.time_grid(n_steps, 999))


def student_x0(teacher, net):
    """A network of the teacher's architecture (student, fake) as tdm.py's denoiser: (x_t, t, cond, K) -> x0_hat."""
    return lambda x, t, c, K: teacher.x0(net, x, t, c, K)


def student_denoiser(teacher, net, K, unify=False):
    """(x_t, t, cond) -> x0_hat of a student network; under TDM-unify the step count K is its condition."""
    return tdm.with_step_count(student_x0(teacher, net), K, unify)


@torch.no_grad()
def student_sample(teacher, net, x_T, cond, K, t_max=899, unify=False, solver="ddim"):
    """The student's K-step deterministic sampler on its own grid tdm.time_grid(K, t_max), no CFG (K given as a
    condition under unify): DDIM, as in training, or DPM-Solver++(2M) on the same K timesteps (same network
    calls; docs/method.md §10)."""
    denoise, grid = student_denoiser(teacher, net, K, unify), tdm.time_grid(K, t_max)
    if solver == "dpm":
        return dpm_solver_pp(denoise, x_T, cond, teacher.schedule, K, timesteps=grid)
    return tdm.sample(denoise, x_T, cond, teacher.schedule, grid)


#################################################################################
#                          DPM-Solver++ (2M)                                    #
#################################################################################

def dpm_timesteps(n_steps, t_max=999, spacing="linspace"):
    """Integer timesteps as diffusers' DPMSolverMultistepScheduler.set_timesteps (num_train_timesteps = t_max + 1).

    linspace (diffusers default, PixArt's config): round(linspace(0, t_max, n + 1))[::-1][:-1], e.g. 4 steps
    -> 999, 749, 500, 250. trailing: round(arange(t_max + 1, 0, -(t_max + 1) / n)) - 1 -> 999, 749, 499, 249
    (= tdm.time_grid when (t_max + 1) % n == 0).
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    if spacing == "linspace":
        ts = np.linspace(0, t_max, n_steps + 1).round()[::-1][:-1]
    elif spacing == "trailing":
        ts = np.arange(t_max + 1, 0, -(t_max + 1) / n_steps).round() - 1
    else:
        raise ValueError(f"timestep spacing {spacing!r}: expected 'linspace' or 'trailing'")
    return [int(t) for t in ts]


def dpm_solver_pp(denoise, x_T, cond, schedule, n_steps, t_max=999, spacing="linspace", timesteps=None,
                  final="zero"):
    """Multistep DPM-Solver++(2M) in data prediction, Lu et al. 2022 (arXiv 2211.01095), Algorithm 2.

    denoise(x, t, cond) -> x0_hat (CFG folded in by the caller), t a (B,) long tensor. With
    lambda_t = log(alpha_t / sigma_t), h_i = lambda_{t_i} - lambda_{t_{i-1}} (time runs from noise to data):
      first order (DPM-Solver++(1) = DDIM):  x_{t_i} = (sigma_{t_i}/sigma_{t_{i-1}}) x_{t_{i-1}}
                                                       - alpha_{t_i} (e^{-h_i} - 1) x0_hat(x_{t_{i-1}}, t_{i-1})
      second order (Alg. 2):  r_i = h_{i-1} / h_i,
                              D_i = (1 + 1/(2 r_i)) x0_hat(t_{i-1}) - 1/(2 r_i) x0_hat(t_{i-2}),
                              x_{t_i} = (sigma_{t_i}/sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i.
    The first step is first order (no history), then second order. The end point, as diffusers
    (final_sigmas_type): "zero" -> sigma = 0, a first-order step that returns the last x0_hat exactly;
    "sigma_min" -> t = 0, first order only when fewer than 15 steps (lower_order_final).
    Timesteps: `timesteps` (decreasing ints, e.g. tdm.time_grid(K)) or dpm_timesteps(n_steps, t_max, spacing).
    The state is kept in float32 (diffusers upcasts the same way); returns x_T's dtype.
    """
    ts = list(timesteps) if timesteps is not None else dpm_timesteps(n_steps, t_max, spacing)
    if any(a <= b for a, b in zip(ts, ts[1:])) or ts[-1] < 0 or ts[0] >= schedule.n:
        raise ValueError(f"timesteps must be strictly decreasing integers in [0, {schedule.n - 1}]; got {ts}")
    if final not in ("zero", "sigma_min") or (final == "sigma_min" and ts[-1] == 0):
        raise ValueError(f"final={final!r} with last timestep {ts[-1]}: expected 'zero', or 'sigma_min' with a "
                         "last timestep above 0")
    ac = schedule.alphas_cumprod.double()
    alpha = lambda t: math.sqrt(ac[t])
    sigma = lambda t: math.sqrt(1 - ac[t])
    lam = lambda t: math.log(alpha(t)) - math.log(sigma(t))
    B, n = x_T.shape[0], len(ts)
    x, prev = x_T.to(torch.promote_types(x_T.dtype, torch.float32)), None   # prev: (t, x0_hat) of the last step
    for i, s in enumerate(ts):
        x0 = denoise(x.to(x_T.dtype), torch.full((B,), s, device=x_T.device, dtype=torch.long), cond).to(x.dtype)
        last = i == n - 1
        if last and final == "zero":
            return x0.to(x_T.dtype)      # sigma_next = 0, lambda = +inf: x_next = x0_hat
        t = 0 if last else ts[i + 1]
        h = lam(t) - lam(s)
        D = x0
        if prev is not None and not (last and n < 15):          # second order, Alg. 2
            r = (lam(s) - lam(prev[0])) / h
            D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * prev[1]
        x = (sigma(t) / sigma(s)) * x - alpha(t) * math.expm1(-h) * D
        prev = (s, x0)
    return x.to(x_T.dtype)


#################################################################################
#                          Toy: fixed-noise samples, figure, curve              #
#################################################################################

def noise_and_labels(teacher, labels, seed):
    """Fixed x_T (drawn on the CPU, so every device sees the same) and the labels, on the teacher's device."""
    x_T = torch.randn((len(labels), *teacher.sample_shape), generator=torch.Generator().manual_seed(seed))
    return x_T.to(teacher.device), teacher.encode(labels)


def teacher_samples(teacher, labels, n_steps, cfg=1.0, seed=1):
    """The teacher's N-step deterministic DDIM sampler (grid from t = 999, trailing spacing), with CFG. Runs on
    teacher.device; returns CPU tensors."""
    x_T, cond = noise_and_labels(teacher, labels, seed)
    return teacher_sample(teacher, x_T, cond, teacher.uncond(len(labels)), n_steps, cfg).cpu()


def student_samples(teacher, net, labels, K, t_max=899, unify=False, seed=1, solver="ddim"):
    """The student's K-step sampler on its own grid (no CFG); K is given as a condition when unify. Runs on
    teacher.device; returns CPU tensors."""
    x_T, cond = noise_and_labels(teacher, labels, seed)
    return student_sample(teacher, net, x_T, cond, K, t_max, unify, solver).cpu()


@torch.no_grad()
def toy_figure(teacher, net, cfg, K, t_max=899, unify=False, n=20000):
    """ground truth | teacher 100-step | teacher 4-step DDIM | student 1/2/4 steps | the student's K-step
    trajectories (K: the steps it was trained for; under unify the largest)."""
    labels = teacher.sample_labels(n, torch.Generator().manual_seed(7))
    gt = teacher.gmm.sample(n, labels=labels, generator=torch.Generator().manual_seed(8))[0]
    panels = [scatter_panel(gt, labels, title="ground truth"),
              scatter_panel(teacher_samples(teacher, labels, 100, cfg), labels,
                            title=f"teacher 100-step (cfg {cfg:g})"),
              scatter_panel(teacher_samples(teacher, labels, 4, cfg), labels, title="teacher 4-step DDIM")]
    for k in (1, 2, 4):
        x = student_samples(teacher, net, labels, k, t_max, unify)
        panels.append(scatter_panel(x, labels, title=f"TDM student {k} step{'s' * (k > 1)}"))
    x_T, cond = noise_and_labels(teacher, labels, seed=9)
    xs, x0s, _ = tdm.rollout(student_denoiser(teacher, net, K, unify), x_T, cond, teacher.schedule,
                             tdm.time_grid(K, t_max))
    panels.append(trajectory_panel([x.cpu() for x in xs + [x0s[-1]]], labels, title=f"student trajectory ({K} steps)"))
    return hstack(panels)


def curve_plot(metrics_path):
    """SW2 of the student over iterations (one line per K) from a run's metrics.jsonl; the teacher's 4- and
    100-step SW2 as grey references."""
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f]
    its = [r["iteration"] for r in rows]
    series = {f"student {k[4:]} step": (its, [r[k] for r in rows]) for k in rows[-1] if k.startswith("sw2_")}
    for N in (4, 100):
        if f"teacher_sw2_{N}" in rows[0]:
            series[f"teacher {N}-step*"] = ([its[0], its[-1]], [rows[0][f"teacher_sw2_{N}"]] * 2)
    return line_plot(series, title="sliced W2 to the reference (lower is better)", ylabel="SW2", log_y=True)


#################################################################################
#                          2-D plots with PIL                                   #
#################################################################################

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def scatter_panel(points, labels=None, lim=3.5, size=256, title=""):
    """Density image of 2-D points (log-scaled histogram), coloured by label, with a title."""
    pts = points.detach().cpu().numpy()
    labels = np.zeros(len(pts), int) if labels is None else labels.cpu().numpy()
    img = np.full((size, size, 3), 255.0)
    for c in np.unique(labels):
        h, _, _ = np.histogram2d(pts[labels == c, 1], pts[labels == c, 0], bins=size, range=[[-lim, lim], [-lim, lim]])
        h = np.log1p(h)[::-1] / max(np.log1p(h).max(), 1e-9)            # (size, size), y up
        col = np.array(PALETTE[c % len(PALETTE)], float)
        img = img * (1 - h[..., None]) + col * h[..., None]
    return _titled(Image.fromarray(img.clip(0, 255).astype(np.uint8)), title)


def trajectory_panel(xs, labels=None, lim=3.5, size=256, title="", n=48):
    """Lines through the trajectory points x_{t_K}, ..., x_{t_1}, x0_hat of n samples; dots at the end."""
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    to_px = lambda p: ((p[0] + lim) / (2 * lim) * size, (lim - p[1]) / (2 * lim) * size)
    path = torch.stack(xs, 1)[:n].cpu().numpy()                         # (n, steps + 1, 2)
    for i, pts in enumerate(path):
        col = PALETTE[int(labels[i]) % len(PALETTE)] if labels is not None else PALETTE[0]
        d.line([to_px(p) for p in pts], fill=tuple(c // 2 + 100 for c in col), width=1)
        x, y = to_px(pts[-1])
        d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=col)
        x, y = to_px(pts[0])
        d.ellipse([x - 1, y - 1, x + 1, y + 1], fill=(150, 150, 150))
    return _titled(img, title)


def _titled(img, title):
    out = Image.new("RGB", (img.width, img.height + 18), "white")
    out.paste(img, (0, 18))
    ImageDraw.Draw(out).text((4, 3), title, fill="black")
    return out


def hstack(panels, pad=4):
    """Panels side by side."""
    w = sum(p.width for p in panels) + pad * (len(panels) - 1)
    out = Image.new("RGB", (w, max(p.height for p in panels)), "white")
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + pad
    return out


def line_plot(series, title="", ylabel="", size=(520, 300), log_y=False):
    """Simple line chart of {name: (xs, ys)} with axes ticks at min/max; dashed grey lines for `name*` series."""
    W, H, m = size[0], size[1], 44
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    xs_all = [x for xs, _ in series.values() for x in xs]
    ys_all = [y for _, ys in series.values() for y in ys]
    f = (lambda v: np.log10(v)) if log_y else (lambda v: v)
    x0, x1 = min(xs_all), max(xs_all) if max(xs_all) > min(xs_all) else min(xs_all) + 1
    y0, y1 = f(min(ys_all)), f(max(ys_all))
    y0, y1 = y0 - 0.12 * (y1 - y0 + 1e-9), y1 + 0.12 * (y1 - y0 + 1e-9)
    px = lambda x, y: (m + (x - x0) / (x1 - x0) * (W - 2 * m), H - m - (f(y) - y0) / (y1 - y0) * (H - 2 * m))
    d.rectangle([m, m, W - m, H - m], outline="black")
    for i, (name, (xs, ys)) in enumerate(series.items()):
        col = (120, 120, 120) if name.endswith("*") else PALETTE[i % len(PALETTE)]
        pts = [px(x, y) for x, y in zip(xs, ys)]
        if len(pts) > 1:
            d.line(pts, fill=col, width=2)
        d.text((W - m - 110, H // 2 - 20 + 12 * i), name.rstrip("*"), fill=col)
    d.text((m, 6), title, fill="black")
    d.text((m, H - m + 6), f"{x0:g}", fill="black")
    d.text((W - m - 30, H - m + 6), f"{x1:g}", fill="black")
    d.text((2, m), f"{10 ** y1 if log_y else y1:.3g}", fill="black")
    d.text((2, H - m - 10), f"{10 ** y0 if log_y else y0:.3g}", fill="black")
    d.text((W // 2 - 20, H - 18), "iteration", fill="black")
    d.text((2, H // 2), ylabel, fill="black")
    return img


#################################################################################
#                          Images                                               #
#################################################################################

def to_pil(images):
    """(B, 3, H, W) floats in [0, 1] -> list of RGB PIL images (uint8, rounded)."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def image_grid(images, cols=4, pad=2, background=(255, 255, 255)):
    """A grid of images: a (B, 3, H, W) float tensor in [0, 1] or a list of PIL images -> one PIL image."""
    ims = to_pil(images) if torch.is_tensor(images) else list(images)
    if not ims:
        raise ValueError("image_grid needs at least one image")
    cols = max(1, min(cols, len(ims)))
    rows = math.ceil(len(ims) / cols)
    w, h = max(im.width for im in ims), max(im.height for im in ims)
    grid = Image.new("RGB", (cols * w + (cols - 1) * pad, rows * h + (rows - 1) * pad), background)
    for i, im in enumerate(ims):
        grid.paste(im.convert("RGB"), ((i % cols) * (w + pad), (i // cols) * (h + pad)))
    return grid


#################################################################################
#                          CLI                                                  #
#################################################################################

def parse_step_counts(text, flag, t_max=None):
    """'1,2,4' -> (1, 2, 4); '' -> (); otherwise a ValueError naming `flag`. With t_max: distinct counts, each in
    1..t_max + 1 (what fits on a grid below t_max); without: each at least 1."""
    try:
        counts = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected step counts separated by commas, e.g. 1,2,4") from None
    if t_max is None and any(k < 1 for k in counts):
        raise ValueError(f"{flag} {text!r}: step counts must be at least 1")
    if t_max is not None and (any(not 1 <= k <= t_max + 1 for k in counts) or len(set(counts)) != len(counts)):
        raise ValueError(f"{flag} {text!r}: step counts must be distinct, each in 1..{t_max + 1}")
    return counts


def command_line(main):
    """Run a script's main (train.py, sample.py, eval.py). A bad input, a ValueError or FileNotFoundError of a
    check or a loader, or train.py's stop on a non-finite loss (FloatingPointError), ends it with its one-line
    message and status 1, no traceback (TDM_TRACEBACK=1 shows it)."""
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        if os.environ.get("TDM_TRACEBACK"):
            raise
        sys.exit(f"error: {e}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Sample a teacher (N-step DDIM / DPM-Solver++ with CFG) or a TDM student "
                                "(its K-step grid) to a PNG: a scatter plot for the toy, an image grid for images.")
    p.error = lambda msg: p.exit(2, f"{p.prog}: error: {msg} (--help lists the flags)\n")   # one line, no usage
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--teacher", choices=list(TEACHERS), help="sample the teacher")
    src.add_argument("--student", help="a run folder written by train.py: sample the student with K steps")
    p.add_argument("--weights", help="image teachers: the diffusers model folder or (sd15, sdxl) checkpoint file; "
                   "with --student: another model of the run's architecture to plug its LoRA into (e.g. an SD1.5 "
                   "fine-tune)")
    p.add_argument("--weights-config", default=None, help="sd15, sdxl with a single-file --weights: the diffusers "
                   "folder describing it (see train.py --help)")
    p.add_argument("--toy-target", default=None, help="toy teachers: ring (default) | grid | FILE.json")
    p.add_argument("--steps", type=int, default=4, help="sampling steps (teacher N, student K)")
    p.add_argument("--solver", default="ddim", choices=["ddim", "dpm"],
                   help="ddim, or dpm: DPM-Solver++(2M) (teacher: diffusers' linspace timesteps; student: its "
                   "own grid)")
    p.add_argument("--cfg", type=float, default=None, help="teacher guidance (default: the teacher's training "
                   "default, toy 1, pixart 4.5, sd15 3.5, sdxl 8); students use none")
    p.add_argument("--prompts", nargs="+", default=None, help="image teachers: prompts (default: the first 4 of "
                   "prompts.txt)")
    p.add_argument("--n", type=int, default=20000, help="toy: number of points")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png")
    a = p.parse_args(argv)
    if a.steps < 1:
        p.error(f"--steps {a.steps}: the number of sampling steps must be at least 1")
    if a.n < 1:
        p.error(f"--n {a.n}: draw at least one point")
    if a.weights_config and not a.weights:
        p.error("--weights-config describes a single-file --weights: give --weights FILE too")
    if a.student:
        teacher, net, meta = load_run(a.student, weights=a.weights, weights_config=a.weights_config)
        unify, t_max = bool(meta.get("unify")), meta["t_max"]
        if a.steps > t_max + 1:
            p.error(f"--steps {a.steps}: the student's grid starts at t = {t_max}, so at most {t_max + 1} steps fit")
        if unify and a.steps not in meta["unify"]:
            p.error(f"--steps {a.steps}: this TDM-unify student was trained for K in {meta['unify']}")
        if a.cfg is not None:
            p.error("--cfg is for teachers: a TDM student samples without guidance (it was trained with it)")
    else:
        if TEACHERS[a.teacher].OUTPUT == "images" and a.toy_target:
            p.error(f"--toy-target is for the toy teachers, not --teacher {a.teacher}")
        teacher = load_teacher(a.teacher, a.weights, target=a.toy_target or "ring", weights_config=a.weights_config)
    g = torch.Generator().manual_seed(a.seed)
    if teacher.OUTPUT == "points":
        labels = teacher.sample_labels(a.n, g)
        x_T = torch.randn((a.n, *teacher.sample_shape), generator=g)
        cond, uncond = teacher.encode(labels), teacher.uncond(a.n)
    else:
        prompts = a.prompts or read_prompts(DEFAULT_PROMPTS)[:4]
        x_T = torch.randn((len(prompts), *teacher.sample_shape), generator=g).to(teacher.device)
        cond, uncond = teacher.encode(prompts), teacher.uncond(len(prompts))
    if a.student:
        x = student_sample(teacher, net, x_T, cond, a.steps, t_max, unify, a.solver)
        title = f"student {a.steps} step{'s' * (a.steps > 1)} {a.solver.upper()}"
    else:
        cfg = a.cfg if a.cfg is not None else teacher.DEFAULTS["cfg"]
        x = teacher_sample(teacher, x_T, cond, uncond, a.steps, cfg, a.solver)
        title = f"teacher {a.steps}-step {a.solver.upper()} cfg {cfg:g}"
    if teacher.OUTPUT == "points":
        scatter_panel(x, labels, size=384, title=title).save(a.out)
    else:
        image_grid(teacher.decode(x), cols=len(x)).save(a.out)
    print(f"wrote {a.out} ({title})")


if __name__ == "__main__":
    command_line(main)
