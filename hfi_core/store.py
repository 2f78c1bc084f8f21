"""The run store: a local folder or an ``s3://bucket/prefix``, behind one small interface.

This is the only module that talks to S3 (boto3). Stages compute in a local folder; the store
moves their inputs in and outputs out, and a stage counts as done only when its ``_SUCCESS``
marker exists, written last and holding the hashes of its inputs and outputs. One store holds
every night of a deployment::

    <night>/<stage>/...                   the stage's files
    <night>/<stage>/_SUCCESS              {"inputs": {...sha256...}, "outputs": {...sha256...}, "finished_at": ...}
    feedback/<concept>/inbox/<sha256>.json  raw exports (``Inbox``): named by their bytes, never rewritten
    images/<sha256>.png                   every image ever drawn (``ImagePool``), shared by the nights
    images/index/<image_id>.json          its manifest row: a night that asks for it again reuses it
    cache/<kind>/<key>/...                what every night would compute alike (``FolderCache``)

A stage that dies leaves no marker, so nothing half-written is ever taken as complete; a retry
whose marker lists the same input hashes is skipped. On S3 every object is written whole by a
single PUT (multipart for large files, completed atomically), so readers never see a torn file.

Credentials are never passed in code: boto3 reads them from the environment, its config files or
an instance/pod role (Airflow connections export them into the task's environment).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUCCESS = "_SUCCESS"


@dataclass(frozen=True)
class S3Settings:
    """How to reach S3 (or MinIO, moto...). Nothing secret: credentials come from the environment."""

    endpoint_url: str | None = None
    """e.g. ``http://127.0.0.1:9000`` for MinIO; ``None``: AWS."""
    region: str | None = None
    max_attempts: int = 5
    """botocore attempts per call ("standard" mode: exponential back-off with jitter, bounded)."""
    connect_timeout: float = 10.0
    """Seconds to open a connection; a closed or firewalled endpoint fails within attempts x this."""
    read_timeout: float = 60.0
    """Seconds to wait for a response; a server that accepts and never answers is given up on."""
    multipart_threshold_mb: int = 64
    """Files larger than this upload in parts."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_key(key: str, where: str = "store key") -> str:
    """``key`` if it is a plain relative path: no empty, ``.`` or ``..`` segment, no leading ``/``,
    no backslash. Keys become local paths on download; one of these would write elsewhere."""
    parts = key.split("/")
    if not key or "\\" in key or "\x00" in key or any(p in ("", ".", "..") for p in parts):
        shown = key if len(key) <= 120 else key[:120] + "..."
        raise ValueError(f"{where} {shown!r}: refused: it would leave its folder (empty, '.' or '..' segment, "
                         "leading '/', backslash or NUL)")  # fmt: skip
    return key


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative POSIX paths), markers excluded."""
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != SUCCESS and not p.name.startswith(".")
    }


class Store:
    """A run store rooted at a URI. ``Store.open("s3://b/p")`` or ``Store.open("/data/runs")``."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")

    @staticmethod
    def open(uri: str, s3: S3Settings | None = None) -> Store:
        return S3Store(uri, s3 or S3Settings()) if uri.startswith("s3://") else LocalStore(uri)

    # The primitives each backend implements.
    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def upload_file(self, path: Path, key: str) -> None: ...
    def download_file(self, key: str, path: Path) -> None: ...
    def delete(self, key: str) -> None: ...

    def uri(self, key: str = "") -> str:
        return f"{self.root}/{key}" if key else self.root

    def presign(self, key: str, seconds: int) -> str | None:
        """A URL anyone holding it may GET ``key`` with for ``seconds``; ``None`` where the store has none."""
        return None

    # Built on the primitives.
    def download_dir(self, prefix: str, folder: Path) -> int:
        """The finished folder at ``prefix`` into ``folder``: exactly the outputs its marker lists,
        each checked against the marker's sha256. Returns how many; 0 when there is no marker."""
        marker = self.success(prefix)
        if marker is None:
            return 0
        prefix = prefix.rstrip("/")
        for rel, digest in marker["outputs"].items():
            check_key(rel, f"{self.uri(prefix)}/{SUCCESS}: output")
            path = Path(folder) / rel
            self.download_file(f"{prefix}/{rel}", path)
            if sha256_file(path) != digest:
                path.unlink()
                raise RuntimeError(
                    f"{self.uri(prefix)}/{rel}: its bytes do not match the sha256 in {SUCCESS}: the folder was "
                    "changed after it finished; re-run its step"
                )
        return len(marker["outputs"])

    def commit(self, folder: Path, prefix: str, inputs: dict[str, str], **extra: Any) -> dict[str, str]:
        """Publish ``folder`` at ``prefix`` as one transaction; returns the outputs' hashes.

        1. the old marker goes: from here on no reader takes the folder as finished, so nobody
           reads an old marker over new objects;
        2. every output goes up;
        3. keys an earlier attempt left that are not outputs are deleted;
        4. the marker goes last, listing every output with its sha256.

        Killed anywhere, the folder has no marker (or, before step 1, the old one over the old
        objects); a retry of the commit ends with exactly the marker's outputs.
        """
        prefix = prefix.rstrip("/")
        outputs = tree_hashes(folder)
        marker = f"{prefix}/{SUCCESS}"
        if self.exists(marker):
            self.delete(marker)
        for rel in outputs:
            self.upload_file(Path(folder) / rel, f"{prefix}/{rel}")
        for key in self.list(prefix + "/"):
            if key != marker and key[len(prefix) + 1 :] not in outputs:
                self.delete(key)
        self.mark_success(prefix, inputs, outputs, **extra)
        return outputs

    def success(self, stage_prefix: str) -> dict[str, Any] | None:
        """The stage's marker, or ``None`` when the stage never finished."""
        key = f"{stage_prefix.rstrip('/')}/{SUCCESS}"
        return json.loads(self.read_bytes(key)) if self.exists(key) else None

    def mark_success(self, stage_prefix: str, inputs: dict[str, str], outputs: dict[str, str], **extra: Any) -> None:
        """Write the marker, last: from now on the stage counts as done."""
        marker = {"inputs": inputs, "outputs": outputs, "finished_at": time.time(), **extra}
        self.write_bytes(f"{stage_prefix.rstrip('/')}/{SUCCESS}", json.dumps(marker, indent=1).encode())


def _slug(text: str) -> str:
    """A store-safe folder name for a concept (``Van Gogh`` -> ``van-gogh``)."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if not slug:
        raise ValueError(f"concept name {text!r} has no letters or digits to name its folder by")
    return slug


RESERVED = ("feedback", "images", "cache")
"""Top-level names of the store that are not nights."""


class Inbox:
    """The concept's raw feedback exports, as annotators (or the Label Studio pull) left them.

    Each export is stored under the sha256 of its bytes: adding the same export twice keeps one,
    an export is never rewritten, and the listing of names is the inbox's content hash.
    """

    SUFFIXES = (".json", ".jsonl", ".csv")

    def __init__(self, store: Store, concept: str) -> None:
        self.store = store
        self.prefix = f"feedback/{_slug(concept)}/inbox"

    def add(self, data: bytes, suffix: str = ".json") -> tuple[str, bool]:
        """Store one export; returns its key and whether it was new."""
        if suffix not in self.SUFFIXES:
            raise ValueError(f"feedback inbox: {suffix!r} exports are not read; use one of {self.SUFFIXES}")
        key = f"{self.prefix}/{hashlib.sha256(data).hexdigest()}{suffix}"
        if self.store.exists(key):
            return key, False
        self.store.write_bytes(key, data)
        return key, True

    def keys(self) -> list[str]:
        """The exports, in name order (temporary files of a write under way are not listed)."""
        return [k for k in self.store.list(self.prefix + "/") if Path(k).suffix in self.SUFFIXES]

    def digest(self) -> str:
        """sha256 of the listing: names are content hashes, so this covers every byte."""
        return hashlib.sha256("\n".join(self.keys()).encode()).hexdigest()

    def download(self, folder: Path) -> list[Path]:
        """Every export into ``folder``; returns the local paths, in name order."""
        out = []
        for key in self.keys():
            path = Path(folder) / Path(key).name
            if not path.exists():
                self.store.download_file(key, path)
            out.append(path)
        return out

    def uri(self) -> str:
        return self.store.uri(self.prefix)


class ImagePool:
    """Content-addressed images shared across nights, with the manifest row of each image id.

    A night asking for an image id drawn before copies it from here instead of drawing it again,
    so the images people labelled on an earlier night are the very bytes the later nights train on.
    """

    def __init__(self, store: Store, prefix: str = "images") -> None:
        self.store = store
        self.prefix = prefix

    def ids(self) -> set[str]:
        start = f"{self.prefix}/index/"
        return {Path(k).stem for k in self.store.list(start) if k.endswith(".json")}

    def row(self, image_id: str) -> dict[str, Any] | None:
        key = f"{self.prefix}/index/{image_id}.json"
        return json.loads(self.store.read_bytes(key)) if self.store.exists(key) else None

    def fetch(self, row: dict[str, Any], dest: Path) -> None:
        """The image of a pool ``row`` to ``dest``."""
        if not re.fullmatch(r"[0-9a-f]{64}", str(row.get("sha256", ""))):
            raise ValueError(f"{self.store.uri(self.prefix)}/index: row {str(row)[:120]}: 'sha256' is not a sha256")
        self.store.download_file(f"{self.prefix}/{row['sha256']}.png", Path(dest))

    def image_url(self, uri: str, seconds: int = 14 * 24 * 3600) -> str:
        """The URL a Label Studio server shows the image ``images/<sha>.png`` by: a presigned GET
        on S3 (valid ``seconds``: longer than people take to label a batch), else its local-files
        serving of the pool's folder (``LOCAL_FILES_SERVING_ENABLED``)."""
        name = uri.removeprefix("images/")
        url = self.store.presign(f"{self.prefix}/{name}", seconds)
        if url is not None:
            return url
        from hfi_core.feedback.labelstudio import local_files_prefix

        return local_files_prefix((Path(self.store.root).resolve() / self.prefix).as_posix()) + name

    def put(self, row: dict[str, Any], path: Path) -> None:
        """Add an image: the PNG first, then its index row (a reader never finds a row without bytes)."""
        key = f"{self.prefix}/{row['sha256']}.png"
        if not self.store.exists(key):
            self.store.upload_file(Path(path), key)
        self.store.write_bytes(f"{self.prefix}/index/{row['image_id']}.json", json.dumps(row, default=str).encode())


class FolderCache:
    """Folders keyed by the hash of what made them, for results every night would compute alike
    (the base model's evaluation on fixed seeds). A folder counts only once its marker is there."""

    def __init__(self, store: Store, kind: str) -> None:
        self.store = store
        self.prefix = f"cache/{kind}"

    @staticmethod
    def key_of(what: dict[str, Any]) -> str:
        """An entry's key: the hash of everything that made it (JSON, keys sorted)."""
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]

    def get(self, key: str, folder: Path) -> bool:
        """Fill ``folder`` with the entry ``key``; ``False`` when there is none."""
        prefix = f"{self.prefix}/{key}"
        if self.store.success(prefix) is None:
            return False
        self.store.download_dir(prefix, Path(folder))
        return True

    def put(self, key: str, folder: Path) -> None:
        prefix = f"{self.prefix}/{key}"
        self.store.commit(Path(folder), prefix, {"key": key})


class LocalStore(Store):
    """A folder on a local or mounted file system; writes go through a temporary file and a rename."""

    def _path(self, key: str) -> Path:
        key = key.removesuffix("/")  # a listing prefix ("r1/generate/") names its folder
        return Path(self.root) / check_key(key) if key else Path(self.root)

    def read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.exists():
            return []
        root = Path(self.root)
        return sorted(p.relative_to(root).as_posix() for p in base.rglob("*") if p.is_file() and ".tmp" not in p.name)

    def upload_file(self, path: Path, key: str) -> None:
        dest = self._path(key)
        if Path(path).resolve() == dest.resolve():
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def download_file(self, key: str, path: Path) -> None:
        src = self._path(key)
        if Path(path).resolve() == src.resolve():
            return  # the scratch folder is the store itself
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, path)


class S3Store(Store):
    """``s3://bucket/prefix`` through boto3, with retries and multipart uploads."""

    def __init__(self, root: str, settings: S3Settings) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        super().__init__(root)
        self.bucket, _, self.prefix = root[len("s3://") :].partition("/")
        self.prefix = self.prefix.strip("/")
        self.client = boto3.client(
            "s3",
            endpoint_url=settings.endpoint_url,
            region_name=settings.region,
            config=Config(
                connect_timeout=settings.connect_timeout,
                read_timeout=settings.read_timeout,
                retries={"max_attempts": settings.max_attempts, "mode": "standard"},
            ),
        )
        mb = 1024 * 1024
        self.transfer = TransferConfig(
            multipart_threshold=settings.multipart_threshold_mb * mb,
            multipart_chunksize=max(8, settings.multipart_threshold_mb // 4) * mb,
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def read_bytes(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def write_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def list(self, prefix: str) -> list[str]:
        out, strip = [], len(self.prefix) + 1 if self.prefix else 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
            out += [check_key(obj["Key"][strip:], f"s3://{self.bucket}: key") for obj in page.get("Contents", [])]
        return sorted(out)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(check_key(key)))

    def upload_file(self, path: Path, key: str) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key), Config=self.transfer)

    def presign(self, key: str, seconds: int) -> str | None:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=seconds
        )

    def download_file(self, key: str, path: Path) -> None:
        check_key(key)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.client.download_file(self.bucket, self._key(key), str(path), Config=self.transfer)
