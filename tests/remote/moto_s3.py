"""The S3 endpoint's address and credentials, shared by the fixtures and the tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlp_testkit import require


@dataclass(frozen=True)
class S3:
    """Where the server listens and the credentials of the one IAM user allowed to use it."""

    endpoint: str
    key: str
    secret: str

    @property
    def options(self) -> dict[str, Any]:
        """storage_options exactly as a user passes them for a non-AWS endpoint."""
        return {"key": self.key, "secret": self.secret, "endpoint_url": self.endpoint}

    @property
    def env(self) -> dict[str, str]:
        """The same, as the environment variables boto reads (for the CLI and child processes)."""
        return {"AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self, **overrides: str) -> Any:
        boto3 = require("boto3")
        creds = {"aws_access_key_id": self.key, "aws_secret_access_key": self.secret, **overrides}
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", **creds)
