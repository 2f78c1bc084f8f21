"""The run store, on a local folder and on S3 spoken over HTTP (moto's server)."""

import hashlib
import uuid
from pathlib import Path

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
    assert store.download_dir("r1/generate", tmp_path / "none") == 0  # no marker: not a finished folder
    store.commit(src, "r1/generate", inputs={"config": "abc"})
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
    for key in ("../escape.txt", "/tmp/escape.txt", "r1//escape.txt"):
        with pytest.raises(ValueError, match="refused: it would leave its folder"):
            Store.open(str(tmp_path / "runs")).write_bytes(key, b"x")
    assert not list(tmp_path.rglob("escape.txt")) and not Path("/tmp/escape.txt").exists()


def test_a_tampered_output_is_refused_on_download(store, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"alpha")
    store.commit(src, "r1/reward", {"config": "abc"})
    store.write_bytes("r1/reward/a.txt", b"changed")
    with pytest.raises(RuntimeError, match=r"r1/reward/a.txt: its bytes do not match the sha256 in _SUCCESS"):
        store.download_dir("r1/reward", tmp_path / "dst")
    assert not (tmp_path / "dst" / "a.txt").exists()


@pytest.mark.parametrize("planted", ["/tmp/hfi-escape-{u}", "../../hfi-escape-{u}", "sub//hfi-escape-{u}"])
def test_keys_that_leave_their_folder_are_refused_and_nothing_is_written_outside(store, tmp_path, planted):
    import json

    rel = planted.format(u=uuid.uuid4().hex[:8])
    marker = {"inputs": {}, "outputs": {rel: "0" * 64}, "finished_at": 0}
    store.write_bytes("r1/generate/_SUCCESS", json.dumps(marker).encode())
    dst = tmp_path / "deep" / "scratch" / "generate"
    with pytest.raises(ValueError, match=r"_SUCCESS: output .*: refused: it would leave its folder"):
        store.download_dir("r1/generate", dst)
    assert not list(tmp_path.glob("**/hfi-escape-*")) and not list(Path("/tmp").glob("hfi-escape-*"))


def test_a_planted_s3_key_is_refused_on_listing(s3_endpoint):
    bucket = f"hfi-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="runs/r1/generate//tmp/x", Body=b"x")
    store = Store.open(f"s3://{bucket}/runs", S3Settings(endpoint_url=s3_endpoint))
    with pytest.raises(ValueError, match=r"key 'r1/generate//tmp/x': refused"):
        store.list("r1/generate/")


class _Killed(Exception):
    pass


def _dies_after(store, n):
    """``store`` whose writes (uploads, PUTs, deletes) raise after the first ``n``."""
    count = {"n": 0}
    for name in ("upload_file", "write_bytes", "delete"):
        real = getattr(store, name)

        def op(*a, _real=real, **k):
            if count["n"] >= n:
                raise _Killed()
            count["n"] += 1
            return _real(*a, **k)

        setattr(store, name, op)
    return store


def _check_consistent(store, prefix, old, new):
    """No marker, or a marker whose outputs are exactly the folder's objects and bytes."""
    marker = store.success(prefix)
    if marker is None:
        return
    objects = {k[len(prefix) + 1 :] for k in store.list(prefix + "/")} - {"_SUCCESS"}
    assert set(marker["outputs"]) == objects
    for rel, digest in marker["outputs"].items():
        assert hashlib.sha256(store.read_bytes(f"{prefix}/{rel}")).hexdigest() == digest
    assert marker["outputs"] in (old, new)


def test_a_commit_killed_after_any_number_of_writes_is_never_read_as_finished_and_its_retry_is_exact(
    s3_endpoint, tmp_path
):
    bucket = f"hfi-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    settings = S3Settings(endpoint_url=s3_endpoint)
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    for folder, files in ((v1, {"a.txt": b"1a", "b.txt": b"1b", "old/c.txt": b"1c"}),
                          (v2, {"a.txt": b"2a", "b.txt": b"1b", "new/d.txt": b"2d"})):  # fmt: skip
        for rel, data in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)
    old, new = tree_hashes(v1), tree_hashes(v2)
    writes = 1 + len(new) + 1 + 1  # old marker, 3 uploads, 1 stale key, new marker
    for n in range(writes + 1):
        prefix = f"r{n}/generate"
        Store.open(f"s3://{bucket}/runs", settings).commit(v1, prefix, {"config": "1"})
        dying = _dies_after(Store.open(f"s3://{bucket}/runs", settings), n)
        try:
            dying.commit(v2, prefix, {"config": "2"})
            assert n == writes, f"the commit made fewer writes than {writes}"
        except _Killed:
            assert n < writes
        store = Store.open(f"s3://{bucket}/runs", settings)
        _check_consistent(store, prefix, old, new)
        if n >= 1:
            assert store.success(prefix) is None or store.success(prefix)["outputs"] == new
        store.commit(v2, prefix, {"config": "2"})  # the retry
        _check_consistent(store, prefix, old, new)
        assert store.success(prefix)["outputs"] == new and store.success(prefix)["inputs"] == {"config": "2"}
        assert store.download_dir(prefix, tmp_path / f"back{n}") == 3
        assert tree_hashes(tmp_path / f"back{n}") == new


def test_s3_calls_give_up_within_their_timeouts_on_a_closed_port_and_on_a_server_that_never_answers(monkeypatch):
    import socket
    import threading
    import time

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    for var, value in (("AWS_ACCESS_KEY_ID", "x"), ("AWS_SECRET_ACCESS_KEY", "x"), ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(var, value)
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    held = []
    threading.Thread(target=lambda: [held.append(hung.accept()) for _ in range(16)], daemon=True).start()
    for port in (closed_port, hung.getsockname()[1]):
        settings = S3Settings(
            endpoint_url=f"http://127.0.0.1:{port}", connect_timeout=1, read_timeout=2, max_attempts=2
        )
        store = Store.open("s3://b/runs", settings)
        t0 = time.perf_counter()
        with pytest.raises(Exception, match="(?i)connect|timeout|timed out"):
            store.exists("r1/generate/_SUCCESS")
        assert time.perf_counter() - t0 < 2 * (1 + 2) + 5  # attempts x (connect + read), and back-off
    hung.close()


def test_a_step_whose_s3_never_answers_ends_within_its_bound_with_one_line_and_exit_1(small_config, tmp_path):
    """Exit 1, not 2: a dependency down is retried by Airflow; bad input is not."""
    import os
    import socket
    import subprocess
    import sys
    import threading
    import time

    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    held = []
    threading.Thread(target=lambda: [held.append(hung.accept()) for _ in range(16)], daemon=True).start()
    env = {**os.environ, "HFI_S3_ENDPOINT_URL": f"http://127.0.0.1:{hung.getsockname()[1]}",
           "HFI_S3_CONNECT_TIMEOUT": "1", "HFI_S3_READ_TIMEOUT": "2", "HFI_S3_MAX_ATTEMPTS": "2",
           "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)
    config = small_config(tmp_path / "c.yaml")
    argv = [str(Path(sys.executable).parent / "hfi"), "step", "publish", "--config", str(config),
            "--run-uri", "s3://hfi/runs/night-1"]  # fmt: skip
    t0 = time.perf_counter()
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert time.perf_counter() - t0 < 60
    assert result.returncode == 1, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("hfi: error:")]
    assert len(lines) == 1 and "Timeout" in lines[0] and "Traceback" not in result.stderr, result.stderr[-2000:]
    hung.close()
