"""Test-time views: the mirrors of the four quarter turns, averaged by probability."""

import argparse

import pytest
import torch

from engine.model.predictor import TTA_VIEWS, tta_logits, tta_views, view_logits
from engine.training.train import make_config, parse_args, views_arg


def corner_net() -> torch.nn.Module:
    """A small conv net that tells orientations apart (its head sees one corner)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    return lambda x: conv(x)[:, :, :4, :4].mean((-2, -1))


def test_the_eight_views_are_the_symmetries_of_a_square_in_their_named_order():
    image = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    views = view_logits(lambda x: x, image, 8)
    symmetries = {
        torch.rot90(flipped, k, (-2, -1)).numpy().tobytes()
        for flipped in (image, image.flip(-1))
        for k in range(4)
    }
    assert len(views) == len(TTA_VIEWS[8]) and {v.numpy().tobytes() for v in views} == symmetries
    assert torch.equal(views[0], image) and torch.equal(views[1], image.flip(-1))
    assert torch.equal(views[2], torch.rot90(image, 1, (-2, -1)))
    assert [len(view_logits(lambda x: x, image, n)) for n in (1, 2)] == [1, 2]


def test_eight_views_grade_a_turned_or_mirrored_photograph_alike():
    forward, image = corner_net(), torch.rand(2, 3, 16, 16)
    turned = torch.rot90(image, 1, (-2, -1))
    assert not torch.allclose(forward(image), forward(turned), atol=1e-3)
    assert not torch.allclose(tta_logits(forward, image, 2), tta_logits(forward, turned, 2), atol=1e-3)
    for other in (turned, image.flip(-2), torch.rot90(image.flip(-1), 3, (-2, -1))):
        assert torch.allclose(tta_logits(forward, image, 8), tta_logits(forward, other, 8), atol=1e-5)


def test_tta_averages_probabilities_not_logits():
    forward, image = corner_net(), torch.rand(2, 3, 16, 16)
    probs = torch.stack([torch.softmax(v, 1) for v in view_logits(forward, image, 8)]).mean(0)
    assert torch.allclose(torch.softmax(tta_logits(forward, image, 8), 1), probs, atol=1e-6)
    assert torch.equal(tta_logits(forward, image, 1), forward(image))


def test_views_settings_read_old_runs_and_refuse_other_counts():
    assert [tta_views(v) for v in (True, False, None, 1, 2, 8)] == [2, 1, 1, 1, 2, 8]
    with pytest.raises(ValueError, match="1, 2 or 8"):
        tta_views(4)
    assert [views_arg(v) for v in ("1", "2", "8", "true", "false")] == [1, 2, 8, 2, 1]
    with pytest.raises(argparse.ArgumentTypeError, match="got '3'"):
        views_arg("3")
    assert make_config(parse_args(["--data-path", "x"])).tta == 8  # the measured default
