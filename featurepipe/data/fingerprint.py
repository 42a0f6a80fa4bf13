"""Whether data read again are the data a run was trained on: fingerprints of a catalog, compared
with config.json's by every command that reads a run's images again (extract, compare's gallery,
train-cnn --resume).

Apart from featurepipe.train so that extract and compare need not import the training module, and
scikit-learn with it, at start-up (docs/scaling.md: what that cost the extract ratio of scripts/bench/pipeline.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from featurepipe.data.sources import Catalog
from featurepipe.errors import FeaturepipeError
from featurepipe.progress import log


def data_fingerprint(catalog: Catalog, contents: bool = True) -> str:
    """A hash of ids, labels and content (arrays) or sizes (files): tells whether two runs saw the same data.
    Without `contents`, of the index alone (ids, labels, classes)."""
    h = hashlib.sha256()
    h.update("\n".join(catalog.ids).encode())
    h.update(np.asarray(catalog.labels, dtype=np.int64).tobytes())
    h.update("\n".join(catalog.class_names).encode())
    if contents and catalog.store.in_memory:
        h.update(np.ascontiguousarray(catalog.store.images).data)
    elif contents:
        for path in catalog.store.paths:
            try:
                h.update(str(Path(path).stat().st_size).encode())
            except OSError:  # gone or unreadable: load_splits skips it (or stops) and says why
                h.update(b"-")
    return h.hexdigest()[:16]


def check_same_data(config: dict[str, Any], catalog: Catalog, where: str) -> None:
    """Compare the data read again with config.json's fingerprints: other ids, labels or classes (an image
    moved to another class) are refused; files changed under the same ids and labels are a warning, and
    each image is then read (or found unreadable) as it is now. Runs without the index fingerprint
    (older ones) refuse any change."""
    data, now = config["data"], data_fingerprint(catalog)
    index = data.get("index_fingerprint")
    if (index is not None and index != data_fingerprint(catalog, contents=False)) or \
            (index is None and data.get("fingerprint") not in (None, now)):
        raise FeaturepipeError(f"{where}: {catalog.source} changed since the run was trained (its images, labels or "
                               f"classes differ from config.json's fingerprint); train a new run on it")
    if data.get("fingerprint") not in (None, now):
        log(f"warning: {where}: files of {catalog.source} changed since the run was trained (sizes or pixels); "
            "ids and labels are the same")
