"""clip.py / clip_tokenizer.py: the hand-written CLIP text encoders, BPE tokenizer and loader against transformers; the
config. The image side (vision tower, whole models, preprocessing, aesthetic MLP): test_clip_vision.py.

Everything is tiny and written here (no downloads): a CLIP tokenizer folder (vocab.json = the 256 byte symbols, the
same with "</w>", the results of a few BPE merges learnt from the test prompts, then <|startoftext|> and
<|endoftext|>, as the real vocab is ordered; merges.txt with its "#version" line; the json files of SD's tokenizer/
(pad <|endoftext|>) or SDXL's tokenizer_2/ (pad "!")), and random transformers CLIPTextModel /
CLIPTextModelWithProjection folders saved with save_pretrained. Real-size checks run on the meta device.
"""
import json
import os
import re
import shutil

import pytest
import torch
import transformers

import clip
from clip import CLIPTextConfig, CLIPTextModel, clip_vit_l14_text_config, load_clip_text, open_clip_bigg14_text_config
from clip_tokenizer import CLIPTokenizer
from fixtures import CLIP_PROMPTS as PROMPTS
from fixtures import LONG, clip_text_config as hf_config, randomize, write_clip_tokenizer, write_tiny_clip
from fixtures import clip_to_open_clip as fixture_clip_to_open_clip
from fixtures import write_bpe_tokenizer, write_real_size_skeleton, write_sd_single_file, write_tiny_sd
from models import read_state_dict

transformers.logging.set_verbosity_error()


#################################################################################
#                          Tiny folders                                         #
#################################################################################

@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """An SDXL-style pipeline: text_encoder/ (CLIPTextModel, quick_gelu, legacy eos 2) + tokenizer/ (pad EOS),
    text_encoder_2/ (WithProjection, gelu, eos = the <|endoftext|> id) + tokenizer_2/ (pad "!")."""
    root = tmp_path_factory.mktemp("sdxl")
    write_clip_tokenizer(root / "tokenizer")
    write_clip_tokenizer(root / "tokenizer_2", pad="!")
    vocab = json.loads((root / "tokenizer" / "vocab.json").read_text())
    refs = {1: write_tiny_clip(root / "text_encoder", hf_config(len(vocab)), False, seed=1),
            2: write_tiny_clip(root / "text_encoder_2", hf_config(len(vocab), "gelu", vocab["<|endoftext|>"]), True,
                               seed=2)}
    return root, refs


def hf_ids(folder, prompts):
    tok = transformers.CLIPTokenizer.from_pretrained(folder)
    return tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


#################################################################################
#                          Tokenizer                                            #
#################################################################################

@pytest.mark.parametrize("sub", ["tokenizer", "tokenizer_2"])
def test_tokenizer_matches_transformers(pipe, sub, tmp_path):
    folder = str(pipe[0] / sub)
    ours = CLIPTokenizer.from_folder(folder)
    ids, ref = ours(PROMPTS), hf_ids(folder, PROMPTS)
    assert ids.shape == (len(PROMPTS), 77) and ids.dtype == torch.long
    # transformers 5 has only the fast (tokenizers) CLIP tokenizer: it differs from the original slow algorithm, which
    # ours follows, on non-ASCII, control characters and upper-case special tokens; those rows are compared with a
    # slow reference only
    fast = transformers.CLIPTokenizer.from_pretrained(folder).is_fast
    for p, a, b in zip(PROMPTS, ids, ref):
        if not fast or (p.isascii() and p.isprintable() and "<|" not in p):
            assert torch.equal(a, b), (p, a.tolist(), b.tolist())
    vocab = ours.vocab
    eos = vocab["<|endoftext|>"]
    pad = eos if sub == "tokenizer" else vocab["!"]
    assert ids[0, :2].tolist() == [vocab["<|startoftext|>"], eos] and (ids[0, 2:] == pad).all()   # "" -> BOS EOS pad
    long_row = ids[PROMPTS.index(LONG)]
    assert long_row[-1] == eos and (long_row[1:-1] != pad).all()   # truncated to BOS + 75 + EOS
    assert len(ours.encode_one("a photo of a cat")) < 8            # the merges are used
    # the folder as transformers' save_pretrained rewrites it (added_tokens_decoder with strip flags) reads the same
    transformers.CLIPTokenizer.from_pretrained(folder).save_pretrained(tmp_path / "saved")
    assert torch.equal(CLIPTokenizer.from_folder(str(tmp_path / "saved"))(PROMPTS), ids)


def test_tokenizer_2_splits_literal_exclamation_marks(pipe):
    one, two = (CLIPTokenizer.from_folder(str(pipe[0] / s)) for s in ("tokenizer", "tokenizer_2"))
    v = one.vocab
    assert one.encode_one("wow!!")[-3:] == [v["!"], v["!</w>"], v["<|endoftext|>"]]   # one BPE word "!!"
    assert two.encode_one("wow!!")[-3:] == [v["!"], v["!"], v["<|endoftext|>"]]   # tokenizer_2's pad: special


#################################################################################
#                          Encoders                                             #
#################################################################################

@pytest.mark.parametrize("which", [1, 2])
def test_encoder_parity_with_transformers(pipe, which):
    root, refs = pipe
    tok, enc = load_clip_text(str(root), which=which)
    ref = refs[which]
    assert enc.with_projection == (which == 2) and not enc.training
    assert not any(p.requires_grad for p in enc.parameters())
    ids = tok(PROMPTS)
    with torch.no_grad():
        ours = enc(ids)
    assert_text_outputs_match(ours, ref, ids, which, f"CLIP {which}", pooled_2=True)
    assert ours["last_hidden_state"].shape == (len(PROMPTS), 77, 32)
    assert (ours["penultimate_hidden_state"] - ours["last_hidden_state"]).abs().max() > 1e-2


def assert_text_outputs_match(ours, ref, ids, which, label, pooled_2=False):
    """Our text encoder's outputs `ours` on `ids` equal the transformers model `ref`'s to 1e-5: the last and
    penultimate hidden states; which=1 the pooled output; which=2 the projected text_embeds (and the unprojected
    pooled output if `pooled_2`)."""
    with torch.no_grad():
        theirs = ref(input_ids=ids, output_hidden_states=True)
        pairs = {"last_hidden_state": theirs.last_hidden_state, "penultimate_hidden_state": theirs.hidden_states[-2]}
        if which == 2:
            pairs["text_embeds"] = theirs.text_embeds
            if pooled_2:
                pairs["pooler_output"] = ref.text_model(input_ids=ids).pooler_output
        else:
            pairs["pooler_output"] = theirs.pooler_output
    for key, want in pairs.items():
        diff = (ours[key] - want).abs().max().item()
        print(f"{label} {key}: max|diff| {diff:.2e}, max|h| {want.abs().max():.2f}")
        assert ours[key].shape == want.shape and diff <= 1e-5, key


def _theirs(sd, ref):
    """Our state dict in the reference's key layout: transformers 5 names CLIPTextModel's keys without the
    `text_model.` prefix (and keeps no position_ids buffer in the state dict)."""
    keys = ref.state_dict().keys()
    sd = {k if k in keys else k.removeprefix("text_model."): v for k, v in sd.items()}
    return {**{k: ref.state_dict()[k] for k in keys if k not in sd}, **sd}    # e.g. a position_ids buffer


def _ours(key, theirs):
    """A reference key in our layout (the `text_model.` prefix put back where transformers 5 drops it)."""
    return key if key.startswith(("text_model.", "text_projection")) else "text_model." + key


def test_eos_position_rules():
    """eos_token_id == 2: argmax(input_ids) (first largest id); otherwise the first position holding eos_token_id."""
    ids = torch.tensor([[5, 9, 7, 9, 1], [5, 3, 7, 2, 7]])
    for eos, want in ((2, [1, 2]), (7, [2, 2]), (9, [1, 0])):
        config = CLIPTextConfig(vocab_size=10, num_hidden_layers=1, hidden_size=8, num_attention_heads=2,
                                intermediate_size=8, eos_token_id=eos, max_position_embeddings=5)
        model = randomize(CLIPTextModel(config))
        ref = transformers.CLIPTextModel(hf_config(10, eos=eos, num_hidden_layers=1, hidden_size=8,
                                                   num_attention_heads=2, intermediate_size=8,
                                                   max_position_embeddings=5)).eval()
        ref.load_state_dict(_theirs(model.state_dict(), ref), strict=True)
        with torch.no_grad():
            out = model(ids)
            assert torch.allclose(out["pooler_output"], ref(input_ids=ids).pooler_output, atol=1e-5)
            assert torch.equal(out["pooler_output"], out["last_hidden_state"][[0, 1], want])
            assert torch.equal(out["penultimate_hidden_state"], model.text_model.embeddings.token_embedding(ids)
                               + model.text_model.embeddings.position_embedding.weight)   # one layer: the embeddings


def test_layouts_text_encoder_folder_and_transformers_folder(pipe, tmp_path):
    root, refs = pipe
    ids = CLIPTokenizer.from_folder(str(root / "tokenizer_2"))(PROMPTS[:3])
    _, enc = load_clip_text(str(root), which=2)
    tok2, enc2 = load_clip_text(str(root / "text_encoder_2"))             # tokenizer_2/ beside it
    assert tok2.pad_id == tok2.vocab["!"] and enc2.with_projection
    _, enc3 = load_clip_text(str(root / "text_encoder_2"), with_projection=False, dtype=torch.float16)
    assert not enc3.with_projection and enc3.text_model.final_layer_norm.weight.dtype == torch.float16
    model_dir = tmp_path / "clip"                                         # transformers folder with the tokenizer
    refs[2].save_pretrained(model_dir, safe_serialization=False)         # pytorch_model.bin
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(root / "tokenizer_2" / name, model_dir / name)
    tok4, enc4 = load_clip_text(str(model_dir))
    with torch.no_grad():
        a, b, c = enc(ids), enc2(ids), enc4(ids)
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert torch.equal(tok4(PROMPTS[:3]), ids)


def test_full_clip_model_folder_takes_the_text_tower(pipe, tmp_path):
    root, refs = pipe
    vocab_size = refs[1].config.vocab_size
    config = transformers.CLIPConfig(text_config=hf_config(vocab_size).to_dict(), projection_dim=24,
                                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                        num_attention_heads=2, image_size=8, patch_size=4))
    with torch.random.fork_rng():
        torch.manual_seed(4)
        full = randomize(transformers.CLIPModel(config), 4, std=0.3, around_init=True)
    full.save_pretrained(tmp_path / "full")
    tok, enc = load_clip_text(str(tmp_path / "full"), tokenizer_path=str(root / "tokenizer"))
    ids = tok(PROMPTS[:3])
    with torch.no_grad():
        ref = full.get_text_features(input_ids=ids)            # transformers 5: an output whose pooler is projected
        ref = ref if torch.is_tensor(ref) else ref.pooler_output
        diff = (enc(ids)["text_embeds"] - ref).abs().max()
    assert diff <= 1e-5


#################################################################################
#                          Config, real size and errors                         #
#################################################################################

def test_release_configs_have_the_transformers_keys_and_sizes():
    for factory, proj, n in ((clip_vit_l14_text_config, False, 123_060_480),
                             (open_clip_bigg14_text_config, True, 694_659_840)):
        config = factory()
        ref_config = transformers.CLIPTextConfig(**{k: v for k, v in vars(config).items()})
        assert CLIPTextConfig.from_json(ref_config.to_dict()) == config
        cls = transformers.CLIPTextModelWithProjection if proj else transformers.CLIPTextModel
        with torch.device("meta"):
            ours, theirs = CLIPTextModel(config, proj).state_dict(), cls(ref_config).state_dict()
        assert {k: v.shape for k, v in ours.items()} == {_ours(k, theirs): v.shape for k, v in theirs.items()}
        assert sum(v.numel() for v in ours.values()) == n


@pytest.mark.parametrize("change,words", [
    (dict(hidden_act="gelu_new"), r"hidden_act='gelu_new' is not implemented"),
    (dict(model_type="bert"), r"model_type='bert' is not implemented"),
    (dict(hidden_size=30, num_attention_heads=4), r"hidden_size=30 is not a multiple of num_attention_heads=4")])
def test_from_json_rejects_unimplemented_values_naming_the_key(change, words):
    with pytest.raises(ValueError, match=words):
        CLIPTextConfig.from_json({**hf_config(100).to_dict(), **change})
    assert CLIPTextConfig.from_json({**hf_config(100).to_dict(), "unrelated": 1}).hidden_size == 32


def test_loader_errors(pipe, tmp_path):
    root, _ = pipe
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_clip_text(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="unknown layout"):
        load_clip_text(str(tmp_path / "empty"))
    sd15 = tmp_path / "sd15"                                              # one text encoder only
    shutil.copytree(root / "text_encoder", sd15 / "text_encoder")
    shutil.copytree(root / "tokenizer", sd15 / "tokenizer")
    assert load_clip_text(str(sd15))[1].config.hidden_act == "quick_gelu"
    with pytest.raises(FileNotFoundError, match="no text_encoder_2/"):
        load_clip_text(str(sd15), which=2)
    with pytest.raises(ValueError, match="which=3"):
        load_clip_text(str(sd15), which=3)
    os.remove(sd15 / "tokenizer" / "merges.txt")
    with pytest.raises(FileNotFoundError, match=r"no vocab.json \+ merges.txt \(or tokenizer.json\)"):
        load_clip_text(str(sd15))
    with pytest.raises(ValueError, match="missing keys: text_projection.weight"):    # CLIPTextModel weights
        load_clip_text(str(root), which=1, with_projection=True)
    bad = tmp_path / "bad"                                                # config of another size
    shutil.copytree(root / "text_encoder_2", bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    with pytest.raises(ValueError, match="does not match the model config.*fc1.weight"):
        load_clip_text(str(bad), tokenizer_path=str(root / "tokenizer_2"))


def test_text_encoder_saved_without_the_text_model_prefix(pipe, tmp_path):
    """transformers 5 saves CLIPTextModel(WithProjection) without the `text_model.` key prefix: the same weights in
    that layout load to the same encoder."""
    from safetensors.torch import save_file
    root, _ = pipe
    for which, sub in ((1, "text_encoder"), (2, "text_encoder_2")):
        folder = tmp_path / f"flat{which}"
        shutil.copytree(root, folder)
        sd = read_state_dict(str(folder / sub))
        for f in (folder / sub).glob("*.safetensors"):
            f.unlink()
        for f in (folder / sub).glob("*.bin"):
            f.unlink()
        save_file({k.removeprefix("text_model."): v.contiguous() for k, v in sd.items()},
                  str(folder / sub / "model.safetensors"))
        a, b = load_clip_text(str(root), which=which)[1], load_clip_text(str(folder), which=which)[1]
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_tokenizer_reads_a_tokenizers_json_folder(pipe, tmp_path):
    """A folder holding only tokenizer.json (as transformers 5, or the fast tokenizer with legacy_format=False,
    saves it) gives the same ids as vocab.json + merges.txt."""
    folder = str(pipe[0] / "tokenizer")
    transformers.CLIPTokenizerFast.from_pretrained(folder).save_pretrained(tmp_path / "fast", legacy_format=False)
    for name in ("vocab.json", "merges.txt"):
        if (tmp_path / "fast" / name).exists():
            (tmp_path / "fast" / name).unlink()
    assert (tmp_path / "fast" / "tokenizer.json").exists()
    ascii_prompts = [p for p in PROMPTS if p.isascii() and p.isprintable()]
    assert torch.equal(CLIPTokenizer.from_folder(str(tmp_path / "fast"))(ascii_prompts),
                       CLIPTokenizer.from_folder(folder)(ascii_prompts))


#################################################################################
#                          Single files: the bundled tokenizer                  #
#################################################################################

@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_bundled_bpe_tokenizer_matches_transformers(pad, tmp_path):
    """The tokenizer built from the repository's BPE file (single files hold none) gives transformers' ids on a
    vocab.json / merges.txt folder written from the same file (fixtures.write_bpe_tokenizer), with SD's pad rule
    (<|endoftext|>) and SDXL tokenizer_2's ("!", a special token)."""
    folder = write_bpe_tokenizer(tmp_path / "tok", pad=pad)
    ours = CLIPTokenizer.from_bpe_file(pad_token=pad)
    assert ours.vocab == json.loads((tmp_path / "tok" / "vocab.json").read_text(encoding="utf-8"))
    assert len(ours.vocab) == 49408 and ours.bos_id == 49406 and ours.eos_id == 49407
    assert ours.pad_id == (49407 if pad == "<|endoftext|>" else 0) and ours.vocab["!"] == 0
    ids, ref = ours(PROMPTS), hf_ids(folder, PROMPTS)
    fast = transformers.CLIPTokenizer.from_pretrained(folder).is_fast     # transformers 5: see the test above
    for p, a, b in zip(PROMPTS, ids, ref):
        if not fast or (p.isascii() and p.isprintable() and "<|" not in p):
            assert torch.equal(a, b), (p, a.tolist(), b.tolist())
    assert torch.equal(CLIPTokenizer.from_folder(folder)(PROMPTS), ids)
    # the ids of openai/clip-vit-large-patch14's own vocab.json (not built from the same file as the folder above)
    assert ours.encode_one("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]
    bangs = [ours.vocab["!!</w>"]] if pad == "<|endoftext|>" else [0, 0]   # "!" special: split out, id 0 each
    assert ours.encode_one("wow!!") == [ours.bos_id, ours.vocab["wow</w>"]] + bangs + [ours.eos_id]


#################################################################################
#                          Single files: the encoders                           #
#################################################################################

@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def sd_files(request, tmp_path_factory):
    """A tiny SD1.5- or SDXL-style pipeline with the real CLIP vocabulary (tokenizers and embedding rows), and the
    same weights as original single files (.safetensors and .ckpt) with position_ids, logit_scale, an EMA copy of
    the UNet and the schedule buffers."""
    style = request.param
    root = tmp_path_factory.mktemp(f"single_{style}")
    folder = write_tiny_sd(root / "pipe", style, real_vocab=True)
    files = {ext: str(root / f"{style}.{ext}") for ext in ("safetensors", "ckpt")}
    for path in files.values():
        write_sd_single_file(folder, path, extras=True)
    return style, folder, files


def _diffusers_encoders(style, folder, path):
    """{which: the transformers encoder diffusers makes of the single file}: the text encoders of the pipeline's
    from_single_file; SDXL's text_encoder_2 from diffusers' open_clip converter (the pipeline tells the two encoders
    apart by width, which the tiny ones share)."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    diffusers.utils.logging.set_verbosity_error()
    cls = diffusers.StableDiffusionPipeline if style == "sd15" else diffusers.StableDiffusionXLPipeline
    out = {1: cls.from_single_file(path, config=folder, local_files_only=True).text_encoder}
    if style == "sdxl":
        model = transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig.from_pretrained(os.path.join(folder, "text_encoder_2"))).eval()
        sd = convert_open_clip_checkpoint(model, read_state_dict(path), prefix="conditioner.embedders.1.model.")
        model.load_state_dict(_theirs(sd, model), strict=True)
        out[2] = model
    return out


def test_single_file_encoders_parity_with_diffusers(sd_files):
    """which=1 (SD1.5's and SDXL's CLIP ViT-L) and which=2 (SDXL's OpenCLIP bigG, open_clip names): the tokenizer and
    the encoder of the single file give transformers' ids and diffusers' outputs, and exactly the folder's weights."""
    style, folder, files = sd_files
    refs = _diffusers_encoders(style, folder, files["safetensors"])
    for which, ref in refs.items():
        name = "text_encoder" if which == 1 else "text_encoder_2"
        config = os.path.join(folder, name, "config.json")
        from_folder = load_clip_text(folder, which=which)[1]
        for ext, path in files.items():
            tok, enc = load_clip_text(path, which=which, config=config)
            ids = tok(PROMPTS)
            assert torch.equal(ids, hf_ids(os.path.join(folder, "tokenizer" if which == 1 else "tokenizer_2"), PROMPTS))
            assert enc.with_projection == (which == 2)
            assert all(torch.equal(v, from_folder.state_dict()[k]) for k, v in enc.state_dict().items())
            with torch.no_grad():
                out = enc(ids)
            assert_text_outputs_match(out, ref, ids, which, f"{style} .{ext} CLIP which={which}")


def test_single_file_errors_name_the_problem(sd_files, tmp_path):
    from safetensors.torch import save_file
    style, folder, files = sd_files
    config = {w: os.path.join(folder, n, "config.json") for w, n in ((1, "text_encoder"), (2, "text_encoder_2"))}
    sd = read_state_dict(files["safetensors"])
    if style == "sd15":
        with pytest.raises(ValueError, match=r"has no which=2 text encoder \(keys conditioner\.embedders\.1\.model\.\*"
                                             r"\); it holds which=\[1\]: SD1\.5 files hold one \(which=1\)"):
            load_clip_text(files["safetensors"], which=2)
    save_file({k: v for k, v in sd.items() if k.startswith("model.")}, tmp_path / "unet.safetensors")
    with pytest.raises(ValueError, match=r"has no which=1 text encoder .*it holds no CLIP text encoder"):
        load_clip_text(tmp_path / "unet.safetensors")
    with pytest.raises(ValueError, match=r"holds a transformers CLIP text model .*pass the folder holding it"):
        load_clip_text(os.path.join(folder, "text_encoder", "model.safetensors"))
    prefix = {1: "cond_stage_model.transformer." if style == "sd15" else "conditioner.embedders.0.transformer.",
              2: "conditioner.embedders.1.model."}
    extra = {1: "text_model.encoder.layers.0.extra.weight", 2: "transformer.resblocks.0.extra.weight"}
    gone = {1: "text_model.final_layer_norm.bias", 2: "ln_final.bias"}
    for which in ((1,) if style == "sd15" else (1, 2)):
        save_file({**sd, prefix[which] + extra[which]: torch.zeros(1)}, tmp_path / f"extra{which}.safetensors")
        with pytest.raises(ValueError, match=rf"under {re.escape(prefix[which])}\* .*with the config given.*"
                                             rf"unexpected keys: {re.escape(extra[which])}\."):
            load_clip_text(tmp_path / f"extra{which}.safetensors", which=which, config=config[which])
        save_file({k: v for k, v in sd.items() if k != prefix[which] + gone[which]},
                  tmp_path / f"missing{which}.safetensors")
        with pytest.raises(ValueError, match=r"missing keys: text_model\.final_layer_norm\.bias"):
            load_clip_text(tmp_path / f"missing{which}.safetensors", which=which, config=config[which])
    with pytest.raises(ValueError, match=r"with the ViT-L/14 release config \(config= for another\).*shape mismatches"):
        load_clip_text(files["safetensors"])                              # tiny weights, real-size config


#################################################################################
#                          Single files at real size                            #
#################################################################################

def test_real_size_open_clip_mapping():
    """bigG at real size: our mapping reversed gives the 389 open_clip tensors of SDXL's file from the 517 of
    transformers (the fixtures' independent writer agrees), and diffusers' own converter maps them back to exactly
    transformers' keys and shapes; forward, ours maps them to our encoder's."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    config = open_clip_bigg14_text_config()
    with torch.device("meta"):
        ref = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**vars(config)))
        ours_sd = CLIPTextModel(config, True).state_dict()
    hf = ref.state_dict()
    shapes = lambda sd: {k: tuple(v.shape) for k, v in sd.items()}      # noqa: E731
    open_clip = clip.clip_state_dict_to_open_clip(ours_sd)
    assert len(ours_sd) == len(hf) == 517 and len(open_clip) == 389
    assert shapes(open_clip) == shapes(fixture_clip_to_open_clip(ours_sd))
    assert shapes(open_clip)["transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert shapes(clip.clip_state_dict_from_open_clip(open_clip)) == shapes(ours_sd)
    prefix = "conditioner.embedders.1.model."
    theirs = convert_open_clip_checkpoint(ref, {prefix + k: v for k, v in open_clip.items()}, prefix=prefix)
    assert shapes(theirs) == {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
                              for k, v in shapes(hf).items()}


@pytest.mark.parametrize("release", ["sd15", "sdxl"])
def test_real_size_single_file_encoders(release, tmp_path):
    """Every key of the release's file at its real shape: each text encoder loads with its release config and the
    bundled tokenizer with its pad rule."""
    write_real_size_skeleton(tmp_path / "f.ckpt", release)
    for which, factory, n in ((1, clip_vit_l14_text_config, 123_060_480),
                              (2, open_clip_bigg14_text_config, 694_659_840)):
        if release == "sd15" and which == 2:
            continue
        tok, enc = load_clip_text(tmp_path / "f.ckpt", which=which)
        assert enc.config == factory() and enc.with_projection == (which == 2)
        assert sum(p.numel() for p in enc.parameters()) == n
        assert len(tok.vocab) == 49408 and tok.pad_id == (49407 if which == 1 else 0)
