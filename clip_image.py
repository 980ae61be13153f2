"""What the image metrics put around CLIP (clip.py): the image preprocessing exactly as the references do it (CLIP's
shortest-side bicubic resize and centre crop; HPSv2's longest-side resize and padding), and the LAION improved
aesthetic predictor, an MLP on the normalised CLIP ViT-L/14 image embedding.

    preprocessing (clip_preprocess, hps_preprocess) -> AestheticMLP -> load_aesthetic
"""
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import build_and_load, read_state_dict


#################################################################################
#                          Image preprocessing                                  #
#################################################################################

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)       # OpenAI's, used by every model here (open_clip's ViT-H too)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_pil_images(images):
    """A PIL image, a list of them, or a (B, 3, H, W) float tensor in [0, 1] -> a list of RGB PIL images; tensors
    are rounded to uint8 as sample.py saves PNGs, so a tensor scores as its saved file does."""
    from PIL import Image
    if torch.is_tensor(images):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: a (B, 3, H, W) tensor in [0, 1] expected, got shape {tuple(images.shape)}")
        arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arr]
    return [im.convert("RGB") for im in ([images] if isinstance(images, Image.Image) else images)]


def _normalise(arrays):
    """uint8 (H, W, 3) arrays -> (B, 3, H, W) float32: /255, then CLIP mean/std (as torchvision's ToTensor and
    Normalize)."""
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255)
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def clip_preprocess(images, size=224, crop="torchvision"):
    """CLIP's image preprocessing: images (see to_pil_images) -> pixel_values (B, 3, size, size) float32.

    The shortest side resized to `size` with PIL bicubic (the long side to int(size * long / short)), a centre crop
    of size x size, /255, CLIP mean/std. The references agree on all but the crop offset: top = round((H' - size) / 2)
    (Python rounding, half to even) in torchvision's CenterCrop, so in openai CLIP's and open_clip's preprocessing and
    the aesthetic predictor's (crop='torchvision'), floor((H' - size) / 2) in transformers' CLIPImageProcessor
    (crop='transformers'). They differ by one pixel when the excess H' - size is 3 mod 4; square images never differ."""
    from PIL import Image
    if crop not in ("torchvision", "transformers"):
        raise ValueError(f"crop={crop!r}: expected 'torchvision' (openai CLIP, open_clip) or 'transformers'")
    arrays = []
    for im in to_pil_images(images):
        w, h = im.size
        short, long = min(w, h), max(w, h)
        new = (size, int(size * long / short)) if w <= h else (int(size * long / short), size)   # (W, H)
        im = im.resize(new, Image.BICUBIC)
        offset = (lambda e: round(e / 2)) if crop == "torchvision" else (lambda e: e // 2)
        left, top = offset(new[0] - size), offset(new[1] - size)
        arrays.append(np.asarray(im.crop((left, top, left + size, top + size))))
    return _normalise(arrays)


def hps_preprocess(images, size=224):
    """HPSv2's own preprocessing (its open_clip copy's `image_transform(..., resize_longest_max=True)`, which
    img_score.py uses): the uint8 image to float, the LONGEST side resized to `size` on the float tensor (torchvision's
    bicubic with antialias, its default since 0.17; new sides round(side * scale)), zero-padded to size x size (split
    as pad // 2 before), CLIP mean/std. Not clip_preprocess: no crop, and a tensor resize, not PIL's. -> (B, 3, size,
    size)."""
    out = []
    for im in to_pil_images(images):
        x = torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div(255)                # (3, H, W)
        h, w = x.shape[1:]
        scale = size / max(h, w)
        if scale != 1:
            new = (round(h * scale), round(w * scale))
            x = F.interpolate(x[None], size=new, mode="bicubic", align_corners=False, antialias=True)[0]
            ph, pw = size - new[0], size - new[1]
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        out.append(x)
    x = torch.stack(out)
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


#################################################################################
#                          LAION aesthetic predictor                            #
#################################################################################

class AestheticMLP(nn.Module):
    """The LAION improved aesthetic predictor (christophschuhmann/improved-aesthetic-predictor, simple_inference.py's
    MLP; weights sac+logos+ava1-l14-linearMSE.pth): Linear 768 -> 1024 -> 128 -> 64 -> 16 -> 1 with no activation
    (its ReLUs are commented out) and dropout that acts in training only; keys layers.0, .2, .4, .6, .7.
    forward: the L2-NORMALISED CLIP ViT-L/14 image embedding (B, 768) -> score (B, 1), about 1 to 10."""
    def __init__(self, input_size=768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                                    nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16),
                                    nn.Linear(16, 1))

    def forward(self, image_embeds):
        return self.layers(image_embeds)


def load_aesthetic(path, dtype=None):
    """AestheticMLP from the predictor's .pth (a plain state dict; its input size from layers.0.weight). Frozen, in
    eval mode."""
    path = os.fspath(path)
    sd = read_state_dict(path)
    want = {f"layers.{i}.{k}" for i in (0, 2, 4, 6, 7) for k in ("weight", "bias")}
    if set(sd) != want:
        raise ValueError(f"{path!r} is not the LAION aesthetic predictor: expected the keys layers.{{0,2,4,6,7}}."
                         f"{{weight,bias}} (Linear 768 -> 1024 -> 128 -> 64 -> 16 -> 1), found {len(sd)} keys like "
                         f"{sorted(sd)[:3]}; pass sac+logos+ava1-l14-linearMSE.pth from "
                         "christophschuhmann/improved-aesthetic-predictor")
    return build_and_load(lambda: AestheticMLP(sd["layers.0.weight"].shape[1]), sd, f"aesthetic predictor {path!r}",
                          dtype)
