"""Parity of the hand-written T5 encoder, T5 tokenizer and SD VAE with transformers / diffusers.

Everything is built here from tiny random configs (no downloads): a sentencepiece model trained on a few
sentences, a tiny T5EncoderModel and a tiny AutoencoderKL saved with save_pretrained into the real file layouts.
The real-size checks run on the meta device.
"""
import io
import json
import os
import random
import re
import shutil

import pytest
import torch


import sentencepiece as spm
import transformers
import diffusers

from models import (VAE, T5Encoder, T5Tokenizer, load_t5, load_vae, relative_position_bucket,
                       sd_vae_config, t5_v1_1_xxl_config, vae_state_dict_from_any)

transformers.logging.set_verbosity_error()
WORDS = ("a photo of cat dog sitting on the red blue green chair under tree with sunset over mountain lake "
         "astronaut riding horse in space painting by van gogh style highly detailed portrait woman man city").split()
LONG = " ".join(["a photo of a cat sitting on the red chair under the tree"] * 20)   # far more than 120 tokens
PLAIN = ["", "a photo of a cat", "  A Photo of a CAT  sitting on the chair ", "astronaut riding a horse, van gogh!",
         "café naïve ＡＢＣ  x", "unknown ßü€ glyphs 😀", "tab\tand\nnewline", "▁odd ▁ prefix", LONG]
SPECIAL = ["cat <extra_id_0> dog", "cat</s>dog", "cat </s>", "hello <pad> x <unk>y", "<extra_id_3>dog", "</s> start"]
VAE_CFG = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
               down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def hf_encode(tok, prompts):
    out = tok(prompts, max_length=120, padding="max_length", truncation=True, add_special_tokens=True,
              return_tensors="pt")
    return out.input_ids, out.attention_mask


def randomize(module, std, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A pipeline folder with tokenizer/, text_encoder/ and vae/ written by transformers / diffusers."""
    root = tmp_path_factory.mktemp("pipe")
    rnd = random.Random(0)
    corpus = [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(4, 14))) for _ in range(60)]
    corpus += ["Hello, World! 123 café naïve ＡＢＣ", "Numbers 3.14 and 42%"]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=120,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    (root / "spiece.model").write_bytes(model.getvalue())
    transformers.T5Tokenizer(str(root / "spiece.model")).save_pretrained(root / "tokenizer")
    n_sp = spm.SentencePieceProcessor(model_file=str(root / "spiece.model")).get_piece_size()
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=n_sp + 100 + 5, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
    randomize(transformers.T5EncoderModel(cfg), 0.3, 1).save_pretrained(root / "text_encoder")
    randomize(diffusers.AutoencoderKL(**VAE_CFG), 0.02, 2).save_pretrained(root / "vae")
    return root


@pytest.fixture(scope="module")
def prompts_ids(root):
    return hf_encode(transformers.T5Tokenizer.from_pretrained(root / "tokenizer"), ["", "a photo of a cat", LONG])


#################################################################################
#                          Tokenizer                                            #
#################################################################################

@pytest.mark.filterwarnings("ignore:This sequence already has")      # transformers, on "cat </s>"
def test_tokenizer_matches_transformers_slow_and_fast(root):
    ours = T5Tokenizer.from_folder(str(root / "tokenizer"))
    slow = transformers.T5Tokenizer.from_pretrained(root / "tokenizer")
    fast = transformers.T5TokenizerFast.from_pretrained(root / "tokenizer")
    ids, mask = ours(PLAIN + SPECIAL)
    assert ids.shape == mask.shape == (len(PLAIN + SPECIAL), 120) and ids.dtype == torch.long
    ref_ids, ref_mask = hf_encode(slow, PLAIN + SPECIAL)
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)
    assert ids[0, 0] == 1 and mask[0].sum() == 1                   # "" -> just </s>
    assert mask[PLAIN.index(LONG)].all() and ids[PLAIN.index(LONG), -1] == 1   # truncated to 119 + </s>
    assert (ids[mask == 0] == 0).all()                             # right padding with <pad> = 0
    # the fast tokenizer agrees except that it appends a second </s> to text ending in a literal "</s>"
    plain_fast = [p for p in PLAIN + SPECIAL if not p.endswith("</s>")]
    assert torch.equal(ours(plain_fast)[0], hf_encode(fast, plain_fast)[0])


@pytest.mark.filterwarnings("ignore:This sequence already has")
def test_tokenizer_non_legacy_and_old_style_folder(root, tmp_path):
    transformers.T5Tokenizer(str(root / "spiece.model"), legacy=False).save_pretrained(tmp_path / "nl")
    ours = T5Tokenizer.from_folder(str(tmp_path / "nl"))
    assert not ours.legacy
    ref = hf_encode(transformers.T5Tokenizer.from_pretrained(tmp_path / "nl"), PLAIN + SPECIAL)
    assert all(torch.equal(a, b) for a, b in zip(ours(PLAIN + SPECIAL), ref))
    # DeepFloyd/t5-v1_1-xxl style: no added_tokens_decoder, no legacy key, no added_tokens.json
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(root / "spiece.model", old / "spiece.model")
    extra = [f"<extra_id_{i}>" for i in range(100)]
    (old / "tokenizer_config.json").write_text(json.dumps(dict(
        eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=100, additional_special_tokens=extra,
        model_max_length=512)))
    (old / "special_tokens_map.json").write_text(json.dumps(dict(
        eos_token="</s>", unk_token="<unk>", pad_token="<pad>", additional_special_tokens=extra)))
    ref = hf_encode(transformers.T5Tokenizer.from_pretrained(old), PLAIN + SPECIAL)
    assert all(torch.equal(a, b) for a, b in zip(T5Tokenizer.from_folder(str(old))(PLAIN + SPECIAL), ref))


#################################################################################
#                          T5 encoder                                           #
#################################################################################

def test_relative_position_buckets_match_transformers():
    rel = torch.arange(-300, 301)[None]
    ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(rel, True, 32, 128)
    assert torch.equal(relative_position_bucket(rel, 32, 128), ref)
    table = {-130: 15, -91: 15, -90: 14, -8: 8, -7: 7, 0: 0, 1: 17, 8: 24, 90: 30, 91: 31, 300: 31}  # ref. doc 5.3
    assert all(relative_position_bucket(torch.tensor(r)).item() == b for r, b in table.items())


def test_t5_parity_pipeline_folder(root, prompts_ids):
    tok, enc = load_t5(str(root))
    ids, mask = prompts_ids
    assert all(torch.equal(a, b) for a, b in zip(tok(["", "a photo of a cat", LONG]), prompts_ids))
    ref = transformers.T5EncoderModel.from_pretrained(root / "text_encoder").eval()
    with torch.no_grad():
        ours, theirs = enc(ids, mask), ref(input_ids=ids, attention_mask=mask).last_hidden_state
        diff_valid = ((ours - theirs).abs() * mask[..., None]).max().item()
        diff_all = (ours - theirs).abs().max().item()                      # padded query rows included
        diff_nomask = (enc(ids) - ref(input_ids=ids).last_hidden_state).abs().max().item()
    print(f"T5 max|diff| valid {diff_valid:.2e}, all positions {diff_all:.2e}, no mask {diff_nomask:.2e}; "
          f"max|h| {theirs.abs().max():.2f}")
    assert ours.shape == (3, 120, 32) and diff_all < 1e-5 and diff_nomask < 1e-5
    with torch.no_grad():                                                      # the mask path is exercised
        assert (enc(ids[:1]) - ours[:1]).abs().max() > 1e-2
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    assert enc.shared.weight is enc.encoder.embed_tokens.weight               # tied


def test_t5_sharded_bin_and_full_model_folders(root, prompts_ids, tmp_path):
    ids, mask = prompts_ids
    _, enc = load_t5(str(root))
    ref = transformers.T5EncoderModel.from_pretrained(root / "text_encoder")
    layouts = {"sharded_safetensors": dict(max_shard_size="20KB"),
               "sharded_bin": dict(max_shard_size="20KB", safe_serialization=False)}
    for name, kw in layouts.items():                   # transformers-style folder: config + weights + spiece.model
        ref.save_pretrained(tmp_path / name, **kw)
        files = os.listdir(tmp_path / name)
        assert any(f.endswith(".index.json") for f in files) and sum("-of-" in f for f in files) > 1, files
        shutil.copy(root / "spiece.model", tmp_path / name / "spiece.model")
        _, enc2 = load_t5(str(tmp_path / name))
        with torch.no_grad():
            assert torch.equal(enc2(ids, mask), enc(ids, mask)), name
    full = randomize(transformers.T5ForConditionalGeneration(ref.config), 0.3, 3)   # encoder + decoder + lm_head
    full.save_pretrained(tmp_path / "full")
    shutil.copy(root / "spiece.model", tmp_path / "full" / "spiece.model")
    _, enc3 = load_t5(str(tmp_path / "full"))
    with torch.no_grad():
        diff = (enc3(ids, mask) - full.encoder(input_ids=ids, attention_mask=mask).last_hidden_state).abs().max()
    assert diff < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_t5_half_precision_matches_transformers(root, prompts_ids, dtype):
    ids, mask = prompts_ids
    _, enc = load_t5(str(root), dtype=dtype)
    ref = transformers.T5EncoderModel.from_pretrained(root / "text_encoder", torch_dtype=dtype).eval()
    wo = enc.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype
    assert wo == ref.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype    # fp16 keeps wo in fp32
    assert enc.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == dtype
    with torch.no_grad():
        ours, theirs = enc(ids, mask), ref(input_ids=ids, attention_mask=mask).last_hidden_state
    print(f"T5 {dtype}: max|diff| {(ours.float() - theirs.float()).abs().max():.2e}")
    assert ours.dtype == theirs.dtype and torch.allclose(ours.float(), theirs.float(), atol=1e-2, rtol=1e-2)


#################################################################################
#                          VAE                                                  #
#################################################################################

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
    cfg = dict(sd_vae_config(), block_out_channels=(32, 64), layers_per_block=1)
    vae_check(load_vae(str(tmp_path / "sd.safetensors"), config=cfg), ref, "LDM single file")


#################################################################################
#                          Real sizes on the meta device                        #
#################################################################################

def test_real_size_keys_shapes_and_counts():
    keys = json.load(open("/work/shared/reference/architectures_keys.json")) \
        if os.path.exists("/work/shared/reference/architectures_keys.json") else None

    def shapes(m):
        return {k: tuple(v.shape) for k, v in m.state_dict().items()}

    def count(m):
        return sum(p.numel() for p in m.parameters())
    with torch.device("meta"):
        t5 = T5Encoder(**t5_v1_1_xxl_config())
        t5_cfg = transformers.T5Config(**t5_v1_1_xxl_config(), feed_forward_proj="gated-gelu")
        t5_ref = transformers.T5EncoderModel(t5_cfg)
        vae = VAE(**sd_vae_config())
        vae_ref = diffusers.AutoencoderKL(**sd_vae_config(), down_block_types=("DownEncoderBlock2D",) * 4,
                                          up_block_types=("UpDecoderBlock2D",) * 4)
    assert shapes(t5) == shapes(t5_ref) and len(shapes(t5)) == 220
    assert shapes(vae) == shapes(vae_ref) and len(shapes(vae)) == 248
    n_enc = sum(p.numel() for k, p in vae.named_parameters() if k.startswith(("encoder.", "quant_conv.")))
    print(f"params: T5 XXL encoder {count(t5):,}, VAE {count(vae):,} (enc {n_enc:,}, dec {count(vae) - n_enc:,})")
    assert count(t5) == count(t5_ref) == 4_762_310_656                   # architectures.md section 8
    assert count(vae) == count(vae_ref) == 83_653_863 and n_enc == 34_163_664
    if keys:
        assert shapes(t5) == {k: tuple(v) for k, v in keys["t5_xxl_encoder_transformers"].items()}
        assert shapes(vae) == {k: tuple(v) for k, v in keys["vae_diffusers"].items()}
        ldm = {k: torch.empty(v, device="meta") for k, v in keys["vae_ldm"].items()}
        assert {k: tuple(v.shape) for k, v in vae_state_dict_from_any(ldm).items()} == shapes(vae)


#################################################################################
#                          Bad inputs                                           #
#################################################################################

def test_bad_inputs_raise_clear_errors(root, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_t5(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="unknown layout"):
        load_t5(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vae(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vae(str(tmp_path))

    bad = tmp_path / "no_spiece"                                       # tokenizer folder without spiece.model
    shutil.copytree(root / "text_encoder", bad / "text_encoder")
    (bad / "tokenizer").mkdir()
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        load_t5(str(bad))

    cut = tmp_path / "truncated"                                        # interrupted download
    shutil.copytree(root / "text_encoder", cut / "text_encoder")
    shutil.copytree(root / "tokenizer", cut / "tokenizer")
    weights = cut / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated"):
        load_t5(str(cut))

    shutil.copy(root / "text_encoder" / "model.safetensors", weights)  # config disagrees with the weights
    cfg = json.loads((root / "text_encoder" / "config.json").read_text())
    (cut / "text_encoder" / "config.json").write_text(json.dumps(dict(cfg, num_layers=3)))
    with pytest.raises(ValueError, match=r"missing keys: encoder\.block\.2\..*config\.json belongs to these weights"):
        load_t5(str(cut))
    (cut / "text_encoder" / "config.json").write_text(json.dumps(dict(cfg, model_type="bert")))
    with pytest.raises(ValueError, match="does not hold a T5 v1.1 encoder"):
        load_t5(str(cut))

    vae_dir = tmp_path / "vae"
    shutil.copytree(root / "vae", vae_dir)
    cfg = json.loads((vae_dir / "config.json").read_text())
    (vae_dir / "config.json").write_text(json.dumps(dict(cfg, latent_channels=8)))
    with pytest.raises(ValueError, match=r"shape mismatches: .*conv_out"):
        load_vae(str(vae_dir))
    (vae_dir / "config.json").write_text(json.dumps(dict(cfg, _class_name="UNet2DConditionModel")))
    with pytest.raises(ValueError, match="not AutoencoderKL"):
        load_vae(str(vae_dir))
