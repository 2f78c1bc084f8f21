"""Generate a labeling batch and publish it for annotators (a Label Studio import file).

The stages the table marks ``batch`` (generate -> publish), wired by its dependencies.

The import file and labeling config land under the run's ``publish/`` prefix. When the
annotators' export comes back and is dropped into the feedback inbox, whoever drops it records
an event on the ``hfi_feedback_batch`` asset (Airflow's REST API or UI), which triggers
``hfi_concept_removal``.
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

from airflow.sdk import DAG

# Airflow 3 puts only the config and plugins folders on sys.path, not the DAGs folder.
sys.path.insert(0, str(Path(__file__).parent))
from hfi_steps import STAGES, add_stages, default_args, params  # noqa: E402

with DAG(
    dag_id="hfi_feedback_collection",
    schedule="0 20 * * 1-5",
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(),
    params=params(),
    tags=["hfi", "feedback"],
    doc_md=__doc__,
) as dag:
    add_stages([name for name, row in STAGES.items() if row["batch"]])
