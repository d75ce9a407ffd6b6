"""Other formats and other PyTorch versions: DCP's Hugging Face (safetensors) storage, and checkpoints
that torch 2.11 saved (tests/data/torch-2.11.tar.xz, made by scripts/make_fixtures.sh on the GPU
machine) loaded by this torch at other world sizes."""

from __future__ import annotations

import json
import struct
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import CLI_IN_SCRIPT, REPO, TORCH_MODULES, check_envelope, fresh_python, fsdpck, run, worker_env

pytestmark = pytest.mark.slow
FIXTURES = REPO / "tests" / "data" / "torch-2.11.tar.xz"


# --- safetensors ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def st_saved(tmp_path_factory) -> Path:
    pytest.importorskip("safetensors")
    path = tmp_path_factory.mktemp("st") / "ck"
    r = fsdpck("save", str(path), "--fsdp", "2", "--format", "safetensors", nproc=2)
    assert r.code == 0, r.tail()
    return path


def test_safetensors_save_writes_safetensors_and_loads_at_three(st_saved, tmp_path):
    files = sorted(p.name for p in st_saved.iterdir())
    assert files == ["fsdpck.json", "shard-00001-model-00001-of-00001.safetensors",
                     "shard-00002-model-00001-of-00001.safetensors"]
    manifest = json.loads((st_saved / "fsdpck.json").read_text())
    assert manifest["flow"]["format"] == "safetensors"
    assert not any(k.startswith("optim.param_groups") for k in manifest["keys"])  # tensors only
    r = fsdpck("load", str(st_saved), "--json", str(tmp_path / "l.json"), nproc=3)
    assert r.code == 0, r.tail()
    doc = json.loads((tmp_path / "l.json").read_text())
    check_envelope(doc, "load", 0)
    assert doc["checkpoints"][0]["keys_compared"] == len(manifest["keys"])
    i = fsdpck("inspect", str(st_saved), "--verify-data")
    assert i.code == 0 and "whole, data verified against fsdpck.json" in i.last_line(), i.tail()


def test_a_flipped_bit_in_a_safetensors_file_is_caught(st_saved, tmp_path):
    import shutil

    path = Path(shutil.copytree(st_saved, tmp_path / "ck"))
    name = "shard-00002-model-00001-of-00001.safetensors"
    data = bytearray((path / name).read_bytes())
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    header = json.loads(data[8: 8 + n])
    key = "model.net1.0.weight"
    begin, _ = header[key]["data_offsets"]
    data[8 + n + begin] ^= 0x01
    (path / name).write_bytes(bytes(data))
    i = fsdpck("inspect", str(path), "--verify-data")
    assert i.code == 1 and "MISMATCH" in i.text and key in i.text, i.tail()
    lo = fsdpck("load", str(path), nproc=2)
    assert lo.code == 1 and f"{key} (differs)" in lo.last_line(), lo.tail()


def test_safetensors_offline_reads_need_no_torch_and_agree_with_the_torch_way(st_saved, tmp_path):
    # Local safetensors chunks are read like DCP's own (fsdpck's buffers, the C kernels by address):
    # inspect --verify-data --stats and diff import no torch, and give what the torch way gives.
    code = ("import json, sys\nfrom fsdpck.checkpoint import torchsave\n"
            "torchsave.DIRECT_READS = sys.argv[2] == 'direct'\n" + CLI_IN_SCRIPT
            + "run('inspect', sys.argv[1], '--verify-data', '--stats', '--json', sys.argv[3])\n"
            "run('diff', sys.argv[1], sys.argv[1])\n"
            f"print('torch:', {TORCH_MODULES})\n")
    docs = {}
    for way in ("direct", "torch"):
        target = tmp_path / f"{way}.json"
        out = fresh_python(code, str(st_saved), way, str(target), env=worker_env())
        assert ("torch: []" in out.splitlines()) == (way == "direct"), out[-2000:]
        docs[way] = json.loads(target.read_text())
    direct, by_torch = docs["direct"]["keys"], docs["torch"]["keys"]
    assert len(direct) == len(by_torch) > 5 and all(k.get("stats") for k in direct), direct[0]
    # Fingerprints, statuses and counts exactly; mean and std to the last bits (the pieces' statistics
    # merge in the order the threads deliver them, on either way).
    assert [dict(k, stats=None) for k in direct] == [dict(k, stats=None) for k in by_torch]
    for a, b in zip(direct, by_torch):
        assert a["stats"] == pytest.approx(b["stats"], rel=1e-12, abs=1e-300), a["key"]


def test_a_hostile_safetensors_header_is_a_problem(st_saved, tmp_path):
    import shutil

    path = Path(shutil.copytree(st_saved, tmp_path / "ck"))
    name = "shard-00001-model-00001-of-00001.safetensors"
    data = bytearray((path / name).read_bytes())
    data[:8] = struct.pack("<Q", 1 << 50)  # a header length far past the file's end
    (path / name).write_bytes(bytes(data))
    i = fsdpck("inspect", str(path))
    assert i.code == 1 and "the header claims" in i.text and "Traceback" not in i.text, i.tail()


def test_safetensors_verify_and_what_the_format_cannot_hold():
    pytest.importorskip("safetensors")
    r = fsdpck("verify", "--fsdp", "2", "--format", "safetensors", "--planner", "default")
    assert r.code == 0, r.tail()
    for args, needle in ((["--format", "safetensors"], "use --api dsd"),
                         (["--fsdp", "2", "--format", "safetensors", "--trainer-state"], "tensors only")):
        bad = fsdpck("verify", *args)
        assert bad.code == 2 and needle in bad.text and "Traceback" not in bad.text, bad.tail()


def test_safetensors_with_fsdp1_and_a_step_is_refused_because_dcp_cannot_save_it():
    # The refusal states a fact about PyTorch: with fsdpck's rule lifted, DCP itself fails the save
    # ("Some tensors share memory"). When a PyTorch no longer does, this fails and the rule can go.
    pytest.importorskip("safetensors")
    refused = fsdpck("verify", "--format", "safetensors", "--api", "dsd")
    assert refused.code == 2 and "shared 'step' tensor" in refused.text, refused.tail()
    code = ("import sys\nfrom fsdpck.state import registry\nreal = registry.format_problem\n"
            "registry.format_problem = lambda fmt, **kw: real(fmt, **{**kw, 'optimizer': None})\n"
            "from fsdpck.cli import main\nsys.argv = ['fsdpck', 'verify', '--format', 'safetensors', '--api', 'dsd',"
            " '--planner', 'default']\nmain()\n")
    lifted = run([sys.executable, "-c", code])
    assert lifted.code == 3 and "share memory" in lifted.text, lifted.tail()


# --- checkpoints from torch 2.11 -----------------------------------------------------------------


@pytest.fixture(scope="module")
def old(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("old")
    with tarfile.open(FIXTURES) as tar:
        tar.extractall(root, filter="data")
    (base,) = list(root.iterdir())
    return {p.name: p for p in sorted(base.iterdir())}


def test_fixtures_are_what_they_say(old):
    assert sorted(old) == [f"ws{ws}-fsdp{f}-{a}-{d}" for ws in (3, 4) for f, a in ((1, "legacy"), (2, "dsd"))
                           for d in ("bfloat16", "float32")]
    for name, path in old.items():
        manifest = json.loads((path / "fsdpck.json").read_text())
        assert manifest["torch_version"].startswith("2.11") and manifest["world_size"] == int(name[2])
        assert FIXTURES.stat().st_size < 300_000


def test_torch_211_archives_are_read_directly(old):
    # The offline commands read every tensor chunk torch 2.11 wrote themselves (a refusal would
    # fall back to DCP's reader in silence: correct, but slower and importing DCP).
    from fsdpck.checkpoint import torchsave
    from fsdpck.checkpoint.integrity import open_checkpoint
    from fsdpck.checkpoint.storage import LocalStorage

    for name, path in old.items():
        ckpt = open_checkpoint(LocalStorage(path), light=True)
        chunks = [(info, c) for info in ckpt.metadata.keys.values() if info.kind == "tensor" for c in info.chunks
                  if c.numel and c.storage is not None]
        assert chunks, name
        for info, c in chunks:
            with open(path / c.storage.file, "rb") as f:
                found = torchsave.locate(f, c.storage.offset, c.storage.length, dtype=info.dtype,
                                         itemsize=info.itemsize, sizes=c.sizes)
            assert found is not None, (name, info.key, c.offsets)


@pytest.mark.parametrize("nproc", [2, 3])
def test_torch_211_checkpoints_load_exactly_at_other_world_sizes(old, nproc, tmp_path):
    dirs = [str(p) for name, p in old.items() if int(name[2]) != nproc]
    r = fsdpck("load", *dirs, "--json", str(tmp_path / "l.json"), nproc=nproc)
    assert r.code == 0, r.tail()
    doc = json.loads((tmp_path / "l.json").read_text())
    assert len(doc["checkpoints"]) == len(dirs)
    assert all(c["saved_torch"].startswith("2.11") and c["keys_differing"] == 0 for c in doc["checkpoints"])


def test_a_flipped_bit_in_a_torch_211_checkpoint_is_caught(old, tmp_path):
    import shutil

    import ckpt_factory as cf
    import torch

    path = Path(shutil.copytree(old["ws4-fsdp2-dsd-float32"], tmp_path / "ck"))
    key = "model.net3.0.weight"
    value = {"model": {"net3.0.weight": torch.empty(12, 8)}}
    import torch.distributed.checkpoint as dcp

    dcp.load(value, checkpoint_id=str(path), no_dist=True)
    cf.flip_byte_in_tensor(path, key, value["model"]["net3.0.weight"][:3])  # rank 0's rows, in rank 0's file
    r = fsdpck("load", str(path), nproc=2)
    assert r.code == 1 and f"{key} (differs)" in r.last_line(), r.tail()
