"""Image data sets for training and evaluating score models, all held in memory as float tensors in [0, 1].

* ``digits``: scikit-learn's bundled handwritten digits (1797 images, 8x8, 17 grey levels; shipped inside
  scikit-learn, nothing is downloaded), rescaled bilinearly to the model's input size.
* a folder of images (PNG, JPEG, ...; needs Pillow), resized to the model's input size;
* an ``.npz`` file holding one array of images, (N, H, W), (N, H, W, C) or (N, C, H, W), uint8 in [0, 255]
  or float in [0, 1].

:func:`load_dataset` returns an ``(N, C, H, W)`` float32 tensor; :func:`data_transform` /
:func:`inverse_data_transform` are ncsnv2's (dequantisation, ``rescaled``, logit transform) and
:func:`save_image_grid` writes a grid of images as a PNG, small images enlarged to a grid at least 512 pixels
wide, and :func:`save_scatter` 2-D points as a scatter plot (with the small PNG writer here, so sampling needs
no optional dependency; Pillow, when installed, draws the scatter plots' titles).
"""

from __future__ import annotations

import math
import os
import re
import struct
import zipfile
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DataError",
    "IMAGE_DATASETS",
    "load_dataset",
    "load_digits",
    "load_image_folder",
    "load_npz",
    "resize_images",
    "data_transform",
    "inverse_data_transform",
    "image_grid",
    "save_image_grid",
    "write_png",
    "scatter_panels",
    "save_scatter",
    "grid_scale",
]

IMAGE_DATASETS = ("digits",)
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class DataError(ValueError):
    """A data set cannot be found, read, or brought to the shape a model needs."""


# ---- resizing ---------------------------------------------------------------------------------------------


def resize_images(images: Tensor, image_size: int, channels: int) -> Tensor:
    """``(N, C, H, W)`` float images -> ``(N, channels, image_size, image_size)``, clamped to [0, 1].

    Bilinear resampling (``antialias`` when shrinking, so thin strokes do not alias away); one channel is
    repeated to three, three are averaged to one (luminance-free grey: the data sets here are scans or toys).
    """
    if images.dim() != 4:
        raise DataError(f"images: expected (N, C, H, W), got shape {tuple(images.shape)}")
    c = images.shape[1]
    if c != channels:
        if c == 1:
            images = images.expand(-1, channels, -1, -1)
        elif channels == 1 and c in (3, 4):
            images = images[:, :3].mean(dim=1, keepdim=True)
        elif channels == 3 and c == 4:
            images = images[:, :3]
        else:
            raise DataError(f"cannot turn {c}-channel images into {channels}-channel ones")
    if tuple(images.shape[2:]) != (image_size, image_size):
        shrinking = images.shape[2] > image_size or images.shape[3] > image_size
        images = F.interpolate(
            images, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=shrinking
        )
    return images.clamp(0.0, 1.0).contiguous()


# ---- the sources ------------------------------------------------------------------------------------------


def load_digits(image_size: int = 16, channels: int = 1) -> Tensor:
    """scikit-learn's handwritten digits (1797 images, values 0..16) as ``(1797, channels, s, s)`` in [0, 1]."""
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError:
        raise DataError(
            "the 'digits' data set is scikit-learn's bundled one: pip install scikit-learn "
            "(or pip install 'fastscore[demo]')"
        ) from None
    images = _sk_load_digits().images.astype(np.float32) / 16.0  # (1797, 8, 8)
    return resize_images(torch.from_numpy(images).unsqueeze(1), image_size, channels)


def _to_nchw(array: np.ndarray, where: str) -> Tensor:
    """An image array of any usual layout and dtype -> float32 ``(N, C, H, W)`` in [0, 1]."""
    if array.dtype == np.uint8:
        images = array.astype(np.float32) / 255.0
    elif np.issubdtype(array.dtype, np.floating):
        images = array.astype(np.float32)
        if images.size and (np.nanmin(images) < 0.0 or np.nanmax(images) > 1.0):
            raise DataError(f"{where}: float images must lie in [0, 1], got [{images.min():g}, {images.max():g}]")
        if not np.isfinite(images).all():
            raise DataError(f"{where}: the images hold NaN or infinite values")
    elif np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise DataError(f"{where}: integer images must lie in [0, 255]")
        images = array.astype(np.float32) / 255.0
    else:
        raise DataError(f"{where}: expected a numeric image array, got dtype {array.dtype}")
    if images.ndim == 3:  # (N, H, W)
        images = images[:, None]
    elif images.ndim == 4:
        if images.shape[-1] in (1, 3, 4) and images.shape[1] not in (1, 3, 4):  # (N, H, W, C)
            images = images.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"{where}: expected images of shape (N, H, W), (N, H, W, C) or (N, C, H, W), got {array.shape}")
    if images.shape[0] == 0:
        raise DataError(f"{where}: holds no images")
    return torch.from_numpy(np.ascontiguousarray(images))


def load_npz(path, image_size: int, channels: int, *, key: str | None = None) -> Tensor:
    """The images in an ``.npz`` (or ``.npy``) file; ``key`` picks the array (default: ``images``, ``x``,
    ``arr_0``, or the only one)."""
    where = f"data file {os.fspath(path)!r}"
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{where} is not a readable .npz/.npy file ({exc})") from None
    if isinstance(loaded, np.ndarray):
        array = loaded
    else:
        with loaded:
            names = list(loaded.files)
            if key is None:
                key = next((k for k in ("images", "x", "samples", "arr_0") if k in names), None)
                if key is None and len(names) == 1:
                    key = names[0]
            if key not in names:
                raise DataError(f"{where}: no array named {key!r}; it holds {', '.join(names) or 'nothing'}")
            array = loaded[key]
    return resize_images(_to_nchw(array, where), image_size, channels)


def load_image_folder(path, image_size: int, channels: int, *, limit: int | None = None) -> Tensor:
    """Every image file directly in ``path`` (sorted by name), resized to ``(channels, image_size, image_size)``."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError(
            "reading a folder of images needs Pillow: pip install pillow (or pip install 'fastscore[demo]')"
        ) from None
    where = f"image folder {os.fspath(path)!r}"
    names = sorted(n for n in os.listdir(path) if n.lower().endswith(_IMAGE_SUFFIXES))
    if limit is not None:
        names = names[:limit]
    if not names:
        raise DataError(f"{where} holds no image files ({', '.join(_IMAGE_SUFFIXES)})")
    mode = "L" if channels == 1 else "RGB"
    batch = []
    for name in names:
        try:
            with Image.open(os.path.join(path, name)) as im:
                im = im.convert(mode)
                if im.size != (image_size, image_size):
                    im = im.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=None)
                array = np.asarray(im, dtype=np.uint8)
        except OSError as exc:
            raise DataError(f"{where}: cannot read {name!r} ({exc})") from None
        batch.append(array if array.ndim == 3 else array[..., None])
    images = torch.from_numpy(np.stack(batch).astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    return resize_images(images, image_size, channels)


def load_dataset(name_or_path, image_size: int, channels: int, *, limit: int | None = None) -> Tensor:
    """An image data set as a float32 ``(N, channels, image_size, image_size)`` tensor in [0, 1].

    ``name_or_path``: ``"digits"`` (scikit-learn's bundled digits), a folder of images, or an ``.npz`` /
    ``.npy`` file. ``limit`` keeps the first ``limit`` images. Raises :class:`DataError` (a ValueError) with
    a one-line reason for anything unreadable.
    """
    if not isinstance(image_size, int) or image_size < 1 or not isinstance(channels, int) or channels < 1:
        raise DataError(f"image_size and channels must be positive integers, got {image_size!r}, {channels!r}")
    text = os.fspath(name_or_path)
    if text == "digits":
        images = load_digits(image_size, channels)
    elif os.path.isdir(text):
        images = load_image_folder(text, image_size, channels, limit=limit)
    elif os.path.isfile(text):
        if not text.lower().endswith((".npz", ".npy")):
            raise DataError(f"data file {text!r}: expected an .npz or .npy file of images, or a folder of images")
        images = load_npz(text, image_size, channels)
    else:
        raise DataError(
            f"no data set {text!r}: expected {', '.join(IMAGE_DATASETS)}, a folder of images or an .npz file"
        )
    return images[:limit] if limit is not None else images


# ---- ncsnv2's data transforms -----------------------------------------------------------------------------


def _flag(config, section_field: str) -> bool:
    node = config
    for part in section_field.split("."):
        node = getattr(node, part, None) if not isinstance(node, dict) else node.get(part)
        if node is None:
            return False
    return bool(node)


def data_transform(config, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """ncsnv2's ``data_transform``: optional uniform (``x*255/256 + U/256``) or Gaussian (``x + 0.01 z``)
    dequantisation, then ``2x - 1`` when ``data.rescaled`` or ``logit(1e-6 + (1-2e-6) x)`` when
    ``data.logit_transform``; else ``x`` unchanged (the NCSNv2 models rescale inside). See
    docs/numerics.md#input-scaling-and-the-noise-level."""
    if _flag(config, "data.uniform_dequantization"):
        x = x / 256.0 * 255.0 + torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device) / 256.0
    if _flag(config, "data.gaussian_dequantization"):
        x = x + torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device) * 0.01
    if _flag(config, "data.logit_transform"):
        lam = 1e-6
        u = lam + (1 - 2 * lam) * x
        return torch.log(u) - torch.log1p(-u)
    if _flag(config, "data.rescaled"):
        return 2 * x - 1.0
    return x


def inverse_data_transform(config, x: Tensor) -> Tensor:
    """ncsnv2's ``inverse_data_transform``: sigmoid or ``(x + 1) / 2`` as configured, then clamp to [0, 1]."""
    if _flag(config, "data.logit_transform"):
        x = torch.sigmoid(x)
    elif _flag(config, "data.rescaled"):
        x = (x + 1.0) / 2.0
    return x.clamp(0.0, 1.0)


# ---- writing images -----------------------------------------------------------------------------------------


def image_grid(images: Tensor, *, nrow: int | None = None, padding: int = 2, pad_value: float = 1.0) -> np.ndarray:
    """``(N, C, H, W)`` images in [0, 1] -> one uint8 ``(rows, cols)`` or ``(rows, cols, 3)`` array, ``nrow``
    images per row (default: a square-ish grid), ``padding`` pixels of ``pad_value`` between them."""
    images = images.detach().float().cpu().clamp(0.0, 1.0)
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images: expected a non-empty (N, C, H, W) tensor, got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    if c not in (1, 3):
        images, c = images[:, :1], 1
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), float(pad_value))
    for i in range(n):
        r, q = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[:, top : top + h, left : left + w] = images[i]
    array = (grid * 255.0 + 0.5).clamp(0, 255).to(torch.uint8).numpy()
    return array[0] if c == 1 else array.transpose(1, 2, 0)


def write_png(path, array: np.ndarray) -> None:
    """Write a uint8 ``(H, W)`` grey or ``(H, W, 3)`` RGB array as a PNG, atomically (tmp file + rename).

    Uses no image library: PNG is zlib-compressed scanlines with filter 0 in CRC-checked chunks.
    """
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if array.ndim == 2:
        colour_type, height, width = 0, *array.shape
    elif array.ndim == 3 and array.shape[2] == 3:
        colour_type, height, width = 2, array.shape[0], array.shape[1]
    else:
        raise ValueError(f"array: expected (H, W) or (H, W, 3) uint8, got shape {array.shape}")
    raw = b"".join(b"\x00" + array[y].tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    payload = (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    )
    atomic_write_bytes(path, payload)


def temp_name(path) -> str:
    """The temporary name an atomic write of ``path`` goes through: ``<path>.tmp<pid>``, in the same folder
    (so ``os.replace`` is a rename) and naming its writer (so :func:`remove_stale_temps` can tell a live
    writer's file from one a killed process left)."""
    return f"{os.fspath(path)}.tmp{os.getpid()}"


_TEMP = re.compile(r"^(?P<target>.+)\.tmp(?P<pid>\d+)$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's process
        return True
    except (OverflowError, ValueError, OSError):
        return False
    return True


def remove_stale_temps(folder, targets=None) -> list[str]:
    """Remove the temporary files of atomic writes (:func:`temp_name`) in ``folder`` whose writer process
    is gone (killed mid-write); only those of file names ``targets`` accepts (a callable on the target's
    name; default all). A live process's files are kept. Returns the paths removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match is None or (targets is not None and not targets(match["target"])):
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or _process_alive(pid) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            os.remove(entry.path)
            removed.append(entry.path)
        except OSError:
            pass
    return removed


def atomic_write_bytes(path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` through a temporary file in the same folder (flushed to disk) and
    ``os.replace``, so a reader never sees a half-written file and an interrupted write leaves the old file
    intact. A failed write (a full disk, ...) raises ``OSError`` and leaves no temporary file behind."""
    path = os.fspath(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


GRID_MIN_WIDTH = 512  # pixels: small images are enlarged until their grid is at least this wide
GRID_MAX_SCALE = 32


def grid_scale(width: int, min_width: int = GRID_MIN_WIDTH) -> int:
    """The integer factor that makes a grid ``width`` pixels wide at least ``min_width`` wide (1 when it
    already is; at most :data:`GRID_MAX_SCALE`)."""
    return max(1, min(GRID_MAX_SCALE, math.ceil(min_width / max(1, width))))


def save_image_grid(
    path, images: Tensor, *, nrow: int | None = None, padding: int = 2, scale: int | None = None
) -> None:
    """Save ``(N, C, H, W)`` images in [0, 1] as one PNG grid. ``scale`` enlarges each pixel into a
    ``scale`` x ``scale`` block (nearest neighbour); default: the smallest integer that makes the grid at
    least 512 pixels wide (16 samples of 16x16, a 74-pixel grid, are drawn 7x: 518 pixels), at most 32;
    ``scale=1`` keeps the images' own size."""
    array = image_grid(images, nrow=nrow, padding=padding)
    if scale is None:
        scale = grid_scale(array.shape[1])
    if scale > 1:
        array = array.repeat(scale, axis=0).repeat(scale, axis=1)
    write_png(path, array)


def _nice_limit(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is >= ``value`` (> 0)."""
    power = 10.0 ** math.floor(math.log10(value))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if m * power >= value * (1 - 1e-12):
            return m * power
    return 10.0 * power


def scatter_limit(points: Tensor, *, quantile: float = 1.0) -> float:
    """A round half-width for a square view around the origin holding 2-D ``points`` (their ``quantile`` of
    the largest absolute coordinate, plus 10%); 1 for no finite points."""
    pts = torch.as_tensor(points, dtype=torch.float64).reshape(-1)
    pts = pts[torch.isfinite(pts)].abs()
    if pts.numel() == 0:
        return 1.0
    extent = float(pts.max()) if quantile >= 1 else float(torch.quantile(pts, quantile))
    return _nice_limit(1.1 * extent) if extent > 0 else 1.0


def save_scatter(path, samples, *, data=None, titles=None, size: int = 320) -> None:
    """2-D samples as a PNG scatter plot (:func:`scatter_panels`): one panel, or the data and the samples
    side by side on the same axes when ``data`` is given. The view is a square around the origin sized to
    hold the data (without data: 99.5% of the samples); a panel's title says how many points fall outside."""
    samples = torch.as_tensor(samples).detach().cpu().double()
    panels = [samples] if data is None else [torch.as_tensor(data).detach().cpu().double(), samples]
    lim = scatter_limit(panels[0], quantile=1.0) if data is not None else scatter_limit(samples, quantile=0.995)
    if titles is None:
        titles = ["samples"] if data is None else ["data", "samples"]
    shown = []
    for points, title in zip(panels, titles):
        outside = int((~(points.abs() <= lim).all(dim=1)).sum())  # NaN counts as outside
        shown.append(f"{title} ({outside} of {len(points)} outside)" if outside else title)
    colors = [(31, 119, 180)] if data is None else [(90, 90, 90), (31, 119, 180)]
    scatter_panels(path, panels, lim=lim, size=size, colors=colors, titles=shown)


def scatter_panels(
    path,
    panels,
    *,
    lim: float = 8.0,
    size: int = 240,
    colors=None,
    titles=None,
    dot: int = 1,
) -> None:
    """A row of 2-D scatter plots as one PNG: ``panels`` is a list of (N, 2) point sets drawn on
    ``[-lim, lim]^2``, each ``size`` pixels square with axes through the origin. Titles are drawn with
    Pillow's default font when Pillow is installed (and left out otherwise: no plotting library needed)."""
    colors = colors or [(31, 119, 180)] * len(panels)
    title_h = 18 if titles else 0
    gap = 8
    width = len(panels) * size + (len(panels) + 1) * gap
    height = size + title_h + 2 * gap
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    for k, points in enumerate(panels):
        left, top = gap + k * (size + gap), gap + title_h
        box = canvas[top : top + size, left : left + size]
        box[:] = 250
        box[[0, -1], :] = 120  # frame
        box[:, [0, -1]] = 120
        mid = size // 2
        box[mid, 1:-1] = box[1:-1, mid] = 215  # axes through the origin
        pts = torch.as_tensor(points, dtype=torch.float64).cpu()
        pix = ((pts + lim) / (2 * lim) * (size - 1)).round().long()
        inside = ((pix >= 0) & (pix < size)).all(dim=1)
        cols, rows = pix[inside, 0].numpy(), (size - 1 - pix[inside, 1]).numpy()
        for dy in range(-dot + 1, dot):
            for dx in range(-dot + 1, dot):
                r, c = np.clip(rows + dy, 0, size - 1), np.clip(cols + dx, 0, size - 1)
                box[r, c] = colors[k]
    if titles:
        try:
            from PIL import Image
            from PIL import ImageDraw
        except ImportError:
            titles = None
    if titles:
        image = Image.fromarray(canvas)
        draw = ImageDraw.Draw(image)
        for k, title in enumerate(titles):
            draw.text((gap + k * (size + gap) + 2, gap), title, fill=(20, 20, 20))
        canvas = np.asarray(image)
    write_png(path, canvas)
