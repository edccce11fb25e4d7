"""API keys, the client's side: requests to a tracking server carry `X-Api-Key`.

MLflow calls `ApiKeyHeaderProvider` before every request to a tracking server (it is registered
as an `mlflow.request_header_provider` entry point in pyproject.toml), so exporting AM_SC_API_KEY
is all a user does. The server's side, which maps a key to its user, is mnistflow/keystore.py.

The key only goes where no one on the way can read it: over HTTPS, or plain HTTP to the addresses
a tracking server on this machine listens on (localhost, 127.0.0.1, ::1), unless
MNISTFLOW_ALLOW_PLAIN_HTTP_KEY=true says the network in between is trusted. Other loopback
addresses (127.0.0.2, ...) need that opt-in too: nothing of this project listens there.
"""
import os
import urllib.parse

import mlflow
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking.request_header.abstract_request_header_provider import RequestHeaderProvider

from mnistflow import cli_guard
from mnistflow.errors import AccessError

KEY_ENV = "AM_SC_API_KEY"
HEADER = "X-Api-Key"
PLAIN_HTTP_ENV = "MNISTFLOW_ALLOW_PLAIN_HTTP_KEY"
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")  # where the key may go over plain HTTP


class ApiKeyHeaderProvider(RequestHeaderProvider):
    def __init__(self):
        self._access_checked = False

    def in_context(self) -> bool:
        if not self._access_checked and cli_guard.is_mlflow_run_command():
            # `mlflow run` would fail later with a traceback, or retry for minutes: check first.
            # Marked before the check, whose own requests come back here.
            self._access_checked = True
            try:
                check_access()
            except AccessError as exc:
                cli_guard.exit_with(exc)
        return bool(os.environ.get(KEY_ENV)) and not plain_http_destinations()

    def request_headers(self) -> dict:
        return {HEADER: os.environ[KEY_ENV]} if self.in_context() else {}


def plain_http_destinations() -> list[str]:
    """The tracking and registry URIs a key must not be sent to (the provider is not told which
    of them a request goes to)."""
    if os.environ.get(PLAIN_HTTP_ENV, "").lower() == "true":
        return []
    uris = {mlflow.get_tracking_uri(), mlflow.get_registry_uri()}
    return sorted(uri for uri in uris if uri and uri.startswith("http://") and not on_this_machine(uri))


def on_this_machine(uri: str) -> bool:
    return (urllib.parse.urlsplit(uri).hostname or "") in LOCAL_HOSTS


def check_access() -> None:
    """Stop before any work when the API key would travel unencrypted, the tracking server cannot
    be reached or answers with an error, its TLS certificate is not trusted, or it refuses this
    client (no key, a wrong or revoked key), with one line that says what to set. Local stores
    need no check."""
    blocked = plain_http_destinations() if os.environ.get(KEY_ENV) else []
    if blocked:
        raise AccessError(f"the API key in {KEY_ENV} would travel unencrypted to {blocked[0]}, which is not "
                          f"localhost, 127.0.0.1 or ::1: use an https:// URI, or set {PLAIN_HTTP_ENV}=true "
                          "if the network is trusted")
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    check_reachable(uri)
    try:
        mlflow.MlflowClient().search_experiments(max_results=1)
    except MlflowException as exc:
        status = exc.get_http_status_code()
        if status not in (401, 403):
            raise server_error(uri, status) from None
        fix = (f"the key in {KEY_ENV} is unknown, revoked or lacks permission; ask the server's admin"
               if os.environ.get(KEY_ENV) else f"set {KEY_ENV} to your API key")
        raise AccessError(f"the tracking server {uri} refused this client (HTTP {status}): {fix}") from None


def check_reachable(uri: str) -> None:
    # One plain request first: MLflow's client retries a failed connection for minutes, and a
    # certificate it cannot verify is exactly such a failure.
    ca = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
    insecure = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true"
    try:
        health = requests.get(f"{uri}/health", timeout=30, verify=False if insecure else ca or True)
    except requests.exceptions.SSLError:
        trusted = f"the CA in MLFLOW_TRACKING_SERVER_CERT_PATH ({ca})" if ca else "this machine's CAs"
        raise AccessError(f"the TLS certificate of {uri} could not be verified with {trusted}: set "
                          "MLFLOW_TRACKING_SERVER_CERT_PATH to the CA certificate the server's admin gives you") from None
    except requests.exceptions.RequestException as exc:
        raise AccessError(f"cannot reach the tracking server {uri}: {type(exc).__name__}; is it running, "
                          "and is MLFLOW_TRACKING_URI right?") from None
    if health.status_code >= 500:  # a proxy without its server, or a server in trouble
        raise server_error(uri, health.status_code)


def server_error(uri: str, status: int) -> AccessError:
    return AccessError(f"the tracking server {uri} failed to answer (HTTP {status}); try again later, "
                       "or tell the server's admin")
