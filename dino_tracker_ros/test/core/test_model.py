"""Delta-DINO, the tracker head (soft-argmax, radius mask), sampling, and model files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dino_tracker_ros.core.checkpoint import load_model, save_model
from dino_tracker_ros.core.config import PROFILES, ModelConfig
from dino_tracker_ros.core.errors import NotTrainedError, WeightsError
from dino_tracker_ros.core.geometry import GridGeometry
from dino_tracker_ros.core.model import (
    DeltaDino,
    DinoTrackerModel,
    NormalizedConv2d,
    TrackerHead,
    sample_points,
)

GEOM = GridGeometry(112, 154, 7)  # token grid 15 x 21
CFG = ModelConfig(delta_channels=(8, 16, 32), radius=20.0)


def _gaussian_logits(centre_xy: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Log of an isotropic Gaussian on the token centres: softmax gives the sampled Gaussian."""
    centres = torch.from_numpy(GEOM.token_centres())  # (h, w, 2)
    d2 = (centres - centre_xy).square().sum(-1)
    return -d2 / (2 * sigma_px**2)


def test_soft_argmax_recovers_a_planted_peak_to_sub_pixel_accuracy() -> None:
    head = TrackerHead(GEOM, CFG)
    h, w = GEOM.grid_hw
    rng = np.random.default_rng(0)
    errors = []
    for _ in range(20):
        # peaks anywhere whose disc (R = 20 px) lies inside the grid
        x = rng.uniform(GEOM.offset + 28, GEOM.grid_to_pixel(w - 1) - 28)
        y = rng.uniform(GEOM.offset + 28, GEOM.grid_to_pixel(h - 1) - 28)
        true = torch.tensor([x, y], dtype=torch.float32)
        logits = _gaussian_logits(true, sigma_px=0.7 * GEOM.stride)
        peak = logits.flatten().argmax()
        pred = head.soft_argmax(logits, peak)
        errors.append(float((pred - true).norm()))
    max_err_tokens = max(errors) / GEOM.stride
    print(f"soft-argmax max error {max(errors):.4f} working px = {max_err_tokens:.5f} tokens")
    assert max_err_tokens < 0.1  # sub-pixel on the token grid (< 0.7 working px)


def test_radius_mask_excludes_a_distractor_outside_r() -> None:
    head = TrackerHead(GEOM, CFG)  # R = 20 px
    far = TrackerHead(GEOM, ModelConfig(delta_channels=(8, 16, 32), radius=1000.0))
    true = torch.tensor([45.3, 51.7])
    distractor = torch.tensor([120.0, 60.0])  # ~75 px away, far outside R
    main = _gaussian_logits(true, 5.0)
    # a broad, heavier blob: most of the softmax mass lies at the distractor
    blob = _gaussian_logits(distractor, 14.0) + 3.0
    logits = torch.logaddexp(main, blob)
    raw_peak = main.flatten().argmax()  # the raw cosine map peaks at the true point
    masked = head.soft_argmax(logits, raw_peak)
    unmasked = far.soft_argmax(logits, raw_peak)
    print(f"with R: error {float((masked - true).norm()):.3f} px; "
          f"without: {float((unmasked - true).norm()):.1f} px")
    assert float((masked - true).norm()) < 0.1 * GEOM.stride
    assert float((unmasked - true).norm()) > 20.0


def test_head_forward_locates_a_matching_token() -> None:
    cfg = ModelConfig(delta_channels=(8, 16, 32), radius=20.0, refiner=False)
    head = TrackerHead(GEOM, cfg)
    h, w = GEOM.grid_hw
    c = h * w
    target = torch.eye(c).reshape(c, h, w)[None]  # every token its own one-hot feature
    tokens = torch.tensor([5 * w + 7, 7 * w + 10, 9 * w + 4])  # discs fully inside
    query = torch.eye(c)[tokens][None]
    pred = head(query, target)[0]
    want = torch.from_numpy(GEOM.token_centres().reshape(-1, 2))[tokens]
    cost = head.cost(query, target)
    assert cost.shape == (1, 3, h, w)
    assert torch.allclose(cost.amax(dim=(-2, -1)), torch.ones(1, 3))
    assert torch.allclose(pred, want, atol=1e-4)


def test_normalized_conv_kernels_sum_to_one() -> None:
    torch.manual_seed(0)
    conv = NormalizedConv2d(4, 3)
    sums = conv.normalized_weight().sum(dim=(2, 3))
    assert torch.allclose(sums, torch.ones(3, 4), atol=1e-5)
    x = torch.full((1, 4, 9, 9), 2.0)
    y = conv(x)  # a constant map keeps its level (plus the bias) away from the border
    assert torch.allclose(y[0, :, 4, 4], 4 * 2.0 + conv.bias, atol=1e-4)


def test_zero_initialised_delta_gives_pure_dino_features() -> None:
    torch.manual_seed(0)
    model = DinoTrackerModel(24, GEOM, CFG)
    images = torch.rand(2, 3, GEOM.height, GEOM.width)
    dino = torch.randn(2, 24, *GEOM.grid_hw).half()
    for train in (True, False):
        model.train(train)
        refined = model.refine(images, dino)
        assert refined.dtype == torch.float32
        assert torch.equal(refined, dino.float())
    out = model.delta(images)
    assert out.shape == (2, 24, 14, 20)  # stride 8: ceil(112 / 8), ceil(154 / 8)
    assert model.delta.stride == 8 and model.delta.offset == pytest.approx(3.5)


def test_delta_dino_learns_a_residual() -> None:
    torch.manual_seed(0)
    geom = GridGeometry(42, 56, 7)  # token grid 5 x 7
    model = DinoTrackerModel(8, geom, CFG)
    images = torch.rand(2, 3, geom.height, geom.width)
    dino = torch.randn(2, 8, *geom.grid_hw)
    goal = torch.randn(2, 8, *geom.grid_hw)
    opt = torch.optim.Adam(model.delta.parameters(), lr=0.01)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = (model.refine(images, dino) - (dino + goal)).square().mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    # gradients flow through the zero-initialised last layer
    assert losses[-1] < 0.9 * losses[0]


def test_gather_sampling_matches_grid_sample() -> None:
    torch.manual_seed(0)
    model = DinoTrackerModel(16, GEOM, CFG)
    feats = torch.randn(3, 16, *GEOM.grid_hw)
    xy = torch.rand(3, 50, 2) * torch.tensor([GEOM.width + 20.0, GEOM.height + 20.0]) - 10.0
    ref = model.sample(feats, xy)  # (3, 50, 16), border padding outside
    frame = torch.arange(3).repeat_interleave(50)
    got = sample_points(feats, frame, xy.reshape(-1, 2), GEOM).reshape(3, 50, 16)
    assert torch.allclose(ref, got, atol=1e-5)
    # at a token centre the sample is that token's feature
    centre = torch.from_numpy(GEOM.token_centres()[4, 6])[None, None]
    assert torch.allclose(model.sample(feats[:1], centre)[0, 0], feats[0, :, 4, 6], atol=1e-5)


def test_delta_dino_rejects_mismatched_dilations() -> None:
    from dino_tracker_ros.core.errors import ConfigError

    with pytest.raises(ConfigError, match="delta_dilations"):
        DeltaDino(8, ModelConfig(delta_channels=(8, 16), delta_dilations=(1, 1, 1, 2)))


def test_model_file_round_trip_and_errors(tmp_path) -> None:
    cfg = PROFILES["tiny"]
    geom = GridGeometry(112, 154, cfg.backbone.stride)
    torch.manual_seed(0)
    model = DinoTrackerModel(32, geom, cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = save_model(tmp_path / "model" / "model.pt", model, cfg, image_size=(112, 154),
                      orig_size=(96, 128), extra={"iterations": 3})
    loaded, cfg2, meta = load_model(path, "cpu")
    assert cfg2 == cfg
    assert meta["image_size"] == (112, 154) and meta["orig_size"] == (96, 128)
    assert meta["extra"]["iterations"] == 3 and not loaded.training
    model.eval()
    images = torch.rand(1, 3, 112, 154)
    dino = torch.randn(1, 32, *geom.grid_hw)
    with torch.no_grad():
        a = model.refine(images, dino)
        b = loaded.refine(images, dino)
        q = model.sample(a, torch.tensor([[[30.0, 40.0]]]))
        assert torch.equal(a, b)
        assert torch.equal(model.predict(q, a), loaded.predict(q, b))

    with pytest.raises(NotTrainedError):
        load_model(tmp_path / "missing.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(WeightsError):
        load_model(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(WeightsError):
        load_model(foreign)
    other = tmp_path / "other.pt"
    save_model(other, DinoTrackerModel(16, geom, cfg.model), cfg, image_size=(112, 154),
               orig_size=(96, 128))
    obj = torch.load(other, weights_only=True)
    obj["channels"] = 32  # claims 32 channels but holds a 16-channel model
    torch.save(obj, other)
    with pytest.raises(WeightsError, match="does not match"):
        load_model(other)


def test_head_runs_on_cost_maps_under_bf16_autocast() -> None:
    head = TrackerHead(GEOM, CFG)
    feats = F.normalize(torch.randn(1, 16, *GEOM.grid_hw), dim=1)
    q = feats[:, :, 6, 9][:, None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = head(q, feats)
    assert pred.dtype == torch.float32 and torch.isfinite(pred).all()


def test_soft_argmax_stays_in_the_disc_when_the_map_peaks_far_outside() -> None:
    # An untrained refiner gives logits in the hundreds: a whole-map softmax would put all
    # its mass at the far peak and underflow inside the disc. The disc's own softmax is exact.
    head = TrackerHead(GEOM, CFG)  # R = 20 px
    true = torch.tensor([45.3, 51.7])
    logits = _gaussian_logits(true, 6.0)
    far = torch.from_numpy(GEOM.token_centres())[10, 18]  # ~90 px away
    logits = logits.clone()
    logits[10, 18] = 500.0
    peak = _gaussian_logits(true, 6.0).flatten().argmax()
    got = head.soft_argmax(logits, peak)
    centres = torch.from_numpy(GEOM.token_centres()).reshape(-1, 2).double()
    flat = logits.flatten().double()
    inside = (centres - centres[peak]).square().sum(-1) <= 20.0**2
    w = torch.exp(flat[inside] - flat[inside].max())
    want = (w[:, None] * centres[inside]).sum(0) / w.sum()
    assert float((got.double() - want).norm()) < 1e-4
    assert float((got - far).norm()) > 60.0
    assert float((got - true).norm()) < 1.0


def test_windowed_head_matches_the_full_map_head_in_values_and_gradients() -> None:
    torch.manual_seed(3)
    head = TrackerHead(GEOM, CFG)  # randomly initialised refiner: logits in the hundreds
    feats = F.normalize(torch.randn(1, 32, *GEOM.grid_hw), dim=1)
    q = F.normalize(feats[0, :, [2, 7, 14], [3, 10, 20]].T[None] + 0.3 * torch.randn(1, 3, 32),
                    dim=-1)
    cost = torch.einsum("bqc,bchw->bqhw", q, feats)
    results = []
    for fn in (head.locate, head.locate_windowed):
        c = cost.clone().requires_grad_(True)
        head.zero_grad()
        pos = fn(c)
        (pos * torch.tensor([1.0, -2.0])).sum().backward()
        grads = [p.grad.clone() for p in head.parameters()]
        results.append((pos.detach(), c.grad.clone(), grads))
    (p_full, g_full, w_full), (p_win, g_win, w_win) = results
    assert float((p_full - p_win).abs().max()) < 1e-3
    assert float(g_full.abs().max()) > 0  # the head is differentiable here
    assert torch.allclose(g_full, g_win, atol=1e-5 * float(g_full.abs().max()))
    scale = max(float(a.abs().max()) for a in w_full)
    for a, b in zip(w_full, w_win, strict=True):  # the last bias's gradient is exactly 0
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5 * scale)


def test_blur_pool_is_the_binomial_filter() -> None:
    from dino_tracker_ros.core.model import BlurPool

    def blur_axis(a: np.ndarray, axis: int) -> np.ndarray:
        # reflect-pad (1, 2), then out[k] = (a[2k] + 3 a[2k+1] + 3 a[2k+2] + a[2k+3]) / 8
        pad = [(0, 0)] * a.ndim
        pad[axis] = (1, 2)
        a = np.moveaxis(np.pad(a, pad, mode="reflect"), axis, 0)
        n = (a.shape[0] - 2) // 2
        out = sum(c * a[j:j + 2 * n:2] for j, c in enumerate((1, 3, 3, 1))) / 8.0
        return np.moveaxis(out, 0, axis)

    for hw in ((9, 12), (10, 13), (31, 30)):
        x = torch.randn(2, 4, *hw, dtype=torch.float64)
        want = blur_axis(blur_axis(x.numpy(), 2), 3)
        got = BlurPool(4).double()(x)
        assert got.shape == want.shape == (2, 4, (hw[0] + 1) // 2, (hw[1] + 1) // 2)
        assert np.allclose(got.numpy(), want, atol=1e-12)
        xc = x.float().contiguous(memory_format=torch.channels_last)
        assert torch.allclose(BlurPool(4)(xc), torch.from_numpy(want).float(), atol=1e-5)
