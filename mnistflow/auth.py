"""API keys and logins, the client's side: requests to the tracking server carry `X-Api-Key`, and no
request to another host carries the key or the login.

MLflow prepares every request of its client in one place (mlflow.utils.rest_utils.http_request),
whatever it is for: the tracking server, or an artifact or model URI a step was given
(`http://elsewhere/…`). It adds the login (MLFLOW_TRACKING_USERNAME/PASSWORD, or a token) to each,
then hands the request, with its final URL, to the request auth plugin MLFLOW_TRACKING_AUTH names:
ours (`TrackingServerAuthProvider`, an `mlflow.request_auth_provider` entry point in pyproject.toml,
made the default by cli_guard.py). It adds the key from AM_SC_API_KEY to requests for the tracking
(or registry) server, and takes the login off requests for any other origin (scheme, host and port),
also where that server redirects one. The server's side, which maps a key to its user, is
mnistflow/keystore.py.

The key and the login only go where no one on the way can read them: over HTTPS, or plain HTTP to
the addresses a tracking server on this machine listens on (localhost, 127.0.0.1, ::1), unless
MNISTFLOW_ALLOW_PLAIN_HTTP_KEY=true says the network in between is trusted. Other loopback
addresses (127.0.0.2, ...) need that opt-in too: nothing of this project listens there.
"""
import ipaddress
import os
import urllib.parse

import requests

from mnistflow import cli_guard
from mnistflow.config import LOOPBACK_HOSTS  # where the key may go over plain HTTP
from mnistflow.errors import AccessError, StepError

KEY_ENV = "AM_SC_API_KEY"
HEADER = "X-Api-Key"
PLAIN_HTTP_ENV = "MNISTFLOW_ALLOW_PLAIN_HTTP_KEY"
AUTH_ENV = "MLFLOW_TRACKING_AUTH"
# What must not travel in clear, and how an error names it: the key, then MLflow's login.
SECRETS = ((KEY_ENV, "the API key"), ("MLFLOW_TRACKING_PASSWORD", "the password"),
           ("MLFLOW_TRACKING_TOKEN", "the token"))
CERT_ENVS = ("MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_CLIENT_CERT_PATH")
DEFAULT_PORTS = {"http": 80, "https": 443}


class TrackingServerAuthProvider:
    """MLflow's RequestAuthProvider: MLflow calls its get_name and get_auth, and checks no base class;
    subclassing it would load MLflow with this module, which the server scripts use without it."""

    def __init__(self):
        self._access_checked = False

    def get_name(self) -> str:
        return cli_guard.AUTH_PLUGIN

    def get_auth(self) -> "TrackingServerOnly":
        if not self._access_checked and cli_guard.is_mlflow_run_command():
            # `mlflow run` would fail later with a traceback, or retry for minutes: check first.
            # Marked before the check, whose own requests come back here.
            self._access_checked = True
            try:
                check_access()
            except StepError as exc:
                cli_guard.exit_with(exc)
        return TrackingServerOnly({origin(uri) for uri in server_uris()} - {None})


class TrackingServerOnly(requests.auth.AuthBase):
    """Called by `requests` on each prepared request: the key and the login for `origins` only."""

    def __init__(self, origins: set[tuple]):
        self.origins = origins

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        if origin(request.url) not in self.origins or not secrets_may_travel_to(request.url):
            request.headers.pop("Authorization", None)  # another host, or in clear over a network
        elif os.environ.get(KEY_ENV):
            request.headers[HEADER] = os.environ[KEY_ENV]
        request.register_hook("response", self.keep_key_from_other_origins)
        return request

    def keep_key_from_other_origins(self, response: requests.Response, **_) -> requests.Response:
        # `requests` follows a redirect with a copy of this request: its own rule drops the login
        # when the origin changes, not the key.
        target = urllib.parse.urljoin(response.url, response.headers.get("location", ""))
        if response.is_redirect and origin(target) not in self.origins:
            response.request.headers.pop(HEADER, None)
        return response


def origin(url: str) -> tuple | None:
    """(scheme, host, port) as URLs are compared: scheme and host in any case, a host name's
    trailing dot, an IPv6 address in any spelling, a default port given or not. None if not http(s)."""
    try:
        parts = urllib.parse.urlsplit(url)
        scheme, host, port = parts.scheme.lower(), (parts.hostname or "").rstrip("."), parts.port
    except ValueError:  # a port that is not a number
        return None
    if scheme not in DEFAULT_PORTS:
        return None
    try:
        host = ipaddress.ip_address(host).compressed
    except ValueError:
        pass  # a name, already in lower case
    return scheme, host, port or DEFAULT_PORTS[scheme]


def server_uris() -> list[str]:
    import mlflow  # here, not at the top: the server scripts and reading flags need no MLflow

    return [mlflow.get_tracking_uri(), mlflow.get_registry_uri()]


def secrets_may_travel_to(url: str) -> bool:
    server = origin(url)
    return server is not None and (server[0] == "https" or server[1] in LOOPBACK_HOSTS
                                   or os.environ.get(PLAIN_HTTP_ENV, "").lower() == "true")


def plain_http_destinations() -> list[str]:
    """The tracking and registry URIs the key or the login must not be sent to."""
    return sorted({uri for uri in server_uris() if is_http(uri) and not secrets_may_travel_to(uri)})


def is_http(uri: str) -> bool:
    """Whether `uri` is http:// or https://, in any case: a tracking server's."""
    return origin(uri) is not None


def check_access() -> None:
    """Stop before any work when the tracking URI names no store MLflow knows, the API key would
    travel unencrypted or not at all, the tracking server cannot be reached or answers with an
    error, its TLS certificate is not trusted, or it refuses this client (no key, a wrong or revoked
    key), with one line that says what to set. Local stores need no request."""
    import mlflow
    from mlflow.exceptions import MlflowException

    cli_guard.check_store_uri(mlflow.get_tracking_uri(), "tracking")
    cli_guard.check_store_uri(mlflow.get_registry_uri(), "registry")
    check_secrets_go_only_to_the_server()
    uri = mlflow.get_tracking_uri()
    if not is_http(uri):
        return
    check_reachable(uri)
    try:
        mlflow.MlflowClient().search_experiments(max_results=1)
    except MlflowException as exc:
        status = exc.get_http_status_code()
        if status not in (401, 403):
            raise server_error(uri, status) from None
        if "Invalid Host header" in str(exc):  # MLflow's guard against DNS rebinding, not a key's fault
            host = urllib.parse.urlsplit(uri).netloc
            raise AccessError(f"the tracking server {uri} refused the name {host} (HTTP 403, its check of the Host "
                              f"header): start it with --allowed-hosts {host}, or MLFLOW_SERVER_ALLOWED_HOSTS") from None
        fix = (f"the key in {KEY_ENV} is unknown, revoked or lacks permission; ask the server's admin"
               if os.environ.get(KEY_ENV) else f"set {KEY_ENV} to your API key")
        raise AccessError(f"the tracking server {uri} refused this client (HTTP {status}): {fix}") from None


def check_secrets_go_only_to_the_server() -> None:
    given = [(variable, what) for variable, what in SECRETS if os.environ.get(variable)]
    blocked = plain_http_destinations()
    if given and blocked:
        variable, what = given[0]
        raise AccessError(f"{what} in {variable} would travel unencrypted to {blocked[0]}, which is not "
                          f"localhost, 127.0.0.1 or ::1: use an https:// URI, or set {PLAIN_HTTP_ENV}=true "
                          "if the network is trusted")
    chosen = os.environ.get(AUTH_ENV, cli_guard.AUTH_PLUGIN)
    if os.environ.get(KEY_ENV) and chosen != cli_guard.AUTH_PLUGIN:
        raise AccessError(f"{AUTH_ENV}={chosen} replaces mnistflow's request auth, which sends the API key in "
                          f"{KEY_ENV}: unset {AUTH_ENV}")


def check_reachable(uri: str) -> None:
    # One plain request first: MLflow's client retries a failed connection for minutes, and a
    # certificate it cannot verify is exactly such a failure.
    if origin(uri)[0] == "https":
        check_cert_files()
    ca = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
    insecure = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true"
    try:
        health = requests.get(f"{uri}/health", timeout=30, verify=False if insecure else ca or True)
    except requests.exceptions.SSLError:
        trusted = f"the CA in MLFLOW_TRACKING_SERVER_CERT_PATH ({ca})" if ca else "this machine's CAs"
        fix = "set MLFLOW_TRACKING_SERVER_CERT_PATH to the CA certificate the server's admin gives you"
        raise AccessError(f"the TLS certificate of {uri} could not be verified with {trusted}: {fix}") from None
    except requests.exceptions.RequestException as exc:
        raise AccessError(f"cannot reach the tracking server {uri}: {type(exc).__name__}; is it running, "
                          "and is MLFLOW_TRACKING_URI right?") from None
    if health.status_code >= 500:  # a proxy without its server, or a server in trouble
        raise server_error(uri, health.status_code)


def check_cert_files() -> None:
    # `requests` reports a missing one only when it connects, with a traceback through MLflow's.
    for name in CERT_ENVS:
        path = os.environ.get(name)
        if path and not os.path.exists(path):
            raise AccessError(f"{name} names no file: {path!r}; set it to the certificate file the server's "
                              "admin gives you, or unset it")


def server_error(uri: str, status: int) -> AccessError:
    return AccessError(f"the tracking server {uri} failed to answer (HTTP {status}); try again later, "
                       "or tell the server's admin")
