"""DINOv2 backbone: official-format weight loading, stride, position embeddings, features."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from dino_tracker_ros.core import backbone as bb
from dino_tracker_ros.core.backbone import (
    RANDOM_INIT_WARNING,
    build_backbone,
    extract_features,
    hub_checkpoint_path,
    interpolate_pos_embed,
    normalise,
    official_to_timm,
    resolve_precision,
    to_input,
)
from dino_tracker_ros.core.config import BackboneConfig
from dino_tracker_ros.core.errors import Cancelled, ConfigError, WeightsError
from dino_tracker_ros.core.geometry import GridGeometry, working_size
from dino_tracker_ros.core.progress import CancelToken


def _cfg(**kw) -> BackboneConfig:
    base = dict(model="dinov2_vits14", layer=2, stride=14, precision="fp32")
    return BackboneConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def official_ckpt(tmp_path_factory):
    """A ViT-S/14 checkpoint in the official DINOv2 layout (random weights)."""
    with torch.device("meta"):
        vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=518)
    gen = torch.Generator().manual_seed(0)
    official = {}
    for name, p in vit.state_dict().items():
        # timm's ViT-S/14 names equal the official ones (the official file adds mask_token);
        # layer scales get O(1) values so that every block matters
        scale = 0.5 if name.endswith("gamma") else 0.05
        official[name] = torch.randn(p.shape, generator=gen) * scale
    official["mask_token"] = torch.zeros(1, 384)
    assert official["pos_embed"].shape == (1, 1370, 384)
    assert "blocks.0.ls1.gamma" in official and "patch_embed.proj.weight" in official
    path = tmp_path_factory.mktemp("ckpt") / "dinov2_vits14_pretrain.pth"
    torch.save(official, path)
    return path


@pytest.fixture(scope="module")
def random_s7():
    """A random ViT-S/14 at stride 7 using blocks 0-1 (fast)."""
    return build_backbone(_cfg(random_init=True, stride=7, layer=1), "cpu")


def test_loader_reads_official_checkpoint_and_matches_timm(official_ckpt):
    backbone = build_backbone(_cfg(weights=str(official_ckpt), layer=1), "cpu")
    assert not backbone.random_init and backbone.weights_path == official_ckpt
    assert backbone.channels == 384 and backbone.patch == 14 and backbone.stride == 14
    assert len(backbone.vit.blocks) == 2  # only blocks[:layer + 1] are kept
    official = torch.load(official_ckpt, weights_only=True)
    for name in ("blocks.1.attn.qkv.weight", "blocks.0.ls1.gamma", "pos_embed", "cls_token"):
        assert torch.equal(backbone.vit.state_dict()[name], official[name]), name
    # timm's own loader of official files, same architecture
    ref = timm.create_model("vit_small_patch14_dinov2", pretrained=True, img_size=518,
                            pretrained_cfg_overlay=dict(file=str(official_ckpt))).eval()
    x = torch.rand(1, 3, 518, 518, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref.forward_intermediates(normalise(x), indices=[1], norm=False,
                                         stop_early=True, intermediates_only=True)[0]
    got = backbone(x)
    assert got.shape == want.shape == (1, 384, 37, 37) and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert want.abs().mean() > 0.1  # not a trivially small signal
    assert all(not p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.training


def test_official_to_timm_renames_swiglu_and_drops_mask_token():
    sd = {"mask_token": torch.zeros(1, 4), "cls_token": torch.zeros(1, 1, 4),
          "blocks.3.mlp.w12.weight": torch.ones(8, 4), "blocks.3.mlp.w3.bias": torch.ones(4)}
    out = official_to_timm(sd)
    assert set(out) == {"cls_token", "blocks.3.mlp.fc1.weight", "blocks.3.mlp.fc2.bias"}
    assert out["blocks.3.mlp.fc1.weight"].shape == (8, 4)


def test_weights_errors(tmp_path, official_ckpt):
    with pytest.raises(WeightsError, match="not found"):
        build_backbone(_cfg(weights=str(tmp_path / "nope.pth")), "cpu")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        build_backbone(_cfg(weights=str(garbage)), "cpu")
    with pytest.raises(WeightsError, match="does not match dinov2_vitb14"):
        build_backbone(_cfg(model="dinov2_vitb14", weights=str(official_ckpt)), "cpu")
    partial = torch.load(official_ckpt, weights_only=True)
    del partial["blocks.5.attn.qkv.weight"]
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match="1 missing keys"):
        build_backbone(_cfg(weights=str(tmp_path / "partial.pth")), "cpu")


def test_hub_cache_lookup_honours_torch_home(tmp_path, monkeypatch, official_ckpt):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    cache = hub_checkpoint_path("dinov2_vits14")
    assert cache == tmp_path / "th" / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    cache.parent.mkdir(parents=True)
    cache.write_bytes(official_ckpt.read_bytes())
    backbone = build_backbone(_cfg(), "cpu")
    assert backbone.weights_path == cache and not backbone.random_init


def test_offline_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    # a port nothing listens on: as unreachable as an offline machine, on any machine
    monkeypatch.setattr(bb, "DOWNLOAD_URL", "http://127.0.0.1:9/{model}/{model}_pretrain.pth")
    t0 = time.monotonic()
    with pytest.raises(WeightsError) as info:
        build_backbone(_cfg(), "cpu")
    assert time.monotonic() - t0 < 10.0
    msg = str(info.value)
    assert "random_init=true" in msg and "dinov2_vits14_pretrain.pth" in msg
    assert "\n" not in msg
    assert not list((tmp_path / "empty").rglob("*.pth"))


def test_random_init_warns_loudly_and_is_deterministic(caplog):
    with caplog.at_level(logging.WARNING, logger="dino_tracker_ros.core.backbone"):
        backbone = build_backbone(_cfg(random_init=True), "cpu")
    assert backbone.random_init and backbone.weights_path is None
    again = build_backbone(_cfg(random_init=True), "cpu")
    for (name, a), b in zip(backbone.state_dict().items(), again.state_dict().values(),
                            strict=True):
        assert torch.isfinite(a).all() and torch.equal(a, b), name
    qkv = backbone.vit.blocks[0].attn.qkv
    assert abs(qkv.weight.std().item() - 0.02) < 0.002 and qkv.bias.abs().max() == 0
    assert torch.allclose(backbone.vit.blocks[1].ls2.gamma, torch.full((384,), 1e-5))
    assert any("far below the paper" in r.getMessage() for r in caplog.records)
    assert "features carry no learned semantics" in RANDOM_INIT_WARNING


def test_config_errors():
    with pytest.raises(ConfigError, match="blocks 0..11"):
        build_backbone(_cfg(random_init=True, layer=12), "cpu")
    with pytest.raises(ConfigError, match="unknown DINOv2 model"):
        build_backbone(_cfg(model="dinov3", random_init=True), "cpu")


def test_stride7_grid_matches_geometry(random_s7):
    backbone = random_s7
    assert all(blk.attn.fused_attn for blk in backbone.vit.blocks)  # SDPA attention
    hw = working_size((240, 320), 120, 0, 7)
    assert (hw[0] - 14) % 7 == 0 and (hw[1] - 14) % 7 == 0
    out = backbone(torch.rand(1, 3, *hw))
    assert out.shape == (1, 384, *GridGeometry(hw[0], hw[1], 7).grid_hw)
    assert backbone.geometry(*hw).grid_hw == out.shape[-2:]
    with pytest.raises(ConfigError, match="does not fit stride 7"):
        backbone(torch.rand(1, 3, hw[0] + 1, hw[1]))
    assert torch.isfinite(out).all()
    assert tuple(out.shape[-2:]) in {k[0] for k in backbone._pos_cache}  # cached per grid


def _bicubic_1d(values: np.ndarray, out_len: int, inv_scale: float) -> np.ndarray:
    """Reference bicubic resampling (A = -0.75, align_corners=False, clamped taps)."""
    a = -0.75

    def weights(t: float) -> list:
        def near(x):  # |x| <= 1
            return ((a + 2) * x - (a + 3)) * x * x + 1

        def far(x):  # 1 < |x| < 2
            return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

        return [far(t + 1), near(t), near(1 - t), far(2 - t)]

    out = np.empty(out_len)
    n = len(values)
    for d in range(out_len):
        src = (d + 0.5) * inv_scale - 0.5
        i = int(np.floor(src))
        w = weights(src - i)
        out[d] = sum(wk * values[min(max(i - 1 + k, 0), n - 1)] for k, wk in enumerate(w))
    return out


def test_pos_embed_identity_at_518_and_official_sampling_elsewhere():
    pe = torch.randn(1, 1 + 37 * 37, 8)
    assert torch.equal(interpolate_pos_embed(pe, (37, 37)), pe)
    # Embeddings that vary along columns only: the result must be the official 1-D
    # bicubic resampling with scale factor (n + 0.1) / 37, not the size-based one.
    col = np.random.default_rng(0).normal(size=37)
    lin = torch.cat([torch.zeros(1, 1, 1),
                     torch.tensor(np.tile(col, 37), dtype=torch.float32).view(1, -1, 1)], 1)
    h, w = 31, 59
    out = interpolate_pos_embed(lin, (h, w))
    assert out.shape == (1, 1 + h * w, 1)
    grid = out[0, 1:, 0].view(h, w).double().numpy()
    official = _bicubic_1d(col, w, 37 / (w + 0.1))
    size_based = _bicubic_1d(col, w, 37 / w)
    assert np.abs(grid - official[None]).max() < 1e-5
    assert np.abs(grid[0] - size_based).max() > 1e-2


def test_to_input_and_normalise():
    frames = np.random.default_rng(0).integers(0, 256, (2, 28, 42, 3), dtype=np.uint8)
    x = to_input(frames)
    assert x.shape == (2, 3, 28, 42) and x.dtype == torch.float32
    assert torch.allclose(x[1, :, 5, 7] * 255, torch.from_numpy(frames[1, 5, 7]).float())
    n = normalise(torch.ones(1, 3, 2, 2) * 0.485)
    assert n[0, 0].abs().max() < 1e-6 and n[0, 1].mean() > 0
    assert to_input(frames[0]).shape == (1, 3, 28, 42)


def test_extract_features_fp16_matches_direct_forward(tmp_path, random_s7):
    backbone = random_s7
    frames = np.random.default_rng(1).integers(0, 256, (5, 56, 70, 3), dtype=np.uint8)
    reports = []
    feats = extract_features(frames, backbone, tmp_path / "f.npy", batch_frames=2,
                             progress=reports.append, start=0.2, end=0.6)
    h, w = GridGeometry(56, 70, 7).grid_hw
    assert feats.shape == (5, 384, h, w) and feats.dtype == np.float16
    assert isinstance(feats, np.memmap) and not feats.flags.writeable
    direct = backbone(to_input(frames)).numpy()
    scale = np.abs(direct).max()
    assert np.abs(feats.astype(np.float32) - direct).max() <= 1e-3 * scale
    assert reports[-1].stage == "features" and reports[-1].fraction == pytest.approx(0.6)
    assert reports[-1].step == 5
    # a sequence of frames works too
    listed = extract_features(list(frames[:2]), backbone, tmp_path / "g.npy")
    np.testing.assert_array_equal(listed, feats[:2])


def test_extract_features_cancel_leaves_nothing(tmp_path):
    backbone = build_backbone(_cfg(random_init=True, layer=0), "cpu")
    token = CancelToken()
    frames = np.zeros((4, 28, 28, 3), np.uint8)

    def cancel_after_first(p):
        token.cancel()  # the first report; the job stops at its next check

    with pytest.raises(Cancelled):
        extract_features(frames, backbone, tmp_path / "f.npy", progress=cancel_after_first,
                         cancel=token)
    assert list(tmp_path.iterdir()) == []


def test_attention_override_equals_timm_attention():
    from timm.models.vision_transformer import Attention

    bb = build_backbone(_cfg(random_init=True, layer=1), "cpu")
    attn = bb.vit.blocks[0].attn
    assert attn.forward.__func__.__name__ == "_attention_forward"
    torch.manual_seed(0)
    x = torch.randn(2, 37, bb.channels)
    with torch.no_grad():
        want = Attention.forward(attn, x)  # timm's own forward on the same module
        np.testing.assert_allclose(attn(x).numpy(), want.numpy(), atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, ref = attn(x), Attention.forward(attn, x)
    assert got.dtype == torch.bfloat16
    assert F.cosine_similarity(got.float(), ref.float(), dim=-1).min() > 0.999


def test_precision_selection_and_bf16_accuracy():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    fast = "avx512_bf16" in flags or "amx_bf16" in flags
    assert (resolve_precision("auto", cpu) is torch.bfloat16) == fast
    with pytest.raises(ConfigError):
        resolve_precision("int8", cpu)
    ref = build_backbone(_cfg(random_init=True, layer=2), "cpu")
    torch.manual_seed(0)
    x = torch.rand(1, 3, 56, 56)
    half = build_backbone(_cfg(random_init=True, layer=2, precision="bf16"), "cpu")
    half.load_state_dict(ref.state_dict())
    a, b = ref(x), half(x)
    assert b.dtype == torch.float32
    cos = F.cosine_similarity(a.flatten(2), b.flatten(2), dim=1)
    assert cos.min() > 0.98
