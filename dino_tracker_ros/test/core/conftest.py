"""Shared fixtures of the core tests."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Small tensors: one intra-op thread. With 2 threads on a busy 2-core machine torch's
    OpenMP barriers made these tests up to 60x slower (measured); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def write_flow_tracks():
    """Write hand-built flow tracks in the on-disk layout of ``core.flow.FlowTracks``.

    Call as ``write_flow_tracks(dir, starts, tracks, num_frames, (H, W))`` where ``tracks``
    holds one ``(L_i, 2)`` array of working-pixel positions per track.
    """

    def write(path, starts, tracks, num_frames, hw):
        lengths = np.array([len(t) for t in tracks], np.int32)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        np.save(path / "flow_starts.npy", np.array(starts, np.int32))
        np.save(path / "flow_lengths.npy", lengths)
        np.save(path / "flow_offsets.npy", offsets)
        np.save(path / "flow_points.npy", np.concatenate(tracks).astype(np.float32))
        meta = {"num_frames": num_frames, "height": hw[0], "width": hw[1]}
        (path / "flow_meta.json").write_text(json.dumps(meta))

    return write
