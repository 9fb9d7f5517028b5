"""Names and defaults that both the torch-free command layer (:mod:`symstitch.commands`) and the experiments
need, declared once. Imports nothing, so that ``symstitch --help`` stays fast.
"""

from __future__ import annotations

#: the subcommands LightningCLI runs (``symstitch fit``, …)
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

#: the paper's four similarity metrics (docs/method.md §3), the default of every align command and experiment
PAPER_METRICS = ("procrustes_relu", "procrustes_orthogonal", "cka_linear", "cka_relu")

#: the projection experiment's default networks: a ReLU and a sigmoid mCNN (docs/method.md §4)
PROJECTION_ARCHS = ("mcnn", "mcnn_sigmoid")

#: the defaults of one stitch, shared by ``symstitch stitch``, stitch sweeps and :func:`symstitch.stitching.stitch`:
#: 4 epochs (3 relaxed, then Hungarian hardening and 1 epoch of scale tuning for G stitches), a start from the
#: data (least squares / channel matching), Adam with learning rate 0.005, seed 0
STITCH_DEFAULTS = {"layers": ("standard", "birkhoff"), "epochs": 4, "relaxed_epochs": 3, "lr": 0.005,
                   "init": "data", "seed": 0, "prefix_cache": None}
