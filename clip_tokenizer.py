"""The CLIP tokenizer (byte-level BPE), hand-written: `CLIPTokenizer` on a vocab.json + merges.txt folder or on CLIP's
merges file (`BPE_FILE`, shipped with this repository, for checkpoints that hold no tokenizer).

Two text clean-ups, one per reference: transformers' slow `CLIPTokenizer` without ftfy (the default; SD1.5 / SDXL
pipelines, transformers CLIP folders) and open_clip's `SimpleTokenizer` (`CLIPTokenizer.open_clip()`: OpenCLIP and
HPS checkpoints), which differ in the clean-up, the pad id and which strings are special (see the class).
"""
import gzip
import html
import os
import re
import unicodedata

import torch

from models import read_json

#################################################################################
#                          CLIP tokenizer (byte-level BPE)                      #
#################################################################################

def merge_pair(parts, pair):
    """parts with every occurrence of the adjacent pair merged into one symbol, left to right."""
    merged, i = [], 0
    while i < len(parts):
        if i < len(parts) - 1 and (parts[i], parts[i + 1]) == pair:
            merged.append(parts[i] + parts[i + 1])
            i += 2
        else:
            merged.append(parts[i])
            i += 1
    return merged


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
_OPEN_CLIP_SPECIALS = ("<start_of_text>", "<end_of_text>")       # open_clip >= 2.0 (and HPSv2's copy) names them so


def _char_class(ch):
    """'L' letter, 'N' number (Unicode categories L*, N*), ' ' whitespace, 'O' anything else."""
    cat = unicodedata.category(ch)[0]
    return cat if cat in "LN" else " " if ch.isspace() else "O"


def pre_tokenize(text, specials=_SPECIALS):
    """CLIP's split pattern
    `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+` (IGNORECASE),
    written as a scan over unicodedata categories: exact \\p{L} / \\p{N} without the `regex` module
    (plain `re` has no Unicode category classes: [^\\W\\d_] would also take No/Nl numbers such as '²' as letters)."""
    words, i, n = [], 0, len(text)
    while i < n:
        lower = text[i:i + 3].lower().replace("ſ", "s")            # IGNORECASE: regex case-folds "ſ" to "s"
        hit = next((s for s in specials if text.startswith(s, i)), None) or \
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


# The parts of ftfy.fix_text (6.x defaults) that open_clip's clean-up runs and that need no statistics: its Latin
# ligatures, half/full-width forms (and U+3000) -> standard width, curly quotes -> straight, control characters dropped.
_FTFY_LIGATURES = dict(zip("ĲĳŉǱǲǳǄǅǆǇǈǉǊǋǌﬀﬁﬂﬃﬄﬅﬆ", ("IJ", "ij", "ʼn", "DZ", "Dz", "dz", "DŽ", "Dž", "dž", "LJ", "Lj",
                                                        "lj", "NJ", "Nj", "nj", "ff", "fi", "fl", "ffi", "ffl", "ſt",
                                                        "st")))
_FTFY_TABLE = {**{ord(a): b for a, b in _FTFY_LIGATURES.items()},
               **{i: unicodedata.normalize("NFKC", chr(i)) for i in range(0xFF01, 0xFFF0)
                  if unicodedata.normalize("NFKC", chr(i)) != chr(i)}, 0x3000: " ",
               **{i: "'" for i in (0x2BC, 0x2018, 0x2019, 0x201A, 0x201B)}, **{i: '"' for i in range(0x201C, 0x2020)},
               **{i: None for i in [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070),
                                    0xFEFF, *range(0xFFF9, 0xFFFD)]}}


def open_clip_clean(text):
    """open_clip's SimpleTokenizer clean-up (clean='lower', as HPSv2's copy): ftfy.fix_text, html.unescape twice,
    whitespace runs -> " ", strip, lower-case. ftfy is not a dependency: its table fixes (_FTFY_TABLE) and NFC are
    applied, its mojibake repair (text decoded with the wrong codec) and terminal-escape removal are not."""
    text = unicodedata.normalize("NFC", text.translate(_FTFY_TABLE))
    return " ".join(html.unescape(html.unescape(text)).split()).lower()


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
    id 0 (transformers' quirk, which differs from open_clip's tokenizer on "!!").

    `CLIPTokenizer.open_clip()` is open_clip's SimpleTokenizer instead (OpenCLIP and HPS checkpoints): the same BPE
    and truncation, open_clip's clean-up (open_clip_clean) and pad id 0 with "!" an ordinary token. A prompt holding
    the literal text of a special token is read as open_clip does ("<end_of_text>" special, "<|endoftext|>" text)."""
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
        self.clean, self.words = basic_clean, _SPECIALS           # words: special strings the BPE maps to one id
        self.cache = {s: [s] for s in self.words}

    @classmethod
    def open_clip(cls, path=None, max_length=77):
        """open_clip's tokenizer (`open_clip.get_tokenizer('ViT-H-14')`, HPSv2's `get_tokenizer`) from CLIP's merges
        file (default: this repository's copy, which is open_clip's): [SOT] + ids + [EOT], zeros after, truncated to
        max_length with EOT kept last."""
        t = cls.from_bpe_file(path, max_length=max_length)
        t.pad_id, t.clean = 0, open_clip_clean                     # id 0 ("!") pads without becoming special
        t.words, t.specials = _OPEN_CLIP_SPECIALS, {}               # open_clip's names; nothing split out before BPE
        t.vocab = {**t.vocab, **dict(zip(t.words, (t.bos_id, t.eos_id)))}
        t.cache, t._split = {s: [s] for s in t.words}, re.compile("(?!)")
        return t

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
            parts = merge_pair(parts, best)
        self.cache[word] = parts
        return parts

    def _encode_text(self, text):
        """ids of text holding no special token."""
        ids = []
        for word in pre_tokenize(self.clean(text), self.words):
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
