"""T5 v1.1 encoder and its sentencepiece tokenizer (PixArt-α's text encoder), hand-written.

    config (T5Config, release factory) -> layers -> T5Encoder -> tokenizer -> load_t5

Parameter names equal transformers' `T5EncoderModel` state-dict keys; the tokenizer equals transformers'
`T5Tokenizer` called with padding="max_length", truncation=True.
"""
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from models import JSONConfig, build_and_load, read_json, read_state_dict


#################################################################################
#                          Config                                               #
#################################################################################

@dataclass
class T5Config(JSONConfig):
    """The T5 encoder's hyper-parameters; names and defaults as in transformers' T5Config (config.json). A
    transformers config.json also holds decoder, generation and token-id keys: they do not change the encoder
    and are skipped."""
    STRICT = False
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"           # T5 v1.0; v1.1 is "gated-gelu"
    dense_act_fn: str = None                  # None: from feed_forward_proj ("gated-gelu" -> gelu_new)
    is_gated_act: bool = None                 # None: from feed_forward_proj
    model_type: str = "t5"

    def __post_init__(self):
        proj = self.feed_forward_proj
        if self.dense_act_fn is None:
            self.dense_act_fn = "gelu_new" if proj == "gated-gelu" else proj.split("-")[-1]
        if self.is_gated_act is None:
            self.is_gated_act = proj.startswith("gated-")
        if self.model_type not in ("t5", "mt5") or not self.is_gated_act:
            raise ValueError(f"config (model_type {self.model_type!r}, feed_forward_proj {proj!r}) does not hold a "
                             "T5 v1.1 encoder; only gated-FFN T5/mT5 encoders are implemented")
        if self.dense_act_fn not in _T5_ACTS:
            raise ValueError(f"dense_act_fn={self.dense_act_fn!r} (from feed_forward_proj={proj!r}) is not "
                             f"implemented; known activations: {sorted(_T5_ACTS)}")


def t5_v1_1_xxl_config():   # google/t5-v1_1-xxl (DeepFloyd copy): PixArt-α's text encoder
    return T5Config(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")


#################################################################################
#                          Layers                                               #
#################################################################################

def gelu_new(x):
    """tanh-approximate GELU written out as transformers does; bit-exact with it in bf16/fp16 (F.gelu is not)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


_T5_ACTS = {"gelu_new": gelu_new, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu,
            "relu": F.relu, "silu": F.silu}


def relative_position_bucket(rel, num_buckets=32, max_distance=128):
    """Bidirectional T5 bucket of key-minus-query offsets: exact near 0, log-spaced up to max_distance."""
    half = num_buckets // 2                                       # one half per sign; rel > 0 adds `half`
    exact = half // 2
    n = rel.abs()
    log_bucket = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                          * (half - exact)).long()                 # float -> long truncates toward zero
    return (rel > 0).long() * half + torch.where(n < exact, n, log_bucket.clamp(max=half - 1))


class T5LayerNorm(nn.Module):
    """RMSNorm without mean subtraction or bias; the variance is computed in fp32."""
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5Attention(nn.Module):
    """Multi-head self-attention without 1/sqrt(d) scaling; block 0 also owns the relative-position table."""
    def __init__(self, d_model, num_heads, d_kv, has_relative_bias, num_buckets, max_distance):
        super().__init__()
        self.num_heads, self.num_buckets, self.max_distance = num_heads, num_buckets, max_distance
        self.q, self.k, self.v = (nn.Linear(d_model, num_heads * d_kv, bias=False) for _ in range(3))
        self.o = nn.Linear(num_heads * d_kv, d_model, bias=False)
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(num_buckets, num_heads)

    def position_bias(self, length):
        """Relative position bias (1, heads, L, L), computed once and shared by every layer."""
        pos = torch.arange(length, device=self.relative_attention_bias.weight.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance)  # (L, L)
        return rearrange(self.relative_attention_bias(buckets), "q k h -> 1 h q k")

    def forward(self, x, bias):
        q, k, v = (rearrange(f(x), "b l (h d) -> b h l d", h=self.num_heads) for f in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2)                          # (B, H, L, L), no scaling
        scores += bias
        attn = F.softmax(scores.float(), dim=-1).type_as(scores)  # softmax in fp32
        return self.o(rearrange(attn @ v, "b h l d -> b l (h d)"))


class T5DenseGatedAct(nn.Module):
    """Gated feed-forward: wo(act(wi_0 x) * wi_1 x)."""
    def __init__(self, d_model, d_ff, act):
        super().__init__()
        self.act = _T5_ACTS[act]
        self.wi_0 = nn.Linear(d_model, d_ff, bias=False)
        self.wi_1 = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        h = self.act(self.wi_0(x)) * self.wi_1(x)
        return self.wo(h.to(self.wo.weight.dtype))                # wo stays fp32 in fp16 models


class T5SubLayer(nn.Module):
    """Pre-norm residual wrapper; `name` gives the transformers key (SelfAttention or DenseReluDense)."""
    def __init__(self, name, inner, d_model, eps):
        super().__init__()
        self.name = name
        self.add_module(name, inner)
        self.layer_norm = T5LayerNorm(d_model, eps)

    def forward(self, x, *args):
        x = x + getattr(self, self.name)(self.layer_norm(x), *args)
        if x.dtype == torch.float16:                              # clamp away from inf, as transformers does
            big = torch.finfo(torch.float16).max - (1000 if torch.isinf(x).any() else 0)
            x = x.clamp(-big, big)
        return x


class T5Block(nn.Module):
    """One encoder layer: `layer.0` self-attention, `layer.1` feed-forward."""
    def __init__(self, d_model, d_kv, d_ff, num_heads, num_buckets, max_distance, eps, act, has_relative_bias):
        super().__init__()
        attn = T5Attention(d_model, num_heads, d_kv, has_relative_bias, num_buckets, max_distance)
        self.layer = nn.ModuleList([T5SubLayer("SelfAttention", attn, d_model, eps),
                                    T5SubLayer("DenseReluDense", T5DenseGatedAct(d_model, d_ff, act), d_model, eps)])

    def forward(self, x, bias):
        return self.layer[1](self.layer[0](x, bias))


class T5Encoder(nn.Module):
    """T5 v1.1 encoder: token ids (B, L) and attention mask (B, L) -> last hidden states (B, L, d_model)."""
    def __init__(self, config):
        super().__init__()
        c = self.config = config
        self.shared = nn.Embedding(c.vocab_size, c.d_model)
        self.encoder = nn.Module()                                # transformers names: encoder.{embed_tokens,block,...}
        self.encoder.embed_tokens = self.shared                   # tied: one module under two names
        self.encoder.block = nn.ModuleList(
            T5Block(c.d_model, c.d_kv, c.d_ff, c.num_heads, c.relative_attention_num_buckets,
                    c.relative_attention_max_distance, c.layer_norm_epsilon, c.dense_act_fn, has_relative_bias=i == 0)
            for i in range(c.num_layers))
        self.encoder.final_layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)

    def forward(self, input_ids, attention_mask=None):
        x = self.shared(input_ids)                                # (B, L, d); no scaling, no absolute positions
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(input_ids.shape[1])  # (1, H, L, L)
        if attention_mask is not None:                            # padded keys get finfo.min added
            keep = attention_mask[:, None, None, :].to(x.dtype)   # (B, 1, 1, L)
            bias = bias + (1.0 - keep) * torch.finfo(x.dtype).min  # (B, H, L, L)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


#################################################################################
#                          T5 tokenizer (sentencepiece)                         #
#################################################################################

class T5Tokenizer:
    """T5 tokenizer on `spiece.model`, equal to transformers' T5Tokenizer called with max_length, padding="max_length",
    truncation=True. Special-token strings in the text (<pad>, </s>, <unk>, <extra_id_N>) map to their ids; the rest
    goes through sentencepiece, one piece of text between special tokens at a time. legacy=False reproduces
    transformers' newer handling of text right after a special token (no "▁" prefix); plain prompts are unaffected."""
    def __init__(self, spiece_path, max_length=120, extra_ids=100, legacy=True, add_prefix_space=True,
                 pad_token="<pad>", eos_token="</s>", unk_token="<unk>", added_tokens=None):
        import sentencepiece
        if not os.path.isfile(spiece_path):
            raise FileNotFoundError(f"no tokenizer model {spiece_path!r}: the T5 tokenizer needs spiece.model; "
                                    "download it (with tokenizer_config.json) into the pipeline's tokenizer/ folder, "
                                    "or next to the T5 config.json")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=spiece_path)
        self.max_length, self.legacy, self.add_prefix_space = max_length, legacy, add_prefix_space
        self.unk_token = unk_token
        self.pad_id, self.eos_id, n = self.sp.piece_to_id(pad_token), self.sp.piece_to_id(eos_token), len(self.sp)
        self.specials = {t: (self.sp.piece_to_id(t), False, False) for t in (pad_token, eos_token, unk_token)}
        self.specials.update({f"<extra_id_{i}>": (n - 1 + extra_ids - i, True, True) for i in range(extra_ids)})
        self.specials.update(added_tokens or {})                  # content -> (id, lstrip, rstrip)
        longest_first = sorted(self.specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")
        if not legacy:                                            # a copy of the model without the "▁" prefix
            from sentencepiece import sentencepiece_model_pb2    # needs protobuf
            proto = sentencepiece_model_pb2.ModelProto.FromString(self.sp.serialized_model_proto())
            proto.normalizer_spec.add_dummy_prefix = False
            self.sp_raw = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())

    @classmethod
    def from_folder(cls, folder, max_length=120):
        """Read spiece.model and the optional tokenizer_config.json / added_tokens.json of a tokenizer folder."""
        def read(name):
            return read_json(os.path.join(folder, name)) if os.path.isfile(os.path.join(folder, name)) else {}
        cfg = read("tokenizer_config.json")
        added = {content: (i, False, False) for content, i in read("added_tokens.json").items()}
        added.update({t["content"]: (int(i), t.get("lstrip", False), t.get("rstrip", False))
                      for i, t in cfg.get("added_tokens_decoder", {}).items()})
        names = {k: (v["content"] if isinstance(v, dict) else v) for k, v in cfg.items()
                 if k in ("pad_token", "eos_token", "unk_token") and v is not None}
        return cls(os.path.join(folder, "spiece.model"), max_length, cfg.get("extra_ids", 100),
                   cfg.get("legacy") is not False, cfg.get("add_prefix_space", True), added_tokens=added, **names)

    def _encode_text(self, text):
        """sentencepiece ids of text without special tokens."""
        if self.legacy:
            return self.sp.encode(text)
        if not text.startswith(("▁", " ")):
            return self.sp_raw.encode(text)
        n_unk = len(self.sp_raw.encode(self.unk_token))           # keep the leading "▁": encode "<unk>" + text
        return self.sp_raw.encode(self.unk_token + text)[n_unk:]

    def encode_one(self, text):
        """Token ids of one prompt: at most max_length - 1 ids, then </s> unless already last."""
        if not self.legacy and text:
            text = "▁" * self.add_prefix_space + text.replace("▁", " ")
        parts = self._split.split(text)                           # odd entries are special-token strings
        for i in range(1, len(parts), 2):                         # extra ids swallow the whitespace around them
            _, lstrip, rstrip = self.specials[parts[i]]
            parts[i - 1] = parts[i - 1].rstrip() if lstrip else parts[i - 1]
            parts[i + 1] = parts[i + 1].lstrip() if rstrip else parts[i + 1]
        ids = [[self.specials[p][0]] if i % 2 else self._encode_text(p) if p else [] for i, p in enumerate(parts)]
        if not self.legacy and ids[0] == [self.sp.piece_to_id("▁")] and len(parts) > 1:
            ids[0] = []                                           # lone prefix before a leading special token
        ids = sum(ids, [])[:self.max_length - 1]
        return ids if ids and ids[-1] == self.eos_id else ids + [self.eos_id]

    def __call__(self, prompts):
        """prompts (str or list of B str) -> input_ids (B, max_length) long, attention_mask (B, max_length) long."""
        rows = [self.encode_one(p) for p in ([prompts] if isinstance(prompts, str) else prompts)]
        ids = torch.full((len(rows), self.max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), self.max_length, dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, :len(row)], mask[b, :len(row)] = torch.tensor(row), 1
        return ids, mask


#################################################################################
#                          Loader                                               #
#################################################################################

def load_t5(path, dtype=None, max_length=120):
    """Load (tokenizer, encoder) from a diffusers pipeline folder (text_encoder/ + tokenizer/) or a folder holding
    a transformers T5 config.json, its (possibly sharded) weights and spiece.model. fp16 keeps `wo` in fp32."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"T5 folder {path!r} does not exist; pass the diffusers pipeline folder (with "
                                "text_encoder/ and tokenizer/) or a folder with config.json, weights and spiece.model")
    if os.path.isdir(os.path.join(path, "text_encoder")):
        enc_dir, tok_dir = os.path.join(path, "text_encoder"), os.path.join(path, "tokenizer")
    elif os.path.isfile(os.path.join(path, "config.json")):
        enc_dir = tok_dir = path
    else:
        raise FileNotFoundError(f"{path!r} has neither a text_encoder/ sub-folder nor a config.json: unknown layout. "
                                "Pass the diffusers pipeline folder or the T5 folder itself (e.g. t5-v1_1-xxl/)")
    if not os.path.isfile(os.path.join(enc_dir, "config.json")):
        raise FileNotFoundError(f"no config.json in {enc_dir!r}: the T5 encoder config is needed to build the model")
    tokenizer = T5Tokenizer.from_folder(tok_dir, max_length)    # raises first if spiece.model is missing
    config = T5Config.from_json(os.path.join(enc_dir, "config.json"))
    sd = {k: v for k, v in read_state_dict(enc_dir).items() if not k.startswith(("decoder.", "lm_head."))}
    emb = sd.get("shared.weight", sd.get("encoder.embed_tokens.weight"))  # tied: files may hold either or both
    if emb is not None:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"] = emb
    keep = (".DenseReluDense.wo.",) if dtype == torch.float16 else ()
    encoder = build_and_load(lambda: T5Encoder(config), sd, f"T5 encoder in {enc_dir!r}", dtype, keep)
    return tokenizer, encoder
