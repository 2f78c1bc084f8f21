"""Seeded, batched, resumable image generation -> content-addressed PNGs + ``manifest.parquet``.

Layout under the output folder::

    images/<sha256>.png      every image, named by the sha256 of its PNG bytes
    manifest.parquet         one row per image (see ``MANIFEST_COLUMNS``), written last
    .journal.jsonl           rows of finished batches while the run is under way

Reproducibility: image i's seed comes from (base seed, group, prompt, index), never from its
position in the run, so adding prompts leaves existing images unchanged. With an ``ImagePool``
(the store's images, shared by every night), an image id drawn on an earlier night is copied,
not drawn again. The images left to draw are cut into batches in plan order, and a resumed run
skips finished batches whole: a batch is always computed with the same companions, so even CPU
GEMM blocking cannot change a byte.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from hfi_core.config import RunConfig
from hfi_core.images import JOURNAL, MANIFEST, MANIFEST_COLUMNS, png_bytes
from hfi_core.models import load_sd_pipeline, model_identity, sld_pipeline
from hfi_core.sampling import sample
from hfi_core.store import ImagePool


@dataclass(frozen=True)
class GenerationResult:
    """Where the manifest is, and how many images this call drew or found already drawn."""

    manifest: Path
    generated: int
    reused: int
    """Found in this folder (a resumed run) or in the image pool (an earlier night)."""


@dataclass(frozen=True)
class Item:
    """One image to generate."""

    image_id: str
    prompt: str
    group: str
    index: int
    seed: int


def _digest(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()


def plan(cfg: RunConfig, width: int, height: int) -> list[Item]:
    """Every image the config asks for, in a fixed order, with its seed and id."""
    g = cfg.generation
    settings = (model_identity(cfg.model), g.scheduler, g.steps, g.guidance, g.negative_prompt, width, height)
    if g.sld:  # only then, so ids of runs without SLD stay what they were
        settings += (f"sld-{g.sld}",)
    items = []
    for ps in cfg.prompts:
        for prompt in ps.prompts:
            for k in range(g.images_per_prompt or ps.images_per_prompt):
                seed = int(_digest(g.seed, ps.group, prompt, k)[:8], 16) & 0x7FFFFFFF
                image_id = "img_" + _digest(*settings, ps.group, prompt, seed)[:20]
                items.append(Item(image_id, prompt, ps.group, k, seed))
    ids = [it.image_id for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError("prompts: the same prompt appears twice in one group; each image must be unique")
    return items


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def generate(
    cfg: RunConfig, out: Path, *, show_progress: bool = True, pool: ImagePool | None = None
) -> GenerationResult:
    """Generate every image of ``cfg.prompts`` into ``out``.

    A run that stopped part-way resumes: batches recorded in the journal are not redone. A
    finished run (manifest present and listing every planned image) returns at once. Images in
    ``pool`` are copied from it; the ones drawn here are added to it once the manifest is written.
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    g = cfg.generation
    pipe = load_sd_pipeline(cfg.model, g.scheduler)
    extra: dict = {}
    if g.sld:
        pipe, extra = sld_pipeline(pipe, g.sld, cfg.concept.sld_text)
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    height = g.height or pipe.unet.config.sample_size * vae_scale
    width = g.width or pipe.unet.config.sample_size * vae_scale
    items = plan(cfg, width, height)
    manifest_path = out / MANIFEST
    if manifest_path.exists() and set(pd.read_parquet(manifest_path).image_id) == {i.image_id for i in items}:
        return GenerationResult(manifest_path, 0, len(items))

    journal = out / JOURNAL
    done: dict[str, dict] = {}
    if journal.exists():
        for line in journal.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # a line cut short by a kill: that batch is redone
            if (out / row["uri"]).exists():
                done[row["image_id"]] = row
    pool_ids = pool.ids() if pool is not None else set()
    with journal.open("a") as jf:
        for it in items:
            if pool is not None and it.image_id not in done and it.image_id in pool_ids:
                row = pool.row(it.image_id)
                pool.fetch(row, out / row["uri"])
                done[it.image_id] = row
                jf.write(json.dumps(row) + "\n")
    # What is left is drawn in batches cut in plan order; a resumed run finds the same cuts.
    todo = [it for it in items if it.image_id not in done]
    batches = [todo[i : i + g.batch_size] for i in range(0, len(todo), g.batch_size)]
    reused = len(items) - len(todo)
    settings = dict(
        model=model_identity(cfg.model), scheduler=g.scheduler, steps=g.steps, guidance=g.guidance,
        negative_prompt=g.negative_prompt, sld=g.sld, width=width, height=height,
    )  # fmt: skip
    bar = tqdm(total=len(items), desc="generate", unit="img", disable=not show_progress, dynamic_ncols=True)
    bar.update(reused)
    with journal.open("a") as jf:
        for batch in batches:
            images = sample(
                pipe, [it.prompt for it in batch], [it.seed for it in batch], steps=g.steps, guidance=g.guidance,
                height=height, width=width, batch_size=len(batch), negative_prompt=g.negative_prompt, extra=extra,
            )  # fmt: skip
            for it, img in zip(batch, images, strict=True):
                data = png_bytes(img)
                sha = hashlib.sha256(data).hexdigest()
                uri = f"images/{sha}.png"
                if not (out / uri).exists():
                    _write_atomic(out / uri, data)
                row = {**asdict(it), "uri": uri, "sha256": sha, **settings}
                done[it.image_id] = row
                jf.write(json.dumps(row) + "\n")
            jf.flush()
            os.fsync(jf.fileno())
            bar.update(len(batch))
    bar.close()
    df = pd.DataFrame([done[it.image_id] for it in items])[MANIFEST_COLUMNS]
    tmp = out / f".{MANIFEST}.tmp"
    df.to_parquet(tmp, index=False)
    os.replace(tmp, manifest_path)
    if pool is not None:
        for row in done.values():
            if row["image_id"] not in pool_ids:
                pool.put({c: row[c] for c in MANIFEST_COLUMNS}, out / row["uri"])
    journal.unlink()
    return GenerationResult(manifest_path, len(items) - reused, reused)
