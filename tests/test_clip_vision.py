"""clip.py's image side: the vision tower, whole CLIP models (transformers and open_clip layouts, HPS checkpoints),
open_clip's tokenizer, the image preprocessing and the LAION aesthetic predictor, against their references.

References: transformers (CLIPVisionModelWithProjection, CLIPModel, CLIPImageProcessor, CLIPTokenizer); the
published aesthetic MLP (fixtures.PublishedAestheticMLP); open_clip itself (CLIP, its tokenizer, image_transform) and
torchvision where installed. Everything is tiny and written here; real sizes are checked on the meta device or from
files whose values are one shared zero.

open_clip is not in requirements-test.txt: it needs torchvision, whose PyPI wheels are CUDA builds pinned to one
torch (0.28.0: torch==2.13.0). Beside a CPU torch their ops do not load and `import torchvision` fails, which breaks
transformers' models for the whole suite (see _torchvision_without_its_ops); and on a GPU machine the pin would
replace the user's torch. Without it, the open_clip tests skip and the open_clip layout is checked through
fixtures.write_tiny_open_clip (an independent key mapping) against transformers. To run them against open_clip
itself: pip install open_clip_torch==3.3.0 torchvision==0.28.0, then pytest tests/test_clip_vision.py alone.
"""
import glob
import importlib.util
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import clip
import clip_image
from clip import (CLIPModel, CLIPVisionConfig, CLIPVisionModel, clip_vit_l14_vision_config, load_clip_model,
                  load_clip_vision, open_clip_vit_h14_text_config, open_clip_vit_h14_vision_config)
from clip_image import AestheticMLP, clip_preprocess, hps_preprocess, load_aesthetic
from clip_tokenizer import CLIPTokenizer
from fixtures import (CLIP_PROMPTS, TINY_OPEN_CLIP_CONFIG, PublishedAestheticMLP, clip_model_to_open_clip, randomize,
                      tiny_clip_model_config, write_bpe_tokenizer, write_tiny_aesthetic, write_tiny_clip_model,
                      write_tiny_open_clip)

transformers.logging.set_verbosity_error()
TOL = 1e-5                                                   # fp32 parity bound of every network comparison here
_TORCHVISION_OPS = []                                        # keeps the op schemas below alive


def _torchvision_without_its_ops():
    """PyPI's torchvision wheels are CUDA builds: beside a CPU torch their C++ ops do not load (libc10_cuda.so is
    missing), and torchvision 0.28 then fails at import while registering fake kernels of two ops that library would
    have defined (torchvision::nms, ::qnms); transformers' models import it (image_utils), so they fail too. Defining
    those two schemas first lets it import: open_clip uses torchvision only for its image transforms (PIL, pure
    Python), nothing here calls the ops. Does nothing where torchvision is absent, already imported, or whole."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or "torchvision" in sys.modules or _TORCHVISION_OPS:
        return
    try:
        torch.ops.load_library(glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so"))[0])
    except (OSError, IndexError):
        lib = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_OPS.append(lib)


_torchvision_without_its_ops()


def open_clip_or_skip():
    """open_clip, or skip where it is not installed (see the module docstring)."""
    if importlib.util.find_spec("torchvision") is None or importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip not installed: pip install open_clip_torch==3.3.0 torchvision==0.28.0 "
                    "(see tests/test_clip_vision.py's docstring)")
    import open_clip
    return open_clip


def pixels(n=3, size=224, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def check(name, ours, ref):
    diff = (ours - ref).abs().max().item()
    print(f"{name}: max|diff| {diff:.2e}, max|ref| {ref.abs().max():.2f}")
    assert ours.shape == ref.shape and diff <= TOL, name


#################################################################################
#                          transformers layouts                                 #
#################################################################################

@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    """{act: (folder, transformers CLIPModel)}: quick_gelu with the legacy eos 2 (OpenAI ViT-L/14's config), exact gelu
    with eos = the <|endoftext|> id (first-EOS pooling)."""
    root = tmp_path_factory.mktemp("hf_clip")
    return {act: (str(root / act), write_tiny_clip_model(root / act, act, eos, seed=i))
            for i, (act, eos) in enumerate((("quick_gelu", 2), ("gelu", None)))}


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_vision_tower_parity_with_transformers(hf_clip, act, tmp_path):
    """load_clip_vision on a CLIPVisionModelWithProjection folder and on a CLIPModel folder = transformers'
    image_embeds (and the tower's last_hidden_state / pooler_output)."""
    folder, full = hf_clip[act]
    config = transformers.CLIPVisionConfig(**{**full.config.vision_config.to_dict(), "projection_dim": 24})
    ref = transformers.CLIPVisionModelWithProjection(config).eval()
    ref.vision_model.load_state_dict(full.vision_model.state_dict())
    ref.visual_projection.load_state_dict(full.visual_projection.state_dict())
    ref.save_pretrained(tmp_path / "vision")
    x = pixels()
    with torch.no_grad():
        want = ref(pixel_values=x)
        for path in (str(tmp_path / "vision"), folder):
            tower = load_clip_vision(path)
            assert isinstance(tower, CLIPVisionModel) and not tower.training
            assert not any(p.requires_grad for p in tower.parameters())
            got = tower(x)
            check(f"{act} vision image_embeds", got["image_embeds"], want.image_embeds)
            check(f"{act} vision last_hidden_state", got["last_hidden_state"], want.last_hidden_state)
    assert set(tower.state_dict()) == set(ref.state_dict()) - {"vision_model.embeddings.position_ids"}


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_model_parity_with_transformers(hf_clip, act):
    """load_clip_model on a CLIPModel folder: its tokenizer gives transformers' ids, encode_image / encode_text give
    CLIPModel's image and text features; logit_scale and projection_dim carried over."""
    folder, ref = hf_clip[act]
    model = load_clip_model(folder)
    assert isinstance(model, CLIPModel) and model.projection_dim == 24 and not model.training
    prompts = [p for p in CLIP_PROMPTS if p.isascii() and p.isprintable()]
    ids = model.tokenizer(prompts)
    ref_tok = transformers.CLIPTokenizer.from_pretrained(folder)
    assert torch.equal(ids, ref_tok(prompts, padding="max_length", max_length=77, truncation=True,
                                    return_tensors="pt").input_ids)
    with torch.no_grad():
        image, text = ref.get_image_features(pixel_values=pixels()), ref.get_text_features(input_ids=ids)
        image = image if torch.is_tensor(image) else image.pooler_output            # transformers 5: an output
        text = text if torch.is_tensor(text) else text.pooler_output
        check(f"{act} CLIPModel image_embeds", model.encode_image(pixels()), image)
        check(f"{act} CLIPModel text_embeds", model.encode_text(ids), text)
    assert model.logit_scale.item() == ref.logit_scale.item()
    assert set(model.state_dict()) == set(ref.state_dict()) - {"text_model.embeddings.position_ids",
                                                               "vision_model.embeddings.position_ids"}
    half = load_clip_model(folder, dtype=torch.float16)
    assert half.visual_projection.weight.dtype == torch.float16
    assert half.encode_image(pixels(1)).dtype == torch.float16               # fp32 pixels cast to the weights'


def test_clip_model_folder_with_open_clip_files_beside(hf_clip, tmp_path):
    """laion's hub repositories hold transformers' model.safetensors / pytorch_model.bin and open_clip's files in one
    folder: the folder loads transformers' weights."""
    folder, ref = hf_clip["gelu"]
    shutil.copytree(folder, tmp_path / "laion")
    ref.save_pretrained(tmp_path / "laion", safe_serialization=False)      # pytorch_model.bin too
    write_tiny_open_clip(tmp_path / "laion" / "open_clip_model.safetensors", seed=5)
    model = load_clip_model(tmp_path / "laion")
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())


def test_clip_configs_of_old_and_vision_only_files():
    """openai/clip-vit-large-patch14's config.json holds text_config_dict / vision_config_dict, which win over
    text_config / vision_config (as in transformers); the top-level projection_dim is both towers'."""
    raw = {"model_type": "clip", "projection_dim": 768, "text_config": {"hidden_size": 512},
           "text_config_dict": {"hidden_size": 768, "num_attention_heads": 12}, "vision_config": {},
           "vision_config_dict": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                                  "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 512}}
    text, vision = clip.clip_configs(raw, "config.json")
    ref = transformers.CLIPConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    assert (text.hidden_size, vision.hidden_size) == (ref.text_config.hidden_size, ref.vision_config.hidden_size)
    assert (text.hidden_size, vision.hidden_size, vision.patch_size) == (768, 1024, 14)
    assert vision == clip_vit_l14_vision_config() and text.projection_dim == 768
    assert clip.clip_configs({"model_type": "clip_vision_model", "patch_size": 14}, "c")[0] is None


#################################################################################
#                          open_clip layouts                                    #
#################################################################################

def test_open_clip_files_load_as_the_transformers_model(tmp_path):
    """open_clip_pytorch_model.bin / .safetensors and an HPS checkpoint ({'state_dict': ...}), written from a
    transformers CLIPModel by the fixtures' own mapping, give its image and text features (open_clip itself: the
    next test); the tokenizer is open_clip's (pad 0)."""
    for name, hps in (("open_clip_pytorch_model.bin", False), ("open_clip_model.safetensors", False),
                      ("HPS_v2.1_compressed.pt", True)):
        path = tmp_path / name.split(".")[0] / name
        ref = write_tiny_open_clip(path, hps=hps)
        model = load_clip_model(path)
        ids = model.tokenizer(CLIP_PROMPTS)
        assert ids[0].tolist()[:3] == [49406, 49407, 0] and model.tokenizer.pad_id == 0
        with torch.no_grad():
            check(f"{name} image_embeds", model.encode_image(pixels()), ref.get_image_features(pixel_values=pixels()))
            check(f"{name} text_embeds", model.encode_text(ids), ref.get_text_features(input_ids=ids))
            check(f"{name} vision tower", load_clip_vision(path)(pixels())["image_embeds"],
                  ref.get_image_features(pixel_values=pixels()))
        assert model.logit_scale.item() == ref.logit_scale.item()


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_open_clip_parity(quick_gelu, tmp_path):
    """Against open_clip itself: a random open_clip CLIP (plain ViT, the ViT-H/14 design at tiny size) saved as
    open_clip_pytorch_model.bin with its open_clip_config.json, and as an HPS checkpoint: our encode_image /
    encode_text = open_clip's, our tokenizer = open_clip.get_tokenizer('ViT-H-14'). The fixtures' writer produces
    exactly open_clip's keys (a strict load into open_clip)."""
    open_clip = open_clip_or_skip()
    cfg = dict(TINY_OPEN_CLIP_CONFIG, quick_gelu=quick_gelu)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ref = randomize(open_clip.CLIP(**cfg), 0, std=0.3, around_init=True)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    torch.save(ref.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "HPS_v2_compressed.pt")
    tokenizer = open_clip.get_tokenizer("ViT-H-14")
    ids = tokenizer(CLIP_PROMPTS)
    with torch.no_grad():
        image, text = ref.encode_image(pixels()), ref.encode_text(ids)
        for name in ("open_clip_pytorch_model.bin", "HPS_v2_compressed.pt"):
            model = load_clip_model(tmp_path / name)
            assert torch.equal(model.tokenizer(CLIP_PROMPTS), ids)
            check(f"open_clip quick_gelu={quick_gelu} {name} image", model.encode_image(pixels()), image)
            check(f"open_clip quick_gelu={quick_gelu} {name} text", model.encode_text(ids), text)
            assert model.logit_scale.item() == ref.logit_scale.item()
    if not quick_gelu:                                       # the fixtures' writer: exactly open_clip's keys
        hf = transformers.CLIPModel(tiny_clip_model_config(49408, "gelu"))
        open_clip.CLIP(**cfg).load_state_dict(clip_model_to_open_clip(hf.state_dict()), strict=True)


def _open_clip_skeleton(path, shapes):
    """A torch.save'd HPS-style checkpoint holding `shapes` as stride-0 views of one zero (a few KB)."""
    zero = torch.zeros((), dtype=torch.float16)
    torch.save({"state_dict": {k: zero.expand(s) for k, s in shapes.items()}}, path)


def test_vit_h14_is_known_by_its_shapes(tmp_path):
    """A file with every key of OpenCLIP ViT-H/14 at its real shape and no open_clip_config.json (as HPS checkpoints
    come) loads with the release configs; the shapes are open_clip's own ViT-H-14 (on the meta device) where open_clip
    is installed, else the fixtures' mapping of transformers' CLIPModel at that size. One layer fewer: a clear error."""
    text, vision = open_clip_vit_h14_text_config(), open_clip_vit_h14_vision_config()
    try:
        open_clip = open_clip_or_skip()
        with torch.device("meta"):
            sd = open_clip.CLIP(**open_clip.get_model_config("ViT-H-14")).state_dict()
    except pytest.skip.Exception:
        config = transformers.CLIPConfig(text_config=dict(vars(text), model_type="clip_text_model"),
                                         vision_config=dict(vars(vision)), projection_dim=1024)
        with torch.device("meta"):
            sd = clip_model_to_open_clip(transformers.CLIPModel(config).state_dict())
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert sum(np.prod(s) for s in shapes.values()) == 986_109_441
    _open_clip_skeleton(tmp_path / "HPS_v2.1_compressed.pt", shapes)
    model = load_clip_model(tmp_path / "HPS_v2.1_compressed.pt")
    assert (model.text_config, model.vision_config) == (text, vision)
    assert load_clip_vision(tmp_path / "HPS_v2.1_compressed.pt").config == vision
    shapes = {k: s for k, s in shapes.items() if ".resblocks.31." not in k or not k.startswith("visual.")}
    _open_clip_skeleton(tmp_path / "other.pt", shapes)
    with pytest.raises(ValueError, match=r"open_clip model with vision width 1280, 31 layers and text width 1024, "
                                         r"24 layers: not an architecture known by its shapes \(ViT-H-14\); put the "
                                         r"model's open_clip_config.json"):
        load_clip_model(tmp_path / "other.pt")


def test_release_vision_configs_have_the_transformers_shapes():
    """clip_vit_l14_vision_config = openai/clip-vit-large-patch14's vision tower (transformers'
    CLIPVisionModelWithProjection keys and shapes; its config.json round trip); ViT-H/14: the checks above."""
    for factory, n in ((clip_vit_l14_vision_config, 303_966_208), (open_clip_vit_h14_vision_config, 632_076_800)):
        config = factory()
        ref_config = transformers.CLIPVisionConfig(**vars(config))
        assert CLIPVisionConfig.from_json(ref_config.to_dict()) == config
        with torch.device("meta"):
            ours = CLIPVisionModel(config).state_dict()
            theirs = transformers.CLIPVisionModelWithProjection(ref_config).state_dict()
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()
                                                         if k != "vision_model.embeddings.position_ids"}
        assert sum(v.numel() for v in ours.values()) == n


#################################################################################
#                          open_clip's tokenizer                                #
#################################################################################

OPEN_CLIP_EXTRA = ["wow!! hello!!!", "Ｈｅｌｌｏ “quoted” ‘single’ ﬁne &amp;amp; &lt;tag&gt; x\x01y", "it’s a ‘test’ — ok…",
                   "ÆON Straße İstanbul ΣΑΣ", "日本語のテキスト ｶﾀｶﾅ", "a <start_of_text> b <END_OF_TEXT>c"]


def test_open_clip_tokenizer():
    """CLIPTokenizer.open_clip(): SOT, ids, EOT, zeros; truncated to 77 with EOT last; "!" an ordinary token (no
    SDXL tokenizer_2 quirk); open_clip's clean-up (html entities, width, quotes, ligatures; not transformers' CJK
    split); its special names <start_of_text> / <end_of_text>. Equal to open_clip's SimpleTokenizer where installed."""
    tok = CLIPTokenizer.open_clip()
    v = tok.vocab
    assert tok.encode_one("wow!!") == [49406, v["wow</w>"], v["!!</w>"], 49407]
    ids = tok(CLIP_PROMPTS + OPEN_CLIP_EXTRA)
    long_row = ids[CLIP_PROMPTS.index(max(CLIP_PROMPTS, key=len))]
    assert long_row[0] == 49406 and long_row[76] == 49407 and (long_row[1:76] != 0).all()
    assert ids[0].tolist() == [49406, 49407] + [0] * 75
    assert tok.encode_one("a &amp; b") == tok.encode_one("a & b") and tok.encode_one("ﬁne") == tok.encode_one("fine")
    assert tok.encode_one("x <end_of_text>") == [49406, v["x</w>"], 49407, 49407]
    assert len(tok.encode_one("<|endoftext|>")) > 3                       # not special for open_clip
    open_clip = open_clip_or_skip()
    assert torch.equal(ids, open_clip.get_tokenizer("ViT-H-14")(CLIP_PROMPTS + OPEN_CLIP_EXTRA))


#################################################################################
#                          Image preprocessing                                  #
#################################################################################

# (W, H): squares, odd sizes whose resized long side exceeds 224 by 3 or 7 (3 mod 4: the references' crops differ)
# or by 1 (they agree), up- and down-sampling, other modes
SIZES = [(224, 224), (512, 512), (224, 227), (227, 224), (231, 224), (225, 224), (300, 227), (640, 481), (100, 57),
         (57, 101), (1024, 768)]


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    out = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]
    return out + [out[7].convert("RGBA"), out[8].convert("L")]


def test_preprocess_matches_transformers(images):
    """crop='transformers' = CLIPImageProcessor() (OpenAI's preprocessor_config: shortest edge 224 bicubic, centre
    crop 224, mean/std) on every image, to 1e-6 (exactly equal here)."""
    proc = transformers.CLIPImageProcessor()
    for im in images:
        check(f"preprocess {im.size} {im.mode} vs transformers", clip_preprocess([im], crop="transformers"),
              proc(im, return_tensors="pt").pixel_values)
        assert (clip_preprocess([im], crop="transformers") - proc(im, return_tensors="pt").pixel_values).abs().max() \
            <= 1e-6


def test_preprocess_crop_rounding_and_tensors(images):
    """The two crops agree unless the excess is 3 mod 4, where torchvision's is one pixel lower (round(1.5) = 2 vs
    1); a (B, 3, H, W) tensor in [0, 1] is preprocessed as its rounded uint8 image."""
    for im, (w, h) in zip(images, SIZES):
        a, b = clip_preprocess(im), clip_preprocess(im, crop="transformers")
        excess = int(224 * max(w, h) / min(w, h)) - 224
        assert torch.equal(a, b) == (excess % 4 != 3), (w, h)
    a, b = clip_preprocess(images[2]), clip_preprocess(images[2], crop="transformers")   # 224 x 227: excess 3
    assert torch.equal(a[..., :-1, :], b[..., 1:, :])
    x = torch.rand(2, 3, 300, 227, generator=torch.Generator().manual_seed(0))
    as_png = [Image.fromarray((t.permute(1, 2, 0) * 255).round().byte().numpy()) for t in x]
    assert torch.equal(clip_preprocess(x), clip_preprocess(as_png)) and clip_preprocess(x).shape == (2, 3, 224, 224)
    assert torch.equal(hps_preprocess(x), hps_preprocess(as_png))
    hps = hps_preprocess(images[6])[0]                 # 300 x 227 -> 224 x 169 (round(169.49)); 55 rows padded 27 / 28
    black = ((0 - torch.tensor(clip_image.CLIP_MEAN)) / torch.tensor(clip_image.CLIP_STD))[:, None, None]
    assert torch.equal(hps[:, :27], black.expand(3, 27, 224)) and torch.equal(hps[:, 196:], black.expand(3, 28, 224))
    assert not torch.equal(hps[:, 27], black[:, 0].expand(3, 224))
    assert not torch.equal(hps[:, 195], black[:, 0].expand(3, 224))
    with pytest.raises(ValueError, match="crop='center'"):
        clip_preprocess(x, crop="center")
    with pytest.raises(ValueError, match=r"a \(B, 3, H, W\) tensor in \[0, 1\] expected, got shape \(3, 8, 8\)"):
        clip_preprocess(x[0, :, :8, :8])


def test_preprocess_matches_open_clip_and_hpsv2(images):
    """clip_preprocess = open_clip.image_transform(224, is_train=False) (torchvision Resize + CenterCrop on PIL, as
    openai CLIP's and the aesthetic predictor's); hps_preprocess = HPSv2's transform (its open_clip copy,
    resize_longest_max=True: ToTensor, ResizeMaxSize(224) on the tensor, Normalize) written with torchvision's
    functions. Both to 1e-6 (exactly equal here)."""
    open_clip = open_clip_or_skip()
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode
    transform = open_clip.image_transform(224, is_train=False)

    def hpsv2(im, max_size=224):                                     # hpsv2/src/open_clip/transform.py, eval branch
        x = TF.to_tensor(im.convert("RGB"))
        h, w = x.shape[1:]
        scale = max_size / float(max(h, w))
        if scale != 1.0:
            new = tuple(round(d * scale) for d in (h, w))
            x = TF.resize(x, new, InterpolationMode.BICUBIC)
            ph, pw = max_size - new[0], max_size - new[1]
            x = TF.pad(x, padding=[pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0)
        return TF.normalize(x, clip_image.CLIP_MEAN, clip_image.CLIP_STD)
    for im in images:
        for name, ours, ref in (("open_clip", clip_preprocess(im), transform(im)),
                                ("HPSv2", hps_preprocess(im), hpsv2(im))):
            check(f"{name} preprocess {im.size} {im.mode}", ours, ref[None])
            assert (ours - ref[None]).abs().max() <= 1e-6


#################################################################################
#                          Aesthetic predictor                                  #
#################################################################################

def test_aesthetic_mlp_is_the_published_one(tmp_path):
    """Keys and shapes = the published MLP's at 768 (ViT-L/14); a file it saved loads (load_aesthetic) to the same
    function; the input size comes from the file."""
    ours, ref = AestheticMLP(), PublishedAestheticMLP(768)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert [type(m) for m in ours.layers] == [type(m) for m in ref.layers]
    ref = write_tiny_aesthetic(tmp_path / "sac+logos+ava1-l14-linearMSE.pth", input_size=768)
    model = load_aesthetic(tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = torch.nn.functional.normalize(torch.randn(4, 768), dim=-1)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x)) and model(x).shape == (4, 1)
    write_tiny_aesthetic(tmp_path / "tiny.pth")
    assert load_aesthetic(tmp_path / "tiny.pth", dtype=torch.float64).layers[0].weight.shape == (1024, 24)


#################################################################################
#                          Bad inputs                                           #
#################################################################################

def test_errors(hf_clip, tmp_path):
    folder = hf_clip["quick_gelu"][0]
    text_only = tmp_path / "text_only"                                # a CLIPTextModel folder
    full = hf_clip["quick_gelu"][1]
    text_model = transformers.CLIPTextModelWithProjection(full.config.text_config)
    text_model.save_pretrained(text_only)
    with pytest.raises(ValueError, match=r"is a CLIP text model \(config.json model_type 'clip_text_model'\): "
                                         r"load_clip_vision needs a CLIPModel folder .*; load_clip_text reads this"):
        load_clip_vision(text_only)
    with pytest.raises(ValueError, match=r"holds only a CLIP text tower: load_clip_model needs both"):
        load_clip_model(text_only)
    vision_only = tmp_path / "vision_only"                            # CLIPVisionModel: no projection
    transformers.CLIPVisionModel(full.config.vision_config).save_pretrained(vision_only)
    with pytest.raises(ValueError, match="holds no visual_projection.weight"):
        load_clip_vision(vision_only)
    with pytest.raises(ValueError, match=r"holds only a CLIP vision tower: .*load_clip_vision reads this one"):
        load_clip_model(vision_only)
    with pytest.raises(ValueError, match=r"holds a CLIP vision model .* load_clip_vision reads this one"):
        clip.load_clip_text(str(vision_only), tokenizer_path=folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_clip_model(tmp_path / "nowhere.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        load_clip_vision(tmp_path / "empty")
    weights = glob.glob(os.path.join(folder, "*.safetensors"))[0]     # a transformers file alone
    with pytest.raises(ValueError, match=r"not an open_clip CLIP checkpoint \(no visual.\* keys\): it holds a "
                                         r"transformers CLIP state dict; pass the folder"):
        load_clip_model(weights)
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "foo.pt")
    with pytest.raises(ValueError, match=r"keys like \['foo.weight'\]; expected open_clip_pytorch_model.bin"):
        load_clip_model(tmp_path / "foo.pt")
    write_tiny_open_clip(tmp_path / "oc" / "open_clip_pytorch_model.bin", config=False)   # tiny: unknown shapes
    with pytest.raises(ValueError, match=r"vision width 32, 2 layers and text width 32, 3 layers: not an architecture "
                                         r"known by its shapes"):
        load_clip_model(tmp_path / "oc" / "open_clip_pytorch_model.bin")
    (tmp_path / "oc" / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": dict(TINY_OPEN_CLIP_CONFIG, vision_cfg=dict(attentional_pool=True))}))
    with pytest.raises(ValueError, match=r"open_clip vision_cfg key\(s\) \['attentional_pool'\] are not implemented"):
        load_clip_model(tmp_path / "oc" / "open_clip_pytorch_model.bin")
    bad_tok = tmp_path / "small_vocab"                                # a 49,408-id tokenizer for a small vocabulary
    shutil.copytree(folder, bad_tok)
    with pytest.raises(ValueError, match=r"the tokenizer has 49408 ids but the text tower embeds \d+; pass the"):
        load_clip_model(bad_tok, tokenizer_path=write_bpe_tokenizer(tmp_path / "bpe"))
    for bad in (weights, tmp_path / "foo.pt"):                        # the aesthetic predictor expected
        with pytest.raises(ValueError, match=r"is not the LAION aesthetic predictor: expected the keys "
                                             r"layers.\{0,2,4,6,7\}.\{weight,bias\} .* found \d+ keys like"):
            load_aesthetic(bad)
    with pytest.raises(ValueError, match=r"images of 224x224 expected, got \(64, 64\); preprocess them with"):
        load_clip_vision(folder)(pixels(1, 64))
