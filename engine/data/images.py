"""Reading fundus photographs safely: size limits, truncation and non-image files."""

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

# Real fundus photographs are 2-9 Mpx; anything far beyond is a decompression bomb or a mistake.
MAX_PIXELS = 50_000_000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class ImageError(ValueError):
    """A file that cannot be used as an image; the message says why, in words."""


def probe_image(path: Path) -> tuple[int, int]:
    """Decode the whole file once to prove it is a complete image; return (width, height)."""
    if not path.is_file():
        raise ImageError("missing file")
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise ImageError(f"image too large to decode safely ({width}x{height} px)")
            img.load()
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError("image too large to decode safely") from None
    except OSError as exc:
        text = str(exc)
        if "truncated" in text or "broken data stream" in text:
            raise ImageError("truncated image") from None
        raise ImageError(f"unreadable or not an image ({text})") from None
    except (SyntaxError, ValueError) as exc:
        raise ImageError(f"unreadable or not an image ({exc})") from None
    return width, height


# libjpeg decodes a JPEG at 1/2, 1/4 or 1/8 of its size in a fraction of the time: the inverse
# DCT, upsampling and colour conversion shrink with the output (bench/inference.py).
REDUCED_JPEG_READS = (
    (8, cv2.IMREAD_REDUCED_COLOR_8),
    (4, cv2.IMREAD_REDUCED_COLOR_4),
    (2, cv2.IMREAD_REDUCED_COLOR_2),
)


def _read_flag(width: int, height: int, is_jpeg: bool, min_side: int) -> int:
    """The largest JPEG reduction whose shorter side keeps at least `min_side` pixels."""
    if is_jpeg and min_side > 0:
        for factor, flag in REDUCED_JPEG_READS:
            if min(width, height) // factor >= min_side:
                return flag
    return cv2.IMREAD_COLOR


def _header(path: Path) -> tuple[int, int, str | None]:
    """Width, height and format from the file's header, without decoding its pixels."""
    if not path.is_file():
        raise ImageError(f"{path}: missing file")
    try:
        with Image.open(path) as img:
            width, height, image_format = *img.size, img.format
    except OSError as exc:
        raise ImageError(f"{path}: unreadable or not an image ({exc})") from None
    if width * height > MAX_PIXELS:
        raise ImageError(f"{path}: image too large to decode safely ({width}x{height} px)")
    return width, height, image_format


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file from its header: cheap, and no proof that the pixels
    decode (probe_image is)."""
    return _header(path)[:2]


def load_rgb(path: Path, min_side: int = 0) -> np.ndarray:
    """The image as an RGB uint8 array (H, W, 3); raises ImageError with the reason.

    With `min_side`, a JPEG is decoded at 1/2, 1/4 or 1/8 of its size when its shorter side
    still has at least `min_side` pixels; other formats are always decoded whole."""
    width, height, image_format = _header(path)
    bgr = cv2.imread(str(path), _read_flag(width, height, image_format == "JPEG", min_side))
    if bgr is None:
        raise ImageError(f"{path}: unreadable or truncated image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def thumbnail(path: Path, width: int) -> np.ndarray:
    """A small RGB copy for galleries, so the browser is not sent megapixels."""
    img = load_rgb(path, min_side=width)
    height = max(1, round(img.shape[0] * width / img.shape[1]))
    return cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)
