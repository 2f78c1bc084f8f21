"""``make demo``: two nights of the nightly pipeline on the embedded default, on one machine.

The toy world (remove "striped"), Airflow through ``airflow dags test`` on a sqlite metadata
DB, MLflow on a local sqlite store with local artifacts, and a local folder instead of S3.
Nothing listens on the network: ``dags test`` runs tasks in-process and starts no server.

- Night 1 draws 432 images (36 prompts x 12); the simulated annotators (three people, the toy world's oracle
  with 10% noise) label them and drop their export into the concept's feedback inbox; the
  night trains on it, and its model becomes the champion if it passes the gates.
- Night 2 asks for one more image per prompt (468, 8% new): the 432 come from the store's
  image pool, only the new ones are drawn and labelled, and the night trains on the union.
  Its model replaces the champion only if it passes the gates and beats it.

Ends with both nights' before/after tables, the champion verdict and the command for the
MLflow UI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def main() -> int:
    demo = ROOT / ".demo"
    shutil.rmtree(demo, ignore_errors=True)
    (demo / "runs").mkdir(parents=True)
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(demo / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": "0",
        "HFI_STEP_RUNNER": "local",
        "HFI_BIN": str(BIN / "hfi"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{demo / 'mlflow.db'}",
        "HFI_MLFLOW_ARTIFACT_ROOT": (demo / "mlartifacts").as_uri(),
        "HFI_EXPERIMENT": "hfi-demo",
        "HFI_GIT_COMMIT": _git_commit(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        # `dags test` runs one step at a time, so a step may take both cores of a 2-core machine:
        # two torch threads sampled and inverted 1.5x faster there, but ran the batch-1 ESD loop
        # 1.14x slower, so distill keeps one (benchmarks/results/toy_config_history.md).
        "HFI_THREADS": os.environ.get("HFI_THREADS", "2"),
        "HFI_THREADS_DISTILL": os.environ.get("HFI_THREADS_DISTILL", "1"),
        "TRANSFORMERS_VERBOSITY": "error",
    }
    t0 = time.time()
    print("hfi demo: preparing Airflow's metadata DB (sqlite) ...", flush=True)
    subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, check=True, capture_output=True)
    config = str(ROOT / "configs" / "toyworld-striped.yaml")
    nights = [("night-1", {}), ("night-2", {"generation.images_per_prompt": 13})]
    seconds: list[float] = []
    for night, params in nights:
        conf = {"config": config, "run_root": str(demo / "runs"), "run_name": night, **params}
        log_path = demo / f"{night}.log"
        print(f"hfi demo: {night}: DAG hfi_concept_removal (generate -> ... -> register); log: {log_path}", flush=True)
        t = time.time()
        with open(log_path, "w") as log:
            rc = subprocess.run(
                [str(BIN / "airflow"), "dags", "test", "hfi_concept_removal", "--conf", json.dumps(conf)],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            ).returncode  # fmt: skip
        run = demo / "runs" / night
        if rc != 0 or not (run / "register" / "_SUCCESS").exists():
            print(f"hfi demo: {night} failed (exit {rc}); see {log_path}", file=sys.stderr)
            return 1
        seconds.append(time.time() - t)
        print(f"\n== {night} ({seconds[-1]:.0f} s) ==" + report(run), flush=True)
    one, two = seconds
    print(f"night 1 {one:.0f} s, night 2 {two:.0f} s: night 2 took {two / one:.2f} of night 1's time")
    print(f"done in {time.time() - t0:.0f} s. Browse the nights side by side:")
    print(f"  {BIN / 'mlflow'} ui --backend-store-uri sqlite:///{demo / 'mlflow.db'} --host 127.0.0.1 --port 5000")
    print(f"  then http://127.0.0.1:5000/{_nights_view(env['MLFLOW_TRACKING_URI'])} : one row per night,")
    print("  with the headline metrics as columns (promoted, concept_rate, labels_used, reward_auc, ...);")
    print("  tick both nights and press Compare for them side by side, with their image grids")
    return 0


def _nights_view(tracking_uri: str) -> str:
    """The link the nights' parent runs carry to MLflow's runs table with the headline columns."""
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(tracking_uri).get_experiment_by_name("hfi-demo")
    runs = MlflowClient(tracking_uri).search_runs([exp.experiment_id], "tags.`hfi.level` = 'parent'", max_results=1)
    return runs[0].data.tags.get("hfi.nights_view", "") if runs else ""


_PAIRS = ("oracle_dotted", "oracle_plain", "oracle_shape_acc", "oracle_color_acc")


def report(run: Path) -> str:
    """Concept rate before/after per prompt group, preservation, and the gate verdict."""
    summary = json.loads((run / "evaluate" / "summary.json").read_text())
    reg = json.loads((run / "register" / "registration.json").read_text())
    key = "oracle_striped" if "oracle_striped" in next(iter(summary["sd"].values())) else "clip_concept_rate"
    lines = [
        "",
        f"{'prompt group':26s} {'concept before':>15s} {'after':>7s} {'dotted b/a':>12s} {'plain b/a':>11s} "
        f"{'shape b/a':>11s} {'colour b/a':>11s} {'became dotted/plain':>20s}",
    ]
    for group, before in summary["sd"].items():
        after = summary["distilled"][group]
        ba = {k: f"{before.get(k, float('nan')):.2f}/{after.get(k, float('nan')):.2f}" for k in _PAIRS}
        # where the images that changed style went (the distilled model against SD's same seeds)
        nan = float("nan")
        went = f"{after.get('oracle_became_dotted', nan):.2f}/{after.get('oracle_became_plain', nan):.2f}"
        lines.append(
            f"{group:26s} {before[key]:15.2f} {after[key]:7.2f} {ba['oracle_dotted']:>12s} {ba['oracle_plain']:>11s} "
            f"{ba['oracle_shape_acc']:>11s} {ba['oracle_color_acc']:>11s} {went:>20s}"
        )
    gates = ", ".join(
        f"{g} {c['value']:.3f} (limit {c['limit']}) {'pass' if c['passed'] else 'FAIL'}"
        for g, c in reg["gates"].items()
    )
    verdict = "promoted: alias 'champion'" if reg["champion"] else "not promoted"
    labels = _labels(run)
    lines += [
        "",
        f"feedback: {labels}" if labels else "",
        f"concept = {key}; model version {reg['version']}: {verdict}; gates: {gates}",
        f"champion verdict: {reg.get('reason', '')}",
        "",
    ]
    return "\n".join(lines)


def _labels(run: Path) -> str:
    """How much feedback the night trained on: labelled images, annotations, inbox exports."""
    labels = run / "feedback" / "labels.parquet"
    if not labels.exists():
        return ""
    import pandas as pd

    table = pd.read_parquet(labels)
    exports = len(list((run / "feedback" / "raw").glob("*"))) if (run / "feedback" / "raw").is_dir() else 0
    return f"{len(table)} labelled images, {int(table.n_votes.sum())} annotations, from {exports} inbox export(s)"


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
