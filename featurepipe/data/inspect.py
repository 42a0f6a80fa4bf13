"""`featurepipe data inspect`: what a data source holds and what would stop or mislead training on it.

Every image is decoded in full once: class counts per split (the split train-cnn would use), image
sizes and modes, every unreadable file with the reason, identical images in more than one split (by a
hash of the pixels; leakage between train and test makes test scores look better than they are), and
groups (patients, studies) that a given split puts in more than one split.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featurepipe.data import intensity
from featurepipe.data.dataset import pixel_sample
from featurepipe.data.load import Skipped
from featurepipe.data.workers import each_image
from featurepipe.data.sources import SPLITS, Catalog, scan
from featurepipe.data.splits import TEST_FRACTION, VAL_FRACTION, assign_splits, broken_groups, check_splits
from featurepipe.errors import FeaturepipeError
from featurepipe.files import write_json

LISTED = 20  # duplicates and broken groups shown in the text report; --json has them all


@dataclass
class Inspection:
    source: str
    kind: str
    images: int
    class_names: list[str]
    split: str  # where the split comes from
    counts: dict[str, list[int]]  # readable images per split (or "all") and class
    width: dict[str, int]
    height: dict[str, int]
    modes: dict[str, int]
    unreadable: list[Skipped]
    duplicates: list[list[str]]  # identical images in more than one split: "split:id" each
    repeated: int  # further copies of an image within its own split
    broken_groups: dict[str, dict[str, int]]
    intensity: str = ""  # what the images use of the 8-bit range (data.intensity)
    problem: str | None = None  # why training would refuse this data
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        write_json(Path(path), self.to_dict())

    def raise_if_unusable(self) -> None:
        if self.problem:
            raise FeaturepipeError(self.problem)

    def format(self) -> str:
        lines = [
            f"source      {self.source} ({self.kind}): {self.images} images, {len(self.class_names)} classes",
            f"split       {self.split}",
            "",
            _table(self.counts, self.class_names),
            "",
            f"width       {_range(self.width)} px",
            f"height      {_range(self.height)} px",
            "modes       " + ", ".join(f"{m} {n}" for m, n in sorted(self.modes.items(), key=lambda x: -x[1])),
            f"intensity   {self.intensity}",
            "",
            f"unreadable  {len(self.unreadable)}" + (" (train-cnn skips them, or stops at the first with "
                                                      "--on-bad-image error)" if self.unreadable else ""),
        ]
        lines += [f"  {s.id}  [{s.split or '-'}, {s.label}]  {s.reason}" for s in self.unreadable]
        lines.append(f"duplicates  {len(self.duplicates)} image(s) in more than one split"
                     + (" (leakage: test scores count them as unseen)" if self.duplicates else "")
                     + (f"; {self.repeated} more repeated within a split" if self.repeated else ""))
        lines += [f"  {' = '.join(d)}" for d in self.duplicates[:LISTED]]
        lines += _more(self.duplicates)
        if self.broken_groups:
            lines.append(f"groups      {len(self.broken_groups)} group(s) in more than one split (leakage)")
            lines += [f"  {g}: " + ", ".join(f"{s} {n}" for s, n in per.items())
                      for g, per in list(self.broken_groups.items())[:LISTED]]
            lines += _more(self.broken_groups)
        lines += [f"warning     {w}" for w in self.warnings]
        lines.append(f"verdict     {'cannot be used: ' + self.problem if self.problem else 'usable'}")
        return "\n".join(lines)


def inspect(source: str, seed: int = 0, allow_outside: bool = False) -> Inspection:
    catalog = scan(source, allow_outside)
    everything = np.arange(len(catalog))
    facts: dict[int, tuple] = {}
    failed: dict[int, str] = {}
    for i, fact, why in each_image(catalog.store, everything, _facts, "inspect"):
        if why:
            failed[i] = why
        else:
            facts[i] = fact

    problem, split_of = None, {}
    try:
        splits = assign_splits(catalog, seed)
    except FeaturepipeError as e:
        problem, splits = str(e), None
    if splits is not None:
        split_of = {int(i): s for s, idx in splits.items() for i in idx}
        readable = {s: np.array([i for i in splits[s] if i not in failed], dtype=np.int64) for s in SPLITS}
        try:
            check_splits(catalog, readable, why=f" once its {len(failed)} unreadable image(s) are left out")
        except FeaturepipeError as e:
            problem = str(e)
    else:
        readable = {"all": np.array(sorted(facts), dtype=np.int64)}

    sizes = np.array([f[0] for f in facts.values()]).reshape(-1, 2)
    sample = readable.get("train", readable.get("all"))
    level = intensity.measure(pixel_sample(catalog.store, sample, 128, 1, seed)) if len(sample) else None
    by_digest: dict[str, list[int]] = {}
    for i, (_, _, digest) in facts.items():
        by_digest.setdefault(digest, []).append(i)
    copies = [ids for ids in by_digest.values() if len(ids) > 1]
    across = [ids for ids in copies if len({split_of.get(i) for i in ids}) > 1]
    return Inspection(
        source=catalog.source,
        kind=catalog.kind,
        images=len(catalog),
        class_names=catalog.class_names,
        split=_origin(catalog, seed),
        counts={s: np.bincount(catalog.labels[idx], minlength=len(catalog.class_names)).tolist()
                for s, idx in readable.items()},
        width=_stats(sizes[:, 0]),
        height=_stats(sizes[:, 1]),
        modes=dict(Counter(f[1] for f in facts.values())),
        unreadable=[Skipped(catalog.ids[i], split_of.get(i, ""), catalog.class_names[catalog.labels[i]], why)
                    for i, why in sorted(failed.items())],
        duplicates=[[f"{split_of.get(i, '-')}:{catalog.ids[i]}" for i in ids] for ids in across],
        repeated=sum(len(ids) - len({split_of.get(i) for i in ids}) for ids in copies),
        broken_groups=broken_groups(catalog, splits) if splits is not None else {},
        intensity=level.describe() if level is not None else "no readable image",
        problem=problem,
        warnings=([] if not failed or problem else
                  [f"{len(failed)} unreadable image(s) will be left out of training (see above)"])
        + (["the images are exported with a low dynamic range (see intensity); train-cnn rescales them"]
           if level is not None and level.low_range else []),
    )


def _facts(store, i: int) -> tuple:
    return store.facts(i)


def _origin(catalog: Catalog, seed: int) -> str:
    made = f"stratified {1 - TEST_FRACTION - VAL_FRACTION:.0%}/{VAL_FRACTION:.0%}/{TEST_FRACTION:.0%} by featurepipe"
    grouped = ", each group whole" if catalog.groups is not None else ""
    if catalog.given_split is None:
        return f"{made} (seed {seed}{grouped})"
    if "val" not in catalog.given_split:
        return f"as given; val carved from train by featurepipe (seed {seed}{grouped})"
    return "as given by the source"


def _stats(values: np.ndarray) -> dict[str, int]:
    if len(values) == 0:
        return {}
    return {"min": int(values.min()), "median": int(np.median(values)), "max": int(values.max())}


def _range(stats: dict[str, int]) -> str:
    return f"{stats['min']}–{stats['max']} (median {stats['median']})" if stats else "-"


def _table(counts: dict[str, list[int]], names: list[str]) -> str:
    rows = [["class", *names, "total"]]
    rows += [[s, *map(str, c), str(sum(c))] for s, c in counts.items()]
    if len(counts) > 1:
        total = np.sum(list(counts.values()), axis=0).tolist()
        rows.append(["all", *map(str, total), str(sum(total))])
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) if k else cell.ljust(w) for k, (cell, w) in enumerate(zip(r, widths)))
                     for r in rows)


def _more(items) -> list[str]:
    return [f"  ... and {len(items) - LISTED} more (all of them with --json)"] if len(items) > LISTED else []

