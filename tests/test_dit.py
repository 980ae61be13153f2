"""PixArt-α transformer: parity with diffusers, original .pth loading, key coverage, LoRA and loader errors.

diffusers is a test-only reference: tiny random configs are saved in the real on-disk layouts and loaded back.
"""
import json
import os

import pytest
import torch


from diffusers import PixArtTransformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed

import models as W
from pixart_fixture import randomize

TINY = dict(num_layers=2, num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8,
            sample_size=8, patch_size=2, caption_channels=16, cross_attention_dim=24)
STYLES = {"512": dict(use_additional_conditions=False),                       # interpolation_scale default 1
          "ms": dict(use_additional_conditions=True, interpolation_scale=2)}
TOL = 1e-5


def tiny_config(style):
    return {**TINY, **STYLES[style]}


def make_inputs(style, H=8, Wd=8, seed=1):
    """Latents, fractional timesteps, captions with random padding tokens, a padding mask, micro-conditions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, H, Wd, generator=g)
    t = torch.tensor([999.0, 17.5])
    y = torch.randn(2, 6, 16, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    added = None
    if style == "ms":
        added = {"resolution": torch.tensor([[8.0 * H, 8.0 * Wd], [1024.0, 1024.0]]),
                 "aspect_ratio": torch.tensor([[H / Wd], [1.0]])}
    return x, t, y, mask, added


def reference(dm, x, t, y, mask, added):
    with torch.no_grad():
        return dm(x, encoder_hidden_states=y, timestep=t, added_cond_kwargs=added,
                  encoder_attention_mask=mask, return_dict=False)[0]


def ours(model, x, t, y, mask, added):
    with torch.no_grad():
        return model(x, t, y, mask, added)


@pytest.fixture(scope="module", params=sorted(STYLES))
def saved(request, tmp_path_factory):
    """A random tiny diffusers model saved as <root>/model/transformer and as a sharded <root>/sharded."""
    style = request.param
    torch.manual_seed(0)
    dm = randomize(PixArtTransformer2DModel(**tiny_config(style)), seed=len(style)).eval()
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
    model = W.load_pixart(str(path))
    assert model.config.use_additional_conditions == (style == "ms")
    for H, Wd in [(8, 8), (8, 12), (12, 8)]:          # trained grid, and non-square grids (pos-embed recomputed)
        args = make_inputs(style, H, Wd)
        ref, out = reference(dm, *args), ours(model, *args)
        assert out.shape == (2, 8, H, Wd)
        assert (out - ref).abs().max().item() < TOL
        x, t, y, _, added = args
        assert (ours(model, x, t, y, None, added) - out).abs().max() > 1e-2   # the padding mask matters


def test_bfloat16_load_runs_close_to_fp32(saved):
    style, dm, root = saved
    x, t, y, mask, added = make_inputs(style)
    ref = ours(W.load_pixart(str(root / "model")), x, t, y, mask, added)
    model = W.load_pixart(root / "model", dtype=torch.bfloat16)            # a pathlib.Path works too
    assert model.proj_out.weight.dtype == torch.bfloat16
    out = ours(model, x.bfloat16(), t, y.bfloat16(), mask, added)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_micro_conditions_matter_and_are_required(saved):
    style, dm, root = saved
    model = W.load_pixart(str(root / "model"))
    x, t, y, mask, added = make_inputs("ms")
    if style != "ms":                                  # the 512 model has no size embedders: kwargs are ignored
        assert torch.equal(ours(model, x, t, y, mask, added), ours(model, x, t, y, mask, None))
        return
    other = {"resolution": added["resolution"] * 2, "aspect_ratio": added["aspect_ratio"]}
    assert (ours(model, x, t, y, mask, other) - ours(model, x, t, y, mask, added)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="added_cond_kwargs"):
        model(x, t, y, mask, None)


def test_pos_embed_matches_diffusers_at_real_sizes():
    for h, w, base, scale in [(32, 32, 32, 1), (64, 64, 64, 2), (48, 80, 64, 2)]:
        ref = get_2d_sincos_pos_embed(1152, (h, w), base_size=base, interpolation_scale=scale, output_type="pt")
        assert torch.equal(W.sincos_pos_embed_2d(1152, h, w, base, scale), ref.float())


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
    sd = to_original(dm.state_dict(), 8, 2, 16)
    assert any(k.endswith("attn.qkv.weight") for k in sd) and any(k.endswith("kv_linear.bias") for k in sd)
    name = "PixArt-XL-2-1024-MS.pth" if style == "ms" else "PixArt-XL-2-512x512.pth"
    torch.save({"state_dict": sd}, tmp_path / name)
    model = W.load_pixart(str(tmp_path / name), config=tiny_config(style))
    for H, Wd in [(8, 8), (8, 12)]:
        args = make_inputs(style, H, Wd)
        assert (ours(model, *args) - reference(dm, *args)).abs().max().item() < TOL
    assert torch.equal(model.null_caption, sd["y_embedder.y_embedding"])
    with pytest.raises(ValueError, match="num_layers"):    # without config: the release config (28 layers)
        W.load_pixart(str(tmp_path / name))


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


@pytest.mark.parametrize("sample_size,factory,n_params", [(64, W.pixart_xl_2_512_config, 610_856_096),
                                                          (128, W.pixart_xl_2_1024_ms_config, 611_349_152)])
def test_real_size_key_coverage(sample_size, factory, n_params):
    config = W.PixArtConfig.from_dict(hf_config(sample_size))
    assert config == factory()
    ours_sd = W.dit_from_config(config, device="meta").state_dict()
    with torch.device("meta"):
        dm = PixArtTransformer2DModel(**{k: v for k, v in hf_config(sample_size).items()
                                         if not k.startswith("_") and k not in
                                         ("double_self_attention", "num_vector_embeds", "only_cross_attention",
                                          "use_linear_projection")})
    ref_sd = dm.state_dict()
    assert {k: tuple(v.shape) for k, v in ours_sd.items()} == {k: tuple(v.shape) for k, v in ref_sd.items()}
    assert sum(v.numel() for v in ours_sd.values()) == sum(p.numel() for p in dm.parameters()) == n_params
    # the original .pth naming at real size: every key maps back, and the release config is recognised
    orig = to_original(ref_sd, sample_size, 2, 4096)
    assert len(orig) == (445 if sample_size == 128 else 437)
    mapped = W.original_to_diffusers(orig)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in ref_sd.items()}
    assert W.infer_original_config(orig) == factory()
    del orig["pos_embed"]
    assert W.infer_original_config(orig, os.path.basename(f"/x/PixArt-XL-2-{sample_size * 8}.pth")) == factory()


#################################################################################
#                          LoRA                                                 #
#################################################################################

@pytest.fixture
def lora_model():
    torch.manual_seed(0)
    model = randomize(W.dit_from_config(tiny_config("512")), seed=3)
    x, t, y, mask, _ = make_inputs("512")
    base_out = ours(model, x, t, y, mask, None)
    W.add_lora(model, rank=4, alpha=8)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in W.lora_layers(model):
            for name in ("student", "fake"):
                m.lora_B[name].weight.copy_(torch.randn(m.lora_B[name].weight.shape, generator=g) * 0.1)
    return model, base_out, (x, t, y, mask, None)


def test_lora_adapters(lora_model):
    model, base_out, args = lora_model
    assert len(W.lora_layers(model)) == 2 * len(W.LORA_TARGETS)
    with W.use_adapter(model, None):
        assert torch.equal(ours(model, *args), base_out)
    with W.use_adapter(model, "student"):
        student = ours(model, *args)
        with W.use_adapter(model, "fake"):
            fake = ours(model, *args)
        assert torch.equal(ours(model, *args), student)          # restored on exit
    assert (student - base_out).abs().max() > 1e-3 and (fake - student).abs().max() > 1e-3
    assert torch.equal(ours(model, *args), base_out)              # outside: base again
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2 * len(W.LORA_TARGETS)   # 2 adapters x (A, B) x layers
    assert len(W.lora_parameters(model, "student")) == 2 * 2 * len(W.LORA_TARGETS)
    with pytest.raises(ValueError, match="unknown adapter"):
        W.use_adapter(model, "teacher")


def test_lora_keeps_base_keys_and_state_dict_round_trips(lora_model):
    model, _, args = lora_model
    sd = model.state_dict()
    base_keys = set(W.dit_from_config(tiny_config("512"), device="meta").state_dict())
    assert base_keys <= set(sd) and all(".lora_" in k for k in set(sd) - base_keys)
    lsd = W.lora_state_dict(model, "student")
    assert lsd and all("student" not in k for k in lsd)
    fresh = W.dit_from_config(tiny_config("512"))
    W.load_exact(fresh, {k: sd[k] for k in base_keys}, "base")
    W.add_lora(fresh, rank=4, alpha=8)
    W.load_lora_state_dict(fresh, lsd, "fake")                    # a student snapshot loads into any slot
    with W.use_adapter(model, "student"), W.use_adapter(fresh, "fake"):
        assert torch.equal(ours(fresh, *args), ours(model, *args))
    with pytest.raises(ValueError, match="rank"):
        W.load_lora_state_dict(fresh, {k: v[:2] if "lora_A" in k else v for k, v in lsd.items()}, "student")


def test_gradient_checkpointing_uses_the_adapter_of_the_forward(lora_model):
    model, _, (x, t, y, mask, _) = lora_model
    grads = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.zero_grad()
        with W.use_adapter(model, "student"):
            loss = model(x, t, y, mask).square().mean()
        loss.backward()                                           # backward runs with the adapter switched off
        grads.append([p.grad.clone() for p in W.lora_parameters(model, "student")])
        assert all(p.grad is None for p in W.lora_parameters(model, "fake"))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_fp32_adapter_on_bf16_base_runs_without_autocast():
    """Student/fake adapters are fp32 on a bf16 base (trainable_lora_views); previews and sampling run outside
    autocast, so the layer casts itself. Result = the fp32 computation up to bf16 rounding (2^-8 relative)."""
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(16, 8).to(torch.bfloat16)
    layer = W.LoRALinear(base)
    layer.add_adapter("student", rank=4, alpha=4)
    for p in (layer.lora_A["student"].weight, layer.lora_B["student"].weight):
        p.data = torch.randn(p.shape, generator=g).float()
    layer.set_active("student")
    x = torch.randn(3, 16, generator=g).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    A, B = layer.lora_A["student"].weight, layer.lora_B["student"].weight
    ref = torch.nn.functional.linear(x.float(), base.weight.float(), base.bias.float()) + x.float() @ A.T @ B.T
    assert torch.allclose(y.float(), ref, rtol=2 ** -7, atol=2 ** -7 * ref.abs().max().item())


#################################################################################
#                          Bad inputs                                           #
#################################################################################

def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        W.load_pixart(str(tmp_path / "nope"))


def test_folder_without_weights_or_config(saved, tmp_path):
    _, _, root = saved
    (tmp_path / "cfg_only").mkdir()
    (tmp_path / "cfg_only" / "config.json").write_text((root / "model/transformer/config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights"):
        W.load_pixart(str(tmp_path / "cfg_only"))
    (tmp_path / "weights_only").mkdir()
    data = (root / "model/transformer/diffusion_pytorch_model.safetensors").read_bytes()
    (tmp_path / "weights_only" / "diffusion_pytorch_model.safetensors").write_bytes(data)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        W.load_pixart(str(tmp_path / "weights_only"))


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
        W.load_pixart(str(folder))


def test_config_disagrees_with_weights(saved, tmp_path):
    _, _, root = saved
    folder = copy_transformer(root, tmp_path / "c")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_layers": 3}))
    with pytest.raises(ValueError, match="num_layers=3 .* 2 transformer blocks"):
        W.load_pixart(str(folder))
    (folder / "config.json").write_text(json.dumps({**cfg, "attention_head_dim": 6, "cross_attention_dim": 12}))
    with pytest.raises(ValueError, match="shape mismatches"):
        W.load_pixart(str(folder))


def test_unknown_layout(tmp_path):
    from safetensors.torch import save_file
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="unknown checkpoint layout"):
        W.load_pixart(str(tmp_path / "x.safetensors"))


@pytest.mark.parametrize("change,words", [({"norm_type": "ada_norm_zero"}, "norm_type='ada_norm_zero'.*ada_norm_single"),
                                          ({"activation_fn": "geglu"}, "activation_fn"),
                                          ({"some_new_key": 1}, "unknown config key.*some_new_key"),
                                          ({"cross_attention_dim": 4096}, "cross_attention_dim")])
def test_unsupported_config_values(change, words):
    with pytest.raises(ValueError, match=words):
        W.PixArtConfig.from_dict({**hf_config(64), **change})



def test_teacher_autocasts_per_call_so_a_step_is_seen_by_the_next_forward():
    """Autocast caches the bf16 copy of every trainable weight until its outermost region ends. The teacher
    autocasts each network call, so a forward after an optimiser step sees the new weights; one region around
    a whole TDM step (the old train.py) would feed a second fake update the weights from before the first."""
    from teachers import PixArtTeacher
    net = randomize(W.PixArtDiT(W.PixArtConfig(**tiny_config("512"))))
    teacher = PixArtTeacher.from_network(net, autocast=torch.bfloat16)
    student, _ = W.trainable_lora_views(net, rank=2)
    x, _, y, mask, _ = make_inputs("512")
    t = torch.tensor([999, 17])
    B = W.lora_parameters(net, "student")[1]                       # lora_B of the first layer, zero at start
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
            for p in W.lora_parameters(net, "student"):
                p.add_(0.5)                                        # an "optimiser step", in place
        return y1, teacher.x0(student, x, t, (y, mask))

    y1, y2 = before_and_after_update()
    assert (y1 - y2).abs().max() > 1e-2                            # the update is seen
    with torch.autocast("cpu", dtype=torch.bfloat16):              # what per-call autocast avoids
        y1, y2 = before_and_after_update()
    assert torch.equal(y1, y2)                                     # stale cached bf16 weights


def test_step_embedding_starts_as_identity_then_conditions_on_K():
    """TDM-unify: the zero-initialised step embedding leaves the DiT's output unchanged for every supported K;
    once it is non-zero, K changes the output; an unsupported K is an error, not a silent row 0."""
    net = randomize(W.PixArtDiT(W.PixArtConfig(**tiny_config("512"))))
    x, t, y, mask, _ = make_inputs("512")
    plain = ours(net, x, t, y, mask, None)
    net.add_step_embedding([1, 2, 4])
    for K in (1, 2, 4):
        assert torch.equal(ours(net, x, t, y, mask, None), plain)
        with torch.no_grad():
            assert torch.equal(net(x, t, y, mask, None, step_count=torch.full((2,), K)), plain)
    with torch.no_grad():
        net.step_emb.weight.normal_()
        a = net(x, t, y, mask, None, step_count=torch.tensor([1, 1]))
        b = net(x, t, y, mask, None, step_count=torch.tensor([4, 4]))
    assert (a - b).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"step count\(s\) \[3\] not supported"):
        net(x, t, y, mask, None, step_count=torch.tensor([1, 3]))
