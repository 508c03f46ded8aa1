"""The Dataflow job, built offline: nothing is submitted, nothing contacted.

``--dry_run True`` makes Beam's ``DataflowRunner`` do everything but talk to
Google Cloud: it applies its overrides, translates the pipeline to the
portable proto that Dataflow Runner v2 executes, builds the worker
environment (container image and staged artifacts: the project's sdist built
from ``--setup_file``, the pip freeze of the submission environment) and the
``Job``, then returns before creating an API client.  Sockets are closed for
the whole module, so any attempt to reach the network fails the test.

On top of that the tests check what a Dataflow worker would do with the job:
every DoFn is unpickled in a fresh interpreter that sees the project only
through the staged sdist, and the worker pool description that the Dataflow
client would send is built from the same options (machine type, workers,
experiments, GPU service option, custom container).  The Dockerfiles are
linted against the code they describe (the Flex Template's launch and
metadata: ``tests/test_flex_template.py``).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any, Iterator

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.runners.dataflow.internal import apiclient
from packaging.requirements import Requirement

from pipeline.graph import JobConfig, build_pipeline
from pipeline.options import EmbedOptions
from pipeline.cli import UsageError
from pipeline.run import resolve_job
from tests.conftest import ROOT

GS_INPUT = "gs://my-bucket/corpus/*.jsonl"
GS_OUTPUT = "gs://my-bucket/emb/run1"
GS_MODEL = "gs://my-bucket/models/bert_zh_L-12_H-768_A-12"
IMAGE = "europe-west4-docker.pkg.dev/my-project-123/images/bert-zh-embed:0.1.0"
GPU_OPTION = ("worker_accelerator=type:nvidia-tesla-t4;count:1;"
              "install-nvidia-driver")
DATAFLOW = ["--runner", "DataflowRunner", "--project", "my-project-123",
            "--region", "europe-west4",
            "--temp_location", "gs://my-bucket/tmp",
            "--staging_location", "gs://my-bucket/staging",
            "--dry_run", "True"]
OUR_TRANSFORMS = ("ReadDocuments", "Tokenize", "Embed", "WriteEmbeddings",
                  "WriteDeadLetters")
BEAM_VERSION = beam.__version__
PY = f"{sys.version_info.major}.{sys.version_info.minor}"


class NetworkAttempt(RuntimeError):
    """Raised instead of opening a connection or resolving a name."""


@pytest.fixture(scope="module", autouse=True)
def offline() -> Iterator[list]:
    """No socket may connect and no name may resolve in this module."""
    attempts: list = []

    def refuse(*args: Any, **_: Any) -> None:
        attempts.append(repr(args[:3]))
        raise NetworkAttempt(f"network access attempted: {args!r}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket.socket, "connect_ex", refuse)
        patch.setattr(socket, "getaddrinfo", refuse)
        patch.setattr(socket, "create_connection", refuse)
        yield attempts
    assert not attempts, f"tests reached for the network: {attempts}"


@pytest.fixture(scope="module")
def project_copy(tmp_path_factory) -> Path:
    """The repository without tests and local state, so that building the
    sdist (which writes an egg-info next to setup.py) leaves the checkout
    untouched."""
    target = tmp_path_factory.mktemp("dataflow_project") / "project"
    shutil.copytree(ROOT, target, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".pytest_cache", "__pycache__", "*.egg-info",
        "build", "dist", "out", ".cache", "tests"))
    return target


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A one-document local corpus for the launcher's checks."""
    path = tmp_path_factory.mktemp("dataflow_corpus") / "corpus.jsonl"
    path.write_text('{"id": "a", "text": "今天天气很好"}\n', encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cloud_config(corpus, tiny_model_dir) -> JobConfig:
    """The launcher's resolved config, with the paths a cloud run would use.

    ``resolve_job`` reads the model and checks the input, which needs the
    files, so it runs on local copies; the graph is then built for gs://
    paths exactly as the launcher would build it for them.
    """
    options = PipelineOptions(["--input", str(corpus), "--output", "unused",
                               "--model", tiny_model_dir,
                               "--max_seq_length", "32"])
    config = resolve_job(options.view_as(EmbedOptions)).config
    return dataclasses.replace(
        config, inputs=[GS_INPUT], output=GS_OUTPUT,
        infer=dataclasses.replace(config.infer, model_dir=GS_MODEL))


@dataclasses.dataclass
class BuiltJob:
    """What a dry run leaves behind."""
    result: Any
    proto: beam_runner_api_pb2.Pipeline
    options: PipelineOptions

    @property
    def environment(self) -> beam_runner_api_pb2.Environment:
        """The job's one SDK environment (Dataflow merges them)."""
        (env,) = self.proto.components.environments.values()
        return env

    def staged(self) -> dict[str, str]:
        """Staged artifact name -> local file it is staged from."""
        staged = {}
        for dep in self.environment.dependencies:
            assert dep.role_urn == common_urns.artifact_roles.STAGING_TO.urn
            assert dep.type_urn == common_urns.artifact_types.FILE.urn
            name = beam_runner_api_pb2.ArtifactStagingToRolePayload \
                .FromString(dep.role_payload).staged_name
            staged[name] = beam_runner_api_pb2.ArtifactFilePayload \
                .FromString(dep.type_payload).path
        return staged

    def container_image(self) -> str:
        """The Docker image the workers run."""
        return beam_runner_api_pb2.DockerPayload.FromString(
            self.environment.payload).container_image

    def worker_environment(self) -> Any:
        """The ``Environment`` the Dataflow client would send with the job
        (``DataflowApplicationClient.create_job_description`` builds it the
        same way, after uploading the artifacts)."""
        return apiclient.Environment(
            packages=sorted(self.staged()), options=self.options,
            environment_version=apiclient._FNAPI_ENVIRONMENT_MAJOR_VERSION,
            proto_pipeline_staged_url="gs://my-bucket/staging/pipeline.pb",
            proto_pipeline=self.proto).proto


def build_dataflow_job(config: JobConfig, *extra: str) -> BuiltJob:
    """Builds the pipeline for Dataflow and dry-runs it."""
    options = PipelineOptions(DATAFLOW + list(extra))
    pipeline = beam.Pipeline(options=options)
    build_pipeline(pipeline, config)
    result = pipeline.run()
    return BuiltJob(result, pipeline.runner.proto_pipeline, pipeline.options)


@pytest.fixture(scope="module")
def setup_file_job(cloud_config, project_copy) -> BuiltJob:
    """Workers install the project from ``--setup_file``."""
    return build_dataflow_job(
        cloud_config, "--setup_file", str(project_copy / "setup.py"))


@pytest.fixture(scope="module")
def container_job(cloud_config) -> BuiltJob:
    """Workers run the custom container, on GPUs, one SDK process per VM."""
    return build_dataflow_job(
        cloud_config, "--sdk_container_image", IMAGE,
        "--machine_type", "n1-standard-8", "--max_num_workers", "4",
        "--experiments", "no_use_multiple_sdk_containers",
        "--dataflow_service_options", GPU_OPTION)


def _names(proto: beam_runner_api_pb2.Pipeline) -> set[str]:
    """Unique names of every transform in the job, nested ones included."""
    return {t.unique_name for t in proto.components.transforms.values()}


def test_sockets_are_closed_in_this_module(offline):
    with pytest.raises(NetworkAttempt):
        socket.getaddrinfo("dataflow.googleapis.com", 443)
    assert "dataflow.googleapis.com" in offline.pop()


def test_dry_run_returns_a_job_without_submitting(setup_file_job):
    result = setup_file_job.result
    assert result.state == beam.runners.runner.PipelineState.DONE
    assert isinstance(result.job, apiclient.Job)
    assert result.job.proto.type.name == "JOB_TYPE_BATCH"
    # A plain result, not a DataflowPipelineResult: no job was created.
    assert type(result) is beam.runners.runner.PipelineResult


def test_job_graph_holds_our_transforms(setup_file_job):
    names = _names(setup_file_job.proto)
    assert set(OUR_TRANSFORMS) <= names
    for name in ("Embed/BatchByLength", "Embed/RunInference",
                 "Embed/CountEmbedded", "AllDeadLetters"):
        assert name in names


def test_staged_sdist_is_the_project_with_its_pins(setup_file_job):
    staged = setup_file_job.staged()
    assert "workflow.tar.gz" in staged
    assert "submission_environment_dependencies.txt" in staged
    with tarfile.open(staged["workflow.tar.gz"]) as sdist:
        files = {m.name.split("/", 1)[1] for m in sdist.getmembers()
                 if "/" in m.name}
        top = sdist.getmembers()[0].name.split("/")[0]
        requires = sdist.extractfile(
            f"{top}/bert_zh_embed.egg-info/requires.txt").read().decode()
        pkg_info = sdist.extractfile(f"{top}/PKG-INFO").read().decode()
    assert "Name: bert-zh-embed" in pkg_info
    for module in ("pipeline/run.py", "pipeline/graph.py", "transforms/infer.py",
                   "transforms/tokenize.py", "model/load.py", "setup.py"):
        assert module in files, module
    assert not any(f.startswith("tests/") for f in files)
    install_requires = requires.split("\n[", 1)[0].split()
    assert _canonical(install_requires) == _canonical(_setup_list("REQUIRED"))
    # Workers run the same Beam as the launcher: the default SDK image.
    assert setup_file_job.container_image().endswith(
        f"beam_python{PY}_sdk:{BEAM_VERSION}")


def _canonical(requirements: list[str]) -> list[str]:
    """Requirements written one way (specifiers sorted, names as given)."""
    return sorted(str(Requirement(r)) for r in requirements)


def _setup_list(name: str) -> list[str]:
    """A list literal assigned in setup.py, read without running it."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and \
                any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py assigns no {name}")


# Runs in a fresh interpreter: reads the pipeline proto and unpickles every
# DoFn with only the extracted sdist on sys.path for the project's modules.
_WORKER_CHECK = r"""
import json, socket, sys
def refuse(*args, **kwargs):
    raise RuntimeError("network access attempted")
socket.socket.connect = socket.getaddrinfo = refuse
sdist_root, proto_path, library = sys.argv[1:4]
sys.path.insert(0, sdist_root)
from apache_beam.internal import pickler
from apache_beam.portability import common_urns, python_urns
from apache_beam.portability.api import beam_runner_api_pb2 as pb
pickler.set_library(library)

def handlers(obj, depth=0):
    if "BertModelHandler" in {c.__name__ for c in type(obj).__mro__}:
        return [obj._settings.model_dir]
    if depth == 3 or not hasattr(obj, "__dict__"):
        return []
    return [h for v in vars(obj).values() for h in handlers(v, depth + 1)]

with open(proto_path, "rb") as handle:
    proto = pb.Pipeline.FromString(handle.read())
dofns = {}
for transform in proto.components.transforms.values():
    if transform.spec.urn != common_urns.primitives.PAR_DO.urn:
        continue
    payload = pb.ParDoPayload.FromString(transform.spec.payload)
    if payload.do_fn.urn != python_urns.PICKLED_DOFN_INFO:
        continue
    fn = pickler.loads(payload.do_fn.payload)[0]
    dofns[transform.unique_name] = {
        "class": type(fn).__module__ + "." + type(fn).__qualname__,
        "handlers": handlers(fn)}
ours = {m: sys.modules[m].__file__ for m in sorted(sys.modules)
        if m.split(".")[0] in ("pipeline", "transforms", "model")
        and getattr(sys.modules[m], "__file__", None)}
print(json.dumps({"dofns": dofns, "modules": ours}))
"""


def test_every_dofn_unpickles_from_the_staged_sdist(setup_file_job, tmp_path):
    """What a worker does: install the sdist, unpickle the DoFns."""
    with tarfile.open(setup_file_job.staged()["workflow.tar.gz"]) as sdist:
        sdist.extractall(tmp_path / "sdist", filter="data")
    (sdist_root,) = (tmp_path / "sdist").iterdir()
    proto_path = tmp_path / "pipeline.pb"
    proto_path.write_bytes(setup_file_job.proto.SerializeToString())
    library = setup_file_job.options.view_as(SetupOptions).pickle_library
    done = subprocess.run(
        [sys.executable, "-I", "-c", _WORKER_CHECK, str(sdist_root),
         str(proto_path), library],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    dofns = report["dofns"]
    classes = {d["class"] for d in dofns.values()}
    for ours in ("transforms.tokenize.TokenizeDocuments",
                 "transforms.batch.BatchByLength",
                 "transforms.infer._CountEmbedded",
                 "transforms.infer._FailedBatchToDeadLetters"):
        assert ours in classes, ours
    (run_inference,) = [d for name, d in dofns.items()
                        if name.startswith("Embed/RunInference/")
                        and d["handlers"]]
    assert run_inference["handlers"] == [GS_MODEL]
    # The project's code came from the staged sdist, not from the checkout.
    assert report["modules"]
    assert all(path.startswith(str(sdist_root))
               for path in report["modules"].values()), report["modules"]


def test_custom_container_gpu_and_worker_pool(container_job):
    staged = container_job.staged()
    assert container_job.container_image() == IMAGE
    assert "workflow.tar.gz" not in staged  # the image has the project
    env = container_job.worker_environment()
    (pool,) = env.worker_pools
    assert pool.machine_type == "n1-standard-8"
    assert pool.autoscaling_settings.max_num_workers == 4
    assert pool.worker_harness_container_image == IMAGE
    assert [i.container_image for i in pool.sdk_harness_container_images] \
        == [IMAGE]
    assert "no_use_multiple_sdk_containers" in env.experiments
    assert "use_multiple_sdk_containers" not in env.experiments
    assert GPU_OPTION in env.service_options
    sdk_options = env.sdk_pipeline_options["options"]
    assert sdk_options["sdk_container_image"] == IMAGE


def test_default_job_runs_one_sdk_process_per_vcpu(setup_file_job):
    """Without the experiment Dataflow starts one SDK process per vCPU, each
    with its own model copy (see the README's memory arithmetic)."""
    env = setup_file_job.worker_environment()
    assert "use_multiple_sdk_containers" in env.experiments


def _dockerfile(path: Path) -> list[str]:
    """Instructions of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def _arg_defaults(lines: list[str]) -> dict[str, str]:
    """``ARG NAME=default`` lines as a dict."""
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", "\n".join(lines), re.M))


def test_worker_dockerfile_matches_the_project():
    """Docker cannot run here: check what can be checked without it."""
    lines = _dockerfile(ROOT / "Dockerfile")
    args = _arg_defaults(lines)
    assert args["BEAM_VERSION"] == BEAM_VERSION
    assert args["PYTHON_VERSION"] == PY
    pins = dict(r.split("==") for r in _setup_list("REQUIRED") if "==" in r)
    assert args["TF_VERSION"] == pins["tensorflow"]
    assert pins["apache-beam[gcp]"] == BEAM_VERSION
    assert any(line.startswith("FROM apache/beam_python${PYTHON_VERSION}_sdk:"
                               "${BEAM_VERSION}") for line in lines)
    assert lines[-1] == 'ENTRYPOINT ["/opt/apache/beam/boot"]'
    for line in lines:
        if line.startswith("COPY") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
        if line.startswith("RUN") and "pip install" in line:
            assert "-c constraints.txt" in line
    packages = {"pipeline", "transforms", "model"}
    copied = {line.split()[1] for line in lines if line.startswith("COPY")}
    assert packages <= copied
    assert "and-cuda" in " ".join(lines)  # the GPU variant


def test_flex_dockerfile_uses_the_worker_image_and_our_launcher():
    lines = _dockerfile(ROOT / "dataflow" / "Dockerfile.flex")
    env = " ".join(line for line in lines if line.startswith("ENV"))
    py_file = re.search(r"FLEX_TEMPLATE_PYTHON_PY_FILE=(\S+)", env).group(1)
    copies = [line.split() for line in lines
              if line.startswith("COPY") and "--from" not in line]
    assert any(c[-1] == py_file and (ROOT / c[1]).is_file() for c in copies)
    assert "FROM ${WORKER_IMAGE}" in lines
    assert f"python{PY.replace('.', '')}-template-launcher-base" in \
        _arg_defaults(lines)["LAUNCHER_IMAGE"]
    assert lines[-1] == 'ENTRYPOINT ["/opt/apache/beam/boot"]'


@pytest.mark.parametrize("flags, message", [
    ([], "needs --model"),
    (["--model", "/local/bert"], "--model /local/bert"),
])
def test_dataflow_refuses_paths_workers_cannot_read(corpus, flags, message):
    submitting = [f for f in DATAFLOW if f not in ("--dry_run", "True")]
    options = PipelineOptions(submitting + ["--input", str(corpus),
                                            "--output", "gs://bucket/out/emb",
                                            *flags])
    with pytest.raises(UsageError, match=message):
        resolve_job(options.view_as(EmbedOptions))
