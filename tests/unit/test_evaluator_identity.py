"""Evaluator identity: the sha256 of the weights a number was measured with, for folders and hub ids."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from hfi_core import evaluation
from hfi_core.evaluation import WEIGHT_SUFFIXES, weights_sha256
from hfi_core.models import locate


def _expected(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(p for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES):
        h.update(p.read_bytes())
    return h.hexdigest()


def test_a_folders_identity_is_its_weights_read_once_per_process(monkeypatch):
    opened = []
    real_open = open
    monkeypatch.setattr(evaluation, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k), raising=False)
    evaluation._hash_files.cache_clear()
    clip = Path(locate("toyworld:clip"))
    first, again = weights_sha256("toyworld:clip"), weights_sha256(str(clip))
    assert first == again == _expected(clip) != hashlib.sha256().hexdigest()
    assert len(opened) == len(set(opened)) > 0  # every variant asks; each file is read once


def test_a_hub_id_names_the_files_of_its_snapshot_in_the_local_cache(tmp_path):
    clip = Path(locate("toyworld:clip"))
    repo = tmp_path / "hub" / "models--openai--clip-tiny"
    shutil.copytree(clip, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    code = ("import sys, json; from hfi_core.evaluation import weights_identity;"
            "print(json.dumps(weights_identity(sys.argv[1])))")  # fmt: skip
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", code, "openai/clip-tiny"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    identity = json.loads(run.stdout.strip().splitlines()[-1])
    assert identity["weights_sha256"] == _expected(clip)  # before: the sha256 of nothing, for any hub id
    assert identity["revision"] == "0123abcd"  # the snapshot's commit, beside its files' hash
    missing = subprocess.run([sys.executable, "-c", code, "openai/not-cached"], env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and "neither a folder nor a model in the local hub cache" in missing.stderr
