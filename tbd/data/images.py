"""Reading image files for Detectron2: 16-bit greyscale scaled to 8 bits, unreadable files named.

Detectron2's ``detection_utils.read_image`` converts every image with ``PIL.Image.convert``. For a
16-bit single-channel image (PIL modes ``I;16``, ``I;16B``, ``I;16L``, ``I``) that conversion clips
each value above 255 to 255, so a typical 16-bit image becomes all white, silently. And a file
that fails to decode (e.g. truncated) raises a bare ``OSError`` that does not name the file.

:func:`install_reader` (run by ``import tbd``) replaces ``read_image`` with :func:`read_image`,
which maps the full 16-bit range linearly onto 0..255 (``round(v / 257)``, the scaling of
ImageMagick and of ``numpy`` 16->8 bit conversions) and raises :class:`ImageReadError` naming the
file when decoding fails. Every other image takes Detectron2's own path unchanged.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from PIL import Image

from tbd.data.validate import HIGH_BIT_DEPTH_MODES, DatasetError


class ImageReadError(DatasetError):
    """An image file of the dataset cannot be decoded; the message names the file.

    Takes a single message argument, so that a DataLoader worker's copy of it (which torch
    rebuilds from the message text in the main process) is still this class.
    """


_MARKER = f"{ImageReadError.__name__}: "


def is_image_read_error(err: BaseException) -> bool:
    """An :class:`ImageReadError`, also as re-raised by a DataLoader worker or a launched process
    (``torch.multiprocessing`` passes on only the text of a child's traceback)."""
    return isinstance(err, ImageReadError) or _MARKER + "cannot read image" in str(err)


def image_read_message(err: BaseException) -> str:
    """The message of an :class:`ImageReadError`, without the worker tracebacks around it."""
    text = str(err)
    if _MARKER + "cannot read image" in text:
        text = text.rsplit(_MARKER, 1)[1].strip().splitlines()[0]
    return re.sub(r"\s+", " ", text).strip()


def to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit single-channel image as an 8-bit ``L`` image (``round(v / 257)``, clipped to 0..65535)."""
    values = np.asarray(image, dtype=np.float64)
    return Image.fromarray(np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8), mode="L")


def read_image(file_name: str, format: str | None = None) -> np.ndarray:
    """Drop-in for ``detectron2.data.detection_utils.read_image`` (same arguments and result)."""
    from detectron2.data import detection_utils
    from detectron2.utils.file_io import PathManager

    try:
        with PathManager.open(file_name, "rb") as f:
            image = Image.open(f)
            image = detection_utils._apply_exif_orientation(image)
            if image.mode in HIGH_BIT_DEPTH_MODES:
                image = to_8bit(image)
            return detection_utils.convert_PIL_to_numpy(image, format)
    except ImageReadError:
        raise
    except Exception as err:  # any decoder error: the file is unusable, say which one
        raise ImageReadError(
            f"cannot read image {file_name} ({type(err).__name__}: {err}); the file is damaged or not "
            "an image: re-export it, or remove it from the dataset's json"
        ) from err


def install_reader() -> None:
    """Make Detectron2's data pipeline read images with :func:`read_image` (idempotent)."""
    from detectron2.data import detection_utils

    current: Any = detection_utils.read_image
    if current is not read_image:
        detection_utils.read_image = read_image
