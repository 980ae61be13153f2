"""pixart.py, the PixArt-α transformer: parity with diffusers, original .pth loading, real-size key coverage,
config and loader errors.

diffusers is a test-only reference: tiny random models (fixtures.tiny_dit) are saved in the real on-disk layouts
and loaded back. LoRA and the step-count embedding on the DiT are tested in test_models.py.
"""
import json
import os

import pytest
import torch
from diffusers import PixArtTransformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed

import pixart as P
from fixtures import DIT, DIT_MS, dit_forward, dit_inputs, reference_keys, tiny_dit

STYLES = ("512", "ms")
TOL = 1e-5
CAPTION = DIT["caption_channels"]


def tiny_config(style):
    """The tiny DiT's diffusers config (512-style: interpolation_scale default 1, no micro-conditions)."""
    return {**DIT, **(DIT_MS if style == "ms" else {})}


def make_inputs(style, H=8, Wd=8, seed=1):
    """Latents, fractional timesteps, captions with random padding tokens, a padding mask, micro-conditions."""
    return dit_inputs(style == "ms", H, Wd, seed)


def reference(dm, x, t, y, mask, added):
    with torch.no_grad():
        return dm(x, encoder_hidden_states=y, timestep=t, added_cond_kwargs=added,
                  encoder_attention_mask=mask, return_dict=False)[0]


@pytest.fixture(scope="module", params=STYLES)
def saved(request, tmp_path_factory):
    """A random tiny diffusers model saved as <root>/model/transformer and as a sharded <root>/sharded."""
    style = request.param
    dm = tiny_dit(ms=style == "ms", seed=len(style))
    root = tmp_path_factory.mktemp(f"pixart_{style}")
    dm.save_pretrained(root / "model" / "transformer")
    (root / "model" / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    dm.save_pretrained(root / "sharded", max_shard_size="20KB")
    return style, dm, root


#################################################################################
#                          Parity with diffusers                                #
#################################################################################

@pytest.mark.parametrize("layout", ["model_folder", "transformer_subfolder", "sharded"])
def test_parity_with_diffusers(saved, layout):
    style, dm, root = saved
    path = {"model_folder": root / "model", "transformer_subfolder": root / "model" / "transformer",
            "sharded": root / "sharded"}[layout]
    if layout == "sharded":
        assert (path / "diffusion_pytorch_model.safetensors.index.json").exists()
        assert len(list(path.glob("*.safetensors"))) > 1
    model = P.load_pixart(str(path))
    assert model.config.use_additional_conditions == (style == "ms")
    for H, Wd in [(8, 8), (8, 12), (12, 8)]:          # trained grid, and non-square grids (pos-embed recomputed)
        args = make_inputs(style, H, Wd)
        ref, out = reference(dm, *args), dit_forward(model, *args)
        assert out.shape == (2, 8, H, Wd)
        assert (out - ref).abs().max().item() < TOL
        x, t, y, _, added = args
        assert (dit_forward(model, x, t, y, None, added) - out).abs().max() > 1e-2   # the padding mask matters


def test_bfloat16_load_runs_close_to_fp32(saved):
    style, dm, root = saved
    x, t, y, mask, added = make_inputs(style)
    ref = dit_forward(P.load_pixart(str(root / "model")), x, t, y, mask, added)
    model = P.load_pixart(root / "model", dtype=torch.bfloat16)            # a pathlib.Path works too
    assert model.proj_out.weight.dtype == torch.bfloat16
    out = dit_forward(model, x.bfloat16(), t, y.bfloat16(), mask, added)
    assert out.dtype == torch.float32                   # the output projection runs in fp32 (docs/method.md §12)
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_micro_conditions_matter_and_are_required(saved):
    style, dm, root = saved
    model = P.load_pixart(str(root / "model"))
    x, t, y, mask, added = make_inputs("ms")
    if style != "ms":                                  # the 512 model has no size embedders: kwargs are ignored
        assert torch.equal(dit_forward(model, x, t, y, mask, added), dit_forward(model, x, t, y, mask, None))
        return
    other = {"resolution": added["resolution"] * 2, "aspect_ratio": added["aspect_ratio"]}
    assert (dit_forward(model, x, t, y, mask, other) - dit_forward(model, x, t, y, mask, added)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="added_cond_kwargs"):
        model(x, t, y, mask, None)


def test_pos_embed_matches_diffusers_at_real_sizes():
    for h, w, base, scale in [(32, 32, 32, 1), (64, 64, 64, 2), (48, 80, 64, 2)]:
        ref = get_2d_sincos_pos_embed(1152, (h, w), base_size=base, interpolation_scale=scale, output_type="pt")
        assert torch.equal(P.sincos_pos_embed_2d(1152, h, w, base, scale), ref.float())


#################################################################################
#                          Original PixArt .pth                                 #
#################################################################################

_TO_ORIGINAL = [("pos_embed.proj.", "x_embedder.proj."),
                ("adaln_single.emb.timestep_embedder.linear_1.", "t_embedder.mlp.0."),
                ("adaln_single.emb.timestep_embedder.linear_2.", "t_embedder.mlp.2."),
                ("adaln_single.emb.resolution_embedder.linear_1.", "csize_embedder.mlp.0."),
                ("adaln_single.emb.resolution_embedder.linear_2.", "csize_embedder.mlp.2."),
                ("adaln_single.emb.aspect_ratio_embedder.linear_1.", "ar_embedder.mlp.0."),
                ("adaln_single.emb.aspect_ratio_embedder.linear_2.", "ar_embedder.mlp.2."),
                ("adaln_single.linear.", "t_block.1."),
                ("caption_projection.linear_1.", "y_embedder.y_proj.fc1."),
                ("caption_projection.linear_2.", "y_embedder.y_proj.fc2."),
                ("proj_out.", "final_layer.linear."), ("scale_shift_table", "final_layer.scale_shift_table"),
                ("attn1.to_out.0.", "attn.proj."), ("attn2.to_q.", "cross_attn.q_linear."),
                ("attn2.to_out.0.", "cross_attn.proj."), ("ff.net.0.proj.", "mlp.fc1."), ("ff.net.2.", "mlp.fc2.")]


def to_original(sd, sample_size, patch_size, caption_channels):
    """diffusers -> original PixArt naming (independent inverse of the loader), fusing qkv and kv."""
    out = {}
    for key, v in sd.items():
        prefix, rest = "", key
        if key.startswith("transformer_blocks."):
            i, rest = key.split(".", 2)[1:]
            prefix = f"blocks.{i}."
            if rest.startswith(("attn1.to_k", "attn1.to_v", "attn2.to_v")):
                continue                                   # consumed by the fused tensors below
            if rest == "scale_shift_table":
                out[prefix + rest] = v
                continue
            leaf = rest.rsplit(".", 1)[1]
            if rest.startswith("attn1.to_q"):
                out[prefix + "attn.qkv." + leaf] = torch.cat(
                    [sd[f"transformer_blocks.{i}.attn1.to_{n}.{leaf}"] for n in "qkv"])
                continue
            if rest.startswith("attn2.to_k"):
                out[prefix + "cross_attn.kv_linear." + leaf] = torch.cat(
                    [sd[f"transformer_blocks.{i}.attn2.to_{n}.{leaf}"] for n in "kv"])
                continue
        for new, old in _TO_ORIGINAL:
            if rest.startswith(new):
                out[prefix + old + rest[len(new):]] = v
                break
        else:
            raise AssertionError(f"test inverse mapping misses {key}")
    D, n = sd["proj_out.weight"].shape[1], (sample_size // patch_size) ** 2
    out["pos_embed"] = torch.zeros(1, n, D, device=sd["proj_out.weight"].device)
    out["y_embedder.y_embedding"] = torch.randn(120, caption_channels, device=sd["proj_out.weight"].device)
    return out


def test_original_pth_parity(saved, tmp_path):
    style, dm, _ = saved
    sd = to_original(dm.state_dict(), 8, 2, CAPTION)
    assert any(k.endswith("attn.qkv.weight") for k in sd) and any(k.endswith("kv_linear.bias") for k in sd)
    name = "PixArt-XL-2-1024-MS.pth" if style == "ms" else "PixArt-XL-2-512x512.pth"
    torch.save({"state_dict": sd}, tmp_path / name)
    model = P.load_pixart(str(tmp_path / name), config=tiny_config(style))
    for H, Wd in [(8, 8), (8, 12)]:
        args = make_inputs(style, H, Wd)
        assert (dit_forward(model, *args) - reference(dm, *args)).abs().max().item() < TOL
    assert torch.equal(model.null_caption, sd["y_embedder.y_embedding"])
    with pytest.raises(ValueError, match="num_layers"):    # without config: the release config (28 layers)
        P.load_pixart(str(tmp_path / name))


#################################################################################
#                          Real-size key coverage (meta device)                 #
#################################################################################

def hf_config(sample_size):
    """transformer/config.json as the HF PixArt repos store it (Transformer2DModel keys)."""
    return {"_class_name": "Transformer2DModel", "_diffusers_version": "0.22.0", "activation_fn": "gelu-approximate",
            "attention_bias": True, "attention_head_dim": 72, "attention_type": "default", "caption_channels": 4096,
            "cross_attention_dim": 1152, "double_self_attention": False, "dropout": 0.0, "in_channels": 4,
            "norm_elementwise_affine": False, "norm_eps": 1e-06, "norm_num_groups": 32,
            "norm_type": "ada_norm_single", "num_attention_heads": 16, "num_embeds_ada_norm": 1000,
            "num_layers": 28, "num_vector_embeds": None, "only_cross_attention": False, "out_channels": 8,
            "patch_size": 2, "sample_size": sample_size, "upcast_attention": False, "use_linear_projection": False}


@pytest.mark.parametrize("sample_size,factory,n_params", [(64, P.pixart_xl_2_512_config, 610_856_096),
                                                          (128, P.pixart_xl_2_1024_ms_config, 611_349_152)])
def test_real_size_key_coverage(sample_size, factory, n_params):
    config = P.PixArtConfig.from_json(hf_config(sample_size))
    assert config == factory()
    ours_sd = P.dit_from_config(config, device="meta").state_dict()
    with torch.device("meta"):
        dm = PixArtTransformer2DModel(**{k: v for k, v in hf_config(sample_size).items()
                                         if not k.startswith("_") and k not in
                                         ("double_self_attention", "num_vector_embeds", "only_cross_attention",
                                          "use_linear_projection")})
    ref_sd = dm.state_dict()
    assert {k: tuple(v.shape) for k, v in ours_sd.items()} == {k: tuple(v.shape) for k, v in ref_sd.items()}
    release = "pixart_1024ms" if sample_size == 128 else "pixart_512"
    assert {k: tuple(v.shape) for k, v in ours_sd.items()} == reference_keys(release + "_diffusers")
    assert sum(v.numel() for v in ours_sd.values()) == sum(p.numel() for p in dm.parameters()) == n_params
    # the original .pth naming at real size: every key maps back, and the release config is recognised
    orig = to_original(ref_sd, sample_size, 2, 4096)
    assert len(orig) == (445 if sample_size == 128 else 437)
    assert {k: tuple(v.shape) for k, v in orig.items()} == reference_keys(release + "_original_pth_state_dict")
    mapped = P.original_to_diffusers(orig)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in ref_sd.items()}
    assert P.infer_original_config(orig) == factory()
    del orig["pos_embed"]
    assert P.infer_original_config(orig, os.path.basename(f"/x/PixArt-XL-2-{sample_size * 8}.pth")) == factory()


#################################################################################
#                          Bad inputs                                           #
#################################################################################

def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        P.load_pixart(str(tmp_path / "nope"))


def test_folder_without_weights_or_config(saved, tmp_path):
    _, _, root = saved
    (tmp_path / "cfg_only").mkdir()
    (tmp_path / "cfg_only" / "config.json").write_text((root / "model/transformer/config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights"):
        P.load_pixart(str(tmp_path / "cfg_only"))
    (tmp_path / "weights_only").mkdir()
    data = (root / "model/transformer/diffusion_pytorch_model.safetensors").read_bytes()
    (tmp_path / "weights_only" / "diffusion_pytorch_model.safetensors").write_bytes(data)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        P.load_pixart(str(tmp_path / "weights_only"))


def copy_transformer(root, dst):
    dst.mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (dst / name).write_bytes((root / "model" / "transformer" / name).read_bytes())
    return dst


def test_truncated_safetensors(saved, tmp_path):
    _, _, root = saved
    folder = copy_transformer(root, tmp_path / "t")
    f = folder / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated"):
        P.load_pixart(str(folder))


def test_config_disagrees_with_weights(saved, tmp_path):
    _, _, root = saved
    folder = copy_transformer(root, tmp_path / "c")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_layers": 3}))
    with pytest.raises(ValueError, match="num_layers=3 .* 2 transformer blocks"):
        P.load_pixart(str(folder))
    (folder / "config.json").write_text(json.dumps({**cfg, "attention_head_dim": 6, "cross_attention_dim": 12}))
    with pytest.raises(ValueError, match="shape mismatches"):
        P.load_pixart(str(folder))


def test_unknown_layout(tmp_path):
    from safetensors.torch import save_file
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="unknown checkpoint layout"):
        P.load_pixart(str(tmp_path / "x.safetensors"))


@pytest.mark.parametrize("change,words", [({"norm_type": "ada_norm_zero"}, "norm_type='ada_norm_zero'.*ada_norm_single"),
                                          ({"activation_fn": "geglu"}, "activation_fn"),
                                          ({"some_new_key": 1}, "unknown config key.*some_new_key"),
                                          ({"cross_attention_dim": 4096}, "cross_attention_dim"),
                                          ({"caption_channels": None}, "caption_channels=None"),
                                          ({"_class_name": "UNet2DConditionModel"}, "'UNet2DConditionModel', not of a "
                                                                                    "PixArtTransformer2DModel")])
def test_unsupported_config_values(change, words):
    with pytest.raises(ValueError, match=words):
        P.PixArtConfig.from_json({**hf_config(64), **change})


def test_from_json_names_the_file_and_the_key(saved, tmp_path):
    """An unimplemented value in a folder's transformer/config.json: load_pixart raises naming the file and the key."""
    _, _, root = saved
    folder = copy_transformer(root, tmp_path / "t")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "upcast_attention": True}))
    with pytest.raises(ValueError, match=r"config\.json: upcast_attention=True is not implemented; PixArtConfig needs "
                                         r"upcast_attention=False") as e:
        P.load_pixart(str(folder))
    assert str(folder / "config.json") in str(e.value)

