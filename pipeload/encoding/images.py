"""Images -> the pixel tensor a ViT takes, as the model's `preprocessor_config.json` says:
convert to RGB (transparency composited on white, as transformers does), resize, centre-crop,
rescale, normalise. Pillow does the decoding and resizing (the same calls as transformers' PIL
image processors, so the pixels agree with them)."""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ModelFileError, UnsupportedModelError

IMAGENET_STANDARD = (0.5, 0.5, 0.5)  # transformers' ViT default mean and std


def _pil():
    try:
        import PIL.Image
    except ImportError:
        raise UnsupportedModelError("image models need Pillow: pip install pillow") from None
    return PIL.Image


@dataclass(frozen=True)
class ImagePreprocessing:
    """The steps of preprocessor_config.json (keys as transformers names them).

    resize:   ("exact", height, width), ("shortest_edge", n, 0) or None
    crop:     (height, width) of a centre crop, or None
    resample: Pillow resampling filter code (2 bilinear, 3 bicubic, ...)
    """

    resize: tuple[str, int, int] | None
    crop: tuple[int, int] | None
    resample: int = 2
    rescale: float | None = 1 / 255
    mean: tuple[float, ...] | None = IMAGENET_STANDARD
    std: tuple[float, ...] | None = IMAGENET_STANDARD
    source: str = field(default="default", compare=False)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str) -> "ImagePreprocessing":
        """Steps from a preprocessor_config.json dict; raises UnsupportedModelError for options
        pipeload does not implement (padding, keeping the aspect ratio within a box, ...)."""
        for key in ("do_pad", "do_reduce_labels"):
            if cfg.get(key):
                raise UnsupportedModelError(f"{source}: image preprocessing option {key} is not supported")
        resize = None
        if cfg.get("do_resize", True):
            size = cfg.get("size", 224)
            if isinstance(size, int):
                resize = ("exact", size, size)
            elif isinstance(size, dict) and "height" in size and "width" in size:
                resize = ("exact", int(size["height"]), int(size["width"]))
            elif isinstance(size, dict) and set(size) == {"shortest_edge"}:
                resize = ("shortest_edge", int(size["shortest_edge"]), 0)
            else:
                raise UnsupportedModelError(f"{source}: image size {size!r} is not supported "
                                            "(height/width or shortest_edge are)")
        crop = None
        if cfg.get("do_center_crop", False):
            c = cfg.get("crop_size", 224)
            crop = (c, c) if isinstance(c, int) else (int(c["height"]), int(c["width"]))
        mean = std = None
        if cfg.get("do_normalize", True):
            mean = tuple(float(v) for v in cfg.get("image_mean", IMAGENET_STANDARD))
            std = tuple(float(v) for v in cfg.get("image_std", IMAGENET_STANDARD))
        rescale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else None
        return cls(resize=resize, crop=crop, resample=int(cfg.get("resample", 2)), rescale=rescale,
                   mean=mean, std=std, source=source)

    def to_dict(self) -> dict[str, Any]:
        """The preprocessor_config.json keys that give these steps back (for writing into GGUF)."""
        out: dict[str, Any] = {"do_resize": self.resize is not None, "resample": self.resample,
                               "do_center_crop": self.crop is not None, "do_rescale": self.rescale is not None,
                               "do_normalize": self.mean is not None}
        if self.resize is not None:
            kind, a, b = self.resize
            out["size"] = {"height": a, "width": b} if kind == "exact" else {"shortest_edge": a}
        if self.crop is not None:
            out["crop_size"] = {"height": self.crop[0], "width": self.crop[1]}
        if self.rescale is not None:
            out["rescale_factor"] = self.rescale
        if self.mean is not None:
            out["image_mean"], out["image_std"] = list(self.mean), list(self.std)
        return out


def preprocessing_of_folder(folder: Path, image_size: int) -> ImagePreprocessing:
    """The folder's preprocessor_config.json, or (with a warning) a plain resize to the model's
    image size with transformers' ViT defaults. Raises ModelFileError for a corrupt file."""
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        warnings.warn(f"{folder}: no preprocessor_config.json; resizing to {image_size}x{image_size} (bilinear) and "
                      f"normalising with mean = std = 0.5, transformers' ViT defaults", stacklevel=3)
        return ImagePreprocessing(resize=("exact", image_size, image_size), crop=None,
                                  source="default (no preprocessor_config.json)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: not readable JSON ({e})") from None
    return ImagePreprocessing.from_dict(cfg, str(path))


def preprocessing_of_gguf(arch: str, metadata: dict[str, Any], image_size: int) -> ImagePreprocessing:
    """The preprocessing a GGUF file written by `pipeload convert` carries ({arch}.preprocessor,
    the folder's preprocessor_config.json as JSON), or the ViT defaults with a warning."""
    text = metadata.get(f"{arch}.preprocessor")
    if not isinstance(text, str):
        warnings.warn(f"the GGUF file has no {arch}.preprocessor; resizing to {image_size}x{image_size} (bilinear) "
                      "and normalising with mean = std = 0.5, transformers' ViT defaults", stacklevel=3)
        return ImagePreprocessing(resize=("exact", image_size, image_size), crop=None,
                                  source="default (no preprocessor in the GGUF file)")
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelFileError(f"GGUF {arch}.preprocessor is not JSON ({e})") from None
    return ImagePreprocessing.from_dict(cfg, f"GGUF {arch}.preprocessor")


def open_image(item, index: int = 0):
    """A PIL image from a path, bytes or a PIL image; raises ValueError naming the input when it
    is not an image Pillow can read."""
    Image = _pil()
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, (bytes, bytearray)):
        source, label = io.BytesIO(item), f"input {index} ({len(item)} bytes)"
    elif isinstance(item, (str, Path)):
        source, label = Path(item), f"input {index} ({item})"
        if not source.is_file():
            raise ValueError(f"{label}: no such image file")
    else:
        raise ValueError(f"input {index} is a {type(item).__name__}; expected an image path, bytes or a PIL image")
    try:
        image = Image.open(source)
        image.load()
    except (OSError, Image.DecompressionBombError, SyntaxError) as e:
        raise ValueError(f"{label} is not an image Pillow can read ({e})") from None
    return image


def to_rgb(image):
    """RGB copy of a PIL image: grayscale and palette expanded, transparency composited on white."""
    Image = _pil()
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess(images: list, steps: ImagePreprocessing, channels: int = 3) -> torch.Tensor:
    """Pixels (B, C, H, W) float32 for the images (paths, bytes or PIL images)."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise ValueError("the list of images is empty; pass at least one image")
    if channels != 3:
        raise UnsupportedModelError(f"image models with {channels} input channels are not supported (3 are)")
    return torch.stack([_one(open_image(item, i), steps) for i, item in enumerate(images)])


def _one(image, steps: ImagePreprocessing) -> torch.Tensor:
    Image = _pil()
    image = to_rgb(image)
    if steps.resize is not None:
        kind, a, b = steps.resize
        if kind == "exact":
            height, width = a, b
        else:  # shortest edge to a, the other in proportion (transformers' rounding down)
            w, h = image.size
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(a * long / short)
            height, width = (new_long, a) if w <= h else (a, new_long)
        image = image.resize((width, height), resample=Image.Resampling(steps.resample))
    pixels = np.asarray(image, dtype=np.uint8)                           # (H, W, 3)
    if steps.crop is not None:
        ch, cw = steps.crop
        h, w = pixels.shape[:2]
        if ch > h or cw > w:
            raise UnsupportedModelError(f"{steps.source}: centre crop {ch}x{cw} is larger than the resized image {h}x{w}")
        top, left = (h - ch) // 2, (w - cw) // 2
        pixels = pixels[top:top + ch, left:left + cw]
    x = torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1)     # (3, H, W)
    if steps.rescale is not None:
        x = x * steps.rescale
    if steps.mean is not None:
        x = (x - torch.tensor(steps.mean)[:, None, None]) / torch.tensor(steps.std)[:, None, None]
    return x.contiguous()
