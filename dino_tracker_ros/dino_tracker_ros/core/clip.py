"""The clip format on disk: frames, per-frame stamps and metadata, written atomically.

A clip is a directory ``<root>/<clip_id>/`` holding ``clip.json`` (:class:`ClipMeta`) and
``frames/000000.png ...`` (RGB content, lossless PNG by default). Clips are written by
:class:`ClipWriter` into a temporary dot-directory that is renamed into place only after
``clip.json`` was written, so a reader never sees a half-written clip. Later stages add
``work/``, ``model/`` and ``cache/`` (see ``docs/architecture.md``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Union

import cv2
import numpy as np

from .errors import ClipError, QueryError
from .storage import atomic_dir, disk_error, read_json, sweep_temps, write_json_atomic

__all__ = [
    "CLIP_FORMAT",
    "MAX_FPS",
    "MAX_FRAMES",
    "MAX_SIZE",
    "MAX_STAMP_NS",
    "Clip",
    "ClipMeta",
    "ClipWriter",
    "clip_from_array",
    "clip_from_frames_dir",
    "clip_from_video",
    "default_clip_id",
    "list_clips",
    "open_clip",
    "resolve_clip_path",
    "sweep_clip_dir",
    "validate_clip_id",
    "write_clip",
]

log = logging.getLogger(__name__)

CLIP_FORMAT = "dino_tracker_clip/1"
ENCODINGS = ("png", "jpg")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
_CLIP_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_CLIP_ID_RULE = (
    "1-128 characters from A-Z a-z 0-9 _ . -, starting with a letter or digit, without '..'"
)

#: Bounds of clip.json values: what the ROS messages (uint32 sizes, float32 fps, int32
#: seconds in stamps) and the pipeline can carry.
MAX_SIZE = 65535
MAX_FRAMES = 1_000_000
MAX_FPS = 100_000.0
MAX_STAMP_NS = 2**31 * 1_000_000_000 - 1

PathLike = Union[str, "os.PathLike[str]"]


# -- identifiers and paths --------------------------------------------------------------
def validate_clip_id(clip_id: Any) -> str:
    """Return ``clip_id`` if it is a safe clip name, else raise :class:`ClipError`."""
    if not isinstance(clip_id, str) or not _CLIP_ID_RE.fullmatch(clip_id) or ".." in clip_id:
        raise ClipError(f"invalid clip id {clip_id!r}: use {_CLIP_ID_RULE}")
    return clip_id


def default_clip_id(stamp_ns: int | None = None) -> str:
    """A clip id from a time stamp (UTC), e.g. ``clip_20261123T230000_123`` (milliseconds).

    Args:
        stamp_ns: nanoseconds since the epoch; ``None`` for now.
    """
    if stamp_ns is None:
        stamp_ns = time.time_ns()
    stamp_ns = int(stamp_ns)
    dt = datetime.fromtimestamp(stamp_ns // 1_000_000_000, tz=timezone.utc)
    return f"clip_{dt:%Y%m%dT%H%M%S}_{(stamp_ns // 1_000_000) % 1000:03d}"


def resolve_clip_path(root: PathLike, clip_id: str) -> Path:
    """The directory of clip ``clip_id`` under ``root``; never outside ``root``.

    The one place where a clip id becomes a path: every surface (services, action, CLI,
    bag and video import, the recorder) goes through it (via :func:`open_clip` or
    :class:`ClipWriter`).

    Raises:
        ClipError: invalid id, or an existing entry that resolves outside ``root``.
    """
    validate_clip_id(clip_id)
    root_abs = Path(root).expanduser().absolute()
    path = root_abs / clip_id
    if path.parent != root_abs:
        raise ClipError(f"clip id {clip_id!r} escapes the clip directory")
    if path.exists() or path.is_symlink():
        real_root = root_abs.resolve()
        if not path.resolve().is_relative_to(real_root):
            raise ClipError(f"clip {clip_id!r} links outside the clip directory {root_abs}")
    return path


# -- metadata ---------------------------------------------------------------------------
def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class ClipMeta:
    """Contents of ``clip.json``.

    Attributes:
        format: always :data:`CLIP_FORMAT`.
        clip_id: the clip's name (equals its directory name).
        num_frames: number of frames T (>= 1).
        width, height: frame size in pixels.
        fps: nominal frame rate.
        frame_id: camera frame of the images (tf frame id).
        stamps_ns: one time stamp per frame in nanoseconds, non-decreasing.
        source: free text (topic, video path, bag, ...).
        encoding: ``png`` (lossless) or ``jpg``.
        created: creation time, ISO-8601 UTC.
    """

    clip_id: str
    num_frames: int
    width: int
    height: int
    fps: float
    stamps_ns: tuple[int, ...]
    frame_id: str = "camera"
    source: str = ""
    encoding: str = "png"
    created: str = ""
    format: str = CLIP_FORMAT

    def __post_init__(self) -> None:
        if self.format != CLIP_FORMAT:
            raise ClipError(f"unsupported clip format {self.format!r}; expected {CLIP_FORMAT}")
        validate_clip_id(self.clip_id)
        for name, hi in (("num_frames", MAX_FRAMES), ("width", MAX_SIZE), ("height", MAX_SIZE)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
                raise ClipError(f"clip.json: {name} must be an integer in [1, {hi}], "
                                f"got {_short(value)}")
        fps = self.fps
        if (
            isinstance(fps, bool)
            or not isinstance(fps, (int, float))
            or not 0 < fps <= MAX_FPS  # False for NaN; no float() overflow on huge ints
        ):
            raise ClipError(f"clip.json: fps must be a number in (0, {MAX_FPS:g}], "
                            f"got {_short(fps)}")
        object.__setattr__(self, "fps", float(fps))
        stamps = self.stamps_ns
        if not isinstance(stamps, (list, tuple)) or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_STAMP_NS
            for s in stamps
        ):
            raise ClipError("clip.json: stamps_ns must be a list of integers in "
                            f"[0, {MAX_STAMP_NS}] (nanoseconds)")
        if len(stamps) != self.num_frames:
            raise ClipError(
                f"clip.json: {len(stamps)} stamps for {self.num_frames} frames"
            )
        if any(b < a for a, b in zip(stamps, stamps[1:], strict=False)):
            raise ClipError("clip.json: stamps_ns must be non-decreasing")
        object.__setattr__(self, "stamps_ns", tuple(stamps))
        if self.encoding not in ENCODINGS:
            raise ClipError(
                f"clip.json: encoding must be one of {ENCODINGS}, got {self.encoding!r}"
            )
        for name in ("frame_id", "source", "created"):
            if not isinstance(getattr(self, name), str):
                raise ClipError(f"clip.json: {name} must be a string")

    def to_dict(self) -> dict:
        """Plain JSON-able dict."""
        d = dataclasses.asdict(self)
        d["stamps_ns"] = list(self.stamps_ns)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClipMeta:
        """Parse and validate a ``clip.json`` mapping.

        Raises:
            ClipError: not a mapping, foreign format, missing or malformed fields.
        """
        if not isinstance(data, Mapping):
            raise ClipError("clip.json must contain a JSON object")
        if data.get("format") != CLIP_FORMAT:
            raise ClipError(
                f"not a dino_tracker clip (format {data.get('format')!r}, expected {CLIP_FORMAT})"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        required = {"clip_id", "num_frames", "width", "height", "fps", "stamps_ns"}
        missing = sorted(required - set(data))
        if missing:
            raise ClipError(f"clip.json lacks {', '.join(missing)}")
        kwargs = {k: v for k, v in data.items() if k in names}
        if isinstance(kwargs.get("stamps_ns"), list):
            kwargs["stamps_ns"] = tuple(kwargs["stamps_ns"])
        return cls(**kwargs)

    def frame_name(self, index: int) -> str:
        """File name of frame ``index`` inside ``frames/``."""
        return f"{index:06d}.{self.encoding}"


def _short(value: Any) -> str:
    """``repr`` cut to one short line (for messages about foreign data)."""
    text = repr(value).replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


# -- reading ----------------------------------------------------------------------------
def _to_rgb(frame: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 -> (H, W, 3) uint8 RGB."""
    frame = np.asarray(frame)
    if frame.dtype != np.uint8:
        raise ClipError(f"frames must be uint8, got {frame.dtype}")
    if frame.ndim == 2:
        frame = frame[:, :, None]
    if frame.ndim != 3 or frame.shape[2] not in (1, 3, 4) or 0 in frame.shape[:2]:
        raise ClipError(
            f"frames must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {frame.shape}"
        )
    if frame.shape[2] == 1:
        return np.repeat(frame, 3, axis=2)
    if frame.shape[2] == 4:
        return np.ascontiguousarray(frame[:, :, :3])
    return frame


class Clip:
    """A stored clip (read-only view). Use :meth:`open`.

    Attributes:
        path: the clip directory.
        meta: its :class:`ClipMeta`.
    """

    def __init__(self, path: Path, meta: ClipMeta) -> None:
        self.path = path
        self.meta = meta

    @classmethod
    def open(cls, path: PathLike) -> Clip:
        """Open the clip stored in directory ``path``.

        Raises:
            ClipError: not a clip directory, malformed ``clip.json``, or missing frames.
        """
        path = Path(path).expanduser().absolute()
        meta_path = path / "clip.json"
        if not meta_path.is_file():
            raise ClipError(f"{path} is not a clip (no clip.json)")
        try:
            data = read_json(meta_path)
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise ClipError(f"cannot read {meta_path}: {reason}; restore or remove the clip "
                            "directory") from None
        try:
            meta = ClipMeta.from_dict(data)
        except TypeError as exc:
            raise ClipError(f"malformed {meta_path}: {exc}") from None
        if meta.clip_id != path.name:
            raise ClipError(
                f"{meta_path} names clip {meta.clip_id!r} but its directory is {path.name!r}; "
                "rename the directory back"
            )
        try:
            present = set(os.listdir(path / "frames"))
        except OSError:
            present = set()
        missing = [i for i in range(meta.num_frames) if meta.frame_name(i) not in present]
        if missing:
            raise ClipError(
                f"clip {meta.clip_id!r} misses {len(missing)} of {meta.num_frames} frames "
                f"(first: frames/{meta.frame_name(missing[0])})"
            )
        return cls(path, meta)

    # -- properties ------------------------------------------------------------------
    @property
    def clip_id(self) -> str:
        """The clip's id."""
        return self.meta.clip_id

    def __len__(self) -> int:
        return self.meta.num_frames

    @property
    def size(self) -> tuple[int, int]:
        """Frame size (H, W)."""
        return self.meta.height, self.meta.width

    @property
    def stamps_ns(self) -> np.ndarray:
        """Per-frame stamps, (T,) int64 nanoseconds."""
        return np.asarray(self.meta.stamps_ns, dtype=np.int64)

    @property
    def work_dir(self) -> Path:
        """Preprocessing outputs (``work/``)."""
        return self.path / "work"

    @property
    def model_dir(self) -> Path:
        """Training outputs (``model/``)."""
        return self.path / "model"

    @property
    def cache_dir(self) -> Path:
        """Inference caches (``cache/``)."""
        return self.path / "cache"

    def frame_path(self, index: int) -> Path:
        """Path of frame ``index``'s image file."""
        return self.path / "frames" / self.meta.frame_name(index)

    def __repr__(self) -> str:
        h, w = self.size
        return f"Clip({self.clip_id!r}, {len(self)} frames, {w}x{h}, {self.meta.fps:g} fps)"

    # -- frames ----------------------------------------------------------------------
    def frame(self, index: int) -> np.ndarray:
        """Frame ``index`` as (H, W, 3) uint8 RGB.

        Raises:
            QueryError: ``index`` outside [0, T).
            ClipError: the image file is unreadable or has the wrong size.
        """
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise QueryError(f"frame index must be an integer, got {index!r}")
        index = int(index)
        if not 0 <= index < len(self):
            raise QueryError(
                f"frame {index} is outside clip {self.clip_id!r} (frames 0..{len(self) - 1})"
            )
        path = self.frame_path(index)
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ClipError(f"frame {index} of clip {self.clip_id!r} is unreadable: {path}")
        if bgr.shape[:2] != self.size:
            raise ClipError(
                f"frame {index} of clip {self.clip_id!r} is {bgr.shape[1]}x{bgr.shape[0]}, "
                f"clip.json says {self.meta.width}x{self.meta.height}"
            )
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def read_frames(
        self,
        indices: Iterable[int] | None = None,
        size: tuple[int, int] | None = None,
    ) -> Iterator[np.ndarray]:
        """Yield frames one at a time (bounded RAM), optionally resized.

        Args:
            indices: frame indices (default: all, in order).
            size: (H, W) to resize to with ``INTER_AREA``; ``None`` keeps the original size.

        Yields:
            (H, W, 3) uint8 RGB frames.
        """
        if indices is None:
            indices = range(len(self))
        for i in indices:
            frame = self.frame(i)
            if size is not None and tuple(size) != frame.shape[:2]:
                frame = cv2.resize(
                    frame, (int(size[1]), int(size[0])), interpolation=cv2.INTER_AREA
                )
            yield frame


# -- writing ----------------------------------------------------------------------------
class ClipWriter:
    """Write a clip frame by frame; publish it atomically with :meth:`commit`.

    Frames go to disk as they are added (RAM stays bounded). Use as a context manager:
    leaving the block normally commits, an exception removes everything::

        with ClipWriter(root, "walk", fps=15.0) as w:
            for frame, stamp in source:
                w.add(frame, stamp)
        clip = w.clip

    Args:
        root: the clip directory (parent of all clips).
        clip_id: the new clip's id (:func:`validate_clip_id`).
        fps: nominal frame rate (> 0); default stamps are ``index / fps``.
        frame_id: camera frame of the images.
        source: free text describing where the frames came from.
        encoding: ``png`` (lossless) or ``jpg``.
        overwrite: replace an existing clip of the same id on commit.
        jpeg_quality: JPEG quality (1-100) when ``encoding == "jpg"``.

    Raises:
        ClipError: invalid arguments, or the clip exists and ``overwrite`` is false.
    """

    def __init__(
        self,
        root: PathLike,
        clip_id: str,
        *,
        fps: float,
        frame_id: str = "camera",
        source: str = "",
        encoding: str = "png",
        overwrite: bool = False,
        jpeg_quality: int = 95,
    ) -> None:
        self.path = resolve_clip_path(root, clip_id)
        self.clip_id = clip_id
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= MAX_FPS:
            raise ClipError(f"fps must be a number in (0, {MAX_FPS:g}], got {_short(fps)}")
        if encoding not in ENCODINGS:
            raise ClipError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
        if not 1 <= int(jpeg_quality) <= 100:
            raise ClipError(f"jpeg_quality must be in [1, 100], got {jpeg_quality!r}")
        if self.path.exists() and not overwrite:
            raise ClipError(
                f"clip {clip_id!r} already exists in {self.path.parent}; "
                "choose another id or allow overwriting"
            )
        self.fps = float(fps)
        self.frame_id = str(frame_id)
        self.source = str(source)
        self.encoding = encoding
        self.overwrite = overwrite
        self._params = (
            [cv2.IMWRITE_PNG_COMPRESSION, 1]
            if encoding == "png"
            else [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)]
        )
        self._cm: contextlib.AbstractContextManager | None = None
        self._tmp: Path | None = None
        self._stamps: list[int] = []
        self._size: tuple[int, int] | None = None
        self._anchor = (0, 0)  # (index, stamp) that default stamps count from
        self._done = False
        self.clip: Clip | None = None

    # -- context management ----------------------------------------------------------
    def __enter__(self) -> ClipWriter:
        self._open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.commit()

    def _open(self) -> Path:
        if self._done:
            raise ClipError(f"clip writer for {self.clip_id!r} is already closed")
        if self._tmp is None:
            cm = atomic_dir(self.path, overwrite=self.overwrite)
            try:
                tmp = cm.__enter__()
            except FileExistsError:
                raise ClipError(f"clip {self.clip_id!r} already exists") from None
            self._cm, self._tmp = cm, tmp
            (tmp / "frames").mkdir()
        return self._tmp

    @property
    def staging_dir(self) -> Path:
        """The temporary clip directory; extra files written here are published with the clip."""
        return self._open()

    def __len__(self) -> int:
        return len(self._stamps)

    # -- frames ----------------------------------------------------------------------
    def add(self, frame: np.ndarray, stamp_ns: int | None = None) -> None:
        """Append one frame.

        Args:
            frame: (H, W, 3) uint8 RGB; (H, W) / (H, W, 1) grayscale and (H, W, 4) RGBA are
                converted to RGB.
            stamp_ns: time stamp in nanoseconds, strictly increasing; ``None``: one frame
                period (1/fps) after the previous explicit stamp per frame (``index / fps``
                when no stamps are given).

        Raises:
            ClipError: wrong dtype or shape, a size change, a non-increasing stamp, or a
                failed write.
        """
        tmp = self._open()
        rgb = _to_rgb(frame)
        hw = (int(rgb.shape[0]), int(rgb.shape[1]))
        if self._size is None:
            self._size = hw
        elif hw != self._size:
            raise ClipError(
                f"frame {len(self)} is {hw[1]}x{hw[0]} but the clip is "
                f"{self._size[1]}x{self._size[0]}; all frames must have the same size"
            )
        index = len(self._stamps)
        if stamp_ns is None:
            i0, s0 = self._anchor
            stamp = s0 + round((index - i0) * 1e9 / self.fps)
        else:
            if isinstance(stamp_ns, bool) or not isinstance(stamp_ns, (int, np.integer)):
                raise ClipError(f"stamp_ns must be an integer, got {stamp_ns!r}")
            stamp = int(stamp_ns)
        if self._stamps and stamp <= self._stamps[-1]:
            raise ClipError(
                f"frame {index}: stamp {stamp} ns does not increase "
                f"(previous {self._stamps[-1]} ns)"
            )
        if not 0 <= stamp <= MAX_STAMP_NS:
            raise ClipError(f"frame {index}: stamp {stamp} ns is outside [0, {MAX_STAMP_NS}]")
        name = f"{index:06d}.{self.encoding}"
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        ok, data = cv2.imencode(f".{self.encoding}", bgr, self._params)
        if not ok:
            raise ClipError(f"cannot encode frame {index} of clip {self.clip_id!r}")
        # Written by Python, not cv2.imwrite: a full disk or a file size limit raises with
        # its real reason (StorageError) instead of a bare failure flag.
        target = tmp / "frames" / name
        try:
            with open(target, "wb") as f:
                f.write(data.tobytes())
        except OSError as exc:
            raise disk_error(self.path / "frames" / name, exc) from None
        self._stamps.append(stamp)
        if stamp_ns is not None:
            self._anchor = (index, stamp)

    # -- finishing -------------------------------------------------------------------
    def commit(self) -> Clip:
        """Write ``clip.json`` and rename the clip into place atomically.

        Raises:
            ClipError: no frames were added (the partial clip is removed).
        """
        if self._done:
            if self.clip is None:
                raise ClipError(f"clip writer for {self.clip_id!r} was aborted")
            return self.clip
        tmp = self._open()
        if not self._stamps:
            self.abort()
            raise ClipError(f"clip {self.clip_id!r} has no frames; add at least one")
        assert self._size is not None
        meta = ClipMeta(
            clip_id=self.clip_id,
            num_frames=len(self._stamps),
            width=self._size[1],
            height=self._size[0],
            fps=self.fps,
            stamps_ns=tuple(self._stamps),
            frame_id=self.frame_id,
            source=self.source,
            encoding=self.encoding,
            created=_now_iso(),
        )
        try:
            write_json_atomic(tmp / "clip.json", meta.to_dict())
        except BaseException:
            self.abort()
            raise
        self._done = True
        assert self._cm is not None
        try:
            self._cm.__exit__(None, None, None)  # the rename; removes the temp dir if it fails
        except FileExistsError:  # another writer published the same id meanwhile
            raise ClipError(f"clip {self.clip_id!r} was created by someone else meanwhile; "
                            "choose another id") from None
        self.clip = Clip.open(self.path)
        log.info("wrote %s", self.clip)
        return self.clip

    def abort(self) -> None:
        """Discard everything written so far (idempotent)."""
        if self._done:
            return
        self._done = True
        if self._cm is not None:
            err = ClipError("clip writing aborted")
            with contextlib.suppress(ClipError):
                self._cm.__exit__(ClipError, err, None)


def write_clip(
    root: PathLike,
    clip_id: str,
    frames: Iterable[np.ndarray],
    *,
    fps: float,
    stamps_ns: Sequence[int] | None = None,
    frame_id: str = "camera",
    source: str = "",
    overwrite: bool = False,
    encoding: str = "png",
) -> Clip:
    """Write ``frames`` (each (H, W, 3) uint8 RGB) as clip ``clip_id`` under ``root``.

    Args:
        stamps_ns: one stamp per frame (strictly increasing); default ``index / fps``.

    Raises:
        ClipError: see :class:`ClipWriter`; also a stamp count that differs from the frames.
    """
    with ClipWriter(
        root, clip_id, fps=fps, frame_id=frame_id, source=source, encoding=encoding,
        overwrite=overwrite,
    ) as writer:
        count = 0
        for i, frame in enumerate(frames):
            if stamps_ns is not None and i >= len(stamps_ns):
                raise ClipError(f"more frames than the {len(stamps_ns)} stamps given")
            writer.add(frame, None if stamps_ns is None else int(stamps_ns[i]))
            count += 1
        if stamps_ns is not None and count != len(stamps_ns):
            raise ClipError(f"{count} frames but {len(stamps_ns)} stamps")
    assert writer.clip is not None
    return writer.clip


def clip_from_array(
    frames: np.ndarray,
    root: PathLike,
    clip_id: str,
    *,
    fps: float = 30.0,
    stamps_ns: Sequence[int] | None = None,
    frame_id: str = "camera",
    source: str = "array",
    overwrite: bool = False,
) -> Clip:
    """Store a (T, H, W, 3) uint8 RGB array (or memmap) as a clip."""
    frames = np.asarray(frames) if not isinstance(frames, np.ndarray) else frames
    if frames.ndim not in (3, 4):
        raise ClipError(f"frames must be (T, H, W, 3) or (T, H, W); got shape {frames.shape}")
    return write_clip(
        root, clip_id, (frames[i] for i in range(frames.shape[0])), fps=fps,
        stamps_ns=stamps_ns, frame_id=frame_id, source=source, overwrite=overwrite,
    )


def _id_from_name(name: str) -> str:
    """A valid clip id derived from a file name, or a time-based one."""
    candidate = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._-")[:128]
    candidate = re.sub(r"\.\.+", ".", candidate)
    try:
        return validate_clip_id(candidate)
    except ClipError:
        return default_clip_id()


def _check_stride(stride: int, max_frames: int | None) -> None:
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ClipError(f"stride must be a positive integer, got {stride!r}")
    if max_frames is not None and (not isinstance(max_frames, int) or max_frames < 1):
        raise ClipError(f"max_frames must be a positive integer, got {max_frames!r}")


def clip_from_video(
    video_path: PathLike,
    root: PathLike,
    clip_id: str | None = None,
    *,
    start: int = 0,
    max_frames: int | None = None,
    stride: int = 1,
    overwrite: bool = False,
) -> Clip:
    """Import a video file (anything OpenCV decodes) as a clip.

    Args:
        video_path: the video file.
        root: the clip directory.
        clip_id: the new clip's id (default: from the file name).
        start: first frame index to import.
        max_frames: import at most this many frames.
        stride: keep every ``stride``-th frame.
        overwrite: replace an existing clip of the same id.

    The clip's fps is the file's fps divided by ``stride``; stamps are the original frame
    index divided by the file's fps.

    Raises:
        ClipError: unreadable video, no frames decoded, or a bad argument.
    """
    video_path = Path(video_path)
    _check_stride(stride, max_frames)
    if not isinstance(start, int) or start < 0:
        raise ClipError(f"start must be a non-negative integer, got {start!r}")
    if not video_path.is_file():
        raise ClipError(f"video file not found: {video_path}")
    cap = cv2.VideoCapture(str(video_path))
    try:
        if not cap.isOpened():
            raise ClipError(f"OpenCV cannot open video {video_path}")
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        if not (math.isfinite(fps) and fps > 0):
            log.warning("video %s reports no frame rate; assuming 30 fps", video_path)
            fps = 30.0
        clip_id = clip_id if clip_id is not None else _id_from_name(video_path.stem)
        writer = ClipWriter(
            root, clip_id, fps=fps / stride, source=str(video_path.absolute()),
            overwrite=overwrite,
        )
        with writer:
            index = 0
            while max_frames is None or len(writer) < max_frames:
                keep = index >= start and (index - start) % stride == 0
                if keep:
                    ok, bgr = cap.read()
                else:
                    ok, bgr = cap.grab(), None
                if not ok:
                    break
                if keep:
                    writer.add(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), round(index * 1e9 / fps))
                index += 1
            if len(writer) == 0:
                writer.abort()
                raise ClipError(
                    f"no frames could be decoded from {video_path} (from frame {start})"
                )
    finally:
        cap.release()
    assert writer.clip is not None
    return writer.clip


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def clip_from_frames_dir(
    frames_dir: PathLike,
    root: PathLike,
    clip_id: str | None = None,
    *,
    fps: float = 30.0,
    stride: int = 1,
    max_frames: int | None = None,
    overwrite: bool = False,
) -> Clip:
    """Import a folder of images (png, jpg, jpeg, bmp; natural sort order) as a clip.

    Raises:
        ClipError: no images, an unreadable image, differing sizes, or a bad argument.
    """
    frames_dir = Path(frames_dir)
    _check_stride(stride, max_frames)
    if not frames_dir.is_dir():
        raise ClipError(f"frames directory not found: {frames_dir}")
    files = sorted(
        (p for p in frames_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
        key=lambda p: _natural_key(p.name),
    )[::stride]
    if max_frames is not None:
        files = files[:max_frames]
    if not files:
        raise ClipError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) in {frames_dir}"
        )

    def frames() -> Iterator[np.ndarray]:
        for p in files:
            bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
            if bgr is None:
                raise ClipError(f"cannot read image {p}")
            yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    return write_clip(
        root, clip_id if clip_id is not None else _id_from_name(frames_dir.name), frames(),
        fps=fps, source=str(frames_dir.absolute()), overwrite=overwrite,
    )


# -- finding clips ----------------------------------------------------------------------
def list_clips(root: PathLike) -> list[Clip]:
    """All valid clips under ``root``, sorted by first stamp then id.

    Temporary (dot) directories, directories without ``clip.json``, names that are not
    valid clip ids and links that lead outside ``root`` are skipped; malformed or unreadable
    clips are skipped with a warning. A missing or unreadable ``root`` gives ``[]``.
    """
    root = Path(root).expanduser()
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return []
    clips = []
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        if not (entry / "clip.json").exists():
            continue
        try:
            clips.append(Clip.open(resolve_clip_path(root, entry.name)))
        except (ClipError, OSError) as exc:
            log.warning("skipping clip %s: %s", entry, exc)
    clips.sort(key=lambda c: (c.meta.stamps_ns[0], c.clip_id))
    return clips


def sweep_clip_dir(root: PathLike) -> list[Path]:
    """Remove the temporaries that dead processes left in ``root`` and in its clips'
    ``work/``, ``model/`` and ``cache/`` folders (see :func:`.storage.sweep_temps`).

    Returns the removed paths.
    """
    root = Path(root).expanduser()
    removed = sweep_temps(root)
    for clip in list_clips(root):
        for sub in (clip.work_dir, clip.model_dir, clip.cache_dir):
            removed += sweep_temps(sub)
    if removed:
        log.info("removed %d temporaries left by dead processes in %s", len(removed), root)
    return removed


def open_clip(root: PathLike, clip_id: str) -> Clip:
    """Open clip ``clip_id`` under ``root``.

    Raises:
        ClipError: invalid or unknown id, or a malformed clip.
    """
    path = resolve_clip_path(root, clip_id)
    if not (path / "clip.json").is_file():
        raise ClipError(f"unknown clip id '{clip_id}'; list_clips shows the stored clips")
    return Clip.open(path)
