"""PixArt-α teacher (teachers.PixArtTeacher, sample.dpm_solver_pp): x0 parity with diffusers/transformers, prompt-embedding cache, uncond, decode,
DPM-Solver++ parity with diffusers' DPMSolverMultistepScheduler, end-to-end parity with PixArtAlphaPipeline,
and clear errors for bad folders. Everything runs on the tiny random pipeline of pixart_fixture.py (CPU, no downloads).
"""
import copy
import json
import os
import shutil

import pytest
import torch

import diffusers
import transformers

import models
import tdm
import sample as S
import teachers as P
from pixart_fixture import write_tiny_pixart

transformers.logging.set_verbosity_error()
diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()
PROMPTS = ["A photo of a cat sitting on the red chair", "astronaut riding a horse in space, van gogh style", ""]
TOL = 1e-5


def ref_alphas_cumprod():
    """Independent float64 PixArt schedule: linear betas 1e-4..0.02, 1000 steps."""
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pixart")
    return {"512": write_tiny_pixart(root / "pixart_512"), "ms": write_tiny_pixart(root / "pixart_ms", ms=True)}


@pytest.fixture(scope="module")
def teacher(folders):
    return P.load_pixart_teacher(folders["512"], log=None)


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
    t5 = P.load_pixart_teacher(folder, log=None)
    H, Wd = (8, 8) if style == "512" else (8, 12)            # MS: a non-square latent -> resolution / aspect ratio
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, H, Wd, generator=g)
    t = torch.tensor([999, 500, 17])
    cond = t5.encode(PROMPTS)
    ours = t5.denoise(x, t, cond)

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
    bf = P.load_pixart_teacher(teacher.folder, dtype=torch.bfloat16, log=None)
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
    real_load, real_run = models.load_t5, P.PixArtTeacher._run_t5
    monkeypatch.setattr(P, "load_t5", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    monkeypatch.setattr(P.PixArtTeacher, "_run_t5", lambda self, texts: runs.append(list(texts)) or
                        real_run(self, texts))
    first = P.load_pixart_teacher(folders["512"], log=None)
    assert first.cache_folder.startswith(str(tmp_path / "cache")) and not loads       # lazy: no T5 yet
    a = first.encode(PROMPTS[:2] + [PROMPTS[0]])                                      # a duplicate
    assert len(loads) == 1 and runs == [[p.lower().strip() for p in PROMPTS[:2]] + [""]]   # "" for CFG, same run
    assert first._t5 is None                                                          # freed after encoding
    assert len([f for f in os.listdir(first.cache_folder) if f.endswith(".safetensors")]) == 3
    first.uncond(2)
    assert len(loads) == 1                                                            # no second T5 load
    assert not [f for f in os.listdir(first.cache_folder) if f.endswith(".tmp")]
    assert torch.equal(a[0][0], a[0][2]) and a[0].shape == (3, 120, 32) and a[1].dtype == torch.long

    second = P.load_pixart_teacher(folders["512"], log=None)                         # a fresh process, say
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
    assert P.load_pixart_teacher(str(other), log=None).cache_folder != second.cache_folder


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
    vae = diffusers.AutoencoderKL.from_pretrained(os.path.join(teacher.folder, "vae")).eval()
    with torch.no_grad():
        ref = (vae.decode(x0 / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert (img - ref).abs().max() < TOL
    grid = S.image_grid(img, cols=2, pad=2)
    assert grid.size == (2 * 64 + 2, 2 * 64 + 2) and grid.mode == "RGB"
    assert S.image_grid(S.to_pil(img)).size == (3 * 64 + 4, 64)


#################################################################################
#                          DPM-Solver++                                         #
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
    gmm, schedule = P.ring_target(), tdm.Schedule("linear", 1e-4, 0.02)
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
def test_dpm_solver_pp_matches_pipeline_scheduler_config(folders, n_steps):
    """diffusers' scheduler loaded from the folder's PixArt scheduler_config.json (epsilon prediction, linspace)."""
    sch = diffusers.DPMSolverMultistepScheduler.from_pretrained(os.path.join(folders["512"], "scheduler"))
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
    gmm = P.ring_target()
    denoise = lambda x, t, c: gmm.denoise(x, schedule.alpha(t), schedule.sigma(t), c)
    x_T, labels = torch.randn(16, 2, generator=torch.Generator().manual_seed(6)), torch.zeros(16, dtype=torch.long)
    for K in (1, 2):
        a = S.dpm_solver_pp(denoise, x_T, labels, schedule, K, timesteps=tdm.time_grid(K, 899))
        b = tdm.sample(denoise, x_T, labels, schedule, tdm.time_grid(K, 899))
        assert (a - b).abs().max() < TOL                      # 1-2 steps: DPM-Solver++ is first order throughout


#################################################################################
#                          End to end                                           #
#################################################################################

def test_sampling_matches_pixart_alpha_pipeline(teacher):
    """encode + uncond + CFG 4.5 + DPM-Solver++ 4 steps + decode == diffusers' PixArtAlphaPipeline on the folder."""
    prompts = PROMPTS[:2]
    x_T = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(7))
    latents = S.teacher_sample(teacher, x_T, teacher.encode(prompts), teacher.uncond(len(prompts)), 4, cfg=4.5,
                               solver="dpm")
    pipe = diffusers.PixArtAlphaPipeline.from_pretrained(teacher.folder)
    ref = pipe(prompts, negative_prompt="", num_inference_steps=4, guidance_scale=4.5, latents=x_T.clone(),
               output_type="latent", clean_caption=False, use_resolution_binning=False).images
    err = (latents - ref).abs().max().item()
    images = teacher.decode(latents)
    ref_img = pipe(prompts, negative_prompt="", num_inference_steps=4, guidance_scale=4.5, latents=x_T.clone(),
                   output_type="pt", clean_caption=False, use_resolution_binning=False).images
    err_img = (images - ref_img).abs().max().item()
    print(f"pipeline parity: latents max|diff| {err:.1e} (|x| max {ref.abs().max():.1f}), images {err_img:.1e}")
    assert err < 1e-4 * max(1.0, ref.abs().max().item()) and err_img < 1e-4


#################################################################################
#                          Errors                                               #
#################################################################################

def test_bad_inputs_raise_clear_errors(folders, tmp_path, teacher):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        P.load_pixart_teacher(str(tmp_path / "nowhere"))
    broken = tmp_path / "no_transformer"
    shutil.copytree(folders["512"], broken)
    shutil.rmtree(broken / "transformer")
    with pytest.raises(FileNotFoundError, match=r"transformer/config\.json"):
        P.load_pixart_teacher(str(broken))
    broken = tmp_path / "no_spiece"
    shutil.copytree(folders["512"], broken)
    os.remove(broken / "tokenizer" / "spiece.model")
    with pytest.raises(FileNotFoundError, match=r"tokenizer/spiece\.model"):
        P.load_pixart_teacher(str(broken))
    vpred = tmp_path / "vpred"
    shutil.copytree(folders["512"], vpred)
    cfg_path = vpred / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["prediction_type"] = "v_prediction"
    cfg["beta_schedule"] = "scaled_linear"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="prediction_type='v_prediction'") as e:
        P.load_pixart_teacher(str(vpred))
    assert "beta_schedule='scaled_linear'" in str(e.value) and "check_scheduler=False" in str(e.value)
    with pytest.warns(UserWarning, match="prediction_type"):
        P.load_pixart_teacher(str(vpred), check_scheduler=False, log=None)
    os.remove(cfg_path)                                              # no scheduler config: nothing to check
    assert P.load_pixart_teacher(str(vpred), log=None).sample_shape == (4, 8, 8)
    with pytest.raises(ValueError, match="multiple of 16"):
        P.load_pixart_teacher(folders["512"], resolution=72)
    assert P.load_pixart_teacher(folders["512"], resolution=(64, 96), log=None).sample_shape == (4, 8, 12)
    x = torch.randn(1, *teacher.sample_shape)
    with pytest.raises(ValueError, match="without a step embedding"):    # K for a network trained without
        teacher.x0(teacher.network, x, torch.tensor([10]), teacher.encode(["a"]), K=torch.tensor([4]))
    with pytest.raises(ValueError, match="strictly decreasing"):
        S.dpm_solver_pp(lambda x, t, c: x, x, None, teacher.schedule, 2, timesteps=[500, 700])
    with pytest.raises(ValueError, match="spacing"):
        S.dpm_timesteps(4, spacing="leading")
    with pytest.raises(ValueError, match="at least one prompt"):
        teacher.encode([])
    with pytest.raises(ValueError, match="built from a network"):
        P.PixArtTeacher.from_network(teacher.network).encode(["a"])
