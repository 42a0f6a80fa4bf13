"""The rules that fill the options a user leaves out, from the training images in front of them.

Each rule sits beside the measurements it came from; docs/design.md ("Defaults and the measurements
behind them") has the table. `prepare.resolve` applies them and records the choices in config.json
(`prepare.Resolved`).
"""

from __future__ import annotations

import math

from featurepipe.data.augment import test_views
from featurepipe.errors import FeaturepipeError
from featurepipe.models import ARCHS, LITE0_INSTALL, imagenet_weights_file

# --arch auto: pretrained EfficientNet-Lite0 for images of at least this many pixels on their short
# side and at most this many training images; sixblock from scratch otherwise (see docs/design.md,
# "Defaults and the measurements behind them").
AUTO_PRETRAINED_MIN_SIDE = 64
AUTO_PRETRAINED_MAX_TRAIN = 10_000
PRETRAINED_ARCH = "efficientnet_lite0"


def auto_arch(short_side: int, n_train: int) -> tuple[str, str | None, str]:
    """(arch, weights, reason) for --arch auto, from the images' median short side and the training set's size."""
    if short_side < AUTO_PRETRAINED_MIN_SIDE:
        return "sixblock", None, (f"images of {short_side} px: too small for ImageNet features, trained from "
                                  "scratch at their own size")
    if n_train > AUTO_PRETRAINED_MAX_TRAIN:
        return "sixblock", None, (f"{n_train} training images: enough to train from scratch, at a fraction of a "
                                  "pretrained backbone's cost")
    try:
        imagenet_weights_file(PRETRAINED_ARCH)
    except FeaturepipeError:
        return "sixblock", None, (f"{PRETRAINED_ARCH}'s ImageNet weights are not installed ({LITE0_INSTALL}), so "
                                  "trained from scratch instead")
    return PRETRAINED_ARCH, "imagenet", (f"{n_train} training images of {short_side} px: few enough that ImageNet "
                                         "features help")


def auto_img_size(arch: str, short_side: int, pretrained: bool = False) -> int:
    """Native size for small images; large scans are shrunk to what the model can learn from on a CPU
    (the cap is the architecture's, see models.registry)."""
    entry = ARCHS[arch]
    return int(min(entry.auto_size_cap(pretrained), max(entry.min_img_size, short_side)))


def auto_batch_size(n_train: int) -> int:
    """64, or for small sets the power of two nearest below a sixth of them (at least 8): a few
    hundred images still give several optimizer steps an epoch."""
    return int(min(64, max(8, 2 ** math.floor(math.log2(max(1, n_train // 6))))))


# Fine-tuning a pretrained backbone: about 300 optimizer steps, and at least 15 epochs of grey images
# or FINETUNE_MIN_EPOCHS_COLOUR of colour ones. Half the steps scored lower on both 240-image sets (brain
# MRI CNN 0.8975 against 0.9075, fundus 0.7875 against 0.8042), though their val loss was lowest after
# 90-150 steps. 300 steps alone gave grey sets of thousands a few epochs each and they stopped while
# still learning: a 4 800-image brain MRI set 5 (0.91, val accuracy still rising; 0.932 with 15), and
# PneumoniaMNIST at 64 px 5 (0.8830 against 0.9071 with 15). Colour sets of thousands learn sooner and
# then only grow over-confident: on a 2 239-image dermoscopy set 300 steps (11 epochs) scored as 16 did
# (0.610 against 0.602), its val loss lowest at epoch 9 of 16; on dermoscopy4 (1 741 images) at epoch
# 10 of 16, the test accuracy of each epoch's weights flat from epoch 8 on (docs/design.md). Where the
# schedule still ends learning, Extend adds cycles.
FINETUNE_STEPS = 300
FINETUNE_MIN_EPOCHS = 15
FINETUNE_MIN_EPOCHS_COLOUR = 8
FINETUNE_MAX_EPOCHS = 40


def auto_epochs(n_train: int, batch_size: int, pretrained: bool, grey: bool = True) -> int:
    """Sized in optimizer steps: from scratch about 1 250 (and at least 10 epochs, and 80 000 image
    presentations within 60 epochs: PneumoniaMNIST's 4 708 images get 17 epochs, as before), at most 200
    epochs; fine-tuning a pretrained backbone FINETUNE_STEPS, at least FINETUNE_MIN_EPOCHS (grey) or
    FINETUNE_MIN_EPOCHS_COLOUR (colour), at most FINETUNE_MAX_EPOCHS."""
    steps = math.ceil(n_train / batch_size)
    if pretrained:
        fewest = FINETUNE_MIN_EPOCHS if grey else FINETUNE_MIN_EPOCHS_COLOUR
        return int(min(FINETUNE_MAX_EPOCHS, max(fewest, math.ceil(FINETUNE_STEPS / steps))))
    return int(min(200, max(10, min(60, math.ceil(80_000 / n_train)), math.ceil(1_250 / steps))))


def auto_lr(pretrained: bool) -> float:
    """Peak learning rate of the head: half as high where a pretrained backbone is fine-tuned."""
    return 1e-3 if pretrained else 2e-3


# Fine-tuning: the earliest third of a pretrained backbone trains at lr x this ratio, the later thirds
# at ratio^(2/3) and ratio^(1/3) (train._optimizer). 0.1 keeps ImageNet's first layers close to what they
# were, which is what every grey set and colour sets of a few hundred were measured with. A colour set of
# thousands gains from moving the whole backbone at the head's rate: dermoscopy4 (1 741 images) CNN
# 0.7078 / 0.7009 against 0.6783 / 0.6713 (seeds 0 / 1), best head 0.7235 / 0.7235 against 0.6887 /
# 0.6957, in the same time; fundus4-small (240) does not (CNN 0.8042 / 0.7583 against 0.8042 / 0.8000),
# its few images overfit a backbone that moves freely. In between, dermoscopy4 cut to 249 and 613 training
# images still gains (CNN +1.3 and +1.4 points, within the seed spread) where fundus4-small at 240 loses:
# the count cannot tell the two apart below 1 000, so sets of a few hundred keep 0.1 (docs/design.md,
# "Where between 240 and 1 741 images the two colour rules start").
LR_BACKBONE_RATIO = 0.1
LR_BACKBONE_RATIO_COLOUR_THOUSANDS = 1.0
COLOUR_THOUSANDS_MIN_TRAIN = 1_000


def colour_thousands(grey: bool, n_train: int) -> bool:
    return not grey and n_train >= COLOUR_THOUSANDS_MIN_TRAIN


def auto_lr_backbone_ratio(grey: bool, n_train: int) -> float:
    return LR_BACKBONE_RATIO_COLOUR_THOUSANDS if colour_thousands(grey, n_train) else LR_BACKBONE_RATIO


# The CNN's predictions on a colour set of thousands average its logits over the flips its augmentation
# made (data.augment.test_views: the image and its three mirrors for `rgb`). dermoscopy4, eight trained models
# (the defaults' two seeds and six variants): test accuracy +1.0 points on average (-0.35 to +2.26),
# macro F1 higher in all eight, val +1.4; the defaults' seeds 0 / 1 0.7078 / 0.7009 -> 0.7183 / 0.7235.
# fundus4-small (240 images, the defaults' two seeds) test -0.8 / +0.4 and val -2.5 / -5.0 points: sets of
# a few hundred predict from the image alone (docs/design.md, "Test-time flips").
def auto_tta(augment: str, grey: bool, n_train: int) -> str:
    return test_views(augment) if colour_thousands(grey, n_train) else "none"


def auto_freeze_epochs(pretrained: bool) -> int:
    """One epoch training only the new head on a frozen pretrained backbone, so that a random head's
    first gradients do not wreck its features; nothing to freeze from scratch."""
    return 1 if pretrained else 0


def auto_patience(epochs: int) -> int:
    """Early stopping (--monitor loss or macro_f1) waits a third of the schedule, at least 8 epochs."""
    return max(8, epochs // 3)


# A schedule that ends while the model is still learning gets another, shorter cycle (callbacks.Extend):
# warm-restarted from the final weights at this share of the peak learning rate, for this share of the
# planned epochs, at most this many times. Only where --epochs was left out: a number given is kept.
EXTEND_SHARE = 0.5
EXTEND_LR_SCALE = 0.5
EXTEND_MAX = 2


def auto_extend_max(epochs_given: int | None) -> int:
    return EXTEND_MAX if epochs_given is None else 0


def still_learning(val_losses: list[float], standard_error: float) -> bool:
    """Did the cycle whose validation losses these are end while the model was still learning? Yes
    where the best val loss of its last quarter beats the best before it by more than one standard
    error of the val loss (the noise of that many val images; the one-standard-error rule KeepBest
    uses). A cycle of under four epochs cannot tell."""
    quarter = max(1, len(val_losses) // 4)
    if len(val_losses) < 4:
        return False
    return min(val_losses[-quarter:]) < min(val_losses[:-quarter]) - standard_error


def extension_epochs(planned: int) -> int:
    return max(2, math.ceil(planned * EXTEND_SHARE))
