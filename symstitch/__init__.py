"""symstitch: are two trained networks the same up to a symmetry of their architecture?

Model stitching with symmetry-constrained layers, symmetry-aware similarity metrics and intertwiner
groups, after "On the Symmetries of Deep Learning Models and their Internal Representations"
(Godfrey, Brown, Emerson, Kvinge; NeurIPS 2022).
"""

__version__ = "0.2.0"


def verbose(on: bool = True) -> None:
    """Lightning's own console messages (device banners, tips, summaries) from Python calls too (``on``), or none
    (the default: every entry point is as quiet as the commands)."""
    from symstitch.loggers import quiet

    quiet(verbose=on)


def __getattr__(name: str):
    # `symstitch.stitch(...)` without importing Lightning at `import symstitch`
    if name == "stitch":
        from symstitch.stitching import stitch

        return stitch
    raise AttributeError(f"module 'symstitch' has no attribute {name!r}")
