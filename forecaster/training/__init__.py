"""Training: gradients by fixed feedback, BPTT or truncated BPTT, and the trainer loop.

`forecaster.training.gradients.compute_gradients` is the one gradient entry point;
`forecaster.training.feedback` holds the reverse scans and the estimate of the fixed feedback
(ALGORITHMS.md §5). Import-light on purpose: nothing here imports torch until a submodule is used.
"""
