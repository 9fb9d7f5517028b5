"""The dissection experiment (docs/method.md §6): networks × points × rotations Q^α of the units, one dissection
per cell, on a concept source named in the settings.

``concepts``: ``digits-twin`` (the embedded twin, all its images; ``digits-twin:test`` for the test split
only) or ``broden:<folder>`` (a local Broden copy; ``image_size`` resizes its images to the networks' input).
The networks come from a model library (``zoo`` and ``models: {arch: seeds}``) or by name (``networks: {name:
reference}``); ``points`` is a list, ``all`` (every feature point), or ``{arch: [...]}``. Each α > 0 is dissected
under ``rotations`` independent Haar rotations Q (seeds 0, 1, …): Q^α moves the units from the activation basis
(α = 0, one cell) to a random one (α = 1). The report pools seeds and rotations into means with intervals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from symstitch.dissect.api import IOU_THRESHOLD, dissect
from symstitch.dissect.concepts import ConceptSource
from symstitch.io import parse_range
from symstitch.library import library_models, load_model
from symstitch.plots import dissection_units
from symstitch.runner import EXPERIMENTS, REQUIRED, Cell, Experiment, names

#: concept sources by the prefix of their name in the settings
SOURCES = ("digits-twin", "broden")


def concept_source(spec: str, image_size: Optional[int] = None) -> ConceptSource:
    """The concept source ``spec`` names: ``digits-twin[:train|test|all]`` or ``broden:<folder>``."""
    kind, _, arg = str(spec).partition(":")
    if kind == "digits-twin":
        from symstitch.dissect.twin import DigitsTwin

        return DigitsTwin(arg or "all")
    if kind == "broden":
        from symstitch.dissect.broden import BrodenSource

        if not arg:
            raise ValueError("broden needs its folder: concepts: broden:/path/to/broden1_224")
        return BrodenSource(arg, image_size=image_size)
    raise ValueError(f"unknown concept source {spec!r}; valid: digits-twin[:train|test|all], broden:<folder>")


def _number_text(value: float) -> str:
    return f"{value:g}"


@EXPERIMENTS.register("dissect")
class DissectExperiment(Experiment):
    """Network dissection of networks × points × rotations of the units (see the module)."""

    name = "dissect"
    options = {"zoo": None, "models": None, "networks": None, "points": REQUIRED, "concepts": "digits-twin",
               "image_size": None, "alphas": [0.0], "rotations": 1, "q": None, "iou_threshold": IOU_THRESHOLD,
               "images": None, "batch_size": 128, "top_units": 12}

    def __init__(self, settings: dict, base: Path = Path(".")):
        super().__init__(settings, base)
        s = self.settings
        if (s["networks"] is None) == (s["models"] is None) or (s["models"] is not None and s["zoo"] is None):
            raise ValueError("a dissect experiment takes its networks from a model library (zoo, models: {arch: "
                             "seeds}) or by name (networks: {name: reference})")
        alphas = [float(a) for a in (s["alphas"] if isinstance(s["alphas"], list) else [s["alphas"]])]
        if any(not 0.0 <= a <= 1.0 for a in alphas):
            raise ValueError(f"alphas lie in [0, 1], got {alphas}")
        if int(s["rotations"]) < 1:
            raise ValueError(f"rotations must be at least 1, got {s['rotations']}")
        self.alphas = sorted(set(alphas))
        kind = str(s["concepts"]).partition(":")[0]
        if kind not in SOURCES:
            concept_source(s["concepts"])  # the error names the valid ones

    def networks(self) -> dict[str, tuple[str, str, Optional[int]]]:
        """``name → (model reference, family, seed)``: the family (architecture) is what the report pools."""
        s = self.settings
        if s["networks"] is not None:
            return {str(name): (str(ref), str(name), None) for name, ref in s["networks"].items()}
        if not isinstance(s["models"], dict):
            raise ValueError("models maps architectures to seeds, e.g. {resnet20: 0-2}")
        return {f"{arch}-seed{seed}": (ref, arch, seed) for arch, seeds in s["models"].items()
                for seed, ref in library_models(s["zoo"], arch, parse_range(seeds)).items()}

    def points_of(self, family: str, valid: Sequence[str], label: str) -> list[str]:
        chosen = self.settings["points"]
        if isinstance(chosen, dict):
            if family not in chosen:
                raise ValueError(f"points names no points for {family}; it names {', '.join(map(str, chosen))}")
            chosen = chosen[family]
        points = list(valid) if chosen == "all" else names(chosen)
        for point in points:
            if point not in valid:
                raise ValueError(f"unknown point {point!r} of {label}; valid points: {', '.join(valid)}")
        return points

    def cells(self) -> list[Cell]:
        cells = []
        for network, (ref, family, seed) in self.networks().items():
            net = load_model(ref)
            valid = list(dict.fromkeys([*net.feature_points, *net.split_points]))
            for point in self.points_of(family, valid, f"{network} ({ref})"):
                for alpha in self.alphas:
                    for r in range(1 if alpha == 0 else int(self.settings["rotations"])):
                        key = f"{network}/{point}/alpha{_number_text(alpha)}" + (f"-r{r}" if alpha else "")
                        cells.append(Cell(key, {"network": network, "family": family, "seed": seed, "model": ref,
                                                "point": point, "alpha": alpha, "rotation": r if alpha else None}))
        return cells

    def concepts(self) -> ConceptSource:
        """The concept source of the settings (a Broden folder, like ``zoo`` and ``out``, relative to the folder
        the sweep runs in)."""
        return concept_source(str(self.settings["concepts"]), self.settings["image_size"])

    def check(self, cells: Sequence[Cell]) -> None:
        self.concepts()  # a missing or malformed concept folder fails before anything is written

    def run_cell(self, cell: Cell, out: Path) -> Optional[dict]:
        from symstitch.dissect.rotation import haar_rotation, rotation_power

        s, p = self.settings, cell.params
        source = self.concepts()
        transform, name = None, ""
        if p["alpha"]:
            units = load_model(p["model"]).point_channels(p["point"])
            transform = rotation_power(haar_rotation(units, seed=p["rotation"]), p["alpha"])
            name = f"Q^{_number_text(p['alpha'])}, Q Haar-random in SO({units}), seed {p['rotation']}"
        d = dissect(p["model"], p["point"], source, q=s["q"], iou_threshold=float(s["iou_threshold"]),
                    batch_size=int(s["batch_size"]), limit=s["images"], transform=transform, transform_name=name)
        cell_dir = self.cell_dir(out, cell)
        files = d.write(cell_dir)
        pictures = [(title, images.numpy(), masks.numpy())
                    for title, images, masks in d.unit_pictures(source, int(s["top_units"]))]
        note = f"{p['network']} at {p['point']}" + (f", {name}" if name else "") + f"; {d.headline()}"
        figure = dissection_units(pictures, cell_dir / "units.png", note)
        record: dict[str, Any] = d.record()
        record.update({"network": p["network"], "family": p["family"], "seed": p["seed"], "alpha": p["alpha"],
                       "rotation": p["rotation"], "network_ref": d.network, "concepts": source.name,
                       "tally_csv": str(files["tally"].relative_to(out)), "units_png": str(figure.relative_to(out))})
        return record
