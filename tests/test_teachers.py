"""teachers.py: network output -> x0 for every prediction type, the Gaussian-mixture targets and the toy teachers, and
the PixArt-α teacher on a tiny random pipeline folder (x0 parity with diffusers / transformers, LoRA off for the
teacher, the prompt-embedding cache, the empty-prompt uncond, VAE decoding, parity with PixArtAlphaPipeline, and
clear errors for bad folders). `§N` is docs/method.md's section N.
"""
import copy
import json
import os
import shutil

import diffusers
import pytest
import torch
import transformers

import models
import pixart
import sample as S
import t5
import tdm
import teachers as P
import toy
from fixtures import DIT, alpha_sigma as _at, dit_inputs, randomize

transformers.logging.set_verbosity_error()
diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()
PROMPTS = ["A photo of a cat sitting on the red chair", "astronaut riding a horse in space, van gogh style", ""]
TOL = 1e-5


def ref_alphas_cumprod():
    """Independent float64 PixArt schedule: linear betas 1e-4..0.02, 1000 steps."""
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)


#################################################################################
#                 Network output -> x0 (§1, (M3)-(M5))                          #
#################################################################################

@pytest.mark.parametrize("shape", [(6, 2), (3, 4, 5, 5)])
def test_x0_from_prediction_closed_forms(shape):
    """x_t = alpha x0 + sigma eps with known x0 and eps: each prediction type's exact target gives x0 back, within the
    float32 rounding of (x_t - sigma eps) / alpha (1/alpha up to 1/alpha_999 = 157 magnifies it: compared as
    alpha |x0_hat - x0|) and of alpha x_t - sigma v (|v|, |x_t| < ~8: 1e-6)."""
    sch = tdm.Schedule()
    g = torch.Generator().manual_seed(0)
    B, C = shape[:2]
    x0, eps = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.tensor([999, 899, 500, 224, 20, 0][:B])
    a, s = (v.reshape(-1, *[1] * (len(shape) - 1)) for v in _at(sch, t))
    x_t = (a * x0 + s * eps).float()
    v = a * eps - s * x0                                                       # (M4): v = alpha eps - sigma x0
    ref = lambda out: ((x_t.double() - s * out.double()) / a)                  # (M3) in float64 on the float32 x_t
    got = P.x0_from_prediction(eps.float(), x_t, sch, t, "epsilon")
    assert got.dtype == torch.float32 and ((got.double() - ref(eps.float())) * a).abs().max() < 1e-6
    assert ((got.double() - x0) * a).abs().max() < 1e-5                       # x0 itself, alpha-scaled
    got = P.x0_from_prediction(v.float(), x_t, sch, t, "v_prediction")
    assert (got.double() - x0).abs().max() < 1e-5 and (got.double() - (a * x_t.double() - s * v.float().double())).abs().max() < 1e-6
    # learned variance: the first C channels are eps, the other C are dropped (official chunk(2, dim=1)[0])
    with_var = torch.cat([eps.float(), 100 * torch.randn(shape, generator=g)], dim=1)          # (B, 2C, ...)
    assert torch.equal(P.x0_from_prediction(with_var, x_t, sch, t, "epsilon+variance"),
                       P.x0_from_prediction(eps.float(), x_t, sch, t, "epsilon"))
    assert torch.equal(P.x0_from_prediction(eps.float(), x_t, sch, t, "epsilon+variance"),        # C channels: eps
                       P.x0_from_prediction(eps.float(), x_t, sch, t, "epsilon"))
    # the inverse: what a network of each type regresses on
    for kind in ("epsilon", "v_prediction"):
        target = toy.prediction_target(x0.float(), eps.float(), sch, t, kind)
        assert torch.allclose(target.double(), eps if kind == "epsilon" else v, atol=1e-6)
        assert ((P.x0_from_prediction(target, x_t, sch, t, kind).double() - x0) * a).abs().max() < 1e-5
    with pytest.raises(ValueError, match="prediction type 'sample'"):
        P.x0_from_prediction(eps.float(), x_t, sch, t, "sample")
    with pytest.raises(ValueError, match="prediction type 'epsilon\\+variance'"):
        toy.prediction_target(x0, eps, sch, t, "epsilon+variance")


def test_x0_from_prediction_computes_in_float32_and_returns_the_input_dtype():
    """A bf16 x_t and bf16 eps: x0 computed in float32 from them, then rounded once to bf16 (§12)."""
    sch = tdm.Schedule()
    g = torch.Generator().manual_seed(1)
    x_t, eps = torch.randn(4, 3, generator=g).bfloat16(), torch.randn(4, 3, generator=g).bfloat16()
    t = torch.tensor([999, 600, 300, 10])
    got = P.x0_from_prediction(eps, x_t, sch, t, "epsilon")
    assert got.dtype == torch.bfloat16
    a, s = sch.alpha(t)[:, None], sch.sigma(t)[:, None]
    assert torch.equal(got, ((x_t.float() - s * eps.float()) / a).bfloat16())


#################################################################################
#              Gaussian mixtures: the exact denoiser and target files           #
#################################################################################

def _json_gmm(tmp_path, **spec):
    path = tmp_path / "gmm.json"
    path.write_text(json.dumps(spec))
    return str(path)


JSON_GMM = dict(means=[[1.0, 0.0, 0.0], [-1.0, 1.0, 0.5], [0.0, -1.0, 1.0]],
                covs=[[[0.30, 0.10, 0.00], [0.10, 0.20, 0.05], [0.00, 0.05, 0.10]],
                      [[0.10, -0.05, 0.02], [-0.05, 0.40, 0.00], [0.02, 0.00, 0.20]],
                      [[0.25, 0.00, 0.10], [0.00, 0.05, 0.00], [0.10, 0.00, 0.30]]],
                weights=[0.5, 0.3, 0.2], classes=[0, 0, 1])


def _prior_samples(gmm, label, n, gen):
    """x0 ~ p(x0 | label) drawn here from the mixture's parameters (not with GMM.sample, which shares the
    label masking with GMM.denoise): components of that class (all for the null label), by weight."""
    keep = (gmm.classes == label) | (label == gmm.n_classes)
    comp = torch.multinomial(gmm.weights * keep, n, replacement=True, generator=gen)
    z = torch.randn(n, gmm.dim, generator=gen, dtype=torch.float64)
    return gmm.means[comp] + (torch.linalg.cholesky(gmm.covs)[comp] @ z[:, :, None])[..., 0]


@pytest.mark.parametrize("target", ["ring", "json"])
def test_gmm_denoiser_matches_monte_carlo_posterior_mean(target, tmp_path):
    gmm = toy.ring_target() if target == "ring" else toy.load_target(_json_gmm(tmp_path, **JSON_GMM))
    sch = tdm.Schedule()
    gen = torch.Generator().manual_seed(0)
    n = 100_000
    for t in (200, 400, 600):
        a, s = _at(sch, t)
        for label in range(gmm.n_classes + 1):                       # every class, then the null class
            lab = torch.tensor([label])
            x0 = _prior_samples(gmm, label, 1, gen)
            x_t = (a * x0 + s * torch.randn(x0.shape, generator=gen, dtype=torch.float64)).float()   # (1, D)
            exact = gmm.denoise(x_t, a.float()[None], s.float()[None], lab)[0].double()
            # Self-normalised importance sampling with the prior as proposal:
            # E[x0 | x_t] = sum_i w_i x0_i, w_i ∝ q(x_t | x0_i) = N(x_t; alpha x0_i, sigma^2 I).
            prior = _prior_samples(gmm, label, n, gen)                                       # (n, D)
            w = (-(x_t.double() - a * prior).pow(2).sum(1) / (2 * s ** 2)).softmax(0)      # (n,)
            mc = w @ prior
            # Delta-method standard error of the SNIS estimate, estimated from the weights:
            # se^2 = sum_i w_i^2 (x0_i - mc)^2 (valid when the effective sample size is large).
            se = (w[:, None] ** 2 * (prior - mc) ** 2).sum(0).sqrt()
            assert 1 / w.pow(2).sum() > 1000, "effective sample size too small for a reliable SE"
            # 5 standard errors (per coordinate; ~40 coordinates are tested, P(|z| > 5) ~ 6e-7 each),
            # plus the float32 rounding of the denoiser's output (~1e-7 |x|).
            tol = 5 * se + 1e-6
            assert ((exact - mc).abs() <= tol).all(), (target, t, label, exact, mc, se)


def test_gmm_checks_its_parameters():
    eye = torch.eye(2).expand(2, 2, 2)
    with pytest.raises(ValueError, match=r"need covs \(2,2,2\)"):
        toy.GMM(torch.zeros(2, 2), torch.eye(2).expand(3, 2, 2), [1, 1], [0, 1])
    with pytest.raises(ValueError, match=r"classes must be 0..C-1 with every class used; got \[0, 2\]"):
        toy.GMM(torch.zeros(2, 2), eye, [1, 1], [0, 2])
    gmm = toy.GMM(torch.tensor([[0.0, 0.0], [3.0, 0.0]]), eye, [3.0, 1.0], [0, 1], name="two")
    assert torch.allclose(gmm.weights, torch.tensor([0.75, 0.25], dtype=torch.float64))      # normalised
    assert torch.allclose(gmm.class_prior(), gmm.weights)
    assert gmm.spec() == dict(name="two", means=[[0.0, 0.0], [3.0, 0.0]], covs=eye.tolist(), weights=[0.75, 0.25],
                              classes=[0, 1])
    # label n_classes (the null class of CFG) is the whole mixture: its log-density is the log-sum of the classes'
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    per_class = torch.stack([gmm.log_prob(x, torch.full((5,), c)) for c in (0, 1)])
    assert torch.allclose(gmm.log_prob(x), torch.logsumexp(per_class, 0))
    assert torch.allclose(gmm.log_prob(x, torch.full((5,), 2)), gmm.log_prob(x))


def test_bad_targets_and_teacher_names_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown toy target 'nope'"):
        toy.load_target("nope")
    with pytest.raises(ValueError, match=r"'means'.*found keys \['covs'\]"):
        toy.load_target(_json_gmm(tmp_path, covs=JSON_GMM["covs"]))
    with pytest.raises(ValueError, match="exactly one of 'covs'"):
        toy.load_target(_json_gmm(tmp_path, means=[[0.0, 0.0]], covs=[[[1.0, 0.0], [0.0, 1.0]]], stds=[1.0]))
    with pytest.raises(FileNotFoundError, match="not found"):
        toy.load_target(str(tmp_path / "missing.json"))
    # eigenvalues 3 and -1: not positive definite
    with pytest.raises((ValueError, RuntimeError), match="positive.definite"):   # torch.linalg.LinAlgError
        toy.load_target(_json_gmm(tmp_path, means=[[0.0, 0.0]], covs=[[[1.0, 2.0], [2.0, 1.0]]]))
    with pytest.raises(ValueError, match="unknown teacher 'nope'"):
        P.load_teacher("nope")
    with pytest.raises(ValueError, match="the toy teachers take no weights"):
        P.load_teacher("toy", "some/folder")
    with pytest.raises(ValueError, match="--teacher pixart needs --weights PATH"):
        P.load_teacher("pixart")
    # stds: one per mode, or per mode and dimension
    gmm = toy.load_target(_json_gmm(tmp_path, means=[[0.0, 0.0], [1.0, 1.0]], stds=[[0.1, 0.2], [0.3, 0.4]]))
    assert torch.allclose(gmm.covs[1], torch.diag(torch.tensor([0.09, 0.16], dtype=torch.float64)))
    assert gmm.name == "gmm" and gmm.n_classes == 1 and torch.allclose(gmm.weights, torch.full((2,), 0.5,
                                                                                           dtype=torch.float64))


#################################################################################
#                          Toy teachers                                         #
#################################################################################

def test_teachers_dict_and_what_each_teacher_brings():
    assert set(P.TEACHERS) == {"toy", "toy-exact", "pixart", "sd15", "sdxl"}
    assert [P.TEACHERS[k].OUTPUT for k in P.TEACHERS] == ["points", "points", "images", "images", "images"]
    assert P.TEACHERS["toy-exact"].DEFAULTS == P.TEACHERS["toy"].DEFAULTS
    assert P.TEACHERS["pixart"].PREDICTION == "epsilon+variance" and P.ToyTeacher(toy.ring_target(), models.toy_mlp(
        width=8, depth=1)).prediction == "v_prediction"
    assert all(issubclass(P.TEACHERS[k], P.LatentTextToImageTeacher) for k in ("pixart", "sd15", "sdxl"))


def test_fitted_toy_network_is_fitted_once_then_read_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TDM_CACHE", str(tmp_path / "cache"))
    fits, real_fit = [], toy.fit_toy_teacher
    monkeypatch.setattr(toy, "fit_toy_teacher", lambda gmm, **kw: fits.append(kw) or real_fit(gmm, **{**kw, "batch": 64}))
    gmm = toy.ring_target()
    a = toy.fitted_toy_network(gmm, iters=20, log=None)
    assert len(fits) == 1 and fits[0]["iters"] == 20 and os.listdir(tmp_path / "cache")
    b = toy.fitted_toy_network(gmm, iters=20, log=None)
    assert len(fits) == 1                                                     # read back, not fitted again
    assert a.state_dict().keys() == b.state_dict().keys() and all(
        torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert not b.training and not any(p.requires_grad for p in b.parameters())
    toy.fitted_toy_network(gmm, iters=21, log=None)                             # other settings: another entry
    assert len(fits) == 2 and len(os.listdir(tmp_path / "cache")) == 2


def test_toy_teacher_interface(monkeypatch, tmp_path):
    monkeypatch.setenv("TDM_CACHE", str(tmp_path / "cache"))
    real_fit = toy.fit_toy_teacher
    monkeypatch.setattr(toy, "fit_toy_teacher", lambda gmm, **kw: real_fit(gmm, **{**kw, "iters": 10, "batch": 64}))
    teacher = P.load_teacher("toy", target="grid", log=None)
    assert isinstance(teacher, P.ToyTeacher) and not teacher.exact and teacher.run_name == "toy-grid"
    assert teacher.sample_shape == (2,) and teacher.n_classes == 2 and teacher.device == torch.device("cpu")
    assert teacher.run_meta() == dict(target="grid", weights=None, network=teacher.network.config)
    torch.manual_seed(0)
    cond, uncond = teacher.training_conditions(64)
    assert cond.dtype == torch.long and set(cond.tolist()) <= {0, 1} and torch.equal(uncond, torch.full((64,), 2))
    x = torch.randn(64, 2)
    assert torch.equal(teacher.decode(x), x)
    t = torch.randint(0, 1000, (64,))
    # the MLP teacher: its network's v-prediction turned into x0 (§1, (M4))
    with torch.no_grad():
        v = teacher.network(x, t, cond)
    assert torch.equal(teacher.denoise(x, t, cond), P.x0_from_prediction(v, x, teacher.schedule, t, "v_prediction"))
    exact = P.load_teacher("toy-exact", target=toy.grid_target(), log=None)
    assert exact.exact and exact.target == "grid" and torch.equal(exact.network.state_dict()["inp.weight"],
                                                                     teacher.network.state_dict()["inp.weight"])
    a, s = exact.schedule.alpha(t), exact.schedule.sigma(t)
    assert torch.equal(exact.denoise(x, t, cond), exact.gmm.denoise(x, a, s, cond))   # the closed form (float64)


def test_copy_network_is_a_trainable_copy_and_wraps_for_unify():
    """Student and fake start as the teacher network (§5); under TDM-unify with a zero step-count table (§8), so the
    copy computes exactly the teacher's function."""
    torch.manual_seed(0)
    net = models.toy_mlp(width=16, depth=1).eval().requires_grad_(False)
    teacher = P.ToyTeacher(toy.ring_target(), net)
    plain = P.copy_network(net)
    assert isinstance(plain, models.ToyMLP) and plain.training and all(p.requires_grad for p in plain.parameters())
    with torch.no_grad():
        plain.inp.weight.add_(1.0)
    assert not torch.equal(plain.inp.weight, net.inp.weight) and not net.training      # a copy, the teacher stays
    unify = P.copy_network(net, (1, 2, 4))
    assert isinstance(unify, models.StepCountEmbedding) and unify.step_counts == [1, 2, 4]
    assert (unify.table.weight == 0).all() and unify.table.weight.requires_grad
    x, t, y = torch.randn(8, 2), torch.full((8,), 449), torch.arange(8) % 3
    with torch.no_grad():
        for K in (1, 2, 4):
            assert torch.equal(teacher.x0(unify, x, t, y, torch.full((8,), K)), teacher.denoise(x, t, y))
    with pytest.raises(ValueError, match="without a step embedding"):
        teacher.x0(net, x, t, y, torch.full((8,), 4))

#################################################################################
#                          PixArt-α teacher                                     #
#################################################################################

def load_pixart(folder, **kw):
    """The PixArt teacher of a pipeline folder, as train.py / sample.py load it."""
    return P.load_teacher("pixart", str(folder), **kw)


@pytest.fixture(scope="module")
def folders(tiny_pixart, tiny_pixart_ms):
    return {"512": tiny_pixart[0], "ms": tiny_pixart_ms}


@pytest.fixture(scope="module")
def teacher(folders):
    return load_pixart(folders["512"], log=None)


def hf_text(folder, prompts):
    """transformers tokenizer + T5EncoderModel, as the diffusers pipeline calls them (lowercase, strip, 120 tokens)."""
    tok = transformers.T5Tokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    enc = transformers.T5EncoderModel.from_pretrained(os.path.join(folder, "text_encoder")).eval()
    t = tok([p.lower().strip() for p in prompts], max_length=120, padding="max_length", truncation=True,
            add_special_tokens=True, return_tensors="pt")
    with torch.no_grad():
        return enc(t.input_ids, attention_mask=t.attention_mask).last_hidden_state, t.attention_mask


#################################################################################
#                          x0 parity                                            #
#################################################################################

@pytest.mark.parametrize("style", ["512", "ms"])
def test_x0_matches_diffusers_transformer_and_t5(folders, style):
    """teacher.denoise(x_t, t, teacher.encode(prompts)) == (x_t - sigma eps) / alpha with eps = first 4 channels of
    diffusers' transformer on transformers' T5 output (full 120 rows; ours keeps only the valid rows)."""
    folder = folders[style]
    pixart_teacher = load_pixart(folder, log=None)
    H, Wd = (8, 8) if style == "512" else (8, 12)            # MS: a non-square latent -> resolution / aspect ratio
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, H, Wd, generator=g)
    t = torch.tensor([999, 500, 17])
    cond = pixart_teacher.encode(PROMPTS)
    ours = pixart_teacher.denoise(x, t, cond)

    emb, mask = hf_text(folder, PROMPTS)
    assert torch.equal(cond[1], mask)
    valid = mask.bool()
    assert (cond[0][valid] - emb[valid]).abs().max() < TOL and (cond[0][~valid] == 0).all()
    dm = diffusers.PixArtTransformer2DModel.from_pretrained(os.path.join(folder, "transformer")).eval()
    added = {"resolution": None, "aspect_ratio": None}
    if style == "ms":
        added = {"resolution": torch.tensor([[8.0 * H, 8.0 * Wd]]).repeat(3, 1),
                 "aspect_ratio": torch.tensor([[H / Wd]]).repeat(3, 1)}
    with torch.no_grad():
        out = dm(x, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=t, added_cond_kwargs=added,
                 return_dict=False)[0]
    eps = out.chunk(2, dim=1)[0].double()
    ac = ref_alphas_cumprod()[t].reshape(-1, 1, 1, 1)
    ref = (x.double() - (1 - ac).sqrt() * eps) / ac.sqrt()
    err = (ours.double() - ref).abs().amax((1, 2, 3))                 # per timestep
    scaled = err * ac.sqrt().flatten()                                # in units of x_t / eps
    print(f"{style}: x0 max|diff| at t={t.tolist()}: {[f'{e:.1e}' for e in err.tolist()]}; "
          f"times alpha_t: {[f'{e:.1e}' for e in scaled.tolist()]}; |x0| max {ref.abs().max():.0f}")
    assert err[1:].max() < TOL                                        # t = 500, 17: absolute 1e-5
    assert scaled.max() < TOL                                         # t = 999: 1/alpha = 156 magnifies eps error
    if style == "ms":                                                 # the micro-conditions are used
        with torch.no_grad():
            other = dm(x, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=t, return_dict=False,
                       added_cond_kwargs={"resolution": added["resolution"] * 2, "aspect_ratio": added["aspect_ratio"]})
        assert (other[0] - out).abs().max() > 1e-3


def test_lora_is_off_for_the_teacher_and_bf16(teacher):
    x = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(1))
    t, cond = torch.tensor([600, 40]), teacher.encode(PROMPTS[:2])
    base = teacher.denoise(x, t, cond)
    lora_teacher = P.PixArtTeacher.from_network(copy.deepcopy(teacher.network))   # the shared fixture stays bare
    net = lora_teacher.network
    models.add_lora(net, rank=2, names=("student",))
    try:
        for layer in models.lora_layers(net):
            torch.nn.init.normal_(layer.lora_B["student"].weight, std=0.5)
        models.use_adapter(net, "student")
        assert torch.equal(lora_teacher.denoise(x, t, cond), base)          # adapters off for the teacher call
        assert all(m.active == "student" for m in models.lora_layers(net))  # and restored afterwards
        with torch.no_grad():
            assert (lora_teacher.x0(net, x, t, cond) - base).abs().max() > 1e-3   # a student call sees its adapter
    finally:
        models.use_adapter(net, None)
    bf = load_pixart(teacher.weights, dtype=torch.bfloat16, log=None)
    assert bf.network.proj_out.weight.dtype == torch.bfloat16
    out = bf.denoise(x, t, bf.encode(PROMPTS[:2]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    alpha = teacher.schedule.alpha(t).reshape(-1, 1, 1, 1)
    assert ((out - base) * alpha).abs().max() < 0.1      # bf16 rounding only (0.023 observed; eps-scale outputs)
    # train.py's LoRA layout: fp32 adapters on the bf16 base, called outside autocast (previews, sample.py)
    student, _ = models.trainable_lora_views(bf.network, 2)
    with torch.no_grad():
        out_s = bf.x0(student, x, t, bf.encode(PROMPTS[:2]))
    assert out_s.dtype == torch.float32 and torch.equal(out_s, out)       # B = 0 at init: exactly the teacher


#################################################################################
#                          Prompt cache, uncond                                 #
#################################################################################

def test_encode_caches_per_prompt_and_runs_t5_once(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("TDM_CACHE", str(tmp_path / "cache"))
    loads, runs = [], []
    real_load, real_run = t5.load_t5, P.PixArtTeacher.run_encoder
    monkeypatch.setattr(P, "load_t5", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    monkeypatch.setattr(P.PixArtTeacher, "run_encoder", lambda self, texts: runs.append(list(texts)) or
                        real_run(self, texts))
    first = load_pixart(folders["512"], log=None)
    assert first.cache_folder.startswith(str(tmp_path / "cache")) and not loads       # lazy: no T5 yet
    a = first.encode(PROMPTS[:2] + [PROMPTS[0]])                                      # a duplicate
    assert len(loads) == 1 and runs == [[p.lower().strip() for p in PROMPTS[:2]] + [""]]   # "" for CFG, same run
    assert first._encoder is None                                                          # freed after encoding
    assert len([f for f in os.listdir(first.cache_folder) if f.endswith(".safetensors")]) == 3
    first.uncond(2)
    assert len(loads) == 1                                                            # no second T5 load
    assert not [f for f in os.listdir(first.cache_folder) if f.endswith(".tmp")]
    assert torch.equal(a[0][0], a[0][2]) and a[0].shape == (3, 120, 32) and a[1].dtype == torch.long

    second = load_pixart(folders["512"], log=None)                         # a fresh process, say
    loads.clear(), runs.clear()
    b = second.encode(["  a PHOTO of a cat sitting on the red chair ", PROMPTS[1]])  # same after lowercase/strip
    assert not loads and not runs
    assert torch.equal(b[0], a[0][:2]) and torch.equal(b[1], a[1][:2])
    c = second.encode(PROMPTS[:2] + ["a bowl of fruit", "snow castle"])              # only the new ones run T5
    assert len(loads) == 1 and runs == [["a bowl of fruit", "snow castle"]]
    assert torch.equal(c[0][:2], a[0][:2])
    assert len(os.listdir(second.cache_folder)) == 5
    # another T5 (different files) gets its own cache folder
    other = tmp_path / "other"
    shutil.copytree(folders["512"], other)
    with open(other / "text_encoder" / "config.json", "a") as f:
        f.write("\n")
    assert load_pixart(str(other), log=None).cache_folder != second.cache_folder


def test_encoder_options_and_folder_checks(folders, tmp_path, monkeypatch):
    """keep_encoder keeps the text encoder after encoding (free_encoder drops it), encoder_batch sets how many new
    prompts go through it per call, encoder_dtype its precision; the folder checks are classmethods."""
    monkeypatch.setenv("TDM_CACHE", str(tmp_path / "cache"))
    runs, real_run = [], P.PixArtTeacher.run_encoder
    monkeypatch.setattr(P.PixArtTeacher, "run_encoder", lambda self, texts: runs.append(list(texts)) or
                        real_run(self, texts))
    kept = load_pixart(folders["512"], keep_encoder=True, encoder_batch=2, encoder_dtype=torch.bfloat16, log=None)
    kept.encode(["one", "two", "three"])
    assert runs == [["one", "two"], ["three", ""]] and kept._encoder is not None
    assert kept.encoder_dtype == torch.bfloat16 and kept.dtype == torch.float32
    assert kept._rows["one"]["embeds"].dtype == torch.bfloat16         # cached as the encoder computed it
    assert kept.encode(["one"])[0].dtype == torch.float32              # handed out in the teacher's dtype
    kept.free_encoder()
    assert kept._encoder is None
    P.PixArtTeacher.check_layout(folders["512"])
    assert P.PixArtTeacher.check_scheduler_config(folders["512"])["prediction_type"] == "epsilon"
    assert P.PixArtTeacher.check_scheduler_config(str(tmp_path)) is None          # no scheduler/: nothing to check
    with pytest.raises(FileNotFoundError, match="is not a complete diffusers pixart pipeline folder"):
        P.PixArtTeacher.check_layout(str(tmp_path))


def test_uncond_is_the_empty_prompt(teacher):
    emb, mask = teacher.uncond(3)
    ref_emb, ref_mask = teacher.encode([""])
    assert emb.shape == (3, 120, 32) and mask.shape == (3, 120)
    assert torch.equal(emb, ref_emb.expand(3, -1, -1)) and torch.equal(mask, ref_mask.expand(3, -1))
    assert mask.sum(1).tolist() == [1, 1, 1]                                          # just </s>
    both = tdm._cat(teacher.encode(PROMPTS[:2]), teacher.uncond(2))                   # tdm's cond helpers work
    assert both[0].shape == (4, 120, 32) and tdm._take(both, torch.tensor([3]))[1].sum() == 1


#################################################################################
#                          Decode, grid                                         #
#################################################################################

def test_decode_matches_diffusers_vae(teacher):
    x0 = torch.randn(3, *teacher.sample_shape, generator=torch.Generator().manual_seed(2)) * 0.5
    img = teacher.decode(x0, batch=2)
    assert img.shape == (3, 3, 64, 64) and img.dtype == torch.float32
    assert img.min() >= 0 and img.max() <= 1 and img.std() > 0
    vae = diffusers.AutoencoderKL.from_pretrained(os.path.join(teacher.weights, "vae")).eval()
    with torch.no_grad():
        ref = (vae.decode(x0 / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert (img - ref).abs().max() < TOL
    grid = S.image_grid(img, cols=2, pad=2)
    assert grid.size == (2 * 64 + 2, 2 * 64 + 2) and grid.mode == "RGB"
    assert S.image_grid(S.to_pil(img)).size == (3 * 64 + 4, 64)


#################################################################################
#                          End to end                                           #
#################################################################################

def test_sampling_matches_pixart_alpha_pipeline(teacher):
    """encode + uncond + CFG 4.5 + DPM-Solver++ 4 steps + decode == diffusers' PixArtAlphaPipeline on the folder."""
    prompts = PROMPTS[:2]
    x_T = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(7))
    latents = S.teacher_sample(teacher, x_T, teacher.encode(prompts), teacher.uncond(len(prompts)), 4, cfg=4.5,
                               solver="dpm")
    pipe = diffusers.PixArtAlphaPipeline.from_pretrained(teacher.weights)
    ref = pipe(prompts, negative_prompt="", num_inference_steps=4, guidance_scale=4.5, latents=x_T.clone(),
               output_type="latent", clean_caption=False, use_resolution_binning=False).images
    err = (latents - ref).abs().max().item()
    images = teacher.decode(latents)
    ref_img = pipe(prompts, negative_prompt="", num_inference_steps=4, guidance_scale=4.5, latents=x_T.clone(),
                   output_type="pt", clean_caption=False, use_resolution_binning=False).images
    err_img = (images - ref_img).abs().max().item()
    print(f"pipeline parity: latents max|diff| {err:.1e} (|x| max {ref.abs().max():.1f}), images {err_img:.1e}")
    assert err < 1e-4 * max(1.0, ref.abs().max().item()) and err_img < 1e-4


def test_teacher_autocasts_per_call_so_a_step_is_seen_by_the_next_forward():
    """Autocast caches the bf16 copy of every trainable weight until its outermost region ends. The teacher
    autocasts each network call, so a forward after an optimiser step sees the new weights; one region around
    a whole TDM step (the old train.py) would feed a second fake update the weights from before the first."""
    net = randomize(pixart.PixArtDiT(pixart.PixArtConfig.from_json(DIT)))
    teacher = P.PixArtTeacher.from_network(net, autocast=torch.bfloat16)
    student, _ = models.trainable_lora_views(net, rank=2)
    x, _, y, mask, _ = dit_inputs()
    t = torch.tensor([999, 17])
    B = models.lora_parameters(net, "student")[1]                       # lora_B of the first layer, zero at start
    assert B.requires_grad and B.dtype == torch.float32
    teacher.autocast = None
    y_fp32 = teacher.x0(student, x, t, (y, mask))
    teacher.autocast = torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_region = teacher.x0(student, x, t, (y, mask))
    y_call = teacher.x0(student, x, t, (y, mask))
    assert torch.equal(y_call, y_region) and not torch.equal(y_call, y_fp32)   # bf16 autocast is on in the call

    def before_and_after_update():
        y1 = teacher.x0(student, x, t, (y, mask))
        with torch.no_grad():
            for p in models.lora_parameters(net, "student"):
                p.add_(0.5)                                        # an "optimiser step", in place
        return y1, teacher.x0(student, x, t, (y, mask))

    y1, y2 = before_and_after_update()
    assert (y1 - y2).abs().max() > 1e-2                            # the update is seen
    with torch.autocast("cpu", dtype=torch.bfloat16):              # what per-call autocast avoids
        y1, y2 = before_and_after_update()
    assert torch.equal(y1, y2)                                     # stale cached bf16 weights


#################################################################################
#                          Errors                                               #
#################################################################################

def test_bad_inputs_raise_clear_errors(folders, tmp_path, teacher):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pixart(str(tmp_path / "nowhere"))
    broken = tmp_path / "no_transformer"
    shutil.copytree(folders["512"], broken)
    shutil.rmtree(broken / "transformer")
    with pytest.raises(FileNotFoundError, match=r"transformer/config\.json"):
        load_pixart(str(broken))
    broken = tmp_path / "no_spiece"
    shutil.copytree(folders["512"], broken)
    os.remove(broken / "tokenizer" / "spiece.model")
    with pytest.raises(FileNotFoundError, match=r"tokenizer/spiece\.model"):
        load_pixart(str(broken))
    vpred = tmp_path / "vpred"
    shutil.copytree(folders["512"], vpred)
    cfg_path = vpred / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["prediction_type"] = "v_prediction"
    cfg["beta_schedule"] = "scaled_linear"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="prediction_type='v_prediction'") as e:
        load_pixart(str(vpred))
    assert "beta_schedule='scaled_linear'" in str(e.value) and "check_scheduler=False" in str(e.value)
    with pytest.warns(UserWarning, match="prediction_type"):
        load_pixart(str(vpred), check_scheduler=False, log=None)
    os.remove(cfg_path)                                              # no scheduler config: nothing to check
    assert load_pixart(str(vpred), log=None).sample_shape == (4, 8, 8)
    with pytest.raises(ValueError, match="multiple of 16"):
        load_pixart(folders["512"], resolution=72)
    assert load_pixart(folders["512"], resolution=(64, 96), log=None).sample_shape == (4, 8, 12)
    x = torch.randn(1, *teacher.sample_shape)
    with pytest.raises(ValueError, match="without a step embedding"):    # K for a network trained without
        teacher.x0(teacher.network, x, torch.tensor([10]), teacher.encode(["a"]), K=torch.tensor([4]))
    with pytest.raises(ValueError, match="at least one prompt"):
        teacher.encode([])
    with pytest.raises(ValueError, match="built from a network"):
        P.PixArtTeacher.from_network(teacher.network).encode(["a"])
