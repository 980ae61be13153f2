"""sample.py: DPM-Solver++(2M) against diffusers' DPMSolverMultistepScheduler, the student's samplers, run folders loaded
back (including runs written in older layouts), and the sampling CLI with its errors. `§N` is docs/method.md's
section N (§10: sampling the student).
"""
import os

import diffusers
import pytest
import torch

import sample as S
import tdm
import teachers
import toy
import train
from fixtures import assert_png, to_flat_unify_run
from models import StepCountEmbedding

diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()
TOL = 1e-5


#################################################################################
#                          DPM-Solver++ (§10)                                   #
#################################################################################

def diffusers_solve(scheduler, model_output, x_T, n_steps):
    """The diffusers sampling loop: model_output(x, t) is what the scheduler's prediction_type expects."""
    scheduler.set_timesteps(n_steps)
    x = x_T.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(model_output(x, torch.full((x.shape[0],), int(t))), t, x).prev_sample
    return x, scheduler.timesteps.tolist()


class SmoothLatentModel:
    """A deterministic, well-conditioned denoiser on (B, 4, 8, 8) latents: the exact posterior mean for data
    N(mu, 0.25 I), plus a small smooth nonlinearity. x0(x, t) for ours and diffusers' 'sample'; eps(x, t) for
    diffusers' 'epsilon' (converted with the float64 schedule)."""

    def __init__(self, schedule, seed=4):
        g = torch.Generator().manual_seed(seed)
        self.schedule = schedule
        self.mu, self.w = torch.randn(1, 4, 8, 8, generator=g) * 0.5, torch.randn(4, 4, generator=g) * 0.3

    def _as(self, t, x):
        shape = (-1, 1, 1, 1)
        return self.schedule.alpha(t).reshape(shape).to(x.dtype), self.schedule.sigma(t).reshape(shape).to(x.dtype)

    def x0(self, x, t):
        a, s = self._as(t, x)
        lin = self.mu + a * 0.25 / (a ** 2 * 0.25 + s ** 2) * (x - a * self.mu)
        return lin + 0.1 * s * torch.tanh(torch.einsum("oc,bchw->bohw", self.w.to(x.dtype), lin))

    def eps(self, x, t):
        a, s = self._as(t, x)
        return (x - a * self.x0(x, t)) / s


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("n_steps", [4, 20])
def test_dpm_solver_pp_matches_diffusers(n_steps, spacing, final):
    """Same timesteps, same orders (first step and, at few steps, last step first order), same result."""
    schedule = tdm.Schedule("linear", 1e-4, 0.02)
    model = SmoothLatentModel(schedule)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    ours = S.dpm_solver_pp(lambda x, t, c: model.x0(x, t), x_T, None, schedule, n_steps, spacing=spacing, final=final)
    make = lambda: diffusers.DPMSolverMultistepScheduler(
        beta_start=1e-4, beta_end=0.02, beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2,
        lower_order_final=True, prediction_type="sample", timestep_spacing=spacing, final_sigmas_type=final)
    ref, ts = diffusers_solve(make(), model.x0, x_T, n_steps)
    assert ts == S.dpm_timesteps(n_steps, spacing=spacing)
    err = stock = (ours - ref).abs().max().item()
    if final == "sigma_min":
        # diffusers computes sigma at t = 0, sqrt((1 - abar_0) / abar_0), from float32 abar_0 = 0.9999: the
        # subtraction keeps ~3 digits (3e-4 relative), about 1e-5 on x. Give it the float64 table to compare the
        # algorithm itself.
        sch = make()
        sch.set_timesteps(n_steps)
        ac = schedule.alphas_cumprod
        table = ((1 - ac) / ac).sqrt()
        sch.sigmas = torch.cat([table[sch.timesteps], table[:1]]).float()
        x = x_T.clone()
        for t in sch.timesteps:
            x = sch.step(model.x0(x, torch.full((2,), int(t))), t, x).prev_sample
        err = (ours - x).abs().max().item()
        assert stock < 3e-5
    print(f"{n_steps} steps {spacing} final={final}: timesteps {ts[:5]}; max|diff| {err:.1e} (stock diffusers "
          f"{stock:.1e}; |x| max {ref.abs().max():.1f})")
    assert err < TOL


@pytest.mark.parametrize("n_steps", [4, 20])
def test_dpm_solver_pp_matches_diffusers_on_exact_gmm(n_steps):
    """The exact ring-GMM denoiser (2-D points, 2 classes and the null class), diffusers in 'sample' mode."""
    gmm, schedule = toy.ring_target(), tdm.Schedule("linear", 1e-4, 0.02)
    labels = torch.arange(64) % 3
    denoise = lambda x, t, c: gmm.denoise(x, schedule.alpha(t), schedule.sigma(t), c)
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    ours = S.dpm_solver_pp(denoise, x_T, labels, schedule, n_steps)
    sch = diffusers.DPMSolverMultistepScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                                                algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
                                                prediction_type="sample")
    ref, ts = diffusers_solve(sch, lambda x, t: denoise(x, t, labels), x_T, n_steps)
    assert ts == S.dpm_timesteps(n_steps)
    err = (ours - ref).abs().max().item()
    print(f"GMM {n_steps} steps: max|diff| {err:.1e}")
    assert err < TOL


@pytest.mark.parametrize("n_steps", [4, 20])
def test_dpm_solver_pp_matches_pipeline_scheduler_config(tiny_pixart, n_steps):
    """diffusers' scheduler loaded from the folder's PixArt scheduler_config.json (epsilon prediction, linspace)."""
    sch = diffusers.DPMSolverMultistepScheduler.from_pretrained(os.path.join(tiny_pixart[0], "scheduler"))
    schedule = tdm.Schedule("linear", 1e-4, 0.02)
    model = SmoothLatentModel(schedule)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    ours = S.dpm_solver_pp(lambda x, t, c: model.x0(x, t), x_T, None, schedule, n_steps)
    ref, ts = diffusers_solve(sch, model.eps, x_T, n_steps)
    assert ts == S.dpm_timesteps(n_steps) and (n_steps != 4 or ts == [999, 749, 500, 250])
    err = (ours - ref).abs().max().item()
    print(f"PixArt scheduler config (epsilon), {n_steps} steps: max|diff| {err:.1e}")
    assert err < TOL


def test_dpm_solver_pp_student_grid_and_first_order_is_ddim():
    """timesteps=tdm.time_grid(K) works; with 1 step (first order, final x0) it is the K=1 DDIM student sampler."""
    schedule = tdm.Schedule("linear", 1e-4, 0.02)
    assert S.dpm_timesteps(4, t_max=899, spacing="trailing") == tdm.time_grid(4, 899)
    gmm = toy.ring_target()
    denoise = lambda x, t, c: gmm.denoise(x, schedule.alpha(t), schedule.sigma(t), c)
    x_T, labels = torch.randn(16, 2, generator=torch.Generator().manual_seed(6)), torch.zeros(16, dtype=torch.long)
    for K in (1, 2):
        a = S.dpm_solver_pp(denoise, x_T, labels, schedule, K, timesteps=tdm.time_grid(K, 899))
        b = tdm.sample(denoise, x_T, labels, schedule, tdm.time_grid(K, 899))
        assert (a - b).abs().max() < TOL                      # 1-2 steps: DPM-Solver++ is first order throughout


def test_teacher_sampler_is_cfg_ddim_or_dpm_from_999():
    """sample.teacher_sample: N-step DDIM on tdm.time_grid(N, 999) (trailing), or DPM-Solver++ on diffusers'
    linspace timesteps, both on the CFG-combined x0 of one batched call per step."""
    gmm = toy.ring_target()
    schedule = tdm.Schedule()
    teacher = type("T", (), dict(schedule=schedule, denoise=lambda self, x, t, c: gmm.denoise(
        x, schedule.alpha(t), schedule.sigma(t), c)))()
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(8))
    cond, uncond = torch.arange(64) % 2, torch.full((64,), 2)
    guided = lambda x, t, c: tdm.cfg_denoise(teacher.denoise, x, t, c, uncond, 3.0)
    assert torch.equal(S.teacher_sample(teacher, x_T, cond, uncond, 5, cfg=3.0),
                       tdm.sample(guided, x_T, cond, schedule, tdm.time_grid(5, 999)))
    assert torch.equal(S.teacher_sample(teacher, x_T, cond, uncond, 5, cfg=3.0, solver="dpm"),
                       S.dpm_solver_pp(guided, x_T, cond, schedule, 5))
    assert not torch.equal(S.teacher_sample(teacher, x_T, cond, uncond, 5, cfg=1.0),
                           S.teacher_sample(teacher, x_T, cond, uncond, 5, cfg=3.0))


def test_dpm_solver_pp_bad_arguments():
    sch = tdm.Schedule()
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="strictly decreasing"):
        S.dpm_solver_pp(lambda x, t, c: x, x, None, sch, 2, timesteps=[500, 700])
    with pytest.raises(ValueError, match=r"strictly decreasing integers in \[0, 999\]"):
        S.dpm_solver_pp(lambda x, t, c: x, x, None, sch, 2, timesteps=[1000, 500])
    with pytest.raises(ValueError, match="spacing"):
        S.dpm_timesteps(4, spacing="leading")
    with pytest.raises(ValueError, match="n_steps must be >= 1"):
        S.dpm_timesteps(0)
    with pytest.raises(ValueError, match="'sigma_min' with a last timestep above 0"):
        S.dpm_solver_pp(lambda x, t, c: x, x, None, sch, 2, timesteps=[500, 0], final="sigma_min")


#################################################################################
#                          Runs, the student's samplers                         #
#################################################################################

@pytest.fixture(scope="module")
def runs(fast_toy_teacher, tmp_path_factory):
    """Two short toy runs: a 4-step student, and a TDM-unify student for K in {1, 2, 4}."""
    root = tmp_path_factory.mktemp("runs")
    common = ["--out", str(root), "--batch", "32", "--iters", "4", "--eval-every", "0", "--final-eval-n", "0",
              "--figure-n", "0"]
    return dict(plain=train.main(common + ["--name", "plain"]),
                unify=train.main(common + ["--name", "unify", "--unify", "1,2,4"]))


def _points(teacher, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = teacher.sample_labels(n, g)
    return torch.randn(n, 2, generator=g), teacher.encode(labels)


def test_load_run(runs, tmp_path):
    teacher, net, meta = S.load_run(runs["plain"])
    assert isinstance(teacher, teachers.ToyTeacher) and not teacher.exact and meta["K"] == 4 and meta["unify"] == []
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert net.state_dict().keys() == teacher.network.state_dict().keys()
    exact, net2, _ = S.load_run(runs["plain"], teacher="toy-exact")          # another teacher, the same student
    assert exact.exact and all(torch.equal(v, net2.state_dict()[k]) for k, v in net.state_dict().items())
    _, unify, meta = S.load_run(runs["unify"])
    assert isinstance(unify, StepCountEmbedding) and unify.step_counts == meta["unify"] == [1, 2, 4]
    assert unify.table.weight.abs().sum() > 0                                 # it trained (the EMA moved too)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="student.safetensors"):
        S.load_run(str(empty))


def test_load_run_of_a_run_written_with_the_step_embedding_inside_the_network(runs, tmp_path):
    """A TDM-unify run from before StepCountEmbedding: flat keys with `step_emb.weight`, and student.json's `network`
    holding `step_counts`. It loads as the same student and samples the same points."""
    import shutil
    old = to_flat_unify_run(shutil.copytree(runs["unify"], tmp_path / "old"))
    meta = S.read_run_meta(old)
    assert meta["network"]["step_counts"] == [1, 2, 4]
    assert "step_emb.weight" in S.read_state_dict(os.path.join(old, "student.safetensors"))
    teacher, new_net, _ = S.load_run(runs["unify"])
    _, old_net, _ = S.load_run(old)
    assert old_net.state_dict().keys() == new_net.state_dict().keys()
    assert all(torch.equal(v, new_net.state_dict()[k]) for k, v in old_net.state_dict().items())
    x_T, cond = _points(teacher)
    for K in (1, 2, 4):
        assert torch.equal(S.student_sample(teacher, old_net, x_T, cond, K, unify=True),
                           S.student_sample(teacher, new_net, x_T, cond, K, unify=True))


def test_student_samplers_on_the_grid(runs):
    """The student's K-step sampler on tdm.time_grid(K) (§10): DDIM is tdm.sample on the student's x0; DPM-Solver++
    uses the same K network calls, first order at K = 1 (exactly the DDIM output: one x0 prediction), second order
    from the second step on (K = 4 differs)."""
    teacher, net, _ = S.load_run(runs["plain"])
    x_T, cond = _points(teacher)
    calls = []
    counted = lambda x, t, c, K: calls.append(t[0].item()) or teacher.x0(net, x, t, c, K)
    ddim = S.student_sample(teacher, net, x_T, cond, 4)
    with torch.no_grad():
        assert torch.equal(ddim, tdm.sample(tdm.with_step_count(counted, 4, False), x_T, cond, teacher.schedule,
                                            tdm.time_grid(4)))
    assert calls == [899, 674, 449, 224]
    assert torch.equal(S.student_sample(teacher, net, x_T, cond, 1, solver="dpm"),
                       S.student_sample(teacher, net, x_T, cond, 1))
    dpm4 = S.student_sample(teacher, net, x_T, cond, 4, solver="dpm")
    assert (dpm4 - ddim).abs().max() > 1e-3
    denoise = S.student_denoiser(teacher, net, 4)
    assert torch.equal(dpm4, S.dpm_solver_pp(denoise, x_T, cond, teacher.schedule, 4, timesteps=tdm.time_grid(4)))
    # a TDM-unify student gets K as its condition: another K, another function at the same grid time
    teacher, unify, _ = S.load_run(runs["unify"])
    with torch.no_grad():
        t = torch.full((len(x_T),), 899)
        one, four = (S.student_denoiser(teacher, unify, K, unify=True)(x_T, t, cond) for K in (1, 4))
    assert (one - four).abs().max() > 0


#################################################################################
#                          The CLI                                              #
#################################################################################

def test_cli(runs, tmp_path, monkeypatch, capsys):
    sampled, real = [], S.student_sample
    monkeypatch.setattr(S, "student_sample", lambda *a, **k: sampled.append(real(*a, **k)) or sampled[-1])
    S.main(["--student", runs["plain"], "--steps", "1", "--n", "500", "--out", str(tmp_path / "s.png")])
    S.main(["--teacher", "toy-exact", "--steps", "8", "--n", "500", "--out", str(tmp_path / "t.png")])
    assert_png(tmp_path / "s.png")
    assert_png(tmp_path / "t.png")
    # --solver dpm for a student: at K = 1 exactly the DDIM sample, at K = 4 another one
    for K in ("1", "4"):
        for solver in ("ddim", "dpm"):
            out = tmp_path / f"s{K}_{solver}.png"
            S.main(["--student", runs["plain"], "--steps", K, "--n", "500", "--solver", solver, "--out", str(out)])
            assert_png(out)
            assert f"student {K} step{'s' * (K != '1')} {solver.upper()}" in capsys.readouterr().out
    assert len(sampled) == 5 and all(x.shape == (500, 2) for x in sampled)
    assert torch.equal(sampled[1], sampled[2]) and torch.equal(sampled[0], sampled[1])   # K = 1: dpm = ddim
    assert (sampled[3] - sampled[4]).abs().max() > 1e-3                                   # K = 4: they differ
    S.main(["--student", runs["unify"], "--steps", "2", "--n", "500", "--solver", "dpm", "--out", str(tmp_path / "u.png")])
    assert_png(tmp_path / "u.png")


@pytest.mark.parametrize("argv,why", [
    (["--teacher", "toy", "--steps", "0"], "--steps 0: the number of sampling steps must be at least 1"),
    (["--teacher", "toy", "--n", "0"], "--n 0: draw at least one point"),
    (["--teacher", "toy", "--solver", "heun"], "argument --solver: invalid choice: 'heun'"),
    (["--teacher", "pixart", "--toy-target", "grid"], "--toy-target is for the toy teachers, not --teacher pixart"),
    (["--steps", "4"], "one of the arguments --teacher --student is required"),
    (["plain", "--steps", "901"], "--steps 901: the student's grid starts at t = 899, so at most 900 steps fit"),
    (["unify", "--steps", "3"], "--steps 3: this TDM-unify student was trained for K in [1, 2, 4]"),
    (["plain", "--cfg", "2"], "--cfg is for teachers: a TDM student samples without guidance")])
def test_bad_flags_exit_with_one_error_line(runs, argv, why, capsys, tmp_path):
    if argv[0] in runs:
        argv = ["--student", runs[argv[0]], *argv[1:]]
    with pytest.raises(SystemExit) as e:
        S.main(argv + ["--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and why in err, err
    assert sum("error:" in line for line in err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()
