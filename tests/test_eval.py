"""eval.py: the toy metrics on samples whose answer is known, evaluate / curve_logger on a short run, and the CLI
(--seed, --solver, the JSON table, errors)."""
import json
import math
import os

import pytest
import torch

import eval as ev
import sample as S
import toy
import train


#################################################################################
#                          Metrics on known samples                             #
#################################################################################

def same_row(a, b):
    """Metric rows equal, NaN (a width with no sample on a mode) equal to NaN."""
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def test_mode_metrics_on_known_samples():
    """Ground truth: mode error at the multinomial noise level, width 1; cores shrunk by 1/2: width 1/2;
    everything on one mode: error 1 - its weight, exactly. SE of the width ratio ~ 1.0 / sqrt(n) (Rayleigh median)."""
    gmm = toy.ring_target()
    n = 20000
    g = torch.Generator().manual_seed(0)
    x, _ = gmm.sample(n, generator=g)
    ref, _ = gmm.sample(n, generator=g)
    assert ev.mode_coverage_error(x, gmm) < 0.02                    # E ~ 0.0075 for 8 modes at n = 20,000
    tol = 4 * 1.0 / n ** 0.5
    width = lambda y: ev.median_radius(y, gmm) / ev.median_radius(ref, gmm)
    assert width(x) == pytest.approx(1.0, abs=tol)
    mu = gmm.means[gmm.responsibilities(x).argmax(1)].float()
    assert width(mu + 0.5 * (x - mu)) == pytest.approx(0.5, abs=tol)
    assert ev.mode_coverage_error(gmm.means[:1].float().expand(n, -1), gmm) == pytest.approx(1 - gmm.weights[0].item())
    # far off every mode: all mass in the off-mode bin, error (1 + 1) / 2 = 1; no width
    far = torch.full((100, 2), 50.0)
    assert ev.mode_coverage_error(far, gmm) == pytest.approx(1.0) and math.isnan(ev.median_radius(far, gmm))


def test_sliced_w2_of_a_shifted_copy_and_the_sorted_reference():
    """Shifting every point by d shifts each 1-D projection by theta.d, whose W2 is |theta.d|: SW2 = sqrt(mean_theta
    (theta.d)^2) over the 512 fixed unit directions, exactly (float64 sorting is shift-invariant here)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 2, generator=g)
    d = torch.tensor([0.3, -0.4])
    theta = torch.randn(2, 512, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    theta = theta / theta.norm(dim=0)
    want = (d.double() @ theta).pow(2).mean().sqrt().item()
    assert ev.sliced_w2(x + d, x) == pytest.approx(want, rel=1e-5)            # float32 x + d rounds to ~1e-7
    assert 0.3 < want < 0.4                                                   # |d| / sqrt(2) = 0.354 on average
    assert ev.sliced_w2(x, x) == 0
    # the reference sorted once gives the same number, and too few samples are refused rather than compared
    gt = torch.randn(2000, 2, generator=g)
    assert ev.sliced_w2_sorted(x, ev.sorted_projections(gt)) == ev.sliced_w2(x, gt)
    with pytest.raises(ValueError, match="1999 samples against a reference of 2000"):
        ev.sliced_w2_sorted(x[:-1], ev.sorted_projections(gt))


def test_mmd_and_loglik_on_known_samples():
    """Unbiased MMD^2 of two samples of one distribution is 0 in expectation (|value| of order 1/n: < 2e-3 over seeds
    at n = 1000); a shift by 0.3 (3 mode widths) makes it ~0.17. The mean log-likelihood of ground-truth points
    estimates minus the entropy."""
    gmm = toy.ring_target()
    g = torch.Generator().manual_seed(1)
    n = 1000
    a, b = gmm.sample(n, generator=g)[0], gmm.sample(n, generator=g)[0]
    same = ev.mmd2(a, b)
    assert abs(same) < 5e-3 and ev.mmd2(a, b + 0.3) > 0.1
    # every mode N(mu, 0.01 I) with disjoint support: log p = log(1/8) + log N, E[log N] = -log(2 pi 0.01) - 1
    want = math.log(1 / 8) - math.log(2 * math.pi * 0.01) - 1
    ll = ev.mean_loglik(a, gmm)
    assert ll == pytest.approx(want, abs=5 * 1 / n ** 0.5)                   # std of log N per point: 1
    rows = ev.metrics(a, b, gmm, ev.median_radius(b, gmm), ev.sorted_projections(b))
    assert set(rows) == {"sw2", "mmd", "mode", "width", "ll"} and rows["ll"] == ll and rows["mmd"] == same


#################################################################################
#                          Image metrics against closed forms                   #
#################################################################################

def with_moments(z, mean, cov):
    """z (n, d) -> points whose empirical mean and (unbiased) covariance are exactly `mean` and `cov`."""
    z = z.double() - z.double().mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T           # empirical covariance I
    return z @ torch.linalg.cholesky(cov).T + mean


def test_frechet_distance_is_the_closed_form_between_gaussians():
    """Point sets with exactly the given means and covariances: FD = |mu_a - mu_b|^2 + tr(S_a + S_b) -
    2 sum sqrt(eig(S_a S_b)) (the eigenvalues of the non-symmetric product, another route than eval.py's), to
    float64 round-off; diagonal covariances: sum (sqrt a_i - sqrt b_i)^2 + |mu_a - mu_b|^2; identical sets: 0."""
    g = torch.Generator().manual_seed(0)
    d = 5
    A, B = torch.randn(d, d, generator=g, dtype=torch.float64), torch.randn(d, d, generator=g, dtype=torch.float64)
    S_a, S_b = A @ A.T + 0.1 * torch.eye(d, dtype=torch.float64), B @ B.T + 0.1 * torch.eye(d, dtype=torch.float64)
    mu_a, mu_b = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    a = with_moments(torch.randn(400, d, generator=g), mu_a, S_a)
    b = with_moments(torch.randn(300, d, generator=g), mu_b, S_b)
    closed = (mu_a - mu_b).pow(2).sum() + (S_a + S_b).trace() - 2 * torch.linalg.eigvals(S_a @ S_b).real.sqrt().sum()
    assert ev.frechet_distance(a, b) == pytest.approx(closed.item(), rel=1e-9)
    va, vb = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 4.0, 1.0])
    a = with_moments(torch.randn(50, 3, generator=g), torch.zeros(3), torch.diag(va).double())
    b = with_moments(torch.randn(60, 3, generator=g), torch.ones(3), torch.diag(vb).double())
    assert ev.frechet_distance(a, b) == pytest.approx(3 + (1 + 0 + 4), rel=1e-9)     # |1|^2 x 3 + sum (sqrt diff)^2
    assert abs(ev.frechet_distance(a, a)) < 1e-9


def test_cmmd_closed_forms():
    """Identical sets: exactly 0 (the V-statistic); one point each at distance r: 1000 (2 - 2 exp(-r^2 / 200));
    two independent sets of one distribution: about the V-statistic's bias 1000 x 2 (1 - E k) / n, where unit
    vectors (|x - y|^2 <= 4) have 1 - k <= 1 - exp(-4 / 200); twice that bounds bias plus noise."""
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(200, 16, generator=g), dim=-1)
    assert ev.cmmd(x, x) == 0.0
    a, b = torch.zeros(1, 4), torch.tensor([[3.0, 0, 0, 4]])                      # r = 5
    assert ev.cmmd(a, b) == pytest.approx(1000 * (2 - 2 * math.exp(-25 / 200)), rel=1e-12)
    y = torch.nn.functional.normalize(torch.randn(200, 16, generator=g), dim=-1)
    assert 0 < ev.cmmd(x, y) < 2 * 1000 * 2 * (1 - math.exp(-4 / 200)) / 200
    z = torch.nn.functional.normalize(torch.randn(200, 16, generator=g) + 2, dim=-1)   # another distribution
    assert ev.cmmd(x, z) > 10 * ev.cmmd(x, y)


#################################################################################
#                          evaluate, curve_logger                               #
#################################################################################

@pytest.fixture(scope="module")
def run(fast_toy_teacher, tmp_path_factory):
    """A short 4-step toy run (no evaluations of its own)."""
    return train.main(["--out", str(tmp_path_factory.mktemp("runs")), "--name", "toy", "--batch", "32", "--iters", "4",
                       "--eval-every", "0", "--final-eval-n", "0", "--figure-n", "0"])


def test_evaluate_rows_and_solver(run):
    teacher, net, _ = S.load_run(run)
    rows = ev.evaluate(teacher, net, n=500, teacher_steps=(2,), student_steps=(1, 4))
    assert list(rows) == ["noise floor", "ground truth", "teacher 2", "student 1", "student 4"]
    assert set(rows["ground truth"]) == {"ll"}
    dpm = ev.evaluate(teacher, net, n=500, teacher_steps=(2,), student_steps=(1, 4), solver="dpm")
    assert same_row(dpm["teacher 2"], rows["teacher 2"]) and same_row(dpm["student 1"], rows["student 1"])  # K = 1
    assert dpm["student 4"]["sw2"] != rows["student 4"]["sw2"]
    # guidance: the reference is the teacher's own 100-step CFG sampler, and no ground-truth row
    cfg = ev.evaluate(teacher, None, n=200, cfg=2.0, teacher_steps=(4,))
    assert list(cfg) == ["noise floor", "teacher 4"]
    table = ev.format_table(rows)
    assert table.splitlines()[0].split() == ["sw2", "mmd", "mode", "width", "ll"] and len(table.splitlines()) == 6


def test_curve_logger_appends_one_row_per_call(run, tmp_path):
    teacher, net, _ = S.load_run(run)
    path = tmp_path / "metrics.jsonl"
    log = ev.curve_logger(teacher, net, (1, 4), 1.0, 899, False, str(path), n=300)
    first, second = log(0), log(10)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [first, second] and [r["iteration"] for r in rows] == [0, 10]
    assert {"teacher_sw2_4", "teacher_sw2_100", "sw2_1", "mode_1", "sw2_4", "mode_4"} == set(first) - {"iteration"}
    assert set(second) == {"iteration", "sw2_1", "mode_1", "sw2_4", "mode_4"}
    assert second["sw2_4"] == first["sw2_4"]                        # fixed labels, reference and noise
    S.curve_plot(str(path)).save(tmp_path / "curve.png")


#################################################################################
#                          The CLI                                              #
#################################################################################

def test_cli_seed_and_solver(run, tmp_path, monkeypatch):
    out = tmp_path / "m.json"
    ev.main([run, "--n", "500", "--teacher-steps", "4", "--student-steps", "1,4", "--json", str(out)])
    with open(out) as fh:
        got = json.load(fh)
    assert set(got["rows"]) == {"noise floor", "ground truth", "teacher 4", "student 1", "student 4"}
    assert got["n"] == 500 and got["target"] == "ring" and got["seed"] == 0
    assert all(math.isfinite(v) for row in got["rows"].values() for k, v in row.items()
               if not (k == "width" and row["mode"] == 1.0))       # no sample on a mode: width undefined (NaN)
    # --seed: 0 is the default evaluation; another seed draws new labels, reference and x_T for every sampler
    args = [run, "--n", "500", "--teacher-steps", "4", "--student-steps", "4"]
    assert same_row(ev.main(args + ["--seed", "0"])["student 4"], got["rows"]["student 4"])
    noise_seeds, draw = [], S.noise_and_labels
    monkeypatch.setattr(S, "noise_and_labels", lambda t, y, seed: noise_seeds.append(seed) or draw(t, y, seed))
    assert ev.main(args + ["--seed", "1"])["student 4"]["sw2"] != got["rows"]["student 4"]["sw2"]
    assert noise_seeds == [2, 2]                                        # teacher 4 and student 4, both new
    # --solver dpm: the student on its grid with DPM-Solver++; the teacher rows stay DDIM
    dpm = ev.main([run, "--n", "500", "--teacher-steps", "4", "--student-steps", "1,4", "--solver", "dpm"])
    assert same_row(dpm["teacher 4"], got["rows"]["teacher 4"]) and same_row(dpm["student 1"], got["rows"]["student 1"])
    assert dpm["student 4"]["sw2"] != got["rows"]["student 4"]["sw2"]
    teacher_only = ev.main(["--teacher", "toy-exact", "--n", "300", "--teacher-steps", "2"])
    assert list(teacher_only) == ["noise floor", "ground truth", "teacher 2"]


@pytest.mark.parametrize("argv,why", [
    (["--student-steps", "1,x"], "--student-steps '1,x': expected step counts separated by commas"),
    (["--teacher-steps", "0"], "--teacher-steps '0': step counts must be at least 1"),
    (["--n", "1"], "--n 1: the metrics need at least 2 samples per sampler"),
    (["--teacher", "nope"], "--teacher nope: expected one of toy, toy-exact, pixart, sd15, sdxl"),
    (["--teacher", "pixart"], "--teacher pixart needs --weights PATH"),
    (["--clip", "clip-vit-large-patch14"], "--clip: for image runs; the toy has exact metrics"),
    (["--batch", "0"], "--batch 0: at least 1"),
    (["--solver", "heun"], "argument --solver: invalid choice: 'heun'"),
    (["RUN", "--student-steps", "901"], "--student-steps [901]: this student samples at K <= 900")])
def test_bad_flags_exit_with_one_error_line(run, argv, why, capsys):
    argv = [run if a == "RUN" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        ev.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and why in err, err
    assert sum("error:" in line for line in err.splitlines()) == 1 and "Traceback" not in err


#################################################################################
#                          Image runs end to end                                #
#################################################################################

@pytest.fixture(scope="module")
def image_run(tmp_path_factory, tiny_pixart):
    """A 2-iteration tiny PixArt run, a tiny CLIP model folder (224 px vision tower), a tiny HPS checkpoint in
    open_clip's layout and an aesthetic predictor file for the tiny CLIP's 24-d embeddings, and 6 prompts in 2 styles."""
    from fixtures import write_tiny_aesthetic, write_tiny_clip_model, write_tiny_open_clip
    folder, prompts = tiny_pixart
    root = tmp_path_factory.mktemp("image_eval")
    run = train.main(["--teacher", "pixart", "--weights", folder, "--prompts", prompts, "--out", str(root), "--name",
                      "pixart", "--batch", "2", "--iters", "2", "--preview-every", "0", "--save-every", "2"])
    write_tiny_clip_model(root / "clip")
    write_tiny_open_clip(root / "hps" / "HPS_v2.1_compressed.pt", hps=True)
    write_tiny_aesthetic(root / "aesthetic.pth")
    table = root / "prompts.txt"
    table.write_text("# two styles\n" + "".join(f"{s}\ta {w} in the {s} style\n" for s in ("photo", "painting")
                                                for w in ("fox", "lighthouse", "bowl of ramen")))
    return run, root, str(table)


def test_image_eval_writes_the_metrics_table_and_side_by_side(image_run):
    """eval.py RUN on images: rows teacher 25-step DPM with CFG (NFE 50), student K DDIM and DPM (NFE 4); every
    metric in range (HPS, CLIP score: 100 x cosine; aesthetic finite), FD / CMMD only for the students, >= 0; the
    speed-up over the teacher ~ the NFE ratio on the network alone; metrics.json, table.md and the PNG written."""
    run, root, prompts = image_run
    rows = ev.main([run, "--prompts", prompts, "--clip", str(root / "clip"), "--hps",
                    str(root / "hps" / "HPS_v2.1_compressed.pt"), "--aesthetic", str(root / "aesthetic.pth"),
                    "--batch", "4", "--teacher-steps", "5"])
    names = list(rows)
    assert names == ["teacher 5-step DPM, cfg 4.5", "student 4-step DDIM", "student 4-step DPM"]
    assert [rows[n]["nfe"] for n in names] == [10, 4, 4] and all(r["n"] == 6 for r in rows.values())
    for name, r in rows.items():
        assert -100 <= r["hps"] <= 100 and 0 <= r["clip"] <= 100 and math.isfinite(r["aesthetic"])
        assert set(r["hps_by_style"]) == {"photo", "painting"}
        assert ("fd" in r) == ("cmmd" in r) == name.startswith("student")
    assert all(rows[n]["fd"] >= -1e-6 and rows[n]["cmmd"] >= 0 for n in names[1:])
    assert rows[names[0]]["speedup_net"] == 1.0 and rows[names[1]]["speedup_net"] > 1.0
    out = os.path.join(run, "eval")
    saved = json.load(open(os.path.join(out, "metrics.json")))
    assert saved["n"] == 6 and list(saved["rows"]) == names
    table = open(os.path.join(out, "table.md")).read()
    assert table.count("\n| ") == 3 and "6 images per side" in table
    from PIL import Image
    assert Image.open(os.path.join(out, "side_by_side.png")).size == (2 * 64 + 2, 4 * 64 + 3 * 2)   # 2 samplers


def test_image_eval_without_feature_weights_says_which_files_it_wants(image_run, capsys):
    run, root, prompts = image_run
    rows = ev.main([run, "--prompts", prompts, "--n", "2", "--teacher-steps", "2", "--out", str(root / "bare")])
    out = capsys.readouterr().out
    assert "not measuring hps: it needs --hps HPS_v2.1_compressed.pt" in out and "--aesthetic" in out
    assert all("hps" not in r and "fd" not in r for r in rows.values())
    with pytest.raises(ValueError, match="--aesthetic scores CLIP ViT-L/14 image embeddings: give --clip"):
        ev.main([run, "--prompts", prompts, "--n", "2", "--aesthetic", str(root / "aesthetic.pth")])


@pytest.mark.parametrize("style", ["sd15", "sdxl"])
def test_image_eval_of_sd_runs(style, tmp_path, image_run):
    """The same evaluation on the SD teachers (tiny folders): the teacher row at NFE 2 x steps, the LoRA student's
    rows, CLIP score and the distance to the teacher."""
    from fixtures import write_tiny_sd
    _, root, prompts = image_run
    folder = write_tiny_sd(tmp_path / style, style)
    run = train.main(["--teacher", style, "--weights", folder, "--prompts", prompts, "--out", str(tmp_path), "--name",
                      "run", "--batch", "2", "--iters", "1", "--lora", "4", "--resolution", "64",
                      "--preview-every", "0"])
    rows = ev.main([run, "--prompts", prompts, "--n", "3", "--teacher-steps", "2", "--clip", str(root / "clip")])
    cfg = {"sd15": "3.5", "sdxl": "8"}[style]
    assert list(rows) == [f"teacher 2-step DPM, cfg {cfg}", "student 4-step DDIM", "student 4-step DPM"]
    assert all(0 <= r["clip"] <= 100 for r in rows.values()) and rows["student 4-step DDIM"]["cmmd"] >= 0
