"""Launch check: an EXTERNAL worker pool must start SDK workers that connect.

With ``--environment_type EXTERNAL`` (the PortableRunner, Flink, Spark) the
runner asks a worker pool (``--environment_config host:port``) to start an
SDK worker, which then connects back to the runner's control service.  Beam
waits for that connection without a limit: a pool that is not there fails
with a long gRPC traceback, and a pool whose ``python`` cannot run a Beam
worker (it starts ``python`` from its own ``PATH``) leaves the launcher
waiting silently forever.  ``check_worker_pool`` asks the pool for one
worker the way the runner does, pointed at a control service of its own
that ends the worker's session as soon as it connects, and raises
``WorkerPoolUnavailable`` (one line) when no worker has connected within
``--worker_connect_timeout`` seconds.

The check runs only for the PortableRunner with its job service on this
machine (an embedded one, or one at a local address): the pool's address
is then the same from here as from the runner.  (A Flink or Spark cluster
reaches its pools from its own machines, which this launcher cannot
check.)
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import socket
import threading
import time
import uuid
from typing import Any, Iterator, Optional

from pipeline.cli import UsageError

EXTERNAL = "EXTERNAL"
_LOCAL_HOSTS = {"localhost", "embed", "", "ip6-localhost"}


class WorkerPoolUnavailable(UsageError):
    """The worker pool is not there, or no worker it started connected."""


def pool_address(environment_type: Optional[str],
                 environment_config: Optional[str],
                 environment_options: Optional[list[str]] = None
                 ) -> Optional[str]:
    """The worker pool's ``host:port`` of an EXTERNAL environment, as Beam
    reads it (``--environment_config``, plain or JSON ``{"url": ...}``, or
    ``--environment_options external_service_address=...``); None for other
    environments."""
    if (environment_type or "").upper() != EXTERNAL:
        return None
    config = (environment_config or "").strip()
    if config.startswith("{"):
        try:
            return str(json.loads(config).get("url") or "") or None
        except ValueError:
            return None
    if config:
        return config
    for option in environment_options or []:
        name, _, value = option.partition("=")
        if name == "external_service_address" and value:
            return value
    return None


def _host(address: str) -> str:
    """``host`` of ``host:port``, ``[v6]:port`` or a ``scheme://`` URL."""
    address = address.split("://", 1)[-1]
    if address.startswith("["):
        return address[1:address.find("]")]
    return address.rsplit(":", 1)[0] if ":" in address else address


def is_local(address: Optional[str]) -> bool:
    """Whether a job endpoint or pool address names this machine."""
    if address is None:
        return True
    host = _host(address).lower()
    if host in _LOCAL_HOSTS or host in (socket.gethostname().lower(),
                                        socket.getfqdn().lower()):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _control_service(connected: threading.Event) -> tuple[Any, int]:
    """A gRPC server whose control service ends each worker's session at
    once, setting ``connected``; returns the started server and its port."""
    import grpc
    from apache_beam.portability.api import beam_fn_api_pb2_grpc

    class EndAtOnce(beam_fn_api_pb2_grpc.BeamFnControlServicer):
        """The worker's Control stream: noted, then closed (it exits)."""

        def Control(self, request_iterator: Any, context: Any
                    ) -> Iterator[Any]:  # noqa: N802 (gRPC's name)
            del request_iterator, context
            connected.set()
            return iter(())

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
    beam_fn_api_pb2_grpc.add_BeamFnControlServicer_to_server(EndAtOnce(),
                                                              server)
    port = server.add_insecure_port("[::]:0")
    server.start()
    return server, port


def check_worker_pool(address: str, timeout: float) -> float:
    """Asks the pool at ``address`` for one SDK worker and waits until it
    connects; returns the seconds that took.  Raises
    ``WorkerPoolUnavailable`` when the pool does not answer, refuses, or
    no worker connects within ``timeout`` seconds."""
    import grpc
    from apache_beam.portability.api import (beam_fn_api_pb2,
                                             beam_fn_api_pb2_grpc,
                                             endpoints_pb2)
    started = time.monotonic()
    connected = threading.Event()
    server, port = _control_service(connected)
    channel = grpc.insecure_channel(address)
    worker_id = f"launch-check-{uuid.uuid4().hex[:8]}"
    stub = beam_fn_api_pb2_grpc.BeamFnExternalWorkerPoolStub(channel)
    try:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError as err:
            raise WorkerPoolUnavailable(
                f"no SDK worker pool answers at {address} "
                f"(--environment_config) within {timeout:g} s: start one "
                "(see docs/runners.md) or correct the address") from err
        here = endpoints_pb2.ApiServiceDescriptor(
            url=f"{'localhost' if is_local(address) else socket.getfqdn()}"
                f":{port}")
        left = max(timeout - (time.monotonic() - started), 1.0)
        try:
            response = stub.StartWorker(beam_fn_api_pb2.StartWorkerRequest(
                worker_id=worker_id, control_endpoint=here,
                logging_endpoint=here, artifact_endpoint=here,
                provision_endpoint=here), timeout=left)
        except grpc.RpcError as err:
            raise WorkerPoolUnavailable(
                f"the worker pool at {address} did not start a worker: "
                f"{err.code().name}") from err
        if response.error:
            raise WorkerPoolUnavailable(
                f"the worker pool at {address} could not start a worker: "
                + " ".join(response.error.split())[:300])
        if not connected.wait(max(timeout - (time.monotonic() - started),
                                  0.0)):
            raise WorkerPoolUnavailable(
                f"the worker pool at {address} started no SDK worker that "
                f"connected within {timeout:g} s (--worker_connect_timeout): "
                "it starts workers as `python` from its own PATH, which must "
                "have apache-beam and this project; see docs/runners.md")
        return time.monotonic() - started
    finally:
        try:
            stub.StopWorker(beam_fn_api_pb2.StopWorkerRequest(
                worker_id=worker_id), timeout=5)
        except Exception:  # pylint: disable=broad-except
            pass  # the worker ends by itself when its session does
        channel.close()
        server.stop(0)


def check_environment(options: Any, timeout: float) -> Optional[float]:
    """``check_worker_pool`` for a job's ``PipelineOptions`` when it runs on
    the PortableRunner with an EXTERNAL environment and a job service on
    this machine, and ``timeout`` is not 0; returns the seconds it took, or
    None when it did not apply."""
    from apache_beam.options.pipeline_options import (PortableOptions,
                                                      StandardOptions)
    runner = str(options.view_as(StandardOptions).runner or "")
    portable = options.view_as(PortableOptions)
    address = pool_address(portable.environment_type,
                           portable.environment_config,
                           portable.environment_options)
    if (not timeout or address is None
            or not runner.lower().endswith("portablerunner")
            or not is_local(portable.job_endpoint)):
        return None
    return check_worker_pool(address, timeout)
