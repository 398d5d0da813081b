"""Model creation, offline pretrained weights (bundled Lite0, local files, caches), checkpoints."""

import socket
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from skimage import data
from torch import nn

from engine.model import networks as models
from engine.model.networks import (
    LITE0,
    NUM_CLASSES,
    WeightsNotFound,
    create_model,
    default_model,
    freeze_all_but_classifier,
    freeze_stages,
    lite_imagenet_state_dict,
    load_checkpoint,
    model_mean_std,
    pick_device,
    save_checkpoint,
)

TINY = "test_efficientnet"
EGYPTIAN_CAT = 285


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail any test whose code tries to resolve a host or open a connection."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    yield
    # Libraries may swallow the error and retry, so check the attempts, not only the outcome.
    assert not attempts, f"network was tried: {attempts}"


@pytest.fixture
def empty_caches(tmp_path, monkeypatch) -> dict[str, Path]:
    """Empty weights/, Hugging Face hub cache and torch hub cache, whatever this machine holds."""
    dirs = {name: tmp_path / name for name in ("weights", "hf", "torch")}
    monkeypatch.setattr(models, "WEIGHTS_DIR", dirs["weights"])
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(dirs["hf"]))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(dirs["torch"]))
    return dirs


def imagenet_tiny_state() -> dict[str, torch.Tensor]:
    """A test_efficientnet state dict with a 1000-class head, like an ImageNet weight file."""
    torch.manual_seed(1)
    return timm.create_model(TINY, num_classes=1000).state_dict()


def assert_backbone_equal(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    head = model.pretrained_cfg["classifier"]
    own = model.state_dict()
    backbone = [k for k in own if not k.startswith(head + ".")]
    assert backbone and all(torch.equal(own[k], state[k]) for k in backbone)
    assert model.get_classifier().out_features == NUM_CLASSES


# --- creation and freezing ----------------------------------------------------------------------


def test_tiny_model_has_four_outputs():
    model = create_model(TINY).eval()
    size = model.pretrained_cfg["input_size"]
    assert size == (3, 160, 160)
    with torch.no_grad():
        assert model(torch.zeros(2, *size)).shape == (2, NUM_CLASSES)


def test_freeze_leaves_only_the_classifier_trainable():
    model = create_model(TINY)
    freeze_all_but_classifier(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"}


def test_mean_std_follow_the_pretrained_cfg():
    assert model_mean_std(LITE0) == ((0.5,) * 3, (0.5,) * 3)
    assert model_mean_std(TINY) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert model_mean_std("no_such_model") == ((0.5,) * 3, (0.5,) * 3)


# --- devices --------------------------------------------------------------------------------------


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="Unknown device"):
        pick_device("gpu0")
    if not torch.cuda.is_available():
        assert pick_device() in (torch.device("cpu"), torch.device("mps"))
        with pytest.raises(ValueError, match="not available"):
            pick_device("cuda")


def test_default_model_depends_on_device():
    assert default_model(torch.device("cuda")) == ("tf_efficientnetv2_s", 300, 384)
    assert default_model("cpu") == (LITE0, 448, 448)
    assert default_model("mps") == (LITE0, 448, 448)


# --- the bundled Lite0 ImageNet weights -----------------------------------------------------------


def test_lite0_weights_line_up_with_timm():
    state = lite_imagenet_state_dict()
    assert len(state) == 296
    assert list(state) == list(timm.create_model(LITE0).state_dict())
    assert "bn2.num_batches_tracked" in state
    assert state["classifier.weight"].shape == (1000, 1280)


def test_lite0_imagenet_model_sees_the_cat():
    model = create_model(LITE0, pretrained=True, num_classes=1000).eval()
    mean, std = model_mean_std(LITE0)
    image = torch.from_numpy(data.chelsea()).permute(2, 0, 1)[None].float() / 255
    image = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    image = (image - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        assert model(image).argmax().item() == EGYPTIAN_CAT


def test_lite0_pretrained_gets_imagenet_backbone_and_fresh_head():
    model = create_model(LITE0, pretrained=True)
    assert_backbone_equal(model, lite_imagenet_state_dict())


# --- other pretrained weights: local files and caches, never the network -------------------------


def test_pretrained_without_offline_weights_fails_fast(empty_caches):
    start = time.perf_counter()
    with pytest.raises(WeightsNotFound, match=r"weights.*test_efficientnet\.r160_in1k\.safetensors"):
        create_model(TINY, pretrained=True)
    assert time.perf_counter() - start < 5
    assert issubclass(WeightsNotFound, FileNotFoundError)


def test_missing_weight_file_is_reported(tmp_path):
    with pytest.raises(WeightsNotFound, match="does not exist"):
        create_model(TINY, pretrained=tmp_path / "absent.pth")


def test_pretrained_from_a_local_file(tmp_path):
    state = imagenet_tiny_state()
    path = tmp_path / "tiny-imagenet.pth"
    torch.save(state, path)
    model = create_model(TINY, pretrained=path)
    assert_backbone_equal(model, state)
    assert not torch.equal(model.state_dict()["classifier.weight"], state["classifier.weight"][:NUM_CLASSES])


@pytest.mark.parametrize("where", ["weights_dir", "hf_cache"])
def test_pretrained_true_finds_offline_files(empty_caches, where):
    state = imagenet_tiny_state()
    if where == "weights_dir":
        path = empty_caches["weights"] / f"{TINY}.pth"
    else:
        # The layout huggingface_hub writes; timm falls back to pytorch_model.bin without safetensors.
        repo = empty_caches["hf"] / "models--timm--test_efficientnet.r160_in1k"
        commit = "0" * 40
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        path = repo / "snapshots" / commit / "pytorch_model.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    assert_backbone_equal(create_model(TINY, pretrained=True), state)


# --- checkpoints ----------------------------------------------------------------------------------


class Wrapper(nn.Module):
    """Stands in for DDP (`module.`) or torch.compile (`_orig_mod.`): same state dict keys."""

    def __init__(self, attribute: str, inner: nn.Module):
        super().__init__()
        self.add_module(attribute, inner)


@pytest.mark.parametrize("wrap", [None, "module", "_orig_mod"])
def test_checkpoint_round_trip(tmp_path, wrap):
    torch.manual_seed(0)
    model = create_model(TINY).eval()
    meta = {
        "model_name": TINY,
        "image_size": 160,
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "preprocessing": {"ben_graham": True, "circle": 0.9},
        "train_config": {"lr": 0.01, "epochs": 3, "data": tmp_path / "train"},
        "metrics": {"qwk": np.float64(0.75), "val_acc": torch.tensor(0.5)},
        "epoch": 2,
    }
    path = tmp_path / "run" / "best.pth"
    save_checkpoint(path, Wrapper(wrap, model) if wrap else model, meta)

    loaded, loaded_meta = load_checkpoint(path)
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded_meta == {
        **meta,
        "train_config": {"lr": 0.01, "epochs": 3, "data": str(tmp_path / "train")},
        "metrics": {"qwk": 0.75, "val_acc": 0.5},
        "classes": [0, 1, 2, 3],
        "temperature": 1.0,
    }
    assert type(loaded_meta["metrics"]["qwk"]) is float
    assert [p.name for p in path.parent.iterdir()] == ["best.pth"]  # no temp file left


def test_checkpoint_rejects_meta_it_cannot_store(tmp_path):
    model = create_model(TINY)
    with pytest.raises(ValueError, match="model_name"):
        save_checkpoint(tmp_path / "a.pth", model, {})
    with pytest.raises(TypeError, match="not plain data"):
        save_checkpoint(tmp_path / "a.pth", model, {"model_name": TINY, "extra": object()})
    assert not list(tmp_path.iterdir())


def test_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "latest.pth"
    save_checkpoint(path, create_model(TINY), {"model_name": TINY, "epoch": 1})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(torch, "save", crash)
        save_checkpoint(path, create_model(TINY), {"model_name": TINY, "epoch": 2})
    assert load_checkpoint(path)[1]["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pth"]


def test_freezing_stages_keeps_the_stem_and_first_stages_as_they_are():
    model = create_model(TINY, pretrained=False)
    freeze_stages(model, 1)
    frozen = {
        n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks") else "")
        for n, p in model.named_parameters()
        if not p.requires_grad
    }
    assert frozen == {"conv_stem", "bn1", "blocks.0"}
    with pytest.raises(ValueError, match="no stem and blocks"):
        freeze_stages(torch.nn.Linear(2, 2), 1)


def test_lite1_and_lite2_start_from_their_bundled_imagenet_weights():
    for name in ("tf_efficientnet_lite1", "tf_efficientnet_lite2"):
        model = create_model(name, pretrained=True)
        assert_backbone_equal(model, lite_imagenet_state_dict(name))
