"""Utility and fidelity measurements (issue 14, item 4), on tiny sets where the answer is known:
synthetic pairs drawn like the real ones must teach a segmenter about as well as real pairs, pairs
whose maps do not match their images must not; a condition shown by the image is read back."""

from __future__ import annotations

import numpy as np
import torch

from medgen.config import UtilityConfig
from medgen.quality.utility import Pairs, condition_fidelity, dice_per_label, segmentation_utility

torch.set_num_threads(1)
CFG = UtilityConfig(steps=60, batch_size=4, channels=(8, 16), lr=1e-2)


def lesion_pairs(n: int, seed: int, shape=(16, 16, 16)) -> Pairs:
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    imgs, labs = [], []
    for _ in range(n):
        c = rng.integers(4, 12, 3)
        lab = (((g - c[:, None, None, None]) ** 2).sum(0) <= rng.integers(5, 12)).astype(np.int64) * 2
        img = 0.3 + 0.5 * (lab > 0) + rng.normal(0, 0.08, shape)
        imgs.append(img.astype(np.float32))
        labs.append(lab)
    return Pairs(np.stack(imgs), np.stack(labs))


def test_dice_per_label_is_monai_dice_and_skips_absent_labels():
    truth = np.zeros((2, 8, 8, 8), np.int64)
    truth[0, :4] = 1
    pred = truth.copy()
    pred[0, :2] = 0  # half of label 1 found in volume 0; volume 1 holds neither label
    d = dice_per_label(pred, truth, [1, 3])
    assert abs(d["1"] - 2 * 128 / (128 + 256)) < 1e-6 and d["3"] is None


def test_synthetic_pairs_like_the_real_ones_teach_as_well_and_mismatched_ones_do_not():
    real, test = lesion_pairs(8, 0), lesion_pairs(6, 1)
    good = segmentation_utility(real, lesion_pairs(8, 2), test, [2], CFG)
    assert good["dice_real"]["2"] > 0.7
    assert good["synthetic_to_real"] >= 0.8 and good["mask_adherence_mean"] > 0.7
    assert good["dice_real+synthetic"]["2"] >= good["dice_real"]["2"] - 0.05
    shuffled = lesion_pairs(8, 2)
    shuffled = Pairs(shuffled.images, shuffled.labels[::-1].copy())  # each image with another's map
    bad = segmentation_utility(real, shuffled, test, [2], CFG)
    assert bad["synthetic_to_real"] < 0.6 and bad["mask_adherence_mean"] < 0.4


def test_a_condition_the_images_show_is_read_back_and_a_wrong_one_is_not():
    rng = np.random.default_rng(3)

    def scans(flags):
        return np.stack([0.3 + 0.4 * f + rng.normal(0, 0.05, (16, 16, 16)) for f in flags]).astype(np.float32)

    train_flags = [0, 1] * 6
    test_flags = [1, 0, 0, 1]
    train, test = scans(train_flags), scans(test_flags)
    to_level = {0: "no", 1: "yes"}
    synth = scans([1, 1, 1, 1])
    kw = dict(kind="categorical", levels=["no", "yes"], cfg=CFG)
    right = condition_fidelity(
        train, [to_level[f] for f in train_flags], test, [to_level[f] for f in test_flags], synth, ["yes"] * 4, **kw
    )
    assert right["heldout_real"] == 1.0 and right["synthetic"] == 1.0 and right["chance"] == 0.5
    wrong = condition_fidelity(
        train, [to_level[f] for f in train_flags], test, [to_level[f] for f in test_flags], synth, ["no"] * 4, **kw
    )
    assert wrong["synthetic"] == 0.0
    ages = [20 + 5 * i for i in range(12)]
    aged = np.stack([0.2 + 0.01 * (a - 20) + rng.normal(0, 0.02, (16, 16, 16)) for a in ages]).astype(np.float32)
    cont = condition_fidelity(aged, ages, aged[:4], ages[:4], aged[4:8], ages[4:8], "continuous", None, CFG)
    assert cont["metric"] == "mae" and cont["heldout_real"] < 10 and cont["synthetic"] < 10


def test_real_plus_synthetic_keeps_the_real_pairs_in_every_batch():
    """Four times as many synthetic pairs as real ones, and bad ones (each image with another's
    map): pooled, they crowd the real pairs out and the real + synthetic net loses most of what the
    real pairs teach; mixed at half real per batch (the default), it keeps more of it (measured:
    Dice 0.98 real alone, 0.82 pooled, 0.95 mixed)."""
    real, test = lesion_pairs(8, 0), lesion_pairs(6, 1)
    many = lesion_pairs(32, 2)
    shuffled = Pairs(many.images, np.roll(many.labels, 1, axis=0).copy())
    pooled = segmentation_utility(real, shuffled, test, [2], CFG.model_copy(update={"real_fraction": None}))
    mixed = segmentation_utility(real, shuffled, test, [2], CFG)
    assert mixed["real_fraction"] == 0.5 and pooled["real_fraction"] is None
    assert mixed["dice_real+synthetic"]["2"] > pooled["dice_real+synthetic"]["2"] + 0.05, (mixed, pooled)
    assert mixed["dice_real+synthetic"]["2"] > mixed["dice_real"]["2"] - 0.1
