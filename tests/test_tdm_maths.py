"""Tests of the TDM method itself (tdm.py) on the Gaussian-mixture teacher, each with a closed form to meet.

They guard properties that the sanity checks of the maths (tests/test_tdm.py) leave
open: a slip in guidance, in the step draw or in the use of the importance weight passes all of those
(tests/wrong_maths.py applies such slips to a copy of tdm.py and runs both files):
  * classifier-free guidance combines the conditional and unconditional denoisers the right way round;
  * one iteration (docs/method.md §9) sends the generator's gradient (§7) to every student step with
    frequency 1/K, along r_cfg - f;
  * the fake-score update (Eq. (7)) weights each sample by the kernel ratio of §6, in the right direction;
  * that weight turns the fake's regression minimiser into the DSM posterior mean E[x0_hat | x_tau] under
    q(x_tau | x0_hat) = N(alpha_tau x0_hat, sigma_tau^2 I).
Every tolerance is derived in a comment: float rounding bounds, or Monte-Carlo standard errors x 5.
"""
import math

import pytest
import torch

import tdm
from fixtures import alpha_sigma
from toy import ring_target

EPS32 = 2.0 ** -24      # unit roundoff of float32: |fl(x) - x| <= EPS32 |x|
EPS64 = 2.0 ** -53


class GMMTeacher:
    """The teacher interface tdm_step uses (`schedule`, `sample_shape`, `denoise`) on the closed-form
    mixture denoiser E[x0 | x_t, label]; label gmm.n_classes is the null (unconditional) class."""

    def __init__(self, gmm):
        self.gmm = gmm
        self.schedule = tdm.Schedule("linear", 1e-4, 0.02)
        self.sample_shape = (gmm.dim,)

    def denoise(self, x_t, t, cond):
        """E[x0 | x_t, label], computed in float64, returned in x_t's dtype."""
        return self.gmm.denoise(x_t, self.schedule.alpha(t), self.schedule.sigma(t), cond)

    def null(self, n):
        return torch.full((n,), self.gmm.n_classes, dtype=torch.long)

    def guided(self, x_t, t, cond, cfg):
        """The guided denoiser x0_u + cfg (x0_c - x0_u), straight from the two closed forms."""
        x0_c, x0_u = self.denoise(x_t, t, cond), self.denoise(x_t, t, self.null(x_t.shape[0]))
        return x0_u + cfg * (x0_c - x0_u)


def _grid_index(grid, t):
    """Position in the grid of each integer time in t (B,); every t must be a grid time."""
    lookup = torch.full((1000,), -1, dtype=torch.long)
    lookup[torch.tensor(grid)] = torch.arange(len(grid))
    idx = lookup[t]
    assert (idx >= 0).all(), f"the student was called off its grid {grid}: {t.unique().tolist()}"
    return idx


def _noisy_mixture_points(gmm, sch, n, gen):
    """x_t = alpha_t x0 + sigma_t z with x0 from the mixture and t ~ U{50..850}; labels of a real class."""
    x0, labels = gmm.sample(n, generator=gen)
    t = torch.randint(50, 850, (n,), generator=gen)
    x_t = sch.alpha(t)[:, None] * x0 + sch.sigma(t)[:, None] * torch.randn(n, gmm.dim, generator=gen)
    return x_t, t, labels


#################################################################################
#  1. CFG is the guided mixture denoiser, cond and uncond the right way round   #
#################################################################################

@pytest.mark.parametrize("cond_kind", ["tensor", "dict"])
def test_cfg_denoise_is_the_guided_mixture_posterior_mean(cond_kind):
    """cfg_denoise(denoise, ...) = x0_u + w (x0_c - x0_u) with x0_c = E[x0 | x_t, label] and x0_u = E[x0 | x_t]
    (the null label): for the mixture both are closed forms, so the guided denoiser is known exactly."""
    teacher = GMMTeacher(ring_target())
    gen = torch.Generator().manual_seed(0)
    B, w = 512, 3.0
    x_t, t, labels = _noisy_mixture_points(teacher.gmm, teacher.schedule, B, gen)
    null = teacher.null(B)
    if cond_kind == "tensor":
        denoise, cond, uncond = teacher.denoise, labels, null
    else:   # an opaque dict condition (as PixArt's); the second entry must travel with the first
        denoise = lambda x, tt, c: teacher.denoise(x, tt, c["label"] + 0 * c["mask"])
        cond, uncond = dict(label=labels, mask=torch.ones(B, dtype=torch.long)), dict(label=null, mask=0 * null)
    got = tdm.cfg_denoise(denoise, x_t, t, cond, uncond, w).double()                  # (B, 2)
    # Reference in float64 from the same float32 x_t, alpha_t, sigma_t (x_t.double() is exact).
    x0_c = teacher.denoise(x_t.double(), t, labels)
    x0_u = teacher.denoise(x_t.double(), t, null)
    want = x0_u + w * (x0_c - x0_u)
    # Float32 rounding of got = fl(fl(u) + w fl(fl(c) - fl(u))), M = max(|c|, |u|) per sample: the two
    # denoiser outputs are rounded (<= (1 + w) M eps + w M eps propagated), the difference (<= 2M eps),
    # its product with w (<= 2wM eps) and the sum (<= (1 + 2w) M eps): <= (4 + 7w) M eps = 25 M eps for
    # w = 3. (The batched 2B call solves the same 2x2 systems per row in float64: ~1e-16, negligible.)
    M = torch.maximum(x0_c.abs(), x0_u.abs()).amax(1, keepdim=True)                   # (B, 1)
    tol = (4 + 7 * w) * M * EPS32
    assert ((got - want).abs() <= tol).all(), ((got - want).abs() / tol).max()
    # Power: cond and uncond swapped gives x0_c + w (x0_u - x0_c), off by (2w - 1)|x0_c - x0_u|.
    assert ((2 * w - 1) * (x0_c - x0_u).abs() > 1e4 * tol).sum() > B // 4
    # cfg = 1 is the conditional denoiser itself, bit for bit (no guidance arithmetic at all).
    assert torch.equal(tdm.cfg_denoise(denoise, x_t, t, cond, uncond, 1.0), denoise(x_t, t, cond))


#################################################################################
#  2. One iteration: the generator's gradient reaches every step, 1/K each      #
#################################################################################

class _PerStepOffsetStudent(torch.nn.Module):
    """x0_hat = E[x0 | x_t, label] + p_i at grid step i (one float64 scalar per step, both coordinates):
    dL/dp_i adds up dL/dx0_hat over exactly the samples whose gradient step is i."""

    def __init__(self, teacher, grid):
        super().__init__()
        self.teacher, self.grid = teacher, grid
        self.p = torch.nn.Parameter(torch.zeros(len(grid), dtype=torch.float64))      # (K,)

    def forward(self, x, t, cond, K=None):
        return self.teacher.denoise(x, t, cond) + self.p[_grid_index(self.grid, t)][:, None]   # (B, 2) float64


class _OffsetGuidedFake(torch.nn.Module):
    """The guided teacher + a constant delta (float64): then r_cfg - f = -delta exactly, if and only if
    tdm_step's real score r_cfg is the guided mixture denoiser."""

    def __init__(self, teacher, cfg, delta):
        super().__init__()
        self.teacher, self.cfg = teacher, cfg
        self.delta = torch.nn.Parameter(torch.tensor(delta, dtype=torch.float64))     # (2,)

    def forward(self, x, t, cond, K=None):
        return self.teacher.guided(x, t, cond, self.cfg) + self.delta


def test_generator_gradient_reaches_every_step_with_frequency_one_over_K():
    """docs/method.md §9: each sample draws its step k ~ U{0..K-1} and the generator loss (§7) backpropagates
    through the student's one prediction at x_{t_k}. With loss "mse" and no normaliser,
    L = mean_b mean_j (x0_hat - sg(x0_hat + r_cfg - f))^2, so dL/dx0_hat[b, j] = 2 (f - r_cfg)[b, j] / (B D).
    With f = guided teacher + delta, f - r_cfg = delta, and the student's per-step offset gets
        dL/dp_i = n_i (delta_1 + delta_2) / B,    n_i = #{b : k_b = i},
    so n_i = B dL/dp_i / sum(delta) must come out integer, sum to B, and be Multinomial(B, 1/K)."""
    torch.manual_seed(0)
    teacher = GMMTeacher(ring_target())
    K, B, cfg, delta = 4, 4096, 3.0, [0.5, 0.25]
    config = tdm.TDMConfig(K=K, cfg=cfg, loss="mse", normalise=False, grad_clip=0.0)
    student = _PerStepOffsetStudent(teacher, tdm.time_grid(K, config.t_max))
    fake = _OffsetGuidedFake(teacher, cfg, delta)
    opt_s, opt_f = torch.optim.SGD(student.parameters(), lr=0.0), torch.optim.SGD(fake.parameters(), lr=0.0)
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, teacher.gmm.n_classes, (B,), generator=gen)
    x_T = torch.randn(B, 2, generator=gen, dtype=torch.float64)          # float64 throughout the iteration
    tdm.tdm_step(student, fake, teacher, labels, teacher.null(B), opt_s, opt_f, config, x_T=x_T)
    n = student.p.grad * B / sum(delta)                                                 # (K,) float64
    # float64 rounding: f - r_cfg = delta to ~|r_cfg| EPS64 ~ 1e-15 (|r_cfg| < ~10 at cfg 3) and the sums
    # over B = 4096 samples add <= B EPS64 relative: |n_i - integer| <= B (1e-15 / 0.25 + B EPS64) ~ 2e-9.
    # A wrong real score (cond / uncond swapped: f - r_cfg = delta + (2 cfg - 1)(x0_c - x0_u)) or gradient
    # through any other path breaks the integers by O(1).
    assert (n - n.round()).abs().max() < 1e-6, n
    assert n.round().sum().item() == B, n
    # Each n_i ~ Binomial(B, 1/K): sd = sqrt(B (1/K)(1 - 1/K)) = 27.7 for B = 4096, K = 4; 5 sd is 14% of B/K
    # (a false failure has probability ~ K 6e-7). A student trained at one step only has n = (0, 0, 0, B).
    sd = math.sqrt(B * (1 / K) * (1 - 1 / K))
    assert ((n - B / K).abs() <= 5 * sd).all(), (n.tolist(), B / K, sd)


#################################################################################
#  3. One iteration: the fake update weights each sample by q(.|x0_hat)/q(.|x_m)#
#################################################################################

class _Recorder(torch.nn.Module):
    """Wraps a (x, t, cond) x0-denoiser, plus a constant `shift`, with a per-sample offset P (B, D) (zero,
    trainable), and keeps (x, t, output) of the calls made with grad enabled: the student's gradient step and
    the fake's update (the rollout and the generator phase's fake run without grad)."""

    def __init__(self, denoise, B, D, shift=0.0):
        super().__init__()
        self.denoise, self.shift = denoise, shift
        self.P = torch.nn.Parameter(torch.zeros(B, D))
        self.calls = []

    def forward(self, x, t, cond, K=None):
        out = self.denoise(x, t, cond) + self.shift + (self.P if x.shape[0] == self.P.shape[0] else 0)
        if torch.is_grad_enabled():
            self.calls.append((x.detach().double(), t.clone(), out.detach().double()))
        return out


def _kernel_log_ratio(x_tau, x0_hat, x_m, sch, t_m, tau):
    """log q(x_tau | x0_hat) - log q(x_tau | x_m) per sample (densities from torch.distributions, float64),
    with q(x_tau | x0_hat) = N(alpha_tau x0_hat, sigma_tau^2 I), q(x_tau | x_m) = N(a x_m, beta^2 I),
    a = alpha_tau / alpha_m, beta^2 = sigma_tau^2 - a^2 sigma_m^2 (docs/method.md §6). Also returns beta, sigma_tau."""
    a_m, s_m = alpha_sigma(sch, t_m)
    a_t, s_t = alpha_sigma(sch, tau)
    beta = (s_t ** 2 - (a_t / a_m * s_m) ** 2).sqrt()
    N = lambda mean, std: torch.distributions.Normal(mean, std, validate_args=False)   # beta = 0 where tau = t_m
    log_num = N(a_t[:, None] * x0_hat, s_t[:, None]).log_prob(x_tau).sum(1)                 # (B,)
    log_den = N((a_t / a_m)[:, None] * x_m, beta[:, None]).log_prob(x_tau).sum(1)          # (B,)
    return log_num - log_den, beta, s_t


@pytest.mark.parametrize("importance", ["tempered", "exact", "off"])
def test_fake_update_weights_each_sample_by_the_kernel_ratio(importance):
    """docs/method.md §9 step (4), Eq. (7) with the §6 weight: the fake's loss is
        mean_b [ mean_j (f_b - x0_hat_b)^2 min(SNR_tau_b, 5) w_b ],
    so with a per-sample offset P on the fake, dL/dP_b = 2 (f_b - x0_hat_b) omega_b w_b / (B D) and each
    sample's weight is read back from the gradient. It must be the ratio of the two kernels at the x_tau the
    fake saw, w = q(x_tau | x0_hat) / q(x_tau | x_m) ("exact"), its tempered form
    log w = (log q(x_tau|x0_hat) - log q(x_tau|x_m) - D log(beta / sigma_tau)) / D ("tempered", official),
    or 1 ("off"); x0_hat and x_m = alpha_m x0_hat + sigma_m eps_hat come from the student's own step."""
    torch.manual_seed(0)
    teacher = GMMTeacher(ring_target())
    sch, B, D = teacher.schedule, 2048, 2
    config = tdm.TDMConfig(K=4, cfg=1.0, importance=importance)
    grid = tdm.time_grid(config.K, config.t_max)
    t_next = tdm.landing_times(grid)
    # The fake = teacher + (0.5, -0.5): f - x0_hat stays away from 0 even where both denoisers sit near the
    # mixture's mean (high noise), so the weight can be read back from the gradient.
    student, fake = _Recorder(teacher.denoise, B, D), _Recorder(teacher.denoise, B, D, torch.tensor([0.5, -0.5]))
    opt_s, opt_f = torch.optim.SGD(student.parameters(), lr=0.0), torch.optim.SGD(fake.parameters(), lr=0.0)
    labels = torch.randint(0, teacher.gmm.n_classes, (B,))
    tdm.tdm_step(student, fake, teacher, labels, teacher.null(B), opt_s, opt_f, config)
    assert len(student.calls) == 1 and len(fake.calls) == 1      # one step with grad each (rollout: no grad)
    x_g, t_g, x0_hat = student.calls[0]
    x_tau, tau, f = fake.calls[0]
    t_m = torch.tensor(t_next)[_grid_index(grid, t_g)]              # landing time of each sample's step
    # The weight the implementation used, read back from the gradient:
    # w_b = <dL/dP_b, f_b - x0_hat_b> B D / (2 omega_b |f_b - x0_hat_b|^2)
    diff = f - x0_hat                                                # (B, D)
    a_t, s_t = alpha_sigma(sch, tau)
    omega = (a_t / s_t).pow(2).clamp(max=config.snr_clamp)         # (B,) min(SNR_tau, 5)
    w_impl = (fake.P.grad.double() * diff).sum(1) * B * D / (2 * omega * diff.pow(2).sum(1))
    # The weight from the two densities (float64) at the recorded points
    a_g, s_g = alpha_sigma(sch, t_g)
    eps_hat = (x_g - a_g[:, None] * x0_hat) / s_g[:, None]
    a_m, s_m = alpha_sigma(sch, t_m)
    x_m = a_m[:, None] * x0_hat + s_m[:, None] * eps_hat            # the DDIM landing point
    log_ratio, beta, _ = _kernel_log_ratio(x_tau, x0_hat, x_m, sch, t_m, tau)
    log_w = {"exact": log_ratio, "tempered": (log_ratio - D * (beta / s_t).log()) / D,
             "off": torch.zeros(B, dtype=torch.float64)}[importance]
    # Compare where the reference is defined: tau > t_m (tau = t_m, drawn with probability ~1/200, has beta = 0
    # and q(x_tau | x_m) is a point mass) and |f - x0_hat| >= 0.05 (the read-back divides by it).
    keep = (tau > t_m) & (diff.norm(dim=1) >= 0.05)
    assert keep.sum() > 0.95 * B
    # Rounding, per sample. The implementation forms eps_hat, x_m and x_tau in float32 (<= ~16 roundings of
    # numbers <= X = max(|x_g|, |x0_hat|, |x_m|, |x_tau|): dx = 16 EPS32 X), so the reference's standardised
    # residuals r_num = (x_tau - alpha_tau x0_hat) / sigma_tau and r_den = (x_tau - a x_m) / beta, recovered
    # from the float32 points, are off by dx / sigma_tau and dx / beta, and r^2 / 2 by |r| dx / s per
    # coordinate. Its float32 beta^2 = sigma_tau^2 - (a sigma_m)^2 carries <= 16 EPS32 sigma_tau^2 (the two
    # terms are ~sigma_tau^2, each ~8 roundings), i.e. beta relative 8 EPS32 sigma_tau^2 / beta^2, which
    # moves |r_den|^2 / 2 by |r_den|^2 times that and the exact form's D log beta by D times that. The
    # tempered form divides the exponent by D (and has no log beta). The read-back adds <= 8 EPS32.
    r_num = (x_tau - a_t[:, None] * x0_hat) / s_t[:, None]                                # (B, D)
    r_den = (x_tau - (a_t / a_m)[:, None] * x_m) / beta[:, None]                          # (B, D)
    X = torch.stack([x_g.abs(), x0_hat.abs(), x_m.abs(), x_tau.abs()]).amax((0, 2))       # (B,)
    dx, rel_beta = 16 * EPS32 * X, 8 * EPS32 * s_t ** 2 / beta ** 2
    bound = (r_num.abs().sum(1) * dx / s_t + r_den.abs().sum(1) * dx / beta + r_den.pow(2).sum(1) * rel_beta
             + (D * rel_beta if importance == "exact" else 0))                                # (B,)
    bound = {"exact": bound, "tempered": bound / D, "off": 0 * bound}[importance] + 8 * EPS32
    err = (w_impl.log() - log_w).abs()
    assert (err[keep] <= bound[keep]).all(), ((err / bound)[keep].max(), importance)
    if importance != "off":
        # Power: w differs from 1 (weight ignored) and from 1/w (ratio inverted, log w -> -log w) by far more
        # than the bound (|log w| > 0.1 on a quarter of the samples; the bound is < 1e-3 everywhere).
        assert (log_w[keep].abs() > 0.1).float().mean() > 0.25, log_w[keep].abs().median()
        assert bound[keep].max() < 1e-3, bound[keep].max()


#################################################################################
#  4. The weighted fake regression's minimiser is the DSM posterior mean        #
#################################################################################

def _fake_minimiser(x_tau, x0_hat, sch, tau, w):
    """argmin over (A, b) of Eq. (7) for the linear fake f = A x_tau + b (1-D): the loss is quadratic in
    theta = (A, b), so one Newton step from 0 lands on the minimiser: theta* = -H^-1 grad."""
    theta = torch.zeros(2, dtype=torch.float64)
    loss = lambda th: tdm.fake_score_loss(th[0] * x_tau + th[1], x0_hat, sch, tau, w)
    H = torch.autograd.functional.hessian(loss, theta)                                  # (2, 2)
    g = torch.autograd.functional.jacobian(loss, theta)                                 # (2,)
    return -torch.linalg.solve(H, g)


@pytest.mark.parametrize("importance", ["exact", "tempered"])
def test_weighted_fake_regression_minimiser_is_the_dsm_posterior_mean(importance):
    """docs/method.md §6: the fake regresses x0_hat on x_tau, but x_tau is drawn through the trajectory,
    x_tau = a x_m + beta z with x_m = alpha_m x0_hat + sigma_m eps_hat (not independent of x0_hat). The
    weight w = q(x_tau | x0_hat) / q(x_tau | x_m) turns the sampling kernel into the DSM kernel
    q(x_tau | x0_hat) = N(alpha_tau x0_hat, sigma_tau^2), so Eq. (7)'s minimiser is the DSM posterior mean.
    A 1-D affine student makes x0_hat ~ N(m0, v0), and that posterior mean is linear in x_tau:
        E[x0_hat | x_tau] = A* x_tau + b*,  A* = alpha_tau v0 / (alpha_tau^2 v0 + sigma_tau^2),
        b* = m0 (1 - A* alpha_tau).
    In 1-D the tempered weight is the exact one times the constant sigma_tau / beta: the same minimiser."""
    sch = tdm.Schedule("linear", 1e-4, 0.02)
    t_g, t_m, tau = 449, 224, 424           # the step 449 -> 224 of the 4-step grid; tau in its interval
    n = 2 ** 18
    gen = torch.Generator().manual_seed(0)
    x_g = 0.3 + torch.randn(n, 1, generator=gen)                                        # (n, 1) trajectory points
    c1, c0 = 0.8, -0.5                                                                   # x0_hat = c1 x_g + c0
    x0_hat = c1 * x_g + c0
    full = lambda v: torch.full((n,), v)
    eps_hat = tdm.eps_from_x0(x_g, x0_hat, sch, full(t_g))
    x_m = tdm.ddim_step(x0_hat, eps_hat, sch, full(t_m))
    z = torch.randn(n, 1, generator=gen)
    x_tau = tdm.rediffuse(x_m, sch, full(t_m), full(tau), z)[0]
    w = tdm.importance_weight(eps_hat, z, sch, full(t_m), full(tau), exact=importance == "exact")
    theta = _fake_minimiser(x_tau.double(), x0_hat.double(), sch, full(tau), w.double())
    a_t, s_t = (v.item() for v in alpha_sigma(sch, tau))
    m0, v0 = c1 * 0.3 + c0, c1 ** 2                                                      # x0_hat ~ N(m0, v0)
    A = a_t * v0 / (a_t ** 2 * v0 + s_t ** 2)
    want = torch.tensor([A, m0 * (1 - A * a_t)], dtype=torch.float64)
    # Monte-Carlo error: the sandwich (delta-method) standard error of a weighted least-squares minimiser,
    # Cov = H^-1 (sum_i w_i^2 e_i^2 X_i X_i^T) H^-1 with X_i = (x_tau_i, 1), e_i = x0_hat_i - X_i theta,
    # H = sum_i w_i X_i X_i^T (omega is a constant here). It needs E[w^4] < inf, which holds: E_z[w^k] < inf
    # iff beta^2 > (1 - 1/k) sigma_tau^2, and beta^2 / sigma_tau^2 = 0.87 > 3/4 at t_m = 224, tau = 424.
    # Over 30 seeds, (theta - want) / se had sd ~1.14 and max |.| 3.2: 5 standard errors.
    X = torch.cat([x_tau.double(), torch.ones(n, 1, dtype=torch.float64)], 1)            # (n, 2)
    wd = w.double()
    e = x0_hat.double()[:, 0] - X @ theta                                                # (n,)
    H_inv = torch.linalg.inv(X.T @ (wd[:, None] * X))                                    # (2, 2)
    se = (H_inv @ (X.T @ (((wd * e) ** 2)[:, None] * X)) @ H_inv).diag().sqrt()          # (2,)
    assert ((theta - want).abs() <= 5 * se).all(), (theta, want, se)
    # Power: without the weight (regression on the trajectory kernel: A ~ 0.43) or with it inverted
    # (A ~ 0.53), the minimiser is off by > 20 standard errors.
    for wrong in (torch.ones_like(w), 1 / w):
        off = _fake_minimiser(x_tau.double(), x0_hat.double(), sch, full(tau), wrong.double())
        assert ((off - want).abs() > 20 * se).any(), (off, want, se)
