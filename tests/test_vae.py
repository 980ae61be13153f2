"""vae.py: the hand-written SD VAE against diffusers' AutoencoderKL (diffusers folders, legacy names, LDM single files),
its config, the real-size keys, and loader errors.

A tiny random AutoencoderKL (two blocks, 32 and 64 channels) is written by fixtures.write_tiny_vae; the real-size
checks run on the meta device.
"""
import dataclasses
import json
import os
import re
import shutil

import diffusers
import pytest
import torch

from fixtures import reference_keys, write_tiny_vae
from vae import VAE, VAEConfig, load_vae, sd_vae_config, vae_state_dict_from_any

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


def to_ldm(sd, n_blocks):
    """Diffusers -> original LDM names (1x1-conv attention), written independently of the loader's mapping."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.",
                   lambda m: f"decoder.up.{n_blocks - 1 - int(m[1])}.block.", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                   lambda m: f"decoder.up.{n_blocks - 1 - int(m[1])}.upsample.", k)
        for a, b in [("mid_block.resnets.0.", "mid.block_1."), ("mid_block.resnets.1.", "mid.block_2."),
                     ("mid_block.attentions.0.group_norm.", "mid.attn_1.norm."), ("conv_norm_out.", "norm_out."),
                     ("mid_block.attentions.0.to_out.0.", "mid.attn_1.proj_out."), ("conv_shortcut.", "nin_shortcut.")]:
            k = k.replace(a, b)
        k = re.sub(r"mid_block\.attentions\.0\.to_(q|k|v)\.", r"mid.attn_1.\1.", k)
        if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", k):
            v = v[:, :, None, None]
        out["first_stage_model." + k] = v
    return out


def test_vae_ldm_single_file(root, tmp_path):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import save_file
    ref = diffusers.AutoencoderKL.from_pretrained(root / "vae").eval()
    ldm = to_ldm(ref.state_dict(), 2)
    back = convert_ldm_vae_checkpoint(ldm, dict(ref.config))        # diffusers' own converter validates to_ldm
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
