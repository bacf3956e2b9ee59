"""Track drawing: markers where the tracks are, visible and occluded drawn differently."""

import cv2
import numpy as np
import pytest

from dino_tracker_ros.core.errors import DinoTrackerError
from dino_tracker_ros.core.render import (
    contact_sheet,
    draw_tracks,
    track_colors,
    write_overlay_video,
)


def _scene():
    frame = np.full((80, 120, 3), 40, np.uint8)
    tracks = np.zeros((2, 3, 2))
    tracks[0] = [(10.0, 20.0), (20.0, 20.0), (30.3, 40.6)]  # visible at t=2
    tracks[1] = [(90.0, 20.0), (90.0, 30.0), (90.0, 40.0)]  # occluded at t=2
    visible = np.array([[True, True, True], [True, True, False]])
    colors = np.array([[255, 0, 0], [0, 255, 0]], np.uint8)
    return frame, tracks, visible, colors


def test_visible_filled_occluded_hollow_and_trails():
    frame, tracks, visible, colors = _scene()
    img = draw_tracks(frame, tracks, visible, 2, trail=2, colors=colors, radius=5)
    assert img.shape == frame.shape and (frame == 40).all()  # input untouched
    # visible: the centre and a point half a radius off-axis take the track's colour
    assert tuple(img[41, 30]) == (255, 0, 0) and tuple(img[41, 33]) == (255, 0, 0)
    # occluded: cross through the centre, but inside the ring off the diagonals stays bare
    assert img[40, 90, 1] > 150 and img[40, 90, 0] < 100
    assert tuple(img[40, 93]) == (40, 40, 40) and tuple(img[40, 87]) == (40, 40, 40)
    # ring at the radius is drawn
    assert img[40, 95, 1] > 100
    # trail of track 0 passes through (15, 20) between frames 0 and 1
    assert img[20, 15, 0] > 150 and img[20, 15, 1] < 60
    # track 1: trail between its visible frames 0 and 1, none into its occluded frame 2
    assert img[25, 90, 1] > 150 and tuple(img[32, 90]) == (40, 40, 40)
    # no trail drawn for trail=0
    bare = draw_tracks(frame, tracks, visible, 2, trail=0, colors=colors, radius=5)
    assert tuple(bare[20, 15]) == (40, 40, 40)


def test_non_finite_points_are_skipped_and_colours_distinct():
    frame, tracks, visible, _ = _scene()
    tracks[1, 2] = np.nan
    img = draw_tracks(frame, tracks, visible, 2, trail=0)
    assert (img[:, 70:] == 40).all()
    cols = track_colors(30)
    assert len({tuple(c) for c in cols}) == 30
    with pytest.raises(ValueError):
        draw_tracks(frame, tracks, visible, 3)


def test_overlay_video_and_contact_sheet(tmp_path):
    frame, tracks, visible, colors = _scene()
    frames = np.stack([frame] * 3)
    out = tmp_path / "overlay.mp4"
    assert write_overlay_video(out, iter(frames), tracks, visible, fps=5.0) == 3
    cap = cv2.VideoCapture(str(out))
    n, ok_frames = 0, []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        ok_frames.append(img)
        n += 1
    assert n == 3 and ok_frames[0].shape == (80, 120, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["overlay.mp4"]  # no temp files left
    with pytest.raises(DinoTrackerError):
        write_overlay_video(tmp_path / "empty.mp4", [], tracks, visible, fps=5.0)
    assert not (tmp_path / "empty.mp4").exists()
    sheet = contact_sheet(frames, tracks, visible, [0, 1, 2], cols=2, colors=colors)
    assert sheet.shape == (160, 240, 3)
    assert (sheet[80:, 120:] == 0).all()  # unused tile
    assert tuple(sheet[20, 10]) == (255, 0, 0)  # track 0 at t=0 in the first tile
