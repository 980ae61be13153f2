"""CLIP, hand-written: the text encoders of SD1.5 and SDXL, and the whole models that score images (OpenAI ViT-L/14 for
the CLIP score and the aesthetic predictor, OpenCLIP ViT-H/14 for HPSv2). The BPE tokenizer lives in
clip_tokenizer.py; the image preprocessing and the LAION aesthetic predictor in clip_image.py.

    configs (CLIPTextConfig, CLIPVisionConfig, release factories) -> layers (one encoder layer: causal for text, full
    for vision) -> CLIPTextModel, CLIPVisionModel, CLIPModel -> open_clip key mapping -> loaders (load_clip_text,
    load_clip_vision, load_clip_model)

Parameter names equal transformers' `CLIPTextModel(WithProjection)`, `CLIPVisionModelWithProjection` and `CLIPModel`
state-dict keys, so their folders load as they are. Checkpoints in open_clip's names load too: SDXL's bigG text
encoder inside SD single files, OpenCLIP ViT-H/14 files (open_clip_pytorch_model.bin / .safetensors) and the HPS v2 /
v2.1 checkpoints that fine-tune it (fused q/k/v, x @ P projections); as they hold no tokenizer, theirs is built from
the CLIP BPE file shipped with this repository.

Which outputs the pipelines take: SD1.5 the `last_hidden_state` of CLIP ViT-L/14; SDXL the penultimate hidden state
(before the final layer norm) of both encoders, concatenated, and the projected pooled output of OpenCLIP bigG. The
image metrics take CLIPModel.encode_image / encode_text: the projected, un-normalised embeddings.
"""
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from clip_tokenizer import CLIPTokenizer
from models import JSONConfig, build_and_load, checkpoint_shapes, read_json, read_state_dict


#################################################################################
#                          Configs                                              #
#################################################################################

def _check_tower(c, model_type):
    if c.model_type != model_type:
        raise ValueError(f"model_type={c.model_type!r} is not implemented; {type(c).__name__} needs "
                         f"model_type={model_type!r} (a full CLIPModel config: pass its "
                         f"'{model_type.split('_')[1]}_config')")
    if c.hidden_act not in _CLIP_ACTS:
        raise ValueError(f"hidden_act={c.hidden_act!r} is not implemented; known: {sorted(_CLIP_ACTS)}")
    if c.hidden_size % c.num_attention_heads:
        raise ValueError(f"hidden_size={c.hidden_size} is not a multiple of "
                         f"num_attention_heads={c.num_attention_heads}")


@dataclass
class CLIPTextConfig(JSONConfig):
    """The CLIP text encoder's hyper-parameters; names and defaults as in transformers' CLIPTextConfig (config.json).
    Generation, dropout and initialisation keys do not change the encoder in eval mode and are skipped."""
    STRICT = False
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407          # the releases say 2: the legacy "EOS = largest id" pooling (see CLIPTextModel)
    model_type: str = "clip_text_model"

    def __post_init__(self):
        _check_tower(self, "clip_text_model")


@dataclass
class CLIPVisionConfig(JSONConfig):
    """The CLIP vision tower's hyper-parameters; names and defaults as in transformers' CLIPVisionConfig."""
    STRICT = False
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    model_type: str = "clip_vision_model"

    def __post_init__(self):
        _check_tower(self, "clip_vision_model")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")


def clip_vit_l14_text_config():        # openai/clip-vit-large-patch14: SD1.5's text_encoder, SDXL's text_encoder
    return CLIPTextConfig(hidden_size=768, intermediate_size=3072, projection_dim=768, num_attention_heads=12,
                          bos_token_id=0, eos_token_id=2)


def clip_vit_l14_vision_config():      # openai/clip-vit-large-patch14: CLIP score, the aesthetic predictor's features
    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, projection_dim=768, num_hidden_layers=24,
                            num_attention_heads=16, patch_size=14)


def open_clip_bigg14_text_config():    # laion OpenCLIP ViT-bigG/14 text tower: SDXL's text_encoder_2
    return CLIPTextConfig(hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
                          num_attention_heads=20, hidden_act="gelu", bos_token_id=0, eos_token_id=2)


def open_clip_vit_h14_text_config():   # laion OpenCLIP ViT-H/14 (laion2B-s32B-b79K; HPS v2 / v2.1 fine-tune it)
    return CLIPTextConfig(hidden_size=1024, intermediate_size=4096, projection_dim=1024, num_hidden_layers=24,
                          num_attention_heads=16, hidden_act="gelu", bos_token_id=0, eos_token_id=2)


def open_clip_vit_h14_vision_config():
    return CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, projection_dim=1024, num_hidden_layers=32,
                            num_attention_heads=16, patch_size=14, hidden_act="gelu")


#################################################################################
#                          Layers                                               #
#################################################################################

def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


_CLIP_ACTS = {"quick_gelu": quick_gelu, "gelu": F.gelu}     # gelu: exact (erf)


class CLIPAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections, scaled by head_dim^-0.5; causal (key j > query i
    masked) in the text encoder, full in the vision tower."""
    def __init__(self, dim, heads, causal):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        q, k, v = (rearrange(f(x), "b l (h d) -> b h l d", h=self.heads)                # (B, H, L, d) each
                   for f in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)            # (B, H, L, d)
        return self.out_proj(rearrange(out, "b h l d -> b l (h d)"))


class CLIPMLP(nn.Module):
    def __init__(self, dim, hidden, act):
        super().__init__()
        self.act = _CLIP_ACTS[act]
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: x += attn(LN1(x)); x += mlp(LN2(x)). One class for both towers (causal: the text encoder)."""
    def __init__(self, c, causal):
        super().__init__()
        self.self_attn = CLIPAttention(c.hidden_size, c.num_attention_heads, causal)
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = CLIPMLP(c.hidden_size, c.intermediate_size, c.hidden_act)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, c, causal):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(c, causal) for _ in range(c.num_hidden_layers))

    def forward(self, x):
        """(B, L, D) -> (last layer's output, last layer's input = transformers' hidden_states[-2]), both (B, L, D)."""
        penultimate = x
        for layer in self.layers:
            penultimate, x = x, layer(x)
        return x, penultimate


#################################################################################
#                          Models                                               #
#################################################################################

class CLIPTextTransformer(nn.Module):
    """transformers' `text_model`: input_ids (B, L <= max_position_embeddings) -> dict of
        last_hidden_state          (B, L, D)  last layer's output after final_layer_norm (SD1.5's context)
        penultimate_hidden_state   (B, L, D)  transformers' hidden_states[-2]: the second-to-last layer's output,
                                              without final_layer_norm (SDXL's context)
        pooler_output              (B, D)     last_hidden_state at the EOS position
    The EOS position follows transformers: with the legacy config eos_token_id == 2 (the released SD configs; open_clip
    pools the same way) it is argmax(input_ids), EOS 49407 being the largest id; otherwise the first position holding
    eos_token_id."""
    def __init__(self, c):
        super().__init__()
        self.config = c
        self.embeddings = nn.Module()
        self.embeddings.token_embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.embeddings.position_embedding = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.encoder = CLIPEncoder(c, causal=True)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_ids):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embeddings.token_embedding(input_ids) + self.embeddings.position_embedding(pos)[None]   # (B, L, D)
        x, penultimate = self.encoder(x)
        last = self.final_layer_norm(x)                                       # (B, L, D)
        if self.config.eos_token_id == 2:
            eos = input_ids.argmax(-1)                                        # (B,) first occurrence of the largest id
        else:
            eos = (input_ids == self.config.eos_token_id).int().argmax(-1)   # (B,) first EOS
        pooled = last[torch.arange(last.shape[0], device=last.device), eos]  # (B, D)
        return dict(last_hidden_state=last, penultimate_hidden_state=penultimate, pooler_output=pooled)


class CLIPTextModel(nn.Module):
    """The CLIP text encoder: CLIPTextTransformer's outputs, plus with_projection
        text_embeds                (B, P)     pooler_output @ text_projection (SDXL's pooled; CLIP's text embedding)
    Without projection the keys are CLIPTextModel's, with it CLIPTextModelWithProjection's."""
    def __init__(self, config, with_projection=False):
        super().__init__()
        self.config, self.with_projection = config, with_projection
        self.text_model = CLIPTextTransformer(config)                         # transformers names: text_model.*
        if with_projection:
            self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, input_ids):
        out = self.text_model(input_ids)
        if self.with_projection:
            out["text_embeds"] = self.text_projection(out["pooler_output"])  # (B, P)
        return out


class CLIPVisionTransformer(nn.Module):
    """transformers' `vision_model` (a ViT): pixel_values (B, C, S, S), S = image_size, normalised -> dict of
        last_hidden_state   (B, 1 + (S/p)^2, D)  the encoder's output: class token first, then the patches row-major
        pooler_output       (B, D)               post_layernorm of the class token
    Patches: a stride-p convolution without bias; + class embedding and learnt positions; pre_layrnorm (transformers'
    spelling) before the (non-causal) encoder."""
    def __init__(self, c):
        super().__init__()
        self.config = c
        self.embeddings = nn.Module()
        self.embeddings.class_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        self.embeddings.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, c.patch_size,
                                                    bias=False)
        self.embeddings.position_embedding = nn.Embedding((c.image_size // c.patch_size) ** 2 + 1, c.hidden_size)
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.encoder = CLIPEncoder(c, causal=False)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixel_values):
        e, S = self.embeddings, self.config.image_size
        if tuple(pixel_values.shape[-2:]) != (S, S):
            raise ValueError(f"CLIP vision tower: images of {S}x{S} expected, got {tuple(pixel_values.shape[-2:])}; "
                             "preprocess them with clip_preprocess")
        patches = e.patch_embedding(pixel_values.to(e.patch_embedding.weight.dtype))        # (B, D, S/p, S/p)
        patches = rearrange(patches, "b d h w -> b (h w) d")
        cls = e.class_embedding.expand(patches.shape[0], 1, -1)                             # (B, 1, D)
        x = torch.cat([cls, patches], 1) + e.position_embedding.weight[None]                # (B, 1 + N, D)
        x, _ = self.encoder(self.pre_layrnorm(x))
        return dict(last_hidden_state=x, pooler_output=self.post_layernorm(x[:, 0]))


class CLIPVisionModel(nn.Module):
    """The CLIP vision tower with its projection (transformers' CLIPVisionModelWithProjection keys): the outputs of
    CLIPVisionTransformer, plus image_embeds (B, P) = pooler_output @ visual_projection, un-normalised."""
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.vision_model = CLIPVisionTransformer(config)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, pixel_values):
        out = self.vision_model(pixel_values)
        out["image_embeds"] = self.visual_projection(out["pooler_output"])   # (B, P)
        return out


class CLIPModel(nn.Module):
    """Both towers (transformers' CLIPModel keys: text_model.*, vision_model.*, text_projection, visual_projection,
    logit_scale) and the tokenizer of the checkpoint (`tokenizer`, a clip_tokenizer.CLIPTokenizer: prompts ->
    input_ids). encode_image / encode_text give the projected, un-normalised embeddings (B, projection_dim);
    exp(logit_scale) is CLIP's learnt inverse temperature."""
    def __init__(self, text_config, vision_config, tokenizer=None):
        super().__init__()
        if text_config.projection_dim != vision_config.projection_dim:
            raise ValueError(f"text projection_dim={text_config.projection_dim} != vision projection_dim="
                             f"{vision_config.projection_dim}: one CLIP embedding space needs one size")
        self.text_config, self.vision_config, self.tokenizer = text_config, vision_config, tokenizer
        self.text_model = CLIPTextTransformer(text_config)
        self.vision_model = CLIPVisionTransformer(vision_config)
        self.text_projection = nn.Linear(text_config.hidden_size, text_config.projection_dim, bias=False)
        self.visual_projection = nn.Linear(vision_config.hidden_size, vision_config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))                # log(1 / 0.07), as transformers

    @property
    def projection_dim(self):
        return self.text_config.projection_dim

    def encode_image(self, pixel_values):
        """pixel_values (B, 3, S, S), as clip_preprocess gives them -> image embeddings (B, P)."""
        return self.visual_projection(self.vision_model(pixel_values)["pooler_output"])

    def encode_text(self, input_ids):
        """input_ids (B, L), as self.tokenizer gives them -> text embeddings (B, P)."""
        return self.text_projection(self.text_model(input_ids)["pooler_output"])


#################################################################################
#                          open_clip key mapping                                #
#################################################################################

# Where original single files keep the text encoders: which=1, CLIP ViT-L/14 under transformers' names, in SD1.5 and
# SDXL files; which=2, OpenCLIP bigG/14 under open_clip's names, in SDXL files.
SINGLE_FILE_PREFIXES = {1: ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer."),
                        2: ("conditioner.embedders.1.model.",)}
SINGLE_FILE_PAD = {1: "<|endoftext|>", 2: "!"}         # the pad tokens of SD's tokenizer/ and SDXL's tokenizer_2/
_IGNORED = ("text_model.embeddings.position_ids", "logit_scale")   # a buffer; CLIP's contrastive temperature
_BUFFERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")   # in older saved files
_OPEN_CLIP_TOP = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                  "positional_embedding": "text_model.embeddings.position_embedding.weight",
                  "ln_final.weight": "text_model.final_layer_norm.weight",
                  "ln_final.bias": "text_model.final_layer_norm.bias"}
_OPEN_CLIP_LAYER = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "attn.out_proj.": "self_attn.out_proj.",
                    "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2."}
_QKV = ("q_proj", "k_proj", "v_proj")


def clip_state_dict_from_open_clip(sd):
    """An open_clip text tower's state dict (SDXL's conditioner.embedders.1.model.*, prefix stripped) -> transformers
    CLIPTextModelWithProjection keys. The fused attention input in_proj_weight / in_proj_bias stacks the rows of
    q, k, v; open_clip applies text_projection P as x @ P, so the Linear weight is Pᵀ. Keys no rule covers keep
    their name, so a load error names them."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", k)
        layer = f"text_model.encoder.layers.{m[1]}." if m else ""
        inner = next((a for a in _OPEN_CLIP_LAYER if m and m[2].startswith(a)), None)
        if k in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[k]] = v
        elif k == "text_projection":
            out["text_projection.weight"] = v.t().contiguous()                  # P (D, P_out) -> weight (P_out, D)
        elif m and m[2] in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = m[2].rsplit("_", 1)[1]                                     # weight or bias
            for name, part in zip(_QKV, v.chunk(3)):                          # (3D, D) -> 3 x (D, D); (3D,) -> 3 x (D,)
                out[f"{layer}self_attn.{name}.{kind}"] = part
        elif inner:
            out[layer + _OPEN_CLIP_LAYER[inner] + m[2][len(inner):]] = v
        else:
            out[k] = v
    return out


def clip_state_dict_to_open_clip(sd):
    """The inverse: transformers CLIPTextModelWithProjection keys -> open_clip's (as SDXL single files hold them)."""
    top = {v: k for k, v in _OPEN_CLIP_TOP.items()}
    out = {}
    for k, v in sd.items():
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)$", k)
        inner = next((b for b in _OPEN_CLIP_LAYER.values() if m and m[2].startswith(b)), None)
        if k in top:
            out[top[k]] = v
        elif k == "text_projection.weight":
            out["text_projection"] = v.t().contiguous()                        # weight (P_out, D) -> P (D, P_out)
        elif m and re.fullmatch(r"self_attn\.q_proj\.(weight|bias)", m[2]):
            kind = m[2].rsplit(".", 1)[1]
            parts = [sd[f"text_model.encoder.layers.{m[1]}.self_attn.{n}.{kind}"] for n in _QKV]
            out[f"transformer.resblocks.{m[1]}.attn.in_proj_{kind}"] = torch.cat(parts)   # 3 x (D, ...) -> (3D, ...)
        elif m and re.fullmatch(r"self_attn\.[kv]_proj\.(weight|bias)", m[2]):
            continue                                                            # fused with q above
        elif inner:
            old = next(a for a, b in _OPEN_CLIP_LAYER.items() if b == inner)
            out[f"transformer.resblocks.{m[1]}.{old}{m[2][len(inner):]}"] = v
        else:
            raise ValueError(f"{k!r} is not a CLIPTextModelWithProjection key; expected transformers' names")
    return out


_OPEN_CLIP_VISION_TOP = {"conv1.weight": "embeddings.patch_embedding.weight", "class_embedding":
                         "embeddings.class_embedding", "positional_embedding": "embeddings.position_embedding.weight",
                         "ln_pre.weight": "pre_layrnorm.weight", "ln_pre.bias": "pre_layrnorm.bias",
                         "ln_post.weight": "post_layernorm.weight", "ln_post.bias": "post_layernorm.bias"}


def clip_model_state_dict_from_open_clip(sd):
    """A whole open_clip CLIP (ViT) state dict, as open_clip_pytorch_model.bin and the HPS checkpoints hold it ->
    transformers CLIPModel keys. The text side (and logit_scale) by clip_state_dict_from_open_clip; the vision side
    `visual.*`: conv1 -> the patch embedding, ln_pre / ln_post -> pre_layrnorm / post_layernorm, its resblocks as the
    text's (fused q/k/v split), proj (applied as x @ proj) -> visual_projection.weight = projᵀ. Keys no rule covers
    keep their name, so a load error names them."""
    visual = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    blocks = {k: v for k, v in visual.items() if k.startswith("transformer.resblocks.")}
    out = {("vision_model." + k[len("text_model."):] if k.startswith("text_model.") else "visual." + k): v
           for k, v in clip_state_dict_from_open_clip(blocks).items()}
    for k, v in visual.items():
        if k == "proj":
            out["visual_projection.weight"] = v.t().contiguous()                # (D, P) -> weight (P, D)
        elif k in _OPEN_CLIP_VISION_TOP:
            out["vision_model." + _OPEN_CLIP_VISION_TOP[k]] = v
        elif k not in blocks:
            out["visual." + k] = v
    out.update(clip_state_dict_from_open_clip({k: v for k, v in sd.items() if not k.startswith("visual.")}))
    return out


#################################################################################
#                          Loaders                                              #
#################################################################################

_VISION_KEYS = ("vision_model.", "visual_projection.")
# open_clip architectures told apart by their shapes alone (heads and activation are not in the weights)
OPEN_CLIP_RELEASES = {"ViT-H-14": (open_clip_vit_h14_text_config, open_clip_vit_h14_vision_config)}


def clip_configs(raw, source):
    """(text config or None, vision config or None) of a transformers config.json dict: a CLIPModel's (model_type
    'clip': text_config and vision_config, both with the top-level projection_dim, as CLIPModel uses it; older files
    such as openai/clip-vit-large-patch14 also hold text_config_dict / vision_config_dict, which win, as in
    transformers), a CLIPVisionModel(WithProjection)'s or a CLIPTextModel(WithProjection)'s."""
    if raw.get("model_type") == "clip":
        text, vision = ({"model_type": f"clip_{t}_model", **(raw.get(f"{t}_config") or {}),
                         **(raw.get(f"{t}_config_dict") or {})} for t in ("text", "vision"))
        text, vision = CLIPTextConfig.from_json(text, source), CLIPVisionConfig.from_json(vision, source)
        if "projection_dim" in raw:
            text.projection_dim = vision.projection_dim = raw["projection_dim"]
        return text, vision
    if raw.get("model_type") == "clip_vision_model":
        return None, CLIPVisionConfig.from_json(raw, source)
    return CLIPTextConfig.from_json(raw, source), None             # raises on another model_type


def clip_configs_from_open_clip(model_cfg, source):
    """(text config, vision config) of an open_clip model config: its model_configs/<name>.json, or the 'model_cfg' of
    the open_clip_config.json hub repositories ship beside the weights; open_clip's defaults for missing keys. Keys
    of other architectures (timm or HF towers, attentional pooling, ...) raise."""
    vis, txt = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    known = {"model_cfg": {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"},
             "vision_cfg": {"image_size", "layers", "width", "head_width", "patch_size", "mlp_ratio", "patch_dropout"},
             "text_cfg": {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}}
    for name, d in (("model_cfg", model_cfg), ("vision_cfg", vis), ("text_cfg", txt)):
        if set(d) - known[name]:
            raise ValueError(f"{source}: open_clip {name} key(s) {sorted(set(d) - known[name])} are not implemented; "
                             f"a plain ViT CLIP has only {sorted(known[name])}")
    act, proj = ("quick_gelu" if model_cfg.get("quick_gelu") else "gelu"), model_cfg["embed_dim"]
    width, t_width = vis.get("width", 768), txt.get("width", 512)
    vision = CLIPVisionConfig(hidden_size=width, intermediate_size=int(width * vis.get("mlp_ratio", 4.0)),
                              projection_dim=proj, num_hidden_layers=vis.get("layers", 12),
                              num_attention_heads=width // vis.get("head_width", 64),
                              image_size=vis.get("image_size", 224), patch_size=vis.get("patch_size", 16),
                              hidden_act=act)
    text = CLIPTextConfig(vocab_size=txt.get("vocab_size", 49408), hidden_size=t_width,
                          intermediate_size=int(t_width * txt.get("mlp_ratio", 4.0)), projection_dim=proj,
                          num_hidden_layers=txt.get("layers", 12), num_attention_heads=txt.get("heads", 8),
                          max_position_embeddings=txt.get("context_length", 77), hidden_act=act, bos_token_id=0,
                          eos_token_id=2)                          # eos 2: pool at argmax(ids), as open_clip
    return text, vision


def _open_clip_configs(sd, path):
    """(text config, vision config, how they were found) of an open_clip checkpoint (sd: in transformers keys): from
    the open_clip_config.json beside the file, else by matching its shapes to OPEN_CLIP_RELEASES."""
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), "open_clip_config.json")
    if os.path.isfile(beside):
        raw = read_json(beside)
        return (*clip_configs_from_open_clip(raw.get("model_cfg", raw), beside), "open_clip_config.json beside it")
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    towers = {k.split(".")[0] for k in shapes}
    for name, (text, vision) in OPEN_CLIP_RELEASES.items():
        with torch.device("meta"):
            want = {k: tuple(v.shape) for k, v in CLIPModel(text(), vision()).state_dict().items()
                    if k.split(".")[0] in towers}
        if {k: shapes.get(k) for k in want} == want:
            return text(), vision(), f"{name}, told by its shapes"

    def tower(name, embedding, dim):
        s = shapes.get(f"{name}_model.embeddings.{embedding}.weight")
        n = len({k.split(".")[3] for k in shapes if k.startswith(f"{name}_model.encoder.layers.")})
        return f"{name} width {s[dim]}, {n} layers" if s else f"no {name} tower"
    raise ValueError(f"{path!r} holds an open_clip model with {tower('vision', 'patch_embedding', 0)} and "
                     f"{tower('text', 'token_embedding', 1)}: not an architecture known by its shapes "
                     f"({', '.join(OPEN_CLIP_RELEASES)}); put the model's open_clip_config.json (from its hub "
                     "repository) beside the file")


def _read_clip(path, vision_only=False):
    """(text config or None, vision config or None, state dict in transformers CLIPModel keys, where, is open_clip)
    of a transformers CLIP folder or an open_clip checkpoint file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"no config.json in {path!r}: pass a transformers CLIPModel (or "
                                    "CLIPVisionModelWithProjection) folder, or an OpenCLIP / HPS checkpoint file")
        text, vision = clip_configs(read_json(config_path), config_path)
        weights = next((os.path.join(path, f) for f in ("model.safetensors", "pytorch_model.bin")   # laion's repos
                        if os.path.isfile(os.path.join(path, f))), path)   # also hold open_clip's files
        sd = {k: v for k, v in read_state_dict(weights).items() if k not in _BUFFERS}
        return text, vision, sd, f"CLIP in {path!r}", False
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP checkpoint {path!r} does not exist; pass a transformers CLIPModel folder (e.g. "
                                "clip-vit-large-patch14), open_clip_pytorch_model.bin or an HPS v2 / v2.1 .pt file")
    sd = read_state_dict(path)                                     # HPS: the file's 'state_dict'
    if sd and all(k.startswith("module.") for k in sd):           # saved from DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if not any(k.startswith("visual.") for k in sd):
        hf = any(k.startswith(("text_model.", "vision_model.")) for k in sd)
        raise ValueError(f"{path!r} is not an open_clip CLIP checkpoint (no visual.* keys): it holds "
                         + ("a transformers CLIP state dict; pass the folder holding it and its config.json" if hf
                            else f"keys like {sorted(sd)[:3]}; expected open_clip_pytorch_model.bin / .safetensors "
                                 "or HPS_v2(.1)_compressed.pt"))
    if vision_only:
        sd = {k: v for k, v in sd.items() if k.startswith("visual.")}
    sd = clip_model_state_dict_from_open_clip(sd)
    text, vision, how = _open_clip_configs(sd, path)
    return text, vision, sd, f"open_clip CLIP in {path!r} ({how})", True


def _layout(path, which):
    """(encoder folder, tokenizer folder) of a pipeline folder, its text_encoder*/ folder or a CLIP model folder."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"CLIP folder {path!r} does not exist; pass a diffusers pipeline folder (with "
                                "text_encoder/ and tokenizer/), a folder with config.json, weights, vocab.json and "
                                "merges.txt, or an SD1.5 / SDXL single file")
    suffix = "" if which == 1 else "_2"
    if os.path.isdir(os.path.join(path, "text_encoder")):
        enc_dir, tok_dir = os.path.join(path, f"text_encoder{suffix}"), os.path.join(path, f"tokenizer{suffix}")
        if not os.path.isdir(enc_dir):
            raise FileNotFoundError(f"{path!r} has no text_encoder{suffix}/ sub-folder: which=2 needs an SDXL-style "
                                    "pipeline with a second text encoder")
        return enc_dir, tok_dir
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path!r} has neither a text_encoder/ sub-folder nor a config.json: unknown layout. "
                                "Pass the diffusers pipeline folder or the CLIP model folder itself")
    base = os.path.basename(os.path.normpath(path))                # a pipeline's text_encoder*/: tokenizer*/ beside it
    sibling = os.path.join(os.path.dirname(os.path.normpath(path)), base.replace("text_encoder", "tokenizer"))
    if base.startswith("text_encoder") and not os.path.isfile(os.path.join(path, "vocab.json")):
        return path, sibling
    return path, path


def _from_folder(path, which, tokenizer_path):
    """(tokenizer, config, state dict, where) of a pipeline or CLIP folder."""
    enc_dir, tok_dir = _layout(path, which)
    if not os.path.isfile(os.path.join(enc_dir, "config.json")):
        raise FileNotFoundError(f"no config.json in {enc_dir!r}: the CLIP text config is needed to build the model")
    tokenizer = CLIPTokenizer.from_folder(tokenizer_path or tok_dir)   # raises first without vocab.json / merges.txt
    config, vision = clip_configs(read_json(os.path.join(enc_dir, "config.json")), os.path.join(enc_dir, "config.json"))
    if config is None:
        raise ValueError(f"{enc_dir!r} holds a CLIP vision model (config.json model_type 'clip_vision_model'): "
                         "load_clip_text needs a text encoder; load_clip_vision reads this one")
    sd = read_state_dict(enc_dir)                                  # a full CLIPModel: its text tower
    sd = {k: v for k, v in sd.items() if not k.startswith(_VISION_KEYS + ("logit_scale",))}
    return tokenizer, config, sd, f"CLIP text encoder in {enc_dir!r}"


def _from_single_file(path, which, tokenizer_path):
    """(tokenizer, release config, state dict, where) of an original SD1.5 / SDXL single file: only the tensors under
    the encoder's prefix are read; the tokenizer comes from the repository's BPE file."""
    shapes = checkpoint_shapes(path)
    prefix = next((p for p in SINGLE_FILE_PREFIXES[which] if any(k.startswith(p) for k in shapes)), None)
    if prefix is None:
        held = sorted(w for w, ps in SINGLE_FILE_PREFIXES.items() if any(k.startswith(ps) for k in shapes))
        if not held and any(k.startswith("text_model.") for k in shapes):
            raise ValueError(f"{path!r} holds a transformers CLIP text model (text_model.* keys), not an SD single "
                             "file: pass the folder holding it and its config.json")
        raise ValueError(f"{path!r} has no which={which} text encoder (keys {' or '.join(SINGLE_FILE_PREFIXES[which])}"
                         f"*); it holds {'which=' + str(held) if held else 'no CLIP text encoder'}: SD1.5 files hold "
                         "one (which=1), SDXL base files two (which=1 CLIP ViT-L, which=2 OpenCLIP bigG)")
    sd = {k[len(prefix):]: v for k, v in read_state_dict(path, prefixes=(prefix,)).items()}
    if which == 2:
        sd = clip_state_dict_from_open_clip(sd)
    tokenizer = (CLIPTokenizer.from_folder(tokenizer_path) if tokenizer_path
                 else CLIPTokenizer.from_bpe_file(pad_token=SINGLE_FILE_PAD[which]))
    config = clip_vit_l14_text_config() if which == 1 else open_clip_bigg14_text_config()
    return tokenizer, config, sd, f"CLIP text encoder under {prefix}* in {path!r}"


def load_clip_text(path, with_projection=None, dtype=None, which=1, tokenizer_path=None, config=None):
    """Load (tokenizer, encoder) from a diffusers pipeline folder (which=1: text_encoder/ + tokenizer/; which=2:
    SDXL's text_encoder_2/ + tokenizer_2/), one of its text_encoder*/ folders (tokenizer*/ beside it), a
    transformers CLIP folder (config.json, weights, vocab.json and merges.txt; a full CLIPModel's text tower is
    taken), or an original single file (.safetensors / .ckpt; SINGLE_FILE_PREFIXES: which=1 the CLIP ViT-L/14 of an
    SD1.5 or SDXL file, which=2 SDXL's OpenCLIP bigG/14; the release config, the tokenizer from this repository's
    BPE file with that encoder's pad token). tokenizer_path: a tokenizer folder to use instead; config
    (CLIPTextConfig, dict or config.json path): instead of the folder's or release's. with_projection: None = when
    the weights hold text_projection.weight; False drops it."""
    path = os.fspath(path)
    if which not in (1, 2):
        raise ValueError(f"which={which!r}: expected 1 (text_encoder/ + tokenizer/, or a single file's CLIP ViT-L) or "
                         "2 (text_encoder_2/ + tokenizer_2/, or an SDXL single file's OpenCLIP bigG)")
    single = os.path.isfile(path)
    tokenizer, own_config, sd, where = (_from_single_file if single else _from_folder)(path, which, tokenizer_path)
    if config is not None:
        config = config if isinstance(config, CLIPTextConfig) else CLIPTextConfig.from_json(config)
        where += " with the config given"
    elif single:
        where += f" with the {'ViT-L/14' if which == 1 else 'OpenCLIP bigG/14'} release config (config= for another)"
    config = config or own_config
    if any(k.startswith(("embeddings.", "encoder.layers.")) for k in sd):   # transformers 5 saves CLIPTextModel
        sd = {k if k == "text_projection.weight" else "text_model." + k: v for k, v in sd.items()}   # unprefixed
    sd = {k: v for k, v in sd.items() if k not in _IGNORED}
    if with_projection is None:
        with_projection = "text_projection.weight" in sd
    elif not with_projection:
        sd.pop("text_projection.weight", None)
    encoder = build_and_load(lambda: CLIPTextModel(config, with_projection), sd, where, dtype)
    return tokenizer, encoder


def load_clip_vision(path, dtype=None):
    """The CLIP vision tower with its projection (CLIPVisionModel: pixel_values -> image_embeds) from a transformers
    CLIPModel folder (config.json with vision_config; e.g. openai/clip-vit-large-patch14), a
    CLIPVisionModelWithProjection folder, or an open_clip file (OpenCLIP ViT-H/14, HPS; see load_clip_model).
    dtype: cast the weights (e.g. torch.float16). Frozen, in eval mode."""
    _, vision, sd, where, _ = _read_clip(path, vision_only=True)
    if vision is None:
        raise ValueError(f"{where} is a CLIP text model (config.json model_type 'clip_text_model'): load_clip_vision "
                         "needs a CLIPModel folder (config.json with vision_config), a CLIPVisionModelWithProjection "
                         "folder or an OpenCLIP / HPS file; load_clip_text reads this one")
    sd = {k: v for k, v in sd.items() if k.startswith(_VISION_KEYS)}
    if "visual_projection.weight" not in sd:
        raise ValueError(f"{where} holds no visual_projection.weight (a CLIPVisionModel without its projection): "
                         "image embeddings need it; pass the CLIPModel or CLIPVisionModelWithProjection folder")
    return build_and_load(lambda: CLIPVisionModel(vision), sd, f"{where}, vision tower", dtype)


def load_clip_model(path, dtype=None, tokenizer_path=None):
    """A whole CLIP (CLIPModel: encode_image, encode_text, tokenizer, logit_scale), frozen, in eval mode, from
      - a transformers CLIPModel folder: config.json, model.safetensors or pytorch_model.bin, vocab.json + merges.txt
        (openai/clip-vit-large-patch14, laion/CLIP-ViT-H-14-laion2B-s32B-b79K); the tokenizer from the folder;
      - an open_clip file: open_clip_pytorch_model.bin / .safetensors (laion/CLIP-ViT-H-14-laion2B-s32B-b79K) or an
        HPS v2 / v2.1 checkpoint (HPS_v2_compressed.pt, HPS_v2.1_compressed.pt: {'state_dict': that model's state
        dict}); the architecture from the open_clip_config.json beside it, else from its shapes (OPEN_CLIP_RELEASES:
        ViT-H/14); open_clip's tokenizer, CLIPTokenizer.open_clip().
    tokenizer_path: a tokenizer folder (vocab.json + merges.txt) to use instead. dtype: cast the weights."""
    text, vision, sd, where, is_open_clip = _read_clip(path)
    if text is None or vision is None:
        has, use = ("vision", "load_clip_vision") if text is None else ("text", "load_clip_text")
        raise ValueError(f"{where} holds only a CLIP {has} tower: load_clip_model needs both (a CLIPModel folder or "
                         f"an OpenCLIP / HPS file); {use} reads this one")
    tokenizer = (CLIPTokenizer.from_folder(tokenizer_path) if tokenizer_path else
                 CLIPTokenizer.open_clip() if is_open_clip else CLIPTokenizer.from_folder(path))
    n_ids = max(tokenizer.vocab.values()) + 1
    if n_ids > text.vocab_size:
        raise ValueError(f"{where}: the tokenizer has {n_ids} ids but the text tower embeds {text.vocab_size}; pass "
                         "the model's own tokenizer folder as tokenizer_path")
    return build_and_load(lambda: CLIPModel(text, vision, tokenizer), sd, where, dtype)
