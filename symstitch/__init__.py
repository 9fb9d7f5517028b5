"""symstitch: are two trained networks the same up to a symmetry of their architecture?

Model stitching with symmetry-constrained layers, symmetry-aware similarity metrics and intertwiner
groups, after "On the Symmetries of Deep Learning Models and their Internal Representations"
(Godfrey, Brown, Emerson, Kvinge; NeurIPS 2022).
"""

__version__ = "0.1.0"
