"""Inputs known by their content (pipeline/cache/fingerprint.py, pipeline/cache/input_state.py): a copy of the
dataset elsewhere, a touched file or a stray file beside the images change no key; new bytes in an
image a split uses, or an edited annotation file, make the data stage stale and `status` names it."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import scipy.io

from ion.errors import UserError
from pipeline.cache.input_state import STATE_DIR, STATE_FILE
from pipeline.cache.status import STALE, stage_statuses
from pipeline.cache.store import ArtifactStore
from pipeline.config import load_config
from pipeline.graph import cache_keys, cache_materials, registered_stages
from tests.conftest import SHARED

COCO_MINI = SHARED / "data" / "coco-mini"


def _config(root, workdir, *extra):
    return load_config("coco_mini", [f"data.coco.train_annotations={root}/annotations/instances_train2017.json",
                                     f"data.coco.train_images={root}/train2017",
                                     f"data.coco.val_annotations={root}/annotations/instances_val2017.json",
                                     f"data.coco.val_images={root}/val2017", *extra], workdir=workdir)


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(COCO_MINI, root)
    return root


def _write_data_output(store, stages, cfg):
    """An output of the data stage under the current key, as a run leaves it."""
    key, material = cache_materials(stages, cfg)["data"]
    out = store.path("data", key)
    out.mkdir(parents=True)
    store.write_manifest("data", key, version="1", upstream={}, run_id=None, timings={}, metrics={},
                         summary=[], material=material)
    return key


def test_copies_touches_and_stray_files_change_no_key(dataset, tmp_path):
    stages = registered_stages()
    workdir = tmp_path / "work"
    keys = cache_keys(stages, _config(dataset, workdir))
    assert (workdir / STATE_DIR / STATE_FILE).is_file()  # hashes remembered in the workdir
    (dataset / "train2017" / ".DS_Store").write_bytes(b"finder")
    image = sorted((dataset / "train2017").glob("*.jpg"))[0]
    os.utime(image, ns=(10**18, 10**18))  # touched: same bytes
    assert cache_keys(stages, _config(dataset, workdir)) == keys
    moved = tmp_path / "faster-disk" / "coco"
    shutil.copytree(dataset, moved)  # cp -r: new inodes and mtimes, same bytes
    assert cache_keys(stages, _config(moved, workdir)) == keys
    assert cache_keys(stages, _config(moved, tmp_path / "fresh-workdir")) == keys  # hashed afresh: the same


def test_new_image_bytes_or_annotations_make_data_stale_and_status_names_the_file(dataset, tmp_path):
    stages = registered_stages()
    workdir = tmp_path / "work"
    store = ArtifactStore(workdir)
    cfg = _config(dataset, workdir)
    _write_data_output(store, stages, cfg)
    image = sorted((dataset / "val2017").glob("*.jpg"))[1]
    stat = image.stat()
    data = bytearray(image.read_bytes())
    data[-3] ^= 0xFF  # one byte inside the JPEG's last scan
    image.write_bytes(bytes(data))
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime: the inode's hash
    os.utime(image, None)  # is remembered against the mtime, so a rewrite shows a new mtime (as any write does)
    status = {s.name: s for s in stage_statuses(stages, cfg, store)}
    assert status["data"].state == STALE
    assert status["data"].reasons == [f"file {dataset}/val2017/{image.name} (data.coco.val_images)"]

    image.write_bytes(bytes(data))  # and back to where it was: cached under the other key
    annotations = dataset / "annotations" / "instances_train2017.json"
    annotations.write_bytes(annotations.read_bytes() + b"\n")
    status = {s.name: s for s in stage_statuses(stages, cfg, store)}
    assert status["data"].state == STALE
    assert f"file {annotations} (data.coco.train_annotations)" in status["data"].reasons


def test_an_unreadable_input_is_an_error_naming_it(dataset, tmp_path):
    image = sorted((dataset / "train2017").glob("*.jpg"))[0]
    image.unlink()
    image.symlink_to(image.name)  # a link to itself: stat fails with ELOOP, as a broken mount would
    with pytest.raises(UserError, match=f"{image}.*cannot be read"):
        cache_keys(registered_stages(), _config(dataset, tmp_path / "work"))


def _write_mcg(path):
    scipy.io.savemat(path, {"boxes": np.array([[1.0, 1, 10, 10]]), "scores": np.array([[0.5]])})


def test_the_mcg_folder_is_keyed_by_the_files_of_the_split_images(dataset, tmp_path):
    stages = registered_stages()
    images = sorted(p.stem for folder in ("train2017", "val2017") for p in (dataset / folder).glob("*.jpg"))
    mcg = tmp_path / "mcg"
    linked = tmp_path / "elsewhere" / "val"  # one subfolder reached through a symlink
    (mcg / "train").mkdir(parents=True)
    linked.mkdir(parents=True)
    (mcg / "val").symlink_to(linked)
    for i, stem in enumerate(images):
        _write_mcg((mcg / "train" if i % 2 else linked) / f"{stem}.mat")
    cfg = _config(dataset, tmp_path / "work", f"proposals.mcg.dir={mcg}")
    keys = cache_keys(stages, cfg)
    _write_mcg(mcg / "train" / "COCO_train2014_000000999999.mat")  # no split image: not read
    assert cache_keys(stages, cfg) == keys
    first = linked / f"{images[0]}.mat"
    first.write_bytes(first.read_bytes())  # rewritten, same content
    assert cache_keys(stages, cfg) == keys
    scipy.io.savemat(linked / f"{images[0]}.mat", {"boxes": np.array([[2.0, 2, 9, 9]]), "scores": np.array([[0.4]])})
    changed = cache_keys(stages, cfg)
    assert changed["data"] == keys["data"] and changed["proposals"] != keys["proposals"]
