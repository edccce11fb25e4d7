"""API keys, the client's side: every request to a tracking server carries `X-Api-Key`.

MLflow calls `ApiKeyHeaderProvider` before every request to a tracking server (it is registered
as an `mlflow.request_header_provider` entry point in pyproject.toml), so exporting AM_SC_API_KEY
is all a user does. The server's side, which maps a key to its user, is mnistflow/keystore.py.
"""
import os

import mlflow
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking.request_header.abstract_request_header_provider import RequestHeaderProvider

from mnistflow.config import ConfigError

KEY_ENV = "AM_SC_API_KEY"
HEADER = "X-Api-Key"


class ApiKeyHeaderProvider(RequestHeaderProvider):
    def in_context(self) -> bool:
        return bool(os.environ.get(KEY_ENV))

    def request_headers(self) -> dict:
        return {HEADER: os.environ[KEY_ENV]}


def check_access() -> None:
    """Stop before any work when the tracking server cannot be reached, its TLS certificate is
    not trusted, or it refuses this client (no key, a wrong or revoked key), with one line that
    says what to set. Local stores need no check."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    check_reachable(uri)
    try:
        mlflow.MlflowClient().search_experiments(max_results=1)
    except MlflowException as exc:
        status = exc.get_http_status_code()
        if status not in (401, 403):
            raise
        fix = (f"the key in {KEY_ENV} is unknown, revoked or lacks permission; ask the server's admin"
               if os.environ.get(KEY_ENV) else f"set {KEY_ENV} to your API key")
        raise ConfigError(f"the tracking server {uri} refused this client (HTTP {status}): {fix}") from None


def check_reachable(uri: str) -> None:
    # One plain request first: MLflow's client retries a failed connection for minutes, and a
    # certificate it cannot verify is exactly such a failure.
    ca = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
    insecure = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true"
    try:
        requests.get(f"{uri}/health", timeout=30, verify=False if insecure else ca or True)
    except requests.exceptions.SSLError:
        trusted = f"the CA in MLFLOW_TRACKING_SERVER_CERT_PATH ({ca})" if ca else "this machine's CAs"
        raise ConfigError(f"the TLS certificate of {uri} could not be verified with {trusted}: set "
                          "MLFLOW_TRACKING_SERVER_CERT_PATH to the CA certificate the server's admin gives you") from None
    except requests.exceptions.RequestException as exc:
        raise ConfigError(f"cannot reach the tracking server {uri}: {type(exc).__name__}; is it running, "
                          "and is MLFLOW_TRACKING_URI right?") from None
