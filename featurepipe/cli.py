"""The `featurepipe` command: parses options and calls the stage modules, nothing else."""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path
from typing import Optional

import typer

from featurepipe.errors import FeaturepipeError
from featurepipe.options import BAD_IMAGE_HELP, TrainConfig, command_options, declared, typer_option

# Options other commands share with train-cnn, as TrainConfig declares them.
ALLOW_OUTSIDE = typer_option(TrainConfig, "allow_outside")
AMP = typer_option(TrainConfig, "amp")

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Does a classical head on deep features beat the end-to-end CNN? train-cnn → extract → fit-heads → compare.",
)


# What the Ctrl-C line tells the user to do next, by command function.
CONTINUE = {
    "crossval": "run the same crossval command again: finished stages are kept and the fold in progress continues",
    None: "train-cnn continues with --resume, extract where it stopped when re-run",
}


def _cli(fn):
    """User errors become one line on stderr and exit code 2; Ctrl-C exits cleanly with 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            from featurepipe.data.images import max_image_pixels

            max_image_pixels()  # read in every worker later: a bad value is refused here, once
            return fn(*args, **kwargs)
        except FeaturepipeError as e:
            typer.echo(f"featurepipe: error: {e}", err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            typer.echo(f"featurepipe: interrupted; finished files are intact ({CONTINUE.get(fn.__name__, CONTINUE[None])})",
                       err=True)
            raise typer.Exit(130)

    return wrapper


DATA = typer.Option(..., "--data", help="Image folder, CSV manifest (path,label[,split]), .npz, or 'demo'.")
# Options of fit-heads and compare that crossval passes on.
HEADS = typer.Option("svm,rf,logreg", help="Comma-separated: svm, linsvm, logreg, rf, knn, hgb, stack.")
TUNE = typer.Option("val", help="Hyperparameters: none (defaults), val (grid on val; cv on a --folds run, whose "
                                "CNN trained on val), cv (grid, CV on train).")
JOBS = typer.Option(-1, help="Parallel jobs for grid points, CV folds and forests (-1: all cores).")
BOOTSTRAP = typer.Option(2000, help="Stratified bootstrap resamples for the 95% intervals (at least 1000).")


@app.command("train-cnn")
@_cli
@command_options(TrainConfig)
def train_cnn(
    data: str = DATA,
    out: Path = typer.Option(..., "--out", help="Run directory to create."),
    *, cfg: TrainConfig,
) -> None:
    """Train the end-to-end CNN (final weights, or chosen on val with --monitor) and evaluate it on test."""
    from featurepipe.runs import check_outside, run_lock
    from featurepipe.train import train

    cfg.validate()
    check_outside(out, data)
    with run_lock(out, "--out", create=True):
        train(data, out, cfg)


@app.command()
@_cli
@command_options(TrainConfig, tuple(f.name for f in declared(TrainConfig) if f.name not in ("folds", "resume", "overwrite")))
def crossval(
    data: str = DATA,
    out: Path = typer.Option(..., "--out", help="Folder for the cross-validation: fold1/ … foldK/ (each a run) and "
                                                "compare/. Run the same command again to continue it."),
    folds: int = typer.Option(5, "--folds", help="Folds: every image is tested once, by the fold that holds it out."),
    fold: Optional[str] = typer.Option(None, "--fold", help="Run only these folds (e.g. 3, or 2,4): one job of a job "
                                                            "array. The job that finishes the last fold pools them."),
    fold_workers: int = typer.Option(1, "--fold-workers", help="Folds run at once, each in its own process on its "
                                                               "own GPU or its share of the CPU cores."),
    heads: str = HEADS,
    tune: str = TUNE,
    jobs: int = JOBS,
    bootstrap: int = BOOTSTRAP,
    *, cfg: TrainConfig,
) -> None:
    """The whole comparison cross-validated: train-cnn, extract, fit-heads and compare on each fold, then one
    report of the out-of-fold predictions of every image (DIR/compare/report.html)."""
    from featurepipe.crossval import CrossvalConfig, crossval as run_crossval, parse_folds
    from featurepipe.heads import parse_heads
    from featurepipe.runs import check_outside

    cfg.validate()
    check_outside(out, data)
    config = CrossvalConfig(folds=folds, heads=tuple(parse_heads(heads)), tune=tune, jobs=jobs, bootstrap=bootstrap)
    run_crossval(data, out, cfg, config, only=parse_folds(fold), workers=fold_workers)


@app.command("lr-find")
@_cli
@command_options(TrainConfig, ("arch", "weights", "batch_size", "img_size", "weight_decay", "augment", "seed",
                               "device", "amp", "allow_outside"))
def lr_find(
    data: str = DATA,
    out: Path = typer.Option(..., "--out", help="Folder for lr_find.png and lr_find.json."),
    steps: int = typer.Option(100, help="Batches in the sweep."),
    *, cfg: TrainConfig,
) -> None:
    """Learning-rate range test: plots loss against learning rate and suggests one for --lr."""
    from featurepipe.lr_find import lr_find as run_lr_find

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
    data: Optional[str] = typer.Option(None, help="Embed another source instead of the run's own (needs --out); "
                                                  "its classes are matched to the run's by name (an .npz without "
                                                  "names, for a run trained on an .npz, by label number)."),
    out: Optional[Path] = typer.Option(None, help="HDF5 file for --data."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    amp: Optional[bool] = AMP,
    layer: str = typer.Option("penultimate", help="penultimate, or last2 (the last two blocks' pooled outputs)."),
    tta: str = typer.Option("none", help="Average the embedding over views: none, flip, flips, crops, flip+crops."),
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
    heads: str = HEADS,
    tune: str = TUNE,
    jobs: int = JOBS,
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
    bootstrap: int = BOOTSTRAP,
    gradcam: bool = typer.Option(True, help="Grad-CAM overlays of the CNN on its highest-loss test images."),
    overwrite: bool = typer.Option(False, help="Replace the report's files (summary.md, metrics.csv, ...) in --out."),
) -> None:
    """Heads against the CNN on the same test images: intervals, paired tests, per-class tables, charts,
    report.html. With several --run: one table and chart of all runs."""
    from featurepipe.report import CompareOptions, compare_runs
    from featurepipe.report.command import check_out
    from featurepipe.runs import run_lock

    if out is not None:
        check_out(out, len(run), overwrite)
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
