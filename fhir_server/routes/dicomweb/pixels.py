"""Pixel data for WADO-RS: rendered images (PS3.18 8.3.5, 10.4.1.1.3) and native frames.

Rendering decodes one frame with pydicom (its own and Pillow's decoders), once its size is
known to fit MAX_RENDER_PIXELS (a small compressed file may declare any size), applies the
Modality LUT, in float32, shrinks to the viewport when one is asked, then the VOI transform (a `window` parameter, else the VOI LUT Sequence, else the header's
Window Center/Width with its VOI LUT Function, else the frame's min-max), inverts MONOCHROME1,
and encodes 8-bit JPEG or PNG with Pillow. Colour images go as RGB (pydicom converts YBR),
palette colour through its LUT. Blocking: the routes call these in a thread.
"""

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps
from pydicom import Dataset, dcmread
from pydicom.dataelem import RawDataElement
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import DeflatedExplicitVRLittleEndian

from fhir_server.errors import BadRequest, NotAcceptable, NotFound, TooCostly

LOGGER = logging.getLogger(__name__)
PIXEL_DATA = 0x7FE00010
MAX_VIEWPORT = 8192
# Pixels (Rows × Columns) of the largest frame rendered: decoding and windowing cost about
# 8 bytes a pixel, so a frame of this size needs some 400 MB while it is rendered.
MAX_RENDER_PIXELS = 50_000_000
MAX_FRAMES_BYTES = 1 << 30  # the frames one response may carry
FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG"}
# What malformed or contradictory image attributes raise in pydicom and numpy.
HEADER_ERRORS = (ValueError, TypeError, KeyError, AttributeError, IndexError, ArithmeticError)


@dataclass(frozen=True)
class Window:
    center: float
    width: float
    function: str = "LINEAR"  # LINEAR, LINEAR_EXACT or SIGMOID (PS3.3 C.11.2.1.2)


@dataclass(frozen=True)
class RenderOptions:
    media_type: str = "image/jpeg"
    quality: int = 90
    viewport: tuple[int, int] | None = None
    window: Window | None = None


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadRequest(f"{what} {text!r} is not a number") from None
    if not np.isfinite(value):
        raise BadRequest(f"{what} {text!r} is not a finite number")
    return value


def render_options(media_type: str, params: dict[str, str]) -> RenderOptions:
    """The `quality`, `viewport` (vw,vh) and `window` (center,width[,function]) query
    parameters of a rendered resource, or 400."""
    quality = 90
    if "quality" in params:
        quality = int(_number(params["quality"], "quality"))
        if not 1 <= quality <= 100:
            raise BadRequest("quality is 1 to 100")
    viewport = None
    if "viewport" in params:
        parts = params["viewport"].split(",")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise BadRequest("viewport is vw,vh (the other viewport parameters are not supported)")
        viewport = (int(parts[0]), int(parts[1]))
        if not all(1 <= v <= MAX_VIEWPORT for v in viewport):
            raise BadRequest(f"viewport sizes are 1 to {MAX_VIEWPORT}")
    window = None
    if "window" in params:
        parts = params["window"].split(",")
        if len(parts) not in (2, 3):
            raise BadRequest("window is center,width[,function]")
        function = parts[2].strip().upper().replace("-", "_") if len(parts) == 3 else "LINEAR"
        if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
            raise BadRequest("window function is linear, linear-exact or sigmoid")
        window = Window(_number(parts[0], "window center"), _number(parts[1], "window width"), function)
        if window.width <= 0 or (function == "LINEAR" and window.width < 1):
            raise BadRequest("window width must be positive (at least 1 for linear)")
    return RenderOptions(media_type, quality, viewport, window)


def is_image(ds: Dataset) -> bool:
    return "Rows" in ds and "Columns" in ds and ("PixelData" in ds or PIXEL_DATA in ds)


def frame_count(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def header(path: Path) -> Dataset:
    """The header, Pixel Data present but not loaded."""
    return dcmread(path, defer_size=1024)


def _windowed(values: np.ndarray, window: Window) -> np.ndarray:
    """PS3.3 C.11.2.1.2: values → 0..1, in place (`values` is the caller's own float32 copy:
    a frame-sized temporary per step would double what rendering costs)."""
    c, w = np.float32(window.center), np.float32(window.width)
    if window.function == "SIGMOID":
        values -= c
        values *= np.float32(-4.0) / w
        np.exp(values, out=values)
        values += np.float32(1.0)
        return np.reciprocal(values, out=values)
    if window.function == "LINEAR_EXACT":
        values -= c
        values /= w
    elif w > 1:
        values -= c - np.float32(0.5)
        values /= w - np.float32(1.0)
    else:
        return (values > c - np.float32(0.5)).astype(np.float32)
    values += np.float32(0.5)
    return np.clip(values, 0.0, 1.0, out=values)


def _first(value: object) -> float:
    """The first of a possibly multi-valued DS."""
    return float(value[0] if isinstance(value, MultiValue | list) else value)  # type: ignore[arg-type]


def _header_window(ds: Dataset) -> Window | None:
    try:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    except (AttributeError, TypeError, ValueError, IndexError):
        return None
    function = str(ds.get("VOILUTFunction", "") or "LINEAR").upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID") or width <= 0 or not np.isfinite([center, width]).all():
        return None
    return Window(center, width, function)


def _modality(frame: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values → modality values, as a new float32 array (pydicom rescales in float64:
    twice the memory, for precision a rendered image cannot show); a malformed Modality LUT
    or rescale is left out."""
    try:
        if not ds.get("ModalityLUTSequence"):
            return _rescaled(frame, ds)
        return np.asarray(apply_modality_lut(frame, ds), dtype=np.float32)
    except HEADER_ERRORS as exc:
        LOGGER.info("Modality LUT not applied: %s", exc)
        return frame.astype(np.float32)


def _rescaled(frame: np.ndarray, ds: Dataset) -> np.ndarray:
    """Rescale Slope and Intercept applied (as pydicom does: only when both are present)."""
    values = frame.astype(np.float32)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        if not np.isfinite([slope, intercept]).all():
            raise ValueError(f"Rescale Slope {slope} or Intercept {intercept} is not finite")
        values *= np.float32(slope)
        values += np.float32(intercept)
    return values


def _shrunk(values: np.ndarray, viewport: tuple[int, int] | None) -> np.ndarray:
    """Modality values reduced to fit the viewport, before the VOI transform works on them
    (enlarging waits for the 8-bit image: a float32 copy of that size would cost 4 times more)."""
    height, width = values.shape
    if viewport is None or (width <= viewport[0] and height <= viewport[1]):
        return values
    return np.array(ImageOps.contain(Image.fromarray(_block_means(values, viewport)), viewport))


def _block_means(values: np.ndarray, viewport: tuple[int, int]) -> np.ndarray:
    """The frame reduced by a whole factor that keeps it at least the viewport's size, each
    pixel the mean of its block (the few rows and columns past the last whole block left
    out): Pillow would first copy the whole float32 frame, this reads it where it lies."""
    height, width = values.shape
    factor = min(width // viewport[0], height // viewport[1])
    if factor < 2:
        return values
    rows, columns = height // factor, width // factor
    blocks = values[:rows * factor, :columns * factor].reshape(rows, factor, columns, factor)
    return blocks.mean(axis=(1, 3), dtype=np.float32)


def _voi_lut(values: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """The VOI LUT Sequence's first LUT → 0..1; None when it is malformed."""
    try:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        scaled = np.asarray(apply_voi_lut(values, ds, prefer_lut=True), dtype=np.float32)
        scaled /= np.float32(2**bits - 1)
        return np.clip(scaled, 0.0, 1.0, out=scaled)
    except HEADER_ERRORS as exc:
        LOGGER.info("VOI LUT not applied: %s", exc)
        return None


def _grey(frame: np.ndarray, ds: Dataset, options: RenderOptions) -> np.ndarray:
    """A monochrome frame → 0..1, after the Modality LUT, the viewport and the VOI transform."""
    values = _shrunk(_modality(frame, ds), options.viewport)
    window = options.window or (None if "VOILUTSequence" in ds else _header_window(ds))
    scaled = _windowed(values, window) if window is not None else None
    if scaled is None and "VOILUTSequence" in ds:
        scaled = _voi_lut(values, ds)
    if scaled is None:
        scaled = _min_max(values)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        scaled = np.subtract(np.float32(1.0), scaled, out=scaled)
    return scaled


def _min_max(values: np.ndarray) -> np.ndarray:
    """The frame's own range → 0..1, in place."""
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values)
    values -= np.float32(low)
    values /= np.float32(high - low)
    return values


def _to_8bit(values: np.ndarray, bits: int) -> np.ndarray:
    """Colour samples of `bits` bits → uint8."""
    if values.dtype == np.uint8 and bits <= 8:
        return values
    scaled = values.astype(np.float32)
    scaled *= np.float32(255.0 / float(2**bits - 1))
    scaled += np.float32(0.5)
    return np.clip(scaled, 0, 255, out=scaled).astype(np.uint8)


def _image(path: Path, index: int, options: RenderOptions) -> Image.Image:
    ds = header(path)
    if not is_image(ds):
        raise NotAcceptable("The instance is not an image: it has no rendered representation")
    if not 0 <= index < frame_count(ds):
        raise NotFound(f"Frame {index + 1} does not exist (the instance has {frame_count(ds)})")
    _check_size(ds)
    deflated = ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
    try:  # from the file, one frame read, unless the dataset must be inflated first
        frame = pixel_array(dcmread(path) if deflated else path, index=index)
    except (NotImplementedError, RuntimeError, OSError, *HEADER_ERRORS) as exc:
        LOGGER.info("cannot decode %s: %s", path, exc)
        raise NotAcceptable(f"The pixel data cannot be decoded here to render it ({exc})") from exc
    try:
        return _picture(frame, ds, options)
    except HEADER_ERRORS as exc:  # attributes that contradict the pixels, or malformed ones
        LOGGER.info("cannot render %s: %s", path, exc)
        raise NotAcceptable(f"The image cannot be rendered from its attributes ({exc})") from exc


def _check_size(ds: Dataset) -> None:
    """Refuse, before decoding, a frame larger than MAX_RENDER_PIXELS: its size is what the
    header declares, whatever the (compressed) Pixel Data weighs."""
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
    except HEADER_ERRORS as exc:
        raise NotAcceptable(f"The image size cannot be read from its attributes ({exc})") from exc
    if rows * columns > MAX_RENDER_PIXELS:
        raise NotAcceptable(f"The image is {columns}×{rows} pixels (Columns×Rows): frames of more than "
                            f"{MAX_RENDER_PIXELS} pixels are not rendered; retrieve the instance instead")


def _picture(frame: np.ndarray, ds: Dataset, options: RenderOptions) -> Image.Image:
    if str(ds.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        rgb = _to_8bit(apply_color_lut(frame, ds), bits)
    elif frame.ndim == 3:
        rgb = _to_8bit(frame, int(ds.get("BitsStored") or 8))
    else:
        grey = _grey(frame, ds, options)
        grey *= np.float32(255.0)
        grey += np.float32(0.5)
        return Image.fromarray(grey.astype(np.uint8), mode="L")
    return Image.fromarray(rgb[..., :3], mode="RGB")


def render(path: Path, index: int, options: RenderOptions) -> bytes:
    """Frame `index` (0-based) of an instance as a JPEG or PNG (blocking)."""
    image = _image(path, index, options)
    if options.viewport is not None:
        image = ImageOps.contain(image, options.viewport)
    buffer = io.BytesIO()
    if options.media_type == "image/jpeg":
        image.save(buffer, "JPEG", quality=options.quality)
    else:
        image.save(buffer, "PNG")
    return buffer.getvalue()


@dataclass
class Frames:
    """Frames of native Pixel Data, to be read a chunk at a time as the response goes out:
    from the file, opened before the response starts (so a copy of the instance stored
    meanwhile cannot shift them), or from `data` when the Pixel Data was read with the header
    (a small one, or a deflated file's: its positions count inflated bytes, and it is in
    memory already, at most the 1 GiB the store takes)."""

    handle: BinaryIO
    numbers: list[int]
    start: int  # where the Pixel Data value starts in the file
    length: int  # bytes per frame
    swap: int = 0  # bytes per sample to swap to little endian (a big endian file), else 0
    data: bytes | None = None

    def read(self, number: int, offset: int, size: int) -> bytes:
        """`size` bytes from `offset` in frame `number` (1-based), little endian (blocking)."""
        position = (number - 1) * self.length + offset
        if self.data is not None:
            data = self.data[position:position + size]
        else:
            self.handle.seek(self.start + position)
            data = self.handle.read(size)
        if len(data) != size:  # checked when stored: the file was cut since
            raise OSError(f"frame {number} of {self.handle.name} is cut short")
        if self.swap:
            data = np.frombuffer(data, dtype=f">u{self.swap}").astype(f"<u{self.swap}").tobytes()
        return data

    def close(self) -> None:
        self.handle.close()


def native_frames(path: Path, numbers: list[int]) -> Frames:
    """Frames `numbers` (1-based) of uncompressed Pixel Data, located without reading the
    pixels; 404 for a frame that does not exist, 406 for compressed ones, 400 when they add up
    to more than MAX_FRAMES_BYTES (blocking). The caller closes them."""
    handle = open(path, "rb")  # noqa: SIM115 - Frames owns it, closed by the caller
    try:
        return _locate_frames(handle, numbers)
    except BaseException:
        handle.close()
        raise


def _locate_frames(handle: BinaryIO, numbers: list[int]) -> Frames:
    ds = dcmread(handle, defer_size=1024)
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if not is_image(ds) or PIXEL_DATA not in ds:
        raise NotFound("The instance has no Pixel Data")
    if syntax is None or syntax.is_compressed:
        raise NotAcceptable("The frames are compressed: retrieve the instance (frames are served uncompressed only)")
    frames = frame_count(ds)
    for number in numbers:
        if not 1 <= number <= frames:
            raise NotFound(f"Frame {number} does not exist (the instance has {frames})")
    allocated, length = _frame_layout(ds, frames)
    if length * len(numbers) > MAX_FRAMES_BYTES:
        raise TooCostly(f"The {len(numbers)} frames hold {length * len(numbers)} bytes: at most "
                        f"{MAX_FRAMES_BYTES} go in one response, ask for fewer at a time")
    swap = allocated // 8 if not syntax.is_little_endian and allocated in (16, 32) and length % (allocated // 8) == 0 else 0
    raw = ds.get_item(PIXEL_DATA, keep_deferred=True)
    if isinstance(raw, RawDataElement) and raw.value is None and syntax != DeflatedExplicitVRLittleEndian:
        return Frames(handle, numbers, raw.value_tell, length, swap)
    return Frames(handle, numbers, 0, length, swap, data=bytes(ds.PixelData))


def _frame_layout(ds: Dataset, frames: int) -> tuple[int, int]:
    """(Bits Allocated, bytes per frame) of native Pixel Data, or 406 when the attributes do
    not say."""
    try:
        allocated = int(ds.get("BitsAllocated") or 0)
        pixels = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1)
        length = get_expected_length(ds, "bytes") // frames
    except HEADER_ERRORS as exc:
        raise NotAcceptable(f"The frames cannot be located from the image attributes ({exc})") from exc
    if allocated == 1 and pixels % 8:
        raise NotAcceptable("Single-bit frames that do not end on a byte boundary are not served")
    return allocated, length
