"""MobileNetV2 backbone: structure, torchvision weights (random and ImageNet), freezing, FPNs, and
every head's MNV2 config training and predicting on the embedded dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tbd  # noqa: F401  (its compatibility shims must run before detectron2 is imported)

# isort: split
import torchvision
import torchvision.transforms.functional as TF
from detectron2.data.detection_utils import read_image
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_backbone, build_model
from detectron2.structures import Instances
from PIL import Image
from weights_util import MOBILENET_V2_FILE

from tbd.config import load_config
from tbd.modeling.backbones.mobilenet import (
    TORCHVISION_INPUT_FORMAT,
    TORCHVISION_PIXEL_MEAN,
    TORCHVISION_PIXEL_STD,
    MobileNetV2,
    WeightsMismatchError,
    convert_torchvision_mobilenet_v2,
    load_mobilenet_v2_weights,
)
from tbd.modeling.tal.testing import TINY_OPTS, shapes_batch, train_steps

ALL_STAGES = ["stem", "m2", "m3", "m4", "m5"]
#: our stage -> the torchvision ``features`` index whose output it is
TAPS = {"stem": 1, "m2": 3, "m3": 6, "m4": 13, "m5": 18}
HEADS = ("tood", "et", "dw", "retinanet", "fcos", "faster_rcnn")


def _torchvision_randomised(width_mult: float = 1.0, seed: int = 0) -> torch.nn.Module:
    """torchvision's MobileNetV2 with random weights *and* random BN statistics/affines (the
    defaults, 0/1, would hide a swapped mean/var or weight/bias)."""
    torch.manual_seed(seed)
    net = torchvision.models.mobilenet_v2(width_mult=width_mult)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    return net.eval()


def _torchvision_taps(features: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out, wanted = {}, {i: name for name, i in TAPS.items()}
    with torch.no_grad():
        for i, layer in enumerate(features):
            x = layer(x)
            if i in wanted:
                out[wanted[i]] = x
    return out


# ------------------------------------------------------------------------------- structure
def test_stage_strides_and_channels_follow_mobilenet_v2():
    net = MobileNetV2(ALL_STAGES, norm="BN")
    x = torch.randn(1, 3, 64, 96)
    out = net(x)
    shapes = net.output_shape()
    expected = {"stem": (2, 16), "m2": (4, 24), "m3": (8, 32), "m4": (16, 96), "m5": (32, 1280)}
    for name, (stride, channels) in expected.items():
        assert (shapes[name].stride, shapes[name].channels) == (stride, channels)
        assert out[name].shape == (1, channels, 64 // stride, 96 // stride)
    assert [len(getattr(net, s)) for s in ALL_STAGES[1:]] == [2, 3, 7, 5]  # 4 IRs + last conv in m5
    no_last = MobileNetV2(["m5"], norm="BN", last_conv=False)
    assert no_last.output_shape()["m5"].channels == 320 and list(no_last(x)) == ["m5"]
    shallow = MobileNetV2(["m3"], norm="BN")
    assert shallow.stage_names == ["m2", "m3"]  # deeper stages are not built


def test_residual_shortcut_only_where_shape_is_kept():
    net = MobileNetV2(ALL_STAGES, norm="BN")
    shortcuts = [b.use_shortcut for s in ("m2", "m3", "m4") for b in getattr(net, s)]
    # m2: 16->24 s2, 24->24; m3: s2, then two kept; m4: s2, 3 kept, 64->96, 2 kept
    assert shortcuts == [False, True, False, True, True, False, True, True, True, False, True, True]
    assert net.stem.block.expand is None and net.m2[0].expand is not None


@pytest.mark.parametrize("bad", [{"norm": "LN"}, {"freeze_at": 6}, {"out_features": ["res5"]}])
def test_bad_arguments_name_the_key(bad):
    kwargs = {"out_features": ["m5"], **bad}
    with pytest.raises(ValueError, match="MODEL.(MOBILENET|BACKBONE)"):
        MobileNetV2(**kwargs)


def test_group_norm_builds_for_widths_32_does_not_divide():
    net = MobileNetV2(["m3"], norm="GN")
    groups = {m.num_channels: m.num_groups for m in net.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert groups[16] == 16 and groups[24] == 8 and groups[144] == 16 and groups[96] == 32
    assert net(torch.randn(2, 3, 32, 32))["m3"].shape == (2, 32, 4, 4)


# -------------------------------------------------------------------------- weights mapping
def test_converter_names_by_hand():
    sd = _torchvision_randomised().state_dict()
    conv = convert_torchvision_mobilenet_v2(sd)
    pairs = {
        "features.0.0.weight": "stem.conv1.weight",
        "features.0.1.running_mean": "stem.conv1.norm.running_mean",
        "features.1.conv.0.0.weight": "stem.block.depthwise.weight",
        "features.1.conv.1.weight": "stem.block.project.weight",
        "features.1.conv.2.bias": "stem.block.project.norm.bias",
        "features.2.conv.0.0.weight": "m2.0.expand.weight",
        "features.3.conv.1.1.running_var": "m2.1.depthwise.norm.running_var",
        "features.7.conv.2.weight": "m4.0.project.weight",
        "features.13.conv.3.weight": "m4.6.project.norm.weight",
        "features.14.conv.1.0.weight": "m5.0.depthwise.weight",
        "features.18.0.weight": "m5.4.conv.weight",
        "features.18.1.bias": "m5.4.conv.norm.bias",
    }
    for tv_key, ours in pairs.items():
        assert conv[ours] is sd[tv_key]
    assert not any(k.startswith("classifier") or k.endswith("num_batches_tracked") for k in conv)
    n_tv = sum(1 for k in sd if not k.startswith("classifier") and not k.endswith("num_batches_tracked"))
    assert len(conv) == n_tv == 260  # 52 convs, 52 BNs x 4 tensors


@pytest.mark.parametrize("norm", ["FrozenBN", "BN"])
def test_random_torchvision_weights_reproduce_every_tap(norm):
    tv = _torchvision_randomised(seed=1)
    net = MobileNetV2(ALL_STAGES, norm=norm).eval()
    report = load_mobilenet_v2_weights(net, tv.state_dict(), source="random weights")
    assert report.loaded == 260 and report.skipped == []
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        ours = net(x)
    for name, ref in _torchvision_taps(tv.features, x).items():
        torch.testing.assert_close(ours[name], ref, rtol=1e-4, atol=1e-5, msg=name)


def test_width_multiplier_matches_torchvision_layout():
    tv = _torchvision_randomised(width_mult=0.5, seed=2)
    net = MobileNetV2(ALL_STAGES, norm="BN", width_mult=0.5).eval()
    assert load_mobilenet_v2_weights(net, tv.state_dict()).loaded == 260
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x)["m5"], tv.features(x), rtol=1e-4, atol=1e-5)


def test_loader_skips_stages_not_built():
    sd = _torchvision_randomised().state_dict()
    report = load_mobilenet_v2_weights(MobileNetV2(["m3"], norm="BN"), sd)
    assert report.skipped and all(k.split(".")[0] in ("m4", "m5") for k in report.skipped)
    assert report.loaded + len(report.skipped) == 260
    report = load_mobilenet_v2_weights(MobileNetV2(["m5"], norm="BN", last_conv=False), sd)
    assert sorted(report.skipped) == sorted(
        k for k in convert_torchvision_mobilenet_v2(sd) if k.startswith("m5.4.")
    )


def test_loader_rejects_what_does_not_fit():
    sd = _torchvision_randomised().state_dict()
    net = MobileNetV2(ALL_STAGES, norm="FrozenBN")
    before = net.stem.conv1.weight.clone()
    missing = {k: v for k, v in sd.items() if k != "features.5.conv.1.1.running_var"}
    with pytest.raises(WeightsMismatchError, match=r"missing 1: m3\.1\.depthwise\.norm\.running_var"):
        load_mobilenet_v2_weights(net, missing)
    extra = {**convert_torchvision_mobilenet_v2(sd), "m9.0.weight": torch.zeros(1)}
    with pytest.raises(WeightsMismatchError, match=r"unexpected 1: m9\.0\.weight"):
        load_mobilenet_v2_weights(net, extra)
    with pytest.raises(WeightsMismatchError, match="WIDTH_MULT"):
        load_mobilenet_v2_weights(MobileNetV2(ALL_STAGES, norm="BN", width_mult=0.75), sd)
    with pytest.raises(ValueError, match="not torchvision MobileNetV2 tensors: features.19.0.weight"):
        convert_torchvision_mobilenet_v2({**sd, "features.19.0.weight": torch.zeros(1)})
    resnet = torchvision.models.resnet18().state_dict()
    with pytest.raises(ValueError, match="not a torchvision mobilenet_v2 state dict"):
        convert_torchvision_mobilenet_v2(resnet)
    assert torch.equal(net.stem.conv1.weight, before)  # nothing was half-loaded


# ------------------------------------------------------------------------------- freezing
@pytest.mark.parametrize("freeze_at, frozen", [(0, []), (1, ["stem"]), (3, ["stem", "m2", "m3"])])
def test_freeze_at_follows_the_resnet_meaning(freeze_at, frozen):
    net = MobileNetV2(ALL_STAGES, norm="BN", freeze_at=freeze_at)
    for stage in ALL_STAGES:
        module = getattr(net, stage)
        params = list(module.parameters())
        bns = [m for m in module.modules() if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d))]
        if stage in frozen:
            assert all(not p.requires_grad for p in params), stage
            assert all(isinstance(m, FrozenBatchNorm2d) for m in bns), stage
        else:
            assert params and all(p.requires_grad for p in params), stage
            assert all(isinstance(m, torch.nn.BatchNorm2d) for m in bns), stage
    net.train()
    sum(o.mean() for o in net(torch.randn(2, 3, 64, 64)).values()).backward()
    assert (net.m4[0].expand.weight.grad is not None) and (net.stem.conv1.weight.grad is None) == bool(frozen)


# ---------------------------------------------------------------------------------- FPNs
def test_fpn_builders_output_the_resnet_fpn_names():
    dense = build_backbone(load_config("tood_MNV2_FPN"))
    shapes = dense.output_shape()
    assert list(shapes) == ["p3", "p4", "p5", "p6", "p7"]
    assert [s.stride for s in shapes.values()] == [8, 16, 32, 64, 128]
    assert {s.channels for s in shapes.values()} == {128}
    assert dense.top_block.in_feature == "p5" and dense.top_block.p6.in_channels == 128
    out = dense(torch.randn(1, 3, 128, 128))
    assert [tuple(t.shape[-2:]) for t in out.values()] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    rcnn = build_backbone(load_config("faster_rcnn_MNV2_FPN"))
    assert [(k, s.stride) for k, s in rcnn.output_shape().items()] == [
        ("p2", 4), ("p3", 8), ("p4", 16), ("p5", 32), ("p6", 64)
    ]  # fmt: skip


def test_fpn_asks_for_a_stage_the_backbone_does_not_output():
    cfg = load_config("faster_rcnn_MNV2_FPN", ["MODEL.MOBILENET.OUT_FEATURES", "['m3', 'm4', 'm5']"])
    with pytest.raises(ValueError, match="set MODEL.MOBILENET.OUT_FEATURES to include them"):
        build_backbone(cfg)


# ------------------------------------------------------------------- configs of every head
def test_mnv2_configs_agree_on_backbone_and_pixels():
    for head in HEADS:
        cfg = load_config(f"{head}_MNV2_FPN")
        assert cfg.MODEL.BACKBONE.NAME.startswith("build_mobilenet_v2_fpn"), head
        assert list(cfg.MODEL.FPN.IN_FEATURES) == list(cfg.MODEL.MOBILENET.OUT_FEATURES), head
        assert tuple(cfg.MODEL.PIXEL_MEAN) == TORCHVISION_PIXEL_MEAN, head
        assert tuple(cfg.MODEL.PIXEL_STD) == TORCHVISION_PIXEL_STD, head
        assert cfg.INPUT.FORMAT == TORCHVISION_INPUT_FORMAT, head
    assert load_config("faster_rcnn_MNV2_FPN").MODEL.FPN.IN_FEATURES[0] == "m2"


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shapes")


@pytest.mark.parametrize("head", HEADS)
def test_every_head_trains_and_predicts_on_mnv2(head, shapes_root):
    # FPN 64: GN(32) in the DW/FCOS heads needs 2 values per group on the 1x1 P7 of 64 px images
    cfg = load_config(f"{head}_MNV2_FPN", [*TINY_OPTS, "MODEL.FPN.OUT_CHANNELS", "64"])
    batch = shapes_batch(cfg, shapes_root, num_images=2)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model.backbone.bottom_up, MobileNetV2)
    losses = train_steps(model, batch, iters=2, lr=0.01)
    assert all(np.isfinite(losses)), losses
    stem_grad = model.backbone.bottom_up.stem.conv1.weight.grad
    assert stem_grad is not None and stem_grad.abs().sum() > 0  # FREEZE_AT 0: the stem learns
    model.eval()
    with torch.no_grad():
        out = model([{"image": batch[0]["image"], "height": 96, "width": 64}])
    inst = out[0]["instances"]
    assert isinstance(inst, Instances) and inst.image_size == (96, 64)
    assert {"pred_boxes", "scores", "pred_classes"} <= set(inst.get_fields())


# --------------------------------------------------------------------- ImageNet, offline
@pytest.fixture(scope="module")
def real_image(tmp_path_factory) -> Path:
    """An embedded-dataset image at 224 px, written as PNG (read back the way the mapper reads it)."""
    from tbd.data.shapes_render import RenderParams, render_image

    pixels, _ = render_image(np.random.default_rng(3), RenderParams(image_size=224))
    path = tmp_path_factory.mktemp("img") / "shapes.png"
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize("norm", ["FrozenBN", "BN"])
def test_imagenet_weights_reproduce_torchvision_features(imagenet_torch_home, real_image, norm):
    from torchvision.models import MobileNet_V2_Weights

    weights = MobileNet_V2_Weights.IMAGENET1K_V1
    assert Path(weights.url).name == MOBILENET_V2_FILE
    tv = torchvision.models.mobilenet_v2(weights=weights).eval()  # from the planted cache
    assert (imagenet_torch_home / "hub" / "checkpoints" / MOBILENET_V2_FILE).exists()

    cfg = load_config("tood_MNV2_FPN", ["MODEL.MOBILENET.NORM", norm])
    model = build_model(cfg).eval()
    report = load_mobilenet_v2_weights(model, weights.get_state_dict(progress=False), source=weights.url)
    assert report.loaded == 260 and report.skipped == []

    # Detectron2's path: read in INPUT.FORMAT, normalise with PIXEL_MEAN/STD
    image = read_image(str(real_image), format=cfg.INPUT.FORMAT)
    d2_input = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
    with torch.no_grad():
        x = model.preprocess_image([{"image": d2_input}]).tensor
        ours = model.backbone.bottom_up(x)
    # torchvision's path: RGB in [0, 1], normalised with the mean/std of the weights' own preset
    preset = weights.transforms()
    ref_in = TF.normalize(TF.to_tensor(Image.open(real_image).convert("RGB")), preset.mean, preset.std)
    torch.testing.assert_close(x[0], ref_in, rtol=1e-5, atol=1e-5)
    ref = _torchvision_taps(tv.features, ref_in[None])
    for name in ("m3", "m4", "m5"):
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=1e-4, msg=name)
    # and the ImageNet features are not degenerate on this image
    assert ref["m5"].std() > 0.1


# -------------------------------------------------------------------- as a distilled student
def test_mnv2_student_distils_from_a_resnet_teacher_and_exports(tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.utils.events import EventStorage

    from tbd.distill import TBDistiller
    from tbd.distill.testing import distill_config, synthetic_batch

    opts = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64"]
    torch.manual_seed(0)
    cfg = distill_config("tood_MNV2_FPN", "retinanet_R18_FPN", opts)
    model = build_model(cfg)
    assert isinstance(model, TBDistiller) and model.strides == [8, 16, 32, 64, 128]
    assert model._flip_teacher_channels  # RGB student, BGR teacher: the teacher sees BGR
    model.train()
    with EventStorage():
        losses = model(synthetic_batch(2, 64, seed=5))
        sum(losses.values()).backward()
    assert torch.isfinite(losses["loss_hd"]) and losses["loss_tfd"].item() > 0
    assert model.student.backbone.bottom_up.m3[0].project.weight.grad.abs().sum() > 0

    path = tmp_path / "student.pth"
    model.export_student(path)
    cfg.MODEL.META_ARCHITECTURE = cfg.DISTILL.STUDENT_META_ARCHITECTURE
    plain = build_model(cfg)
    DetectionCheckpointer(plain).load(str(path))
    for k, v in model.student.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v), k


def test_export_of_a_detectron2_head_on_mnv2_keeps_the_backbone_keys(tmp_path):
    """``tbd export`` prunes a RetinaNet student's config to Detectron2's keys; on MobileNetV2 that
    would drop MODEL.MOBILENET (a Faster R-CNN student would lose its m2 tap): it must keep them."""
    from tbd.distill.testing import distill_config
    from tbd.export import export_student

    cfg = distill_config("faster_rcnn_MNV2_FPN", "retinanet_R18_FPN")
    torch.manual_seed(0)
    model = build_model(cfg)
    ckpt = tmp_path / "model_final.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    weights, config = export_student(cfg, ckpt, tmp_path / "export")
    exported = load_config(str(config))
    assert exported.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
    assert list(exported.MODEL.MOBILENET.OUT_FEATURES) == ["m2", "m3", "m4", "m5"]
    assert exported.MODEL.MOBILENET.NORM == "BN" and exported.INPUT.FORMAT == "RGB"
    plain = build_model(exported)
    plain.load_state_dict(torch.load(weights, weights_only=False)["model"], strict=True)
