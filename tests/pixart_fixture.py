"""A tiny random PixArt-α pipeline folder in the real diffusers layout, for tests (no downloads).

    from pixart_fixture import write_tiny_pixart
    folder = write_tiny_pixart(tmp_path / "pixart")            # 512-style: no micro-conditions
    folder = write_tiny_pixart(tmp_path / "pixart_ms", ms=True)  # 1024-MS-style: resolution / aspect-ratio embedders

Layout (as PixArt-alpha/PixArt-XL-2-512x512): model_index.json, transformer/ (PixArtTransformer2DModel,
caption_channels = T5 d_model), text_encoder/ (T5EncoderModel), tokenizer/ (T5Tokenizer with a sentencepiece
model trained here), vae/ (AutoencoderKL with 4 blocks: factor 8, scaling 0.18215), scheduler/scheduler_config.json
(the DPMSolverMultistepScheduler config of the release). Latents are 4 x 8 x 8, images 64 x 64.
Uses diffusers / transformers / sentencepiece to write the files; runs in about a second on CPU.
"""
import io
import json
import os
import random

import torch

T5_DIM = 32
TRANSFORMER = dict(num_layers=2, num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8,
                   sample_size=8, patch_size=2, caption_channels=T5_DIM, cross_attention_dim=24,
                   norm_type="ada_norm_single", num_embeds_ada_norm=1000)
VAE = dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           sample_size=64, scaling_factor=0.18215)
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
PROMPTS = ["a red fox in the snow", "a lighthouse at dusk", "a bowl of ramen", "an astronaut riding a horse",
           "a watercolor city skyline", "a macro photo of a bee"]                   # training prompts for tests
WORDS = ("a photo of cat dog sitting on the red blue green chair under tree with sunset over mountain lake "
         "astronaut riding horse in space painting by van gogh style highly detailed portrait woman man city "
         "bowl fruit castle snow forest river neon street night watercolor oil old young robot").split()


def randomize(module, seed=0, std=None):
    """Overwrite every parameter (zero-initialised ones too) with Gaussian noise (std: fixed or 1/sqrt(fan-in))."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            s = std if std is not None else (p[0].numel() ** -0.5 if p.ndim >= 2 else 0.2)
            p.copy_(torch.randn(p.shape, generator=g) * s)
    return module.eval()


def _sentencepiece_model(seed=0):
    import sentencepiece as spm
    rnd = random.Random(seed)
    corpus = [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(4, 14))) for _ in range(80)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=150,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    return model.getvalue()


def write_tiny_pixart(folder, ms=False, seed=0):
    """Write the tiny pipeline into `folder` (created) and return it (as str). ms=True: 1024-MS-style transformer
    (use_additional_conditions, interpolation_scale 2). Deterministic for a given seed."""
    import diffusers
    import transformers
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    spiece = os.path.join(folder, "spiece.model.tmp")
    with open(spiece, "wb") as f:
        f.write(_sentencepiece_model(seed))
    tok = transformers.T5Tokenizer(spiece)                    # adds the 100 <extra_id_N> tokens
    tok.save_pretrained(os.path.join(folder, "tokenizer"))
    os.remove(spiece)
    cfg = transformers.T5Config(vocab_size=len(tok) + 8, d_model=T5_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        randomize(transformers.T5EncoderModel(cfg), seed + 1, std=0.3).save_pretrained(
            os.path.join(folder, "text_encoder"))
        extra = dict(use_additional_conditions=True, interpolation_scale=2) if ms else {}
        dit = randomize(diffusers.PixArtTransformer2DModel(**TRANSFORMER, **extra), seed + 2)
        dit.save_pretrained(os.path.join(folder, "transformer"))
        randomize(diffusers.AutoencoderKL(**VAE), seed + 3, std=0.05).save_pretrained(os.path.join(folder, "vae"))
    # the release's transformer/config.json names the legacy class (diffusers remaps it on load)
    path = os.path.join(folder, "transformer", "config.json")
    with open(path) as f:
        tcfg = json.load(f)
    tcfg["_class_name"] = "Transformer2DModel"
    with open(path, "w") as f:
        json.dump(tcfg, f, indent=2)
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER, f, indent=2)                       # writes -Infinity, as the hub file
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(MODEL_INDEX, f, indent=2)
    return folder
