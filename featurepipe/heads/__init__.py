"""Classical heads on the CNN's embeddings: a registry of scikit-learn Pipelines, fitted on train.

- Every head is a Pipeline (its preprocessing, then the classifier as "clf"), class-balanced where the
  estimator supports it, with probabilities (Platt-calibrated for the SVMs).
- Hyperparameters: the head's defaults (`--tune none`), or the best of a small grid by macro F1 on the
  val split (`val`) or by stratified CV on train (`cv`). The test split is never used for a choice.
- Scale: `svm` switches to a Nystroem kernel map + linear SVM above `svm_exact_limit` training vectors.
  Heads with an online form (linsvm, logreg, and svm through Nystroem) fit out-of-core with
  `partial_fit` over chunks read from the HDF5 file, when the train features exceed `memory_bytes`
  or with `--out-of-core`. Grid points and CV folds are fitted in parallel with joblib (`--jobs`).
- `stack`: a logistic regression on the log-probabilities of the CNN and every other head, fitted
  on the val split (its C by stratified CV on val), scored on test.

Where each job is: registry (the heads, one HeadSpec each; TRUSTED_TYPES), fitting (hyperparameters
and fitting in memory), online (out-of-core), stack, files (what a head leaves; load_head), command
(fit-heads itself).
"""

from featurepipe.heads.command import HeadsConfig, check_features, fit_heads
from featurepipe.heads.files import load_head, write_head
from featurepipe.heads.fitting import (TUNE, SkipHead, choose, fit_chosen, fit_to_data, full_proba, one_thread_per_job,
                                       predict_proba)
from featurepipe.heads.online import choose_online, fit_online
from featurepipe.heads.registry import (DEFAULT_HEADS, HEADS, NAMES, STACK, TRUSTED_TYPES, CappedPCA, HeadSpec,
                                        log_proba, parse_heads)
from featurepipe.heads.stack import fit_stack, stack_inputs

# Heads saved before this package was split name these two here; loading them looks them up by that name.
_log_proba = log_proba

__all__ = [
    "DEFAULT_HEADS", "HEADS", "NAMES", "STACK", "TUNE", "TRUSTED_TYPES", "CappedPCA", "HeadSpec", "HeadsConfig",
    "SkipHead", "check_features", "choose", "choose_online", "fit_chosen", "fit_heads", "fit_online", "fit_stack",
    "fit_to_data", "full_proba", "load_head", "log_proba", "one_thread_per_job", "parse_heads", "predict_proba",
    "stack_inputs", "write_head",
]
