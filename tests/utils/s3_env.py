"""A real S3-compatible server (moto in server mode) on 127.0.0.1 for the object-storage tests.

Everything that touches ``s3://`` through tensorflow-io runs in a *subprocess*: after S3 use
the interpreter aborts at shutdown (tf_agg3d/utils/process.py), and the test process must not.
The server itself and boto3 (pure Python) run in the test process.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's ThreadedMotoServer plus the environment tensorflow-io's S3 filesystem reads."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        # One log line per request from werkzeug would bury the test output.
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.env = {
            "S3_ENDPOINT": self.endpoint,
            "S3_USE_HTTPS": "0",
            "S3_VERIFY_SSL": "0",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            # tensorflow-io logs every S3 call at INFO; errors are enough here.
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "AWS_LOG_LEVEL": "0",
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def upload_tree(
        self, local_dir: str, bucket: str, prefix: str = "", markers: bool = False
    ) -> int:
        """Uploads every file below `local_dir` to ``s3://bucket/prefix/...``; returns the count.

        Args:
          prefix: the key prefix; "" uploads to the bucket root.
          markers: also create the zero-byte "directory marker" objects (``prefix/``,
            ``prefix/sub/``) that consoles and some sync tools write; not counted.
        """
        client, count = self.client(), 0
        prefix = prefix.strip("/")
        for folder, _, files in os.walk(local_dir):
            rel_folder = os.path.relpath(folder, local_dir).replace(os.sep, "/")
            if markers:
                parts = [p for p in (prefix, "" if rel_folder == "." else rel_folder) if p]
                if parts:
                    client.put_object(Bucket=bucket, Key="/".join(parts) + "/", Body=b"")
            for name in files:
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
                key = f"{prefix}/{rel}" if prefix else rel
                client.upload_file(path, bucket, key)
                count += 1
        return count

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def get(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def run(self, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
        """Runs ``python ARGS`` in the repository with the S3 environment."""
        env = dict(os.environ, **self.env)
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        return subprocess.run(
            [sys.executable, *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stop(self) -> None:
        self._server.stop()
