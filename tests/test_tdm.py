"""Sanity checks of the TDM maths (tdm.py) against closed forms: schedule, time grid, DDIM and re-diffusion kernels,
the student's rollout, tau sampling, importance weight, losses, one tdm_step end to end on a Gaussian target.

Every assertion compares against a value derived from the maths; each tolerance is derived in a comment next to
it (Monte-Carlo standard error x 5, float32 rounding bounds, or an explicit optimisation tolerance). `§N` is
docs/method.md's section N, `Eq. (N)` the paper's equation N. tests/test_tdm_maths.py holds the tests of the
method's less visible properties (guidance, step frequency, the importance weight's effect).
"""
import math

import pytest
import torch

import eval as ev
import tdm
import teachers
import toy
from fixtures import alpha_sigma as _at
from models import ToyMLP, timestep_embedding
from sample import student_x0

EPS32 = torch.finfo(torch.float32).eps   # 1.19e-7


def _rotated_gaussian():
    """mu = (1, -0.5), Sigma = R(30 deg) diag(0.5^2, 0.2^2) R^T: a non-isotropic, non-diagonal 2-D Gaussian."""
    mu = torch.tensor([1.0, -0.5], dtype=torch.float64)
    th = math.radians(30)
    R = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]], dtype=torch.float64)
    return mu, R @ torch.diag(torch.tensor([0.5 ** 2, 0.2 ** 2], dtype=torch.float64)) @ R.T


def _exact_teacher(gmm):
    """The closed-form GMM teacher (teachers.ExactToyTeacher); its MLP (a tiny untrained one here) is only what
    student and fake would be copied from, and is not called."""
    return teachers.ExactToyTeacher(gmm, ToyMLP(dim=gmm.dim, n_classes=gmm.n_classes, width=8, depth=1))



#################################################################################
#  1. Noise schedule                                                            #
#################################################################################

def test_linear_schedule_matches_reference_table():
    sch = tdm.Schedule("linear", 1e-4, 0.02)
    # The table of docs/method.md §1: alpha, sigma printed to 4 decimals (half a unit: 5e-5, + float32 ~1e-7);
    # SNR printed to 1-3 significant figures: half a unit of the last printed digit (SNR_449 = 0.14546: 0.145).
    table = {999: (0.0064, 1.0000, 4e-5, 0.5e-5), 899: (0.0166, 0.9999, 2.8e-4, 0.05e-4),
             674: (0.0993, 0.9951, 0.0100, 0.5e-4), 449: (0.3564, 0.9344, 0.145, 0.5e-3),
             224: (0.7690, 0.6392, 1.45, 0.5e-2), 20: (0.9969, 0.0791, 159, 0.5)}
    t = torch.tensor(list(table))
    alpha, sigma, snr = sch.alpha(t), sch.sigma(t), sch.snr(t)
    for i, (a, s, r, r_tol) in enumerate(table.values()):
        assert abs(alpha[i].item() - a) <= 5e-5 + 1e-6, (t[i], alpha[i], a)
        assert abs(sigma[i].item() - s) <= 5e-5 + 1e-6, (t[i], sigma[i], s)
        assert abs(snr[i].item() - r) <= r_tol, (t[i], snr[i], r)
    # the min(SNR, 5) clamp bites exactly below t = 130 (§1)
    assert sch.snr(torch.tensor([130])).item() < 5 < sch.snr(torch.tensor([129])).item()
    # VP identities on every timestep; float32 outputs -> a few ulps
    t = torch.arange(1000)
    a, s = sch.alpha(t).double(), sch.sigma(t).double()
    assert torch.allclose(a ** 2 + s ** 2, torch.ones(1000, dtype=torch.float64), atol=4 * EPS32, rtol=0)
    assert torch.allclose(sch.snr(t).double(), a ** 2 / s ** 2, rtol=8 * EPS32, atol=0)
    assert (a[1:] < a[:-1]).all()                                       # strictly decreasing signal


def test_schedules_match_diffusers():
    DDPMScheduler = pytest.importorskip("diffusers").DDPMScheduler
    for kind, b0, b1 in (("scaled_linear", 0.00085, 0.012), ("linear", 1e-4, 0.02)):
        ref = DDPMScheduler(num_train_timesteps=1000, beta_start=b0, beta_end=b1, beta_schedule=kind).alphas_cumprod
        ours = tdm.Schedule(kind, b0, b1).alphas_cumprod
        assert ours.dtype == torch.float64
        # diffusers computes in float32: a cumulative product of 1000 float32 factors carries at most
        # ~1000 roundings of 2^-24 each, so relative error <= 1000 * 2^-24 = 6e-5 (typically ~1e-6).
        assert torch.allclose(ours, ref.double(), rtol=1000 * 2.0 ** -24, atol=0), kind
    # the two kinds really differ (so the comparison above can tell them apart)
    assert (tdm.Schedule("scaled_linear", 0.00085, 0.012).alphas_cumprod
            - tdm.Schedule("linear", 0.00085, 0.012).alphas_cumprod).abs().max() > 1e-2
    with pytest.raises(ValueError, match="beta schedule"):
        tdm.Schedule("cosine")


#################################################################################
#  2. Time grid                                                                 #
#################################################################################

def test_time_grid_and_landing_times():
    assert tdm.time_grid(4, 899) == [899, 674, 449, 224]             # official code (§2)
    assert tdm.time_grid(4, 999) == [999, 749, 499, 249]             # paper's uniform grid
    assert tdm.time_grid(1) == [899]
    assert tdm.time_grid(2, 899) == [899, 449]
    assert tdm.landing_times([899, 674, 449, 224]) == [674, 449, 224, 0]
    assert tdm.landing_times([899]) == [0]
    assert tdm.time_grid(100, 999) == list(range(999, 0, -10))
    with pytest.raises(ValueError, match="steps"):
        tdm.time_grid(1000, 899)


#################################################################################
#  3. Re-diffusion kernel q(x_tau | x_s)                                        #
#################################################################################

def test_rediffuse_maps_marginal_at_s_to_marginal_at_tau():
    sch = tdm.Schedule()
    g = torch.Generator().manual_seed(1)
    mu = torch.tensor([1.0, -0.5], dtype=torch.float64)
    Sigma = torch.tensor([[1.5, 0.6], [0.6, 0.5]], dtype=torch.float64)
    n, s, tau = 400_000, 200, 300
    a_s, sg_s = _at(sch, s)
    a_t, sg_t = _at(sch, tau)
    x0 = mu + torch.randn(n, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(Sigma).T
    x_s = (a_s * x0 + sg_s * torch.randn(n, 2, generator=g, dtype=torch.float64)).float()
    x_tau, _, _ = tdm.rediffuse(x_s, sch, torch.full((n,), s), torch.full((n,), tau), torch.randn(n, 2, generator=g))
    want_mean = a_t * mu
    S = a_t ** 2 * Sigma + sg_t ** 2 * torch.eye(2, dtype=torch.float64)      # marginal covariance at tau
    x = x_tau.double()
    # sample mean: std sqrt(S_ii / n); 5 sigma
    assert ((x.mean(0) - want_mean).abs() <= 5 * (S.diag() / n).sqrt()).all(), (x.mean(0), want_mean)
    # sample covariance entry (i, j) of a Gaussian: std ~ sqrt((S_ii S_jj + S_ij^2) / n); 5 sigma
    tol = 5 * ((S.diag()[:, None] * S.diag()[None] + S ** 2) / n).sqrt()
    assert ((torch.cov(x.T) - S).abs() <= tol).all(), (torch.cov(x.T), S)
    # power: the common mistake beta = sigma_tau (forgetting the variance x_s already has) would add
    # (alpha_tau sigma_s / alpha_s)^2 to the diagonal, several tolerances away
    assert ((a_t * sg_s / a_s) ** 2 > 3 * tol.diag()).all()


def test_rediffuse_at_equal_times_is_identity_and_never_nan():
    sch = tdm.Schedule()
    s = torch.arange(1000)
    x = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0))
    z = torch.randn(1000, 2, generator=torch.Generator().manual_seed(1))
    x_tau, a, beta = tdm.rediffuse(x, sch, s, s, z)
    assert torch.equal(x_tau, x) and (a == 1).all() and (beta == 0).all()
    # every pair tau >= s (both schedules): beta^2 = sigma_tau^2 - a^2 sigma_s^2 is >= 0 in exact arithmetic
    # but may round below 0 in float32; it must come out finite and >= 0 (the clamp), never NaN
    S, T = torch.triu_indices(1000, 1000)                              # all s <= tau
    for kind, b0, b1 in (("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012)):
        _, _, beta_all = tdm.rediffuse(torch.zeros(len(S), 1), tdm.Schedule(kind, b0, b1), S, T, torch.zeros(len(S), 1))
        assert torch.isfinite(beta_all).all() and (beta_all >= 0).all(), kind
    _, _, beta = tdm.rediffuse(x[:-1], sch, s[:-1], s[:-1] + 1, z[:-1])
    # and where it is not tiny it is the exact transition std (float64 reference; float32 error
    # on beta^2 ~ few eps32, so |beta - ref| <= few eps32 / ref)
    a_s, sg_s = _at(sch, s[:-1])
    a_t, sg_t = _at(sch, s[:-1] + 1)
    ref = (sg_t ** 2 - (a_t / a_s * sg_s) ** 2).sqrt()
    assert torch.allclose(beta.double(), ref, atol=10 * EPS32 / ref.min().item(), rtol=0)


#################################################################################
#  4. DDIM with the exact teacher reproduces the target                         #
#################################################################################

def test_many_step_ddim_with_exact_teacher_reproduces_target():
    # The ring with one class per mode: with the same labels for samples and ground truth the number of
    # points per mode is fixed, so the SW2 noise floor is the O(n^-1/2) within-mode floor rather than
    # the much larger (and noisier) mixture-weight fluctuation floor.
    ring = toy.ring_target()
    gmm = toy.GMM(ring.means, ring.covs, ring.weights, torch.arange(8), name="ring8")
    teacher = _exact_teacher(gmm)
    n = 2000
    g = torch.Generator().manual_seed(0)
    labels = teacher.sample_labels(n, g)
    gt = gmm.sample(n, labels=labels, generator=g)[0]
    floor = sum(ev.sliced_w2(gmm.sample(n, labels=labels, generator=g)[0],
                             gmm.sample(n, labels=labels, generator=g)[0]) for _ in range(3)) / 3
    x_T = torch.randn(n, 2, generator=g)
    sw2 = {N: ev.sliced_w2(tdm.sample(teacher.denoise, x_T, labels, teacher.schedule, tdm.time_grid(N, 999)), gt)
           for N in (100, 4)}
    # Expected for the 100-step sampler: sqrt(floor^2 + b^2), b the sampler's own bias. The main bias
    # is the last step: it outputs E[x0 | x_9], which shrinks each mode's std 0.1 by
    # sqrt(0.01 / (0.01 + sigma_9^2/alpha_9^2)) ~ 0.92 -> b ~ 0.008 ~ 0.6 floor (floor ~ 0.013 at n = 2000),
    # i.e. an expected ratio ~ 1.2; the floor estimate itself varies by ~5%. Factor 2 is safe.
    a9, s9 = _at(teacher.schedule, 9)
    b = 0.1 * (1 - math.sqrt(0.01 / (0.01 + (s9 / a9).item() ** 2)))
    assert b < floor
    assert sw2[100] < 2 * floor, (sw2, floor)
    # contrast: a 4-step DDIM sampler is far off (~0.08 = 6 floors); the test can tell them apart
    assert sw2[4] > 4 * floor, (sw2, floor)


#################################################################################
#  5. At init with cfg = 1 and fake = teacher, the generator gradient is zero   #
#################################################################################

def _toy_setup(unify, seed=0):
    torch.manual_seed(seed)
    gmm = toy.ring_target()
    net = ToyMLP(dim=2, n_classes=gmm.n_classes, width=32, depth=2).eval().requires_grad_(False)
    teacher = teachers.ToyTeacher(gmm, net)                            # v-prediction network teacher
    student, fake = teachers.copy_network(net, unify), teachers.copy_network(net, unify)
    x0_of = lambda m: student_x0(teacher, m)
    return teacher, student, fake, x0_of


def _generator_grads(unify, loss, cfg):
    """One tdm_step at initialisation (student = fake = teacher network), lr 0 -> the student's gradients."""
    teacher, student, fake, x0_of = _toy_setup(unify)
    fake_before = {k: v.clone() for k, v in fake.state_dict().items()}
    opt_s = torch.optim.SGD(student.parameters(), lr=0.0)
    opt_f = torch.optim.SGD(fake.parameters(), lr=0.0)                  # lr 0: the fake stays = teacher
    B = 64
    labels = teacher.sample_labels(B, torch.Generator().manual_seed(1))
    config = tdm.TDMConfig(K=4, unify=unify, cfg=cfg, loss=loss)
    logs = tdm.tdm_step(x0_of(student), x0_of(fake), teacher, teacher.encode(labels), teacher.uncond(B),
                        opt_s, opt_f, config)
    assert all(torch.equal(fake_before[k], v) for k, v in fake.state_dict().items())
    grads = [p.grad for p in student.parameters()]
    assert all(gr is not None for gr in grads)
    return grads, logs


@pytest.mark.parametrize("unify,loss", [((), "huber"), ((1, 2, 4), "huber"), ((1, 2, 4), "mse")])
def test_generator_gradient_is_zero_at_init_without_guidance(unify, loss):
    # f(x_tau) and r(x_tau) are the same function on the same input (a copy of the teacher network; the
    # zero step embedding adds an exact 0), so x0_hat - target = f - r = 0 and both d(huber)/dd = d/sqrt(d^2+c^2)
    # and d(mse)/dd = 2d vanish: the maths gives an exact 0 (no rounding is needed to get there).
    x0_hat = torch.randn(16, 2, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    r = torch.randn(16, 2, generator=torch.Generator().manual_seed(1))
    tdm.generator_loss(x0_hat, r, r.clone(), loss=loss).backward()
    assert (x0_hat.grad == 0).all(), x0_hat.grad.abs().max()
    grads, logs = _generator_grads(unify, loss, cfg=1.0)
    assert all((gr == 0).all() for gr in grads), max(gr.abs().max().item() for gr in grads)
    assert logs["grad_norm"] == 0.0


@pytest.mark.parametrize("unify", [(), (1, 2, 4)])
def test_generator_gradient_is_nonzero_with_guidance(unify):
    # contrast to the test above: with cfg = 3, r_cfg - f = (cfg - 1)(r_c - r_u) != 0 (the random network's
    # class embeddings differ), so the student gets a real gradient, orders above float32 rounding effects
    grads, logs = _generator_grads(unify, "huber", cfg=3.0)
    total = math.sqrt(sum(gr.double().pow(2).sum().item() for gr in grads))
    assert total > 1e-2 and logs["grad_norm"] > 1e-2, total


#################################################################################
#  6. Importance weight                                                         #
#################################################################################

def _iw_direct(x0_hat, eps_hat, z, sch, t_m, tau):
    """w = q(x_tau | x0_hat) / q(x_tau | x_m) from the two Gaussian kernels, tempered per dimension
    (exp of the MEAN over dims of the exponents, normalising constants dropped), in float64."""
    x_m = tdm.ddim_step(x0_hat, eps_hat, sch, t_m)
    x_tau, _, _ = tdm.rediffuse(x_m, sch, t_m, tau, z)
    a_m, s_m = _at(sch, t_m)
    a_t, s_t = _at(sch, tau)
    bc = lambda v: v.reshape(-1, *([1] * (x0_hat.dim() - 1)))
    beta = (s_t ** 2 - (a_t / a_m * s_m) ** 2).sqrt()
    dims = list(range(1, x0_hat.dim()))
    e_num = -(x_tau.double() - bc(a_t) * x0_hat.double()).pow(2).mean(dims) / (2 * s_t ** 2)   # q(x_tau|x0_hat)
    e_den = -(x_tau.double() - bc(a_t / a_m) * x_m.double()).pow(2).mean(dims) / (2 * beta ** 2)  # q(x_tau|x_m)
    return (e_num - e_den).exp(), x_tau


@pytest.mark.parametrize("shape", [(256, 2), (16, 4, 8, 8)])
def test_importance_weight_is_the_tempered_kernel_ratio(shape):
    sch = tdm.Schedule()
    g = torch.Generator().manual_seed(0)
    B = shape[0]
    x0_hat, eps_hat, z = (torch.randn(shape, generator=g) for _ in range(3))
    t_m = torch.randint(0, 850, (B,), generator=g)
    tau = t_m + torch.randint(20, 150, (B,), generator=g)               # tau - t_m >= 20
    w = tdm.importance_weight(eps_hat, z, sch, t_m, tau)
    want, _ = _iw_direct(x0_hat, eps_hat, z, sch, t_m, tau)
    assert w.shape == (B,)
    # Float32 rounding: the reference reads x_tau, rounded to eps32 |x_tau| (|x_tau| < ~4), and divides
    # x_tau - a x_m by beta >= ~0.045 (tau - t_m >= 20), so its z carries an error <= ~1e-5 and the exponent
    # mean(z^2)/2 one <= |z| 1e-5 ~ 4e-5; the implementation's float32 alpha/sigma add ~1e-6. rtol 1e-4.
    assert torch.allclose(w.double(), want, rtol=1e-4, atol=0), (w, want)
    # the weight is not trivially 1 here (so the comparison above has power)
    assert (want - 1).abs().max() > 0.02
    # means over all non-batch dimensions: the same as on the flattened input
    assert torch.allclose(w, tdm.importance_weight(eps_hat.reshape(B, -1), z.reshape(B, -1), sch, t_m, tau),
                          rtol=1e-6)


def test_exact_importance_weight_is_the_density_ratio_and_averages_to_one():
    """exact=True: the full ratio of the two Gaussian densities (normalising constants included), so for a
    fixed x0_hat, eps_hat the weight averages to 1 over the fresh noise z (E_{x_m kernel}[q / q_m] = 1)."""
    sch = tdm.Schedule()
    g = torch.Generator().manual_seed(3)
    B = 64
    x0_hat, eps_hat, z = (torch.randn(B, 2, generator=g) for _ in range(3))
    t_m = torch.randint(0, 700, (B,), generator=g)
    tau = t_m + torch.randint(20, 200, (B,), generator=g)
    w = tdm.importance_weight(eps_hat, z, sch, t_m, tau, exact=True).double()
    x_m = tdm.ddim_step(x0_hat, eps_hat, sch, t_m).double()
    x_tau = tdm.rediffuse(x_m.float(), sch, t_m, tau, z)[0].double()
    a_m, s_m = _at(sch, t_m)
    a_t, s_t = _at(sch, tau)
    beta = (s_t ** 2 - (a_t / a_m * s_m) ** 2).sqrt()
    N = torch.distributions.Normal
    log_num = N(a_t[:, None] * x0_hat.double(), s_t[:, None]).log_prob(x_tau).sum(1)          # q(x_tau | x0_hat)
    log_den = N((a_t / a_m)[:, None] * x_m, beta[:, None]).log_prob(x_tau).sum(1)             # q(x_tau | x_m)
    # float32 rounding as in the tempered test, now on the summed (2x larger) exponent: rtol 2e-4
    assert torch.allclose(w, (log_num - log_den).exp(), rtol=2e-4, atol=0)
    # Monte Carlo over z for one (x0_hat, eps_hat, t_m, tau): mean 1 within 5 standard errors
    n = 200_000
    zs = torch.randn(n, 2, generator=g)
    ws = tdm.importance_weight(eps_hat[:1].expand(n, 2), zs, sch, t_m[:1].expand(n), tau[:1].expand(n),
                               exact=True).double()
    assert abs(ws.mean().item() - 1) < 5 * ws.std().item() / n ** 0.5 + 1e-9, (ws.mean(), ws.std())
    assert ws.std() > 0.01                                                 # not trivially 1


def test_importance_weight_tends_to_one_when_tau_is_far_above_t_m():
    sch = tdm.Schedule()
    g = torch.Generator().manual_seed(2)
    B = 512
    eps_hat, z = torch.randn(B, 2, generator=g), torch.randn(B, 2, generator=g)
    for t_m, tau in ((20, 999), (0, 999), (100, 899), (224, 889)):
        tm, tt = torch.full((B,), t_m), torch.full((B,), tau)
        w = tdm.importance_weight(eps_hat, z, sch, tm, tt).double()
        # m - z = (a sigma_m eps_hat + (beta - sigma_tau) z) / sigma_tau with a = alpha_tau/alpha_m, and
        # log w = -mean(m^2 - z^2)/2 = -mean((m - z)(m + z))/2, so by Cauchy-Schwarz
        # |log w| <= rms(m - z) rms(m + z) / 2 <= d (d + 2 rms z) / 2,
        # d = (a sigma_m rms(eps_hat) + |beta - sigma_tau| rms(z)) / sigma_tau  -> 0 as SNR_tau / SNR_m -> 0.
        a_m, s_m = _at(sch, t_m)
        a_t, s_t = _at(sch, tau)
        a = a_t / a_m
        beta = (s_t ** 2 - (a * s_m) ** 2).sqrt()
        rms = lambda v: v.double().pow(2).mean(1).sqrt()
        d = (a * s_m * rms(eps_hat) + (beta - s_t).abs() * rms(z)) / s_t
        bound = d * (d + 2 * rms(z)) / 2 + 1e-6            # + float32 rounding of mean(m^2) - mean(z^2)
        assert (w.log().abs() <= bound).all(), (t_m, tau)
        if (t_m, tau) == (20, 999):
            # a sigma_m / sigma_tau = alpha_999 sigma_20 / (alpha_20 sigma_999) ~ 5e-4: w = 1 to ~1e-3
            assert (w - 1).abs().max() < 1e-2 and bound.max() < 1e-2


#################################################################################
#  7. Losses                                                                    #
#################################################################################

def test_fake_score_loss_is_min_snr_weighted_eps_mse():
    sch = tdm.Schedule()
    g = torch.Generator().manual_seed(0)
    B = 64
    x_tau, f, x0_hat = (torch.randn(B, 3, generator=g) for _ in range(3))
    tau = torch.cat([torch.randint(20, 130, (B // 2,), generator=g), torch.randint(130, 999, (B // 2,), generator=g)])
    w_is = torch.rand(B, generator=g) + 0.5
    loss = tdm.fake_score_loss(f, x0_hat, sch, tau, w_is)
    # §5: eps_f - eps_target = alpha (x0_hat - f) / sigma, so eps-MSE = SNR * x0-MSE and
    # x0-MSE * min(SNR, 5) = eps-MSE * min(1, 5 / SNR) (Min-SNR-5 on eps).
    a, s = _at(sch, tau)
    eps_f = (x_tau.double() - a[:, None] * f.double()) / s[:, None]
    eps_t = (x_tau.double() - a[:, None] * x0_hat.double()) / s[:, None]
    snr = a ** 2 / s ** 2
    want = ((eps_f - eps_t).pow(2).mean(1) * (5 / snr).clamp(max=1) * w_is.double()).mean()
    # float32: squared differences and means (rel ~ few eps32), SNR cast to float32 (rel eps32)
    assert abs(loss.item() - want.item()) <= 1e-5 * want.item()
    assert (snr[: B // 2] > 5).all() and (snr[B // 2:] < 5).all()     # both branches of the clamp used


def test_fake_regulariser_moves_the_optimum_toward_the_teacher():
    # With the pull toward the teacher, the per-sample minimiser of w (f - x0_hat)^2 + reg (f - r)^2 is the
    # weighted mean (w x0_hat + reg r) / (w + reg): the loss's gradient in f vanishes there and nowhere else.
    sch = tdm.Schedule()
    g = torch.Generator().manual_seed(1)
    x0_hat, r = torch.randn(32, 2, generator=g, dtype=torch.float64), torch.randn(32, 2, generator=g, dtype=torch.float64)
    tau = torch.randint(20, 999, (32,), generator=g)
    w_is = torch.rand(32, generator=g, dtype=torch.float64) + 0.5
    f_star = ((w_is[:, None] * x0_hat + 0.3 * r) / (w_is[:, None] + 0.3)).requires_grad_(True)
    tdm.fake_score_loss(f_star, x0_hat, sch, tau, w_is, r_x0=r, reg=0.3).backward()
    assert f_star.grad.abs().max() < 1e-12
    f_plain = x0_hat.clone().requires_grad_(True)          # the minimiser without the pull is not one with it
    tdm.fake_score_loss(f_plain, x0_hat, sch, tau, w_is, r_x0=r, reg=0.3).backward()
    assert f_plain.grad.abs().max() > 1e-3
    assert tdm.fake_score_loss(f_plain, x0_hat, sch, tau, w_is, r_x0=r, reg=0.0) == 0   # reg 0: Eq. (7) alone
    with pytest.raises(ValueError, match="needs r_x0"):
        tdm.fake_score_loss(f_plain, x0_hat, sch, tau, w_is, reg=0.3)


def _gen_inputs(shape, seed=0):
    """x0_hat (with grad), r_cfg and f with |f - r_cfg| >= 0.1 element-wise, |values| < 4."""
    g = torch.Generator().manual_seed(seed)
    x0_hat = torch.randn(shape, generator=g).clamp(-3, 3).requires_grad_(True)
    r = torch.randn(shape, generator=g).clamp(-3, 3)
    gap = (0.1 + 0.5 * torch.rand(shape, generator=g)) * torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    return x0_hat, r, (r + gap).clamp(-3.9, 3.9)


@pytest.mark.parametrize("shape", [(8, 2), (3, 4, 2, 2)])
def test_generator_loss_gradient_has_documented_form(shape):
    dims = list(range(1, len(shape)))
    numel = math.prod(shape)
    bc = lambda v: v.reshape(-1, *([1] * (len(shape) - 1)))
    for loss in ("mse", "huber"):
        x0_hat, r, f = _gen_inputs(shape)
        tdm.generator_loss(x0_hat, r, f, huber_c=1e-3, loss=loss).backward()
        w = bc((x0_hat.detach().double() - r.double()).abs().mean(dims))      # DMD normaliser per sample
        d = (f - r).double()                                                  # = x0_hat - target
        if loss == "mse":
            want = 2 * d / (w * numel)
            # x0_hat - target is formed in float32 as x0_hat - (x0_hat + r - f): two roundings of numbers
            # below 8 (<= 2 ulp(8) = 1e-6) against |d| >= 0.1 -> rel 1e-5; doubled.
            rtol = 2e-5
        else:
            # element-wise pseudo-Huber sqrt(d^2 + c^2) - c has derivative d / sqrt(d^2 + c^2), which is
            # sign(d) to within c^2 / (2 d^2) = 5e-5 for |d| >= 0.1, c = 1e-3; plus the rounding above.
            want = torch.sign(d) / (w * numel)
            rtol = 5e-5 + 2e-5
        err = ((x0_hat.grad.double() - want).abs() / want.abs()).max().item()
        assert err <= rtol, (loss, err)
    with pytest.raises(ValueError, match="generator loss"):
        tdm.generator_loss(x0_hat, r, f, loss="l1")


@pytest.mark.parametrize("shape", [(16, 2), (4, 4, 8, 8)])
def test_generator_loss_paper_huber_and_no_normaliser(shape):
    # Eq. (11) per sample: L = mean_b (sqrt(|d_b|^2 + c^2) - c) with c = 0.00054 sqrt(dim), so
    # dL/dx0_hat = d / sqrt(|d_b|^2 + c^2) / B (normaliser off), and the same divided by w_b when on.
    dims = list(range(1, len(shape)))
    B, dim = shape[0], math.prod(shape[1:])
    bc = lambda v: v.reshape(-1, *([1] * (len(shape) - 1)))
    c = 0.00054 * math.sqrt(dim)
    for normalise in (False, True):
        x0_hat, r, f = _gen_inputs(shape)
        tdm.generator_loss(x0_hat, r, f, loss="huber-sample", normalise=normalise).backward()
        d = (f - r).double()
        want = d / bc((d.pow(2).sum(dims) + c ** 2).sqrt()) / B
        if normalise:
            want = want / bc((x0_hat.detach().double() - r.double()).abs().mean(dims))
        err = ((x0_hat.grad.double() - want).abs() / want.abs()).max().item()
        assert err <= 4e-5, (normalise, err)     # the float32 rounding of d, as above, twice


#################################################################################
#  8. Rollout                                                                   #
#################################################################################

def test_rollout_stops_early_and_matches_full_rollout():
    sch = tdm.Schedule()
    grid = tdm.time_grid(4)
    rows = []

    def denoise(x, t, cond):          # row-wise (no mixing across the batch) so sub-batches are exact
        rows.append(x.shape[0])
        assert cond["label"].shape[0] == x.shape[0] and cond["scale"].shape[0] == x.shape[0]
        return torch.tanh(x) * (t.float() / 1000)[:, None] + 0.1 * cond["label"].float()[:, None] * cond["scale"]

    g = torch.Generator().manual_seed(0)
    B = 10
    x_T = torch.randn(B, 2, generator=g)
    cond = {"label": torch.arange(B) % 3, "scale": torch.rand(B, 2, generator=g)}
    depth = torch.tensor([1, 4, 2, 3, 0, 2, 1, 1, 3, 2])
    xs, x0s, eps = tdm.rollout(denoise, x_T, cond, sch, grid, depth=depth)
    assert sum(rows) == depth.sum().item() and len(rows) == depth.max().item()
    rows.clear()
    fxs, fx0s, feps = tdm.rollout(denoise, x_T, cond, sch, grid)
    assert rows == [B] * 4
    for i in range(int(depth.max())):
        need = depth > i
        assert torch.equal(x0s[i][need], fx0s[i][need]) and torch.equal(eps[i][need], feps[i][need])
        assert torch.equal(xs[i][need], fxs[i][need])
    # the trajectory: x_{t_{k-1}} = alpha x0_hat + sigma eps_hat (DDIM, §2), with
    # eps_hat = (x_t - alpha_t x0_hat) / sigma_t; float32 -> a few ulps of |x| <~ 3
    t_next = tdm.landing_times(grid)
    assert torch.equal(fxs[0], x_T) and len(fxs) == 4 and len(fx0s) == 4
    for i in range(4):
        a, s = _at(sch, grid[i])
        assert torch.allclose(feps[i].double(), (fxs[i].double() - a * fx0s[i].double()) / s, atol=1e-5)
        if i + 1 < 4:
            a, s = _at(sch, t_next[i])
            assert torch.allclose(fxs[i + 1].double(), a * fx0s[i].double() + s * feps[i].double(), atol=1e-5)
    assert torch.equal(tdm.sample(denoise, x_T, cond, sch, grid), fx0s[-1])


#################################################################################
#  9. tau and landing-time sampling                                             #
#################################################################################

def test_tau_and_landing_time_ranges():
    torch.manual_seed(0)
    grid = tdm.time_grid(4)
    t_next = tdm.landing_times(grid)
    n = 20000
    # each range holds <= ~220 values; the chance that n draws miss an end is (1 - 1/220)^n < e^-90
    for t_g, t_m in zip(grid, t_next):
        tg, tm = torch.full((n,), t_g), torch.full((n,), t_m)
        lo = max(20, t_m)
        tau = tdm.sample_tau(tg, tm, separate=True)
        assert tau.min().item() == lo and tau.max().item() == t_g - 10 - 1, (t_g, t_m)
        # uniform: mean (lo + hi - 1)/2 within 5 standard errors (std of U over m values ~ m / sqrt(12))
        m = t_g - 10 - lo
        assert abs(tau.float().mean().item() - (lo + t_g - 11) / 2) <= 5 * m / math.sqrt(12 * n)
        tau = tdm.sample_tau(tg, tm, separate=False, t_max=899)
        assert tau.min().item() == lo and tau.max().item() == 899 + 1 - 10 - 1
        land = tdm.sample_landing(tg, tm, randmid=True)
        assert land.min().item() == t_m and land.max().item() == t_g - 20 - 1
        assert torch.equal(tdm.sample_landing(tg, tm, randmid=False), tm)


#################################################################################
# 10. TDM drives 1-step and 4-step students to a Gaussian target                #
#################################################################################

class _AffineStudent(torch.nn.Module):
    """x0_hat = A_t x + b_t with one (A, b) per grid time: can represent any Gaussian output."""

    def __init__(self, grid, init):
        super().__init__()
        self.grid = list(grid)
        As, bs = zip(*[init(t) for t in grid])
        self.A, self.b = torch.nn.Parameter(torch.stack(As)), torch.nn.Parameter(torch.stack(bs))

    def forward(self, x, t, cond, K=None):
        idx = torch.tensor([self.grid.index(v) for v in t.tolist()], dtype=torch.long)
        return torch.einsum("bij,bj->bi", self.A[idx], x) + self.b[idx]


class _AffineFake(torch.nn.Module):
    """teacher's exact x0 + A(t) x + b(t), (A, b) an MLP of a timestep embedding with a zero last layer:
    fake = teacher at init (as in TDM), and affine in x_t, which is the form of E[x0_hat | x_tau] when
    the student's samples are Gaussian."""

    def __init__(self, teacher, width=64):
        super().__init__()
        self.teacher = teacher
        self.net = torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.SiLU(), torch.nn.Linear(width, width),
                                       torch.nn.SiLU(), torch.nn.Linear(width, 6))
        torch.nn.init.zeros_(self.net[-1].weight)
        torch.nn.init.zeros_(self.net[-1].bias)

    def forward(self, x, t, cond, K=None):
        c = self.net(timestep_embedding(t, 64))
        return self.teacher.denoise(x, t, cond) + torch.einsum("bij,bj->bi", c[:, :4].reshape(-1, 2, 2), x) + c[:, 4:]


@pytest.mark.parametrize("K", [1, 4])
def test_tdm_drives_student_to_gaussian_target(K):
    mu, Sigma = _rotated_gaussian()
    gmm = toy.GMM(mu[None], Sigma[None], [1.0], [0], name="gauss")
    teacher = _exact_teacher(gmm)                               # E[x0 | x_t] is affine in x_t
    sch = teacher.schedule

    def teacher_affine(t):       # the exact denoiser at t: mu + alpha Sigma (alpha^2 Sigma + sigma^2 I)^-1 (x - alpha mu)
        a, s = _at(sch, t)
        A = a * Sigma @ torch.linalg.inv(a ** 2 * Sigma + s ** 2 * torch.eye(2, dtype=torch.float64))
        return A.float(), (mu - a * A @ mu).float()

    n_eval = 100_000

    def errors(student):
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            x = tdm.sample(lambda x, t, c: student(x, t, c), torch.randn(n_eval, 2, generator=g),
                           torch.zeros(n_eval, dtype=torch.long), sch, tdm.time_grid(K)).double()
        d = x.mean(0) - mu
        mean_err = (d @ torch.linalg.solve(Sigma, d)).sqrt().item()            # Mahalanobis distance
        cov_err = ((torch.cov(x.T) - Sigma).norm() / Sigma.norm()).item()       # relative Frobenius
        return mean_err, cov_err

    torch.manual_seed(0)
    student = _AffineStudent(tdm.time_grid(K), teacher_affine)   # = the teacher's own K-step DDIM sampler
    fake = _AffineFake(teacher)
    lr, iters, B = 1e-2, 600, 1024
    opt_s = torch.optim.Adam(student.parameters(), lr=lr, betas=(0.0, 0.95))
    opt_f = torch.optim.Adam(fake.parameters(), lr=lr, betas=(0.0, 0.95))
    config = tdm.TDMConfig(K=K, cfg=1.0)                         # official defaults otherwise (huber, separate, IS)
    mean0, cov0 = errors(student)
    # 1 step: x0_hat(x_899) ~ mu + 0.017 Sigma x, collapsed onto the mean (cov error ~ 1);
    # 4 steps: DDIM under-disperses a Gaussian with std < 1 (cov error ~ 0.8).
    assert cov0 > 0.5
    cond, uncond = torch.zeros(B, dtype=torch.long), torch.ones(B, dtype=torch.long)
    for i in range(iters):
        for group in opt_s.param_groups:                         # cosine decay of the generator lr to 0
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * i / iters))
        tdm.tdm_step(student, fake, teacher, cond, uncond, opt_s, opt_f, config)
    mean1, cov1 = errors(student)
    print(f"K={K}: mean error (Mahalanobis) {mean0:.4f} -> {mean1:.4f}, covariance error (rel. Frobenius) "
          f"{cov0:.4f} -> {cov1:.4f}")
    # Tolerances = sampling error of the estimate (5 sigma) + an explicit optimisation tolerance.
    # Sampling: the Mahalanobis norm of a mean over n points ~ sqrt(2/n); a covariance entry has std
    # sqrt((S_ii S_jj + S_ij^2)/n) <= sqrt(2/n) max_i S_ii, relative to |Sigma|_F.
    se_mean = math.sqrt(2 / n_eval)
    se_cov = math.sqrt(2 / n_eval) * Sigma.diag().max().item() / Sigma.norm().item()
    # Optimisation: 10% of the initial covariance error, and a mean within 0.1 target standard deviations
    # in every direction. Observed over 6 seeds: cov error 0.005-0.05, mean error < 0.05.
    assert cov1 <= 0.1 * cov0 + 5 * se_cov, (cov0, cov1)
    assert mean1 <= 0.1 + 5 * se_mean, (mean0, mean1)


#################################################################################
# 11. Gradient norm                                                             #
#################################################################################

def test_unclipped_grad_norm_is_the_global_norm():
    """tdm._clip without a limit returns the norm of all gradients together and leaves them unchanged."""
    ps = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    ps[0].grad, ps[1].grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([[0.0, 4.0], [0.0, 12.0]])
    opt = torch.optim.SGD(ps, lr=1.0)
    assert tdm._clip(opt, 0.0) == pytest.approx(13.0)             # sqrt(9 + 16 + 144)
    assert tdm._clip(opt, 6.5) == pytest.approx(13.0)             # returns the norm before clipping ...
    assert ps[1].grad[1, 1].item() == pytest.approx(6.0)          # ... and scales by 6.5 / 13


def test_grad_scaler_gives_the_same_step_in_fp32():
    """tdm_step with a GradScaler (--precision fp16) scales both losses by a power of two before backward and
    unscales the gradients before clipping and the step: in fp32, where nothing overflows, multiplying and
    dividing by 2^16 is exact, so both networks and the logged norm must come out bit-identical. The scaler
    must also have seen both optimisers' gradients (its per-iteration state is reset by update())."""
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)):
        teacher, student, fake, x0_of = _toy_setup(())
        opt_s, opt_f = (torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.0, 0.95)) for m in (student, fake))
        torch.manual_seed(3)
        labels = teacher.sample_labels(64, torch.Generator().manual_seed(1))
        logs = tdm.tdm_step(x0_of(student), x0_of(fake), teacher, teacher.encode(labels), teacher.uncond(64),
                            opt_s, opt_f, tdm.TDMConfig(K=4, cfg=2.0), scaler=scaler)
        results.append((student.state_dict(), fake.state_dict(), logs))
        if scaler is not None:
            assert scaler.get_scale() == 2.0 ** 16                     # no inf found: the scale is kept
    (s0, f0, l0), (s1, f1, l1) = results
    assert all(torch.equal(s0[k], s1[k]) for k in s0) and all(torch.equal(f0[k], f1[k]) for k in f0)
    assert l0["grad_norm"] == l1["grad_norm"] and l0["loss_fake"] == l1["loss_fake"]
    assert any(not torch.equal(s0[k], teachers.copy_network(teacher.network).state_dict()[k]) for k in s0)
