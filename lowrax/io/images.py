"""Images to `pixel_values`, as transformers' ViT image processor makes them, with PIL and numpy.

`ImageProcessor.from_pretrained(model_dir)` reads `preprocessor_config.json` (resize to a fixed
height/width or to a shortest edge, optional center crop, rescale, normalise; RGB conversion) and
`processor(images)` returns float32 [n, channels, height, width]. The steps and their dtypes follow
transformers' PIL backend: resize the 8-bit image with PIL, rescale in float64 then float32,
normalise in float32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lowrax.errors import LowraxError

CONFIG = "preprocessor_config.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_RESAMPLE_NAMES = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}


@dataclass(frozen=True)
class ImageProcessor:
    """What transformers' `ViTImageProcessor` does for a model; the defaults are ViT's."""

    size: dict | None = None  # {"height", "width"} or {"shortest_edge"}; None: 224 x 224
    resample: int = 2  # PIL's resampling filter (2: bilinear)
    do_resize: bool = True
    do_center_crop: bool = False
    crop_size: dict | None = None  # {"height", "width"}
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    do_convert_rgb: bool = True

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "ImageProcessor":
        """The processor a model directory's `preprocessor_config.json` describes (ViT's defaults without one)."""
        path = Path(directory) / CONFIG
        if not path.exists():
            return cls()
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise LowraxError(f"{path} is not valid JSON: {e}") from e
        known = {f for f in cls.__dataclass_fields__}
        kept = {k: v for k, v in values.items() if k in known and v is not None}
        for key in ("image_mean", "image_std"):
            if key in kept:
                kept[key] = tuple(kept[key]) if isinstance(kept[key], (list, tuple)) else (kept[key],) * 3
        if isinstance(kept.get("size"), int):  # an old config: one number for a square
            kept["size"] = {"height": kept["size"], "width": kept["size"]}
        if isinstance(kept.get("crop_size"), int):
            kept["crop_size"] = {"height": kept["crop_size"], "width": kept["crop_size"]}
        return cls(**kept)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write `preprocessor_config.json` (what transformers' `AutoImageProcessor` reads)."""
        import dataclasses

        values = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        values["size"] = self.size or {"height": 224, "width": 224}
        values["image_processor_type"] = "ViTImageProcessor"
        (Path(directory) / CONFIG).write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")

    def __post_init__(self):
        size = self.size or {"height": 224, "width": 224}
        if not ({"height", "width"} <= set(size) or "shortest_edge" in size):
            raise LowraxError(f"image processor size must have height and width, or shortest_edge; got {size}")
        if self.do_center_crop and not (self.crop_size and {"height", "width"} <= set(self.crop_size)):
            raise LowraxError(f"do_center_crop needs crop_size with height and width; got {self.crop_size}")
        if self.resample not in _RESAMPLE_NAMES:
            raise LowraxError(f"resample must be one of PIL's filters {_RESAMPLE_NAMES}, got {self.resample!r}")

    def __call__(self, images: Sequence[Any] | Any) -> np.ndarray:
        """pixel_values [n, channels, height, width] float32 for PIL images, HWC uint8 arrays or image paths."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        return np.stack([self.one(image) for image in images])

    def one(self, image) -> np.ndarray:
        from PIL import Image

        image = open_image(image)
        if self.do_convert_rgb and image.mode != "RGB":
            image = image.convert("RGB")
        if self.do_resize:
            image = image.resize(self._resized(image.height, image.width)[::-1], resample=Image.Resampling(self.resample))
        array = np.asarray(image)
        if array.ndim == 2:
            array = array[:, :, None]
        if self.do_center_crop:
            array = _center_crop(array, self.crop_size["height"], self.crop_size["width"])
        array = array.transpose(2, 0, 1)
        if self.do_rescale:
            array = (array.astype(np.float64) * self.rescale_factor).astype(np.float32)
        array = array.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, np.float32)[:, None, None]
            std = np.asarray(self.image_std, np.float32)[:, None, None]
            array = (array - mean) / std
        return array

    def _resized(self, height: int, width: int) -> tuple[int, int]:
        size = self.size or {"height": 224, "width": 224}
        if "shortest_edge" in size:  # the short side to that length, the aspect ratio kept (int() of the long side)
            short, long = (height, width) if height <= width else (width, height)
            new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
            return (new_short, new_long) if height <= width else (new_long, new_short)
        return size["height"], size["width"]


def open_image(image):
    """A PIL image from a PIL image, an HWC uint8 array or a path; a clear error for anything else."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, Path)):
        try:
            return Image.open(image)
        except (OSError, ValueError) as e:
            raise LowraxError(f"cannot read image {image}: {e}") from e
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim in (2, 3):
        return Image.fromarray(image)
    if isinstance(image, dict) and ("bytes" in image or "path" in image):  # a `datasets` Image feature, undecoded
        import io

        return Image.open(io.BytesIO(image["bytes"])) if image.get("bytes") else open_image(image["path"])
    raise LowraxError(f"an image must be a PIL image, an HxW(xC) uint8 array or a path; got {type(image).__name__}")


def _center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = array.shape[:2]
    if height > h or width > w:
        raise LowraxError(f"crop_size {height}x{width} is larger than the resized image {h}x{w}")
    top, left = (h - height) // 2, (w - width) // 2
    return array[top: top + height, left: left + width]
