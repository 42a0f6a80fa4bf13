"""The `featurepipe` command: parses options and calls the stage modules, nothing else."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer

from featurepipe.errors import FeaturepipeError

BAD_IMAGE_HELP = ("skip: leave unreadable images out (warns once, lists them in skipped.csv); "
                  "error: stop at the first.")

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


@app.command("train-cnn")
@_cli
def train_cnn(
    data: str = typer.Option(..., "--data", help="Image folder, CSV manifest (path,label[,split]), .npz, or 'demo'."),
    out: Path = typer.Option(..., "--out", help="Run directory to create."),
    arch: str = typer.Option("sixblock", help="sixblock, resnet18/34/50, densenet121, efficientnet_b0, convnext_tiny."),
    weights: Optional[str] = typer.Option(None, help="Start from a local state dict (path), or 'imagenet' from torch's cache."),
    epochs: Optional[int] = typer.Option(None, help="Default: from the data size (~150k image presentations, 5–100)."),
    batch_size: int = typer.Option(64, help="Training batch size."),
    img_size: Optional[int] = typer.Option(None, help="Default: the images' median short side, 28–128 (224 for backbones)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate. Default: 2e-3 from scratch, 3e-4 from weights."),
    weight_decay: float = typer.Option(0.05, help="AdamW weight decay."),
    label_smoothing: float = typer.Option(0.0, help="Label smoothing of the cross-entropy."),
    augment: str = typer.Option("auto", help="auto, none, light (grey images), rgb (adds flips, colour jitter)."),
    monitor: str = typer.Option("macro_f1", help="Best checkpoint and early stopping by val macro_f1 or loss."),
    patience: Optional[int] = typer.Option(None, help="Epochs without improvement before stopping. Default: max(8, epochs/3)."),
    seed: int = typer.Option(0, help="Seed for the split, initialisation, shuffling and augmentation."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    amp: bool = typer.Option(True, help="Mixed precision on CUDA."),
    resume: bool = typer.Option(False, help="Continue an interrupted run from its last epoch."),
    overwrite: bool = typer.Option(False, help="Replace a run directory that already holds a trained CNN."),
    on_bad_image: str = typer.Option("skip", help=BAD_IMAGE_HELP),
) -> None:
    """Train the end-to-end CNN; keeps the best checkpoint by validation and evaluates it on test."""
    from featurepipe.train import TrainConfig, train

    cfg = TrainConfig(arch=arch, weights=weights, epochs=epochs, batch_size=batch_size, img_size=img_size, lr=lr,
                      weight_decay=weight_decay, label_smoothing=label_smoothing, augment=augment, monitor=monitor,
                      patience=patience, seed=seed, device=device, amp=amp, resume=resume, overwrite=overwrite,
                      on_bad_image=on_bad_image)
    train(data, out, cfg)


@app.command()
@_cli
def extract(
    run: Path = typer.Option(..., "--run", help="Run directory made by train-cnn."),
    batch_size: int = typer.Option(256, help="Images per forward pass."),
    data: Optional[str] = typer.Option(None, help="Embed another source instead of the run's own (needs --out)."),
    out: Optional[Path] = typer.Option(None, help="HDF5 file for --data."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    amp: bool = typer.Option(True, help="Mixed precision on CUDA."),
    on_bad_image: str = typer.Option("skip", help=BAD_IMAGE_HELP + " Applies to --data."),
) -> None:
    """Write the CNN's embeddings of every split to RUN/features.h5 (resumes an interrupted extract)."""
    from featurepipe.extract import extract as run_extract

    run_extract(run, batch_size=batch_size, data=data, out=out, device=device, amp=amp, on_bad_image=on_bad_image)


@app.command("fit-heads")
@_cli
def fit_heads(
    run: Path = typer.Option(..., "--run", help="Run directory with features.h5."),
    heads: str = typer.Option("svm,rf,logreg", help="Comma-separated heads: svm, rf, logreg."),
    jobs: int = typer.Option(-1, help="Parallel jobs for heads that support it (-1: all cores)."),
) -> None:
    """Fit scikit-learn heads on the train embeddings (hyperparameters chosen on val)."""
    from featurepipe.heads import fit_heads as run_fit, parse_heads

    run_fit(run, parse_heads(heads), jobs=jobs)


@app.command()
@_cli
def compare(run: Path = typer.Option(..., "--run", help="Run directory with a CNN and fitted heads.")) -> None:
    """Evaluate the heads against the CNN on the same test images: summary, reports, accuracy chart."""
    from featurepipe.report import compare as run_compare

    run_compare(run)


data_app = typer.Typer(no_args_is_help=True, help="Look at a data source before training on it.")
app.add_typer(data_app, name="data")


@data_app.command("inspect")
@_cli
def data_inspect(
    data: str = typer.Option(..., "--data", help="Image folder, CSV manifest, .npz, or 'demo'."),
    seed: int = typer.Option(0, help="Seed of the split featurepipe would make (as train-cnn --seed)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the full report to this JSON file."),
) -> None:
    """Class counts per split, sizes and modes, unreadable files, duplicates and groups across splits.

    Exits with 2 where train-cnn would refuse the data.
    """
    from featurepipe.data.inspect import inspect

    report = inspect(data, seed=seed)
    typer.echo(report.format())
    if json_out is not None:
        report.save(json_out)
    report.raise_if_unusable()


def main() -> None:
    app(prog_name="featurepipe")


if __name__ == "__main__":
    sys.exit(main())
