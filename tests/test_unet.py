"""unet.py, the SD1.5 / SDXL UNet: parity with diffusers on tiny random models saved in the real on-disk layouts,
the extra time-embedding hook, config errors, real-size key coverage on the meta device.

diffusers is a test-only reference: tiny random UNet2DConditionModels are saved with save_pretrained (plain,
sharded and variant="fp16") and loaded back with ours; tiny pipelines written as original single files
(fixtures.write_sd_single_file) load in ours and in diffusers' from_single_file; the real releases' single-file key
sets are checked with zero-memory files holding every key at its real shape (fixtures.write_real_size_skeleton).
"""
import copy
import json
import os

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

import unet as U
from fixtures import randomize, tiny_sd_unet, write_real_size_skeleton
from fixtures import unet_to_ldm as fixture_unet_to_ldm
from models import read_state_dict

TOL = 1e-5
CTX = 12                                                  # tiny text width
POOLED = 10                                               # tiny pooled-text width (SDXL style)
SD15 = dict(block_out_channels=(8, 16, 16), layers_per_block=1, cross_attention_dim=CTX, attention_head_dim=2,
            norm_num_groups=4, sample_size=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SDXL = dict(block_out_channels=(8, 16, 16), layers_per_block=2, cross_attention_dim=CTX, attention_head_dim=(1, 2, 4),
            transformer_layers_per_block=(1, 2, 3), norm_num_groups=4, sample_size=8, use_linear_projection=True,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            addition_embed_type="text_time", addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=POOLED + 6 * 4)
CONFIGS = {"sd15": SD15, "sdxl": SDXL}


def make_inputs(style, H=8, W=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, H, W, generator=g)
    t = torch.tensor([3.5, 701.0])                        # a fractional timestep too
    y = torch.randn(2, 5, CTX, generator=g)
    added = None
    if style == "sdxl":
        added = {"text_embeds": torch.randn(2, POOLED, generator=g),
                 "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64], [48, 80, 4, 8, 64, 64]])}
    return x, t, y, added


def reference(dm, x, t, y, added):
    with torch.no_grad():
        return dm(x, t, encoder_hidden_states=y, added_cond_kwargs=added, return_dict=False)[0]


def ours(model, x, t, y, added, **kw):
    with torch.no_grad():
        return model(x, t, y, added, **kw)


@pytest.fixture(scope="module", params=list(CONFIGS))
def saved(request, tmp_path_factory):
    """A random tiny diffusers UNet saved as <root>/pipe/unet, a sharded <root>/sharded and an fp16 variant."""
    style = request.param
    torch.manual_seed(0)
    dm = randomize(UNet2DConditionModel(**CONFIGS[style]), seed=len(style))
    root = tmp_path_factory.mktemp(f"unet_{style}")
    dm.save_pretrained(root / "pipe" / "unet")
    (root / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    dm.save_pretrained(root / "sharded", max_shard_size="20KB")
    copy.deepcopy(dm).to(torch.float16).save_pretrained(root / "fp16", variant="fp16")   # dm itself stays fp32
    return style, dm, root


#################################################################################
#                          Parity with diffusers                                #
#################################################################################

@pytest.mark.parametrize("layout", ["pipeline_folder", "unet_subfolder", "sharded"])
def test_parity_with_diffusers(saved, layout):
    style, dm, root = saved
    path = {"pipeline_folder": root / "pipe", "unet_subfolder": root / "pipe" / "unet",
            "sharded": root / "sharded"}[layout]
    if layout == "sharded":
        assert (path / "diffusion_pytorch_model.safetensors.index.json").exists()
        assert len(list(path.glob("*.safetensors"))) > 1
    model = U.load_unet(str(path))
    assert model.config.addition_embed_type == ("text_time" if style == "sdxl" else None)
    for H, W in [(8, 8), (8, 12), (7, 10)]:              # square, non-square, odd (upsampling to the skip's size)
        args = make_inputs(style, H, W)
        ref, out = reference(dm, *args), ours(model, *args)
        assert out.shape == (2, 4, H, W) and out.dtype == torch.float32
        assert (out - ref).abs().max().item() < TOL
    if style == "sdxl":                                  # the micro-conditions matter
        x, t, y, added = make_inputs(style)
        other = {**added, "time_ids": added["time_ids"] + 8}
        assert (ours(model, x, t, y, other) - ours(model, x, t, y, added)).abs().max() > 1e-3
        with pytest.raises(ValueError, match="added_cond_kwargs"):
            ours(model, x, t, y, None)


def test_fp16_variant_folder(saved):
    style, dm, root = saved
    assert (root / "fp16" / "diffusion_pytorch_model.fp16.safetensors").exists()
    model = U.load_unet(root / "fp16")                   # a pathlib.Path works too
    assert model.conv_in.weight.dtype == torch.float16
    ref = U.load_unet(root / "fp16", dtype=torch.float32)
    dm16 = UNet2DConditionModel.from_pretrained(root / "fp16", variant="fp16", torch_dtype=torch.float32).eval()
    args = make_inputs(style)
    assert (ours(ref, *args) - reference(dm16, *args)).abs().max().item() < TOL


def test_extra_emb_zeros_is_exact_and_nonzero_matters(saved):
    style, _, root = saved
    model = U.load_unet(root / "pipe")
    x, t, y, added = make_inputs(style)
    plain = ours(model, x, t, y, added)
    assert torch.equal(ours(model, x, t, y, added, extra_emb=torch.zeros(2, model.emb_dim)), plain)
    assert model.emb_dim == 4 * CONFIGS[style]["block_out_channels"][0]
    bumped = ours(model, x, t, y, added, extra_emb=torch.randn(2, model.emb_dim))
    assert (bumped - plain).abs().max() > 1e-3


def test_gradient_checkpointing_same_output_and_grads(saved):
    style, _, root = saved
    model = U.load_unet(root / "pipe").requires_grad_(True)
    x, t, y, added = make_inputs(style)
    grads = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        model.zero_grad()
        out = model(x, t, y, added)
        out.square().mean().backward()
        grads.append((out.detach(), model.conv_in.weight.grad.clone()))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


#################################################################################
#                          Config and loader errors                             #
#################################################################################

def test_from_json_rejects_unimplemented_values(saved, tmp_path):
    _, dm, _ = saved
    cfg = dict(dm.config)
    assert U.UNetConfig.from_json(cfg) == U.UNetConfig(**{k: v for k, v in cfg.items() if k in
                                                            U.UNetConfig.__dataclass_fields__})
    for key, value in [("time_cond_proj_dim", 256), ("class_embed_type", "timestep"), ("act_fn", "gelu"),
                       ("resnet_time_scale_shift", "scale_shift")]:
        with pytest.raises(ValueError, match=key):
            U.UNetConfig.from_json({**cfg, key: value})
    for key, value in [("addition_embed_type", "text"), ("upcast_attention", True),
                       ("down_block_types", ["SimpleCrossAttnDownBlock2D"] * 3)]:
        with pytest.raises(ValueError, match=key):
            U.UNetConfig.from_json({**cfg, key: value})
    with pytest.raises(ValueError, match="unknown config key"):
        U.UNetConfig.from_json({**cfg, "made_up": 1})
    with pytest.raises(ValueError, match="AutoencoderKL"):
        U.UNetConfig.from_json({**cfg, "_class_name": "AutoencoderKL"})
    path = tmp_path / "config.json"                       # from a file: the message names the file and the key
    path.write_text(json.dumps({**cfg, "time_cond_proj_dim": 256}))
    with pytest.raises(ValueError, match=r"config\.json.*time_cond_proj_dim"):
        U.UNetConfig.from_json(str(path))


def test_loader_errors(saved, tmp_path):
    _, dm, root = saved
    with pytest.raises(FileNotFoundError, match="does not exist"):
        U.load_unet(tmp_path / "nowhere")
    single = tmp_path / "sd.safetensors"
    single.write_bytes(b"")
    with pytest.raises(ValueError, match=r"could not read checkpoint .*sd\.safetensors.*truncated"):
        U.load_unet(single)
    other = dict(dm.config, layers_per_block=dm.config.layers_per_block + 1)   # config of another network
    with pytest.raises(ValueError, match="missing keys"):
        U.load_unet(root / "pipe", config={k: v for k, v in other.items() if not k.startswith("_")})


#################################################################################
#                          Real-size key coverage (meta device)                 #
#################################################################################

SD15_JSON = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
             "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
             "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                              "CrossAttnDownBlock2D", "DownBlock2D"],
             "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
             "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
             "out_channels": 4, "sample_size": 64,
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
SDXL_JSON = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
             "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
             "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": False,
             "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
             "cross_attention_dim": 2048, "cross_attention_norm": None,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None,
             "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
             "layers_per_block": 2, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
             "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
             "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
             "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
             "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
             "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
             "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
             "use_linear_projection": True}


@pytest.mark.parametrize("release, factory, n_params, n_tensors", [
    ("sd15", U.sd15_unet_config, 859_520_964, 686), ("sdxl", U.sdxl_base_unet_config, 2_567_463_684, 1680)])
def test_real_size_key_coverage(release, factory, n_params, n_tensors):
    hf = SD15_JSON if release == "sd15" else SDXL_JSON    # unet/config.json of the releases (keys as stored)
    config = U.UNetConfig.from_json(hf)
    assert config == factory()
    ours_sd = U.unet_from_config(config, device="meta").state_dict()
    with torch.device("meta"):
        dm = UNet2DConditionModel(**{k: v for k, v in hf.items() if not k.startswith("_")})
    ref_sd = dm.state_dict()
    assert {k: tuple(v.shape) for k, v in ours_sd.items()} == {k: tuple(v.shape) for k, v in ref_sd.items()}
    n = sum(v.numel() for v in ours_sd.values())
    print(f"{release} UNet: {n:,} parameters, {len(ours_sd)} tensors")
    assert n == sum(p.numel() for p in dm.parameters()) == n_params
    assert len(ours_sd) == n_tensors
    key = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert tuple(ours_sd[key].shape) == (1280, 768 if release == "sd15" else 2048)


#################################################################################
#                          Original single files                                #
#################################################################################

def sd_inputs(style, config, H=8, W=8, seed=2):
    """(x, t, 77-token text, SDXL micro-conditions) for a UNet of `config`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, H, W, generator=g)
    t = torch.tensor([3.5, 701.0])
    y = torch.randn(2, 77, config.cross_attention_dim, generator=g)
    added = None
    if style == "sdxl":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(2, pooled, generator=g),
                 "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64], [48, 80, 4, 8, 64, 64]])}
    return x, t, y, added


@pytest.mark.parametrize("ext", ["safetensors", "ckpt"])
def test_single_file_parity_with_diffusers(tiny_sd_single, ext):
    """The single file loads in ours and in diffusers' single-file loader to the same ε, and in ours to exactly the
    weights of the diffusers folder (not the EMA copy)."""
    style, folder, files = tiny_sd_single
    model = U.load_unet(files[ext], config=os.path.join(folder, "unet", "config.json"))
    from_folder = U.load_unet(folder)
    dm = UNet2DConditionModel.from_single_file(files[ext], config=folder, subfolder="unet", local_files_only=True)
    assert model.state_dict().keys() == from_folder.state_dict().keys()
    assert all(torch.equal(v, from_folder.state_dict()[k]) for k, v in model.state_dict().items())
    for H, W in [(8, 8), (8, 12)]:
        args = sd_inputs(style, model.config, H, W)
        out, ref = ours(model, *args), reference(dm.eval(), *args)
        diff = (out - ref).abs().max().item()
        print(f"{style} .{ext} UNet {H}x{W}: max|diff| to diffusers' from_single_file {diff:.2e}")
        assert diff < TOL and torch.equal(out, ours(from_folder, *args))


def test_single_file_errors_name_the_problem(tiny_sd_single, tmp_path):
    style, folder, files = tiny_sd_single
    other = "sdxl" if style == "sd15" else "sd15"
    config = U.UNetConfig.from_json(os.path.join(folder, "unet", "config.json"))
    wrong = tiny_sd_unet(other).config                               # the other release's tiny layout, forced
    with pytest.raises(ValueError, match=r"with the config given .*shape mismatches: .*(proj_in|attn2\.to_k)\.weight"):
        U.load_unet(files["safetensors"], config={k: v for k, v in wrong.items() if not k.startswith("_")})
    with pytest.raises(ValueError, match=r"not an SD1\.5 or SDXL base UNet.*pass config="):   # tiny: no release
        U.load_unet(files["safetensors"])
    sd = read_state_dict(files["safetensors"])
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(open(files["safetensors"], "rb").read()[:-100])
    with pytest.raises(ValueError, match=r"could not read checkpoint .*cut\.safetensors.*truncated.*download it again"):
        U.load_unet(cut, config=config)
    gone = sorted(k for k in sd if k.startswith("model.diffusion_model.out."))
    save_file({k: v for k, v in sd.items() if k not in gone}, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"missing keys: conv_norm_out\.bias, conv_norm_out\.weight, conv_out\.bias"):
        U.load_unet(tmp_path / "missing.safetensors", config=config)
    extra = {**sd, "model.diffusion_model.input_blocks.1.0.in_layers.5.weight": torch.zeros(1),
             "model.diffusion_model.extra.weight": torch.zeros(1)}
    save_file(extra, tmp_path / "extra.safetensors")
    with pytest.raises(ValueError, match=r"unexpected keys: model\.diffusion_model\.extra\.weight, "
                                         r"model\.diffusion_model\.input_blocks\.1\.0\.in_layers\.5\.weight\."):
        U.load_unet(tmp_path / "extra.safetensors", config=config)
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}
    save_file(lora, tmp_path / "lora.safetensors")
    with pytest.raises(ValueError, match=r"holds no UNet .*LoRA"):
        U.load_unet(tmp_path / "lora.safetensors")
    vae_only = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    save_file(vae_only, tmp_path / "vae.safetensors")
    with pytest.raises(ValueError, match=r"holds no UNet .*a VAE .*vae\.load_vae"):
        U.load_unet(tmp_path / "vae.safetensors", config=config)


#################################################################################
#                          Single files at real size (keys and shapes)          #
#################################################################################

@pytest.mark.parametrize("release, n_params", [("sd15", 859_520_964), ("sdxl", 2_567_463_684)])
def test_real_size_single_file_release_and_load(release, n_params, tmp_path):
    """Every key of the release's single file at its real shape (values one shared zero): the release is found from
    the keys and the file loads (no tensor missing, extra or mis-shaped), with the release config."""
    path = tmp_path / f"{release}.ckpt"
    shapes = write_real_size_skeleton(path, release)
    assert len(shapes) == (1131 if release == "sd15" else 2515)            # UNet + VAE + text encoder(s)
    assert U.single_file_release(path) == release
    model = U.load_unet(path)
    assert model.config == U.RELEASE_CONFIGS[release]()
    assert sum(p.numel() for p in model.parameters()) == n_params


@pytest.mark.parametrize("release, change, words", [
    ("sd15", {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)},
     r"an SD2\.x UNet \(cross-attention width 1024\)"),
    ("sd15", {"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}, r"9 input channels \(inpainting"),
    ("sdxl", {"model.diffusion_model.label_emb.0.0.weight": (1280, 2560)}, r"an SDXL refiner UNet"),
    ("sdxl", {"model.diffusion_model.output_blocks.8.0.skip_connection.weight": None},
     r"a UNet where output_blocks\.8\.0\.skip_connection\.weight is None, not \(320, 640, 1, 1\),")])
def test_single_file_release_names_other_models(release, change, words, tmp_path):
    write_real_size_skeleton(tmp_path / "other.ckpt", release, change)
    with pytest.raises(ValueError, match=words + r".*not an SD1\.5 or SDXL base UNet.*pass config="):
        U.single_file_release(tmp_path / "other.ckpt")


@pytest.mark.parametrize("release", ["sd15", "sdxl"])
def test_real_size_ldm_mapping(release):
    """The mapping reversed at real size gives the release's LDM key set (686 / 1680 tensors); it equals the
    fixtures' independent writer and diffusers' own converter maps it back to exactly our keys and shapes."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    hf = SD15_JSON if release == "sd15" else SDXL_JSON
    config = U.UNetConfig.from_json(hf)
    ours_sd = U.unet_from_config(config, device="meta").state_dict()
    ldm = U.unet_state_dict_to_ldm(ours_sd, config)
    shapes = {k: tuple(v.shape) for k, v in ldm.items()}
    assert len(ldm) == len(ours_sd) == (686 if release == "sd15" else 1680)
    assert shapes == {k: tuple(v.shape) for k, v in fixture_unet_to_ldm(ours_sd, hf).items()}
    back = U.unet_state_dict_from_ldm(ldm, config)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in ours_sd.items()}
    theirs = convert_ldm_unet_checkpoint({U.LDM_PREFIX + k: v for k, v in ldm.items()},
                                         {k: v for k, v in hf.items() if not k.startswith("_")})
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {k: tuple(v.shape) for k, v in ours_sd.items()}
    assert shapes["input_blocks.1.1.proj_in.weight" if release == "sd15" else "input_blocks.4.1.proj_in.weight"] == \
        ((320, 320, 1, 1) if release == "sd15" else (640, 640))
    assert release == "sd15" or shapes["label_emb.0.0.weight"] == (1280, 2816)
    assert "output_blocks.2.1.conv.weight" in ldm if release == "sd15" else "output_blocks.2.2.conv.weight" in ldm
