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


def load_rgb(path: Path) -> np.ndarray:
    """The image as an RGB uint8 array (H, W, 3); raises ImageError with the reason."""
    if not path.is_file():
        raise ImageError(f"{path}: missing file")
    try:
        with Image.open(path) as img:
            width, height = img.size
    except OSError as exc:
        raise ImageError(f"{path}: unreadable or not an image ({exc})") from None
    if width * height > MAX_PIXELS:
        raise ImageError(f"{path}: image too large to decode safely ({width}x{height} px)")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ImageError(f"{path}: unreadable or truncated image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def thumbnail(path: Path, width: int) -> np.ndarray:
    """A small RGB copy for galleries, so the browser is not sent megapixels."""
    img = load_rgb(path)
    height = max(1, round(img.shape[0] * width / img.shape[1]))
    return cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)
