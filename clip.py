"""CLIP text encoders (SD1.5's and SDXL's) and the CLIP BPE tokenizer, hand-written.

    config (CLIPTextConfig, release factories) -> layers -> CLIPTextModel -> tokenizer -> open_clip key mapping
    -> load_clip_text

Parameter names equal transformers' `CLIPTextModel` / `CLIPTextModelWithProjection` state-dict keys; the tokenizer
equals transformers' (slow) `CLIPTokenizer` called with padding="max_length", max_length=77, truncation=True, in its
no-ftfy mode (see CLIPTokenizer). Original SD1.5 / SDXL single files load too: CLIP ViT-L under transformers' names,
SDXL's bigG under open_clip's (fused q/k/v, x @ P projection), and, as they hold no tokenizer, the tokenizer from the
CLIP BPE file shipped with this repository.

Which outputs the pipelines take: SD1.5 the `last_hidden_state` of CLIP ViT-L/14; SDXL the penultimate hidden state
(before the final layer norm) of both encoders, concatenated, and the projected pooled output of OpenCLIP bigG.
"""
import gzip
import os
import re
import unicodedata
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from models import JSONConfig, build_and_load, checkpoint_shapes, read_json, read_state_dict


#################################################################################
#                          Config                                               #
#################################################################################

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
        if self.model_type != "clip_text_model":
            raise ValueError(f"model_type={self.model_type!r} is not implemented; CLIPTextConfig needs "
                             "model_type='clip_text_model' (a full CLIPModel config: pass its 'text_config')")
        if self.hidden_act not in _CLIP_ACTS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not implemented; known: {sorted(_CLIP_ACTS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")


def clip_vit_l14_text_config():        # openai/clip-vit-large-patch14: SD1.5's text_encoder, SDXL's text_encoder
    return CLIPTextConfig(hidden_size=768, intermediate_size=3072, projection_dim=768, num_attention_heads=12,
                          bos_token_id=0, eos_token_id=2)


def open_clip_bigg14_text_config():    # laion OpenCLIP ViT-bigG/14 text tower: SDXL's text_encoder_2
    return CLIPTextConfig(hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
                          num_attention_heads=20, hidden_act="gelu", bos_token_id=0, eos_token_id=2)


#################################################################################
#                          Layers                                               #
#################################################################################

def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


_CLIP_ACTS = {"quick_gelu": quick_gelu, "gelu": F.gelu}     # gelu: exact (erf)


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with biased q/k/v/out projections, scaled by head_dim^-0.5."""
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        q, k, v = (rearrange(f(x), "b l (h d) -> b h l d", h=self.heads)                # (B, H, L, d) each
                   for f in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)   # (B, H, L, d); key j > query i masked
        return self.out_proj(rearrange(out, "b h l d -> b l (h d)"))


class CLIPMLP(nn.Module):
    def __init__(self, dim, hidden, act):
        super().__init__()
        self.act = _CLIP_ACTS[act]
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: x += attn(LN1(x)); x += mlp(LN2(x))."""
    def __init__(self, c):
        super().__init__()
        self.self_attn = CLIPAttention(c.hidden_size, c.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = CLIPMLP(c.hidden_size, c.intermediate_size, c.hidden_act)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextModel(nn.Module):
    """CLIP text transformer: input_ids (B, L <= max_position_embeddings) -> dict of
        last_hidden_state          (B, L, D)  last layer's output after final_layer_norm (SD1.5's context)
        penultimate_hidden_state   (B, L, D)  transformers' hidden_states[-2]: the second-to-last layer's output,
                                              without final_layer_norm (SDXL's context)
        pooler_output              (B, D)     last_hidden_state at the EOS position
        text_embeds                (B, P)     pooler_output @ text_projection (with_projection only; SDXL's pooled)
    The EOS position follows transformers: with the legacy config eos_token_id == 2 (the released SD configs) it is
    argmax(input_ids), EOS 49407 being the largest id; otherwise the first position holding eos_token_id.
    Without projection the keys are CLIPTextModel's, with it CLIPTextModelWithProjection's."""
    def __init__(self, config, with_projection=False):
        super().__init__()
        c = self.config = config
        self.with_projection = with_projection
        self.text_model = nn.Module()                              # transformers names: text_model.{embeddings,...}
        self.text_model.embeddings = nn.Module()
        self.text_model.embeddings.token_embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.text_model.embeddings.position_embedding = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.text_model.encoder = nn.Module()
        self.text_model.encoder.layers = nn.ModuleList(CLIPEncoderLayer(c) for _ in range(c.num_hidden_layers))
        self.text_model.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        if with_projection:
            self.text_projection = nn.Linear(c.hidden_size, c.projection_dim, bias=False)

    def forward(self, input_ids):
        tm, L = self.text_model, input_ids.shape[1]
        pos = torch.arange(L, device=input_ids.device)
        x = tm.embeddings.token_embedding(input_ids) + tm.embeddings.position_embedding(pos)[None]   # (B, L, D)
        penultimate = x                                            # hidden_states[-2] when there is a single layer
        for i, layer in enumerate(tm.encoder.layers):
            if i == len(tm.encoder.layers) - 1:
                penultimate = x
            x = layer(x)
        last = tm.final_layer_norm(x)                              # (B, L, D)
        if self.config.eos_token_id == 2:
            eos = input_ids.argmax(-1)                             # (B,) first occurrence of the largest id
        else:
            eos = (input_ids == self.config.eos_token_id).int().argmax(-1)   # (B,) first EOS
        pooled = last[torch.arange(last.shape[0], device=last.device), eos]  # (B, D)
        out = dict(last_hidden_state=last, penultimate_hidden_state=penultimate, pooler_output=pooled)
        if self.with_projection:
            out["text_embeds"] = self.text_projection(pooled)      # (B, P)
        return out


#################################################################################
#                          CLIP tokenizer (byte-level BPE)                      #
#################################################################################

def bytes_to_unicode():
    """GPT-2's reversible map of the 256 bytes to printable characters (printable Latin-1 bytes map to themselves,
    the others to chr(256 + n))."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def _char_class(ch):
    """'L' letter, 'N' number (Unicode categories L*, N*), ' ' whitespace, 'O' anything else."""
    cat = unicodedata.category(ch)[0]
    return cat if cat in "LN" else " " if ch.isspace() else "O"


def pre_tokenize(text):
    """CLIP's split pattern
    `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+` (IGNORECASE),
    written as a scan over unicodedata categories: exact \\p{L} / \\p{N} without the `regex` module
    (plain `re` has no Unicode category classes: [^\\W\\d_] would also take No/Nl numbers such as '²' as letters)."""
    words, i, n = [], 0, len(text)
    while i < n:
        lower = text[i:i + 3].lower().replace("ſ", "s")            # IGNORECASE: regex case-folds "ſ" to "s"
        hit = next((s for s in _SPECIALS if text.startswith(s, i)), None) or \
            next((s for s in _CONTRACTIONS if lower.startswith(s)), None)
        kind = _char_class(text[i])
        if hit:
            j = i + len(hit)
        elif kind == " ":
            i += 1
            continue
        elif kind == "N":                                          # one digit per word
            j = i + 1
        else:                                                      # a run of letters, or of other symbols
            j = i + 1
            while j < n and _char_class(text[j]) == kind:
                j += 1
        words.append(text[i:j])
        i = j
    return words


def basic_clean(text):
    """transformers' CLIPTokenizer text clean-up without ftfy (its BasicTokenizer(strip_accents=False,
    do_split_on_punc=False)): drop NUL, U+FFFD and control/format characters, whitespace -> " ", spaces around CJK
    ideographs, NFC, lower-case per word, words joined by single spaces."""
    out = []
    for ch in text:
        if ord(ch) in (0, 0xFFFD) or ch not in "\t\n\r" and unicodedata.category(ch).startswith("C"):
            continue
        elif ch in " \t\n\r" or unicodedata.category(ch) == "Zs":
            out.append(" ")
        elif _is_cjk(ord(ch)):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    return " ".join(w.lower() for w in unicodedata.normalize("NFC", "".join(out)).split())


def _is_cjk(cp):
    return any(a <= cp <= b for a, b in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
                                         (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


# CLIP's BPE merges as openai ships them (`bpe_simple_vocab_16e6.txt.gz`, MIT; this copy from open_clip 3.3.0): the
# tokenizer of single-file checkpoints, which hold none.
BPE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip_bpe_simple_vocab_16e6.txt.gz")


def read_bpe_file(path=BPE_FILE):
    """(vocab, merges) from CLIP's gzipped merges file (a header line, then one "a b" merge per line), in the order
    of openai's simple_tokenizer and transformers' vocab.json: the 256 byte symbols, the same with "</w>", the results
    of the first 48,894 merges, then <|startoftext|> and <|endoftext|>: 49,408 ids."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1:49152 - 256 - 2 + 1]            # skip the header; transformers' slice
    merges = [tuple(line.split()) for line in lines]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(_SPECIALS)
    return {t: i for i, t in enumerate(tokens)}, merges


class CLIPTokenizer:
    """CLIP tokenizer on vocab.json + merges.txt: [BOS] + BPE ids[:max_length - 2] + [EOS], right-padded with the
    folder's pad token (<|endoftext|> for SD's tokenizer/, "!" (id 0) for SDXL's tokenizer_2/). Equal to transformers'
    slow CLIPTokenizer without ftfy installed (its default here). Special tokens — BOS, EOS, UNK, PAD and the
    folder's added tokens — are split out of the text before BPE, so with SDXL's tokenizer_2 every literal "!" becomes
    id 0 (transformers' quirk, which differs from open_clip's tokenizer on "!!")."""
    def __init__(self, vocab, merges, max_length=77, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                 pad_token="<|endoftext|>", unk_token="<|endoftext|>", added_tokens=None):
        self.vocab, self.max_length = vocab, max_length
        self.ranks = {pair: r for r, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        names = dict(bos_token=bos_token, eos_token=eos_token, pad_token=pad_token, unk_token=unk_token)
        missing = {k: v for k, v in names.items() if v not in vocab and v not in (added_tokens or {})}
        if missing:
            raise ValueError(f"special token(s) {missing} are not in vocab.json; is this a CLIP tokenizer folder?")
        self.specials = {t: (vocab[t], False, False) for t in names.values() if t in vocab}
        self.specials.update(added_tokens or {})                  # content -> (id, lstrip, rstrip)
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (self.specials[t][0] for t in names.values())
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(self.specials, key=len, reverse=True))) + ")")
        self.cache = {s: [s] for s in _SPECIALS}

    @classmethod
    def from_bpe_file(cls, path=None, pad_token="<|endoftext|>", max_length=77):
        """The tokenizer from CLIP's merges file (default: this repository's copy, BPE_FILE), for single-file
        checkpoints. pad_token: "<|endoftext|>" as SD1.5's and SDXL's tokenizer/, "!" (id 0) as SDXL's tokenizer_2/,
        whose special_tokens_map.json makes "!" a special token (see the class docstring)."""
        vocab, merges = read_bpe_file(path or BPE_FILE)
        return cls(vocab, merges, max_length, pad_token=pad_token)

    @classmethod
    def from_folder(cls, folder, max_length=None):
        """Read vocab.json and merges.txt (or the `tokenizers` file tokenizer.json holding both, as transformers 5
        saves a folder), and the optional tokenizer_config.json / special_tokens_map.json."""
        has = lambda name: os.path.isfile(os.path.join(folder, name))     # noqa: E731
        if has("vocab.json") and has("merges.txt"):
            vocab = read_json(os.path.join(folder, "vocab.json"))
            with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
                lines = f.read().strip().split("\n")[1:49152 - 256 - 2 + 1]   # skip "#version"; transformers' slice
            merges = [tuple(line.split()) for line in lines]
        elif has("tokenizer.json"):
            model = read_json(os.path.join(folder, "tokenizer.json")).get("model", {})
            if model.get("type") != "BPE":
                raise ValueError(f"{folder!r}/tokenizer.json holds a {model.get('type')!r} model, not CLIP's BPE")
            vocab = model["vocab"]
            merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        else:
            raise FileNotFoundError(f"no vocab.json + merges.txt (or tokenizer.json) in {folder!r}: pass a pipeline's "
                                    "tokenizer/ or tokenizer_2/, or the CLIP model folder")

        def read(name):
            path = os.path.join(folder, name)
            return read_json(path) if os.path.isfile(path) else {}
        cfg = {**read("special_tokens_map.json"), **read("tokenizer_config.json")}
        names = {k: (v["content"] if isinstance(v, dict) else v) for k, v in cfg.items()
                 if k in ("bos_token", "eos_token", "pad_token", "unk_token") and v is not None}
        added = {t["content"]: (int(i), t.get("lstrip", False), t.get("rstrip", False))
                 for i, t in cfg.get("added_tokens_decoder", {}).items()}
        length = cfg.get("model_max_length", 77)
        max_length = max_length or (length if isinstance(length, int) and length <= 10 ** 6 else 77)
        return cls(vocab, merges, max_length, added_tokens=added, **names)

    def bpe(self, word):
        """BPE of one pre-token (already mapped through bytes_to_unicode) -> list of vocab strings."""
        if word in self.cache:
            return self.cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]              # end of word marked on the last symbol
        while len(parts) > 1:
            pairs = set(zip(parts, parts[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):                                  # merge every occurrence, left to right
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self.cache[word] = parts
        return parts

    def _encode_text(self, text):
        """ids of text holding no special token."""
        ids = []
        for word in pre_tokenize(basic_clean(text)):
            word = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids += [self.vocab.get(piece, self.unk_id) for piece in self.bpe(word)]
        return ids

    def encode_one(self, text):
        """[BOS] + ids[:max_length - 2] + [EOS] of one prompt (no padding)."""
        parts = self._split.split(text)                            # odd entries are special-token strings
        for i in range(1, len(parts), 2):
            _, lstrip, rstrip = self.specials[parts[i]]
            parts[i - 1] = parts[i - 1].rstrip() if lstrip else parts[i - 1]
            parts[i + 1] = parts[i + 1].lstrip() if rstrip else parts[i + 1]
        ids = sum(([self.specials[p][0]] if i % 2 else self._encode_text(p) for i, p in enumerate(parts)), [])
        return [self.bos_id] + ids[:self.max_length - 2] + [self.eos_id]

    def __call__(self, prompts):
        """prompts (str or list of B str) -> input_ids (B, max_length) long."""
        rows = [self.encode_one(p) for p in ([prompts] if isinstance(prompts, str) else prompts)]
        ids = torch.full((len(rows), self.max_length), self.pad_id, dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, :len(row)] = torch.tensor(row)
        return ids


#################################################################################
#                          open_clip key mapping (SDXL single files)            #
#################################################################################

# Where original single files keep the text encoders: which=1, CLIP ViT-L/14 under transformers' names, in SD1.5 and
# SDXL files; which=2, OpenCLIP bigG/14 under open_clip's names, in SDXL files.
SINGLE_FILE_PREFIXES = {1: ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer."),
                        2: ("conditioner.embedders.1.model.",)}
SINGLE_FILE_PAD = {1: "<|endoftext|>", 2: "!"}         # the pad tokens of SD's tokenizer/ and SDXL's tokenizer_2/
_IGNORED = ("text_model.embeddings.position_ids", "logit_scale")   # a buffer; CLIP's contrastive temperature
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


#################################################################################
#                          Loader                                               #
#################################################################################

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
    raw = read_json(os.path.join(enc_dir, "config.json"))
    full = raw.get("model_type") == "clip" and "text_config" in raw
    config = CLIPTextConfig.from_json(raw["text_config"] if full else raw, os.path.join(enc_dir, "config.json"))
    if full and "projection_dim" in raw:                           # CLIPModel: the projection size is top-level
        config.projection_dim = raw["projection_dim"]
    sd = read_state_dict(enc_dir)
    if full:                                                       # a full CLIPModel: its text tower
        sd = {k: v for k, v in sd.items() if not k.startswith(("vision_model.", "visual_projection.", "logit_scale"))}
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
