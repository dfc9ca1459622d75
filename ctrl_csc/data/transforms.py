"""Image transforms shared by every dataset: PIL image -> float tensor ``(C, H, W)`` in ``[-1, 1]``.

The pipeline is the one the CTRL / CSC-CTRL experiments use::

    [centre-crop crop_size] -> resize (shorter side) to image_size -> centre-crop image_size
    -> [random horizontal flip] -> ToTensor ([0, 1]) -> x * 2 - 1  (== Normalize(0.5, 0.5))

The transform is a small class rather than a ``transforms.Compose`` of lambdas so that it pickles
(DataLoader workers started with ``spawn``) and so that its settings are visible in ``repr``. It
is written with PIL and numpy, with torchvision's arithmetic (shorter side to ``image_size``, longer
side ``int(image_size * long / short)``, bilinear; crop offsets rounded like
``torchvision.transforms.functional.center_crop``), so that loading the embedded datasets does not
import torchvision (seconds of start-up).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

__all__ = ["ImageTransform", "pixel_limit", "read_image", "to_signed_tensor"]


def to_signed_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit PIL image -> float32 tensor ``(C, H, W)`` in ``[-1, 1]`` (``C`` = 1 for mode ``L``);
    pixel value ``v`` maps to ``v / 127.5 - 1`` (what ToTensor + Normalize(0.5, 0.5) give)."""
    array = np.array(image, dtype=np.uint8, copy=True)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array)).float().div_(127.5).sub_(1.0)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    """Centre crop ``size x size`` (offsets rounded as torchvision does; zero-padded if larger)."""
    w, h = image.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def _resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """Resize (bilinear, antialiased) so that the shorter side is ``size``, keeping the aspect."""
    w, h = image.size
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return image.resize(new, Image.Resampling.BILINEAR)


class ImageTransform:
    """Crop/resize a PIL image to ``image_size x image_size`` and map it to ``[-1, 1]``.

    Args:
        image_size: side of the square output, in pixels.
        mode: PIL mode the image is converted to first: ``"RGB"`` (3 channels) or ``"L"`` (1).
        crop_size: if set, a centre crop of this side is taken *before* resizing (CelebA's usual
            140-pixel face crop of the 178x218 aligned images).
        flip: random horizontal flip with probability 1/2 (training augmentation of natural
            images; it draws from torch's global generator, which DataLoader seeds per worker).

    Call: ``transform(PIL.Image) -> Tensor (C, image_size, image_size)``, float32 in ``[-1, 1]``.
    """

    def __init__(
        self, image_size: int, mode: str = "RGB", crop_size: int | None = None, flip: bool = False
    ) -> None:
        if mode not in ("RGB", "L"):
            raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
        self.image_size = int(image_size)
        self.mode = mode
        self.crop_size = None if crop_size is None else int(crop_size)
        self.flip = bool(flip)

    @property
    def channels(self) -> int:
        return 3 if self.mode == "RGB" else 1

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != self.mode:
            image = image.convert(self.mode)
        if self.crop_size is not None:
            image = _center_crop(image, self.crop_size)
        s = self.image_size
        if image.size != (s, s):
            if min(image.size) != s:
                image = _resize_shorter(image, s)
            if image.size != (s, s):
                image = _center_crop(image, s)
        if self.flip and torch.rand(()) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_signed_tensor(image)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, mode={self.mode!r}, "
            f"crop_size={self.crop_size}, flip={self.flip})"
        )


def pixel_limit(image_size: int) -> int:
    """The most pixels an image file may declare to be decoded for ``image_size``-pixel outputs:
    4096² (a decoded RGB image of 50 MB), or 64 times the output's pixels if that is more. PIL's
    own guard only warns below 89 M pixels, and a file's header can declare any size."""
    return max(4096 * 4096, 64 * int(image_size) ** 2)


def read_image(source, name: str, transform: ImageTransform) -> torch.Tensor:
    """Decode one image file (``source``: a path or a binary stream; ``name`` names it in errors)
    and apply ``transform``. A file that declares more than :func:`pixel_limit` pixels is refused
    from its header, before it is decoded; one that cannot be read is refused by name too."""
    limit = pixel_limit(transform.image_size)
    try:
        with Image.open(source) as image:
            w, h = image.size
            if w * h <= limit:
                image.load()
                return transform(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(
            f"dataset: the image file {name!r} cannot be read ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'no details'}); replace or remove it"
        ) from None
    raise ValueError(
        f"dataset: the image file {name!r} declares {w}x{h} pixels, more than the {limit:,} "
        f"decoded for {transform.image_size}-pixel images; downscale it or remove it"
    )
