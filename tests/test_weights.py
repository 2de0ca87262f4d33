"""Initial weights: torchvision ResNets converted to Detectron2 names, names resolved offline, reports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from tbd.config import load_config
from tbd.engine.weights import (
    WeightsError,
    load_initial_weights,
    pixel_family,
    torchvision_cache_file,
)


def _student(depth: int, norm: str = "FrozenBN"):
    from detectron2.modeling import build_model

    base = "retinanet_R18_FPN.yaml" if depth < 50 else "retinanet_R50_FPN.yaml"
    opts = ["MODEL.RESNETS.DEPTH", str(depth), "MODEL.RESNETS.NORM", norm, "MODEL.BACKBONE.FREEZE_AT", "2"]
    if depth >= 50:
        opts += ["MODEL.RESNETS.RES2_OUT_CHANNELS", "256"]
    cfg = load_config(base, opts)
    return build_model(cfg).eval()


def _random_torchvision(depth: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = getattr(torchvision.models, f"resnet{depth}")(weights=None).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a dropped buffer would show
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return net


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_torchvision_state_dict_loads_and_res5_equals_layer4(tmp_path: Path, depth: int) -> None:
    net = _random_torchvision(depth)
    path = tmp_path / f"resnet{depth}.pth"
    torch.save(net.state_dict(), path)
    model = _student(depth)
    report = load_initial_weights(model, str(path))
    assert report is not None and report.complete
    assert report.target == "backbone.bottom_up"
    assert report.filled == report.target_total > 0
    image = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        ours = model.backbone.bottom_up(image)["res5"]
        x = net.maxpool(net.relu(net.bn1(net.conv1(image))))
        theirs = net.layer4(net.layer3(net.layer2(net.layer1(x))))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_wrong_depth_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "r50.pth"
    torch.save(_random_torchvision(50).state_dict(), path)
    with pytest.raises(WeightsError, match="another shape"):
        load_initial_weights(_student(18), str(path))


def test_partial_backbone_is_an_error_unless_allowed(tmp_path: Path) -> None:
    state = _random_torchvision(18).state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("layer4.")}
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match="missing"):
        load_initial_weights(_student(18), str(path))
    report = load_initial_weights(_student(18), str(path), allow_partial=True)
    assert report is not None and report.missing and all(k.startswith("res5.") for k in report.missing)


def test_torchvision_name_offline_without_file_names_the_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(WeightsError) as err:
        load_initial_weights(_student(18), "torchvision://resnet18")
    text = str(err.value)
    assert "resnet18-f37072fd.pth" in text and str(tmp_path / "torch" / "hub" / "checkpoints") in text


def test_torchvision_name_with_planted_file_loads(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    target = torchvision_cache_file("torchvision://resnet18")
    assert target.parent == tmp_path / "torch" / "hub" / "checkpoints"
    target.parent.mkdir(parents=True)
    net = _random_torchvision(18, seed=3)
    torch.save(net.state_dict(), target)
    model = _student(18)
    report = load_initial_weights(model, "torchvision://resnet18")
    assert report is not None and report.complete and report.filled == report.target_total
    torch.testing.assert_close(model.backbone.bottom_up.stem.conv1.weight, net.conv1.weight)
    assert pixel_family("torchvision://resnet18") == "torchvision"


def test_unknown_torchvision_name() -> None:
    with pytest.raises(WeightsError, match="no model"):
        load_initial_weights(_student(18), "torchvision://resnet7")


def test_detectron2_checkpoint_skips_other_class_count_but_fills_backbone(tmp_path: Path) -> None:
    source = _student(18)
    state = source.state_dict()
    state["head.cls_score.weight"] = torch.zeros(9 * 3, *state["head.cls_score.weight"].shape[1:])
    state["head.cls_score.bias"] = torch.zeros(9 * 3)
    path = tmp_path / "model.pth"
    torch.save({"model": state, "iteration": 5}, path)
    target = _student(18)
    report = load_initial_weights(target, str(path))
    assert report is not None and report.complete
    assert len(report.other_shape) == 2
    torch.testing.assert_close(
        target.backbone.bottom_up.res5[0].conv1.weight, source.backbone.bottom_up.res5[0].conv1.weight
    )


def test_text_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "weights.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="cannot be read"):
        load_initial_weights(_student(18), str(path))


def test_plain_detectron2_checkpointer_reads_torchvision_names(tmp_path: Path, monkeypatch) -> None:
    """A DefaultTrainer config with MODEL.WEIGHTS torchvision://resnet18 works after `import tbd`."""
    from detectron2.checkpoint import DetectionCheckpointer

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    target = torchvision_cache_file("torchvision://resnet18")
    target.parent.mkdir(parents=True)
    net = _random_torchvision(18, seed=5)
    torch.save(net.state_dict(), target)
    model = _student(18)
    DetectionCheckpointer(model).load("torchvision://resnet18")
    bottom_up = model.backbone.bottom_up
    torch.testing.assert_close(bottom_up.res4[1].conv2.weight, net.layer3[1].conv2.weight)
    torch.testing.assert_close(bottom_up.res2[0].conv1.norm.running_var, net.layer1[0].bn1.running_var)
