"""Airflow DAG: the nightly incremental embedding run, with the Beam operator.

Put this file in the DAGs folder of an Airflow 2.4+ installation that has
``apache-airflow-providers-apache-beam``, on a worker that has this project
checked out with its virtual environment (``PROJECT_DIR``), or change
``py_interpreter`` to any Python with the project installed.

``BeamRunPythonPipelineOperator`` runs ``<py_interpreter> -m pipeline.run``
with ``pipeline_options`` as ``--name=value`` flags (a list repeats the
flag, ``True`` gives a bare flag).  Each DAG run writes its own prefix
(``{{ ds }}``), so a retry or a cleared task writes the same output again,
and builds on the newest successful earlier run.  A non-zero exit (failed
run, bad usage, error rate over ``--max_error_rate``) fails the task, and
then nothing was published.

For Dataflow set ``runner="DataflowRunner"`` and add the Dataflow options
(``project``, ``region``, ``temp_location``, ``sdk_container_image``... see
the README): the launcher waits for the job, then publishes its files.
"""

from __future__ import annotations

import datetime

import pendulum
from airflow import DAG
from airflow.providers.apache.beam.operators.beam import (
    BeamRunPythonPipelineOperator)

PROJECT_DIR = "/opt/bert-zh-embed"
INDEX_ROOT = "gs://my-bucket/index/news"

with DAG(
        dag_id="bert_zh_embed_nightly",
        schedule="30 2 * * *",
        start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,  # a run builds on the one before it
        default_args={"retries": 1,
                      "retry_delay": datetime.timedelta(minutes=30)},
) as dag:
    BeamRunPythonPipelineOperator(
        task_id="embed_corpus",
        runner="DirectRunner",
        py_interpreter=f"{PROJECT_DIR}/.venv/bin/python",
        py_options=["-m"],
        py_file="pipeline.run",
        pipeline_options={
            "input": ["gs://my-bucket/corpus/news/*.jsonl.gz",
                      "gs://my-bucket/corpus/forum/*.csv"],
            "output": INDEX_ROOT + "/{{ ds }}/emb",
            "previous_index": INDEX_ROOT + "/*/emb-manifest.json",
            "model": "gs://my-bucket/models/bert_zh_L-12_H-768_A-12",
            "input_encoding": "utf-8",
            "dedup": True,
            "max_error_rate": 0.01,
            "sequence_dtype": "float16",
            "parquet_compression": "zstd",
            "progress_interval": 300,
        },
    )
