"""Media for one sample: paths confined to their folder, images decoded with Pillow (RGB, EXIF
orientation applied), videos sampled uniformly to ``num_frames`` with PyAV or read from a folder
of frames. Families with ``load_image: false`` get the resolved paths instead of pixels.

Every problem is a :class:`SampleError` naming the sample, the field (``images[1]``) and the
reason (``missing_media``, ``unreadable_media``, ``corrupt_image``, ``image_too_large``,
``path_escape``). An image over the pixel limit is refused from its header, before decoding.
"""

from __future__ import annotations

import base64
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cardtune.conversation import Sample
from cardtune.errors import SampleError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class MediaConfig:
    """Where media live and how they load; ``from_card`` fills the family's part."""

    image_folder: str | None = None
    video_folder: str | None = None
    allow_absolute_paths: bool = False
    load_image: bool = True
    num_frames: int = 8
    max_image_pixels: int | None = None
    """Images with more pixels are refused (``image_too_large``); None: :data:`DEFAULT_MAX_IMAGE_PIXELS`."""

    def __post_init__(self) -> None:
        if self.max_image_pixels is None:
            object.__setattr__(self, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)

    @classmethod
    def from_card(cls, card: Any | None, **kwargs: Any) -> MediaConfig:
        if card is not None:
            kwargs.setdefault("load_image", card.load_image)
            kwargs.setdefault("num_frames", card.media.num_frames)
        return cls(**kwargs)

    def folder(self, kind: str) -> str | None:
        return self.video_folder if kind == "video" else self.image_folder


class MediaProblem(Exception):
    """A media reference that cannot be used; becomes a SampleError once the sample is known."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# -- paths --------------------------------------------------------------------------------------
def resolve_path(ref: str | os.PathLike, folder: str | None, allow_absolute: bool = False) -> Path:
    """``ref`` under ``folder`` (the current directory when none): ``../`` escapes and absolute
    paths outside the folder are refused unless ``allow_absolute``. The check is lexical, so a
    symlink inside the folder that points elsewhere (shared storage) is allowed."""
    root = os.path.abspath(folder or os.getcwd())
    text = os.fspath(ref)
    if text.startswith("file://"):
        text = text[len("file://") :]
    if os.path.isabs(text):
        path = os.path.normpath(text)
        if allow_absolute:
            return Path(path)
    else:
        path = os.path.normpath(os.path.join(root, text))
    if os.path.commonpath([root, path]) != root:
        where = "an absolute path" if os.path.isabs(text) else "a relative path"
        raise MediaProblem(
            "path_escape",
            f"{text!r} is {where} outside {root}"
            + ("" if allow_absolute or not os.path.isabs(text) else " (allow_absolute_paths / --allow-absolute-paths permits it)"),
        )
    return Path(path)


def _existing(path: Path, kind: str) -> Path:
    """``path``, a regular file (a video may be a folder of frames): a FIFO, a socket or a
    device would block the reader, or feed it without end, so none is ever opened."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise MediaProblem("missing_media", f"{path} does not exist") from None
    except OSError as exc:
        raise MediaProblem("unreadable_media", f"{path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        if kind != "video":
            raise MediaProblem("unreadable_media", f"{path} is a folder, not an {kind}")
    elif not stat.S_ISREG(mode):
        raise MediaProblem("unreadable_media", f"{path} is {not_regular(mode)}, not a file: only regular files are read")
    if not os.access(path, os.R_OK):
        raise MediaProblem("unreadable_media", f"{path} is not readable (permissions)")
    return path


def not_regular(mode: int) -> str:
    """What a file that is neither regular nor a folder is, for a message."""
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _is_remote(text: str) -> bool:
    return text.startswith(("http://", "https://", "s3://", "gs://"))


def _ref_text(ref: Any) -> str | None:
    if isinstance(ref, dict):  # a Hugging Face ``Image`` feature with decode=False
        return ref.get("path") if not ref.get("bytes") else None
    return os.fspath(ref) if isinstance(ref, (str, os.PathLike)) else None


def media_path(ref: Any, kind: str, cfg: MediaConfig) -> Path:
    text = _ref_text(ref)
    if text is None:
        raise MediaProblem("unreadable_media", f"a {type(ref).__name__} is not a {kind} path")
    if _is_remote(text):
        raise MediaProblem("unreadable_media", f"{text!r}: remote URLs are not fetched; download the files first")
    return _existing(resolve_path(text, cfg.folder(kind), cfg.allow_absolute_paths), kind)


# -- images -------------------------------------------------------------------------------------
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
"""Pillow's own warning threshold (about 9,459 x 9,459): a larger image is refused per sample
(``image_too_large``) before any pixel is decoded, unless ``max_image_pixels`` allows it."""


@dataclass(frozen=True)
class ImageHeader:
    """An image as its file header describes it; no pixel decoded. ``width``/``height`` are as
    displayed (EXIF orientation applied); ``frames`` > 1 for animated GIF/WebP/APNG and TIFF pages."""

    format: str
    width: int
    height: int
    frames: int
    mode: str
    path: str = ""

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


def _image_source(ref: Any, cfg: MediaConfig) -> Any:
    """A path or an in-memory file for ``ref``, which is not a PIL image."""
    if isinstance(ref, dict) and ref.get("bytes"):
        return io.BytesIO(ref["bytes"])
    if isinstance(ref, bytes):
        return io.BytesIO(ref)
    if isinstance(ref, str) and ref.startswith("data:"):
        try:
            return io.BytesIO(base64.b64decode(ref.split(",", 1)[1]))
        except (IndexError, ValueError) as exc:
            raise MediaProblem("corrupt_image", f"bad data URL: {exc}") from None
    return media_path(ref, "image", cfg)


def _open_lazily(source: Any) -> Any:
    """``Image.open`` (the header only), with Pillow's own bomb check replaced by
    :func:`_check_pixels`: Pillow raises past twice its limit, naming no file, and the limit is
    ours to configure."""
    from PIL import Image, UnidentifiedImageError

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        return Image.open(source)
    except UnidentifiedImageError:
        raise MediaProblem("corrupt_image", f"{_name(source)} is not an image Pillow can identify") from None
    except PermissionError as exc:
        raise MediaProblem("unreadable_media", f"{_name(source)}: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise MediaProblem("corrupt_image", f"{_name(source)} cannot be read: {exc}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _check_pixels(image: Any, source: Any, cfg: MediaConfig) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise MediaProblem("corrupt_image", f"{_name(source)} has a size of {width}x{height}")
    limit = cfg.max_image_pixels
    if limit is not None and width * height > limit:
        raise MediaProblem(
            "image_too_large",
            f"{_name(source)} is {width}x{height} = {width * height:,} pixels, over the limit of {limit:,} "
            "(downsize it, or raise max_image_pixels / --max_image_pixels)",
        )


def read_image_header(ref: Any, cfg: MediaConfig) -> ImageHeader:
    """Format, displayed size and frame count from the header, checked against the pixel limit;
    the cheap check validation makes of every image (decoding happens in the DataLoader)."""
    from PIL import Image

    if isinstance(ref, Image.Image):
        _check_pixels(ref, "embedded image", cfg)
        return ImageHeader(ref.format or "", *ref.size, getattr(ref, "n_frames", 1), ref.mode)
    source = _image_source(ref, cfg)
    image = _open_lazily(source)
    try:
        _check_pixels(image, source, cfg)
        width, height = image.size
        try:
            orientation = _header_orientation(image)
        except Exception:  # noqa: BLE001 - a broken EXIF block: decoding will tell
            orientation = 1
        header = ImageHeader(image.format or "", *((height, width) if orientation in (5, 6, 7, 8) else (width, height)),
                             getattr(image, "n_frames", 1), image.mode, str(source) if isinstance(source, Path) else "")
    finally:
        image.close()
    return header


def open_image(ref: Any, cfg: MediaConfig) -> Any:
    """A decoded RGB PIL image with its EXIF orientation applied; 16-bit images keep their range."""
    from PIL import Image, ImageOps

    if isinstance(ref, Image.Image):
        _check_pixels(ref, "embedded image", cfg)
        image = ref
        source: Any = "embedded image"
    else:
        source = _image_source(ref, cfg)
        image = _open_lazily(source)
        _check_pixels(image, source, cfg)
        try:
            image.load()  # decode now: a truncated file fails here, not mid-epoch
        except PermissionError as exc:
            raise MediaProblem("unreadable_media", f"{_name(source)}: {exc}") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise MediaProblem("corrupt_image", f"{_name(source)} cannot be decoded: {exc}") from None
    image = ImageOps.exif_transpose(image)
    return to_rgb(image, _name(source))


def to_rgb(image: Any, name: str = "embedded image") -> Any:
    """RGB for the image processor. 16-bit greyscale (PNG, TIFF: mode ``I;16``) keeps its range,
    scaled to 8 bits (``convert`` would clip every value over 255 to white); 32-bit integer
    images are scaled the same way when their values fit 16 bits, float images are refused."""
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        import numpy as np

        values = np.asarray(image)
        low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if low < 0 or high > 65535:
            raise MediaProblem("unsupported_media", f"{name} is a 32-bit integer image with values {low}..{high}; "
                                                    "save it as an 8- or 16-bit image")
        if mode.startswith("I;16") or high > 255:
            values = values >> 8
        return Image.fromarray(values.astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        raise MediaProblem("unsupported_media", f"{name} is a 32-bit float image; save it as an 8- or 16-bit image")
    return image.convert("RGB")


def _name(source: Any) -> str:
    return str(source) if isinstance(source, Path) else "embedded image"


def image_size(ref: Any, cfg: MediaConfig) -> tuple[int, int]:
    """(width, height) as displayed, from the file header only (no pixel decoding)."""
    return read_image_header(ref, cfg).size


def _header_orientation(image: Any) -> int:
    """The EXIF orientation found in the header; ``getexif()`` would decode a PNG's pixels."""
    from PIL import Image

    if hasattr(image, "tag_v2"):  # TIFF
        return int(image.tag_v2.get(0x0112, 1))
    raw = image.info.get("exif")
    if not raw:
        return 1
    exif = Image.Exif()
    exif.load(raw)
    return int(exif.get(0x0112, 1))


# -- videos -------------------------------------------------------------------------------------
def uniform_indices(total: int, num_frames: int) -> list[int]:
    """The centre frame of each of ``num_frames`` equal segments (frames repeat if too few)."""
    return [min(total - 1, int((k + 0.5) * total / num_frames)) for k in range(num_frames)]


def load_video(ref: Any, cfg: MediaConfig) -> list[Any]:
    """``num_frames`` RGB frames of a video file, a folder of frame images, or a list of frames."""
    if isinstance(ref, (list, tuple)):
        frames = list(ref)
        return [open_image(frames[i], cfg) for i in uniform_indices(len(frames), cfg.num_frames)] if frames else []
    path = media_path(ref, "video", cfg)
    if path.is_dir():
        frames = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not frames:
            raise MediaProblem("unreadable_media", f"{path} holds no frame images ({', '.join(IMAGE_SUFFIXES)})")
        frame_cfg = MediaConfig(allow_absolute_paths=True, max_image_pixels=cfg.max_image_pixels)
        return [open_image(frames[i], frame_cfg) for i in uniform_indices(len(frames), cfg.num_frames)]
    return _decode_video(path, cfg.num_frames)


def _decode_video(path: Path, num_frames: int) -> list[Any]:
    try:
        import av
    except ImportError:
        raise MediaProblem(
            "unreadable_media", f"{path}: reading video files needs PyAV (pip install 'cardtune[video]'), or give a folder of frames"
        ) from None
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaProblem("unreadable_media", f"{path} has no video stream")
            total = container.streams.video[0].frames
        if total <= 0:  # no frame count in the header: count by decoding once
            total = _count_frames(path)
        frames = _pick_frames(path, uniform_indices(total, num_frames))
        if len(frames) < num_frames:  # the header overstated the count
            total = _count_frames(path)
            frames = _pick_frames(path, uniform_indices(total, num_frames)) if total else []
    except MediaProblem:
        raise
    except Exception as exc:  # noqa: BLE001 - PyAV/FFmpeg errors have many types
        raise MediaProblem("unreadable_media", f"{path} cannot be decoded as a video: {exc}") from None
    if not frames:
        raise MediaProblem("unreadable_media", f"{path}: no frame could be decoded")
    return frames


def _count_frames(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def _pick_frames(path: Path, indices: list[int]) -> list[Any]:
    import av

    wanted: dict[int, int] = {}
    for i in indices:
        wanted[i] = wanted.get(i, 0) + 1
    frames: list[Any] = []
    last = max(indices)
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                image = frame.to_image().convert("RGB")
                frames += [image] * wanted[i]
            if i >= last:
                break
    return frames


# -- one sample ---------------------------------------------------------------------------------
def load_one(ref: Any, kind: str, cfg: MediaConfig) -> Any:
    """One image or video of a sample as the family takes it: pixels, or (``load_image: false``)
    the resolved path, checked to exist."""
    if not cfg.load_image:
        if isinstance(ref, (list, tuple)):
            return [str(media_path(r, "image", cfg)) for r in ref]
        return str(media_path(ref, kind, cfg))
    return load_video(ref, cfg) if kind == "video" else open_image(ref, cfg)


def load_media_checked(sample: Sample, cfg: MediaConfig) -> tuple[list[SampleError], Any | None]:
    """Every media reference resolved and decoded: all the problems and, if none, the media."""
    from cardtune.conversation import Media

    errs: list[SampleError] = []
    loaded: dict[str, list[Any]] = {"image": [], "video": []}
    for kind, refs in (("image", sample.images), ("video", sample.videos)):
        for i, ref in enumerate(refs):
            try:
                loaded[kind].append(load_one(ref, kind, cfg))
            except MediaProblem as exc:
                errs.append(SampleError(sample.id, f"{kind}s[{i}]", exc.reason, exc.detail, sample.source))
    if errs or not (sample.images or sample.videos):
        return errs, None
    return errs, Media(images=loaded["image"], videos=loaded["video"])


def load_headers_checked(
    sample: Sample, cfg: MediaConfig, memo: dict[Any, Any] | None = None,
) -> tuple[list[SampleError], Any | None]:
    """Like :func:`load_media_checked` without decoding: each image's :class:`ImageHeader` (or,
    with ``load_image: false``, its path, the header read to check it is an image). Videos are
    decoded as before. ``memo`` keeps headers per reference across samples that share a file."""
    from cardtune.conversation import Media

    memo = {} if memo is None else memo
    errs: list[SampleError] = []
    loaded: dict[str, list[Any]] = {"image": [], "video": []}
    for kind, refs in (("image", sample.images), ("video", sample.videos)):
        for i, ref in enumerate(refs):
            try:
                if kind == "video":
                    loaded[kind].append(load_one(ref, kind, cfg))
                    continue
                key = ref if isinstance(ref, str) else None
                found = memo.get(key) if key is not None else None
                if found is None:
                    try:
                        found = read_image_header(ref, cfg)
                    except MediaProblem as exc:
                        found = exc
                    if key is not None:
                        memo[key] = found
                if isinstance(found, MediaProblem):
                    raise found
                loaded[kind].append(found if cfg.load_image else load_one(ref, kind, cfg))
            except MediaProblem as exc:
                errs.append(SampleError(sample.id, f"{kind}s[{i}]", exc.reason, exc.detail, sample.source))
    if errs or not (sample.images or sample.videos):
        return errs, None
    return errs, Media(images=loaded["image"], videos=loaded["video"])


def load_media(sample: Sample, cfg: MediaConfig) -> Any | None:
    """The sample's media in placeholder order, or None for a text-only sample; the first
    problem is raised as a :class:`SampleError`."""
    errs, media = load_media_checked(sample, cfg)
    if errs:
        raise errs[0]
    return media
