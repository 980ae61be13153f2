"""Metrics. Toy: exact ones against the known Gaussian-mixture target.

    python eval.py runs/toy                 # teacher at 1/2/4/8/100 steps, student at 1/2/4 steps
    python eval.py --teacher toy-exact      # teacher only
    python eval.py runs/toy --json m.json   # also write the table as JSON
    python eval.py runs/toy --solver dpm    # the student sampled with DPM-Solver++(2M) on its grid

Metrics (each also given as its finite-sample noise floor: the same metric between two fresh
ground-truth sample sets of the same size):
  sw2   sliced Wasserstein-2 distance to fresh reference samples (512 fixed random directions)
  mmd   unbiased squared MMD, sum of RBF kernels with bandwidths 0.05, 0.2, 1 (on 2,000 points)
  mode  mode coverage error: total variation between the fraction of samples in each mode (nearest
        component, Mahalanobis radius <= 4) plus an "off every mode" bin, and the true weights
  ll    mean log-likelihood of the samples under the true density (higher is better)
With cfg > 1 the reference for sw2 and mmd is the teacher's 100-step CFG sampler, not the target.
"""
import argparse
import json

import torch

from sample import (command_line, load_run, parse_step_counts, read_run_meta, student_samples,
                    teacher_samples)
from teachers import TEACHERS, load_teacher


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
    caller) at each K in K_list (fixed labels and noise, n samples) to the JSON-lines file `path`; row 0 also
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
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        return row
    return log


def format_table(rows):
    lines = [f"{'':14s} {'sw2':>8s} {'mmd':>9s} {'mode':>7s} {'width':>6s} {'ll':>8s}"]
    for name, m in rows.items():
        cell = lambda k, f: (f"{m[k]:{f}}" if k in m else "")
        lines.append(f"{name:14s} {cell('sw2', '8.4f'):>8s} {cell('mmd', '9.5f'):>9s} {cell('mode', '7.4f'):>7s} "
                     f"{cell('width', '6.3f'):>6s} {cell('ll', '8.3f'):>8s}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Exact toy metrics for the teacher and a TDM student.")
    p.error = lambda msg: p.exit(2, f"{p.prog}: error: {msg} (--help lists the flags)\n")   # one line, no usage
    p.add_argument("run", nargs="?", help="a run folder written by train.py (omit to evaluate the teacher only)")
    p.add_argument("--teacher", default=None, help="toy | toy-exact (default: the run's, else toy)")
    p.add_argument("--toy-target", default=None, help="ring | grid | FILE.json (default: the run's, else ring)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale of the teacher (default: the run's)")
    p.add_argument("--n", type=int, default=50000, help="samples per sampler")
    p.add_argument("--teacher-steps", default="1,2,4,8,100")
    p.add_argument("--student-steps", default="1,2,4")
    p.add_argument("--seed", type=int, default=0, help="draws labels, reference and x_T; another seed = an "
                   "independent evaluation (train.py's final table uses 0)")
    p.add_argument("--solver", default="ddim", choices=["ddim", "dpm"], help="the student's sampler on its grid: "
                   "DDIM (as trained) or DPM-Solver++(2M)")
    p.add_argument("--json", default=None, help="also write the table to this JSON file")
    a = p.parse_args(argv)
    try:
        teacher_steps = parse_step_counts(a.teacher_steps, "--teacher-steps")
        student_steps = parse_step_counts(a.student_steps, "--student-steps")
    except ValueError as e:
        p.error(str(e))
    if a.n < 2:
        p.error(f"--n {a.n}: the metrics need at least 2 samples per sampler")
    if a.teacher is not None and a.teacher not in TEACHERS:
        p.error(f"--teacher {a.teacher}: expected one of {', '.join(TEACHERS)}")
    if a.teacher is not None and TEACHERS[a.teacher].OUTPUT != "points":
        p.error(f"--teacher {a.teacher}: eval.py computes the exact toy metrics only (toy, toy-exact)")
    student, meta = (None, {})
    if a.run:
        meta = read_run_meta(a.run)
        if TEACHERS[meta["teacher"]].OUTPUT != "points":
            p.error(f"{a.run!r} is a {meta['teacher']} run: eval.py computes the exact toy metrics only; "
                    "look at its previews/ or sample it with sample.py --student")
        teacher, student, meta = load_run(a.run, teacher=a.teacher, meta=meta)
        bad = [K for K in student_steps if K > meta["t_max"] + 1 or (meta.get("unify") and K not in meta["unify"])]
        if bad:
            p.error(f"--student-steps {bad}: this student samples at K <= {meta['t_max'] + 1}"
                    + (f", K in {meta['unify']} (TDM-unify)" if meta.get("unify") else ""))
    else:
        teacher = load_teacher(a.teacher or "toy", target=a.toy_target or "ring")
    cfg = a.cfg if a.cfg is not None else meta.get("cfg", 1.0)
    rows = evaluate(teacher, student, n=a.n, cfg=cfg, teacher_steps=teacher_steps, student_steps=student_steps,
                    t_max=meta.get("t_max", 899), unify=bool(meta.get("unify")), seed=a.seed, solver=a.solver)
    print(f"target {teacher.gmm.name!r}, teacher {'exact' if teacher.exact else 'MLP'}, cfg {cfg}, n {a.n}, "
          f"seed {a.seed}, student sampler {a.solver}")
    print(format_table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(cfg=cfg, n=a.n, seed=a.seed, target=teacher.gmm.name, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    command_line(main)
