"""Builders shared by the tests: random weights, a tiny T5 tokenizer, tiny model folders in the real on-disk layouts.

    from fixtures import PROMPTS, randomize, write_tiny_pixart
    folder = write_tiny_pixart(tmp_path / "pixart")             # 512-style pipeline: no micro-conditions
    folder = write_tiny_pixart(tmp_path / "pixart_ms", ms=True)   # 1024-MS-style: resolution / aspect-ratio embedders

One writer per family, each returning the folder it wrote (as str), deterministic for a given seed:

    write_t5_tokenizer   spiece.model (a sentencepiece model trained here) + tokenizer_config.json, written by hand
    write_tiny_t5        a transformers T5EncoderModel folder (config.json + weights)
    write_tiny_vae       a diffusers AutoencoderKL folder
    write_tiny_dit       a diffusers PixArtTransformer2DModel folder (tiny_dit: the module itself)
    write_tiny_pixart    the pipeline: model_index.json, transformer/, text_encoder/, tokenizer/, vae/, scheduler/
    write_clip_tokenizer a CLIP vocab.json + merges.txt folder (BPE merges learnt here), SD's or SDXL's pad rule
    write_tiny_clip      a transformers CLIPTextModel (WithProjection) folder
    write_tiny_sd        an SD1.5- or SDXL-style pipeline: unet/, vae/, text_encoder(_2)/, tokenizer(_2)/, scheduler/
    write_sd_single_file that pipeline as an original single file (.safetensors / .ckpt; LDM and open_clip key names)
    tiny_sd_and_single_files   a tiny pipeline and its .safetensors and .ckpt single files
    write_bpe_tokenizer  a CLIP tokenizer folder with the real 49,408-id vocabulary, from the repository's BPE file
    write_real_size_skeleton  every key of a real SD1.5 / SDXL single file at its real shape, values one shared zero
    write_tiny_clip_model  a transformers CLIPModel folder (both towers) with its tokenizer: CLIP score, aesthetic
    write_tiny_open_clip   a CLIP as open_clip saves it (open_clip_pytorch_model.bin / .safetensors, or an HPS .pt),
                           open_clip_config.json beside it; clip_model_to_open_clip: the key mapping it uses
    write_tiny_aesthetic   the LAION aesthetic predictor's .pth (PublishedAestheticMLP: the published architecture)

The tokenizer folder is written without transformers: the sentencepiece model comes from the `sentencepiece`
trainer and the json files are the ones transformers' T5Tokenizer.save_pretrained writes (4.x), so the reference
tokenizers load it with from_pretrained whatever their version's internals. Models are built with diffusers /
transformers (test-only parity references) and saved with save_pretrained. A pipeline takes about a second on CPU.
"""
import collections
import io
import json
import os
import random
import re

import torch

PROMPTS = ["a red fox in the snow", "a lighthouse at dusk", "a bowl of ramen", "an astronaut riding a horse",
           "a watercolor city skyline", "a macro photo of a bee"]                   # training prompts for tests
WORDS = ("a photo of cat dog sitting on the red blue green chair under tree with sunset over mountain lake "
         "astronaut riding horse in space painting by van gogh style highly detailed portrait woman man city "
         "bowl fruit castle snow forest river neon street night watercolor oil old young robot").split()
# sentences with punctuation, digits, accents and full-width letters: pieces the tokenizer tests exercise
EXTRA_SENTENCES = ["Hello, World! 123 café naïve ＡＢＣ", "Numbers 3.14 and 42%"]
EXTRA_IDS = 100                                   # <extra_id_0..99>, as every T5 tokenizer

T5_DIM = 32
T5 = dict(d_model=T5_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
          relative_attention_num_buckets=32)
DIT = dict(num_layers=2, num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8,
           sample_size=8, patch_size=2, caption_channels=T5_DIM, cross_attention_dim=24,
           norm_type="ada_norm_single", num_embeds_ada_norm=1000)
DIT_MS = dict(use_additional_conditions=True, interpolation_scale=2)        # the 1024-MS style
VAE = dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           sample_size=64, scaling_factor=0.18215)                           # 4 blocks: factor 8, as the SD VAE
# scheduler/scheduler_config.json of PixArt-alpha/PixArt-XL-2-512x512 as written by the diffusers conversion
# script (a default DPMSolverMultistepScheduler); reproduced from memory, not read from the hub.
SCHEDULER = {"_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.22.0.dev0",
             "algorithm_type": "dpmsolver++", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
             "dynamic_thresholding_ratio": 0.995, "euler_at_final": False, "lambda_min_clipped": float("-inf"),
             "lower_order_final": True, "num_train_timesteps": 1000, "prediction_type": "epsilon",
             "sample_max_value": 1.0, "solver_order": 2, "solver_type": "midpoint", "steps_offset": 0,
             "thresholding": False, "timestep_spacing": "linspace", "trained_betas": None,
             "use_karras_sigmas": False, "use_lu_lambdas": False, "variance_type": None}
MODEL_INDEX = {"_class_name": "PixArtAlphaPipeline", "_diffusers_version": "0.22.0.dev0",
               "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
               "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"],
               "transformer": ["diffusers", "Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}


def _write_json(obj, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)                  # float("-inf") -> -Infinity, as the hub files


#################################################################################
#                          Random weights                                       #
#################################################################################

def randomize(module, seed=0, std=None, around_init=False):
    """Give every parameter Gaussian noise from a generator seeded with `seed` (in parameters() order) and put the
    module in eval mode. std: fixed, or None = 1/sqrt(fan-in) for matrices and 0.2 for vectors. Default: the noise
    replaces the values (zero-initialised parameters become non-zero too); around_init=True adds it to the
    library's initialisation (norm weights stay near 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            s = std if std is not None else (p[0].numel() ** -0.5 if p.ndim >= 2 else 0.2)
            noise = torch.randn(p.shape, generator=g) * s
            p.add_(noise) if around_init else p.copy_(noise)
    return module.eval()


#################################################################################
#                          T5 tokenizer                                         #
#################################################################################

def sentencepiece_model(seed=0):
    """The bytes of a small unigram sentencepiece model (pad 0, </s> 1, <unk> 2, no <s>) trained on random
    sentences of WORDS plus EXTRA_SENTENCES, as T5's spiece.model is laid out."""
    import sentencepiece as spm
    rnd = random.Random(seed)
    corpus = [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(4, 14))) for _ in range(80)] + EXTRA_SENTENCES
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=150,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, hard_vocab_limit=False, minloglevel=2, num_threads=1)
    return model.getvalue()


def write_t5_tokenizer(folder, legacy=True, style="saved", seed=0):
    """A T5 tokenizer folder: spiece.model and the json files.

    style "saved": tokenizer_config.json with `legacy` and `added_tokens_decoder` (ids and strip flags of the
    special tokens) and added_tokens.json, as transformers 4.x save_pretrained writes them; "old": the
    DeepFloyd/t5-v1_1-xxl layout (special tokens by name only, no `legacy` key: the reference's default, legacy
    behaviour).
    """
    import sentencepiece as spm
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "spiece.model"), "wb") as f:
        f.write(sentencepiece_model(seed))
    n = spm.SentencePieceProcessor(model_file=os.path.join(folder, "spiece.model")).get_piece_size()
    extra = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
    specials = dict(eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    config = dict(specials, extra_ids=EXTRA_IDS, additional_special_tokens=extra, model_max_length=512)
    if style == "saved":
        token = lambda content, strip: dict(content=content, lstrip=strip, normalized=False, rstrip=strip,
                                            single_word=False, special=True)
        decoder = {"0": token("<pad>", False), "1": token("</s>", False), "2": token("<unk>", False)}
        decoder.update({str(n - 1 + EXTRA_IDS - i): token(f"<extra_id_{i}>", True) for i in range(EXTRA_IDS)})
        config.update(add_prefix_space=True, added_tokens_decoder=decoder, clean_up_tokenization_spaces=False,
                      legacy=legacy, model_max_length=int(1e30), sp_model_kwargs={}, tokenizer_class="T5Tokenizer")
        _write_json({f"<extra_id_{i}>": n - 1 + EXTRA_IDS - i for i in range(EXTRA_IDS)},
                    os.path.join(folder, "added_tokens.json"))
    elif style != "old" or not legacy:
        raise ValueError(f"style {style!r} (legacy={legacy}): expected 'saved', or 'old' with legacy=True")
    _write_json(config, os.path.join(folder, "tokenizer_config.json"))
    _write_json(dict(specials, additional_special_tokens=extra), os.path.join(folder, "special_tokens_map.json"))
    return folder


def t5_vocab_size(tokenizer_folder):
    """Embedding rows of a T5 for this tokenizer: the sentencepiece pieces, the extra ids and 8 unused rows
    (real T5 checkpoints also have more rows than tokens)."""
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=os.path.join(tokenizer_folder, "spiece.model")).get_piece_size() \
        + EXTRA_IDS + 8


#################################################################################
#                          Tiny model folders                                   #
#################################################################################

def tiny_t5_config(vocab_size):
    import transformers
    return transformers.T5Config(vocab_size=vocab_size, **T5)


def write_tiny_t5(folder, vocab_size, seed=1, **save_kw):
    """A random tiny transformers T5EncoderModel (gated-GELU, v1.1 style) saved into `folder`."""
    import transformers
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = randomize(transformers.T5EncoderModel(tiny_t5_config(vocab_size)), seed, std=0.3, around_init=True)
    model.save_pretrained(os.fspath(folder), **save_kw)
    return os.fspath(folder)


def write_tiny_vae(folder, seed=3, **config):
    """A random tiny diffusers AutoencoderKL (VAE, overridden by `config`) saved into `folder`."""
    import diffusers
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = randomize(diffusers.AutoencoderKL(**{**VAE, **config}), seed, std=0.02, around_init=True)
    vae.save_pretrained(os.fspath(folder))
    return os.fspath(folder)


def tiny_dit(ms=False, seed=2, **config):
    """A random tiny diffusers PixArtTransformer2DModel (DIT, 1024-MS style with ms, overridden by `config`)."""
    import diffusers
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return randomize(diffusers.PixArtTransformer2DModel(**{**DIT, **(DIT_MS if ms else {}), **config}), seed)


def write_tiny_dit(folder, ms=False, seed=2, legacy_class_name=False, **config):
    """tiny_dit saved into `folder`. legacy_class_name: config.json names `Transformer2DModel`, as the PixArt-α
    releases do (diffusers remaps it on load)."""
    folder = os.fspath(folder)
    tiny_dit(ms, seed, **config).save_pretrained(folder)
    if legacy_class_name:
        path = os.path.join(folder, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        _write_json({**cfg, "_class_name": "Transformer2DModel"}, path)
    return folder


def write_tiny_pixart(folder, ms=False, seed=0):
    """The tiny PixArt-α pipeline in the layout of PixArt-alpha/PixArt-XL-2-512x512 (ms=True: 1024-MS-style
    transformer): latents 4 x 8 x 8, images 64 x 64, T5 width 32. Written into `folder` (created); returns it."""
    folder = os.fspath(folder)
    sub = lambda name: os.path.join(folder, name)
    write_t5_tokenizer(sub("tokenizer"), seed=seed)
    write_tiny_t5(sub("text_encoder"), t5_vocab_size(sub("tokenizer")), seed=seed + 1)
    write_tiny_dit(sub("transformer"), ms=ms, seed=seed + 2, legacy_class_name=True)
    write_tiny_vae(sub("vae"), seed=seed + 3)
    _write_json(SCHEDULER, os.path.join(folder, "scheduler", "scheduler_config.json"))
    _write_json(MODEL_INDEX, os.path.join(folder, "model_index.json"))
    return folder


def dit_forward(model, x, t, y, mask, added):
    """model(x, t, captions, mask, added_cond_kwargs) without autograd: our PixArtDiT, or a wrapper of it."""
    with torch.no_grad():
        return model(x, t, y, mask, added)


def dit_inputs(ms=False, H=8, W=8, seed=1):
    """(x, t, captions, mask, added_cond_kwargs) for a tiny DiT: 2 latents (4 x H x W), fractional timesteps,
    6-token captions with random values in the padded slots, a padding mask, micro-conditions when ms."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, H, W, generator=g)
    t = torch.tensor([999.0, 17.5])
    y = torch.randn(2, 6, DIT["caption_channels"], generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    added = None
    if ms:
        added = {"resolution": torch.tensor([[8.0 * H, 8.0 * W], [1024.0, 1024.0]]),
                 "aspect_ratio": torch.tensor([[H / W], [1.0]])}
    return x, t, y, mask, added


def reference_keys(entry):
    """{tensor name: shape} of a real release network from tests/data/architecture_keys.json (see its _about)."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "architecture_keys.json")) as f:
        return {k: tuple(v) for k, v in json.load(f)[entry].items()}


#################################################################################
#                          CLIP tokenizer and text encoders (SD1.5 / SDXL)      #
#################################################################################

LONG = " ".join(["a photo of a cat sitting on the red chair under the tree"] * 10)    # > 75 tokens: truncated
CLIP_PROMPTS = ["", "a photo of a cat", "  A Photo of a CAT  sitting,  on the chair!! ", "astronaut riding a horse, "
           "van gogh! it's 3.14 or 42% (maybe)", "café naïve ＡＢＣ résumé", "unknown ßü€ glyphs 😀 ² ½",
           "tab\tand\nnewline\u00a0nbsp", "they're we'll I'M can't", "!!hello!? wow!!!", "日本語 text",
           "<|endoftext|> inside and <|startoftext|>x", "e\u0301 decomposed", "zero\u200bwidth",
           "HELLO <|ENDOFTEXT|> x", "x²³ ⅻ ① 'S 'LL ''s ſ 'ſ", "a\x00b\ufffdc\x1fd", "   ", "\u2028line\u3000sep", LONG]
CLIP_CORPUS = " ".join(CLIP_PROMPTS[1:-1] + ["a photo of a cat sitting on the red chair under the tree"] * 3)
CLIP_SPECIAL = {"__type": "AddedToken", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
CLIP = dict(hidden_size=32, intermediate_size=64, projection_dim=24, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=77)



def learn_merges(text, n=80):
    """Greedy BPE on the lower-case letter runs of `text` (most frequent pair first, ties by the pair)."""
    from clip_tokenizer import merge_pair
    words = collections.Counter(re.findall(r"[a-z]+", text.lower()))
    seqs = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in words}
    merges = []
    for _ in range(n):
        pairs = collections.Counter()
        for w, s in seqs.items():
            for p in zip(s, s[1:]):
                pairs[p] += words[w]
        if not pairs:
            break
        best = max(sorted(pairs), key=lambda p: pairs[p])
        merges.append(best)
        seqs = {w: merge_pair(s, best) for w, s in seqs.items()}
    return merges


def write_clip_tokenizer(folder, pad="<|endoftext|>"):
    """A CLIP tokenizer folder in the layout of SD1.5's tokenizer/ (pad <|endoftext|>) or SDXL's tokenizer_2/
    (pad "!"): vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json."""
    os.makedirs(folder, exist_ok=True)
    from clip_tokenizer import bytes_to_unicode
    symbols = list(bytes_to_unicode().values())
    merges = learn_merges(CLIP_CORPUS)
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + \
        ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = lambda content: dict(CLIP_SPECIAL, content=content)
    specials = dict(bos_token=tok("<|startoftext|>"), eos_token=tok("<|endoftext|>"), unk_token=tok("<|endoftext|>"),
                    pad_token=pad)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(dict(specials, add_prefix_space=False, do_lower_case=True, errors="replace", model_max_length=77,
                       tokenizer_class="CLIPTokenizer"), f)
    return os.fspath(folder)


def clip_text_config(vocab_size, act="quick_gelu", eos=2, **change):
    """A tiny transformers CLIPTextConfig (CLIP: 32 wide, 3 layers), quick_gelu and the legacy eos id 2 by default."""
    import transformers
    return transformers.CLIPTextConfig(vocab_size=vocab_size, hidden_act=act, bos_token_id=0, eos_token_id=eos,
                                       pad_token_id=1, **{**CLIP, **change})


def write_tiny_clip(folder, config, with_projection, seed=0):
    """A random transformers CLIPTextModel (or ...WithProjection) saved into `folder`; returns the module."""
    import transformers
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = randomize(cls(config), seed, std=0.3, around_init=True)
    model.save_pretrained(os.fspath(folder))
    return model


#################################################################################
#                          Tiny Stable Diffusion pipelines                      #
#################################################################################

# Tiny UNets in the two releases' shapes: SD1.5 (conv projections, one transformer layer, CLIP-L last layer as
# context) and SDXL base (linear projections, deeper transformers, text_time micro-conditions). The context width is
# the tiny CLIP's (32), or both encoders' (64) for SDXL; the pooled text is the tiny projection (24).
SD_UNET = {
    "sd15": dict(block_out_channels=(8, 16, 16), layers_per_block=1, cross_attention_dim=CLIP["hidden_size"],
                 attention_head_dim=2, norm_num_groups=4, sample_size=8,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    "sdxl": dict(block_out_channels=(8, 16, 16), layers_per_block=2, cross_attention_dim=2 * CLIP["hidden_size"],
                 attention_head_dim=(1, 2, 4), transformer_layers_per_block=(1, 2, 2), norm_num_groups=4,
                 sample_size=8, use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=CLIP["projection_dim"] + 6 * 4)}
# scheduler/scheduler_config.json of runwayml/stable-diffusion-v1-5 (PNDM) and stabilityai/stable-diffusion-xl-base-1.0
# (Euler), as the releases store them (the keys that define the schedule; reproduced, not read from the hub).
SD_SCHEDULER = {
    "sd15": {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
             "steps_offset": 1, "trained_betas": None, "clip_sample": False},
    "sdxl": {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "interpolation_type": "linear", "num_train_timesteps": 1000,
             "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
             "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}}
SD_PIPELINE = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


def tiny_sd_unet(style, seed=0, **config):
    """A random tiny diffusers UNet2DConditionModel in the SD1.5 or SDXL style (SD_UNET, overridden by `config`)."""
    import diffusers
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return randomize(diffusers.UNet2DConditionModel(**{**SD_UNET[style], **config}), seed)


def write_tiny_sd(folder, style="sd15", seed=0, real_vocab=False):
    """A tiny SD1.5 ("sd15") or SDXL ("sdxl") pipeline in the diffusers layout: model_index.json, unet/, vae/
    (scaling factor 0.18215 / 0.13025, SDXL with force_upcast), text_encoder/ + tokenizer/ (pad <|endoftext|>),
    for SDXL also text_encoder_2/ (with projection, gelu) + tokenizer_2/ (pad "!"), scheduler/. Latents 4 x 8 x 8,
    images 64 x 64. Different seeds give different weights in the same architecture (two "community fine-tunes").
    real_vocab: the tokenizers are CLIP's real 49,408-id vocabulary (write_bpe_tokenizer) and the text encoders have
    as many embedding rows, so the tokenizer of a single file (clip.py's BPE file) fits them."""
    folder = os.fspath(folder)
    sub = lambda name: os.path.join(folder, name)
    write_tokenizer = write_bpe_tokenizer if real_vocab else write_clip_tokenizer
    write_tokenizer(sub("tokenizer"))
    with open(os.path.join(sub("tokenizer"), "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    write_tiny_clip(sub("text_encoder"), clip_text_config(len(vocab)), False, seed=seed + 1)
    index = {"_class_name": SD_PIPELINE[style], "_diffusers_version": "0.39.0",
             "scheduler": ["diffusers", SD_SCHEDULER[style]["_class_name"]], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"]}
    if style == "sdxl":
        write_tokenizer(sub("tokenizer_2"), pad="!")
        write_tiny_clip(sub("text_encoder_2"), clip_text_config(len(vocab), "gelu", vocab["<|endoftext|>"]), True,
                        seed=seed + 2)
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"], force_zeros_for_empty_prompt=True)
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    tiny_sd_unet(style, seed + 3).save_pretrained(sub("unet"))
    write_tiny_vae(sub("vae"), seed=seed + 4, **(dict(scaling_factor=0.13025, force_upcast=True)
                                                 if style == "sdxl" else {}))
    _write_json(SD_SCHEDULER[style], os.path.join(folder, "scheduler", "scheduler_config.json"))
    _write_json(index, os.path.join(folder, "model_index.json"))
    return folder


#################################################################################
#                          Old run folders                                      #
#################################################################################

def to_flat_unify_run(run_dir):
    """Rewrite a fresh TDM-unify toy run (student, fake and EMA as models.StepCountEmbedding: `net.<key>` and
    `table.weight`) in the layout of runs written before the step-count embedding moved out of the network: flat keys
    with `step_emb.weight` in ckpt.safetensors and student.safetensors, and a student.json / ckpt.json whose `network`
    holds `step_counts`. Parameter order (network, then table) is the same in both layouts, so the optimiser states
    carry over unchanged."""
    import train
    state, meta = train.load_checkpoint(run_dir)
    assert meta["unify"], "to_flat_unify_run needs a --unify run"
    for part in ("student", "fake", "ema"):
        if part in state:
            assert "table.weight" in state[part] and all(k == "table.weight" or k.startswith("net.")
                                                         for k in state[part])
            state[part] = {("step_emb.weight" if k == "table.weight" else k[len("net."):]): v
                           for k, v in state[part].items()}
    meta["network"] = {**meta["network"], "step_counts": sorted(meta["unify"])}
    train.save_checkpoint(run_dir, state, meta)
    return os.fspath(run_dir)


#################################################################################
#                          Checks                                               #
#################################################################################

def alpha_sigma(schedule, t):
    """(alpha_t, sigma_t) at integer t in float64, straight from the schedule's alphas_cumprod."""
    ac = schedule.alphas_cumprod[torch.as_tensor(t)]
    return ac.sqrt(), (1 - ac).sqrt()


def assert_png(path):
    """`path` is a readable PNG file larger than 100 x 100 pixels."""
    from PIL import Image
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100


#################################################################################
#                          Original single files (SD1.5 / SDXL)                 #
#################################################################################
# Written from the published key tables of the LDM / sgm / open_clip formats, independently of the loaders' mappings
# (unet.py, vae.py, clip.py); diffusers' own single-file loader reads these files in the tests, which checks the writer.

# The DDPM schedule buffers LatentDiffusion registers: top-level keys of LDM checkpoints that loaders ignore.
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")
RESNET_TO_LDM = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "time_emb_proj.": "emb_layers.1.",
                 "norm2.": "out_layers.0.", "conv2.": "out_layers.3.", "conv_shortcut.": "skip_connection."}
UNET_TOP_TO_LDM = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
                   "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
                   "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
                   "mid_block.attentions.0.": "middle_block.1."}


def unet_to_ldm(sd, config):
    """diffusers UNet keys -> LDM keys (no prefix) by the LDM block formulas, with L = layers_per_block: down block b's
    layer j is input_blocks.{1 + b(L+1) + j} (resnet .0, attention .1), its downsampler input_blocks.{1 + b(L+1) + L}
    .0.op; up block b's layer j is output_blocks.{b(L+1) + j}, its upsampler output_blocks.{b(L+1) + L}.{2 after an
    attention, else 1}.conv; mid resnets middle_block.0 / .2. `config`: the unet/config.json dict."""
    L = config["layers_per_block"]
    up_attention = [t == "CrossAttnUpBlock2D" for t in config["up_block_types"]]
    rules = [(r"down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda b, j: f"input_blocks.{1 + b * (L + 1) + j}.0."),
             (r"down_blocks\.(\d+)\.attentions\.(\d+)\.", lambda b, j: f"input_blocks.{1 + b * (L + 1) + j}.1."),
             (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.", lambda b: f"input_blocks.{1 + b * (L + 1) + L}.0.op."),
             (r"up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda b, j: f"output_blocks.{b * (L + 1) + j}.0."),
             (r"up_blocks\.(\d+)\.attentions\.(\d+)\.", lambda b, j: f"output_blocks.{b * (L + 1) + j}.1."),
             (r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.",
              lambda b: f"output_blocks.{b * (L + 1) + L}.{2 if up_attention[b] else 1}.conv."),
             (r"mid_block\.resnets\.(\d+)\.", lambda j: f"middle_block.{2 * j}.")]
    out = {}
    for k, v in sd.items():
        top = next((a for a in UNET_TOP_TO_LDM if k.startswith(a)), None)
        if top:
            out[UNET_TOP_TO_LDM[top] + k[len(top):]] = v
            continue
        pattern, fn = next((p, fn) for p, fn in rules if re.match(p, k))
        m = re.match(pattern, k)
        block, rest = fn(*map(int, m.groups())), k[m.end():]
        if "resnets" in pattern:
            inner = next(a for a in RESNET_TO_LDM if rest.startswith(a))
            rest = RESNET_TO_LDM[inner] + rest[len(inner):]
        out[block + rest] = v
    return out


def vae_to_ldm(sd, n_blocks):
    """diffusers AutoencoderKL keys -> LDM keys (no prefix): up blocks counted from the lowest resolution,
    attention projections as 1x1 convs."""
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
            v = v[:, :, None, None]                                     # (C, C) -> (C, C, 1, 1)
        out[k] = v
    return out


def clip_to_open_clip(sd):
    """transformers CLIPTextModelWithProjection keys -> open_clip's text tower: q, k, v fused row-wise into
    in_proj_weight (3D, D) / in_proj_bias (3D,), text_projection stored as P = weightᵀ (D, P_out) for x @ P."""
    sd = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in sd.items()}
    layers = sorted({int(m[1]) for k in sd if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))})
    out = {"token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           "ln_final.bias": sd["text_model.final_layer_norm.bias"],
           "text_projection": sd["text_projection.weight"].T.contiguous()}
    out.update(resblocks_to_open_clip(sd, layers, "text_model.encoder.layers.", "transformer.resblocks."))
    return out


def resblocks_to_open_clip(sd, layers, hf_prefix, oc_prefix):
    """transformers encoder layers `hf_prefix`N. -> open_clip resblocks `oc_prefix`N.: q, k, v fused row-wise into
    attn.in_proj_weight / in_proj_bias; out_proj, layer norms and MLP renamed."""
    out = {}
    for i in layers:
        hf, oc = f"{hf_prefix}{i}.", f"{oc_prefix}{i}."
        for kind in ("weight", "bias"):
            out[f"{oc}attn.in_proj_{kind}"] = torch.cat([sd[f"{hf}self_attn.{n}_proj.{kind}"] for n in "qkv"])
            for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{oc}{b}.{kind}"] = sd[f"{hf}{a}.{kind}"]
    return out


def _component(folder, name):
    from safetensors.torch import load_file
    weights = [f for f in sorted(os.listdir(os.path.join(folder, name))) if f.endswith(".safetensors")]
    return load_file(os.path.join(folder, name, weights[0]))


def write_sd_single_file(pipeline_folder, path, style=None, extras=False):
    """The tiny pipeline `pipeline_folder` (write_tiny_sd) as an original single file at `path`: .safetensors, or
    .ckpt = torch.save({'state_dict': ...}). SD1.5 layout: model.diffusion_model.*, first_stage_model.*,
    cond_stage_model.transformer.text_model.*; SDXL ("sdxl", default: when text_encoder_2/ exists):
    conditioner.embedders.0.transformer.text_model.* (CLIP-L) and conditioner.embedders.1.model.* (bigG, open_clip
    names) instead of cond_stage_model. extras: also what real files carry and loaders ignore: model_ema.* (the
    flattened EMA copy, here UNet weights + 1, so reading it breaks parity), the schedule buffers, the CLIP
    position_ids and open_clip's logit_scale. Returns {key: tensor} as written."""
    folder = os.fspath(pipeline_folder)
    style = style or ("sdxl" if os.path.isdir(os.path.join(folder, "text_encoder_2")) else "sd15")
    with open(os.path.join(folder, "unet", "config.json")) as f:
        unet_config = json.load(f)
    with open(os.path.join(folder, "vae", "config.json")) as f:
        n_vae_blocks = len(json.load(f)["block_out_channels"])
    sd = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(_component(folder, "unet"), unet_config).items()}
    sd.update({"first_stage_model." + k: v for k, v in vae_to_ldm(_component(folder, "vae"), n_vae_blocks).items()})
    clip_l = {k if k.startswith("text_model.") else "text_model." + k: v
              for k, v in _component(folder, "text_encoder").items()}
    clip_prefix = "cond_stage_model.transformer." if style == "sd15" else "conditioner.embedders.0.transformer."
    sd.update({clip_prefix + k: v for k, v in clip_l.items()})
    if style == "sdxl":
        bigg = clip_to_open_clip(_component(folder, "text_encoder_2"))
        sd.update({"conditioner.embedders.1.model." + k: v for k, v in bigg.items()})
    if extras:
        sd.update({"model_ema." + "".join(k.split(".")[1:]): v + 1 for k, v in sd.items()
                   if k.startswith("model.diffusion_model.")})
        sd.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000)})
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64).float() ** 2
        sd.update({name: betas + i for i, name in enumerate(SCHEDULE_BUFFERS)})
        sd[clip_prefix + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
        if style == "sdxl":
            sd["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6052)
    sd = {k: v.contiguous().clone() for k, v in sd.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if os.fspath(path).endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(sd, os.fspath(path))
    else:
        torch.save({"state_dict": sd, "global_step": 1000}, os.fspath(path))
    return sd


def tiny_sd_and_single_files(root, style):
    """(folder, {"safetensors": path, "ckpt": path}): a tiny pipeline (write_tiny_sd) under `root` and the same
    weights as original single files, each with what real files also carry (extras: an EMA copy that differs, the
    schedule buffers)."""
    folder = write_tiny_sd(os.path.join(root, "pipe"), style)
    files = {ext: os.path.join(root, f"{style}.{ext}") for ext in ("safetensors", "ckpt")}
    for path in files.values():
        write_sd_single_file(folder, path, extras=True)
    return folder, files


def write_bpe_tokenizer(folder, pad="<|endoftext|>"):
    """A CLIP tokenizer folder holding the real vocabulary, written from the repository's copy of openai's
    bpe_simple_vocab_16e6.txt.gz as openai's simple_tokenizer orders it (vocab.json: the 256 byte symbols, the same
    with "</w>", the first 48,894 merges joined, <|startoftext|>, <|endoftext|>; merges.txt: "#version: 0.2" and those
    merges), with write_clip_tokenizer's json files for the pad rule."""
    import gzip
    try:                                                       # the reference's byte map, where transformers has it
        from transformers.models.clip.tokenization_clip import bytes_to_unicode
    except ImportError:
        from clip_tokenizer import bytes_to_unicode
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with gzip.open(os.path.join(root, "clip_bpe_simple_vocab_16e6.txt.gz"), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:49152 - 256 - 2 + 1]
    write_clip_tokenizer(folder, pad=pad)                       # special_tokens_map.json, tokenizer_config.json
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges] + \
        ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    return os.fspath(folder)


# The releases' networks as diffusers / transformers build them (their defaults plus these arguments).
RELEASE_UNET = {"sd15": dict(cross_attention_dim=768, sample_size=64),
                "sdxl": dict(sample_size=128, block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
                             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                             up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                             attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                             use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                             projection_class_embeddings_input_dim=2816)}
RELEASE_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                   down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
RELEASE_CLIP = {"clip_l": dict(hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
                               num_attention_heads=12),
                "bigg": dict(hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
                             num_attention_heads=20, hidden_act="gelu")}


def write_real_size_skeleton(path, style, change=None):
    """A .ckpt holding every key of a real SD1.5 (v1-5-pruned-emaonly) or SDXL base (sd_xl_base_1.0) single file at
    its real shape, all values one shared zero (stride-0 views of one element: the file is a few hundred KB and a
    model loaded from it holds no memory either): for the loaders' keys, shapes, detection and configs at real size.
    change: {key: shape, or None to drop it}. Returns {key: shape}."""
    import diffusers
    import transformers
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**RELEASE_UNET[style])
        vae = diffusers.AutoencoderKL(**RELEASE_VAE)
        clip_l = transformers.CLIPTextModel(transformers.CLIPTextConfig(**RELEASE_CLIP["clip_l"]))
        bigg = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**RELEASE_CLIP["bigg"]))
    shapes = {"model.diffusion_model." + k: v.shape for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()}
    shapes.update({"first_stage_model." + k: v.shape for k, v in vae_to_ldm(vae.state_dict(), 4).items()})
    clip_prefix = "cond_stage_model.transformer." if style == "sd15" else "conditioner.embedders.0.transformer."
    shapes.update({clip_prefix + (k if k.startswith("text_model.") else "text_model." + k): v.shape
                   for k, v in clip_l.state_dict().items()})
    shapes[clip_prefix + "text_model.embeddings.position_ids"] = (1, 77)
    if style == "sdxl":
        shapes.update({"conditioner.embedders.1.model." + k: v.shape
                       for k, v in clip_to_open_clip(bigg.state_dict()).items()})
        shapes["conditioner.embedders.1.model.logit_scale"] = ()
    for k, shape in (change or {}).items():
        if shape is None:
            shapes.pop(k)
        else:
            shapes[k] = shape
    zero = torch.zeros((), dtype=torch.float16)
    torch.save({"state_dict": {k: zero.expand(tuple(s)) for k, s in shapes.items()}}, os.fspath(path))
    return {k: tuple(s) for k, s in shapes.items()}


#################################################################################
#                          CLIP models that score images (eval)                 #
#################################################################################
# The layouts users download: a transformers CLIPModel folder (openai/clip-vit-large-patch14), an open_clip file
# (open_clip_pytorch_model.bin of laion/CLIP-ViT-H-14-laion2B-s32B-b79K, HPS_v2(.1)_compressed.pt = {'state_dict': the
# same keys}) and the LAION aesthetic predictor's .pth. The open_clip files are written from a transformers CLIPModel
# by clip_model_to_open_clip, independently of clip.py's mapping; tests/test_clip_vision.py checks both against
# open_clip itself where it is installed.

CLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=224,
                   patch_size=32)                                   # 224 px as the real ones: 7 x 7 patches
CLIP_PROJECTION = 24


def tiny_clip_model_config(vocab_size, act="quick_gelu", eos=2):
    """A tiny transformers CLIPConfig: the tiny text tower (CLIP, bos 0 and the legacy eos 2 by default, as the
    releases), a 224 px vision tower with 32 px patches, both projected to CLIP_PROJECTION."""
    import transformers
    return transformers.CLIPConfig(text_config=clip_text_config(vocab_size, act, eos).to_dict(),
                                   vision_config=dict(CLIP_VISION, hidden_act=act), projection_dim=CLIP_PROJECTION)


def write_tiny_clip_model(folder, act="quick_gelu", eos=2, seed=0, real_vocab=False):
    """A random transformers CLIPModel saved into `folder` with a CLIP tokenizer beside it (write_clip_tokenizer, or
    the real 49,408-id one with real_vocab), as openai/clip-vit-large-patch14 is laid out. Returns the module."""
    import transformers
    folder = os.fspath(folder)
    (write_bpe_tokenizer if real_vocab else write_clip_tokenizer)(folder)
    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    config = tiny_clip_model_config(len(vocab), act, vocab["<|endoftext|>"] if eos is None else eos)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = randomize(transformers.CLIPModel(config), seed, std=0.3, around_init=True)
    model.save_pretrained(folder)
    return model


OPEN_CLIP_VISION = {"conv1.weight": "embeddings.patch_embedding.weight",
                    "class_embedding": "embeddings.class_embedding",
                    "positional_embedding": "embeddings.position_embedding.weight",
                    "ln_pre.weight": "pre_layrnorm.weight", "ln_pre.bias": "pre_layrnorm.bias",
                    "ln_post.weight": "post_layernorm.weight", "ln_post.bias": "post_layernorm.bias"}


def clip_model_to_open_clip(sd):
    """transformers CLIPModel keys -> open_clip's CLIP: the text tower by clip_to_open_clip; visual.* = conv1,
    class_embedding, positional_embedding, ln_pre, transformer.resblocks.N (q, k, v fused row-wise into in_proj, as
    in the text tower), ln_post, proj = visual_projection.weightᵀ (used as x @ proj); logit_scale as it is."""
    out = clip_to_open_clip({k: v for k, v in sd.items() if k.startswith(("text_model.", "text_projection."))})
    vision = {k[len("vision_model."):]: v for k, v in sd.items() if k.startswith("vision_model.")}
    out.update({"visual." + oc: vision[hf] for oc, hf in OPEN_CLIP_VISION.items()})
    layers = sorted({int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers.")})
    out.update(resblocks_to_open_clip(vision, layers, "encoder.layers.", "visual.transformer.resblocks."))
    out["visual.proj"] = sd["visual_projection.weight"].T.contiguous()
    out["logit_scale"] = sd["logit_scale"]
    return out


TINY_OPEN_CLIP_CONFIG = {"embed_dim": CLIP_PROJECTION,     # open_clip's model_cfg of tiny_clip_model_config(gelu)
                         "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 8, "patch_size": 32,
                                        "mlp_ratio": 2.0},
                         "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 3,
                                      "mlp_ratio": 2.0}}


def write_tiny_open_clip(path, seed=0, hps=False, config=True):
    """A tiny random CLIP as open_clip saves it, made from a transformers CLIPModel (exact gelu, the real
    49,408-id vocabulary, eos 2: open_clip's argmax pooling) by clip_model_to_open_clip: a plain state dict
    (open_clip_pytorch_model.bin; .safetensors by the suffix) or, hps=True, an HPS checkpoint {'state_dict': ...}.
    config: open_clip_config.json beside it ({'model_cfg': TINY_OPEN_CLIP_CONFIG}, as hub repositories ship it): the
    tiny architecture is not known by its shapes. Returns the transformers CLIPModel (the reference)."""
    import transformers
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = randomize(transformers.CLIPModel(tiny_clip_model_config(49408, "gelu")), seed, std=0.3,
                          around_init=True)
    sd = {k: v.contiguous().clone() for k, v in clip_model_to_open_clip(model.state_dict()).items()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(sd, path)
    else:
        torch.save({"state_dict": sd} if hps else sd, path)
    if config:
        _write_json({"model_cfg": TINY_OPEN_CLIP_CONFIG, "preprocess_cfg": {}},
                    os.path.join(os.path.dirname(os.path.abspath(path)), "open_clip_config.json"))
    return model


class PublishedAestheticMLP(torch.nn.Module):
    """The MLP of christophschuhmann/improved-aesthetic-predictor's simple_inference.py as published (its ReLUs
    commented out; the pytorch_lightning base class and training steps left out): the reference for the keys."""
    def __init__(self, input_size):
        super().__init__()
        nn = torch.nn
        self.layers = nn.Sequential(nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


def write_tiny_aesthetic(path, input_size=CLIP_PROJECTION, seed=0):
    """The aesthetic predictor's file (torch.save of the state dict, as sac+logos+ava1-l14-linearMSE.pth), random,
    for `input_size`-d embeddings (default: the tiny CLIP's projection). Returns the PublishedAestheticMLP."""
    model = randomize(PublishedAestheticMLP(input_size), seed)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(model.state_dict(), os.fspath(path))
    return model
