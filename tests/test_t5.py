"""t5.py: the hand-written T5 v1.1 encoder, its sentencepiece tokenizer and loader against transformers; the config.

Everything is built from tiny random models (no downloads): the encoder and tokenizer of the tiny PixArt pipeline
(fixtures.write_tiny_pixart: a sentencepiece model trained there, a T5EncoderModel saved with save_pretrained), and
tokenizer folders written by fixtures.write_t5_tokenizer. The real-size checks run on the meta device.
"""
import dataclasses
import json
import os
import pathlib
import shutil

import pytest
import torch
import transformers

from fixtures import randomize, reference_keys, write_t5_tokenizer
from t5 import T5Config, T5Encoder, T5Tokenizer, load_t5, relative_position_bucket, t5_v1_1_xxl_config

transformers.logging.set_verbosity_error()
LONG = " ".join(["a photo of a cat sitting on the red chair under the tree"] * 20)   # far more than 120 tokens
PLAIN = ["", "a photo of a cat", "  A Photo of a CAT  sitting on the chair ", "astronaut riding a horse, van gogh!",
         "café naïve ＡＢＣ  x", "unknown ßü€ glyphs 😀", "tab\tand\nnewline", "▁odd ▁ prefix", LONG]
SPECIAL = ["cat <extra_id_0> dog", "cat</s>dog", "cat </s>", "hello <pad> x <unk>y", "<extra_id_3>dog", "</s> start"]


def hf_encode(tok, prompts):
    out = tok(prompts, max_length=120, padding="max_length", truncation=True, add_special_tokens=True,
              return_tensors="pt")
    return out.input_ids, out.attention_mask


@pytest.fixture(scope="module")
def root(tiny_pixart):
    """The tiny pipeline folder: tokenizer/ and text_encoder/ (plus transformer/, vae/, ...)."""
    return pathlib.Path(tiny_pixart[0])


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
    # transformers 5 has no sentencepiece ("slow") T5 tokenizer: T5Tokenizer is the fast one, which appends a
    # second </s> to text ending in a literal "</s>" (below); those rows are compared only against a slow one
    same = torch.tensor([not (slow.is_fast and p.endswith("</s>")) for p in PLAIN + SPECIAL])
    ref_ids, ref_mask = hf_encode(slow, PLAIN + SPECIAL)
    assert torch.equal(ids[same], ref_ids[same]) and torch.equal(mask[same], ref_mask[same])
    assert ids[0, 0] == 1 and mask[0].sum() == 1                   # "" -> just </s>
    assert mask[PLAIN.index(LONG)].all() and ids[PLAIN.index(LONG), -1] == 1   # truncated to 119 + </s>
    assert (ids[mask == 0] == 0).all()                             # right padding with <pad> = 0
    # the fast tokenizer agrees except that it appends a second </s> to text ending in a literal "</s>"
    plain_fast = [p for p in PLAIN + SPECIAL if not p.endswith("</s>")]
    assert torch.equal(ours(plain_fast)[0], hf_encode(fast, plain_fast)[0])


@pytest.mark.filterwarnings("ignore:This sequence already has")
def test_tokenizer_non_legacy_and_old_style_folder(tmp_path):
    nl = write_t5_tokenizer(tmp_path / "nl", legacy=False)
    ours = T5Tokenizer.from_folder(nl)
    assert not ours.legacy
    ref_tok = transformers.T5Tokenizer.from_pretrained(nl)
    if not ref_tok.is_fast:              # transformers 5's T5Tokenizer (fast only) ignores legacy=False: no reference
        ref = hf_encode(ref_tok, PLAIN + SPECIAL)
        assert all(torch.equal(a, b) for a, b in zip(ours(PLAIN + SPECIAL), ref))
    # DeepFloyd/t5-v1_1-xxl style: no added_tokens_decoder, no legacy key, no added_tokens.json
    old = write_t5_tokenizer(tmp_path / "old", style="old")
    assert sorted(os.listdir(old)) == ["special_tokens_map.json", "spiece.model", "tokenizer_config.json"]
    assert "legacy" not in json.loads((tmp_path / "old" / "tokenizer_config.json").read_text())
    ref_tok = transformers.T5Tokenizer.from_pretrained(old)
    prompts = [p for p in PLAIN + SPECIAL if not (ref_tok.is_fast and p.endswith("</s>"))]   # see above
    ref = hf_encode(ref_tok, prompts)
    assert all(torch.equal(a, b) for a, b in zip(T5Tokenizer.from_folder(old)(prompts), ref))


#################################################################################
#                          T5 encoder                                           #
#################################################################################

def test_relative_position_buckets_match_transformers():
    rel = torch.arange(-300, 301)[None]
    ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(rel, True, 32, 128)
    assert torch.equal(relative_position_bucket(rel, 32, 128), ref)
    # worked by hand from the bucket rule: 16 buckets per sign, 8 exact, log-spaced up to 128
    table = {-130: 15, -91: 15, -90: 14, -8: 8, -7: 7, 0: 0, 1: 17, 8: 24, 90: 30, 91: 31, 300: 31}
    assert all(relative_position_bucket(torch.tensor(r)).item() == b for r, b in table.items())


def test_t5_parity_pipeline_folder(root, prompts_ids):
    tok, enc = load_t5(str(root))
    ids, mask = prompts_ids
    assert all(torch.equal(a, b) for a, b in zip(tok(["", "a photo of a cat", LONG]), prompts_ids))
    ref = transformers.T5EncoderModel.from_pretrained(root / "text_encoder", attn_implementation="eager").eval()
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
    assert isinstance(enc.config, T5Config) and enc.config.feed_forward_proj == "gated-gelu"


def test_t5_sharded_bin_and_full_model_folders(root, prompts_ids, tmp_path):
    ids, mask = prompts_ids
    _, enc = load_t5(str(root))
    ref = transformers.T5EncoderModel.from_pretrained(root / "text_encoder")
    spiece = root / "tokenizer" / "spiece.model"
    layouts = {"sharded_safetensors": dict(max_shard_size="20KB"),
               "sharded_bin": dict(max_shard_size="20KB", safe_serialization=False)}
    for name, kw in layouts.items():                   # transformers-style folder: config + weights + spiece.model
        ref.save_pretrained(tmp_path / name, **kw)
        files = os.listdir(tmp_path / name)
        assert any(f.endswith(".index.json") for f in files) and sum("-of-" in f for f in files) > 1, files
        shutil.copy(spiece, tmp_path / name / "spiece.model")
        _, enc2 = load_t5(str(tmp_path / name))
        with torch.no_grad():
            assert torch.equal(enc2(ids, mask), enc(ids, mask)), name
    full = randomize(transformers.T5ForConditionalGeneration(ref.config), 3, std=0.3, around_init=True)  # + decoder
    full.save_pretrained(tmp_path / "full")
    shutil.copy(spiece, tmp_path / "full" / "spiece.model")
    _, enc3 = load_t5(str(tmp_path / "full"))
    with torch.no_grad():
        diff = (enc3(ids, mask) - full.encoder(input_ids=ids, attention_mask=mask).last_hidden_state).abs().max()
    assert diff < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_t5_half_precision_matches_transformers(root, prompts_ids, dtype):
    ids, mask = prompts_ids
    _, enc = load_t5(str(root), dtype=dtype)
    ref = transformers.T5EncoderModel.from_pretrained(root / "text_encoder", dtype=dtype,
                                                     attn_implementation="eager").eval()
    wo = enc.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype
    assert wo == ref.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype    # fp16 keeps wo in fp32
    assert enc.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == dtype
    with torch.no_grad():
        ours, theirs = enc(ids, mask), ref(input_ids=ids, attention_mask=mask).last_hidden_state
    print(f"T5 {dtype}: max|diff| {(ours.float() - theirs.float()).abs().max():.2e}")
    assert ours.dtype == theirs.dtype and torch.allclose(ours.float(), theirs.float(), atol=1e-2, rtol=1e-2)


#################################################################################
#                          Config and real size                                 #
#################################################################################

def test_config_defaults_are_transformers_and_the_encoder_takes_a_config():
    """T5Config's fields and defaults are transformers' T5Config's (a config.json of either reads the same); the
    encoder is built from a T5Config, not from keyword arguments."""
    ref = transformers.T5Config()
    for f in dataclasses.fields(T5Config):
        if f.default is not None:
            assert getattr(ref, f.name) == f.default, f.name
    assert T5Config.dense_act_fn is None and ref.feed_forward_proj == "relu"      # derived from feed_forward_proj
    v11 = transformers.T5Config(**{k: v for k, v in dataclasses.asdict(t5_v1_1_xxl_config()).items()
                                   if k not in ("dense_act_fn", "is_gated_act")})
    ours = T5Config.from_json(v11.to_dict())                  # decoder, generation and token-id keys are skipped
    assert ours == t5_v1_1_xxl_config()
    assert (ours.dense_act_fn, ours.is_gated_act) == (v11.dense_act_fn, v11.is_gated_act) == ("gelu_new", True)
    with torch.device("meta"):
        assert T5Encoder(ours).config is ours
        with pytest.raises(TypeError):
            T5Encoder(**dataclasses.asdict(ours))


def _hf_config(feed_forward_proj, **change):
    """config.json of a transformers T5 (dense_act_fn and is_gated_act derived from feed_forward_proj, as on disk)."""
    return {**transformers.T5Config(feed_forward_proj=feed_forward_proj).to_dict(), **change}


@pytest.mark.parametrize("config,words", [
    (_hf_config("relu"), r"feed_forward_proj 'relu'\) does not hold a T5 v1.1 encoder"),
    (_hf_config("gated-gelu", model_type="bert"), r"model_type 'bert'"),
    (_hf_config("gated-gelu_fast"), r"dense_act_fn='gelu_fast' \(from feed_forward_proj='gated-gelu_fast'\) is "
                                    r"not implemented")])
def test_from_json_rejects_unimplemented_values_naming_the_key(config, words):
    with pytest.raises(ValueError, match=words):
        T5Config.from_json(config)


def test_from_json_reads_what_is_implemented():
    for proj, act in (("gated-gelu", "gelu_new"), ("gated-silu", "silu"), ("gated-relu", "relu")):
        config = T5Config.from_json(_hf_config(proj, model_type="mt5", unrelated_key=1))
        assert (config.dense_act_fn, config.is_gated_act, config.model_type) == (act, True, "mt5")


def test_real_size_keys_shapes_and_counts():
    def shapes(m):
        return {k: tuple(v.shape) for k, v in m.state_dict().items()}

    def count(m):
        return sum(p.numel() for p in m.parameters())
    config = t5_v1_1_xxl_config()
    with torch.device("meta"):
        t5 = T5Encoder(config)
        t5_ref = transformers.T5EncoderModel(transformers.T5Config(
            d_model=config.d_model, d_ff=config.d_ff, num_layers=config.num_layers, num_heads=config.num_heads,
            feed_forward_proj="gated-gelu"))
    assert shapes(t5) == shapes(t5_ref) and len(shapes(t5)) == 220
    print(f"params: T5 XXL encoder {count(t5):,}")
    assert count(t5) == count(t5_ref) == 4_762_310_656
    assert shapes(t5) == reference_keys("t5_xxl_encoder_transformers")


#################################################################################
#                          Bad inputs                                           #
#################################################################################

def test_bad_inputs_raise_clear_errors(root, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_t5(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="unknown layout"):
        load_t5(str(tmp_path))

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
