"""An image in two splits is reported by data check and refused before training; empty splits are named."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from client.local_data import embed_splits
from shared.cache import EmbeddingCache
from shared.data.check import check_dataset
from shared.data.problems import BadFiles
from shared.data.readers import read_labels
from shared.data.splits import require_disjoint_splits, split_overlap
from shared.errors import RetuneError


@pytest.fixture
def images(tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "images" / f"{i}.png")
    return tmp_path


def write(folder, rows: str):
    path = folder / "labels.csv"
    path.write_text("image,split,Edema,Cardiomegaly\n" + rows)
    return path


def test_an_image_in_two_splits_is_found_with_or_without_conflicting_labels(images):
    csv = write(images, "images/0.png,train,1,0\nimages/1.png,train,0,\n./images/0.png,test,0,0\n"
                        "images/2.png,val,1,\nimages/1.png,test,0,\nimages/3.png,test,1,1\nimages/3.png,test,1,1\n")
    overlap = split_overlap(read_labels(csv))
    assert overlap == [{"image": str(images / "images/0.png"), "splits": ["train", "test"], "labels_differ": True},
                       {"image": str(images / "images/1.png"), "splits": ["train", "test"], "labels_differ": False}]
    summary = check_dataset(csv)
    assert summary["split_overlap"] == {"count": 2, "examples": overlap}
    assert summary["warnings"] == [f"2 image(s) are in more than one split, e.g. {images / 'images/0.png'} in train "
                                   "and test with different labels: training refuses this"]
    with pytest.raises(RetuneError, match=r"labels.csv: 2 image\(s\) are in more than one split, e.g. .*0.png in "
                                          "train and test with different labels; a model would be tested on images "
                                          "it trained on"):
        require_disjoint_splits(read_labels(csv))


def test_training_data_with_a_leak_is_refused_before_anything_is_embedded(images, tiny_backbone):
    csv = write(images, "images/0.png,train,1,0\nimages/1.png,test,0,1\nimages/1.png,train,0,1\n")
    cache = EmbeddingCache(images / "cache", tiny_backbone)
    with pytest.raises(RetuneError, match="1.png in train and test;"):
        embed_splits(read_labels(csv), cache, BadFiles("skip"), show_progress=False)
    assert not list((cache.dir / "images").glob("shard-*"))
    clean = write(images, "images/0.png,train,1,0\nimages/1.png,test,0,1\n")
    splits = embed_splits(read_labels(clean), cache, BadFiles("skip"), show_progress=False)
    assert (len(splits["train"].labels), len(splits["test"].labels)) == (1, 1)


def test_check_names_a_train_or_test_split_without_usable_images(images):
    summary = check_dataset(write(images, "images/0.png,train,1,0\nimages/1.png,val,0,1\n"))
    assert summary["warnings"] == ["the 'test' split has no rows: training needs train and test images (add a "
                                   "'split' column or more rows)"]
    (images / "bad.png").write_bytes(b"not a png")
    summary = check_dataset(write(images, "images/0.png,test,1,0\ngone.png,train,0,1\nbad.png,train,1,1\n"))
    assert summary["warnings"] == ["none of the 2 image(s) of the 'train' split is usable (missing or unreadable): "
                                   "training needs train and test images"]
    assert check_dataset(write(images, "images/0.png,train,1,0\nimages/1.png,test,0,1\n"))["warnings"] == []
