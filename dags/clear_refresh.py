"""
### CLEAR metadata refresh

Runs weekly: re-syncs the YFCC100M metadata (a no-op when the source is unchanged),
plans shards for new photos only (existing shards keep their ids), and downloads every
shard, which resumes unfinished shards and skips finished ones. Downstream DAGs can
schedule on the `clear_images` asset it updates.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from clear_runtime.params import metadata_params
from clear_runtime.wiring import metadata_to_download

with DAG(
    dag_id="clear_refresh",
    schedule="@weekly",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params=metadata_params(),
    doc_md=__doc__,
    tags=["clear", "yfcc100m", "refresh"],
    default_args={"retries": 3, "retry_delay": pendulum.duration(minutes=5)},
):
    metadata_to_download()
