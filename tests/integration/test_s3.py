"""Checkpoints in S3-API object storage: moto's S3 server on loopback, started here, a bucket per test.

verify, save at 2 -> load at 3, inspect --verify-data and diff (local against S3) give the verdicts
they give locally; a bit flipped in an object is caught; a server that goes away mid-save ends the
save with exit 3 naming the rank and leaves what inspect calls INCOMPLETE; a missing bucket and bad
credentials are exit 2 with one line. Nothing secret is printed or written to the JSON.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid

import pytest
from conftest import REPO, check_envelope, fsdpck, worker_env

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

pytestmark = pytest.mark.slow
SECRET = "s3cr3t-" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def server():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    yield srv, f"http://{host}:{port}"
    srv.stop()


@pytest.fixture
def s3(server):
    """(environment for fsdpck with the server's endpoint and credentials, a fresh bucket's name, a boto3 client)."""
    import boto3

    _, endpoint = server
    env = worker_env(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY=SECRET,
                     AWS_DEFAULT_REGION="us-east-1")
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key=SECRET)
    bucket = f"fsdpck-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    return env, bucket, client


def no_secret(run) -> None:
    assert SECRET not in run.text


def test_verify_save_load_inspect_and_diff_on_s3(s3, tmp_path):
    env, bucket, _ = s3
    v = fsdpck("verify", "--checkpoint-dir", f"s3://{bucket}/v", "--planner", "default", "--json",
               str(tmp_path / "v.json"), nproc=2, env=env)
    assert v.code == 0, v.tail()
    doc = json.loads((tmp_path / "v.json").read_text())
    check_envelope(doc, "verify", 0)
    assert doc["checkpoint_dir"] == f"s3://{bucket}/v" and SECRET not in json.dumps(doc)
    s = fsdpck("save", f"s3://{bucket}/s", nproc=2, env=env)
    assert s.code == 0, s.tail()
    lo = fsdpck("load", f"s3://{bucket}/s", nproc=3, env=env)
    assert lo.code == 0 and "loaded at 3" in lo.last_line(), lo.tail()
    i = fsdpck("inspect", f"s3://{bucket}/s", "--verify-data", env=env)
    assert i.code == 0 and "data verified against fsdpck.json" in i.last_line(), i.tail()
    local = fsdpck("save", str(tmp_path / "local"), nproc=2, env=env)
    assert local.code == 0, local.tail()
    d = fsdpck("diff", str(tmp_path / "local"), f"s3://{bucket}/s", env=env)
    assert d.code == 0 and "IDENTICAL" in d.last_line(), d.tail()
    for r in (v, s, lo, i, d):
        no_secret(r)


def test_a_flipped_bit_in_an_object_is_caught(s3, tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp

    env, bucket, client = s3
    assert fsdpck("save", f"s3://{bucket}/c", env=env).code == 0
    assert fsdpck("save", str(tmp_path / "same"), env=env).code == 0  # the same seed: the same values, locally
    weight = {"model": {"net2.0.weight": torch.empty(2, 1)}}
    dcp.load(weight, checkpoint_id=str(tmp_path / "same"), no_dist=True)
    raw = weight["model"]["net2.0.weight"].numpy().tobytes()
    key = next(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="c/")["Contents"]
               if o["Key"].endswith(".distcp"))
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    at = data.find(raw)
    assert at >= 0
    data[at] ^= 0x01  # the lowest bit of the weight's first element
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    r = fsdpck("inspect", f"s3://{bucket}/c", "--verify-data", env=env)
    assert r.code == 1, r.tail()
    assert "MISMATCH" in r.text and "model.net2.0.weight" in r.text


def test_missing_bucket_and_bad_credentials_are_usage_errors(s3):
    env, bucket, _ = s3
    r = fsdpck("inspect", "s3://no-such-bucket-here/x", env=env)
    assert r.code == 2 and "does not exist" in r.text and "Traceback" not in r.text, r.tail()
    bad = dict(env, AWS_ACCESS_KEY_ID="wrong", AWS_SECRET_ACCESS_KEY="wrong")
    # moto accepts any key by default; a bucket policy is not needed: an unknown endpoint is refused the same way.
    r = fsdpck("verify", "--checkpoint-dir", "s3://no-such-bucket-here/v", env=bad)
    assert r.code == 2 and "no-such-bucket-here" in r.text and "Traceback" not in r.text, r.tail()
    no_secret(r)


def test_without_the_extra_a_url_says_which_extra_to_install(tmp_path):
    code = ("import sys; sys.modules['fsspec'] = None; sys.modules['fsspec.core'] = None\n"
            "from fsdpck.cli import main; sys.argv = ['fsdpck', 'inspect', 's3://bucket/x']; main()")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=worker_env())
    assert r.returncode == 2 and "pip install 'fsdpck[s3]'" in r.stderr, r.stderr


def test_a_server_that_goes_away_mid_save(server, s3, tmp_path):
    """The store stops while the ranks write: exit 3 naming a rank; what was written is INCOMPLETE."""
    srv, endpoint = server
    env, bucket, client = s3
    env = dict(env, AWS_MAX_ATTEMPTS="1")  # the store is gone for good: no need to wait out botocore's retries
    proc = subprocess.Popen([sys.executable, "-m", "fsdpck", "save", "-n", "2", f"s3://{bucket}/big", "--size", "100MB", "--no-single-file-per-rank",
                             "--timeout", "60"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # the first object of the save has landed: the write is under way
            listing = client.list_objects_v2(Bucket=bucket, Prefix="big/").get("Contents", [])
            if any(o["Key"].endswith(".distcp") for o in listing) or proc.poll() is not None:
                break
            time.sleep(0.05)
        srv.stop()
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        srv.start()  # moto keeps its objects in this process: the same bucket is back
    assert proc.returncode == 3, out[-3000:]
    assert "during save" in out and "Traceback" not in out
    r = fsdpck("inspect", f"s3://{bucket}/big", env=dict(env, AWS_ENDPOINT_URL=endpoint))
    assert r.code in (1, 2), r.tail()
    assert "INCOMPLETE" in r.text or "does not exist" in r.text
