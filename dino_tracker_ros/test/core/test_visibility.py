"""Trajectory-agreement visibility: anchor sampling, the decision rule, and the score."""

import numpy as np
import torch

from dino_tracker_ros.core.visibility import (
    agreement_visibility,
    select_anchors,
    visibility_score,
)


def test_select_anchors_keeps_query_frame_and_spreads_the_rest():
    cos = torch.zeros(2, 12)
    cos[0, 1:11] = 0.9  # 10 candidates besides the query frame 0
    cos[1, [4, 7]] = 0.8  # 2 candidates, query on frame 5
    anchors, valid = select_anchors(cos, torch.tensor([0, 5]), 0.7, max_anchors=4)
    # 3 free slots over 10 candidates: ranks floor((j + .5) * 10 / 3) = 1, 5, 8 -> frames 2, 6, 9
    assert anchors[0].tolist() == [0, 2, 6, 9] and valid[0].all()
    assert anchors[1, :3].tolist() == [5, 4, 7] and valid[1].tolist() == [True] * 3 + [False]


def _reference_occlusion(traj, cos, cycle, query_frame, anchor_cos, occlusion_cos):
    """A plain loop over one query with every anchor (the paper's rule, no sampling)."""
    t = len(cos)
    anchors = [a for a in range(t) if cos[a] >= anchor_cos or a == query_frame]
    d = np.array([[np.linalg.norm(cycle[a][s] - traj[a]) for s in range(t)] for a in anchors])
    med = np.array([np.sort(d[:, s])[(len(anchors) - 1) // 2] for s in range(t)])  # lower
    thr = max(med[a] for a in anchors)
    occ = (med > thr) | (cos < occlusion_cos)
    occ[query_frame] = False
    return occ, med, thr


def test_decision_matches_a_plain_loop_and_score_reproduces_it():
    rng = np.random.default_rng(0)
    q_n, t = 40, 9
    traj = rng.uniform(0, 50, (q_n, t, 2))
    cos = rng.uniform(0.4, 1.0, (q_n, t))
    qf = rng.integers(0, t, q_n)
    cos[:, 3] = 0.65  # frame 3 is no anchor but similar enough: distance decides there
    cos[np.arange(q_n), qf] = 1.0
    # cycle[q, a, s]: prediction of frame s's point into frame a, near traj[q, a] mostly
    noise = rng.exponential(1.0, (q_n, t, t, 1)) * rng.normal(size=(q_n, t, t, 2))
    cycle = traj[:, :, None, :] + noise
    cycle[:, :, 3] += 15.0  # frame 3 disagrees everywhere
    tt = torch.from_numpy
    anchors, valid = select_anchors(tt(cos), tt(qf), 0.7, max_anchors=t)
    cyc = torch.gather(
        tt(cycle), 1, anchors[:, :, None, None].expand(-1, -1, t, 2)
    )  # (Q, A, T, 2)
    vis = agreement_visibility(cyc, tt(traj), anchors, valid, tt(cos), tt(qf), 0.6)
    n_occ = 0
    for i in range(q_n):
        occ, med, thr = _reference_occlusion(traj[i], cos[i], cycle[i], qf[i], 0.7, 0.6)
        assert np.allclose(vis.median_dist[i].numpy(), med, atol=1e-4)
        assert abs(float(vis.threshold[i]) - thr) < 1e-4
        assert (~vis.visible[i].numpy() == occ).all(), i
        n_occ += occ.sum()
    assert torch.equal(vis.score >= 0.5, vis.visible)
    assert ((vis.score >= 0) & (vis.score <= 1)).all()
    assert not vis.visible[qf != 3, 3].any()  # the disagreeing frame is occluded
    print(f"occluded fraction {n_occ / (q_n * t):.2f}")
    assert 0.1 < n_occ / (q_n * t) < 0.9


def test_score_is_monotone_and_exact_at_the_boundary():
    thr = torch.tensor([2.0, 2.0, 2.0, 2.0, 0.0, 0.0])
    med = torch.tensor([[1.0], [2.0], [2.0000002], [0.5], [0.0], [1e-30]])
    cos = torch.tensor([[0.9], [0.9], [0.9], [0.6], [0.9], [0.9]])
    s = visibility_score(med, thr, cos, 0.6)[:, 0]
    assert s[0] > 0.5 and s[1] == 0.5 and s[2] < 0.5  # distance tie and just above
    assert 0.5 <= s[3] < 0.501  # cosine at occlusion_cos is visible
    assert s[4] >= 0.5 and s[5] < 0.5  # zero threshold: only exact agreement is visible
    m = torch.linspace(0, 6, 50)[None, :]
    sweep = visibility_score(m, torch.tensor([2.0]), torch.full_like(m, 0.95), 0.6)[0]
    assert (sweep[1:] <= sweep[:-1]).all() and sweep[0] > 0.95 and sweep[-1] < 0.01
