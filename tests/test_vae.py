"""vae.py: the hand-written SD VAE against diffusers' AutoencoderKL (diffusers folders, legacy names, LDM single files),
its config, the real-size keys, and loader errors.

A tiny random AutoencoderKL (two blocks, 32 and 64 channels) is written by fixtures.write_tiny_vae; full SD1.5 / SDXL
single files by fixtures.write_sd_single_file. The real-size checks run on the meta device, or on a file holding every
key of a release's single file at its real shape (fixtures.write_real_size_skeleton).
"""
import dataclasses
import json
import os
import re
import shutil

import diffusers
import pytest
import torch

from fixtures import reference_keys, vae_to_ldm, write_real_size_skeleton, write_tiny_vae
from models import read_state_dict
from vae import VAE, VAEConfig, load_vae, sd_vae_config, sdxl_vae_config, vae_state_dict_from_any

VAE_CFG = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
               down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A folder holding vae/ as diffusers writes it."""
    root = tmp_path_factory.mktemp("pipe")
    write_tiny_vae(root / "vae", **VAE_CFG)
    return root


def vae_check(vae, ref, tag):
    x = torch.randn(2, 3, 32, 24, generator=torch.Generator().manual_seed(0))
    z = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        post = ref.encode(x).latent_dist
        d_mean = (vae.encode(x) - post.mean).abs().max().item()
        d_dec = (vae.decode(z) - ref.decode(z).sample).abs().max().item()
        s_ours = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(5))
        d_sample = (s_ours - post.sample(generator=torch.Generator().manual_seed(5))).abs().max().item()
    print(f"VAE {tag}: max|diff| encode mean {d_mean:.2e}, sample {d_sample:.2e}, decode {d_dec:.2e}")
    assert max(d_mean, d_dec, d_sample) < 1e-5


def test_vae_parity_diffusers_folders(root, tmp_path):
    ref = diffusers.AutoencoderKL.from_pretrained(root / "vae").eval()
    vae = load_vae(str(root))
    assert vae.scaling_factor == 0.18215 and vae.encoder.conv_in.out_channels == 32
    assert isinstance(vae.config, VAEConfig) and vae.config.block_out_channels == [32, 64]
    vae_check(vae, ref, "pipeline folder")
    ref.save_pretrained(tmp_path / "vae_bin", safe_serialization=False)
    assert "diffusion_pytorch_model.bin" in os.listdir(tmp_path / "vae_bin")
    vae_check(load_vae(str(tmp_path / "vae_bin")), ref, "vae/ folder, .bin")
    old = {re.sub(r"\.to_out\.0\.", ".proj_attn.", k.replace(".to_q.", ".query.").replace(".to_k.", ".key.")
                  .replace(".to_v.", ".value.")): v for k, v in ref.state_dict().items()}   # deprecated names
    shutil.copytree(root / "vae", tmp_path / "vae_old")
    from safetensors.torch import save_file
    save_file(old, tmp_path / "vae_old" / "diffusion_pytorch_model.safetensors")
    vae_check(load_vae(str(tmp_path / "vae_old")), ref, "deprecated attention names")


def test_vae_ldm_single_file(root, tmp_path):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import save_file
    ref = diffusers.AutoencoderKL.from_pretrained(root / "vae").eval()
    ldm = {"first_stage_model." + k: v for k, v in vae_to_ldm(ref.state_dict(), 2).items()}
    back = convert_ldm_vae_checkpoint(ldm, dict(ref.config))        # diffusers' own converter checks vae_to_ldm
    assert back.keys() == ref.state_dict().keys() and all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
    ldm["model.diffusion_model.out.0.weight"] = torch.zeros(1)        # a full SD checkpoint also holds the UNet
    save_file(ldm, tmp_path / "sd.safetensors")
    cfg = dataclasses.replace(sd_vae_config(), **VAE_CFG)
    vae_check(load_vae(str(tmp_path / "sd.safetensors"), config=cfg), ref, "LDM single file")


#################################################################################
#                          Config and real size                                 #
#################################################################################

def test_the_vae_takes_a_config():
    assert sd_vae_config() == VAEConfig()                              # SD1.x values are the defaults
    with torch.device("meta"):
        vae = VAE(sd_vae_config())
        with pytest.raises(TypeError):
            VAE(**dataclasses.asdict(sd_vae_config()))
    assert vae.config == sd_vae_config() and vae.scaling_factor == 0.18215 and vae.shift_factor == 0.0


@pytest.mark.parametrize("change,words", [
    ({"act_fn": "gelu"}, r"act_fn='gelu' is not implemented; VAEConfig needs act_fn='silu'"),
    ({"attention_head_dim": 8}, r"unknown config key\(s\) \['attention_head_dim'\]"),
    ({"_class_name": "UNet2DConditionModel"}, r"'UNet2DConditionModel', not of a AutoencoderKL"),
    ({"down_block_types": ["AttnDownEncoderBlock2D"] * 4}, r"down_block_types=\['AttnDownEncoderBlock2D'.* is not "
                                                           r"implemented")])
def test_from_json_rejects_unimplemented_values_naming_the_key(root, change, words, tmp_path):
    cfg = json.loads((root / "vae" / "config.json").read_text())
    assert VAEConfig.from_json(cfg).block_out_channels == [32, 64]     # the file as diffusers wrote it reads
    with pytest.raises(ValueError, match=words):
        VAEConfig.from_json({**cfg, **change})


def test_real_size_keys_shapes_and_counts():
    def shapes(m):
        return {k: tuple(v.shape) for k, v in m.state_dict().items()}

    def count(m):
        return sum(p.numel() for p in m.parameters())
    with torch.device("meta"):
        vae = VAE(sd_vae_config())
        vae_ref = diffusers.AutoencoderKL(**{k: v for k, v in dataclasses.asdict(sd_vae_config()).items()
                                             if k != "shift_factor" or v is not None})
    assert shapes(vae) == shapes(vae_ref) and len(shapes(vae)) == 248
    n_enc = sum(p.numel() for k, p in vae.named_parameters() if k.startswith(("encoder.", "quant_conv.")))
    print(f"params: VAE {count(vae):,} (enc {n_enc:,}, dec {count(vae) - n_enc:,})")
    assert count(vae) == count(vae_ref) == 83_653_863 and n_enc == 34_163_664
    assert shapes(vae) == reference_keys("vae_diffusers")
    ldm = {k: torch.empty(v, device="meta") for k, v in reference_keys("vae_ldm").items()}
    assert {k: tuple(v.shape) for k, v in vae_state_dict_from_any(ldm).items()} == shapes(vae)


#################################################################################
#                          Bad inputs                                           #
#################################################################################

def test_bad_inputs_raise_clear_errors(root, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vae(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vae(str(tmp_path))
    vae_dir = tmp_path / "vae"
    shutil.copytree(root / "vae", vae_dir)
    cfg = json.loads((vae_dir / "config.json").read_text())
    (vae_dir / "config.json").write_text(json.dumps(dict(cfg, latent_channels=8)))
    with pytest.raises(ValueError, match=r"shape mismatches: .*conv_out"):
        load_vae(str(vae_dir))
    (vae_dir / "config.json").write_text(json.dumps(dict(cfg, _class_name="UNet2DConditionModel")))
    with pytest.raises(ValueError, match="not of a AutoencoderKL"):
        load_vae(str(vae_dir))


#################################################################################
#                          Full SD1.5 / SDXL single files                       #
#################################################################################

def _same_weights(a, b):
    return a.state_dict().keys() == b.state_dict().keys() and all(
        torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize("ext", ["safetensors", "ckpt"])
def test_vae_from_full_single_files(tiny_sd_single, ext):
    """first_stage_model.* of a full SD1.5 / SDXL file: the same encode / decode as diffusers' from_single_file, the
    same weights as the diffusers folder."""
    style, folder, files = tiny_sd_single
    config = VAEConfig.from_json(os.path.join(folder, "vae", "config.json"))
    ref = diffusers.AutoencoderKL.from_single_file(files[ext], config=folder, subfolder="vae", local_files_only=True)
    vae = load_vae(files[ext], config=config)
    assert _same_weights(vae, load_vae(folder))
    vae_check(vae, ref.eval(), f"{style} .{ext} single file")


def test_vae_only_files_and_files_without_a_vae(tiny_sd_single, tmp_path):
    """VAE-only files, bare or under `vae.`, load alike; a file without VAE keys and unexpected VAE keys are errors."""
    from safetensors.torch import save_file
    style, folder, files = tiny_sd_single
    config = VAEConfig.from_json(os.path.join(folder, "vae", "config.json"))
    ldm = {k[len("first_stage_model."):]: v
           for k, v in read_state_dict(files["safetensors"], prefixes=("first_stage_model.",)).items()}
    want = load_vae(folder)
    for name, prefix in (("bare", ""), ("prefixed", "vae.")):
        save_file({prefix + k: v for k, v in ldm.items()}, tmp_path / f"{name}.safetensors")
        assert _same_weights(load_vae(tmp_path / f"{name}.safetensors", config=config), want)
    unet_only = read_state_dict(files["safetensors"], prefixes=("model.diffusion_model.",))
    save_file(unet_only, tmp_path / "unet.safetensors")
    with pytest.raises(ValueError, match=r"holds no VAE: no first_stage_model\.\*, vae\.\* or encoder\.\* / decoder"):
        load_vae(tmp_path / "unet.safetensors", config=config)
    full = read_state_dict(files["safetensors"])
    save_file({**full, "first_stage_model.encoder.extra.weight": torch.zeros(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(ValueError, match=r"unexpected keys: encoder\.extra\.weight\."):
        load_vae(tmp_path / "extra.safetensors", config=config)


@pytest.mark.parametrize("release, config", [("sd15", sd_vae_config), ("sdxl", sdxl_vae_config)])
def test_real_size_single_file_vae(release, config, tmp_path):
    """Every key of the release's file at its real shape: the VAE loads with the release's config, whose scaling
    factor is the release's (0.18215 / 0.13025)."""
    write_real_size_skeleton(tmp_path / "f.ckpt", release)
    vae = load_vae(tmp_path / "f.ckpt")
    assert vae.config == config() and vae.scaling_factor == (0.18215 if release == "sd15" else 0.13025)
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert dataclasses.replace(config(), scaling_factor=0.18215, sample_size=512) == sd_vae_config()
