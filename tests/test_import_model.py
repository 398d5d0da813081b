"""The seed's EfficientNetV2 checkpoints: mapped onto timm with the same outputs, refused with
the first mismatch named, imported as a run that inference can use at once."""

import io
from collections import OrderedDict

import numpy as np
import pytest
import torch
from conftest import open_page, tiny_checkpoint
from PIL import Image
from sqlalchemy import select
from torch import nn
from torchvision import transforms as T

from db.runs import promote
from db.schema import Run
from db.session import session_scope
from db.users import LOCAL, NotAllowed, User
from engine.data.datasets import Sample
from engine.loop.import_model import ImportRefused, import_seed_model, import_upload, main
from engine.model.networks import WeightsMismatch, create_model, load_checkpoint, model_for_weights
from engine.model.predictor import dataset_for
from engine.model.seed_weights import SEED_MODEL_ARGS, seed_model_name, seed_to_timm

# The seed's configurations: (repeats, kernel, stride, expansion, in, out, fused, squeeze-excite).
SEED_S = [
    (2, 3, 1, 1, 24, 24, True, False),
    (4, 3, 2, 4, 24, 48, True, False),
    (4, 3, 2, 4, 48, 64, True, False),
    (6, 3, 2, 4, 64, 128, False, True),
    (9, 3, 1, 6, 128, 160, False, True),
    (15, 3, 2, 6, 160, 256, False, True),
]
SEED_M = [
    (3, 3, 1, 1, 24, 24, True, False),
    (5, 3, 2, 4, 24, 48, True, False),
    (5, 3, 2, 4, 48, 80, True, False),
    (7, 3, 2, 4, 80, 160, False, True),
    (14, 3, 1, 6, 160, 176, False, True),
    (18, 3, 2, 6, 176, 304, False, True),
    (5, 3, 1, 6, 304, 512, False, True),
]
SEED_L = [
    (4, 3, 1, 1, 32, 32, True, False),
    (7, 3, 2, 4, 32, 64, True, False),
    (7, 3, 2, 4, 64, 96, True, False),
    (10, 3, 2, 4, 96, 192, False, True),
    (19, 3, 1, 6, 192, 224, False, True),
    (25, 3, 2, 6, 224, 384, False, True),
    (7, 3, 1, 6, 384, 640, False, True),
]


# -- the seed's architecture, rewritten from its description: the same modules, names and
# computation (symmetric padding, BatchNorm eps 1e-3, SiLU), in eval mode only --------------


def conv_bn(
    cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            bn=nn.BatchNorm2d(cout, eps=1e-3),
            act=nn.SiLU() if act else nn.Identity(),
        )
    )


class SqueezeExcite(nn.Module):
    def __init__(self, block_in: int, expanded: int):
        super().__init__()
        self.conv_reduce = nn.Conv2d(expanded, block_in // 4, 1)
        self.conv_expand = nn.Conv2d(block_in // 4, expanded, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = nn.functional.silu(self.conv_reduce(x.mean((2, 3), keepdim=True)))
        return x * torch.sigmoid(self.conv_expand(scale))


class Block(nn.Module):
    """MBConv (expand 1x1, depthwise, squeeze-excite, project) or FusedMBConv (expand kxk,
    project; only a kxk conv with activation when the expansion is 1)."""

    def __init__(self, kernel: int, cin: int, cout: int, expand: int, stride: int, fused: bool, se: bool):
        super().__init__()
        wide = cin * expand
        self.shortcut = stride == 1 and cin == cout
        if fused and expand == 1:
            self.project_conv = conv_bn(cin, cout, kernel, stride)
            return
        if fused:
            self.expand_conv = conv_bn(cin, wide, kernel, stride)
        else:
            self.expand_conv = conv_bn(cin, wide)
            self.dwconv = conv_bn(wide, wide, kernel, stride, groups=wide)
            self.se = SqueezeExcite(cin, wide) if se else nn.Identity()
        self.project_conv = conv_bn(wide, cout, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for name in ("expand_conv", "dwconv", "se", "project_conv"):
            if hasattr(self, name):
                out = getattr(self, name)(out)
        return out + x if self.shortcut else out


class SeedEfficientNetV2(nn.Module):
    def __init__(self, config: list, num_classes: int = 4, features: int = 1280):
        super().__init__()
        self.stem = conv_bn(3, config[0][4], 3, 2)
        self.blocks = nn.Sequential(
            *(
                Block(kernel, cin if i == 0 else cout, cout, expand, stride if i == 0 else 1, fused, se)
                for repeats, kernel, stride, expand, cin, cout, fused, se in config
                for i in range(repeats)
            )
        )
        self.head = nn.Sequential(
            OrderedDict(
                project_conv=conv_bn(config[-1][5], features),
                avgpool=nn.AdaptiveAvgPool2d(1),
                flatten=nn.Flatten(),
                dropout=nn.Dropout(0.2),
                classifier=nn.Linear(features, num_classes),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


@torch.no_grad()
def trained_looking(model: nn.Module, seed: int = 0) -> nn.Module:
    """Norm affines away from 1 and 0 and running statistics measured on random images, as
    training leaves them, so that every image gets its own outputs and a norm in the wrong
    place, another eps or a padding moved by a pixel changes them."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", generator=generator)
        if isinstance(module, nn.BatchNorm2d):
            module.weight.copy_(1 + torch.randn(module.num_features, generator=generator) * 0.2)
            module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.2)
            module.momentum = None  # the running statistics: the average over the batch
    model.train()(torch.randn(4, 3, 64, 64, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def seed_s() -> nn.Module:
    torch.manual_seed(0)
    return trained_looking(SeedEfficientNetV2(SEED_S))


@pytest.fixture(scope="module")
def seed_file(seed_s, tmp_path_factory):
    """best_model.pth as the seed's train.py wrote it: torch.save(model.state_dict())."""
    path = tmp_path_factory.mktemp("seed") / "best_model.pth"
    torch.save(seed_s.state_dict(), path)
    return path


def image(size: int = 64) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_seed_v2s_maps_onto_timm_with_the_same_outputs(seed_s):
    state = seed_s.state_dict()
    assert seed_model_name(state) == "tf_efficientnetv2_s"
    mapped = seed_to_timm(state, "tf_efficientnetv2_s")
    assert len(mapped) == 672
    model = create_model("tf_efficientnetv2_s", **SEED_MODEL_ARGS)
    result = model.load_state_dict(mapped, strict=False)
    assert not result.unexpected_keys
    assert all(key.endswith("num_batches_tracked") for key in result.missing_keys)
    expected = seed_s(image())
    assert torch.allclose(model.eval()(image()), expected, atol=1e-4)
    # timm's own TF "same" padding puts the borders elsewhere: a different model.
    same_padding = create_model("tf_efficientnetv2_s")
    same_padding.load_state_dict(mapped, strict=False)
    assert not torch.allclose(same_padding.eval()(image()), expected, atol=1e-3)


@pytest.mark.parametrize(
    "config, name, count", [(SEED_M, "tf_efficientnetv2_m", 963), (SEED_L, "tf_efficientnetv2_l", 1331)]
)
def test_seed_m_and_l_layouts_map_by_shape(config, name, count):
    with torch.device("meta"):  # shapes only: V2-L has 118M parameters
        state = SeedEfficientNetV2(config).state_dict()
    assert seed_model_name(state) == name
    mapped = seed_to_timm(state, name)
    assert len(mapped) == count
    assert list(mapped)[-2:] == ["classifier.weight", "classifier.bias"]


def test_a_mismatch_names_the_first_bad_key(seed_s):
    state = dict(seed_s.state_dict())
    state["blocks.11.se.conv_reduce.weight"] = torch.zeros(15, 512, 1, 1)
    with pytest.raises(
        ValueError,
        match=r"tensor \d+ does not line up: "
        r"blocks\.11\.se\.conv_reduce\.weight \(15, 512, 1, 1\) in the file, "
        r"blocks\.3\.1\.se\.conv_reduce\.weight \(32, 512, 1, 1\) in tf_effici",
    ):
        seed_to_timm(state, "tf_efficientnetv2_s")
    del state["blocks.11.se.conv_reduce.weight"]
    with pytest.raises(
        ValueError,
        match=r"blocks\.11\.se\.conv_reduce\.bias \(32,\) in the file, "
        r"blocks\.3\.1\.se\.conv_reduce\.weight",
    ):
        seed_to_timm(state, "tf_efficientnetv2_s")
    short = dict(list(seed_s.state_dict().items())[:-2])
    with pytest.raises(
        ValueError,
        match="ends after 670 tensors where tf_efficientnetv2_s has 672: first missing classifier.weight",
    ):
        seed_to_timm(short, "tf_efficientnetv2_s")


def test_weights_option_takes_a_seed_file(seed_s, seed_file, tmp_path):
    # --weights: the model follows from the file, the tensors from the mapping.
    assert model_for_weights(seed_file) == "tf_efficientnetv2_s"
    model = create_model("tf_efficientnetv2_s", pretrained=seed_file)
    assert torch.equal(model.conv_stem.weight, seed_s.stem.conv.weight)
    assert torch.equal(model.blocks[5][14].bn3.running_var, seed_s.blocks[-1].project_conv.bn.running_var)
    assert torch.equal(model.classifier.weight, seed_s.head.classifier.weight)
    with pytest.raises(
        WeightsMismatch,
        match=r"does not fit tf_efficientnet_lite0: tensor 1 does "
        r"not line up: stem\.conv\.weight \(24, 3, 3, 3\) in the file, "
        r"conv_stem\.weight \(32, 3, 3, 3\)",
    ):
        create_model("tf_efficientnet_lite0", pretrained=seed_file)


# -- importing best_model.pth as a run ------------------------------------------------------


def fundus_like(path, width: int = 96, height: int = 64):
    """A wide photograph whose columns differ, so that a squeeze and a centre crop differ."""
    red = np.broadcast_to(np.linspace(0, 255, width)[None, :], (height, width))
    green = np.broadcast_to(np.linspace(0, 120, height)[:, None], (height, width))
    Image.fromarray(np.stack([red, green, 255 - red], 2).astype(np.uint8)).save(path)
    return path


def test_import_makes_a_run_with_the_seeds_preprocessing(workspace, seed_s, seed_file, tmp_path):
    run_id = import_seed_model(workspace, seed_file, "seed-s", eval_size=64)
    with session_scope(workspace.db_url) as session:
        run = session.get(Run, run_id)
        assert (run.name, run.model_name, run.img_size, run.status, run.active) == (
            "seed-s",
            "tf_efficientnetv2_s",
            64,
            "done",
            True,
        )  # the first model: active
        checkpoint = run.checkpoint
    assert checkpoint == str(workspace.weights / "seed-s" / "best.pth")
    model, meta = load_checkpoint(checkpoint)
    assert (meta["mean"], meta["std"]) == ([0.5] * 3, [0.5] * 3)
    assert meta["preprocess"] == {
        "size": 64,
        "crop": False,
        "enhance": False,
        "mask": False,
        "center_crop": True,
    }
    # The image as the seed's predict.py gave it to its model: Resize, CenterCrop, Normalize.
    photo = fundus_like(tmp_path / "wide.png")
    seed_view = T.Compose([T.Resize(64), T.CenterCrop(64), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])(
        Image.open(photo)
    )
    ours = dataset_for(meta, [Sample(str(photo))], None)[0][0]
    assert (ours - seed_view).abs().mean() < 0.02
    squeezed = dataset_for(
        {**meta, "preprocess": {**meta["preprocess"], "center_crop": False}}, [Sample(str(photo))], None
    )[0][0]
    assert (squeezed - seed_view).abs().mean() > 0.1
    with torch.no_grad():
        assert torch.allclose(model(ours[None]), seed_s(ours[None]), atol=1e-4)
    promote(workspace.db_url, run_id, LOCAL)


def test_import_refuses_in_words(workspace, seed_s, seed_file, tmp_path):
    import_seed_model(workspace, seed_file, "taken")
    with pytest.raises(ImportRefused, match="a run named 'taken' exists already"):
        import_seed_model(workspace, seed_file, "taken")
    with pytest.raises(ImportRefused, match=r"run name '\.\./up': use letters"):
        import_seed_model(workspace, seed_file, "../up")
    five = {
        **seed_s.state_dict(),
        "head.classifier.weight": torch.zeros(5, 1280),
        "head.classifier.bias": torch.zeros(5),
    }
    torch.save(five, tmp_path / "five.pth")
    with pytest.raises(
        ImportRefused,
        match=r"five\.pth: the classifier \(head\.classifier\) "
        "has 5 outputs, not 4",
    ):
        import_seed_model(workspace, tmp_path / "five.pth")
    ours = tiny_checkpoint(tmp_path / "ours.pth")
    with pytest.raises(
        ImportRefused,
        match="ours.pth is not a state dict of the seed's EfficientNetV2 .*it starts with conv_stem.weight",
    ):
        import_seed_model(workspace, ours)
    (tmp_path / "notes.pth").write_text("not weights")
    with pytest.raises(WeightsMismatch, match="notes.pth is not a weight file that torch can read"):
        import_seed_model(workspace, tmp_path / "notes.pth")
    with session_scope(workspace.db_url) as session:
        assert session.scalars(select(Run.name)).all() == ["taken"]


def test_upload_is_kept_in_the_workspace_and_needs_an_admin(workspace, seed_file):
    data = seed_file.read_bytes()
    with pytest.raises(NotAllowed, match="only an admin may import a model"):
        import_upload(workspace, User("rita", "reviewer"), "best_model.pth", data)
    with pytest.raises(ImportRefused, match="not a state dict"):
        import_upload(workspace, LOCAL, "junk.pth", torch_bytes({"x": torch.zeros(1)}), "junk")
    assert not (workspace.root / "uploads" / "junk").exists()
    run_id = import_upload(workspace, LOCAL, "best_model.pth", data, "uploaded")
    assert (workspace.root / "uploads" / "uploaded" / "best_model.pth").read_bytes() == data
    with session_scope(workspace.db_url) as session:
        assert session.get(Run, run_id).account == LOCAL.name


def torch_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_command_line(workspace, seed_file, capsys):
    assert main([str(seed_file), "--name", "cli"]) == 0
    assert "imported" in capsys.readouterr().out
    assert main([str(seed_file), "--name", "cli"]) == 2
    assert "not imported: a run named 'cli' exists already" in capsys.readouterr().err
    assert main([str(seed_file), "--classes", "5"]) == 2
    assert "the app grades 4 classes" in capsys.readouterr().err


def test_retrain_page_offers_the_import(workspace):
    at = open_page("retrain")
    assert "Import a model" in [expander.label for expander in at.expander]
