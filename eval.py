"""Metrics: exact ones against the known Gaussian-mixture target for the toy; the paper's image metrics and the
speed-up for image runs. What a run's teacher produces (points or images) decides which.

    python eval.py runs/toy                 # teacher at 1/2/4/8/100 steps, student at 1/2/4 steps
    python eval.py --teacher toy-exact      # teacher only
    python eval.py runs/toy --json m.json   # also write the table as JSON
    python eval.py runs/toy --solver dpm    # the student sampled with DPM-Solver++(2M) on its grid
    python eval.py runs/pixart --clip clip-vit-large-patch14 --hps HPS_v2.1_compressed.pt \
        --aesthetic sac+logos+ava1-l14-linearMSE.pth    # images: HPSv2, aesthetic, CLIP score, FD / CMMD, speed

Toy metrics (each also given as its finite-sample noise floor: the same metric between two fresh ground-truth
sample sets of the same size):
  sw2   sliced Wasserstein-2 distance to fresh reference samples (512 fixed random directions)
  mmd   unbiased squared MMD, sum of RBF kernels with bandwidths 0.05, 0.2, 1 (on 2,000 points)
  mode  mode coverage error: total variation between the fraction of samples in each mode (nearest
        component, Mahalanobis radius <= 4) plus an "off every mode" bin, and the true weights
  ll    mean log-likelihood of the samples under the true density (higher is better)
With cfg > 1 the reference for sw2 and mmd is the teacher's 100-step CFG sampler, not the target.

Image metrics (evaluate_images; the paper's Table 1 columns and Table 2's distance to the teacher):
  hps        HPSv2: 100 x cosine of the OpenCLIP ViT-H/14 image and prompt embeddings, HPS v2 / v2.1 weights
  aesthetic  the LAION improved aesthetic predictor: an MLP on the normalised CLIP ViT-L/14 image embedding
  clip       CLIP score: 100 x max(cosine(image, prompt), 0), with the model given as --clip
  fd, cmmd   the student's distance to the teacher's samples in CLIP image-embedding space: Frechet distance of
             fitted Gaussians, and CMMD (Jayasumana et al. 2024: MMD with an RBF kernel, sigma 10, x 1000)
  speed      NFE, seconds per image and images/s, network alone and end to end (text encoding, VAE decode)
"""
import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from clip import load_clip_model
from clip_image import clip_preprocess, hps_preprocess, load_aesthetic, to_pil_images
from sample import (command_line, image_grid, load_run, parse_step_counts, read_run_meta, student_sample,
                    student_samples, teacher_sample, teacher_samples)
from teachers import TEACHERS, load_teacher, read_prompts

DEFAULT_EVAL_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval_prompts.txt")


#################################################################################
#                          Metrics                                              #
#################################################################################

def sorted_projections(x, n_proj=512):
    """Points x (n, D) projected on n_proj fixed random unit directions (seed 0), sorted per direction: (n_proj, n)."""
    theta = torch.randn(x.shape[1], n_proj, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    theta = theta / theta.norm(dim=0)                                   # (D, n_proj) unit directions
    return (theta.T @ x.double().T).sort(1).values                      # (n_proj, n)


def sliced_w2_sorted(a, pb):
    """Sliced W2 of points a to a reference given by its sorted_projections pb (sorted once, reused per sampler);
    a needs at least as many points as the reference (its first n are used)."""
    n = pb.shape[1]
    if len(a) < n:
        raise ValueError(f"sliced_w2_sorted: {len(a)} samples against a reference of {n}; draw at least as many")
    pa = sorted_projections(a[:n], pb.shape[0])
    return (pa - pb).pow(2).mean().sqrt().item()


def sliced_w2(a, b, n_proj=512):
    """Sliced W2 between equal-size point sets (n, D): sqrt(mean over directions of 1-D W2^2)."""
    n = min(len(a), len(b))
    return sliced_w2_sorted(a[:n], sorted_projections(b[:n], n_proj))


def mmd2(a, b, bandwidths=(0.05, 0.2, 1.0), n=2000):
    """Unbiased squared MMD with a sum of RBF kernels, on the first n points of each set."""
    a, b = a[:n].double(), b[:n].double()

    def k(x, y):
        d2 = torch.cdist(x, y).pow(2)
        return sum(torch.exp(-d2 / (2 * h ** 2)) for h in bandwidths)
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    m, p = len(a), len(b)
    return ((kaa.sum() - kaa.diag().sum()) / (m * (m - 1)) + (kbb.sum() - kbb.diag().sum()) / (p * (p - 1))
            - 2 * kab.mean()).item()


def _nearest_mode(x, gmm, radius=4.0):
    """(component index, Mahalanobis distance to its mean, on-mode mask) of each sample; on = distance <= radius."""
    comp = gmm.responsibilities(x).argmax(1)                            # (n,) nearest component
    d = x.double().cpu() - gmm.means[comp]                              # (n, dim)
    maha = (d[:, None, :] @ torch.linalg.solve(gmm.covs[comp], d[:, :, None])).flatten().sqrt()   # (n,)
    return comp, maha, maha <= radius


def mode_coverage_error(x, gmm, radius=4.0, nearest=None):
    """TV distance between the samples' mode histogram (with an off-mode bin) and the true mode weights."""
    comp, _, on = nearest or _nearest_mode(x, gmm, radius)
    freq = torch.zeros(len(gmm.weights), dtype=torch.float64).index_add_(0, comp[on], torch.ones(int(on.sum()),
                                                                                          dtype=torch.float64))
    freq = freq / len(x)
    off = 1 - on.double().mean()
    return 0.5 * ((freq - gmm.weights).abs().sum() + off).item()


def median_radius(x, gmm, radius=4.0, nearest=None):
    """Median Mahalanobis distance of the on-mode samples to their mode (NaN when none is on a mode)."""
    _, maha, on = nearest or _nearest_mode(x, gmm, radius)
    return maha[on].median().item() if on.any() else float("nan")


def mean_loglik(x, gmm):
    return gmm.log_prob(x).mean().item()


def metrics(x, ref, gmm, ref_radius, ref_sorted):
    """All toy metrics of samples x against reference samples ref (same size) and the true mixture; ref_radius and
    ref_sorted are median_radius(ref) and sorted_projections(ref), computed once per reference by the caller.
    width = median_radius(x) / ref's: < 1 = modes narrower than the reference's; the median sees the cores of
    the modes, not their tails."""
    nearest = _nearest_mode(x, gmm)
    return dict(sw2=sliced_w2_sorted(x, ref_sorted), mmd=mmd2(x, ref),
                mode=mode_coverage_error(x, gmm, nearest=nearest),
                width=median_radius(x, gmm, nearest=nearest) / ref_radius, ll=mean_loglik(x, gmm))


#################################################################################
#                          Evaluating teachers and students                     #
#################################################################################

def evaluate(teacher, student=None, n=50000, cfg=1.0, teacher_steps=(1, 2, 4, 8, 100), student_steps=(1, 2, 4),
             t_max=899, unify=False, seed=0, solver="ddim"):
    """{row name: metrics}. Rows: 'noise floor', 'teacher N', 'student K'. Same labels and x_T for every sampler;
    `seed` draws them (and the reference), so another seed is an independent evaluation. `solver`: the student's
    sampler on its grid (ddim or dpm); the teacher rows are always DDIM."""
    g = torch.Generator().manual_seed(seed)
    gt, labels = teacher.gmm.sample(n, generator=g)
    rows = {}
    if cfg == 1.0:
        ref = teacher.gmm.sample(n, labels=labels, generator=g)[0]
        floor = gt
    else:   # guidance sharpens the target: the reference is the teacher's own 100-step CFG sampler
        ref = teacher_samples(teacher, labels, 100, cfg, seed=seed + 7)
        floor = teacher_samples(teacher, labels, 100, cfg, seed=seed + 8)
    r, ps = median_radius(ref, teacher.gmm), sorted_projections(ref)     # the reference's, computed once
    rows["noise floor"] = metrics(floor, ref, teacher.gmm, r, ps)
    if cfg == 1.0:
        rows["ground truth"] = dict(ll=mean_loglik(gt, teacher.gmm))
    for N in teacher_steps:
        rows[f"teacher {N}"] = metrics(teacher_samples(teacher, labels, N, cfg, seed=seed + 1), ref, teacher.gmm, r, ps)
    for K in student_steps if student is not None else ():
        x = student_samples(teacher, student, labels, K, t_max, unify, seed=seed + 1, solver=solver)
        rows[f"student {K}"] = metrics(x, ref, teacher.gmm, r, ps)
    return rows


def curve_logger(teacher, net, K_list, cfg, t_max, unify, path, n=20000):
    """A function it -> row that appends the SW2 / mode error of `net` (the student, or its EMA swapped in by the
    caller) at each K in K_list (fixed labels and noise, n samples) to the JSON-lines file `path` (if any); row 0 also
    holds the teacher's 4- and 100-step SW2 on the same reference."""
    labels = teacher.sample_labels(n, torch.Generator().manual_seed(123))
    ref = teacher.gmm.sample(n, labels=labels, generator=torch.Generator().manual_seed(124))[0] \
        if cfg == 1.0 else teacher_samples(teacher, labels, 100, cfg, seed=125)
    ref_sorted = sorted_projections(ref)                       # sorted once for every curve point

    def log(it):
        row = {"iteration": it}
        if it == 0:
            for N in (4, 100):
                row[f"teacher_sw2_{N}"] = sliced_w2_sorted(teacher_samples(teacher, labels, N, cfg), ref_sorted)
        for K in K_list:
            x = student_samples(teacher, net, labels, K, t_max, unify)
            row[f"sw2_{K}"] = sliced_w2_sorted(x, ref_sorted)
            row[f"mode_{K}"] = mode_coverage_error(x, teacher.gmm)
        if path:                                               # None: a data-parallel rank other than 0
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
        return row
    return log


#################################################################################
#                          Image metrics                                        #
#################################################################################

def frechet_distance(a, b):
    """Frechet distance between Gaussians fitted to feature sets a (n, d) and b (m, d), in float64:
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) (the FID formula, on any features)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    S_a, S_b = torch.cov(a.T), torch.cov(b.T)                           # (d, d) each, unbiased
    w, V = torch.linalg.eigh(S_a)
    root_a = V @ torch.diag(w.clamp_min(0).sqrt()) @ V.T                # S_a^1/2
    cross = torch.linalg.eigvalsh(root_a @ S_b @ root_a).clamp_min(0).sqrt().sum()   # tr (S_a^1/2 S_b S_a^1/2)^1/2
    return ((mu_a - mu_b).pow(2).sum() + S_a.trace() + S_b.trace() - 2 * cross).item()


def cmmd(a, b, sigma=10.0, scale=1000.0):
    """CMMD (Jayasumana et al. 2024, "Rethinking FID"): scale x MMD^2 between feature sets with the Gaussian RBF
    kernel exp(-|x - y|^2 / (2 sigma^2)), the reference's V-statistic (all pairs, diagonals included), so
    identical sets give exactly 0. Features are used as given (the reference takes L2-normalised CLIP
    embeddings)."""
    a, b = a.double(), b.double()
    k = lambda x, y: torch.exp(-torch.cdist(x, y).pow(2) / (2 * sigma ** 2)).mean()
    return (scale * (k(a, a) + k(b, b) - 2 * k(a, b))).item()


class ImageScorer:
    """The feature networks of the image metrics, each loaded only when its weight file is given:
    clip (a CLIP model: CLIP score, and the features of FD / CMMD), hps (OpenCLIP ViT-H/14 with HPS v2 weights),
    aesthetic (the LAION predictor, on `clip` when it is ViT-L/14, else on ViT-L/14 given as aesthetic_clip)."""
    def __init__(self, clip=None, hps=None, aesthetic=None, device="cpu"):
        self.device, self._text = torch.device(device), {}
        dtype = torch.float32 if self.device.type == "cpu" else torch.float16   # the files may hold fp16
        self.clip = load_clip_model(clip, dtype=dtype).to(self.device) if clip else None
        self.hps = load_clip_model(hps, dtype=dtype).to(self.device) if hps else None
        self.aesthetic = None
        if aesthetic:
            if self.clip is None:
                raise ValueError("--aesthetic scores CLIP ViT-L/14 image embeddings: give --clip "
                                 "clip-vit-large-patch14 (the transformers folder) too")
            self.aesthetic = load_aesthetic(aesthetic, dtype=torch.float32).to(self.device)
            width = self.aesthetic.layers[0].in_features
            if self.clip.projection_dim != width:
                raise ValueError(f"--aesthetic {aesthetic!r} takes {width}-d CLIP embeddings, but --clip gives "
                                 f"{self.clip.projection_dim}-d ones: pass CLIP ViT-L/14 as --clip")

    def text_features(self, name, prompts):
        """(B, P) normalised prompt embeddings of model `name`, computed once per prompt for every sampler."""
        model, cache = getattr(self, name), self._text.setdefault(name, {})
        todo = [p for p in dict.fromkeys(prompts) if p not in cache]
        if todo:
            emb = F.normalize(model.encode_text(model.tokenizer(todo).to(self.device)).float(), dim=-1)
            cache.update(zip(todo, emb))
        return torch.stack([cache[p] for p in prompts])

    def missing(self):
        """What is not measured, and the file each needs."""
        need = {"hps": "--hps HPS_v2.1_compressed.pt (or HPS_v2_compressed.pt)",
                "aesthetic": "--aesthetic sac+logos+ava1-l14-linearMSE.pth (with --clip ViT-L/14)",
                "clip": "--clip clip-vit-large-patch14 (the transformers folder; CLIP score, FD, CMMD)"}
        return {k: v for k, v in need.items() if getattr(self, k) is None}

    @torch.no_grad()
    def __call__(self, images, prompts):
        """images (B, 3, H, W) in [0, 1], prompts (B,) -> {metric: (B,) per image, 'features': (B, P) normalised
        CLIP image embeddings}."""
        out, images = {}, to_pil_images(images)                               # uint8, once for both
        for name, preprocess in (("clip", clip_preprocess), ("hps", hps_preprocess)):   # each as its reference does
            model = getattr(self, name)
            if model is None:
                continue
            pixels = preprocess(images).to(self.device, next(model.parameters()).dtype)    # (B, 3, 224, 224)
            img = F.normalize(model.encode_image(pixels).float(), dim=-1)        # (B, P)
            txt = self.text_features(name, prompts)                              # (B, P)
            cos = (img * txt).sum(-1)                                            # (B,)
            out[name] = 100 * (cos.clamp_min(0) if name == "clip" else cos)
            if name == "clip":
                out["features"] = img.cpu()
                if self.aesthetic is not None:
                    out["aesthetic"] = self.aesthetic(img).flatten()
        return {k: v.cpu() for k, v in out.items()}


#################################################################################
#                          Evaluating image students                            #
#################################################################################

def read_eval_prompts(path):
    """[(style, prompt)] from a file of `style<TAB>prompt` lines (eval_prompts.txt) or plain prompt lines (style
    ''); '#' lines are comments (teachers.read_prompts)."""
    return [(style.strip(), prompt.strip()) for style, _, prompt in
            (line.rpartition("\t") for line in read_prompts(path))]


def samplers(meta, teacher_steps, cfg):
    """{row name: (NFE, function(teacher, net, x_T, cond, uncond) -> latents)}: the teacher's DPM-Solver++ with CFG,
    the student at K steps with DDIM and DPM-Solver++, and at 1 step for a TDM-unify student trained for it."""
    rows = {f"teacher {teacher_steps}-step DPM, cfg {cfg:g}": (
        2 * teacher_steps, lambda t, net, x, c, u: teacher_sample(t, x, c, u, teacher_steps, cfg, "dpm"))}
    if meta is None:
        return rows
    unify, t_max, K = bool(meta.get("unify")), meta["t_max"], meta["K"]
    steps = [(K, "ddim"), (K, "dpm")] + ([(1, "ddim")] if 1 in (meta.get("unify") or []) and K != 1 else [])
    for k, solver in steps:
        rows[f"student {k}-step {solver.upper()}"] = (
            k, lambda t, net, x, c, u, k=k, s=solver: student_sample(t, net, x, c, k, t_max, unify, s))
    return rows


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


@torch.no_grad()
def evaluate_images(teacher, student, meta, prompts, scorer, teacher_steps=25, cfg=None, batch=8, seed=0,
                    grid_n=4):
    """Sample every prompt with fixed noise from each sampler (same x_T for all), score the images, and time the
    samplers (after one untimed batch, which loads the VAE and warms the device up).
    -> (rows {name: metrics}, side-by-side images of the first grid_n prompts per sampler)."""
    cfg = teacher.DEFAULTS["cfg"] if cfg is None else cfg
    texts = [p for _, p in prompts]
    styles = [s for s, _ in prompts]
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn((len(texts), *teacher.sample_shape), generator=g)         # CPU: the same on every device
    teacher.keep_encoder = True                  # encode (and cache) once; the encoder stays for its timing
    teacher.prepare(texts)
    runs = samplers(meta, teacher_steps, cfg)
    first = texts[:batch]                        # the untimed warm-up: the cheapest sampler, and the VAE's load
    teacher.decode(list(runs.values())[-1][1](teacher, student, x_T[:batch].to(teacher.device),
                                              teacher.encode(first), teacher.uncond(len(first))))
    rows, grid = {}, {}
    for name, (nfe, run) in runs.items():
        scores, net_time, decode_time, feats = [], 0.0, 0.0, []
        for i in tqdm(range(0, len(texts), batch), desc=name, leave=False):
            chunk = texts[i:i + batch]
            cond, uncond = teacher.encode(chunk), teacher.uncond(len(chunk))
            x0, dt = _timed(lambda: run(teacher, student, x_T[i:i + batch].to(teacher.device), cond, uncond),
                            teacher.device)
            images, dd = _timed(lambda: teacher.decode(x0), teacher.device)
            net_time, decode_time = net_time + dt, decode_time + dd
            if i == 0:
                grid[name] = images[:grid_n].cpu()
            s = scorer(images, chunk)
            feats.append(s.pop("features", None))
            scores.append(s)
        row = dict(nfe=nfe, n=len(texts))
        for k in scores[0]:
            v = torch.cat([s[k] for s in scores])
            row[k] = v.mean().item()
            if k == "hps" and any(styles):
                row["hps_by_style"] = {st: v[[j for j, x in enumerate(styles) if x == st]].mean().item()
                                       for st in dict.fromkeys(styles)}
        row["features"] = torch.cat(feats) if feats[0] is not None else None
        row.update(net_s_per_image=net_time / len(texts), decode_s_per_image=decode_time / len(texts))
        rows[name] = row
    ref = rows[next(iter(rows))]["features"]
    for row in rows.values():                             # the distance of each sampler to the teacher's samples
        f = row.pop("features")
        if f is not None and f is not ref:
            row["fd"], row["cmmd"] = frechet_distance(f, ref), cmmd(f, ref)
    speed(teacher, first, rows)
    return rows, grid


def speed(teacher, texts, rows):
    """Adds to each row: end-to-end seconds per image (the text encoder run for real on one batch, sampling, VAE
    decode), images/s network alone and end to end, and the speed-up over the teacher's row."""
    teacher.run_encoder(texts)                                      # loaded already, unless every prompt was cached
    encode_s = _timed(lambda: teacher.run_encoder(texts), teacher.device)[1] / len(texts)
    teacher.free_encoder()
    base = next(iter(rows.values()))
    for row in rows.values():
        row["encode_s_per_image"] = encode_s
        row["e2e_s_per_image"] = encode_s + row["net_s_per_image"] + row["decode_s_per_image"]
        row["net_images_per_s"] = 1 / row["net_s_per_image"]
        row["e2e_images_per_s"] = 1 / row["e2e_s_per_image"]
        row["speedup_net"] = base["net_s_per_image"] / row["net_s_per_image"]
        row["speedup_e2e"] = base["e2e_s_per_image"] / row["e2e_s_per_image"]


def image_table(rows, n, missing):
    """The rows as a Markdown table laid out like the paper's Table 1 (HPS, AeS, CS) with the distance to the
    teacher and the speed."""
    cell = lambda r, k, f: f"{r[k]:{f}}" if k in r else "–"
    lines = ["| sampler | NFE | HPS ↑ | AeS ↑ | CS ↑ | FD to teacher ↓ | CMMD to teacher ↓ "
             "| s / image (network) | s / image (end to end) | speed-up (end to end) |", "|" + "---|" * 10]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['nfe']} | {cell(r, 'hps', '.2f')} | {cell(r, 'aesthetic', '.2f')} | "
                     f"{cell(r, 'clip', '.2f')} | {cell(r, 'fd', '.3f')} | {cell(r, 'cmmd', '.3f')} | "
                     f"{r['net_s_per_image']:.3g} | {r['e2e_s_per_image']:.3g} | {r['speedup_e2e']:.1f}x |")
    lines.append(f"\n{n} prompts, one image each per sampler, the same noise for every sampler; FD and CMMD: {n} "
                 "images per side, in CLIP image-embedding space.")
    lines += [f"Not measured: {k} (needs {v})." for k, v in missing.items()]
    return "\n".join(lines)


def format_table(rows):
    lines = [f"{'':14s} {'sw2':>8s} {'mmd':>9s} {'mode':>7s} {'width':>6s} {'ll':>8s}"]
    for name, m in rows.items():
        cell = lambda k, f: (f"{m[k]:{f}}" if k in m else "")
        lines.append(f"{name:14s} {cell('sw2', '8.4f'):>8s} {cell('mmd', '9.5f'):>9s} {cell('mode', '7.4f'):>7s} "
                     f"{cell('width', '6.3f'):>6s} {cell('ll', '8.3f'):>8s}")
    return "\n".join(lines)


def image_main(a, p):
    """eval.py for image teachers: sample, score, time; write <out>/metrics.json, table.md, side_by_side.png."""
    if a.run:
        teacher, student, meta = load_run(a.run, device=a.device)
        out = a.out or os.path.join(a.run, "eval")
    else:
        teacher = load_teacher(a.teacher, a.weights, device=a.device, weights_config=a.weights_config)
        student, meta = None, None
        out = a.out or "eval"
    try:
        steps = parse_step_counts(a.teacher_steps or "25", "--teacher-steps")
    except ValueError as e:
        p.error(str(e))
    if len(steps) != 1:
        p.error(f"--teacher-steps {a.teacher_steps}: image runs compare one teacher sampler, e.g. 25")
    prompts = read_eval_prompts(a.prompts or DEFAULT_EVAL_PROMPTS)[:a.n]
    scorer = ImageScorer(a.clip, a.hps, a.aesthetic, device=teacher.device)
    for k, v in scorer.missing().items():
        print(f"not measuring {k}: it needs {v}")
    rows, grid = evaluate_images(teacher, student, meta, prompts, scorer, steps[0], a.cfg, a.batch, a.seed)
    os.makedirs(out, exist_ok=True)
    table = image_table(rows, len(prompts), scorer.missing())
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(dict(n=len(prompts), seed=a.seed, device=str(teacher.device), prompts=a.prompts or "eval_prompts.txt",
                       rows=rows), f, indent=1)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")
    shown = [n for n in grid if "DPM" not in n or n.startswith("teacher")]    # teacher | student K | student 1
    side = torch.stack([grid[n] for n in shown], 1).flatten(0, 1)           # (prompts x samplers, 3, H, W)
    image_grid(side, cols=len(shown)).save(os.path.join(out, "side_by_side.png"))
    print(table)
    print(f"wrote {out}/metrics.json, table.md, side_by_side.png ({' | '.join(shown)}, one prompt per row)")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description="Metrics of a teacher and a TDM student: exact ones for the toy; HPSv2, "
                                "aesthetic score, CLIP score, FD / CMMD to the teacher and the speed-up for images.")
    p.error = lambda msg: p.exit(2, f"{p.prog}: error: {msg} (--help lists the flags)\n")   # one line, no usage
    p.add_argument("run", nargs="?", help="a run folder written by train.py (omit to evaluate the teacher only)")
    p.add_argument("--teacher", default=None, help="toy | toy-exact (default: the run's, else toy); an image "
                   "teacher with --weights evaluates that teacher alone")
    p.add_argument("--toy-target", default=None, help="ring | grid | FILE.json (default: the run's, else ring)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale of the teacher (default: the run's; "
                   "images: the teacher's default)")
    p.add_argument("--n", type=int, default=None, help="toy: samples per sampler (50000); images: the first N "
                   "prompts (default: all)")
    p.add_argument("--teacher-steps", default=None, help="toy: 1,2,4,8,100; images: the teacher's DPM-Solver++ "
                   "steps (25)")
    p.add_argument("--student-steps", default="1,2,4", help="toy: the student's step counts")
    p.add_argument("--seed", type=int, default=0, help="draws labels, reference and x_T; another seed = an "
                   "independent evaluation (train.py's final table uses 0)")
    p.add_argument("--solver", default="ddim", choices=["ddim", "dpm"], help="toy: the student's sampler on its "
                   "grid, DDIM (as trained) or DPM-Solver++(2M); images run both")
    p.add_argument("--json", default=None, help="toy: also write the table to this JSON file")
    g = p.add_argument_group("images")
    g.add_argument("--weights", default=None, help="with --teacher: the image teacher's folder or file")
    g.add_argument("--weights-config", default=None, help="with a single-file --weights: its describing folder")
    g.add_argument("--prompts", default=None, help="`style<TAB>prompt` or prompt lines (default: eval_prompts.txt, "
                   "400 prompts in the HPSv2 benchmark's four styles)")
    g.add_argument("--clip", default=None, help="CLIP for the CLIP score and FD / CMMD features: a transformers "
                   "CLIPModel folder (clip-vit-large-patch14) or an OpenCLIP ViT-H/14 file")
    g.add_argument("--hps", default=None, help="HPS v2 / v2.1 checkpoint (HPS_v2.1_compressed.pt)")
    g.add_argument("--aesthetic", default=None, help="LAION aesthetic predictor (sac+logos+ava1-l14-linearMSE.pth)")
    g.add_argument("--batch", type=int, default=8, help="images per sampling batch")
    g.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    g.add_argument("--out", default=None, help="output folder (default: RUN/eval)")
    a = p.parse_args(argv)
    if a.n is not None and a.n < 2:
        p.error(f"--n {a.n}: the metrics need at least 2 samples per sampler")
    if a.batch < 1:
        p.error(f"--batch {a.batch}: at least 1")
    if a.teacher is not None and a.teacher not in TEACHERS:
        p.error(f"--teacher {a.teacher}: expected one of {', '.join(TEACHERS)}")
    meta = read_run_meta(a.run) if a.run else {}
    name = meta.get("teacher") or a.teacher or "toy"
    if TEACHERS[name].OUTPUT == "images":
        if a.run and a.teacher:
            p.error("--teacher with a run: a run is evaluated against its own teacher; drop --teacher")
        if not a.run and not a.weights:
            p.error(f"--teacher {name} needs --weights PATH (the teacher's folder or file)")
        return image_main(a, p)
    image_flags = [f for f in ("weights", "prompts", "clip", "hps", "aesthetic", "out") if getattr(a, f)]
    if image_flags:
        p.error(f"{', '.join('--' + f for f in image_flags)}: for image runs; the toy has exact metrics")
    if a.teacher is not None and a.run is None and TEACHERS[a.teacher].OUTPUT != "points":
        p.error(f"--teacher {a.teacher}: needs --weights")
    try:
        teacher_steps = parse_step_counts(a.teacher_steps or "1,2,4,8,100", "--teacher-steps")
        student_steps = parse_step_counts(a.student_steps, "--student-steps")
    except ValueError as e:
        p.error(str(e))
    n = a.n or 50000
    student = None
    if a.run:
        teacher, student, meta = load_run(a.run, teacher=a.teacher, meta=meta)
        bad = [K for K in student_steps if K > meta["t_max"] + 1 or (meta.get("unify") and K not in meta["unify"])]
        if bad:
            p.error(f"--student-steps {bad}: this student samples at K <= {meta['t_max'] + 1}"
                    + (f", K in {meta['unify']} (TDM-unify)" if meta.get("unify") else ""))
    else:
        teacher = load_teacher(a.teacher or "toy", target=a.toy_target or "ring")
    cfg = a.cfg if a.cfg is not None else meta.get("cfg", 1.0)
    rows = evaluate(teacher, student, n=n, cfg=cfg, teacher_steps=teacher_steps, student_steps=student_steps,
                    t_max=meta.get("t_max", 899), unify=bool(meta.get("unify")), seed=a.seed, solver=a.solver)
    print(f"target {teacher.gmm.name!r}, teacher {'exact' if teacher.exact else 'MLP'}, cfg {cfg}, n {n}, "
          f"seed {a.seed}, student sampler {a.solver}")
    print(format_table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(cfg=cfg, n=n, seed=a.seed, target=teacher.gmm.name, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    command_line(main)
