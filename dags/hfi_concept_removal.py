"""Nightly concept removal with human feedback (HFI + SDD).

Every stage of the table (``hfi_stages.json``), wired by its dependencies:
generate -> (publish, feedback) ; feedback -> reward -> invert -> distill -> evaluate -> register.

Runs every night at 02:00 UTC (the deployment's ``HFI_REMOVAL_SCHEDULE``, a cron string, or
``none`` for no timed runs), and whenever new feedback lands in the inbox (the
``hfi_feedback_batch`` asset). Runs without a conf take the deployment's config (``HFI_CONFIG``
or the Airflow Variable ``hfi_config``). Each task runs ``hfi step <stage>`` against the run's store
prefix; a task whose ``_SUCCESS`` marker already matches its inputs does nothing, so retries and
re-runs are safe. How steps run (in the worker, in Docker, in Kubernetes pods) is chosen by the
worker's ``HFI_STEP_RUNNER``; tasks pass URIs, never data.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path

from airflow.sdk import DAG, AssetOrTimeSchedule, CronTriggerTimetable

# Airflow 3 puts only the config and plugins folders on sys.path, not the DAGs folder.
sys.path.insert(0, str(Path(__file__).parent))
from hfi_steps import FEEDBACK_BATCH, STAGES, add_stages, default_args, params  # noqa: E402

CRON = os.environ.get("HFI_REMOVAL_SCHEDULE", "0 2 * * *")

with DAG(
    dag_id="hfi_concept_removal",
    schedule=FEEDBACK_BATCH
    if CRON == "none"
    else AssetOrTimeSchedule(timetable=CronTriggerTimetable(CRON, timezone="UTC"), assets=FEEDBACK_BATCH),
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(),
    params=params(),
    tags=["hfi", "concept-removal", "gpu"],
    doc_md=__doc__,
) as dag:
    add_stages(list(STAGES))
