"""An S3-compatible server on 127.0.0.1 for the benchmarks (moto in server mode), with a bucket
made and the credentials a node store needs. moto keeps objects in memory and copies a whole
object for each ranged GET, so what it serves measures moto more than S3."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any


@dataclass
class LocalS3:
    server: Any  # moto.server.ThreadedMotoServer
    port: int
    config: Any  # ember.store.remote.RemoteConfig
    remote: Any  # ember.store.remote.RemoteStore

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop()


def start_local_s3(bucket: str = "bench") -> LocalS3:
    from moto.server import ThreadedMotoServer

    from ember.store.remote import RemoteConfig, RemoteStore

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = int(server.get_host_and_port()[1])
    config = RemoteConfig(
        endpoint_url=f"http://127.0.0.1:{port}", access_key_id="bench",
        secret_access_key="bench", region="us-east-1",
    )  # fmt: skip
    remote = RemoteStore(config)
    remote.ensure_bucket(bucket)
    return LocalS3(server, port, config, remote)
