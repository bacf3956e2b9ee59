"""Reading queries and writing track results (CSV, NPZ) for the CLI and the demo."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import QueryError
from .storage import atomic_path

__all__ = ["read_queries", "write_tracks"]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_queries(path: Path) -> np.ndarray:
    """Read query points from a file.

    Accepts a CSV with ``t,x,y`` (or ``frame,x,y``) columns, header optional, or a JSON list
    of ``[t, x, y]`` or ``{"frame": t, "x": x, "y": y}``.

    Returns:
        queries: (N, 3) float64 (t, x, y) in original pixels.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise QueryError(f"cannot read queries from {path}: {exc}") from None
    rows: list[Sequence[float]] = []
    try:
        if path.suffix.lower() == ".json":
            for item in json.loads(text):
                if isinstance(item, dict):
                    rows.append((item.get("frame", item.get("t")), item["x"], item["y"]))
                else:
                    rows.append(item)
        else:
            for rec in csv.reader(line for line in text.splitlines() if line.strip()):
                if not rows and rec and not _is_number(rec[0]):
                    continue  # header line
                rows.append(rec)
        queries = np.asarray(rows, dtype=np.float64)
        if queries.ndim != 2 or queries.shape[1] != 3:
            raise ValueError
    except (ValueError, KeyError, TypeError, json.JSONDecodeError):
        raise QueryError(f"{path}: expected rows of t,x,y (CSV) or [t, x, y] (JSON)") from None
    if len(queries) == 0:
        raise QueryError(f"{path} holds no queries")
    return queries


def write_tracks(out_dir: Path, result, clip_id: str) -> dict[str, Path]:
    """Write a track result as ``tracks.npz`` and ``tracks.csv`` (atomically) into ``out_dir``.

    Args:
        out_dir: destination folder (created).
        result: a :class:`~dino_tracker_ros.core.predictor.TrackResult`.
        clip_id: stored in the NPZ.

    Returns:
        The written paths by kind (``npz``, ``csv``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    npz, csv_path = out_dir / "tracks.npz", out_dir / "tracks.csv"
    with atomic_path(npz) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, tracks=result.tracks, visible=result.visible,
                            visibility=result.visibility, queries=result.queries,
                            stamps_ns=result.stamps_ns, clip_id=np.array(clip_id))
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["query", "frame", "stamp_ns", "x", "y", "visible", "visibility"])
        n, t = result.visible.shape
        for i in range(n):
            for j in range(t):
                x, y = result.tracks[i, j]
                w.writerow([i, j, int(result.stamps_ns[j]), f"{x:.3f}", f"{y:.3f}",
                            int(result.visible[i, j]), f"{result.visibility[i, j]:.4f}"])
    return {"npz": npz, "csv": csv_path}
