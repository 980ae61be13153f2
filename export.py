"""Export a run's image student to where people generate images: diffusers / PEFT and kohya LoRA files, a
diffusers model folder for full fine-tunes (and, for PixArt, whose diffusers pipeline has no LoRA loader, the LoRA
merged into one), each with a JSON sidecar and a README giving the exact scheduler, timesteps and scale.

    python export.py runs/sd15                 # -> runs/sd15/export/ (train.py writes it at every checkpoint)
    python export.py runs/sd15-unify --K 4     # a TDM-unify student at one step count, as a plain network

The student samples its own K-step grid without guidance (docs/method.md §10). Deterministic DDIM on that grid is
Euler's method on the probability-flow ODE in the variables x / alpha_t, so diffusers' EulerDiscreteScheduler given
the grid as `timesteps` (with timestep_spacing="leading", which makes its initial noise scale 1 / alpha_{t_K}, i.e.
x_T itself fed at t_K) reproduces `sample.py --student` for the same noise (tests/test_export.py).
"""
import argparse
import json
import os
from dataclasses import asdict

import torch

import tdm
from models import component_folder, read_json, read_state_dict, save_safetensors, unify_keys_from_flat
from pixart import load_pixart
from sample import command_line, read_run_meta
from unet import RELEASE_CONFIGS

# Per teacher: the pipeline's sub-folder of the network, its diffusers class, the bias its time embedding ends in
# (where a TDM-unify step-count row folds in: models.StepCountEmbedding adds it right after that layer).
NETWORK = {"pixart": ("transformer", "PixArtTransformer2DModel", "adaln_single.emb.timestep_embedder.linear_2.bias"),
           "sd15": ("unet", "UNet2DConditionModel", "time_embedding.linear_2.bias"),
           "sdxl": ("unet", "UNet2DConditionModel", "time_embedding.linear_2.bias")}
PIPELINE = {"pixart": "PixArtAlphaPipeline", "sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


#################################################################################
#                          LoRA formats                                         #
#################################################################################

def lora_pairs(state):
    """{module path: (A (r, in), B (out, r))} of a LoRA student's state dict."""
    return {k[:-len(".lora_A.weight")]: (v, state[k[:-len("lora_A.weight")] + "lora_B.weight"])
            for k, v in state.items() if k.endswith(".lora_A.weight")}


def peft_lora(state, alpha, prefix):
    """diffusers / PEFT naming, `<prefix>.<module>.lora_A.weight` / `.lora_B.weight`, as
    `pipeline.load_lora_weights` reads it. The scale alpha / r is folded into B, so the file is right at the
    loaders' default scale 1 whatever alpha they assume."""
    out = {}
    for path, (A, B) in lora_pairs(state).items():
        out[f"{prefix}.{path}.lora_A.weight"] = A.float()
        out[f"{prefix}.{path}.lora_B.weight"] = B.float() * (alpha / A.shape[0])
    return out


def kohya_lora(state, alpha):
    """kohya naming, as A1111 and ComfyUI load it: `lora_unet_<module, dots as underscores>.lora_down.weight` (A),
    `.lora_up.weight` (B) and `.alpha`; the loaders scale by alpha / r."""
    out = {}
    for path, (A, B) in lora_pairs(state).items():
        name = "lora_unet_" + path.replace(".", "_")
        out.update({f"{name}.lora_down.weight": A.float(), f"{name}.lora_up.weight": B.float(),
                    f"{name}.alpha": torch.tensor(float(alpha))})
    return out


def merged(base, state, alpha):
    """The base network's state dict with the LoRA merged in: W + (alpha / r) B A."""
    out = dict(base)
    for path, (A, B) in lora_pairs(state).items():
        W = out[f"{path}.weight"]
        out[f"{path}.weight"] = (W.float() + (alpha / A.shape[0]) * B.float() @ A.float()).to(W.dtype)
    return out


#################################################################################
#                          Full networks                                        #
#################################################################################

def fixed_k(state, meta, K, teacher):
    """A TDM-unify student (`net.*` + the step-count table) as a plain network at step count K: its table row
    folded into the bias of the time embedding's last layer, to which models.StepCountEmbedding adds it."""
    state = unify_keys_from_flat(state)
    steps = sorted(meta["unify"])                            # K is one of them: export_run checked
    net = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    bias = NETWORK[teacher][2]
    net[bias] = net[bias] + state["table.weight"][steps.index(K)].to(net[bias].dtype)
    return net


def base_config(meta):
    """The network's config.json dict: from the run's diffusers folder (or the one describing its single file),
    else the release config its single file shows."""
    sub, cls, _ = NETWORK[meta["teacher"]]
    source = meta.get("weights_config") or meta["weights"]
    if os.path.isdir(source):
        return read_json(os.path.join(component_folder(source, sub), "config.json"))
    config = asdict(RELEASE_CONFIGS[meta["teacher"]]())      # a single file of the teacher's own release
    return {"_class_name": cls, **{k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}}


def base_state(network):
    """A network's own weights, without any LoRA adapters it carries (models.LoRALinear keeps the base keys)."""
    return {k: v for k, v in network.state_dict().items() if ".lora_" not in k}


#################################################################################
#                          The export folder                                    #
#################################################################################

def export_run(run_dir, out=None, K=None, state=None, meta=None, base=None):
    """Write `run_dir`/export (or `out`): the student in the formats above, tdm_student.json and README.md.
    -> the folder. train.py hands over what it has in memory: the student's `state`, the run's `meta` and, for a
    PixArt LoRA, the `base` network's weights; otherwise they are read from the run folder and the model."""
    meta = meta or read_run_meta(run_dir)
    teacher = meta["teacher"]
    if teacher not in NETWORK:
        raise ValueError(f"{run_dir!r} is a --teacher {teacher} run: export is for image students "
                         f"({', '.join(NETWORK)})")
    state = state if state is not None else read_state_dict(os.path.join(run_dir, "student.safetensors"))
    sub, cls, _ = NETWORK[teacher]
    out = out or os.path.join(run_dir, "export")
    os.makedirs(out, exist_ok=True)
    K = K or meta["K"]
    if meta.get("unify"):
        if K not in meta["unify"]:
            raise ValueError(f"--K {K}: this TDM-unify student was trained for K in {sorted(meta['unify'])}")
        grid = tdm.time_grid(K, meta["t_max"])
    elif K != meta["K"]:
        raise ValueError(f"--K {K}: this student was trained for K = {meta['K']} only (TDM-unify students take "
                         "several)")
    else:
        grid = meta["grid"]
    files, alpha = {}, meta.get("lora_alpha") or meta.get("lora")
    if meta.get("lora"):
        files["peft"] = "pytorch_lora_weights.safetensors"
        save_safetensors(peft_lora(state, alpha, sub), os.path.join(out, files["peft"]))
        if teacher in ("sd15", "sdxl"):
            files["kohya"] = "tdm_lora_kohya.safetensors"
            save_safetensors(kohya_lora(state, alpha), os.path.join(out, files["kohya"]))
        if teacher == "pixart":                     # diffusers' PixArt pipeline has no LoRA loader: merge it
            files["folder"] = sub
            base = base if base is not None else base_state(load_pixart(meta["weights"], dtype=torch.float32))
            _write_network(out, sub, merged(base, state, alpha), meta)
    else:
        files["folder"] = sub
        _write_network(out, sub, fixed_k(state, meta, K, teacher) if meta.get("unify") else state, meta)
    sidecar = dict(teacher=teacher, base=meta["weights"], base_config=meta.get("weights_config"), K=K,
                   timesteps=grid, trained_cfg=meta["cfg"], guidance_scale=1.0, unify=meta.get("unify") or [],
                   lora=dict(rank=meta["lora"], alpha=alpha, scale_folded=alpha / meta["lora"]) if meta.get("lora")
                   else None, files=files, iteration=meta["iteration"],
                   scheduler=dict(class_name="EulerDiscreteScheduler", timestep_spacing="leading",
                                  timesteps=grid, final_sigmas_type="zero"))
    with open(os.path.join(out, "tdm_student.json"), "w") as f:
        json.dump(sidecar, f, indent=1)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(readme(sidecar, cls))
    return out


def _write_network(out, sub, state, meta):
    folder = os.path.join(out, sub)
    os.makedirs(folder, exist_ok=True)
    save_safetensors(state, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(base_config(meta), f, indent=1)


def readme(s, cls):
    """The export folder's README: what each file is and the exact diffusers call that reproduces the student."""
    pipe, sub = PIPELINE[s["teacher"]], NETWORK[s["teacher"]][0]
    base = s["base"] if os.path.isdir(s["base"]) else f"<the diffusers folder of {os.path.basename(s['base'])}>"
    load = (f'pipe.load_lora_weights("{s["files"]["peft"]}")     # scale 1: alpha / rank is folded in'
            if "peft" in s["files"] and "folder" not in s["files"] else
            f'pipe.{sub} = {cls}.from_pretrained("{sub}", torch_dtype=torch.float16)')
    lines = [
        f"# TDM student: {s['teacher']}, {s['K']} steps",
        "",
        f"Distilled with TDM from `{s['base']}` (iteration {s['iteration']}, trained with CFG {s['trained_cfg']:g}: "
        "the student samples without guidance).",
        "",
        "Files:",
        *([f"- `{s['files']['peft']}`: the LoRA in diffusers / PEFT naming (`pipe.load_lora_weights`), "
           "alpha / rank folded in (scale 1)"] if "peft" in s["files"] else []),
        *([f"- `{s['files']['kohya']}`: the same LoRA in kohya naming for ComfyUI (LoraLoader) and A1111, "
           "strength 1.0"] if "kohya" in s["files"] else []),
        *([f"- `{sub}/`: the network as a diffusers model folder ({cls})"
           + (", the LoRA merged in" if "peft" in s["files"] else "")] if "folder" in s["files"] else []),
        "- `tdm_student.json`: teacher, K, timesteps, training CFG, LoRA rank / alpha",
        "",
        "Sample it exactly as `sample.py --student` does (same noise, same result):",
        "",
        "```python",
        "import torch",
        f"from diffusers import {pipe}, EulerDiscreteScheduler" + (f", {cls}" if "folder" in s["files"] else ""),
        f'pipe = {pipe}.from_pretrained("{base}", torch_dtype=torch.float16).to("cuda")',
        load,
        'pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")',
        f'image = pipe("a red fox in the snow", timesteps={s["timesteps"]}, guidance_scale=1.0).images[0]',
        "```",
        "",
        "The timesteps are the student's own grid; another scheduler, other timesteps or guidance change the result. "
        "Euler on these timesteps is the deterministic DDIM the student was trained with.",
    ]
    if s["unify"]:
        lines += ["", f"A TDM-unify student (trained for K in {s['unify']}), exported at K = {s['K']}: its step-count "
                  "embedding is folded into the time embedding's bias, so a plain pipeline runs it at this K only "
                  "(export again with `--K` for another)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description="Export a run's image student for diffusers, ComfyUI and A1111.")
    p.error = lambda msg: p.exit(2, f"{p.prog}: error: {msg} (--help lists the flags)\n")   # one line, no usage
    p.add_argument("run", help="a run folder written by train.py")
    p.add_argument("--out", default=None, help="output folder (default: RUN/export)")
    p.add_argument("--K", type=int, default=None, help="TDM-unify students: the step count to export (default: the "
                   "run's --steps)")
    a = p.parse_args(argv)
    out = export_run(a.run, a.out, a.K)
    print(f"wrote {out}: " + ", ".join(sorted(os.listdir(out))))
    return out


if __name__ == "__main__":
    command_line(main)
