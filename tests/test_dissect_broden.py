"""BrodenSource on a tiny Broden folder written in the exact on-disk format: exact labels, sizes, selection and
one clear error per problem."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from symstitch.dissect.broden import BrodenFormatError, BrodenNotFoundError, BrodenSource
from symstitch.dissect.concepts import Concept

IH, IW, SH, SW = 8, 12, 4, 6
CATEGORIES = ["color", "object", "part", "material", "scene", "texture"]
INDEX_HEADER = ["image", "split", "ih", "iw", "sh", "sw"] + CATEGORIES

# (Broden number, name, category cell, our number, primary category), in label.csv order (not numeric order)
LABELS = [
    (1, "red-c", "color(10)", 1, "color"),
    (2, "wall", "object(50)", 2, "object"),
    (5, "door", "object(3);part(7)", 3, "part"),           # primary is the second listed
    (300, "brick", "material(4)", 4, "material"),          # ≥ 256: the green channel matters
    (7, "street", "scene(1)", 5, "scene"),
    (12, "banded", "texture(2)", 6, "texture"),
    (8, "sky", "object(5);material(5)", 7, "object"),      # a tie: the first listed
    (513, "window-pane", "part(9)", 8, "part"),            # G = 2
]
OURS = {b: ours for b, _, _, ours, _ in LABELS}


def _broden_masks() -> dict[str, np.ndarray]:
    """Mask files → their label maps in Broden's numbering."""
    c0 = np.zeros((SH, SW), np.int64)
    c0[:, :3] = 1
    o0a = np.full((SH, SW), 2, np.int64)
    o0a[2:] = 8
    o0b = np.zeros((SH, SW), np.int64)
    o0b[:, 0] = 8
    p0 = np.zeros((SH, SW), np.int64)
    p0[0, :2] = 513
    p0[3, 4:] = 5
    m0 = np.full((SH, SW), 300, np.int64)
    m0[0, 0] = 0
    o1 = np.zeros((SH, SW), np.int64)
    o1[1:3, 1:5] = 2
    c2 = np.ones((SH, SW), np.int64)
    return {"ade20k/a_color.png": c0, "ade20k/a_object_1.png": o0a, "ade20k/a_object_2.png": o0b,
            "ade20k/a_part.png": p0, "ade20k/a_material.png": m0, "pascal/b_object.png": o1,
            "pascal/c_color.png": c2}


def _mapped(a: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda n: OURS.get(int(n), 0))(a).astype(np.int64)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _write_mask(path: Path, numbers: np.ndarray) -> None:
    rgb = np.stack([numbers % 256, numbers // 256, np.full_like(numbers, 77)], -1).astype(np.uint8)  # B ignored
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb, "RGB").save(path)


def _rewrite(path: Path, edit) -> None:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    _write_csv(path, *edit(rows[0], rows[1:]))


def _drop_column(path: Path, column: str) -> None:
    def edit(header, rows):
        i = header.index(column)
        return header[:i] + header[i + 1:], [r[:i] + r[i + 1:] for r in rows]
    _rewrite(path, edit)


def _set_cell(path: Path, row: int, column: str, value: str) -> None:
    def edit(header, rows):
        rows[row][header.index(column)] = value
        return header, rows
    _rewrite(path, edit)


def make_broden(root: Path) -> dict[str, np.ndarray]:
    """Write a four-image Broden folder at ``root``; the images' uint8 (H, W, 3) arrays by file name."""
    rng = np.random.default_rng(0)
    images = {name: rng.integers(0, 256, (IH, IW, 3), dtype=np.uint8)
              for name in ("ade20k/a.png", "pascal/b.jpg", "pascal/c.png", "dtd/d.png")}
    for name, rgb in images.items():
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb, "RGB").save(root / "images" / name, **({"quality": 95} if name.endswith("jpg") else {}))
    for name, numbers in _broden_masks().items():
        _write_mask(root / "images" / name, numbers)
    size = [IH, IW, SH, SW]
    _write_csv(root / "index.csv", INDEX_HEADER, [
        ["ade20k/a.png", "train", *size, "ade20k/a_color.png", "ade20k/a_object_1.png;ade20k/a_object_2.png",
         "ade20k/a_part.png", "ade20k/a_material.png", "7", ""],
        ["pascal/b.jpg", "train", *size, "", "pascal/b_object.png", "", "", "", "12"],
        ["pascal/c.png", "val", *size, "pascal/c_color.png", "", "", "", "7", "12"],
        ["dtd/d.png", "train", *size, "", "", "", "", "", ""],
    ])
    _write_csv(root / "label.csv", ["number", "name", "category", "frequency", "coverage", "syns"],
               [[0, "-", "-", 0, 0, ""]] + [[b, name, cat, 1, 0.5, name] for b, name, cat, _, _ in LABELS])
    _write_csv(root / "category.csv", ["name", "first", "last", "count", "frequency"],
               [[c, 1, 513, 2, 3] for c in CATEGORIES])
    for c in CATEGORIES:
        _write_csv(root / f"c_{c}.csv", ["code", "number", "name", "frequency", "coverage"],
                   [[i + 1, b, name, 1, 0.5] for i, (b, name, cat, _, p) in enumerate(LABELS) if p == c])
    return images


@pytest.fixture
def broden(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path / "broden1_224"
    return root, make_broden(root)


def _float(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb).permute(2, 0, 1).float() / 255


def _decoded(path: Path) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB"))


# ---------------------------------------------------------------------------------------------- structure
def test_concepts_categories_and_tables(broden):
    root, _ = broden
    s = BrodenSource(root)
    assert s.name == f"broden:{root}" and len(s) == 4
    assert list(s.categories) == CATEGORIES and list(s.image_categories) == ["scene", "texture"]
    assert s.mask_size == (SH, SW) and s.image_size == (IH, IW)
    assert list(s.concepts) == [Concept(ours, name, p) for _, name, _, ours, p in LABELS]
    assert s.numbers == OURS and s.broden_numbers == [b for b, *_ in LABELS]
    s.check()
    column = {c: i for i, c in enumerate(CATEGORIES)}
    assert s.primary().tolist() == [-1] + [column[p] for *_, p in LABELS]
    assert s.primary()[OURS[5]] == column["part"] and s.primary()[OURS[8]] == column["object"]
    assert s.image_level().tolist() == [False] + [p in ("scene", "texture") for *_, p in LABELS]


# ---------------------------------------------------------------------------------------------- get
def test_get_gives_exact_images_and_labels(broden):
    root, images = broden
    s = BrodenSource(root)
    batch = s.get([0, 1, 2, 3])
    assert batch.index.tolist() == [0, 1, 2, 3]
    assert batch.images.shape == (4, 3, IH, IW) and batch.images.dtype == torch.float32
    for k, name in enumerate(["ade20k/a.png", "pascal/b.jpg", "pascal/c.png", "dtd/d.png"]):
        rgb = images[name] if name.endswith("png") else _decoded(root / "images" / name)
        assert torch.equal(batch.images[k], _float(rgb)), name
    m = _broden_masks()
    assert batch.pixel.dtype == torch.long and batch.pixel.shape == (4, 5, SH, SW)
    layers = {0: ["ade20k/a_color.png", "ade20k/a_object_1.png", "ade20k/a_object_2.png", "ade20k/a_part.png",
                  "ade20k/a_material.png"], 1: ["pascal/b_object.png"], 2: ["pascal/c_color.png"], 3: []}
    for k, files in layers.items():
        for d in range(5):
            want = _mapped(m[files[d]]) if d < len(files) else np.zeros((SH, SW), np.int64)
            assert np.array_equal(batch.pixel[k, d].numpy(), want), (k, d)
    assert batch.pixel[0, 4, 1, 1] == OURS[300] and batch.pixel[0, 3, 0, 0] == OURS[513]  # G channel decoded
    image = torch.zeros(4, len(LABELS) + 1, dtype=torch.bool)
    image[0, OURS[7]] = image[1, OURS[12]] = image[2, OURS[7]] = image[2, OURS[12]] = True
    assert torch.equal(batch.image, image)
    assert batch.labelled.tolist() == [[True, True, True, True, True, False],
                                       [False, True, False, False, False, True],
                                       [True, False, False, False, True, True],
                                       [False] * 6]


def test_get_subsets_order_and_padding(broden):
    root, images = broden
    s = BrodenSource(root)
    b = s.get([2, 0])
    assert b.index.tolist() == [2, 0] and b.pixel.shape == (2, 5, SH, SW)
    assert torch.equal(b.images[0], _float(images["pascal/c.png"]))
    assert torch.equal(b.pixel[0, 0], torch.ones(SH, SW, dtype=torch.long) * OURS[1]) and not b.pixel[0, 1:].any()
    empty = s.get([3])
    assert empty.pixel.shape == (1, 1, SH, SW) and not empty.pixel.any() and not empty.image.any()
    assert s.image_path(1) == root / "images" / "pascal/b.jpg"
    with pytest.raises(IndexError, match="outside 0…3"):
        s.get([4])


def test_resizing(broden):
    root, images = broden
    x = _float(images["ade20k/a.png"])[None]
    small = BrodenSource(root, image_size=4).get([0, 3])
    assert small.images.shape == (2, 3, 4, 4) and small.pixel.shape[-2:] == (SH, SW)
    want = F.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False, antialias=True)[0]
    assert torch.allclose(small.images[0], want.clamp(0, 1))
    big = BrodenSource(root, image_size=(16, 24))
    assert big.image_size == (16, 24) and big.mask_size == (SH, SW)
    want = F.interpolate(x, size=(16, 24), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(big.get([0]).images[0], want.clamp(0, 1))
    assert 0 <= big.get([0]).images.min() and big.get([0]).images.max() <= 1
    with pytest.raises(ValueError, match="image_size"):
        BrodenSource(root, image_size=(0, 4))


def test_split_limit_and_batches(broden):
    root, images = broden
    val = BrodenSource(root, split="val")
    assert len(val) == 1 and torch.equal(val.get([0]).images[0], _float(images["pascal/c.png"]))
    train = BrodenSource(root, split="train")
    assert len(train) == 3 and train.image_path(2).name == "d.png"
    first = BrodenSource(root, split="train", limit=2)
    assert [first.image_path(i).name for i in range(len(first))] == ["a.png", "b.jpg"]
    assert len(BrodenSource(root, limit=1)) == 1
    s = BrodenSource(root)
    got = list(s.batches(batch_size=3))
    assert [len(b.index) for b in got] == [3, 1] and torch.cat([b.index for b in got]).tolist() == [0, 1, 2, 3]
    assert [b.pixel.shape[1] for b in got] == [5, 1]
    assert [b.index.tolist() for b in s.batches(batch_size=2, limit=3)] == [[0, 1], [2]]
    with pytest.raises(BrodenFormatError, match=r"no rows of split 'test' \(the splits are train, val\)"):
        BrodenSource(root, split="test")


# ---------------------------------------------------------------------------------------------- errors
def test_missing_folder(tmp_path):
    with pytest.raises(BrodenNotFoundError) as e:
        BrodenSource(tmp_path / "nowhere")
    msg = str(e.value)
    assert "no Broden folder at" in msg and "nowhere" in msg and "script/dlbroden.sh" in msg
    assert "broden1_224" in msg and "broden1_227" in msg and "1 GB" in msg
    assert "http://netdissect.csail.mit.edu/data/" in msg and "pass the folder" in msg
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)


def test_parent_folder_hint(broden):
    root, _ = broden
    with pytest.raises(BrodenNotFoundError, match="broden1_224, pass that"):
        BrodenSource(root.parent)


@pytest.mark.parametrize("name", ["index.csv", "label.csv", "category.csv", "c_object.csv", "c_texture.csv"])
def test_missing_file(broden, name):
    root, _ = broden
    (root / name).unlink()
    with pytest.raises(BrodenNotFoundError, match=rf"{name}: missing {name}"):
        BrodenSource(root)


@pytest.mark.parametrize("name, column, expected", [
    ("index.csv", "sw", "image, split, ih, iw, sh, sw, color, object, part, material, scene, texture"),
    ("index.csv", "texture", "image, split, ih, iw, sh, sw, color, object, part, material, scene, texture"),
    ("label.csv", "category", "number, name, category, frequency, coverage, syns"),
    ("category.csv", "name", "name, first, last, count, frequency"),
    ("c_part.csv", "code", "code, number, name, frequency, coverage"),
])
def test_missing_column(broden, name, column, expected):
    root, _ = broden
    _drop_column(root / name, column)
    with pytest.raises(BrodenFormatError) as e:
        BrodenSource(root)
    msg = str(e.value)
    assert f"{name}: missing column {column};" in msg and f"expected the columns {expected}" in msg


def test_missing_image_and_mask_are_found_lazily(broden):
    root, _ = broden
    (root / "images" / "pascal/b.jpg").unlink()
    (root / "images" / "ade20k/a_part.png").unlink()
    s = BrodenSource(root)  # only the CSV files are read here
    assert s.get([2]).index.tolist() == [2]
    with pytest.raises(BrodenNotFoundError, match=r"missing image 'pascal/b.jpg' \(.*index.csv line 3\)"):
        s.get([1])
    with pytest.raises(BrodenNotFoundError, match=r"missing part mask 'ade20k/a_part.png' \(.*index.csv line 2\)"):
        s.get([0])


def test_unknown_label_numbers(broden):
    root, _ = broden
    bad = np.zeros((SH, SW), np.int64)
    bad[0, 0] = 999
    _write_mask(root / "images" / "pascal/b_object.png", bad)
    s = BrodenSource(root)
    with pytest.raises(BrodenFormatError, match=r"b_object.png: object mask has label number 999 that label.csv "
                                                r"does not list \(.*index.csv line 3\)"):
        s.get([1])
    _set_cell(root / "index.csv", 2, "scene", "7;99")
    with pytest.raises(BrodenFormatError, match=r"index.csv line 4: scene label number 99 is not in .*label.csv"):
        BrodenSource(root).get([2])


def test_malformed_rows(broden):
    root, _ = broden
    _set_cell(root / "index.csv", 1, "sh", "5")
    with pytest.raises(BrodenFormatError, match=r"line 3: mask size sh, sw = \(5, 6\), but line 2 has \(4, 6\)"):
        BrodenSource(root)
    assert len(BrodenSource(root, split="val")) == 1  # the rows served agree
    _set_cell(root / "index.csv", 1, "sh", "4")
    _set_cell(root / "index.csv", 2, "iw", "10")
    with pytest.raises(BrodenFormatError, match=r"line 4: image size ih, iw = \(8, 10\).*pass image_size="):
        BrodenSource(root)
    assert BrodenSource(root, image_size=(IH, IW)).get([2]).images.shape == (1, 3, IH, IW)
    _write_mask(root / "images" / "pascal/c_color.png", np.zeros((SH + 1, SW), np.int64))
    with pytest.raises(BrodenFormatError, match=r"color mask of size \(5, 6\), but sh, sw = \(4, 6\)"):
        BrodenSource(root, image_size=4).get([2])
    _set_cell(root / "label.csv", 3, "number", "2")
    with pytest.raises(BrodenFormatError, match=r"label.csv line 5: label number 2 again \(first on line 4\)"):
        BrodenSource(root)
