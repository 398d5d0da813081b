"""State dicts of the EfficientNetV2 code the seed trained with (keys `stem.*`, `blocks.N.*`,
`head.*`; EfficientNetV2-S, -M or -L), under the keys of timm's `tf_efficientnetv2_s/m/l`.

Without the BatchNorm counters, the seed's tensors line up one by one with timm's: the stem's
conv and norm with conv_stem and bn1; in every block the convolutions and norms in the same
order (a squeeze-excite's conv_reduce and conv_expand included); head.project_conv with
conv_head and bn2; head.classifier with classifier. So the mapping is by position, and each
pair is checked by kind (weight, bias, running_mean, running_var) and shape.

Both use BatchNorm eps 1e-3, but the seed pads every convolution symmetrically where timm's
tf_ models pad like TensorFlow's "same" (one more pixel right and below after a stride of 2):
a timm model built with SEED_MODEL_ARGS computes exactly what the seed's model did.
"""

from collections.abc import Mapping
from functools import cache
from typing import Any

import timm
import torch

# timm model -> (the seed's name for it, train size, eval size), as the seed's train.py set them.
SEED_MODELS = {
    "tf_efficientnetv2_s": ("EfficientNetV2-S", 300, 384),
    "tf_efficientnetv2_m": ("EfficientNetV2-M", 384, 480),
    "tf_efficientnetv2_l": ("EfficientNetV2-L", 384, 480),
}
SEED_MODEL_ARGS: dict[str, Any] = {"pad_type": ""}  # symmetric padding, as nn.Conv2d(padding=(k - 1) // 2)
SEED_MEAN_STD = (0.5, 0.5, 0.5)  # the seed's Normalize([0.5] * 3, [0.5] * 3)
SEED_PREFIXES = {"stem", "blocks", "head"}
_CLASSIFIER = "head.classifier.weight"
_COUNTER = "num_batches_tracked"


class SeedLayoutError(ValueError):
    """A seed-style state dict whose tensors do not line up with the timm model."""


def is_seed_state_dict(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether every key of `state` starts with the seed model's stem., blocks. or head."""
    return bool(state) and {key.split(".", 1)[0] for key in state} == SEED_PREFIXES


def seed_classes(state: Mapping[str, torch.Tensor]) -> int | None:
    """How many classes the seed model's classifier outputs (None when it has none)."""
    return state[_CLASSIFIER].shape[0] if _CLASSIFIER in state else None


def seed_model_name(state: Mapping[str, torch.Tensor]) -> str:
    """The timm model (S, M or L) whose layout `state` has, or else the one it matches longest,
    so that seed_to_timm names the first mismatch against the nearest."""
    tensors = _tensors(state)
    classes = seed_classes(state) or 1
    return max(SEED_MODELS, key=lambda name: _lined_up(tensors, timm_layout(name, classes)))


def seed_to_timm(state: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The tensors of seed state dict `state` under the keys of timm model `name` (whose
    classifier takes the file's class count), without BatchNorm counters; `SeedLayoutError`
    names the first tensor that does not line up."""
    tensors = _tensors(state)
    targets = timm_layout(name, seed_classes(state) or 1)
    matched = _lined_up(tensors, targets)
    if matched == len(tensors) == len(targets):
        return {key: tensor for (_, tensor), (key, _) in zip(tensors, targets, strict=True)}
    if matched < min(len(tensors), len(targets)):
        (seed_key, tensor), (key, shape) = tensors[matched], targets[matched]
        raise SeedLayoutError(
            f"tensor {matched + 1} does not line up: {seed_key} {tuple(tensor.shape)} in the "
            f"file, {key} {tuple(shape)} in {name} (the first {matched} matched)"
        )
    if len(tensors) < len(targets):
        raise SeedLayoutError(
            f"the file ends after {len(tensors)} tensors where {name} has "
            f"{len(targets)}: first missing {targets[matched][0]}"
        )
    raise SeedLayoutError(
        f"the file has {len(tensors)} tensors where {name} has "
        f"{len(targets)}: first extra {tensors[matched][0]}"
    )


@cache
def timm_layout(name: str, num_classes: int) -> tuple[tuple[str, torch.Size], ...]:
    """(key, shape) of timm model `name`'s state dict in order, without BatchNorm counters,
    from a model built on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=num_classes)
    return tuple(
        (key, value.shape) for key, value in model.state_dict().items() if not key.endswith(_COUNTER)
    )


def _tensors(state: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    return [(key, value) for key, value in state.items() if not key.endswith(_COUNTER)]


def _lined_up(tensors: list[tuple[str, torch.Tensor]], layout: tuple[tuple[str, torch.Size], ...]) -> int:
    """How many leading tensors match the layout in kind and shape."""
    count = 0
    for (seed_key, tensor), (key, shape) in zip(tensors, layout, strict=False):
        if seed_key.rsplit(".", 1)[-1] != key.rsplit(".", 1)[-1] or tensor.shape != shape:
            break
        count += 1
    return count
