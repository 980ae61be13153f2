"""export.py: the exported students load in diffusers (test-only) and, with the scheduler and timesteps their README
names, reproduce `sample.py --student` for the same noise; the kohya file's keys follow the naming ComfyUI maps.

Tolerance: diffusers' Euler runs in x / alpha_t, ours in x, so float32 round-off is amplified by up to
1 / alpha_899 ~ 12 along the way: 1e-4 of the latents' size.
"""
import json
import os

import diffusers
import pytest
import torch

import export
import sample as S
import train
from fixtures import PROMPTS, write_tiny_pixart, write_tiny_sd

PIPELINES = {"sd15": diffusers.StableDiffusionPipeline, "sdxl": diffusers.StableDiffusionXLPipeline,
             "pixart": diffusers.PixArtAlphaPipeline}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    for style in ("sd15", "sdxl"):
        write_tiny_sd(root / style, style)
    write_tiny_pixart(root / "pixart")
    return root


def _run(root, teacher, name, *extra):
    return train.main(["--teacher", teacher, "--weights", str(root / teacher), "--prompts", str(root / "prompts.txt"),
                       "--out", str(root / "runs"), "--name", name, "--batch", "2", "--iters", "2", "--lr-fake",
                       "1e-2", "--lr-ratio", "1", "--warmup", "1", "--preview-every", "0",
                       *(["--resolution", "64"] if teacher != "pixart" else []), *extra])


def _diffusers_latents(root, teacher, out, x_T, prompts, load):
    """The README's recipe: the base pipeline, the exported student loaded by `load`, Euler with the student's grid
    as timesteps and timestep_spacing 'leading', no guidance."""
    side = json.load(open(os.path.join(out, "tdm_student.json")))
    pipe = PIPELINES[teacher].from_pretrained(str(root / teacher))
    load(pipe, side)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")
    pipe.set_progress_bar_config(disable=True)
    kw = dict(clean_caption=False, use_resolution_binning=False) if teacher == "pixart" else {}
    return pipe(prompts, timesteps=side["timesteps"], guidance_scale=1.0, latents=x_T.clone(), height=64, width=64,
                output_type="latent", **kw).images


def _ours(run, K=None):
    teacher, net, meta = S.load_run(run, device="cpu")
    K = K or meta["K"]
    x_T = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(3))
    prompts = PROMPTS[:2]
    x = S.student_sample(teacher, net, x_T, teacher.encode(prompts), K, meta["t_max"], bool(meta.get("unify")))
    return x_T, prompts, x


def _close(a, b):
    err = (a - b).abs().max().item()
    assert err < 1e-4 * max(1.0, b.abs().max().item()), err
    return err


@pytest.fixture(scope="module")
def lora_runs(root):
    """{teacher: a LoRA run of rank 4, alpha 8 (scale 2: folded into the PEFT file)} for SD1.5 and SDXL."""
    return {teacher: _run(root, teacher, f"{teacher}_lora", "--lora", "4", "--lora-alpha", "8")
            for teacher in ("sd15", "sdxl")}


def _unet_from(folder):
    return lambda pipe, side: setattr(pipe, "unet", diffusers.UNet2DConditionModel.from_pretrained(folder))


@pytest.mark.parametrize("teacher", ["sd15", "sdxl"])
def test_lora_in_diffusers_and_kohya_naming_reproduce_the_student(lora_runs, root, teacher):
    run = lora_runs[teacher]
    out = os.path.join(run, "export")
    assert sorted(os.listdir(out)) == ["README.md", "pytorch_lora_weights.safetensors", "tdm_lora_kohya.safetensors",
                                       "tdm_student.json"]                               # written by train.py
    x_T, prompts, ours = _ours(run)
    peft = _diffusers_latents(root, teacher, out, x_T, prompts,
                              lambda p, s: p.load_lora_weights(os.path.join(out, s["files"]["peft"])))
    _close(peft, ours)
    kohya = _diffusers_latents(root, teacher, out, x_T, prompts,                   # diffusers' own kohya converter
                               lambda p, s: p.load_lora_weights(os.path.join(out, s["files"]["kohya"])))
    _close(kohya, ours)
    base_only = _diffusers_latents(root, teacher, out, x_T, prompts, lambda p, s: None)
    assert (base_only - ours).abs().max() > 1e-2 * ours.abs().max()              # the LoRA matters, 100x the tolerance


def test_kohya_keys_follow_comfyui_naming(lora_runs, root):
    """ComfyUI maps a diffusers UNet key `<module>.weight` to the LoRA name `lora_unet_<module, '.' -> '_'>`: the names
    are those of the attention and feed-forward linear layers of diffusers' own UNet, each with lora_down (r, in),
    lora_up (out, r) and a scalar alpha."""
    kohya = S.read_state_dict(os.path.join(lora_runs["sd15"], "export", "tdm_lora_kohya.safetensors"))
    unet = diffusers.UNet2DConditionModel.from_pretrained(str(root / "sd15" / "unet"))
    ends = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
            "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
    linear = {n: m for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(ends)}
    assert {"lora_unet_" + n.replace(".", "_") for n in linear} == {k.split(".")[0] for k in kohya}
    for n, m in linear.items():
        name = "lora_unet_" + n.replace(".", "_")
        assert kohya[f"{name}.lora_down.weight"].shape == (4, m.in_features)
        assert kohya[f"{name}.lora_up.weight"].shape == (m.out_features, 4) and kohya[f"{name}.alpha"].item() == 8.0


def test_full_and_unify_students_as_diffusers_folders(root):
    """A full fine-tune: the exported unet/ folder in the pipeline reproduces the student; a TDM-unify student
    exported at K = 2 (its step-count row folded into the time embedding's bias) reproduces the student at K = 2."""
    run = _run(root, "sd15", "sd15_full")
    out = os.path.join(run, "export")
    x_T, prompts, ours = _ours(run)
    _close(_diffusers_latents(root, "sd15", out, x_T, prompts, _unet_from(os.path.join(out, "unet"))), ours)
    unify = _run(root, "sd15", "sd15_unify", "--unify", "2,4")
    out = export.export_run(unify, os.path.join(unify, "export_k2"), K=2)
    assert json.load(open(os.path.join(out, "tdm_student.json")))["timesteps"] == [899, 449]
    x_T, prompts, ours = _ours(unify, K=2)
    _close(_diffusers_latents(root, "sd15", out, x_T, prompts, _unet_from(os.path.join(out, "unet"))), ours)
    with pytest.raises(ValueError, match=r"--K 3: this TDM-unify student was trained for K in \[2, 4\]"):
        export.export_run(unify, K=3)


def test_pixart_lora_exported_merged(root):
    """diffusers' PixArt pipeline has no LoRA loader: a PixArt LoRA student is exported merged, as a transformer
    folder, and reproduces the student."""
    run = _run(root, "pixart", "pixart_lora", "--lora", "4")
    out = os.path.join(run, "export")
    assert {"pytorch_lora_weights.safetensors", "transformer"} <= set(os.listdir(out))
    x_T, prompts, ours = _ours(run)
    load = lambda p, s: setattr(p, "transformer", diffusers.PixArtTransformer2DModel.from_pretrained(
        os.path.join(out, "transformer")))
    _close(_diffusers_latents(root, "pixart", out, x_T, prompts, load), ours)
