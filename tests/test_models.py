"""models.py, what every network shares: weights I/O, JSONConfig, LoRA, gradient checkpointing with LoRA, TDM-unify's
StepCountEmbedding (docs/method.md §8, Eq. (8)) and the old flat key layout, the toy MLP.

The LoRA and checkpointing tests run on a tiny random PixArt DiT (pixart.py), whose blocks carry diffusers' key names
(the LoRA targets); the step-count embedding on the DiT and on the toy MLP.
"""
import json
import os
from dataclasses import dataclass

import pytest
import torch

import models as M
from fixtures import DIT, dit_forward, dit_inputs, randomize
from pixart import PixArtConfig, PixArtDiT, dit_from_config

TINY = PixArtConfig.from_json(DIT)


#################################################################################
#                          Weights: read, check, save                           #
#################################################################################

def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(3, 2, generator=g), "a.bias": torch.randn(3, generator=g),
            "b.step": torch.arange(4)}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_safetensors_is_atomic_and_keeps_metadata(tmp_path):
    from safetensors import safe_open
    path = tmp_path / "deep" / "er" / "w.safetensors"               # parent folders are created
    sd = _tensors()
    M.save_safetensors({k: v.t() if v.ndim == 2 else v for k, v in sd.items()}, str(path), {"prompt": "x"})
    assert os.listdir(path.parent) == ["w.safetensors"]              # no temporary file left behind
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"prompt": "x"}
    back = M.read_state_dict(str(path))
    assert torch.equal(back["a.weight"], sd["a.weight"].t()) and back["a.weight"].is_contiguous()


def test_read_state_dict_files_and_folders(tmp_path):
    sd = _tensors()
    M.save_safetensors(sd, str(tmp_path / "one" / "model.safetensors"))
    assert _same(M.read_state_dict(str(tmp_path / "one")), sd)                          # a folder with one file
    assert _same(M.read_state_dict(str(tmp_path / "one" / "model.safetensors")), sd)    # the file itself
    torch.save(sd, tmp_path / "legacy.bin")
    assert _same(M.read_state_dict(str(tmp_path / "legacy.bin")), sd)
    torch.save({"state_dict": sd, "step": 3}, tmp_path / "original.pth")              # original PixArt / LDM
    assert _same(M.read_state_dict(str(tmp_path / "original.pth")), sd)
    # variants: read when they are the only weights, skipped next to the plain file
    M.save_safetensors(sd, str(tmp_path / "variant" / "model.fp16.safetensors"))
    assert _same(M.read_state_dict(str(tmp_path / "variant")), sd)
    M.save_safetensors(_tensors(1), str(tmp_path / "variant" / "model.safetensors"))
    assert _same(M.read_state_dict(str(tmp_path / "variant")), _tensors(1))
    # sharded with an index json
    shards = tmp_path / "sharded"
    M.save_safetensors({"a.weight": sd["a.weight"]}, str(shards / "model-00001-of-00002.safetensors"))
    M.save_safetensors({"a.bias": sd["a.bias"], "b.step": sd["b.step"]}, str(shards / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"a.weight": "model-00001-of-00002.safetensors", "a.bias": "model-00002-of-00002.safetensors",
                            "b.step": "model-00002-of-00002.safetensors"}}
    (shards / "model.safetensors.index.json").write_text(json.dumps(index))
    assert _same(M.read_state_dict(str(shards)), sd)


def test_read_state_dict_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        M.read_state_dict(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no weights in"):
        M.read_state_dict(str(tmp_path / "empty"))
    for name in ("a.safetensors", "b.safetensors"):
        M.save_safetensors(_tensors(), str(tmp_path / "two" / name))
    with pytest.raises(ValueError, match=r"several weight files \['a.safetensors', 'b.safetensors'\]"):
        M.read_state_dict(str(tmp_path / "two"))
    bad = tmp_path / "bad_index"
    M.save_safetensors(_tensors(), str(bad / "model-00001-of-00002.safetensors"))
    (bad / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match="no 'weight_map'"):
        M.read_state_dict(str(bad))
    (bad / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a.weight": "model-00001-of-00002.safetensors", "a.bias": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors.* is missing"):
        M.read_state_dict(str(bad))
    M.save_safetensors(_tensors(), str(tmp_path / "cut.safetensors"))
    data = (tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        M.read_state_dict(str(tmp_path / "cut.safetensors"))
    torch.save({"model": _tensors(), "iteration": 3}, tmp_path / "training.pt")         # not a state dict
    with pytest.raises(ValueError, match="not a state dict of tensors"):
        M.read_state_dict(str(tmp_path / "training.pt"))


def _full_checkpoint(seed=0):
    """A single file's worth of components: {'unet.*', 'vae.*', 'ema.*'} tensors."""
    return {f"{part}.{k}": v + i for i, part in enumerate(("unet", "vae", "ema")) for k, v in _tensors(seed).items()}


def test_read_state_dict_prefixes_reads_only_those_tensors(tmp_path, monkeypatch):
    import safetensors
    sd = _full_checkpoint()
    want = {k: v for k, v in sd.items() if k.startswith(("unet.", "ema."))}
    M.save_safetensors(sd, str(tmp_path / "full.safetensors"))
    opened, read = safetensors.safe_open, []

    class Spy:                                                  # safe_open that records the tensors read
        def __init__(self, *args, **kw):
            self.f = opened(*args, **kw)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.f.get_tensor(key)
    monkeypatch.setattr(safetensors, "safe_open", Spy)
    assert _same(M.read_state_dict(str(tmp_path / "full.safetensors"), prefixes=("unet.", "ema.")), want)
    assert sorted(read) == sorted(want)                         # the vae.* bytes were never read
    monkeypatch.undo()
    torch.save({"state_dict": sd, "global_step": 3}, tmp_path / "full.ckpt")       # LDM .ckpt: memory-mapped
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(kw) or real_load(*a, **kw))
    assert _same(M.read_state_dict(str(tmp_path / "full.ckpt"), prefixes=["unet.", "ema."]), want)
    assert loads[0]["mmap"] and loads[0]["weights_only"]
    torch.save({"state_dict": sd}, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    assert _same(M.read_state_dict(str(tmp_path / "legacy.ckpt"), prefixes=("vae.",)),     # not mappable: read
                 {k: v for k, v in sd.items() if k.startswith("vae.")})
    M.save_safetensors(sd, str(tmp_path / "folder" / "model.safetensors"))
    assert _same(M.read_state_dict(str(tmp_path / "folder"), prefixes=("ema.",)),
                 {k: v for k, v in sd.items() if k.startswith("ema.")})
    assert M.read_state_dict(str(tmp_path / "full.safetensors"), prefixes=("nothing.",)) == {}


def test_checkpoint_shapes_reads_names_and_shapes_only(tmp_path):
    sd = _full_checkpoint()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    M.save_safetensors(sd, str(tmp_path / "full.safetensors"))
    torch.save({"state_dict": sd}, tmp_path / "full.ckpt")
    assert M.checkpoint_shapes(str(tmp_path / "full.safetensors")) == shapes
    assert M.checkpoint_shapes(str(tmp_path / "full.ckpt")) == shapes
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(ValueError, match=r"^could not read checkpoint .*cut\.safetensors.*truncated.*download it "
                                         r"again\.$"):
        M.checkpoint_shapes(str(tmp_path / "cut.safetensors"))


def test_pickled_objects_are_refused_with_the_fix(tmp_path):
    """An LDM .ckpt carrying training objects: weights-only loading refuses it; the error is one line with the fix."""
    import argparse
    torch.save({"state_dict": _tensors(), "hparams": argparse.Namespace(lr=1.0)}, tmp_path / "train.ckpt")
    with pytest.raises(ValueError, match=r"^could not read checkpoint .*train\.ckpt.*pickled Python objects.*"
                                         r"\.safetensors") as e:
        M.read_state_dict(str(tmp_path / "train.ckpt"))
    assert "\n" not in str(e.value)


def test_load_exact_lists_every_mismatch_and_build_and_load_casts():
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LayerNorm(3))
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    bad = {**{k: v for k, v in sd.items() if k != "1.bias"}, "2.weight": torch.zeros(1), "0.weight": torch.zeros(4, 2)}
    with pytest.raises(ValueError, match=r"^net: .*missing keys: 1\.bias; unexpected keys: 2\.weight; shape "
                                         r"mismatches: 0\.weight: checkpoint \(4, 2\) vs model \(3, 2\)\. Check"):
        M.load_exact(net, bad, "net")
    many = {f"extra{i}": torch.zeros(1) for i in range(10)}
    with pytest.raises(ValueError, match=r"\.\.\. \(10 in all\)"):
        M.load_exact(net, {**sd, **many}, "net")
    assert M.load_exact(net, sd, "net") is net
    built = M.build_and_load(lambda: torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LayerNorm(3)),
                             dict(sd), "net", dtype=torch.bfloat16, keep_fp32=("1.",))
    assert built[0].weight.dtype == torch.bfloat16 and built[1].weight.dtype == torch.float32   # keep_fp32 kept
    assert built[0].weight.device.type == "cpu" and torch.equal(built[1].weight, sd["1.weight"])  # no meta left
    assert not built.training and not any(p.requires_grad for p in built.parameters())


#################################################################################
#                          JSONConfig                                           #
#################################################################################

@dataclass
class _Config(M.JSONConfig):
    CLASS_NAMES = ("NewNet", "OldNet")
    FIXED = {"act_fn": "silu", "blocks": ("down", "up")}
    IGNORED = ("stats",)
    width: int = 8
    depth: int = 2


@dataclass
class _LooseConfig(M.JSONConfig):
    STRICT = False
    width: int = 8


def test_json_config_reads_config_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"_class_name": "OldNet", "_diffusers_version": "0.1", "width": 16,
                                "act_fn": "silu", "blocks": ["down", "up"], "stats": [1, 2]}))
    assert _Config.from_json(str(path)) == _Config(width=16)             # a list equals the fixed tuple
    assert _Config.from_json(path) == _Config.from_json({"width": 16})   # a path or a dict; fixed keys optional
    assert _LooseConfig.from_json({"width": 3, "generation_max_length": 20}) == _LooseConfig(width=3)


@pytest.mark.parametrize("config,words", [
    ({"_class_name": "UNet"}, r"config of a 'UNet', not of a NewNet: pass the pipeline folder"),
    ({"act_fn": "gelu"}, r"act_fn='gelu' is not implemented; _Config needs act_fn='silu'"),
    ({"blocks": ["down"]}, r"blocks=\['down'\] is not implemented"),
    ({"width": 4, "heads": 2}, r"unknown config key\(s\) \['heads'\]")])
def test_json_config_names_what_is_not_implemented(config, words, tmp_path):
    with pytest.raises(ValueError, match=words):
        _Config.from_json(config)
    path = tmp_path / "config.json"                                       # the message names the file
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=str(path)):
        _Config.from_json(str(path))


#################################################################################
#                          Shared layers                                        #
#################################################################################

def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding
    t = torch.tensor([0.0, 1.0, 17.5, 500.0, 999.0])
    for dim, flip, shift in ((256, True, 0.0), (128, True, 0.0), (64, False, 1.0), (33, True, 0.0)):
        ref = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        assert torch.allclose(M.timestep_embedding(t, dim, flip_sin_to_cos=flip, shift=shift), ref, atol=1e-6), dim


def test_attention_is_scaled_dot_product_over_heads():
    """Self- and cross-attention against the explicit softmax(q k^T / sqrt(d_head) + bias) v per head; the VAE's
    attention block reuses the same module (and key names)."""
    import vae
    torch.manual_seed(0)
    attn = M.Attention(8, heads=2, context_dim=6)
    x, ctx = torch.randn(2, 5, 8), torch.randn(2, 3, 6)
    bias = torch.tensor([0.0, 0.0, -1e4])[None, None, None].expand(2, 1, 1, 3)       # the last key masked out

    def explicit(x, ctx, bias):
        split = lambda z: z.reshape(2, -1, 2, 4).transpose(1, 2)                      # (B, heads, L, 4)
        q, k, v = split(attn.to_q(x)), split(attn.to_k(ctx)), split(attn.to_v(ctx))
        w = (q @ k.transpose(-1, -2) / 4 ** 0.5 + (0 if bias is None else bias)).softmax(-1)
        return attn.to_out[0]((w @ v).transpose(1, 2).reshape(2, -1, 8))
    with torch.no_grad():
        assert torch.allclose(attn(x, ctx, bias), explicit(x, ctx, bias), atol=1e-6)
        assert torch.allclose(attn(x, ctx, bias), attn(x, ctx[:, :2]), atol=1e-6)     # masked = absent
        self_attn = M.Attention(8, heads=2)
        assert self_attn(x).shape == (2, 5, 8)
    assert issubclass(vae.AttentionBlock, M.Attention)
    assert {k for k in vae.AttentionBlock(8, 4).state_dict()} >= {"to_q.weight", "to_k.weight", "to_v.weight",
                                                                   "to_out.0.weight", "group_norm.weight"}


#################################################################################
#                          LoRA                                                 #
#################################################################################

@pytest.fixture
def lora_model():
    torch.manual_seed(0)
    model = randomize(dit_from_config(TINY), seed=3)
    x, t, y, mask, _ = dit_inputs()
    base_out = dit_forward(model, x, t, y, mask, None)
    M.add_lora(model, rank=4, alpha=8)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in M.lora_layers(model):
            for name in ("student", "fake"):
                m.lora_B[name].weight.copy_(torch.randn(m.lora_B[name].weight.shape, generator=g) * 0.1)
    return model, base_out, (x, t, y, mask, None)


def test_lora_adapters(lora_model):
    model, base_out, args = lora_model
    assert len(M.lora_layers(model)) == 2 * len(M.LORA_TARGETS)
    with M.use_adapter(model, None):
        assert torch.equal(dit_forward(model, *args), base_out)
    with M.use_adapter(model, "student"):
        student = dit_forward(model, *args)
        with M.use_adapter(model, "fake"):
            fake = dit_forward(model, *args)
        assert torch.equal(dit_forward(model, *args), student)          # restored on exit
    assert (student - base_out).abs().max() > 1e-3 and (fake - student).abs().max() > 1e-3
    assert torch.equal(dit_forward(model, *args), base_out)              # outside: base again
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2 * len(M.LORA_TARGETS)   # 2 adapters x (A, B) x layers
    assert len(M.lora_parameters(model, "student")) == 2 * 2 * len(M.LORA_TARGETS)
    with pytest.raises(ValueError, match="unknown adapter"):
        M.use_adapter(model, "teacher")


def test_lora_keeps_base_keys_and_state_dict_round_trips(lora_model):
    model, _, args = lora_model
    sd = model.state_dict()
    base_keys = set(dit_from_config(TINY, device="meta").state_dict())
    assert base_keys <= set(sd) and all(".lora_" in k for k in set(sd) - base_keys)
    lsd = M.lora_state_dict(model, "student")
    assert lsd and all("student" not in k for k in lsd)
    fresh = dit_from_config(TINY)
    M.load_exact(fresh, {k: sd[k] for k in base_keys}, "base")
    M.add_lora(fresh, rank=4, alpha=8)
    M.load_lora_state_dict(fresh, lsd, "fake")                    # a student snapshot loads into any slot
    with M.use_adapter(model, "student"), M.use_adapter(fresh, "fake"):
        assert torch.equal(dit_forward(fresh, *args), dit_forward(model, *args))
    with pytest.raises(ValueError, match="rank"):
        M.load_lora_state_dict(fresh, {k: v[:2] if "lora_A" in k else v for k, v in lsd.items()}, "student")


def test_lora_views_share_one_frozen_base():
    """trainable_lora_views: one LoRAView per adapter on the same base; a view's parameters and state dict are its
    adapter's only, its forward runs with that adapter on, and at init (B = 0) every view is the base network."""
    model = randomize(dit_from_config(TINY), seed=5)
    args = dit_inputs()[:4]
    base_out = dit_forward(model, *args, None)
    student, fake = M.trainable_lora_views(model, rank=2)
    assert all(torch.equal(dit_forward(v, *args, None), base_out) for v in (student, fake))
    own = {id(p) for p in M.lora_parameters(model, "student")}
    assert {id(p) for p in student.parameters()} == own and all(p.requires_grad for p in student.parameters())
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)   # base frozen
    assert student.state_dict().keys() == M.lora_state_dict(model, "student").keys()
    with torch.no_grad():
        for p in M.lora_parameters(model, "student")[1::2]:                                      # the B matrices
            p.normal_()
    assert not torch.equal(dit_forward(student, *args, None), base_out) and torch.equal(dit_forward(fake, *args, None), base_out)
    assert all(m.active is None for m in M.lora_layers(model))                  # each view switches back off
    fake.load_state_dict(student.state_dict())
    assert torch.equal(dit_forward(fake, *args, None), dit_forward(student, *args, None))
    with pytest.raises(ValueError, match="no LoRA layers"):
        M.use_adapter(dit_from_config(TINY, device="meta"), "student")


def test_gradient_checkpointing_uses_the_adapter_of_the_forward(lora_model):
    model, _, (x, t, y, mask, _) = lora_model
    grads = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.zero_grad()
        with M.use_adapter(model, "student"):
            loss = model(x, t, y, mask).square().mean()
        loss.backward()                                           # backward runs with the adapter switched off
        grads.append([p.grad.clone() for p in M.lora_parameters(model, "student")])
        assert all(p.grad is None for p in M.lora_parameters(model, "fake"))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_checkpointed_block_recomputes_with_its_forward_adapter():
    """models.checkpointed on one block: the gradient equals the plain one although the adapter is switched off
    between forward and backward (a recomputation with the base only would give the adapter a different one)."""
    torch.manual_seed(0)
    block = M.add_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), rank=2, names=("student",), targets=("0",))
    layer = M.lora_layers(block)[0]
    torch.nn.init.normal_(layer.lora_B["student"].weight)
    x = torch.randn(3, 4)
    grads = []
    for run in (lambda: block(x), lambda: M.checkpointed(block, x)):
        with M.use_adapter(block, "student"):
            out = run()
        out.tanh().square().sum().backward()
        grads.append(layer.lora_A["student"].weight.grad.clone())
        layer.lora_A["student"].weight.grad = None
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().max() > 1e-3


def test_fp32_adapter_on_bf16_base_runs_without_autocast():
    """Student/fake adapters are fp32 on a bf16 base (trainable_lora_views); previews and sampling run outside
    autocast, so the layer casts itself. Result = the fp32 computation up to bf16 rounding (2^-8 relative)."""
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(16, 8).to(torch.bfloat16)
    layer = M.LoRALinear(base)
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
#                  TDM-unify: the step-count embedding (§8)                     #
#################################################################################

def test_step_embedding_starts_as_identity_then_conditions_on_K():
    """TDM-unify: the zero-initialised step embedding leaves the DiT's output unchanged for every supported K;
    once it is non-zero, K changes the output; an unsupported K is an error, not a silent row 0."""
    dit = randomize(PixArtDiT(TINY))
    x, t, y, mask, _ = dit_inputs()
    plain = dit_forward(dit, x, t, y, mask, None)
    net = M.StepCountEmbedding(dit, [4, 1, 2])
    assert net.step_counts == [1, 2, 4] and net.table.weight.shape == (3, dit.emb_dim)
    assert set(net.state_dict()) == {"table.weight"} | {"net." + k for k in dit.state_dict()}
    for K in (1, 2, 4):
        with torch.no_grad():
            assert torch.equal(net(x, t, y, mask, None, step_count=torch.full((2,), K)), plain)
    with torch.no_grad():
        net.table.weight.normal_()
        a = net(x, t, y, mask, None, step_count=torch.tensor([1, 1]))
        b = net(x, t, y, mask, None, step_count=torch.tensor([4, 4]))
    assert (a - b).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"step count\(s\) \[3\] not supported"):
        net(x, t, y, mask, None, step_count=torch.tensor([1, 3]))


def test_step_embedding_on_the_toy_mlp_picks_one_row_per_sample():
    torch.manual_seed(0)
    mlp = M.toy_mlp(width=16, depth=2)
    net = M.StepCountEmbedding(mlp, (1, 2, 4))
    x, t, y = torch.randn(3, 2), torch.tensor([899, 449, 20]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        assert torch.equal(net(x, t, y, step_count=torch.tensor([1, 2, 4])), mlp(x, t, y))
        net.table.weight.copy_(torch.randn(3, 16))
        mixed = net(x, t, y, step_count=torch.tensor([4, 1, 2]))
        for b, K in enumerate((4, 1, 2)):                             # row b uses the table row of its own K
            row = mlp(x[b:b + 1], t[b:b + 1], y[b:b + 1], extra_emb=net.table.weight[[1, 2, 4].index(K)][None])
            assert torch.allclose(mixed[b:b + 1], row, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[8\] not supported: this student was trained for K in \[1, 2, 4\]"):
        net(x, t, y, step_count=torch.tensor([1, 8, 2]))


def test_unify_keys_from_flat():
    """Runs written when the step embedding lived inside the network (`step_emb.weight` next to the network's keys)
    load into StepCountEmbedding; the new layout passes through unchanged."""
    torch.manual_seed(0)
    net = M.StepCountEmbedding(M.toy_mlp(width=16, depth=1), (1, 2, 4))
    with torch.no_grad():
        net.table.weight.normal_()
    new = net.state_dict()
    flat = {("step_emb.weight" if k == "table.weight" else k[len("net."):]): v for k, v in new.items()}
    assert "step_emb.weight" in flat and not any(k.startswith("net.") for k in flat)
    back = M.unify_keys_from_flat(flat)
    assert _same(back, new)
    assert M.unify_keys_from_flat(new) is new
    other = M.StepCountEmbedding(M.toy_mlp(width=16, depth=1), (1, 2, 4))
    M.load_exact(other, back, "old-format student")
    assert _same(other.state_dict(), new)


#################################################################################
#                          Toy MLP                                              #
#################################################################################

def test_toy_mlp():
    torch.manual_seed(0)
    a = M.toy_mlp(dim=3, n_classes=4, width=16, depth=2)
    torch.manual_seed(0)
    b = M.ToyMLP(3, 4, 16, 2)
    assert _same(a.state_dict(), b.state_dict())
    assert a.config == dict(dim=3, n_classes=4, width=16, depth=2) and a.emb_dim == 16
    assert a.class_emb.num_embeddings == 5                                 # + the null class of CFG
    x, t, y = torch.randn(5, 3), torch.tensor([0, 10, 500, 998, 999]), torch.tensor([0, 1, 2, 3, 4])
    with torch.no_grad():
        out = a(x, t, y)
        assert out.shape == (5, 3)
        assert torch.equal(a(x, t, y, extra_emb=torch.zeros(5, 16)), out)             # extra_emb adds to h
        shift = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))   # not constant: LayerNorm follows
        assert (a(x, t, y, extra_emb=shift) - out).abs().max() > 1e-3
        assert (a(x, t, torch.full((5,), 4)) - out).abs().max() > 1e-3              # the label matters
    with pytest.raises(TypeError):
        M.ToyMLP(step_counts=(1, 2))                                             # TDM-unify wraps it instead
