"""Pixel data for WADO-RS: frames as stored or decoded (/frames) and rendered images
(/rendered, /thumbnail), from an instance's Part-10 bytes. Pure functions, no I/O.

Frames as stored are cut from the pixel data without decoding: uncompressed frames by
size, encapsulated ones by their fragments (pydicom.encaps). Frames of a compressed
instance asked uncompressed are decoded one at a time (`decoded_frames`), as the WADO-RS
instance conversion decodes the whole instance (node/dicomweb.py `transcode`). Rendering decodes with
pydicom's pixel handlers (numpy for native data; Pillow for JPEG baseline/extended and
JPEG 2000; GDCM for JPEG lossless and JPEG-LS; pydicom's own RLE; as pydicom documents), applies the modality and VOI LUTs (the stored window,
else the frame's range), inverts MONOCHROME1, and writes JPEG or PNG with Pillow.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Iterator, Sequence
from typing import Any
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import get_decoder
from pydicom.pixels.decoders.base import Decoder
from pydicom.uid import UID

# Media types of the compressed syntaxes a frame can be sent in (PS3.18 Table 8.7.3-2).
FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/x-dicom-rle",
}


@functools.cache
def decodable(transfer_syntax_uid: str) -> bool:
    """Whether an installed pydicom pixel handler decodes this compressed syntax
    (pydicom.pixels.get_decoder; e.g. Pillow for JPEG baseline and JPEG 2000)."""
    try:
        return bool(get_decoder(transfer_syntax_uid).is_available)
    except (NotImplementedError, ValueError):
        return False


# How the WADO-RS instance conversion (node/dicomweb.py `transcode`: Dataset.decompress)
# decodes compressed pixel data: YCbCr (YBR_FULL, YBR_FULL_422 JPEG; YBR_ICT, YBR_RCT JPEG
# 2000) becomes RGB, and the header of the converted instance says so. Frames and Pixel
# Data bulk data decoded on their own (`decoded_frames`) have no header of their own: the
# client reads them by the instance's /metadata, which describes the instance as stored,
# so they keep its colour space (`_as_stored_colour`).
DECODE_AS_RGB = True
_YCBCR = frozenset({"YBR_FULL", "YBR_FULL_422"})


class FrameForm(enum.Enum):
    """How /frames sends an instance's frames (node/dicomweb.py `frame_form`)."""

    STORED = "stored"    # The stored bytes: native little endian, or each frame's encoded bytes.
    DECODED = "decoded"  # A compressed instance's frames decoded to native Explicit VR Little Endian.


class RenderError(ValueError):
    """The instance has no pixel data, the frame does not exist, or it cannot be decoded."""


class NoSuchFrame(RenderError):
    """The instance has no pixel data, or not the frame asked (404, where a frame that exists
    but cannot be decoded here is 406)."""


class FrameDecodeError(Exception):
    """A frame of a compressed instance could not be decoded (a handler that failed on this
    data, or pixel attributes the decoded layout does not match)."""


def frame_numbers(text: str) -> list[int]:
    """A /frames/{list} path segment: 1-based numbers separated by commas."""
    try:
        numbers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise RenderError(f"frame list must be numbers separated by commas, got {text[:40]!r}") from None
    if not numbers or any(n < 1 for n in numbers):
        raise RenderError("frame numbers start at 1")
    return numbers


def frame_media_type(transfer_syntax_uid: str) -> str:
    """The media type frames of an instance go out as (bytes as stored)."""
    if UID(transfer_syntax_uid).is_compressed:
        return FRAME_MEDIA_TYPES.get(transfer_syntax_uid, "application/octet-stream")
    return "application/octet-stream"


def _number_of_frames(dataset: Dataset) -> int:
    try:
        return max(1, int(dataset.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _frames_of(part10: bytes, numbers: list[int] | None) -> tuple[Dataset, int, list[int]]:
    """(the instance, its NumberOfFrames, the asked frame numbers; None: every frame, first
    to last). NoSuchFrame when it has no pixel data or not a frame asked."""
    dataset = dcmread(BytesIO(part10))
    if "PixelData" not in dataset:
        raise NoSuchFrame("the instance has no pixel data")
    count = _number_of_frames(dataset)
    if numbers is None:
        numbers = list(range(1, count + 1))
    elif max(numbers) > count:
        raise NoSuchFrame(f"the instance has {count} frames")
    return dataset, count, numbers


def frames(part10: bytes, numbers: list[int] | None) -> list[bytes]:
    """The asked frames' bytes as stored (uncompressed: little endian native; compressed:
    the frame's encoded bytes); None: every frame, first to last."""
    dataset, count, numbers = _frames_of(part10, numbers)
    pixel_data = dataset.PixelData
    if UID(dataset.file_meta.TransferSyntaxUID).is_compressed:
        encoded = list(generate_frames(pixel_data, number_of_frames=count))
        return [encoded[n - 1] for n in numbers]
    bits = int(dataset.BitsAllocated)
    size = int(dataset.Rows) * int(dataset.Columns) * int(dataset.get("SamplesPerPixel", 1) or 1) * bits // 8
    if bits == 1:
        raise RenderError("frames of 1-bit pixel data are not supported")
    return [bytes(pixel_data[(n - 1) * size:n * size]) for n in numbers]


def decoded_frames(part10: bytes, numbers: list[int] | None) -> Iterator[bytes]:
    """The asked frames of a compressed instance (None: every frame, first to last; the
    /bulk of its Pixel Data), in the asked order, decoded one at a time
    (never the whole instance) by pydicom's decoder for its syntax. Each is the frame as
    native Pixel Data holds it (PS3.5 8.2): little endian, `BitsAllocated` bits per sample,
    samples interleaved (Planar Configuration 0: pydicom's decoders return multi-sample
    frames so), in the photometric interpretation the instance's /metadata gives
    (`_as_stored_colour`): YBR_FULL as YBR_FULL, YBR_FULL_422 in its native layout (two Y,
    then Cb and Cr, for each pair of pixels: PS3.3 C.7.6.3.1.2), others as decoded (RGB,
    MONOCHROME, PALETTE COLOR as stored; YBR_ICT and YBR_RCT as RGB, the JPEG 2000 decoder
    undoing the component transform as part of decoding, as viewers read those values:
    cornerstone's dicom-image-loader converts an uncompressed YBR_ICT/RCT frame as RGB).
    Raises RenderError at once (no pixel data, a frame beyond NumberOfFrames), and
    FrameDecodeError when a frame fails to decode (at its turn: the caller sends the ones
    before it)."""
    dataset, _count, numbers = _frames_of(part10, numbers)
    return _decode_each(get_decoder(dataset.file_meta.TransferSyntaxUID), dataset, numbers)


def decoded_from_frames(header: bytes, syntax: str, encoded: Iterator[bytes], numbers: list[int]) -> Iterator[bytes]:
    """`decoded_frames` of an instance whose frames come one at a time (node/frame_stream.py
    `encoded_frames`, in the order of `numbers`), each decoded on its own: `header` is the
    instance's Part-10 bytes up to its Pixel Data, from which each frame gets its pixel
    description. The same layout and colour space as `decoded_frames`."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.encaps import encapsulate

    try:
        described = dcmread(BytesIO(header), stop_before_pixels=True)
    except Exception as error:  # pydicom raises many types
        raise FrameDecodeError(f"the header could not be read: {type(error).__name__}") from error
    decoder = get_decoder(syntax)
    try:
        for number, frame in zip(numbers, encoded):
            single = Dataset()
            for keyword in _PIXEL_DESCRIPTION:
                if keyword in described:
                    setattr(single, keyword, described[keyword].value)
            single.NumberOfFrames = 1
            single.file_meta = FileMetaDataset()
            single.file_meta.TransferSyntaxUID = UID(syntax)
            single.PixelData = encapsulate([frame])
            single["PixelData"].VR = "OB"
            yield from _decode_each(decoder, single, [number], indices=[0])
    finally:
        close = getattr(encoded, "close", None)
        if close is not None:
            close()  # The file of a stream stopped early.


# What a decoder reads of a dataset besides its pixel data (PS3.3 C.7.6.3 Image Pixel).
_PIXEL_DESCRIPTION = ("SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated",
                      "BitsStored", "HighBit", "PixelRepresentation", "PlanarConfiguration")


def _decode_each(decoder: Decoder, dataset: Dataset, numbers: list[int],
                 indices: list[int] | None = None) -> Iterator[bytes]:
    bits = int(dataset.get("BitsAllocated", 0) or 0)
    stored = str(dataset.get("PhotometricInterpretation", "")).strip()
    if stored == "YBR_FULL_422" and int(dataset.get("Columns", 0) or 0) % 2:
        raise FrameDecodeError("YBR_FULL_422 with an odd number of columns has no native layout")
    # as_rgb False: YCbCr stays YCbCr where the decoder can keep it (Pillow's JPEG does).
    iterator = decoder.iter_array(dataset, indices=[n - 1 for n in numbers] if indices is None else indices,
                                  as_rgb=False)
    for number in numbers:
        try:
            array, properties = next(iterator)
        except Exception as error:  # pydicom and its pixel handlers raise many types
            raise FrameDecodeError(f"frame {number} could not be decoded: {type(error).__name__}: "
                                   f"{str(error)[:200]}") from error
        if array.dtype.itemsize * 8 != bits:
            raise FrameDecodeError(f"frame {number} decodes to {array.dtype.itemsize * 8}-bit samples, "
                                   f"not the {bits} of Bits Allocated")
        if stored in _YCBCR:
            array = _as_stored_colour(array, str(properties.get("photometric_interpretation", stored)), stored)
        # Little endian whatever this machine's order (a no-op copy-free view on x86 and ARM).
        yield array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def _as_stored_colour(array: Any, decoded: str, stored: str) -> Any:
    """A decoded YCbCr frame (rows, columns, 3) in the stored colour space's native layout:
    YBR_FULL as is; YBR_FULL_422 with each pair of pixels as Y1 Y2 Cb Cr, the pair's chroma
    the mean of the two decoded ones (a 4:2:2 or 4:2:0 JPEG decodes to full-resolution
    chroma, interpolated). A decoder that gave RGB (`decoded`, pydicom's account of what it
    returned) is converted back with pydicom's convert_color_space."""
    import numpy as np
    from pydicom.pixels import convert_color_space

    if decoded == "RGB":
        array = convert_color_space(array, "RGB", "YBR_FULL")
    if stored != "YBR_FULL_422":
        return array
    rows, columns = array.shape[0], array.shape[1]
    wide = array.astype(np.uint32)
    out = np.empty((rows, columns // 2, 4), dtype=array.dtype)
    out[..., 0] = array[:, 0::2, 0]
    out[..., 1] = array[:, 1::2, 0]
    out[..., 2] = (wide[:, 0::2, 1] + wide[:, 1::2, 1] + 1) // 2
    out[..., 3] = (wide[:, 0::2, 2] + wide[:, 1::2, 2] + 1) // 2
    return out


def render(part10: bytes, *, frame: int = 1, media_type: str = "image/jpeg",
           viewport: tuple[int, int] | None = None, quality: int = 90) -> bytes:
    """One frame as a JPEG or PNG (8-bit), fitted into `viewport` (width, height) if given."""
    if frame < 1:
        raise NoSuchFrame("frame numbers start at 1")
    dataset, count, _numbers = _frames_of(part10, [frame])
    return _render(dataset, count, frame, media_type, viewport, quality)


def render_frame(header: bytes, frame_bytes: bytes, *, media_type: str = "image/jpeg",
                 viewport: tuple[int, int] | None = None, quality: int = 90) -> bytes:
    """`render` of one frame that comes alone (node/frame_stream.py `encoded_frames`: a big
    instance is read only as far as that frame, never whole): `header` is the instance's
    Part-10 bytes up to its Pixel Data (its file meta, LUTs and windows), `frame_bytes` the
    frame as stored (native, or one encoded frame). The same image as `render` of the
    whole instance at that frame."""
    from pydicom.encaps import encapsulate

    try:
        dataset = dcmread(BytesIO(header), stop_before_pixels=True)
    except Exception as error:  # pydicom raises many types
        raise RenderError(f"the header could not be read: {type(error).__name__}") from None
    dataset.NumberOfFrames = 1
    if UID(dataset.file_meta.TransferSyntaxUID).is_compressed:
        dataset.PixelData = encapsulate([frame_bytes])
        dataset["PixelData"].VR = "OB"
    else:
        dataset.PixelData = frame_bytes
        dataset["PixelData"].VR = "OW" if int(dataset.get("BitsAllocated", 8) or 8) > 8 else "OB"
    return _render(dataset, 1, 1, media_type, viewport, quality)


def _render(dataset: Dataset, count: int, frame: int, media_type: str, viewport: tuple[int, int] | None,
            quality: int) -> bytes:
    import numpy as np
    from PIL import Image
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, convert_color_space

    try:
        pixels = dataset.pixel_array
    except Exception as error:  # No handler for this syntax, or corrupt data.
        raise RenderError(f"cannot decode the pixel data: {type(error).__name__}: {str(error)[:200]}") from None
    if count > 1:
        pixels = pixels[frame - 1]
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    if samples == 1:
        values = apply_modality_lut(pixels, dataset).astype("float64")
        if "WindowCenter" in dataset or "VOILUTSequence" in dataset:
            values = apply_voi_lut(values, dataset).astype("float64")
        low, high = float(np.min(values)), float(np.max(values))
        if "WindowCenter" in dataset and "WindowWidth" in dataset and "VOILUTSequence" not in dataset:
            center = _first(dataset.WindowCenter)
            width = max(_first(dataset.WindowWidth), 1.0)
            low, high = center - width / 2, center + width / 2
        scaled = np.clip((values - low) / max(high - low, 1e-9), 0.0, 1.0) * 255.0
        image_array = scaled.astype("uint8")
        if photometric == "MONOCHROME1":
            image_array = 255 - image_array
        image = Image.fromarray(image_array, mode="L")
    else:
        if photometric.startswith("YBR") and not UID(dataset.file_meta.TransferSyntaxUID).is_compressed:
            pixels = convert_color_space(pixels, photometric, "RGB")
        if pixels.dtype != np.uint8:
            top = float(np.max(pixels)) or 1.0
            pixels = (pixels.astype("float64") / top * 255.0).astype("uint8")
        image = Image.fromarray(pixels, mode="RGB")
    if viewport is not None:
        image.thumbnail(viewport)
    output = BytesIO()
    if media_type == "image/png":
        image.save(output, format="PNG")
    else:
        image.save(output, format="JPEG", quality=quality)
    return output.getvalue()


def _first(value: object) -> float:
    """The first number of a multi-valued attribute (WindowCenter, WindowWidth; pydicom's
    MultiValue is a Sequence), or its one value."""
    item = value[0] if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) else value
    return float(str(item))


def viewport_size(text: str | None, default: tuple[int, int] | None) -> tuple[int, int] | None:
    """The `viewport=w,h` parameter (PS3.18 8.3.5.1.3)."""
    if not text:
        return default
    try:
        width, _, height = text.partition(",")
        size = (int(width), int(height or width))
    except ValueError:
        raise RenderError("viewport must be WIDTH,HEIGHT") from None
    if not (1 <= size[0] <= 4096 and 1 <= size[1] <= 4096):
        raise RenderError("viewport must be within 1..4096")
    return size
