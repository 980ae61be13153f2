"""The 2-D toy problem: Gaussian-mixture targets with a closed-form denoiser, and the MLP teacher fitted to them.

    GMM                   sum_k pi_k N(mu_k, Sigma_k), one class label per component; exact E[x0 | x_t, label]
    ring_target, grid_target, load_target    the targets train.py's --toy-target names (or a .json file)
    prediction_target     what an eps- or v-prediction network regresses on (the inverse of
                          teachers.x0_from_prediction)
    fit_toy_teacher       denoising score matching of a toy MLP to a GMM, with label dropout for CFG
    fitted_toy_network    that MLP, fitted once per target and settings, cached under $TDM_CACHE

teachers.py wraps these into the toy teachers (ToyTeacher: the fitted MLP; ExactToyTeacher: the closed form).
"""
import hashlib
import json
import math
import os

import torch

import tdm
from models import cache_dir, read_state_dict, save_safetensors, toy_mlp


#################################################################################
#                          Gaussian mixtures (toy targets)                      #
#################################################################################

class GMM:
    """sum_k pi_k N(mu_k, Sigma_k) with a class label per component (class-conditional = renormalised subset)."""

    def __init__(self, means, covs, weights, classes, name="gmm"):
        self.means = torch.as_tensor(means, dtype=torch.float64)            # (M, D)
        self.covs = torch.as_tensor(covs, dtype=torch.float64)              # (M, D, D)
        w = torch.as_tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()                                          # (M,)
        self.classes = torch.as_tensor(classes, dtype=torch.long)           # (M,)
        self.n_classes = int(self.classes.max()) + 1
        self.name = name
        M, D = self.means.shape
        if self.covs.shape != (M, D, D) or self.weights.shape != (M,) or self.classes.shape != (M,):
            raise ValueError(f"GMM {name!r}: {M} means of dim {D} need covs ({M},{D},{D}), weights ({M},) and "
                             f"classes ({M},); got {tuple(self.covs.shape)}, {tuple(self.weights.shape)}, "
                             f"{tuple(self.classes.shape)}")
        if set(self.classes.tolist()) != set(range(self.n_classes)):
            raise ValueError(f"GMM {name!r}: classes must be 0..C-1 with every class used; got {self.classes.tolist()}")
        self.chol, info = torch.linalg.cholesky_ex(self.covs)          # (M, D, D) lower factors, for sample()
        bad = info.nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"GMM {name!r}: the covariance of component(s) {bad} is not positive definite; "
                             "give symmetric matrices with positive eigenvalues (or use 'stds')")

    @property
    def dim(self):
        return self.means.shape[1]

    def class_prior(self):
        """(C,) probability of each class."""
        return torch.zeros(self.n_classes, dtype=torch.float64).index_add_(0, self.classes, self.weights)

    def _log_w(self, labels):
        """(B, M) log mixture weights given labels (label == n_classes: the null class, all components)."""
        lw = self.weights.log().expand(labels.shape[0], -1).clone()
        keep = (self.classes[None] == labels[:, None]) | (labels[:, None] == self.n_classes)
        return lw.masked_fill(~keep, -math.inf)

    def sample(self, n, labels=None, generator=None):
        """n samples (n, D) float32; labels (n,) drawn from the class prior when not given."""
        if labels is None:
            labels = torch.multinomial(self.class_prior(), n, replacement=True, generator=generator)
        comp = torch.multinomial(self._log_w(labels.cpu()).softmax(-1), 1, generator=generator).squeeze(1)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        x = self.means[comp] + (self.chol[comp] @ z[:, :, None]).squeeze(-1)
        return x.float(), labels

    def _posterior(self, x, alpha, sigma, labels):
        """Per-component log N(x; alpha mu_k, alpha^2 Sigma_k + sigma^2 I) + log w and the component means of x0."""
        x = x.double()
        a, s = alpha.double()[:, None, None, None], sigma.double()[:, None, None, None]   # (B,1,1,1)
        eye = torch.eye(self.dim, dtype=torch.float64)
        S = a ** 2 * self.covs[None] + s ** 2 * eye                                       # (B, M, D, D)
        r = x[:, None, :] - a[..., 0] * self.means[None]                                   # (B, M, D)
        Sinv_r = torch.linalg.solve(S, r[..., None])                                       # (B, M, D, 1)
        logp = -0.5 * (r[..., None] * Sinv_r).sum((-1, -2)) - 0.5 * torch.logdet(S) \
            - 0.5 * self.dim * math.log(2 * math.pi) + self._log_w(labels.cpu()).to(x.device)  # (B, M)
        mu0 = self.means[None] + a[..., 0] * (self.covs[None] @ Sinv_r).squeeze(-1)        # (B, M, D)
        return logp, mu0

    def denoise(self, x_t, alpha, sigma, labels):
        """Exact E[x0 | x_t, label] for x_t = alpha x0 + sigma z; alpha, sigma, labels: (B,)."""
        logp, mu0 = self._posterior(x_t, alpha, sigma, labels)
        return (logp.softmax(-1)[..., None] * mu0).sum(1).to(x_t.dtype)

    def log_prob(self, x, labels=None):
        """log p(x) (or log p(x | label)) under the mixture -> (B,)."""
        labels = torch.full((x.shape[0],), self.n_classes) if labels is None else labels
        one, zero = torch.ones(x.shape[0]), torch.zeros(x.shape[0])
        return torch.logsumexp(self._posterior(x.cpu(), one, zero, labels)[0], -1)

    def responsibilities(self, x):
        """(B, M) posterior probability of each component for clean points x (mode assignment)."""
        one, zero = torch.ones(x.shape[0]), torch.zeros(x.shape[0])
        return self._posterior(x.cpu(), one, zero, torch.full((x.shape[0],), self.n_classes))[0].softmax(-1)

    def spec(self):
        return dict(name=self.name, means=self.means.tolist(), covs=self.covs.tolist(),
                    weights=self.weights.tolist(), classes=self.classes.tolist())


def ring_target(n_modes=8, radius=2.0, std=0.1):
    """Default toy target: 8 modes on a circle, alternating between 2 classes."""
    ang = torch.arange(n_modes) * 2 * math.pi / n_modes
    means = radius * torch.stack([ang.cos(), ang.sin()], 1)
    return GMM(means, std ** 2 * torch.eye(2).expand(n_modes, 2, 2), torch.ones(n_modes),
               torch.arange(n_modes) % 2, name="ring")


def grid_target(n=5, spacing=1.0, std=0.1):
    """A 5x5 grid of modes, checkerboard classes."""
    c = (torch.arange(n) - (n - 1) / 2) * spacing
    means = torch.cartesian_prod(c, c)                                     # (n*n, 2)
    classes = (torch.arange(n)[:, None] + torch.arange(n)[None]).flatten() % 2
    return GMM(means, std ** 2 * torch.eye(2).expand(n * n, 2, 2), torch.ones(n * n), classes, name="grid")


def load_target(name):
    """'ring', 'grid', or a JSON file with `means`, `covs` or `stds`, optional `weights` and `classes`."""
    if name == "ring":
        return ring_target()
    if name == "grid":
        return grid_target()
    if not name.endswith(".json"):
        raise ValueError(f"unknown toy target {name!r}: use 'ring', 'grid' or a path to a .json GMM file")
    if not os.path.exists(name):
        raise FileNotFoundError(f"toy target file {name!r} not found")
    with open(name) as f:
        spec = json.load(f)
    if "means" not in spec or ("covs" in spec) == ("stds" in spec):
        raise ValueError(f"{name}: a GMM file needs 'means' and exactly one of 'covs' (M x D x D) or 'stds' "
                         f"(M scalars or M x D); found keys {sorted(spec)}")
    means = torch.tensor(spec["means"], dtype=torch.float64)
    if means.dim() != 2:
        raise ValueError(f"{name}: 'means' must be a list of points (M x D), got shape {tuple(means.shape)}")
    M, D = means.shape
    if "covs" in spec:
        covs = torch.tensor(spec["covs"], dtype=torch.float64)
    else:
        stds = torch.tensor(spec["stds"], dtype=torch.float64)
        stds = stds[:, None].expand(M, D) if stds.dim() == 1 else stds
        covs = torch.diag_embed(stds ** 2)
    return GMM(means, covs, spec.get("weights", [1.0] * M), spec.get("classes", [0] * M),
               name=os.path.splitext(os.path.basename(name))[0])


#################################################################################
#                          The fitted toy teacher network                       #
#################################################################################

def prediction_target(x0, eps, schedule, t, prediction):
    """The inverse: what a network of this prediction type regresses on for x_t = alpha x0 + sigma eps
    (epsilon: eps; v_prediction: v = alpha eps - sigma x0). Used to fit the toy teacher."""
    if prediction == "epsilon":
        return eps
    if prediction == "v_prediction":
        return tdm._bc(schedule.alpha(t), x0) * eps - tdm._bc(schedule.sigma(t), x0) * x0
    raise ValueError(f"prediction type {prediction!r}: expected 'epsilon' or 'v_prediction'")



def fit_toy_teacher(gmm, iters=2000, batch=1024, lr=2e-3, p_uncond=0.1, seed=0, width=128, depth=3,
                    prediction="v_prediction", log=print):
    """Fit an MLP to the GMM by denoising score matching (eps or v target), t ~ U{0..999}, label dropout for CFG."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = toy_mlp(dim=gmm.dim, n_classes=gmm.n_classes, width=width, depth=depth)
    sch = tdm.Schedule("linear", 1e-4, 0.02)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    lr_at = lambda i: lr * 0.5 * (1 + math.cos(math.pi * i / iters))                 # cosine to zero
    for i in range(iters):
        x0, y = gmm.sample(batch, generator=gen)
        y = torch.where(torch.rand(batch, generator=gen) < p_uncond, gmm.n_classes, y)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        x_t = sch.alpha(t)[:, None] * x0 + sch.sigma(t)[:, None] * eps
        loss = (net(x_t, t, y) - prediction_target(x0, eps, sch, t, prediction)).pow(2).mean()
        for g in opt.param_groups:
            g["lr"] = lr_at(i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log and (i + 1) % 1000 == 0:
            log(f"  toy teacher fit {i + 1}/{iters}: {prediction}-MSE {loss.item():.4f}")
    return net.eval().requires_grad_(False)


def fitted_toy_network(gmm, iters=None, seed=0, log=print):
    """The toy teacher's MLP for a target, fitted once and cached under cache_dir() by target and settings.

    Fitting runs max(2000, 250 x modes) iterations: the 8-mode ring needs 2,000 (~30 s), the 25-mode grid
    6,250 (with 2,000 its 100-step sampler left 31% of the mass between modes; with 6,000, 3.5%).
    """
    iters = iters or max(2000, 250 * len(gmm.weights))
    key = hashlib.sha1(json.dumps([gmm.spec(), iters, seed, "v-pred 128x3"]).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir(), f"toy_teacher_{gmm.name}_{key}.safetensors")
    # Built on both paths: its initialisation draws from the global RNG, so a run draws the same noise whether
    # the fit was cached or not.
    net = toy_mlp(dim=gmm.dim, n_classes=gmm.n_classes)
    if os.path.exists(path):
        net.load_state_dict(read_state_dict(path))
        return net.eval().requires_grad_(False)
    if log:
        log(f"fitting the toy teacher on {gmm.name!r} ({iters} iterations; cached at {path})")
    net = fit_toy_teacher(gmm, iters=iters, seed=seed, log=log)
    save_safetensors(net.state_dict(), path)      # creates the cache folder
    return net
