"""Hostile checkpoint dirs handed to the commands that run on ranks (load, verify --overwrite, save
--overwrite) and to inspect with crafted numbers: nothing outside the dir is read or deleted, no
pickle runs, nothing is allocated from what a manifest claims, and every case ends in exit 1 or 2
with one line, never 3 and never a traceback."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import ckpt_factory as cf
import pytest
import torch
from conftest import fsdpck, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A pristine `fsdpck save` checkpoint (world size 1, FSDP2/dsd) with its manifest."""
    path = tmp_path_factory.mktemp("saved") / "ck"
    r = fsdpck("save", str(path), "--fsdp", "2")
    assert r.code == 0, r.tail()
    return path


def copy(saved: Path, tmp_path: Path) -> Path:
    return cf.copy_ckpt(saved, tmp_path / "ck")


def no_traceback(r) -> None:
    assert "Traceback" not in r.text, r.tail()


def edit_manifest(path: Path, edit) -> None:
    doc = json.loads((path / "fsdpck.json").read_text())
    edit(doc)
    (path / "fsdpck.json").write_text(json.dumps(doc))


def test_a_byte_item_that_needs_code_is_refused_by_load_and_never_runs(saved, tmp_path):
    """A param group value replaced by a pickle that runs a command: load refuses it before DCP reads."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    marker = tmp_path / "pwned"
    plain = tmp_path / "plain.pt"
    dcp_to_torch_save(str(saved), str(plain))
    state = torch.load(plain, weights_only=False)  # our own file, no payload in it yet: trusted here
    state["optim"]["param_groups"][0]["lr"] = cf.Payload(os.system, cf.marker_command(marker))
    evil = cf.dcp_save(state, tmp_path / "evil")  # DCP pickles the payload into a byte item
    shutil.copy(saved / "fsdpck.json", evil / "fsdpck.json")
    assert not marker.exists()
    r = fsdpck("load", str(evil))
    assert r.code == 1, r.tail()
    assert "optim.param_groups.0.lr" in r.text and "cannot be loaded without running code" in r.text
    assert "Nothing was loaded" in r.text and not marker.exists()
    no_traceback(r)
    # The check could fail: DCP's own planner does run it.
    code = ("import torch.distributed.checkpoint as dcp, sys\n"
            "sd = {'optim': {'param_groups': [{'lr': 0.0}]}}\n"
            f"dcp.load(sd, checkpoint_id={str(evil)!r}, no_dist=True)\n")
    run([sys.executable, "-c", code])
    assert marker.exists()


@pytest.mark.parametrize("field, value, needle", [
    ("flow.optimizer", "evil", "flow.optimizer is 'evil', not one of"),
    ("flow.fsdp", 7, "flow.fsdp is '7', not one of"),
    ("flow.trainer_state", "yes", "flow.trainer_state"),
    ("model.seed", "x", "model.seed is 'x', not an integer"),
    ("model.dims", [8, 10**12, 10**12, 10**12], "does not describe this checkpoint"),
    ("model.dims", [8, 2, 4], "model dims must be four positive integers"),
    ("layout.tp", 0, "layout.tp is '0', not an integer from 1"),
])
def test_a_bad_manifest_field_is_exit_2_naming_it_before_anything_is_allocated(saved, tmp_path, field, value, needle):
    path = copy(saved, tmp_path)
    section, name = field.split(".")

    def edit(doc):
        doc.setdefault(section, {})[name] = value

    edit_manifest(path, edit)
    r = fsdpck("load", str(path))
    assert r.code == 2, r.tail()
    assert needle in r.text and field in r.text
    no_traceback(r)


def test_a_checkpoint_that_is_not_whole_is_refused_before_any_load(saved, tmp_path):
    path = copy(saved, tmp_path)
    shard = next(path.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    r = fsdpck("load", str(path))
    assert r.code == 1, r.tail()
    assert "is not whole" in r.text and "Nothing was loaded" in r.text and "fsdpck inspect" in r.text
    no_traceback(r)


def test_a_symlinked_shard_is_not_followed_by_load(saved, tmp_path):
    path = copy(saved, tmp_path)
    shard = next(path.glob("*.distcp"))
    outside = tmp_path / "outside.distcp"
    shard.rename(outside)
    shard.symlink_to(outside)
    r = fsdpck("load", str(path))
    assert r.code == 1 and "symlink" in r.text, r.tail()
    no_traceback(r)


def test_overwrite_never_deletes_through_a_symlinked_flow_dir(tmp_path):
    # An earlier run's marked flow dir, elsewhere; the checkpoint dir links to it under a flow's name.
    first = fsdpck("verify", "--planner", "default", "--keep", "--checkpoint-dir", str(tmp_path / "elsewhere"))
    assert first.code == 0, first.tail()
    (flow_dir,) = [p for p in (tmp_path / "elsewhere").iterdir() if p.is_dir()]
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / flow_dir.name).symlink_to(flow_dir)
    r = fsdpck("verify", "--planner", "default", "--overwrite", "--checkpoint-dir", str(ck))
    assert r.code == 2 and "is a symlink" in r.text, r.tail()
    assert (flow_dir / ".metadata").exists()  # the dir the link points at lost nothing
    no_traceback(r)


def test_overwrite_with_a_file_named_like_a_flow_dir_is_exit_2(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "fsdp1-legacy-planner_default-sync-adam-float32").write_text("not a dir")
    r = fsdpck("verify", "--planner", "default", "--overwrite", "--checkpoint-dir", str(ck))
    assert r.code == 2 and "is not a directory" in r.text, r.tail()
    assert (ck / "fsdp1-legacy-planner_default-sync-adam-float32").read_text() == "not a dir"
    no_traceback(r)


def test_save_overwrite_refuses_a_dir_with_a_symlink(saved, tmp_path):
    path = copy(saved, tmp_path)
    (path / "link").symlink_to(tmp_path)
    r = fsdpck("save", str(path), "--overwrite")
    assert r.code == 2 and "symlink" in r.text, r.tail()
    assert (path / ".metadata").exists() and (path / "link").is_symlink()
    no_traceback(r)


def test_a_huge_integer_in_metadata_is_a_problem_not_a_crash(tmp_path):
    path = cf.copy_ckpt(cf.plain_ckpt(), tmp_path / "ck")

    def edit(md):
        first = next(iter(md.storage_data))
        md.storage_data[first].offset = 10 ** 5000

    sys.set_int_max_str_digits(0)
    cf.rewrite_metadata(path, edit)
    r = fsdpck("inspect", str(path))
    assert r.code == 1 and "out of range" in r.text, r.tail()
    no_traceback(r)


def test_a_sparse_huge_byte_item_is_not_read(tmp_path):
    """A byte item whose storage entry claims 1 GiB of a sparse file: refused, never allocated."""
    path = cf.copy_ckpt(cf.plain_ckpt(), tmp_path / "ck")
    name = "__0_0.distcp"
    size = (path / name).stat().st_size
    with open(path / name, "r+b") as f:
        f.truncate(size + (1 << 30))  # a hole: costs no disk, reads as zeros

    def edit(md):
        index = next(i for i in md.storage_data if i.fqn == "name")
        md.storage_data[index].offset = size
        md.storage_data[index].length = 1 << 30

    cf.rewrite_metadata(path, edit)
    code = ("import resource, runpy, sys\n"
            f"sys.argv = ['fsdpck', 'inspect', {str(path)!r}, '--verify-data']\n"
            "try:\n    runpy.run_module('fsdpck', run_name='__main__')\n"
            "except SystemExit as e:\n    print('exit', e.code)\n"
            "print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n")
    r = run([sys.executable, "-c", code])
    lines = r.out.splitlines()
    peak = int(next(ln for ln in lines if ln.startswith("peak")).split()[1])
    assert "exit 1" in lines, r.tail()
    assert "more than the" in r.text and "not read" in r.text
    assert peak < 900 << 20, f"peak RSS {peak >> 20} MiB: the claimed 1 GiB was allocated"
