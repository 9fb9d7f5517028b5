"""A reader for a local copy of Broden, the concept dataset of NetDissect / NetDissect-Lite.

Broden is a folder (``broden1_224/``, ``broden1_227/``) holding

- ``images/``: the images (JPEG) and their segmentation masks (PNG), in one subfolder per origin dataset;
- ``index.csv`` (``image,split,ih,iw,sh,sw,color,object,part,material,scene,texture``): one row per image.
  ``image`` is a path under ``images/``, ``ih, iw`` the image size, ``sh, sw`` the mask size. A *pixel*
  category's cell (colour, object, part, material) holds zero or more mask files (paths under ``images/``) joined
  by ``;``, each a PNG whose pixels carry the label number R + 256·G; an *image* category's cell (scene,
  texture) holds zero or more label numbers joined by ``;``, each covering the whole image. An empty cell: the
  image has no labels of that category;
- ``label.csv`` (``number,name,category,frequency,coverage,syns``): one row per label; ``category`` lists the
  categories the label occurs in with counts, ``object(1234);part(56)``. The category with the largest count
  (the first listed on a tie) is the label's primary one. Number 0, when present, is ``-`` (no label);
- ``category.csv`` (``name,first,last,count,frequency``): one row per category;
- ``c_<category>.csv`` (``code,number,name,frequency,coverage``): each category's own numbering (checked for
  presence and columns, not used otherwise).

:class:`BrodenSource` parses the CSV files when built and reads images and masks only when :meth:`get` asks for
them. Labels are renumbered 1…C in ``label.csv`` order (:attr:`BrodenSource.numbers` maps Broden's numbers to
ours). Every problem with the folder is a :class:`BrodenFormatError` (missing things also a
``FileNotFoundError``) that names the file, and the ``index.csv`` line where a row is at fault.

Mask sizes: every row served must have the same ``sh, sw`` (Broden's releases do: 112 × 112 in ``broden1_224``,
113 × 113 in ``broden1_227``); a folder that mixes them is refused when the source is built rather than having
its masks resampled, and a mask file whose size is not its row's ``sh, sw`` is refused when read.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from symstitch.dissect.concepts import IMAGE_CATEGORIES, Concept, ConceptBatch, ConceptSource

__all__ = ["BrodenFormatError", "BrodenNotFoundError", "BrodenSource"]

INDEX_COLUMNS = ("image", "split", "ih", "iw", "sh", "sw")
LABEL_COLUMNS = ("number", "name", "category", "frequency", "coverage", "syns")
CATEGORY_COLUMNS = ("name", "first", "last", "count", "frequency")
CODE_COLUMNS = ("code", "number", "name", "frequency", "coverage")

DOWNLOAD_HINT = ("Broden is not shipped with symstitch: NetDissect-Lite's script/dlbroden.sh downloads broden1_224 "
                 "and broden1_227 (about 1 GB) from http://netdissect.csail.mit.edu/data/ ; unpack it and pass the "
                 "folder that holds index.csv, e.g. BrodenSource('/data/broden1_224').")


class BrodenFormatError(ValueError):
    """A Broden folder that cannot be read: a missing or malformed file, column, row, image or mask."""


class BrodenNotFoundError(BrodenFormatError, FileNotFoundError):
    """A missing Broden folder, CSV file, image or mask (both a :class:`BrodenFormatError` and a
    ``FileNotFoundError``)."""


def _read_csv(path: Path, columns: Sequence[str], what: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the (line number, cells) rows of the CSV file ``path``, checking that it exists and has
    ``columns``; ``what`` names the file in messages."""
    if not path.is_file():
        raise BrodenNotFoundError(f"{path}: missing {what} (a Broden folder holds index.csv, label.csv, "
                                  f"category.csv and c_<category>.csv for each category). " + DOWNLOAD_HINT)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise BrodenFormatError(f"{path}: empty file, expected a header with the columns "
                                    f"{', '.join(columns)}") from None
        _check_columns(path, header, columns)
        rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    return header, rows


def _check_columns(path: Path, header: Sequence[str], columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in header]
    if missing:
        raise BrodenFormatError(f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
                                f"expected the columns {', '.join(columns)}, found {', '.join(header) or 'none'}")


def _cell(path: Path, header: list[str], line: int, row: list[str], column: str) -> str:
    i = header.index(column)
    if i >= len(row):
        raise BrodenFormatError(f"{path} line {line}: the row has {len(row)} cells, no {column!r} (column {i + 1})")
    return row[i].strip()


def _int(path: Path, line: int, column: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise BrodenFormatError(f"{path} line {line}: {column} must be a whole number, got {text!r}") from None


def _split(cell: str) -> list[str]:
    """The ``;``-joined items of a cell, without empty ones."""
    return [item.strip() for item in cell.split(";") if item.strip()]


def _parse_categories(path: Path, line: int, text: str) -> list[tuple[str, int]]:
    """``object(1234);part(56)`` → [("object", 1234), ("part", 56)] (a bare name counts 0)."""
    out = []
    for item in _split(text):
        name, count = item, 0
        if item.endswith(")") and "(" in item:
            name, _, number = item[:-1].partition("(")
            count = _int(path, line, "a category count", number.strip())
        name = name.strip()
        if not name:
            raise BrodenFormatError(f"{path} line {line}: a category entry without a name in {text!r}")
        out.append((name, count))
    if not out:
        raise BrodenFormatError(f"{path} line {line}: empty category, expected e.g. 'object(1234);part(56)'")
    return out


class BrodenSource(ConceptSource):
    """The images and concept labels of a local Broden folder, as a :class:`ConceptSource`.

    - ``root``: the folder holding ``index.csv`` (``broden1_224``);
    - ``image_size``: an int or (h, w) that every image is resized to (bilinear, antialiased when shrinking);
      ``None`` keeps the size ``index.csv`` gives (``ih, iw``), which must then be the same for every row;
    - ``split``: ``"train"`` or ``"val"`` keeps those rows of ``index.csv``, ``None`` all of them;
    - ``limit``: keeps the first ``limit`` rows (after ``split``).

    The CSV files are read and checked here; images and masks are read by :meth:`get`.
    """

    def __init__(self, root: Union[str, Path], *, image_size: Union[int, tuple[int, int], None] = None,
                 split: Optional[str] = None, limit: Optional[int] = None) -> None:
        self.root = Path(root)
        self.name = f"broden:{root}"
        if not self.root.is_dir():
            raise BrodenNotFoundError(f"no Broden folder at {self.root}. " + DOWNLOAD_HINT)
        if not (self.root / "index.csv").is_file():
            near = [p for p in (self.root / "broden1_224", self.root / "broden1_227") if (p / "index.csv").is_file()]
            if near:
                raise BrodenNotFoundError(f"{self.root / 'index.csv'}: missing index.csv; the Broden folder is "
                                          f"{near[0]}, pass that")
        if limit is not None and limit < 1:
            raise ValueError(f"{self.name}: limit must be at least 1, got {limit}")
        self._image_size = self._parse_size(image_size)

        self._categories = self._read_categories()
        for cat in self._categories:
            path = self.root / f"c_{cat}.csv"
            if not path.is_file():
                raise BrodenNotFoundError(f"{path}: missing c_{cat}.csv, the code table of the category {cat!r} "
                                          f"that category.csv lists. " + DOWNLOAD_HINT)
            with open(path, newline="", encoding="utf-8") as f:
                header = [h.strip() for h in next(csv.reader(f), [])]
            _check_columns(path, header, CODE_COLUMNS)
        self._image_categories = tuple(c for c in IMAGE_CATEGORIES if c in self._categories)

        self._concepts, self._broden_numbers = self._read_labels()
        self._numbers = {b: i + 1 for i, b in enumerate(self._broden_numbers)}
        self._lookup = np.full(max(self._broden_numbers, default=0) + 1, -1, dtype=np.int64)
        self._lookup[0] = 0
        for b, ours in self._numbers.items():
            self._lookup[b] = ours

        self._rows = self._read_index(split, limit)
        self._mask_size = self._rows[0][3]
        self._default_size = self._rows[0][2]
        for line, _, ihw, shw, _ in self._rows:
            if shw != self._mask_size:
                raise BrodenFormatError(
                    f"{self.root / 'index.csv'} line {line}: mask size sh, sw = {shw}, but line "
                    f"{self._rows[0][0]} has {self._mask_size}; this reader needs one mask size for every row "
                    f"(pick the rows with split= / limit=, or use a Broden release with one size)")
            if self._image_size is None and ihw != self._default_size:
                raise BrodenFormatError(
                    f"{self.root / 'index.csv'} line {line}: image size ih, iw = {ihw}, but line "
                    f"{self._rows[0][0]} has {self._default_size}; pass image_size= to resize every image to "
                    f"one size")

    # ------------------------------------------------------------------ parsing
    def _parse_size(self, size: Union[int, tuple[int, int], None]) -> Optional[tuple[int, int]]:
        if size is None:
            return None
        hw = (size, size) if isinstance(size, int) else tuple(size)
        if len(hw) != 2 or not all(isinstance(s, int) and s > 0 for s in hw):
            raise ValueError(f"{self.name}: image_size must be a positive int or (h, w), got {size!r}")
        return (hw[0], hw[1])

    def _read_categories(self) -> tuple[str, ...]:
        path = self.root / "category.csv"
        header, rows = _read_csv(path, CATEGORY_COLUMNS, "category.csv")
        names = [_cell(path, header, line, row, "name") for line, row in rows]
        if not names:
            raise BrodenFormatError(f"{path}: no categories")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice or "" in names:
            raise BrodenFormatError(f"{path}: category names must be distinct and non-empty, got {names}")
        return tuple(names)

    def _read_labels(self) -> tuple[list[Concept], list[int]]:
        path = self.root / "label.csv"
        header, rows = _read_csv(path, LABEL_COLUMNS, "label.csv")
        concepts: list[Concept] = []
        numbers: list[int] = []
        seen: dict[int, int] = {}
        for line, row in rows:
            number = _int(path, line, "number", _cell(path, header, line, row, "number"))
            if number == 0:
                continue
            if number < 0:
                raise BrodenFormatError(f"{path} line {line}: label number {number} is negative")
            if number in seen:
                raise BrodenFormatError(f"{path} line {line}: label number {number} again (first on line "
                                        f"{seen[number]})")
            seen[number] = line
            found = _parse_categories(path, line, _cell(path, header, line, row, "category"))
            primary = max(found, key=lambda nc: nc[1])[0]  # max keeps the first of equal counts
            if primary not in self._categories:
                raise BrodenFormatError(f"{path} line {line}: label {number}'s primary category {primary!r} is not "
                                        f"in category.csv ({', '.join(self._categories)})")
            name = _cell(path, header, line, row, "name")
            concepts.append(Concept(len(concepts) + 1, name, primary))
            numbers.append(number)
        return concepts, numbers

    def _read_index(self, split: Optional[str], limit: Optional[int]) -> list[tuple]:
        path = self.root / "index.csv"
        header, rows = _read_csv(path, INDEX_COLUMNS + self._categories, "index.csv")
        kept: list[tuple] = []
        splits: set[str] = set()
        for line, row in rows:
            row_split = _cell(path, header, line, row, "split")
            splits.add(row_split)
            if split is not None and row_split != split:
                continue
            image = _cell(path, header, line, row, "image")
            if not image:
                raise BrodenFormatError(f"{path} line {line}: empty image path")
            ih, iw, sh, sw = (_int(path, line, c, _cell(path, header, line, row, c)) for c in ("ih", "iw", "sh", "sw"))
            if min(ih, iw, sh, sw) < 1:
                raise BrodenFormatError(f"{path} line {line}: ih, iw, sh, sw must be positive, got {ih, iw, sh, sw}")
            cells = tuple(_cell(path, header, line, row, c) for c in self._categories)
            kept.append((line, image, (ih, iw), (sh, sw), cells))
            if limit is not None and len(kept) >= limit:
                break
        if not kept:
            which = f" of split {split!r} (the splits are {', '.join(sorted(splits)) or 'none'})" if split else ""
            raise BrodenFormatError(f"{path}: no rows{which}")
        return kept

    # ------------------------------------------------------------------ ConceptSource
    @property
    def concepts(self) -> Sequence[Concept]:
        """Every label of ``label.csv`` but 0, numbered 1…C in that file's order, with its primary category."""
        return self._concepts

    @property
    def categories(self) -> Sequence[str]:
        """``category.csv``'s names, in its order."""
        return self._categories

    @property
    def image_categories(self) -> Sequence[str]:
        """Those of ``scene``, ``texture`` that the folder has."""
        return self._image_categories

    @property
    def mask_size(self) -> tuple[int, int]:
        """(sh, sw), the one mask size of the rows."""
        return self._mask_size

    @property
    def image_size(self) -> tuple[int, int]:
        """(h, w) of the images :meth:`get` returns."""
        return self._image_size or self._default_size

    @property
    def numbers(self) -> dict[int, int]:
        """Broden's label number → ours (1…C)."""
        return dict(self._numbers)

    @property
    def broden_numbers(self) -> list[int]:
        """Ours → Broden's: ``broden_numbers[n - 1]`` is Broden's number of our concept ``n``."""
        return list(self._broden_numbers)

    def __len__(self) -> int:
        return len(self._rows)

    def image_path(self, index: int) -> Path:
        """The image file of row ``index``."""
        return self.root / "images" / self._rows[self._check_index(index)][1]

    def get(self, indices: Sequence[int]) -> ConceptBatch:
        """The images ``indices`` with their labels (see :class:`ConceptBatch`); reads their image and mask
        files. ``pixel`` has one layer per mask file (colour, object, part, material in ``category.csv`` order,
        each category's masks in their order), as many as the batch's image with the most, at least one."""
        indices = [self._check_index(i) for i in indices]
        image_cols = [j for j, c in enumerate(self._categories) if c in self._image_categories]
        pixel_cols = [j for j, c in enumerate(self._categories) if c not in self._image_categories]
        b, c = len(indices), len(self._concepts)
        images = torch.zeros((b, 3) + self.image_size)
        image = torch.zeros(b, c + 1, dtype=torch.bool)
        labelled = torch.zeros(b, len(self._categories), dtype=torch.bool)
        layers: list[list[np.ndarray]] = []
        for k, i in enumerate(indices):
            line, path, _, _, cells = self._rows[i]
            images[k] = self._read_image(line, path)
            labelled[k] = torch.tensor([bool(cell) for cell in cells], dtype=torch.bool)
            for j in image_cols:
                for item in _split(cells[j]):
                    ours = self._map_number(line, self._categories[j], item)
                    if ours:
                        image[k, ours] = True
            layers.append([self._read_mask(line, self._categories[j], mask)
                           for j in pixel_cols for mask in _split(cells[j])])
        depth = max([1] + [len(ls) for ls in layers])
        pixel = torch.zeros((b, depth) + self._mask_size, dtype=torch.long)
        for k, ls in enumerate(layers):
            for d, layer in enumerate(ls):
                pixel[k, d] = torch.from_numpy(layer)
        return ConceptBatch(images, pixel, image, labelled, torch.tensor(indices, dtype=torch.long))

    # ------------------------------------------------------------------ reading files
    def _check_index(self, index: int) -> int:
        i = int(index)
        if not 0 <= i < len(self._rows):
            raise IndexError(f"{self.name}: image index {index} outside 0…{len(self._rows) - 1}")
        return i

    def _where(self, line: int) -> str:
        return f"{self.root / 'index.csv'} line {line}"

    def _open(self, line: int, relative: str, what: str) -> Image.Image:
        path = self.root / "images" / relative
        if not path.is_file():
            raise BrodenNotFoundError(f"{path}: missing {what} {relative!r} ({self._where(line)})")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except OSError as e:
            raise BrodenFormatError(f"{path}: cannot read {what} {relative!r} ({self._where(line)}): {e}") from e

    def _read_image(self, line: int, relative: str) -> torch.Tensor:
        """float (3, H, W) on 0…1 at :attr:`image_size`."""
        rgb = torch.from_numpy(np.array(self._open(line, relative, "image"), dtype=np.uint8))
        x = rgb.permute(2, 0, 1).float().div_(255)
        size = self.image_size
        if tuple(x.shape[1:]) != size:
            shrink = size[0] < x.shape[1] or size[1] < x.shape[2]
            x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=shrink)[0]
            x = x.clamp_(0, 1)
        return x

    def _read_mask(self, line: int, category: str, relative: str) -> np.ndarray:
        """int64 (sh, sw): the mask's label numbers R + 256·G, in our numbering."""
        rgb = np.array(self._open(line, relative, f"{category} mask"), dtype=np.int64)
        if rgb.shape[:2] != self._mask_size:
            raise BrodenFormatError(f"{self.root / 'images' / relative}: {category} mask of size {rgb.shape[:2]}, "
                                    f"but sh, sw = {self._mask_size} ({self._where(line)})")
        numbers = rgb[..., 0] + 256 * rgb[..., 1]
        known = numbers < len(self._lookup)
        mapped = np.where(known, self._lookup[np.where(known, numbers, 0)], -1)
        if (mapped < 0).any():
            unknown = np.unique(numbers[mapped < 0])
            raise BrodenFormatError(
                f"{self.root / 'images' / relative}: {category} mask has label number"
                f"{'s' if len(unknown) > 1 else ''} {', '.join(map(str, unknown[:10].tolist()))} that label.csv "
                f"does not list ({self._where(line)})")
        return mapped

    def _map_number(self, line: int, category: str, item: str) -> int:
        """Our number of the Broden label ``item`` of an image-level cell (0 for Broden's 0)."""
        number = _int(self.root / "index.csv", line, category, item)
        if number == 0:
            return 0
        if number not in self._numbers:
            raise BrodenFormatError(f"{self._where(line)}: {category} label number {number} is not in "
                                    f"{self.root / 'label.csv'}")
        return self._numbers[number]
