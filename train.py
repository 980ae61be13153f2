"""TDM training: build teacher, student and fake score, then call tdm.tdm_step once per iteration.

    python train.py                                  # toy: 8-mode ring, 4-step student, ~2 minutes on 2 CPU cores
    python train.py --toy-target grid --unify 1,2,4  # one student for 1, 2 and 4 steps
    python train.py --resume runs/toy --iters 4000   # continue a run exactly

Writes runs/<name>/: student.safetensors + student.json (the student to sample), ckpt.safetensors +
ckpt.json (everything needed to resume), metrics.jsonl (the metric curve), metrics.json, figure.png.
"""
import argparse
import copy
import json
import math
import os
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

import eval as ev
import sample
import tdm
import teachers
from models import read_state_dict, save_safetensors


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Distil a diffusion teacher into a K-step student with TDM.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("teacher and run")
    g.add_argument("--teacher", default="toy", help="toy (MLP fitted to the target) | toy-exact (closed-form GMM)")
    g.add_argument("--toy-target", default="ring", help="ring | grid | FILE.json (means, covs|stds, weights, classes)")
    g.add_argument("--name", default=None, help="run folder name under --out (default: toy-<target>)")
    g.add_argument("--out", default="runs")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--iters", type=int, default=2000, help="total iterations (also the target when resuming)")
    g.add_argument("--resume", default=None, help="a run folder to continue from its ckpt.safetensors")
    g = p.add_argument_group("TDM (tdm-method.md Sec. 8; defaults = official code unless noted)")
    g.add_argument("--steps", type=int, default=4, help="student steps K")
    g.add_argument("--unify", default="", help="TDM-unify: step counts to support, e.g. 1,2,4 (K drawn per batch)")
    g.add_argument("--t-max", type=int, default=899, help="first grid time: 899 official, 999 = paper's uniform grid")
    g.add_argument("--cfg", type=float, default=1.0, help="guidance of the teacher score (official PixArt: 4.5)")
    g.add_argument("--shared-interval", action="store_true", help="tau in [t_m, T) instead of the step's own interval")
    g.add_argument("--randmid", action="store_true", help="random landing time (official --use_randmid)")
    g.add_argument("--no-importance", action="store_true", help="drop the importance weight from the fake loss")
    g.add_argument("--loss", default="huber", choices=["huber", "mse"], help="generator loss")
    g.add_argument("--huber-c", type=float, default=1e-3)
    g.add_argument("--snr-clamp", type=float, default=5.0, help="fake-loss weight min(SNR, this)")
    g.add_argument("--fake-updates", type=int, default=1, help="fake-score updates per generator update")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch", type=int, default=512)
    g.add_argument("--lr-fake", type=float, default=3e-4, help="fake-score lr (official PixArt 2e-5)")
    g.add_argument("--lr-ratio", type=float, default=5.0, help="generator lr = lr-fake / this (official 5, paper 10)")
    g.add_argument("--beta1", type=float, default=0.0)
    g.add_argument("--beta2", type=float, default=0.95, help="official 0.95, paper 0.999")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup", type=int, default=50, help="generator lr warm-up iterations")
    g.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"], help="generator lr after warm-up")
    g.add_argument("--grad-clip", type=float, default=1.0, help="student grad-norm clip (fake: none, as official)")
    g.add_argument("--ema", type=float, default=0.995, help="student EMA decay (0 = off; official off); the EMA "
                   "is what is saved and evaluated")
    g = p.add_argument_group("logging")
    g.add_argument("--eval-every", type=int, default=200, help="iterations between metric-curve points (0 = off)")
    g.add_argument("--eval-n", type=int, default=20000, help="samples per curve point")
    g.add_argument("--final-eval-n", type=int, default=50000, help="samples for the final metrics (0 = skip)")
    g.add_argument("--save-every", type=int, default=1000)
    return p.parse_args(argv)


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
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


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
#                          Training                                             #
#################################################################################

def main(argv=None):
    args = parse_args(argv)
    resume_state = None
    if args.resume:
        resume_state, old = load_checkpoint(args.resume)
        keep = {"iters", "resume", "eval_every", "eval_n", "final_eval_n", "save_every"}
        args = argparse.Namespace(**{**old["args"], **{k: v for k, v in vars(args).items() if k in keep}})
        args.name, args.out = os.path.basename(os.path.normpath(args.resume)), os.path.dirname(
            os.path.normpath(args.resume)) or "."
    run_dir = os.path.join(args.out, args.name or f"toy-{os.path.splitext(os.path.basename(args.toy_target))[0]}")
    os.makedirs(run_dir, exist_ok=True)
    unify = tuple(int(k) for k in args.unify.split(",") if k) if args.unify else ()
    torch.manual_seed(args.seed)

    # Teacher, student and fake score: student and fake start as copies of the teacher network (Sec. 4.1),
    # with a zero-initialised step-count embedding under TDM-unify, so at step 0 student = fake = teacher.
    teacher = teachers.load_teacher(args.teacher, target=args.toy_target, log=tqdm.write)
    student = teachers.copy_network(teacher.network, unify)
    fake = teachers.copy_network(teacher.network, unify)
    ema = copy.deepcopy(student).requires_grad_(False) if args.ema > 0 else None
    betas = (args.beta1, args.beta2)
    lr_student = args.lr_fake / args.lr_ratio
    opt_student = torch.optim.AdamW(student.parameters(), lr=lr_student, betas=betas, weight_decay=args.weight_decay)
    opt_fake = torch.optim.AdamW(fake.parameters(), lr=args.lr_fake, betas=betas, weight_decay=args.weight_decay)
    config = tdm.TDMConfig(K=args.steps, t_max=args.t_max, unify=unify, cfg=args.cfg,
                           separate=not args.shared_interval, randmid=args.randmid,
                           importance=not args.no_importance, loss=args.loss, huber_c=args.huber_c,
                           snr_clamp=args.snr_clamp, fake_updates=args.fake_updates, grad_clip=args.grad_clip)
    start = 0
    if resume_state is not None:
        student.load_state_dict(resume_state["student"])
        fake.load_state_dict(resume_state["fake"])
        opt_student.load_state_dict(resume_state["opt_student"])
        opt_fake.load_state_dict(resume_state["opt_fake"])
        if ema is not None:
            ema.load_state_dict(resume_state["ema"])
        torch.set_rng_state(resume_state["rng"])
        start = int(resume_state["iteration"])

    def lr_at(i):   # generator: linear warm-up, then constant or cosine (official: cosine, 50 warm-up steps)
        warm = min(1.0, (i + 1) / max(1, args.warmup))
        if args.lr_schedule == "cosine":
            warm *= 0.5 * (1 + math.cos(math.pi * min(1.0, i / max(1, args.iters))))
        return lr_student * warm

    x0_of = lambda net: (lambda x, t, c, K: teacher.x0(net, x, t, c, K))      # network -> x0 denoiser
    meta = lambda it: dict(teacher=args.teacher, target=args.toy_target, network=student.config, t_max=args.t_max,
                           K=args.steps, unify=list(unify), grid=tdm.time_grid(args.steps, args.t_max), cfg=args.cfg,
                           iteration=it, args=vars(args), tdm=asdict(config))

    def state(it):
        s = dict(student=student.state_dict(), fake=fake.state_dict(), opt_student=opt_student.state_dict(),
                 opt_fake=opt_fake.state_dict(), rng=torch.get_rng_state(), iteration=torch.tensor(it))
        if ema is not None:
            s["ema"] = ema.state_dict()
        return s

    # The metric curve: the student's SW2 / mode error at each K on fixed labels and noise, plus the
    # teacher's 4-step and 100-step samplers on the same reference as horizontal lines.
    curve_labels = teacher.sample_labels(args.eval_n, torch.Generator().manual_seed(123))
    curve_ref = teacher.gmm.sample(args.eval_n, labels=curve_labels, generator=torch.Generator().manual_seed(124))[0] \
        if args.cfg == 1.0 else ev.teacher_samples(teacher, curve_labels, 100, args.cfg, seed=125)

    def quick_eval(it):
        net = ema if ema is not None else student
        row = {"iteration": it}
        if it == 0:
            for N in (4, 100):
                row[f"teacher_sw2_{N}"] = ev.sliced_w2(ev.teacher_samples(teacher, curve_labels, N, args.cfg), curve_ref)
        for K in (unify or (args.steps,)):
            x = ev.student_samples(teacher, net.eval(), curve_labels, K, args.t_max, bool(unify))
            row[f"sw2_{K}"] = ev.sliced_w2(x, curve_ref)
            row[f"mode_{K}"] = ev.mode_coverage_error(x, teacher.gmm)
        net.train()
        with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    if start == 0:
        open(os.path.join(run_dir, "metrics.jsonl"), "w").close()
        if args.eval_every:
            quick_eval(0)
    t0 = time.time()
    bar = tqdm(range(start, args.iters), initial=start, total=args.iters, desc="TDM", dynamic_ncols=True)
    for it in bar:
        for group in opt_student.param_groups:
            group["lr"] = lr_at(it)
        labels = teacher.sample_labels(args.batch)
        logs = tdm.tdm_step(x0_of(student), x0_of(fake), teacher, teacher.encode(labels),
                            teacher.uncond(args.batch), opt_student, opt_fake, config)
        if ema is not None:
            with torch.no_grad():
                for pe, ps in zip(ema.parameters(), student.parameters()):
                    pe.lerp_(ps, 1 - args.ema)
        bar.set_postfix(fake=f"{logs['loss_fake']:.4f}", gen=f"{logs['loss_gen']:.4f}", K=logs["K"])
        done = it + 1
        if args.eval_every and done % args.eval_every == 0:
            row = quick_eval(done)
            tqdm.write(f"iter {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "iteration"))
        if done % args.save_every == 0 or done == args.iters:
            save_checkpoint(run_dir, state(done), meta(done))
    train_time = time.time() - t0

    # Final figure and metrics.
    net = (ema if ema is not None else student).eval()
    if args.final_eval_n:
        rows = ev.evaluate(teacher, net, n=args.final_eval_n, cfg=args.cfg, t_max=args.t_max, unify=bool(unify),
                           student_steps=unify or (1, 2, 4))
        print(ev.format_table(rows))
        _write_json(dict(rows=rows, cfg=args.cfg, train_seconds=train_time, iters=args.iters),
                    os.path.join(run_dir, "metrics.json"))
    figure(teacher, net, args, unify).save(os.path.join(run_dir, "figure.png"))
    if args.eval_every:
        curve(os.path.join(run_dir, "metrics.jsonl")).save(os.path.join(run_dir, "curve.png"))
    print(f"wrote {run_dir}/ (student.safetensors, figure.png, metrics.json); training took {train_time:.0f} s")
    return run_dir


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
    Kc = torch.full((n,), K) if unify else None
    xs, x0s, _ = tdm.rollout(lambda x, t, c: teacher.x0(net, x, t, c, None if Kc is None else Kc[:len(x)]),
                             torch.randn(n, 2, generator=torch.Generator().manual_seed(9)), labels,
                             teacher.schedule, tdm.time_grid(K, args.t_max))
    panels.append(sample.trajectory_panel(xs + [x0s[-1]], labels, title=f"student trajectory ({K} steps)"))
    return sample.hstack(panels)


if __name__ == "__main__":
    main()
