"""Backdoor detectors as evaluation analyses (docs/detectors.md): STRIP (input-level), Spectral
Signatures and Activation Clustering (training-set level), MM-BD (model-level, data-free).

Each runs on every backdoor cell that `eval.detectors` keeps (all four by default) and adds
`det_<name>_*` values to the `detectors_json` column of the cell's rows; `common` holds what they share (AUROC, TPR at a fixed
FPR, the feature taps, the poisoned training set's features)."""
