"""One pipeline step as a transaction against the run store, recorded in MLflow.

``run_step(name, ...)``, for a stage of ``stages.STAGES``:

1. hashes its inputs: the run config and the output hashes in its upstream stages' markers
   (an upstream stage without a marker has not finished: the step refuses to start);
2. if its own ``_SUCCESS`` marker lists the same input hashes, returns at once (a retry after
   success, or a re-run of an unchanged night, does nothing);
3. pulls the upstream folders into a scratch run folder and, with tracking, opens the step's
   child MLflow run (under one parent per pipeline run);
4. runs the stage function there; records metrics, images, plots and the model card in the
   child run; commits the outputs (``Store.commit``: old marker out, outputs up, leftovers of
   earlier attempts deleted, the marker *last*, with every output's sha256).

A step killed anywhere before 4 ends leaves no marker; its retry starts from a clean stage folder
and, every stage being seeded, produces the same outputs. A stage that checkpoints (distill) keeps
its last checkpoint in the store under the step's input hash, and its retry resumes from there,
ending bit for bit where the unbroken run would have. The same function runs in-process
(``hfi run``, the benchmark), in a container (``hfi step``) or in a pod.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hfi_core.config import RunConfig, config_hash
from hfi_core.stages import CHECKPOINT_FILE, STAGES, StageContext, grids, headline, headline_keys, stage
from hfi_core.store import RESERVED, Inbox, LocalStore, Store

ARTIFACT_SUFFIXES = (".png", ".md", ".json", ".xml")
log = logging.getLogger(__name__)


@dataclass
class TrackingContext:
    """Where to record a step and how to link it back to the orchestrator."""

    tracking_uri: str
    experiment: str
    run_key: str
    """Unique per pipeline run (e.g. ``<dag_id>/<run_id>``): finds the parent run again."""
    tags: dict[str, str] = field(default_factory=dict)
    """dag_id, run_id, task_id, try_number, image tag, git commit..."""
    artifact_location: str | None = None
    """Where a new experiment keeps artifacts (servers decide this themselves; sqlite stores need it)."""


def _join(prefix: str, name: str) -> str:
    return f"{prefix.rstrip('/')}/{name}" if prefix else name


def step_inputs(name: str, cfg: RunConfig, store: Store, run_prefix: str) -> dict[str, str]:
    """The input hashes a marker must match: the config's, each upstream stage's outputs' and,
    for a stage that reads it, the feedback inbox's."""
    inputs = {"config": config_hash(cfg)}
    if stage(name).collect is not None:
        inputs["inbox"] = Inbox(store, cfg.concept.name).digest()
    for dep in stage(name).upstream:
        marker = store.success(_join(run_prefix, dep))
        if marker is None:
            raise RuntimeError(
                f"step {name}: upstream stage {dep!r} has not finished ({store.uri(_join(run_prefix, dep))})"
            )
        inputs[dep] = hashlib.sha256(json.dumps(marker["outputs"], sort_keys=True).encode()).hexdigest()
    return inputs


def _checkpoint_prefix(run_prefix: str, name: str) -> str:
    """Where a night keeps a stage's checkpoints while it runs: beside its folder, which a retry
    clears, and named by the step's input hash, so that only the same work resumes from them."""
    return _join(run_prefix, f".checkpoints/{name}")


def _checkpoint_key(run_prefix: str, name: str, inputs: dict[str, str]) -> str:
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return f"{_checkpoint_prefix(run_prefix, name)}/{digest}.pt"


def process_group() -> tuple[int, int]:
    """``(rank, world)`` of the process group a launcher set up (torchrun, accelerate launch);
    ``(0, 1)`` without one. Read without importing torch: a group exists only once it has."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _run_replica(st: Any, cfg: RunConfig, store: Store, run_prefix: str, scratch: Path, rank: int,
                 resume: bool) -> dict[str, Any]:  # fmt: skip
    """Process ``rank`` > 0 of a data-parallel step. It reads the same inputs and takes the same
    decisions as process 0 (skip, resume from the same checkpoint), and trains in step with it,
    in a folder of its own. Process 0 alone writes outputs and checkpoints, tracks and commits."""
    inputs = step_inputs(st.name, cfg, store, run_prefix)
    marker = store.success(_join(run_prefix, st.name))
    if (marker is not None and marker["inputs"] == inputs) or not st.needed(cfg):
        return {"skipped": True, "reason": "process 0 skips it too", "stage": st.name, "replica": rank}
    own = Path(scratch) / f".replica-{rank}"  # a dot-folder: never an output
    shutil.rmtree(own, ignore_errors=True)
    _pull_upstream(st, store, run_prefix, own)
    ctx = StageContext.on(store, cfg, resume=resume)
    if st.checkpoints:
        mine, ckpt = own / st.name / CHECKPOINT_FILE, _checkpoint_key(run_prefix, st.name, inputs)
        mine.parent.mkdir(parents=True, exist_ok=True)
        if resume and (Path(scratch) / st.name / CHECKPOINT_FILE).exists():  # hfi distill --resume, one folder
            shutil.copyfile(Path(scratch) / st.name / CHECKPOINT_FILE, mine)
        elif not resume and store.exists(ckpt):  # as process 0 finds it
            store.download_file(ckpt, mine)
            ctx.resume = True
    try:
        return {**st.run(cfg, own, ctx), "stage": st.name}
    finally:
        shutil.rmtree(own, ignore_errors=True)


def _pull_upstream(st: Any, store: Store, run_prefix: str, scratch: Path) -> None:
    for dep in st.upstream:
        if not (scratch / dep).exists():
            store.download_dir(_join(run_prefix, dep), scratch / dep)


def run_step(
    name: str,
    cfg: RunConfig,
    store: Store,
    run_prefix: str,
    scratch: Path,
    tracking: TrackingContext | None = None,
    *,
    show_progress: bool = False,
    resume: bool = False,
    labelstudio_token: str | None = None,
) -> dict[str, Any]:
    """Run stage ``name`` of the run at ``store/run_prefix`` (see the module docstring).

    Args:
        scratch: the local run folder the stage computes in (the store's own folder for a local
            store, so nothing is copied).
        show_progress: progress bars, for stages whose table row says they draw one.
        resume: ``distill`` continues from its checkpoint in ``scratch``.
    """
    st = stage(name)
    if run_prefix.split("/")[-1] in RESERVED:
        raise ValueError(f"run name {run_prefix!r}: {RESERVED} are the store's own folders, not nights")
    rank, world = process_group()
    if world > 1 and not st.parallel:
        parallel = [s.name for s in STAGES.values() if s.parallel]
        raise ValueError(f"step {name}: launched as {world} processes, but only {parallel} train data-parallel")
    if rank > 0:
        return _run_replica(st, cfg, store, run_prefix, Path(scratch), rank, resume)
    prefix = _join(run_prefix, name)
    scratch = Path(scratch)
    ctx = StageContext.on(store, cfg, show_progress=show_progress and st.progress, resume=resume,
                          labelstudio_token=labelstudio_token)  # fmt: skip
    inputs = step_inputs(name, cfg, store, run_prefix)  # refuses while an upstream stage is unfinished
    collected = None
    if st.collect is not None:
        _pull_upstream(st, store, run_prefix, scratch)
        collected = st.collect(cfg, scratch, ctx)
        inputs = step_inputs(name, cfg, store, run_prefix)  # the inbox may hold more now
    marker = store.success(prefix)
    if marker is not None and marker["inputs"] == inputs:
        return {"skipped": True, "reason": "a _SUCCESS marker with the same input hashes exists", "stage": name}

    if not st.needed(cfg):
        (scratch / name).mkdir(parents=True, exist_ok=True)
        store.mark_success(prefix, inputs, {})
        return {"skipped": True, "reason": "this config does not need the stage", "stage": name}
    _pull_upstream(st, store, run_prefix, scratch)
    if not resume:
        shutil.rmtree(scratch / name, ignore_errors=True)  # a retry starts clean...
    checkpoints = _checkpoint_prefix(run_prefix, name)
    if st.checkpoints:
        # ...but for the last checkpoint an earlier attempt with the same inputs kept in the store.
        ckpt = _checkpoint_key(run_prefix, name, inputs)
        if not resume and store.exists(ckpt):
            store.download_file(ckpt, scratch / name / CHECKPOINT_FILE)
            ctx.resume = True
        ctx.checkpoint = lambda path, key=ckpt: store.upload_file(path, key)  # one PUT: whole or absent

    tracker = child = parent = None
    warnings: list[str] = []
    if tracking is not None:
        try:
            tracker, parent, child = _open_runs(tracking, cfg, store, run_prefix, name)
        except Exception as e:
            if st.registers:
                raise  # without the registry there is nothing to do: fail, and let the retry try again
            warnings.append(_untracked(name, "could not open its MLflow runs", e))
    ctx.tracker, ctx.mlflow_run = tracker, child
    try:  # whatever fails from here on (the stage, the commit) leaves the runs FAILED, never RUNNING
        result = st.run(cfg, scratch, ctx)
        if collected:
            result = {**collected, **result}
        (scratch / name).mkdir(parents=True, exist_ok=True)
        if tracker is not None and child is not None and parent is not None:
            try:
                _record(tracker, parent, child, name, result, cfg, scratch)
            except Exception as e:
                warnings.append(_untracked(name, "could not record its results in MLflow", e))
                tracker = None
        if warnings:
            result["tracking_warnings"] = warnings
        extra = {"tracking": warnings} if warnings else {}  # the base model (with its revision) names every output
        store.commit(scratch / name, prefix, inputs, mlflow_run_id=child, model=cfg.model.identity, **extra)
    except BaseException:
        if tracker is not None and child is not None and parent is not None:
            _quietly(lambda: (tracker.finish(child, ok=False), tracker.finish(parent, ok=False)))
        raise
    if st.checkpoints:
        for key in store.list(checkpoints + "/"):  # done: nothing will resume from these
            store.delete(key)
    if tracker is not None and child is not None and parent is not None:
        _quietly(lambda: (tracker.finish(child), tracker.settle(parent)))
    return result


def _open_runs(tracking: TrackingContext, cfg: RunConfig, store: Store, run_prefix: str, name: str):
    """``(tracker, parent, child)``: the night's parent run and this step's child run.

    The parent is the night: named by concept and night, RUNNING while a step of it runs,
    FINISHED when none is left running, FAILED when one failed."""
    from hfi_core.tracking import Tracker

    night = run_prefix.rstrip("/").split("/")[-1]
    tracker = Tracker(tracking.tracking_uri, tracking.experiment, artifact_location=tracking.artifact_location)
    parent = tracker.parent(
        tracking.run_key, f"{cfg.concept.name} · {night}", cfg.model_dump(mode="json"),
        {**tracking.tags, "hfi.night": night, "hfi.concept": cfg.concept.name},
    )  # fmt: skip
    view = tracker.nights_view(cfg.concept.name, headline_keys(cfg))
    tracker.set_tags(parent, {"hfi.nights_view": view})  # the UI's link to the nights side by side
    child = tracker.child(parent, name, {**tracking.tags, "hfi.store": store.uri(_join(run_prefix, name))})
    return tracker, parent, child


def _record(tracker: Any, parent: str, child: str, name: str, result: dict[str, Any], cfg: RunConfig,
            scratch: Path) -> None:  # fmt: skip
    """The step's metrics and files on its child run; the night's headline, grids and verdict on the parent."""
    tracker.log_metrics(child, result)
    tracker.log_metrics(parent, headline(name, result, cfg))
    for f in sorted((scratch / name).rglob("*")):
        if f.suffix in ARTIFACT_SUFFIXES and f.stat().st_size < 5 * 2**20 and f.parent.name != "raw":
            tracker.log_file(child, f, f"{name}/{f.parent.relative_to(scratch / name)}".rstrip("/."))
    for key, path in grids(name, scratch).items():
        tracker.log_image(parent, path, key)
    if name == "register":
        verdict = "promoted" if result["champion"] else "not promoted"
        tags = {"hfi.verdict": verdict, "hfi.reason": result["reason"], "hfi.model_version": result["version"]}
        tracker.set_tags(parent, tags)


def _untracked(name: str, what: str, error: BaseException) -> str:
    """The one warning line of a step that goes on without MLflow (its outputs are what matter)."""
    line = f"step {name}: {what} ({type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}); " \
           "its outputs and marker are written untracked"  # fmt: skip
    log.warning("%s", line)
    return line


def _quietly(call: Any) -> None:
    """A best-effort MLflow call after the outputs are safe (closing runs): a failure is a warning."""
    try:
        call()
    except Exception as e:
        log.warning("closing the step's MLflow runs failed (%s: %s)", type(e).__name__, str(e)[:160])


def run_local_step(
    name: str,
    cfg: RunConfig,
    run: Path,
    *,
    show_progress: bool = True,
    resume: bool = False,
) -> dict[str, Any]:
    """``run_step`` against the local run folder ``run``, computing in place (no MLflow)."""
    run = Path(run).resolve()
    run.mkdir(parents=True, exist_ok=True)
    store = LocalStore(str(run.parent))
    return run_step(name, cfg, store, run.name, run, show_progress=show_progress, resume=resume)


def run_local(
    cfg: RunConfig,
    run: Path,
    *,
    stages: list[str] | tuple[str, ...] | None = None,
    show_progress: bool = True,
    log: Any = None,
) -> dict[str, Any]:
    """The stages of the table in order (all, or ``stages``), each as a ``run_step`` against the
    local folder ``run``: a stage whose marker matches its inputs is not run again.

    Returns each stage's result and its seconds (``<stage>_seconds``), also written to
    ``run/run.json``.
    """
    run = Path(run).resolve()
    results: dict[str, Any] = {}
    for name in STAGES:
        if stages is not None and name not in stages:
            continue
        t0 = time.time()
        if log:
            log(f"stage {name} ...")
        results[name] = run_local_step(name, cfg, run, show_progress=show_progress)
        results[f"{name}_seconds"] = round(time.time() - t0, 1)
        (run / "run.json").write_text(json.dumps(results, indent=2, default=str))
    return results
