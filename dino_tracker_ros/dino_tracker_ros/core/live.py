"""Live tracking: follow a trained clip's query points in new frames, one frame at a time.

A :class:`LivePredictor` holds a trained clip's model (Delta-DINO + tracker head), the
frozen DINOv2 backbone the clip was preprocessed with (same model, block, stride, weights
and precision, from the configuration stored in the model file), and the refined features
of the queries, sampled from the clip's refined-feature cache (built on open when missing).
:meth:`LivePredictor.step` then takes any RGB frame, of any size:

1. resizes it to the model's working size (``INTER_AREA``, as the clip's frames were),
2. computes its refined features ``Phi = Phi_DINO + Phi_Delta`` (the DINO tokens are
   rounded through float16, as the clip's stored features were),
3. locates every query with the tracker head (cosine cost map, refiner, soft-argmax in a
   disc around the peak; :meth:`~.predictor.Predictor._predict`),
4. scores visibility (below) and maps positions back to the live frame's own pixels.

**Visibility on live frames.** Offline, trajectory agreement compares a point's predictions
across the whole clip; live, only the query's own frame and the last few processed frames
exist. So, for each query with live prediction ``p`` and unit feature ``f`` at ``p``:

* the anchors are the query's own clip frame plus those of the last ``track.live_history``
  processed live frames where that point was an anchor (judged visible, with similarity to
  the query feature at least ``track.anchor_cos``);
* ``f`` is matched into every anchor frame (the tracker head on the cached refined features
  of the query frame, on the kept features of the live frames); ``d`` is the (lower) median
  over anchors of the distance from that match to the point there (the query point; the
  prediction made in that live frame), as in the trajectory-agreement rule;
* ``cos`` is the similarity between the query feature and ``f``.

A frame is occluded when ``d`` exceeds ``track.live_threshold`` token strides (in working
pixels: ``live_threshold * backbone.stride``; offline, the threshold comes from the anchors'
agreement among themselves over the whole clip, which a live stream cannot provide) or when
``cos < track.occlusion_cos``. The score is :func:`~.visibility.visibility_score` with that
distance and threshold (the offline rule's margins: sigmoid of the smaller margin, 0.5
exactly at the decision), so ``visible == (score >= track.visibility_threshold)`` with the
default threshold 0.5. Occluded points still get a position (the best match), flagged not
visible. On synthetic clips with a random-init backbone the median over anchors scored a
slightly better occlusion accuracy than requiring both the query-frame cycle and the
history to agree (OA 0.64 / 0.69 vs 0.63 / 0.62 on two seeds) or the query-frame cycle
alone (0.63 / 0.61).

Memory is bounded: the history is a ring of ``live_history`` frames (unit features in the
anchor pass's dtype plus positions), and the query frames' features are kept in RAM up to
:data:`QUERY_FRAMES_BYTES` (beyond that, read from the memory-mapped cache each step).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, NamedTuple, Union

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .backbone import to_input
from .clip import Clip
from .config import TrackConfig
from .errors import QueryError
from .geometry import rescale_points
from .predictor import Predictor, validate_queries
from .visibility import visibility_score

__all__ = ["LivePredictor", "LiveResult", "QUERY_FRAMES_BYTES"]

QUERY_FRAMES_BYTES = 1 << 28  # query frames' unit features kept in RAM (else read per step)
_EPS = 1e-8  # as the head's cosine
# the last backbone built, reused while the settings and device stay the same (building a
# ViT-L takes seconds; live tracking is often switched on and off for the same clip)
_BACKBONE_SLOT: dict = {}
_BACKBONE_LOCK = threading.Lock()


def _shared_backbone(cfg: Any, device: torch.device) -> Any:
    """``build_backbone(cfg, device)``, reusing the previous one when nothing differs."""
    from .backbone import build_backbone

    key = (repr(cfg), str(device))
    with _BACKBONE_LOCK:
        if _BACKBONE_SLOT.get("key") != key:
            _BACKBONE_SLOT.clear()  # drop the old one before building the next
            _BACKBONE_SLOT.update(key=key, backbone=build_backbone(cfg, device))
        return _BACKBONE_SLOT["backbone"]

PathLike = Union[str, "os.PathLike[str]"]


class LiveResult(NamedTuple):
    """The queries located in one live frame.

    Attributes:
        positions: (N, 2) float32 (x, y) in the live frame's own pixels.
        visible: (N,) bool, ``visibility >= track.visibility_threshold``.
        visibility: (N,) float32 score in [0, 1].
        stamp_ns: the frame's stamp, as given to :meth:`LivePredictor.step`.
        size_hw: the live frame's (H, W).
        seconds: wall time of the step.
    """

    positions: np.ndarray
    visible: np.ndarray
    visibility: np.ndarray
    stamp_ns: int
    size_hw: tuple[int, int]
    seconds: float


class _Past(NamedTuple):
    """One processed live frame kept for the agreement check (working pixels)."""

    features: torch.Tensor  # (C, h * w) unit-norm, anchor dtype
    positions: torch.Tensor  # (N, 2)
    anchor: torch.Tensor  # (N,) bool


class LivePredictor:
    """Streaming predictor of a trained clip's queries on new frames (module docstring).

    Usually made with :meth:`open`.

    Args:
        predictor: the clip's :class:`~.predictor.Predictor` (model and refined features).
        backbone: the clip's frozen DINOv2 (:func:`~.backbone.build_backbone` with the
            model file's ``backbone`` settings).
        queries: (N, 3) (t, x, y) in the clip's original pixels, checked with
            :func:`~.predictor.validate_queries`.
        track_cfg: visibility settings (default: the predictor's).
        clip_id: for messages.

    Raises:
        QueryError: bad queries.
    """

    def __init__(
        self,
        predictor: Predictor,
        backbone: torch.nn.Module,
        queries: Any,
        *,
        track_cfg: TrackConfig | None = None,
        clip_id: str = "",
    ) -> None:
        self.predictor = predictor
        self.backbone = backbone
        self.clip_id = clip_id
        self.track_cfg = track_cfg or predictor.track_cfg
        self.queries = validate_queries(queries, predictor.num_frames, predictor.orig_size)
        self.device = predictor.device
        self.work_size = predictor.work_size
        self._dtype = predictor.anchor_dtype
        self._threshold = float(self.track_cfg.live_threshold) * float(
            predictor.geometry.stride)
        self._history: deque[_Past] = deque(maxlen=max(0, int(self.track_cfg.live_history)))
        frames = self.queries[:, 0].astype(np.int64)
        xy = rescale_points(self.queries[:, 1:], predictor.orig_size, self.work_size)
        with torch.no_grad():
            qf = (predictor.query_features(frames, xy) if len(frames)
                  else torch.zeros(0, predictor.features.shape[1], device=self.device))
        self._qn = F.normalize(qf, dim=-1, eps=_EPS)  # (N, C)
        self._qxy = torch.as_tensor(xy, dtype=torch.float32, device=self.device)  # (N, 2)
        self._frames = frames
        self._groups = [(int(k), torch.as_tensor(np.flatnonzero(frames == k),
                                                 device=self.device))
                        for k in np.unique(frames)]
        c, (h, w) = int(predictor.features.shape[1]), predictor.geometry.grid_hw
        per_frame = c * h * w * torch.tensor([], dtype=self._dtype).element_size()
        keep = max(0, QUERY_FRAMES_BYTES // max(per_frame, 1))
        self._query_maps = {k: self._frame_map(k) for k, _ in self._groups[:keep]}

    @classmethod
    def open(
        cls,
        clip: Clip | PathLike,
        queries: Any,
        *,
        device: str = "auto",
        track_cfg: TrackConfig | None = None,
        precision: str = "auto",
        predictor: Predictor | None = None,
    ) -> LivePredictor:
        """The live predictor of a trained clip's queries.

        Args:
            clip: the clip or its directory.
            queries: (N, 3) (t, x, y) on the clip's frames, original pixels.
            device: torch device (``auto``: CUDA when available).
            track_cfg: inference settings (default: those stored with the model).
            precision: of the visibility checks (see :class:`~.predictor.Predictor`).
            predictor: an already open predictor of this clip (e.g. a cached one).

        Raises:
            QueryError: bad queries (checked before anything is loaded).
            NotTrainedError: the clip has no trained model.
            WeightsError: the backbone's weights are not available.
        """
        from .checkpoint import load_model

        clip = clip if isinstance(clip, Clip) else Clip.open(clip)
        validate_queries(queries, len(clip), clip.size)
        if predictor is None:
            predictor = Predictor.open(clip, device=device, track_cfg=track_cfg,
                                       precision=precision)
        _, cfg, _ = load_model(Path(clip.model_dir) / "model.pt", "cpu")
        backbone = _shared_backbone(cfg.backbone, predictor.device)
        return cls(predictor, backbone, queries, track_cfg=track_cfg or predictor.track_cfg,
                   clip_id=clip.clip_id)

    @property
    def num_queries(self) -> int:
        """N."""
        return len(self.queries)

    def reset(self) -> None:
        """Forget the recent live frames (e.g. after a jump in the stream)."""
        self._history.clear()

    def _frame_map(self, k: int) -> torch.Tensor:
        """Unit features ``(C, h * w)`` of clip frame ``k`` in the anchor dtype."""
        feats = torch.from_numpy(np.array(self.predictor.features[k:k + 1]))
        feats = feats.to(self.device, torch.float32)[0]
        return F.normalize(feats, dim=0, eps=_EPS).flatten(1).to(self._dtype)

    def features(self, frame_rgb: np.ndarray) -> torch.Tensor:
        """Refined features ``(1, C, h, w)`` float32 of a frame resized to the working size."""
        h, w = self.work_size
        if frame_rgb.shape[:2] != (h, w):
            frame_rgb = cv2.resize(frame_rgb, (w, h), interpolation=cv2.INTER_AREA)
        images = to_input(np.ascontiguousarray(frame_rgb), self.device)
        dino = self.backbone(images).half()  # as stored by preprocessing
        return self.predictor.model.refine(images, dino)

    def step(self, frame_rgb: np.ndarray, stamp_ns: int = 0) -> LiveResult:
        """Locate the queries in one frame.

        Args:
            frame_rgb: (H, W, 3) uint8 RGB, any size (at least 2 x 2).
            stamp_ns: the frame's stamp, passed through.

        Returns:
            :class:`LiveResult` in the frame's own pixels.

        Raises:
            QueryError: the frame is not an (H, W, 3) uint8 image.
        """
        t0 = time.perf_counter()
        frame = np.asarray(frame_rgb)
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8 \
                or min(frame.shape[:2]) < 2:
            raise QueryError(f"a live frame must be (H, W, 3) uint8 RGB; got {frame.shape} "
                             f"{frame.dtype}")
        size = (int(frame.shape[0]), int(frame.shape[1]))
        n = self.num_queries
        if n == 0:
            empty = np.zeros(0, np.float32)
            return LiveResult(np.zeros((0, 2), np.float32), np.zeros(0, bool), empty,
                              int(stamp_ns), size, time.perf_counter() - t0)
        with torch.no_grad():
            pos, score = self._locate(self.features(frame))
        out = rescale_points(pos.cpu().numpy(), self.work_size, size).astype(np.float32)
        vis_score = score.cpu().numpy().astype(np.float32)
        visible = vis_score >= float(self.track_cfg.visibility_threshold)
        return LiveResult(out, visible, vis_score, int(stamp_ns), size,
                          time.perf_counter() - t0)

    def _locate(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Working-pixel positions (N, 2) and visibility scores (N,) in refined features."""
        cfg = self.track_cfg
        pred = self.predictor
        tn = F.normalize(target, dim=1, eps=_EPS).flatten(2)  # (1, C, hw)
        pos = pred._predict(self._qn[None], tn)  # (1, N, 2)
        at = F.normalize(pred.model.sample(target, pos), dim=-1, eps=_EPS)[0]  # (N, C)
        pos = pos[0]
        cos = (at * self._qn).sum(-1)
        at_c = at.to(self._dtype)
        # cycle back into each query's own clip frame
        d_q = torch.empty(len(at), device=self.device)
        for k, sel in self._groups:
            fmap = self._query_maps.get(k)
            fmap = self._frame_map(k) if fmap is None else fmap
            back = pred._predict(at_c[sel], fmap)  # (Q_k, 2)
            d_q[sel] = torch.linalg.vector_norm(back.float() - self._qxy[sel], dim=-1)
        # agreement with recent live frames where the point was an anchor
        dist = d_q
        if self._history:
            maps = torch.stack([p.features for p in self._history])  # (P, C, hw)
            there = pred._predict(at_c[None], maps).float()  # (P, N, 2)
            past = torch.stack([p.positions for p in self._history])  # (P, N, 2)
            d_h = torch.linalg.vector_norm(there - past, dim=-1)
            anchor = torch.stack([p.anchor for p in self._history])
            d_h = torch.where(anchor, d_h, torch.full_like(d_h, float("nan")))
            dist = torch.nanmedian(torch.cat([d_q[None], d_h]), dim=0).values
        thr = torch.full((len(at),), self._threshold, device=self.device)
        score = visibility_score(dist[:, None], thr, cos[:, None], cfg.occlusion_cos)[:, 0]
        if self._history.maxlen:
            anchor = (score >= float(cfg.visibility_threshold)) & (cos >= cfg.anchor_cos)
            self._history.append(_Past(tn[0].to(self._dtype), pos, anchor))
        return pos, score
