"""teachers.py's Stable Diffusion teachers (sd15, sdxl) on tiny pipelines in the diffusers layout
(fixtures.write_tiny_sd), and train.py / sample.py end to end with them.

Sampling equals diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline on the same folder (CFG against the
empty prompt, or against zeros for SDXL; SDXL's micro-conditions); the VAE scales; the half-precision VAE rule; a
folder or file of the other release is named; train -> resume -> sample, full and LoRA, from folders and from
original single files (fixtures.write_sd_single_file, described by their folder via --weights-config); an SD1.5
LoRA student plugged into another SD1.5 model (paper Table 2) and refused by another architecture.
"""
import json
import os
import shutil

import diffusers
import pytest
import torch
from PIL import Image

import sample as S
import tdm
import train
from fixtures import PROMPTS, tiny_sd_unet, write_real_size_skeleton, write_sd_single_file, write_tiny_sd
from teachers import TEACHERS, load_teacher

STYLES = ("sd15", "sdxl")
PIPELINES = {"sd15": diffusers.StableDiffusionPipeline, "sdxl": diffusers.StableDiffusionXLPipeline}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{style: tiny pipeline folder}, a second SD1.5 model (other weights, same architecture), a prompt file."""
    root = tmp_path_factory.mktemp("tiny_sd")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = {style: write_tiny_sd(root / style, style) for style in STYLES}
    out["sd15_other"] = write_tiny_sd(root / "sd15_other", "sd15", seed=10)
    return root, out, str(prompts)


@pytest.fixture(scope="module", params=STYLES)
def sd(request, folders):
    """(style, folder, teacher) for each release."""
    style = request.param
    folder = folders[1][style]
    return style, folder, load_teacher(style, folder, device="cpu", log=None)


#################################################################################
#                          Against the diffusers pipelines                      #
#################################################################################

def test_sampling_matches_the_diffusers_pipeline(sd):
    """encode + uncond + CFG at the teacher's default scale + DPM-Solver++ 4 steps == the diffusers pipeline with
    DPMSolverMultistepScheduler on the same folder; SD1.5 with negative_prompt "", SDXL with none (zeros, as
    force_zeros_for_empty_prompt) and its default micro-conditions (H, W), (0, 0), (H, W), at 64 x 96 pixels (not
    square: the micro-conditions' order shows); then the decoded images."""
    style, folder, _ = sd
    teacher = load_teacher(style, folder, device="cpu", log=None, resolution=(64, 96))
    prompts, cfg = PROMPTS[:2], TEACHERS[style].DEFAULTS["cfg"]
    x_T = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(7))
    latents = S.teacher_sample(teacher, x_T, teacher.encode(prompts), teacher.uncond(2), 4, cfg=cfg, solver="dpm")
    pipe = PIPELINES[style].from_pretrained(folder)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config,
                                                                       timestep_spacing="linspace", steps_offset=0)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(negative_prompt=[""] * len(prompts)) if style == "sd15" else {}
    run = lambda kind: pipe(prompts, num_inference_steps=4, guidance_scale=cfg, latents=x_T.clone(), height=64,
                            width=96, output_type=kind, **kw).images
    ref = run("latent")
    err = (latents - ref).abs().max().item()
    err_img = (teacher.decode(latents) - run("pt")).abs().max().item()
    print(f"{style} pipeline parity: latents max|diff| {err:.1e} (|x| max {ref.abs().max():.1f}), images {err_img:.1e}")
    assert err < 1e-4 * max(1.0, ref.abs().max().item()) and err_img < 1e-4


def test_uncond_and_conditions(sd, folders):
    """SD1.5: the uncond is the encoding of "" (B, 77, 32); SDXL: zeros for the context (B, 77, 64) and the pooled
    vector (B, 24), unless model_index.json sets force_zeros_for_empty_prompt false; tdm's cond helpers work."""
    style, folder, teacher = sd
    cond = teacher.encode(PROMPTS[:3])
    if style == "sd15":
        assert cond.shape == (3, 77, 32)
        assert torch.equal(teacher.uncond(2), teacher.encode([""]).expand(2, -1, -1))
    else:
        assert [c.shape for c in cond] == [(3, 77, 64), (3, 24)]
        assert all(not u.any() for u in teacher.uncond(2)) and [u.shape[0] for u in teacher.uncond(2)] == [2, 2]
        other = folders[0] / "sdxl_no_zeros"
        shutil.copytree(folder, other)
        index = json.loads((other / "model_index.json").read_text())
        (other / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
        plain = load_teacher("sdxl", other, device="cpu", log=None)
        assert all(torch.equal(u, e.expand_as(u)) for u, e in zip(plain.uncond(2), plain.encode([""])))
        assert plain.uncond(2)[0].abs().max() > 0
    picked = tdm._take(tdm._cat(cond, teacher.uncond(3)), torch.tensor([4, 0]))
    picked = (picked,) if torch.is_tensor(picked) else picked
    assert all(p.shape[0] == 2 for p in picked) and picked[0][0].any().item() == (style == "sd15")   # row 4: uncond


def test_vae_scale_and_half_precision_rule(sd):
    """The scale is the folder's (0.18215 SD1.5, 0.13025 SDXL); an fp16 teacher decodes in fp32 when the VAE
    config asks for force_upcast (diffusers' rule: the SDXL VAE overflows in fp16), else in fp16."""
    style, folder, teacher = sd
    assert teacher.scaling_factor == {"sd15": 0.18215, "sdxl": 0.13025}[style]
    half = load_teacher(style, folder, device="cpu", log=None, dtype=torch.float16)
    assert half.vae_dtype == torch.float32 and half.network.conv_in.weight.dtype == torch.float16
    cfg_path = os.path.join(folder, "vae", "config.json")
    saved = open(cfg_path).read()
    try:
        with open(cfg_path, "w") as f:
            json.dump({**json.loads(saved), "force_upcast": False}, f)
        assert load_teacher(style, folder, device="cpu", log=None, dtype=torch.float16).vae_dtype == torch.float16
    finally:
        with open(cfg_path, "w") as f:
            f.write(saved)


#################################################################################
#                          Errors                                               #
#################################################################################

def test_the_other_release_and_incomplete_folders_are_named(folders, tmp_path):
    _, f, _ = folders
    with pytest.raises(ValueError, match="holds an SDXL pipeline .* use --teacher sdxl"):
        load_teacher("sd15", f["sdxl"], log=None)
    with pytest.raises(ValueError, match="holds an SD1.x pipeline .* use --teacher sd15"):
        load_teacher("sdxl", f["sd15"], log=None)
    broken = tmp_path / "no_tokenizer"
    shutil.copytree(f["sd15"], broken)
    os.remove(broken / "tokenizer" / "merges.txt")
    with pytest.raises(FileNotFoundError, match=r"missing tokenizer/merges\.txt \(the CLIP BPE merges\)"):
        load_teacher("sd15", broken, log=None)
    with pytest.raises(ValueError, match="--teacher sdxl needs --weights PATH"):
        load_teacher("sdxl", None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_teacher("sd15", tmp_path / "nowhere", log=None)


#################################################################################
#                          End to end                                           #
#################################################################################

def _train(root, folder, prompts, style, name, *extra):
    return train.main(["--teacher", style, "--weights", folder, "--prompts", prompts, "--out", str(root), "--name",
                       name, "--batch", "2", "--resolution", "64", "--preview-every", "2", "--save-every", "2",
                       *extra])


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("lora", [0, 4])
def test_train_resume_sample(folders, style, lora):
    """4 straight iterations == 2, then resumed to 4 (student and fake weights bit-equal); the run records the
    paper's recipe; the student samples at K = 4 from its run folder."""
    root, f, prompts = folders
    straight = _train(root, f[style], prompts, style, f"{style}_straight{lora}", "--iters", "4", "--lora", str(lora))
    assert os.path.exists(os.path.join(straight, "previews", "000004.png"))
    meta = json.load(open(os.path.join(straight, "student.json")))
    recipe = {"sd15": (3.5, 2e-5, 10.0), "sdxl": (8.0, 5e-6, 5.0)}[style]
    assert (meta["cfg"], meta["args"]["lr_fake"], meta["args"]["lr_ratio"]) == recipe
    assert meta["args"]["resolution"] == 64 and meta["lora"] == lora
    split = _train(root, f[style], prompts, style, f"{style}_split{lora}", "--iters", "2", "--lora", str(lora))
    train.main(["--resume", split, "--iters", "4"])
    (a, _), (b, _) = train.load_checkpoint(straight), train.load_checkpoint(split)
    for part in ("student", "fake"):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    out = str(root / f"{style}_student{lora}.png")
    S.main(["--student", straight, "--steps", "4", "--out", out, "--prompts", "a cat", "a dog"])
    assert Image.open(out).size == (2 * 64 + 2, 64)


def test_resume_may_change_the_resolution(folders):
    """SDXL's two stages: train at one resolution, resume at another; the student then samples at the new one."""
    root, f, prompts = folders
    run = _train(root, f["sdxl"], prompts, "sdxl", "two_stage", "--iters", "2", "--lora", "4")
    train.main(["--resume", run, "--iters", "3", "--resolution", "128"])
    teacher, _, meta = S.load_run(run, device="cpu")
    assert meta["args"]["resolution"] == 128 and meta["iteration"] == 3 and teacher.sample_shape == (4, 16, 16)


def test_a_sd15_lora_plugs_into_another_sd15_model(folders):
    """Paper Table 2: the LoRA trained on one SD1.5 model, applied at sampling time to another (--student RUN
    --weights OTHER): the adapter runs on the other base (its teacher is the other model, the adapter's weights
    those of the run), and changes its output; a model of another architecture is refused, naming the cause."""
    root, f, prompts = folders
    run = _train(root, f["sd15"], prompts, "sd15", "lora_for_transfer", "--iters", "2", "--lora", "4")
    own_teacher, own, _ = S.load_run(run, device="cpu")
    other_teacher, moved, _ = S.load_run(run, device="cpu", weights=f["sd15_other"])
    assert other_teacher.weights == f["sd15_other"] and own_teacher.weights == f["sd15"]
    own_sd, moved_sd = own.state_dict(), moved.state_dict()
    assert own_sd.keys() == moved_sd.keys() and len(own_sd) > 0
    assert all(torch.equal(own_sd[k], moved_sd[k]) for k in own_sd)
    x = torch.randn(2, *other_teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    cond = other_teacher.encode(["a cat", "a dog"])
    on_other = S.student_sample(other_teacher, moved, x, cond, 4)
    on_own = S.student_sample(own_teacher, own, x, own_teacher.encode(["a cat", "a dog"]), 4)
    base_only = tdm.sample(other_teacher.denoise, x, cond, other_teacher.schedule, tdm.time_grid(4, 899))
    assert (on_other - on_own).abs().max() > 1e-3 and (on_other - base_only).abs().max() > 1e-6
    out = str(root / "transfer.png")
    S.main(["--student", run, "--weights", f["sd15_other"], "--steps", "4", "--out", out, "--prompts", "a cat"])
    assert Image.open(out).size == (64, 64)
    wide = root / "sd15_wide"
    shutil.copytree(f["sd15_other"], wide)
    shutil.rmtree(wide / "unet")
    tiny_sd_unet("sd15", 5, block_out_channels=(8, 16, 24)).save_pretrained(wide / "unet")
    with pytest.raises(ValueError, match="shape mismatches.*moves only to a model of its own architecture"):
        S.load_run(run, device="cpu", weights=str(wide))
    with pytest.raises(ValueError, match="use --teacher sdxl .*moves only to a model of its own architecture"):
        S.load_run(run, device="cpu", weights=f["sdxl"])                  # another release: named as such
    full = _train(root, f["sd15"], prompts, "sd15", "full_not_for_transfer", "--iters", "1")
    with pytest.raises(ValueError, match="is a full fine-tune"):
        S.load_run(full, device="cpu", weights=f["sd15_other"])


#################################################################################
#                          Single checkpoint files                              #
#################################################################################

@pytest.fixture(scope="module")
def files(folders):
    """The tiny pipelines as original single files: SD1.5 as .safetensors, SDXL as .ckpt (with the EMA copy and
    the schedule buffers real non-pruned files carry)."""
    root, f, _ = folders
    out = {"sd15": str(root / "sd15.safetensors"), "sdxl": str(root / "sdxl.ckpt")}
    write_sd_single_file(f["sd15"], out["sd15"])
    write_sd_single_file(f["sdxl"], out["sdxl"], extras=True)
    return out


@pytest.mark.parametrize("style", STYLES)
def test_a_single_file_is_the_same_teacher_as_its_folder(folders, files, style):
    """--weights FILE --weights-config FOLDER (the folder only describing the file's tiny architecture): the
    same conditions, x0 and images as the folder itself, bit for bit."""
    _, f, _ = folders
    a = load_teacher(style, f[style], device="cpu", log=None)
    b = load_teacher(style, files[style], device="cpu", log=None, weights_config=f[style])
    assert b.cache_folder != a.cache_folder and b.scaling_factor == a.scaling_factor
    ca, cb = a.encode(PROMPTS[:2]), b.encode(PROMPTS[:2])
    ca, cb = (ca,) if torch.is_tensor(ca) else ca, (cb,) if torch.is_tensor(cb) else cb
    assert all(torch.equal(x, y) for x, y in zip(ca, cb))
    x = torch.randn(2, *a.sample_shape, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([900, 300])
    cond = a.encode(PROMPTS[:2])
    assert torch.equal(a.denoise(x, t, cond), b.denoise(x, t, cond))
    assert torch.equal(a.decode(x * 0.3), b.decode(x * 0.3))


def test_single_file_train_resume_sample(folders, files):
    """train.py on an SDXL .ckpt (full) and an SD1.5 .safetensors (LoRA): resume exact, sample.py from the run,
    and the SD1.5 LoRA applied to another SD1.5 model given as a single file."""
    root, f, prompts = folders
    for style, lora in (("sdxl", "0"), ("sd15", "4")):
        cfg = ["--weights-config", f[style]]
        straight = _train(root, files[style], prompts, style, f"file_{style}", "--iters", "2", "--lora", lora, *cfg)
        split = _train(root, files[style], prompts, style, f"file_{style}_split", "--iters", "1", "--lora", lora, *cfg)
        train.main(["--resume", split, "--iters", "2"])
        (a, meta), (b, _) = train.load_checkpoint(straight), train.load_checkpoint(split)
        assert meta["weights"] == files[style] and meta["weights_config"] == f[style]
        assert all(torch.equal(a["student"][k], b["student"][k]) for k in a["student"])
        out = str(root / f"file_{style}.png")
        S.main(["--student", straight, "--steps", "4", "--out", out, "--prompts", "a cat"])
        assert Image.open(out).size == (64, 64)
    other = str(root / "sd15_other.safetensors")
    write_sd_single_file(f["sd15_other"], other)
    S.main(["--student", straight, "--weights", other, "--weights-config", f["sd15_other"], "--steps", "4",
            "--out", out, "--prompts", "a cat"])
    teacher, _, _ = S.load_run(straight, device="cpu", weights=other, weights_config=f["sd15_other"])
    assert teacher.weights == other


def test_single_file_errors_name_the_problem(folders, files, tmp_path):
    """A file of the other release (real-size key layout, and a tiny file with its describing folder), a truncated
    file, a folder given as --weights-config of a folder: one error each, naming the fix."""
    _, f, _ = folders
    for style, other in (("sd15", "sdxl"), ("sdxl", "sd15")):
        skeleton = str(tmp_path / f"{other}.ckpt")
        write_real_size_skeleton(skeleton, other)
        with pytest.raises(ValueError, match=f"is an {other.upper()} checkpoint, not {style.upper()}: use --teacher "
                                             f"{other}"):
            load_teacher(style, skeleton, log=None)
        with pytest.raises(ValueError, match=f"is an {other.upper()} checkpoint but --weights-config .* the other"):
            load_teacher(style, files[other], log=None, weights_config=f[style])
        with pytest.raises(ValueError, match=f"holds an {other.upper().replace('SD15', 'SD1.x')} pipeline .* use "
                                             f"--teacher {other}"):
            load_teacher(style, files[other], log=None, weights_config=f[other])
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(open(files["sd15"], "rb").read()[:5000])
    with pytest.raises(ValueError, match="truncated"):
        load_teacher("sd15", str(truncated), log=None)
    with pytest.raises(ValueError, match="weights_config describes a single checkpoint file"):
        load_teacher("sd15", f["sd15"], log=None, weights_config=f["sd15"])
    with pytest.raises(ValueError, match="is an SD15 checkpoint but --weights-config .* describes the other release"):
        load_teacher("sdxl", files["sd15"], log=None, weights_config=f["sdxl"])
    vpred = tmp_path / "vpred"                                     # the describing folder's scheduler is checked too
    shutil.copytree(f["sd15"], vpred)
    cfg = json.loads((vpred / "scheduler" / "scheduler_config.json").read_text())
    (vpred / "scheduler" / "scheduler_config.json").write_text(json.dumps({**cfg, "prediction_type": "v_prediction"}))
    with pytest.raises(ValueError, match="prediction_type='v_prediction'"):
        load_teacher("sd15", files["sd15"], log=None, weights_config=str(vpred))


def test_a_real_size_single_file_with_the_release_configs_and_the_bundled_tokenizer(tmp_path):
    """The default single-file path (no --weights-config): a file with every key of v1-5-pruned-emaonly at its
    real shape (values zero) gives the SD1.5 teacher at 512 px, encoding with the bundled CLIP tokenizer."""
    path = str(tmp_path / "v1-5.ckpt")
    write_real_size_skeleton(path, "sd15")
    teacher = load_teacher("sd15", path, device="cpu", log=None)
    assert teacher.sample_shape == (4, 64, 64) and teacher.scaling_factor == 0.18215
    assert teacher.encode(["a photo of a cat"]).shape == (1, 77, 768)
    assert sum(p.numel() for p in teacher.network.parameters()) == 859_520_964


def test_sdxl_from_network_has_its_zero_uncond():
    net = tiny_sd_unet("sdxl")
    from unet import UNet
    ours = UNet(dict(net.config))
    teacher = TEACHERS["sdxl"].from_network(ours)
    context, pooled = teacher.uncond(2)
    assert context.shape == (2, 77, 64) and pooled.shape == (2, 24) and not context.any() and not pooled.any()
