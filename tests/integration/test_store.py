"""The run store, on a local folder and on S3 spoken over HTTP (moto's server)."""

import hashlib
import uuid

import boto3
import pytest

from hfi_core.store import S3Settings, Store, tree_hashes


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return Store.open(str(tmp_path / "runs"))
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = f"hfi-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return Store.open(f"s3://{bucket}/runs", S3Settings(endpoint_url=endpoint, multipart_threshold_mb=5))


def test_bytes_round_trip_and_listing_is_relative_to_the_run_root(store):
    store.write_bytes("r1/generate/a.txt", b"alpha")
    store.write_bytes("r1/generate/sub/b.txt", b"beta")
    assert store.read_bytes("r1/generate/a.txt") == b"alpha"
    assert store.exists("r1/generate/sub/b.txt") and not store.exists("r1/generate/missing")
    assert store.list("r1/generate") == ["r1/generate/a.txt", "r1/generate/sub/b.txt"]


def test_folders_upload_and_download_intact_and_the_marker_is_what_makes_a_stage_done(store, tmp_path):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "images" / "x.png").write_bytes(b"\x89PNG fake")
    (src / "manifest.parquet").write_bytes(b"rows")
    store.upload_dir(src, "r1/generate")
    assert store.success("r1/generate") is None  # files are there, but the stage is not done
    store.mark_success("r1/generate", inputs={"config": "abc"}, outputs=tree_hashes(src))
    marker = store.success("r1/generate")
    assert marker["inputs"] == {"config": "abc"} and set(marker["outputs"]) == {"images/x.png", "manifest.parquet"}
    dst = tmp_path / "dst"
    assert store.download_dir("r1/generate", dst) == 2  # the marker is not a stage file
    assert tree_hashes(dst) == tree_hashes(src)


def test_large_files_go_up_in_parts_on_s3(s3_endpoint, tmp_path):
    bucket = f"hfi-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=bucket)
    store = Store.open(f"s3://{bucket}", S3Settings(endpoint_url=s3_endpoint, multipart_threshold_mb=5))
    big = tmp_path / "unet.safetensors"
    big.write_bytes(hashlib.sha256(b"x").digest() * (12 * 2**20 // 32))  # 12 MB
    store.upload_file(big, "r/distill/unet.safetensors")
    etag = client.head_object(Bucket=bucket, Key="r/distill/unet.safetensors")["ETag"]
    assert "-" in etag  # a multipart ETag is "<md5 of part md5s>-<parts>"
    store.download_file("r/distill/unet.safetensors", tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == big.read_bytes()


def test_a_local_key_cannot_leave_the_run_store(tmp_path):
    with pytest.raises(ValueError, match="leaves the run store"):
        Store.open(str(tmp_path)).write_bytes("../escape.txt", b"x")
