"""The scheduling examples use real job flags, and the cron script runs."""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess

from pipeline.options import EmbedOptions
from tests.conftest import ROOT

SCHEDULING = ROOT / "scheduling"


def _job_flags() -> set[str]:
    parser = argparse.ArgumentParser()
    EmbedOptions._add_argparse_args(parser)  # pylint: disable=protected-access
    return {flag[2:] for action in parser._actions
            for flag in action.option_strings if flag.startswith("--")}


def test_airflow_dag_passes_only_job_flags():
    tree = ast.parse((SCHEDULING / "airflow_dag.py").read_text("utf-8"))
    (options,) = [kw.value for node in ast.walk(tree)
                  if isinstance(node, ast.Call) for kw in node.keywords
                  if kw.arg == "pipeline_options"]
    names = {key.value for key in options.keys}
    assert {"input", "output", "previous_index", "model"} <= names
    assert names <= _job_flags()


def test_nightly_script_runs_a_first_night(tmp_path, tiny_model_dir):
    script = SCHEDULING / "nightly.sh"
    flags = set(re.findall(r"^\s+--(\w+)", script.read_text("utf-8"),
                           re.MULTILINE))
    assert flags <= _job_flags() and "previous_index" in flags
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "a", "text": "今天天气很好"}\n'
                      '{"id": "b", "text": "今天天气很好"}\n', encoding="utf-8")
    env = dict(os.environ, PROJECT_DIR=str(ROOT), CORPUS=str(corpus),
               INDEX_ROOT=str(tmp_path / "index"), MODEL=tiny_model_dir,
               NIGHT="2024-05-01")
    done = subprocess.run(["bash", str(script)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((tmp_path / "index" / "2024-05-01" /
                           "emb-manifest.json").read_text("utf-8"))
    assert manifest["status"] == "succeeded"
    assert manifest["previous_index"] is None  # the first night
    assert manifest["counts"]["documents_duplicates"] == 1  # --dedup
    # b has a's text: embedded once, and the index maps b to a's row.
    assert manifest["index"]["documents"] == 2
    assert manifest["index"]["duplicates_mapped"] == 1
