"""Generate a labelling batch, publish it to annotators, and pull their labels as they come.

generate -> publish -> pull_feedback

- ``generate`` and ``publish`` are the stages the table marks ``batch``: the images (new ones
  only: the store's image pool keeps every earlier night's) and the Label Studio import; with
  ``feedback.labelstudio.url`` set, publish creates the concept's project once and imports
  the batch's new tasks.
- ``pull_feedback`` polls the project (``hfi feedback pull``) until annotations come in that the
  concept's inbox does not hold, and adds the export to the inbox. Its success records an event
  on the ``hfi_feedback_batch`` asset, which triggers ``hfi_concept_removal``; with nothing new
  by the deadline it is skipped and records none.

Teams without the API drop exports into the inbox themselves and record the asset event
through Airflow's UI or REST API.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path

from airflow.sdk import DAG

# Airflow 3 puts only the config and plugins folders on sys.path, not the DAGs folder.
sys.path.insert(0, str(Path(__file__).parent))
from hfi_steps import FEEDBACK_BATCH, STAGES, add_stages, command_task, default_args, params, pull_argv  # noqa: E402

# Weekday evenings, or the deployment's HFI_BATCH_SCHEDULE (a cron string; "none": on demand).
CRON = os.environ.get("HFI_BATCH_SCHEDULE", "0 20 * * 1-5")

with DAG(
    dag_id="hfi_feedback_collection",
    schedule=None if CRON == "none" else CRON,
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(),
    params=params(),
    tags=["hfi", "feedback"],
    doc_md=__doc__,
) as dag:
    tasks = add_stages([name for name, row in STAGES.items() if row["batch"]])
    wait = float(os.environ.get("HFI_PULL_WAIT_MINUTES", "720"))
    pull = command_task(
        "pull_feedback", pull_argv(), gpu=False, timeout_hours=wait / 60 + 0.5, outlets=[FEEDBACK_BATCH]
    )
    tasks["publish"] >> pull
