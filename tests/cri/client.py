"""A CRI client over containerd's socket, as kubelet holds one: both services on one channel."""

from __future__ import annotations

import time

import grpc

try:
    from tests.cri import api_pb2, api_pb2_grpc
except ImportError as e:  # generated code, not in git
    raise ImportError("the CRI client is generated at install time: run tools/install.sh "
                      "(or .venv/bin/python tests/cri/build.py)") from e

__all__ = ["CriClient", "api_pb2"]


class CriClient:
    """``runtime`` (RuntimeService) and ``images`` (ImageService) stubs on a unix socket."""

    def __init__(self, socket_path: str):
        self.channel = grpc.insecure_channel(f"unix://{socket_path}")
        self.runtime = api_pb2_grpc.RuntimeServiceStub(self.channel)
        self.images = api_pb2_grpc.ImageServiceStub(self.channel)

    def conditions(self, timeout: float = 10.0) -> dict[str, api_pb2.RuntimeCondition]:
        status = self.runtime.Status(api_pb2.StatusRequest(), timeout=timeout).status
        return {c.type: c for c in status.conditions}

    def wait_runtime_ready(self, timeout: float) -> None:
        """Return once the CRI plugin answers Status with RuntimeReady (it initialises after
        containerd's own API is up; until then calls fail)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                ready = self.conditions(timeout=5.0).get("RuntimeReady")
                if ready is not None and ready.status:
                    return
                problem = f"RuntimeReady: {ready}"
            except grpc.RpcError as e:
                problem = f"{e.code().name}: {e.details()}"
            if time.monotonic() > deadline:
                raise TimeoutError(f"the CRI plugin is not ready: {problem}")
            time.sleep(0.1)

    def close(self) -> None:
        self.channel.close()
