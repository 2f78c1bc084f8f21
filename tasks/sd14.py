"""``hfi sd14 fixture --out DIR``: SD v1.4's architecture with random weights (``hfi_core.sd14``).

CLIP's BPE merge list comes from the ``open_clip_torch`` wheel on PyPI (MIT), fetched without
its dependencies and checked against its sha256, unless ``--bpe`` names a copy.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

OPEN_CLIP = "open_clip_torch==3.3.0"


def register(top: argparse._SubParsersAction) -> None:
    p = top.add_parser("sd14", help="the real-size test bed: SD v1.4's architecture, random weights")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    f = sub.add_parser("fixture", help="write sd/ (diffusers) and clip/ (transformers) folders, about 6 GB")
    f.add_argument("--out", type=Path, default=None,
                   help="folder to write (sd/, clip/); default: .fixtures/sd14, which sd14:sd names")  # fmt: skip
    f.add_argument("--bpe", type=Path, help=f"CLIP's bpe_simple_vocab_16e6.txt.gz; default: from {OPEN_CLIP}")
    f.add_argument("--seed", type=int, default=0, help="seeds the random weights")
    f.set_defaults(func=_fixture)


def fetch_bpe(dest: Path) -> Path:
    """CLIP's BPE file out of the open_clip_torch wheel, into ``dest`` (kept: fetched once)."""
    from hfi_core.sd14 import BPE_FILE, BPE_SHA256

    path = dest / BPE_FILE
    if not path.exists():
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                            "--no-deps", "-d", tmp, OPEN_CLIP], check=True)  # fmt: skip
            (wheel,) = Path(tmp).glob("*.whl")
            with zipfile.ZipFile(wheel) as z:
                data = z.read(f"open_clip/{BPE_FILE}")
        if hashlib.sha256(data).hexdigest() != BPE_SHA256:
            raise ValueError(f"{OPEN_CLIP}: {BPE_FILE} has sha256 {hashlib.sha256(data).hexdigest()}, not {BPE_SHA256}")
        tmp_path = path.with_name(f".{BPE_FILE}.tmp")
        tmp_path.write_bytes(data)
        tmp_path.replace(path)
    return path


def _fixture(args: argparse.Namespace) -> int:
    from hfi_core.sd14 import BPE_SHA256, FIXTURE, write_fixture

    args.out = args.out or FIXTURE
    bpe = args.bpe or fetch_bpe(args.out / ".bpe")
    if hashlib.sha256(bpe.read_bytes()).hexdigest() != BPE_SHA256:
        raise ValueError(f"{bpe}: not CLIP's BPE merge list (sha256 differs from {BPE_SHA256})")
    t0 = time.time()
    counts = write_fixture(args.out, bpe, seed=args.seed)
    print(f"wrote {args.out}/sd and {args.out}/clip in {time.time() - t0:.0f} s: "
          + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in counts.items()))  # fmt: skip
    return 0
