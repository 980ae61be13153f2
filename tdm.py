"""TDM: Trajectory Distribution Matching (Luo et al., arXiv 2503.06674, ICCV 2025).

The method only: noise schedule, K-step time grid, DDIM step, re-diffusion kernel, the student's
trajectory rollout, tau sampling, importance weight, fake-score and generator losses, TDM-unify,
and `tdm_step`, one training iteration. Networks arrive as callables in x0 form:

    student(x_t, t, cond, K) -> x0_hat      fake(x_t, t, cond, K) -> x0_hat
    teacher.denoise(x_t, t, cond) -> x0_hat (conditional; CFG is applied here with `uncond`)

`cond` is opaque: a tensor, or a tuple/dict of tensors with the batch first. Time is the teacher's
integer training timestep t in {0..999}. `Eq. (N)` is the paper's own equation number; `docs/method.md §N`
is this repository's statement of the method, where every equation the code implements is written out.
"""
import math
from dataclasses import dataclass

import torch


#################################################################################
#                Noise schedule (discrete VP, docs/method.md §1)                #
#################################################################################

class Schedule:
    """alphas_cumprod of a 1000-step discrete VP process; alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)."""

    def __init__(self, kind="linear", beta_start=1e-4, beta_end=0.02, n=1000):
        if kind == "linear":                      # PixArt-α and the toy
            betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
        elif kind == "scaled_linear":             # SD1.5 / SDXL (0.00085 ... 0.012)
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float64) ** 2
        else:
            raise ValueError(f"unknown beta schedule {kind!r}; expected 'linear' or 'scaled_linear'")
        self.kind, self.n = kind, n
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)            # (n,) float64

    def alpha(self, t):
        """alpha_t for integer timesteps t (any shape) -> float32 tensor of the same shape."""
        return self.alphas_cumprod.to(t.device)[t].sqrt().float()

    def sigma(self, t):
        return (1 - self.alphas_cumprod.to(t.device)[t]).sqrt().float()

    def snr(self, t):
        """SNR_t = alpha_t^2 / sigma_t^2."""
        ac = self.alphas_cumprod.to(t.device)[t]
        return (ac / (1 - ac)).float()


def _bc(v, x):
    """Broadcast a (B,) tensor against x of shape (B, ...)."""
    return v.reshape(-1, *([1] * (x.dim() - 1)))


def time_grid(K, t_max=899):
    """The K-step student grid [t_K, ..., t_1], spacing (t_max + 1) // K (docs/method.md §2).

    t_max = 899 is the official code (4 steps: 899, 674, 449, 224); t_max = 999 gives the paper's
    uniform grid t_i = iT/K (999, 749, 499, 249). The last step lands on the clean x0_hat.
    """
    step = (t_max + 1) // K
    if step < 1:
        raise ValueError(f"K = {K} steps do not fit below t_max = {t_max}")
    return [t_max - i * step for i in range(K)]


def landing_times(grid):
    """t_m for each grid step: the next grid time; 0 for the last step.

    The official training code uses t_g - step + 1 (one above the sampler's next time, docs/method.md §2);
    we use the sampler's own grid so training and sampling see the same trajectory.
    """
    return list(grid[1:]) + [0]


def ddim_step(x0_hat, eps_hat, schedule, t_next):
    """Deterministic DDIM (eta = 0): x_{t_next} = alpha x0_hat + sigma eps_hat (docs/method.md §2)."""
    return _bc(schedule.alpha(t_next), x0_hat) * x0_hat + _bc(schedule.sigma(t_next), x0_hat) * eps_hat


def eps_from_x0(x_t, x0_hat, schedule, t):
    """eps_hat = (x_t - alpha_t x0_hat) / sigma_t."""
    return (x_t - _bc(schedule.alpha(t), x_t) * x0_hat) / _bc(schedule.sigma(t), x_t)


def rediffuse(x_s, schedule, s, tau, z):
    """Sample q(x_tau | x_s) = N(alpha_tau/alpha_s x_s, beta^2 I), beta^2 = sigma_tau^2 - (alpha_tau sigma_s/alpha_s)^2.

    This is the official `Predictor.add_noise`; beta^2 is clamped at 0 (it rounds negative when tau ~ s).
    Returns (x_tau, a, beta) with a = alpha_tau / alpha_s.
    """
    a, beta = transition(schedule, s, tau)
    return _bc(a, x_s) * x_s + _bc(beta, x_s) * z, a, beta


def transition(schedule, s, tau):
    """(a, beta) of q(x_tau | x_s): a = alpha_tau / alpha_s, beta = sqrt(max(0, sigma_tau^2 - (a sigma_s)^2))."""
    a = schedule.alpha(tau) / schedule.alpha(s)
    return a, (schedule.sigma(tau) ** 2 - (a * schedule.sigma(s)) ** 2).clamp(min=0).sqrt()


#################################################################################
#                     Batched helpers for opaque conditions                     #
#################################################################################

def _take(cond, idx):
    """cond[idx] for a tensor, or tuple/list/dict of tensors (batch first)."""
    if cond is None or torch.is_tensor(cond):
        return None if cond is None else cond[idx]
    if isinstance(cond, dict):
        return {k: _take(v, idx) for k, v in cond.items()}
    return type(cond)(_take(c, idx) for c in cond)


def _cat(a, b):
    if torch.is_tensor(a):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    return type(a)(_cat(x, y) for x, y in zip(a, b))


def cfg_denoise(denoise, x_t, t, cond, uncond, cfg):
    """Classifier-free guidance in x0 space (equal to CFG on eps, x0 is affine in eps):
    x0_cfg = x0_u + cfg (x0_c - x0_u), with cond and uncond in ONE batched call."""
    if cfg == 1.0:
        return denoise(x_t, t, cond)
    x0 = denoise(torch.cat([x_t, x_t]), torch.cat([t, t]), _cat(cond, uncond))   # (2B, ...)
    x0_c, x0_u = x0.chunk(2)
    return x0_u + cfg * (x0_c - x0_u)


#################################################################################
#                     The student's trajectory (few-step sampler)               #
#################################################################################

@torch.no_grad()
def rollout(denoise, x_T, cond, schedule, grid, depth=None):
    """Deterministic K-step DDIM trajectory from x_T (fed in as x at t_K = grid[0]), docs/method.md §2.

    Returns (xs, x0s, eps): xs[i] is the trajectory point at grid[i] (xs[0] = x_T), x0s[i] and eps[i]
    the network's predictions there; lists of tensors shaped like x_T. `depth` (int or (B,) tensor)
    stops early: sample b needs predictions only at steps i < depth[b], so each network call runs on
    the samples that still need it (other entries stay zero) and the loop ends at the deepest step.
    """
    B, n = x_T.shape[0], len(grid)
    depth = torch.as_tensor(n if depth is None else depth, device=x_T.device).expand(B)
    t_next = landing_times(grid)
    xs, x0s, eps = [x_T], [], []
    for i in range(int(depth.max())):
        x = xs[i]
        active = (depth > i).nonzero().squeeze(1)                       # (B_active,)
        x0_i, eps_i = torch.zeros_like(x), torch.zeros_like(x)
        t = torch.full((len(active),), grid[i], device=x.device, dtype=torch.long)
        x0_i[active] = denoise(x[active], t, _take(cond, active))
        eps_i[active] = eps_from_x0(x[active], x0_i[active], schedule, t)
        x0s.append(x0_i)
        eps.append(eps_i)
        if i + 1 < n:
            xs.append(ddim_step(x0_i, eps_i, schedule, torch.full((B,), t_next[i], device=x.device)))
    return xs, x0s, eps


def sample(denoise, x_T, cond, schedule, grid):
    """The few-step (or many-step) deterministic sampler: the last x0_hat of the trajectory."""
    return rollout(denoise, x_T, cond, schedule, grid)[1][-1]


#################################################################################
#              Diffusing intervals and tau (docs/method.md §4)                  #
#################################################################################

def sample_tau(t_g, t_m, separate=True, t_max=899, tau_min=20, margin=10):
    """tau ~ U{max(tau_min, t_m), ..., upper - 1} per sample.

    separate=True: the step's own interval [t_m, t_g - margin) (official `--use_separate`, docs/method.md §4);
    separate=False: the shared interval [t_m, t_max + 1 - margin) Margins as in the official code.
    """
    low = t_m.clamp(min=tau_min)
    high = t_g - margin if separate else torch.full_like(t_g, t_max + 1 - margin)
    high = torch.maximum(high, low + 1)
    return low + (torch.rand(t_g.shape, device=t_g.device) * (high - low)).long()


def sample_landing(t_g, t_m, randmid=False, margin=20):
    """t_m, or with `randmid` a landing time ~ U[t_m, t_g - margin) (official `--use_randmid`, a regulariser)."""
    if not randmid:
        return t_m
    high = torch.maximum(t_g - margin, t_m + 1)
    return t_m + (torch.rand(t_g.shape, device=t_g.device) * (high - t_m)).long()


#################################################################################
#           Losses (Eqs. (6), (7), (10), (11); docs/method.md §5-7)             #
#################################################################################

def importance_weight(eps_hat, z, schedule, t_m, tau, exact=False):
    """w_IS = q(x_tau | x0_hat) / q(x_tau | x_m), tempered per dimension as in the official code
    (docs/method.md §6).

    m = (alpha_tau/alpha_m sigma_m eps_hat + beta z) / sigma_tau is the "mixed noise" (with the
    sigma_m factor of the 2025-10-20 fix), and w = exp(-mean(m^2)/2) / exp(-mean(z^2)/2), means over
    the non-batch dimensions, normalising constants dropped. exact=True: the true ratio of the two
    Gaussian densities, (beta / sigma_tau)^d exp(-|m|^2/2 + |z|^2/2) (E_z[w] = 1; usable in low d only:
    it degenerates at image sizes). -> (B,)
    """
    a, beta = transition(schedule, t_m, tau)
    m = (_bc(a * schedule.sigma(t_m), eps_hat) * eps_hat + _bc(beta, z) * z) / _bc(schedule.sigma(tau), z)
    dims = list(range(1, z.dim()))
    if exact:
        d = z[0].numel()
        log_w = -0.5 * m.pow(2).sum(dims) + 0.5 * z.pow(2).sum(dims) + d * torch.log(beta / schedule.sigma(tau))
        return torch.exp(log_w)
    return torch.exp(-0.5 * m.pow(2).mean(dims) + 0.5 * z.pow(2).mean(dims))


def fake_score_loss(f_x0, x0_hat, schedule, tau, w_is, snr_clamp=5.0, r_x0=None, reg=0.0):
    """Eq. (7): mean_b[ mean_dims (f_psi(x_tau, tau) - x0_hat)^2 * min(SNR_tau, snr_clamp) * w_IS ] (official 5).

    With r_x0 (the teacher's conditional x0 at x_tau) and reg > 0, adds reg * (f - r)^2 under the same SNR
    weight: the fake is pulled toward the teacher, as in the authors' flow-matching follow-up (0.02, no w_IS;
    docs/method.md §5). Where student and teacher agree this only damps the fake's sampling noise.
    """
    dims = list(range(1, f_x0.dim()))
    mse = (f_x0 - x0_hat).pow(2).mean(dims)                                   # (B,)
    omega = schedule.snr(tau).clamp(max=snr_clamp)                             # (B,)
    loss = mse * omega * w_is
    if reg:
        if r_x0 is None:
            raise ValueError("fake_score_loss: reg > 0 needs r_x0, the teacher's x0 prediction at x_tau")
        loss = loss + reg * (f_x0 - r_x0).pow(2).mean(dims) * omega
    return loss.mean()


def generator_loss(x0_hat, r_cfg, f_x0, huber_c=1e-3, loss="huber", normalise=True):
    """Surrogate of the reverse-KL gradient (Eq. (6)) on x0_hat, as the official code does (docs/method.md §7).

    target = sg(x0_hat) + (r_c - f) + (cfg - 1)(r_c - r_u) = sg(x0_hat) + (r_cfg - f), d = x0_hat - target;
    loss "huber": element-wise pseudo-Huber sqrt(d^2 + c^2) - c (official, c = 1e-3); "huber-sample": the
    paper's Eq. (11), per-sample sqrt(|d|^2 + c^2) - c with c = 0.00054 sqrt(dim); "mse": d^2 (Eq. (10)).
    Each sample is divided by w = mean|x0_hat - r_cfg| (DMD normaliser) unless normalise=False.
    """
    if loss not in ("huber", "huber-sample", "mse"):
        raise ValueError(f"generator loss {loss!r}: expected 'huber', 'huber-sample' or 'mse'")
    dims = list(range(1, x0_hat.dim()))
    target = (x0_hat + (r_cfg - f_x0)).detach()          # grouped so that f = r_cfg gives exactly x0_hat
    d2 = (x0_hat - target).pow(2)
    if loss == "huber-sample":
        c = 0.00054 * math.sqrt(d2[0].numel())
        per_sample = (d2.sum(dims) + c ** 2).sqrt() - c                               # (B,)
    else:
        per_sample = ((d2 + huber_c ** 2).sqrt() - huber_c if loss == "huber" else d2).mean(dims)   # (B,)
    if normalise:
        w = (x0_hat.detach().double() - r_cfg.double()).abs().mean(dims).float().clamp(min=1e-12)   # (B,)
        per_sample = per_sample / w
    return per_sample.mean()


#################################################################################
#               One training iteration (docs/method.md §9)                      #
#################################################################################

@dataclass
class TDMConfig:
    """Hyper-parameters of one TDM iteration; defaults follow the official code (docs/method.md §11)."""
    K: int = 4                       # student steps
    t_max: int = 899                 # first grid time (official 899; paper 999)
    unify: tuple = ()                # TDM-unify: step counts to draw K from per batch, e.g. (1, 2, 4)
    cfg: float = 4.5                 # guidance of the real (teacher) score only
    separate: bool = True            # diffusing interval [t_m, t_g) per step (else [t_m, T))
    randmid: bool = False            # random landing time (official --use_randmid)
    importance: str = "tempered"     # fake-loss weight: "tempered" (official), "exact" (low d only) or "off"
    loss: str = "huber"              # generator loss: "huber" (official element-wise), "huber-sample" (paper), "mse"
    huber_c: float = 1e-3
    normalise: bool = True           # DMD per-sample normaliser 1 / mean|x0_hat - r_cfg|
    snr_clamp: float = 5.0           # omega_tau = min(SNR_tau, 5) official (train.py's toy: 1000, plain eps-MSE)
    tau_min: int = 20
    margin: int = 10
    fake_updates: int = 1            # fake-score updates per generator update (official 1)
    fake_reg: float = 0.0            # pull the fake toward the teacher (authors' follow-up: 0.02; official 0)
    grad_clip: float = 1.0           # student only (official); <= 0 turns it off
    fake_grad_clip: float = 0.0      # official: none
    lockstep: bool = False           # FSDP: rollouts to K-1, whole batch, same calls per rank (docs/method.md §14)

    def __post_init__(self):
        if self.importance not in ("tempered", "exact", "off"):
            raise ValueError(f"importance={self.importance!r}: expected 'tempered' (official), 'exact' or 'off'")


def _step_times(k, grid, t_next):
    """Grid time t_g and landing time t_m for per-sample step indices k (0 = first, noisiest step)."""
    return torch.tensor(grid, device=k.device)[k], torch.tensor(t_next, device=k.device)[k]


def _gather(points, k):
    """points: list over steps of (B, ...) tensors; k: (B,) step indices -> (B, ...) per-sample pick."""
    stacked = torch.stack(points)                                        # (n, B, ...)
    return stacked[k, torch.arange(k.shape[0], device=k.device)]         # (B, ...)


def with_step_count(net, K, unify):
    """(x_t, t, cond, K) -> x0_hat  to  (x_t, t, cond) -> x0_hat: under TDM-unify (Eq. (8)) the step count K is
    passed as a (B,) condition, otherwise None."""
    if not unify:
        return lambda x, t, cond: net(x, t, cond, None)
    return lambda x, t, cond: net(x, t, cond, torch.full((x.shape[0],), K, device=x.device, dtype=torch.long))


def tdm_step(student, fake, teacher, cond, uncond, opt_student, opt_fake, config, x_T=None, scaler=None):
    """One TDM iteration: roll out the student, score its sample, update the student, then the fake score.

    student, fake: callables (x_t, t, cond, K) -> x0_hat whose parameters the optimisers hold;
    teacher: has `.schedule` and `.denoise(x_t, t, cond) -> x0_hat`; scaler: a torch.amp.GradScaler for fp16
    autocast, or None. Returns a dict of floats.
    """
    c, sch = config, teacher.schedule
    B, device = (x_T.shape[0], x_T.device) if x_T is not None else _batch_size_and_device(cond)
    if x_T is None:
        x_T = torch.randn((B, *teacher.sample_shape), device=device)
    # TDM-unify (Eq. (8)): one K per batch, given to student and fake as a condition; each K on its own grid.
    K = c.unify[torch.randint(len(c.unify), ()).item()] if c.unify else c.K
    grid = time_grid(K, c.t_max)
    t_next = landing_times(grid)

    stu, fak = with_step_count(student, K, bool(c.unify)), with_step_count(fake, K, bool(c.unify))

    # Each sample matches one step k: the sum over i in Eq. (5) is realised by per-sample draws (docs/method.md §3).
    # One draw and one student prediction serve both phases: the generator needs x0_hat at x_{t_k} with
    # grad, the fake score the same x0_hat as its target (the official code draws k twice and computes
    # the prediction three times: in the rollout, in the fake phase and in the generator phase).
    k = torch.randint(K, (B,), device=device)
    t_g, t_m_grid = _step_times(k, grid, t_next)
    # (1) The student's trajectory up to each sample's point x_{t_k}: k calls, no grad.
    xs, _, _ = rollout(stu, x_T, cond, sch, grid, depth=torch.full_like(k, K - 1) if c.lockstep else k)
    x_g = _gather(xs, k)                                                 # (B, ...) detached x_{t_k}
    x0_hat = stu(x_g, t_g, cond)                                         # the only path with grad
    x0_sg = x0_hat.detach()
    eps_sg = eps_from_x0(x_g, x0_sg, sch, t_g)

    def diffused(t_m):   # land on t_m with the DDIM step, then x_tau ~ q(x_tau | x_{t_m}) (Eq. (5))
        x_m = ddim_step(x0_sg, eps_sg, sch, t_m)                         # the trajectory point x_{t_i}
        tau = sample_tau(t_g, t_m, c.separate, c.t_max, c.tau_min, c.margin)
        z = torch.randn_like(x_m)
        return rediffuse(x_m, sch, t_m, tau, z)[0], tau, z

    # (2) The generator's targets (Eq. (6); fresh landing, tau and z), with the fake score as it stands.
    with torch.no_grad():
        x_tau, tau, _ = diffused(sample_landing(t_g, t_m_grid, c.randmid))
        r_cfg = cfg_denoise(teacher.denoise, x_tau, tau, cond, uncond, c.cfg)   # real score, with CFG
        f_x0 = fak(x_tau, tau, cond)                                             # fake score, no CFG

    # (3) Generator update through one student step (surrogate Eqs. (10)-(11)). The generator goes before the
    # fake (the official code does the reverse) for two reasons: the one student forward x0_hat serves both
    # updates (the fake's target is its detached value), and only one autograd graph is in memory at a time
    # (the student's is freed before the fake builds its own). docs/method.md §9.
    loss_gen = generator_loss(x0_hat, r_cfg, f_x0, c.huber_c, c.loss, c.normalise)
    logs = dict(grad_norm=_update(opt_student, loss_gen, c.grad_clip, scaler), loss_gen=loss_gen.item(), K=K)

    # (4) Fake-score update (Eq. (7)) on the student's own prediction (x0_hat from before the student's step).
    for _ in range(c.fake_updates):
        t_m = sample_landing(t_g, t_m_grid, c.randmid)
        x_tau, tau, z = diffused(t_m)
        w_is = torch.ones(B, device=device) if c.importance == "off" else \
            importance_weight(eps_sg, z, sch, t_m, tau, exact=c.importance == "exact")
        r_x0 = teacher.denoise(x_tau, tau, cond) if c.fake_reg else None   # no grad; conditional, like the fake
        loss_fake = fake_score_loss(fak(x_tau, tau, cond), x0_sg, sch, tau, w_is, c.snr_clamp, r_x0, c.fake_reg)
        _update(opt_fake, loss_fake, c.fake_grad_clip, scaler, norm=False)
        logs.update(loss_fake=loss_fake.item(), w_is=w_is.mean().item())
    if scaler is not None:
        scaler.update()
    return logs


def _update(opt, loss, max_norm, scaler=None, norm=True):
    """Backward and optimiser step, clipping the gradient norm at max_norm (> 0); with a GradScaler the loss is
    scaled for the backward and the gradients unscaled before clipping. -> the norm before clipping, if asked."""
    opt.zero_grad(set_to_none=True)
    (loss if scaler is None else scaler.scale(loss)).backward()
    if scaler is not None:
        scaler.unscale_(opt)
    norm = _clip(opt, max_norm) if norm or (max_norm and max_norm > 0) else None
    opt.step() if scaler is None else scaler.step(opt)
    return norm


def _clip(opt, max_norm):
    params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    if max_norm and max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    if not params:
        return 0.0
    norms = torch.stack([p.grad.detach().float().norm() for p in params])   # (n_params,): one sync, not one each
    return norms.norm().item()


def _batch_size_and_device(cond):
    """(B, device) of the first tensor in an opaque condition (a tensor, or a tuple/list/dict of them)."""
    while not torch.is_tensor(cond):
        cond = next(iter(cond.values())) if isinstance(cond, dict) else cond[0]
    return cond.shape[0], cond.device
