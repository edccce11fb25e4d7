"""API keys, the science-cloud way: the client sends `X-Api-Key`, the server maps it to a user.

Client: MLflow calls `ApiKeyHeaderProvider` before every request to a tracking server (it is
registered as an `mlflow.request_header_provider` entry point in pyproject.toml), so exporting
AM_SC_API_KEY is all a user does. Server: `authenticate` is the `authorization_function` of
`mlflow server --app-name basic-auth` (see serverFolder/); a known key becomes its user, whose
per-experiment permissions then apply to every route.
"""
import hashlib
import os
import secrets
import sqlite3
import time

import mlflow
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking.request_header.abstract_request_header_provider import RequestHeaderProvider

from mnistflow.config import ConfigError

KEY_ENV = "AM_SC_API_KEY"
HEADER = "X-Api-Key"
KEYS_DB_ENV = "MNISTFLOW_API_KEYS_DB"  # the server's key store (a SQLite file)


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


# --- the server's key store -------------------------------------------------------------------
# Only a SHA-256 of each key is stored. Keys are 32 random bytes, so a fast hash is enough: there
# is no password-sized search space for a slow hash to protect.

def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE IF NOT EXISTS api_keys (key_hash TEXT PRIMARY KEY, username TEXT NOT NULL, "
               "created REAL NOT NULL, revoked REAL)")
    return db


def issue_key(path: str, username: str) -> str:
    """A new key for `username`; shown once, stored only as its hash."""
    key = secrets.token_urlsafe(32)
    with _connect(path) as db:
        db.execute("INSERT INTO api_keys VALUES (?, ?, ?, NULL)", (_hash(key), username, time.time()))
    return key


def revoke_keys(path: str, username: str) -> int:
    """Revoke every active key of `username`; returns how many."""
    with _connect(path) as db:
        return db.execute("UPDATE api_keys SET revoked = ? WHERE username = ? AND revoked IS NULL",
                          (time.time(), username)).rowcount


def list_keys(path: str) -> list[tuple]:
    """(username, key hash prefix, created, revoked) for every key ever issued."""
    with _connect(path) as db:
        return db.execute("SELECT username, substr(key_hash, 1, 12), created, revoked FROM api_keys "
                          "ORDER BY created").fetchall()


def user_of(path: str, key: str) -> str | None:
    with _connect(path) as db:
        row = db.execute("SELECT username FROM api_keys WHERE key_hash = ? AND revoked IS NULL",
                         (_hash(key),)).fetchone()
    return row[0] if row else None


def authenticate():
    """The server's authorization_function: X-Api-Key first, else the auth app's basic auth
    (which the admin scripts use). A missing or unknown key gets 401 and nothing is run."""
    from flask import Response, request
    from mlflow.server.auth import authenticate_request_basic_auth
    from werkzeug.datastructures import Authorization

    key = request.headers.get(HEADER)
    if key is None:
        if request.authorization is not None:
            return authenticate_request_basic_auth()
        return Response(f"missing {HEADER} header: set {KEY_ENV}", 401)
    username = user_of(os.environ[KEYS_DB_ENV], key)
    if username is None:
        return Response(f"unknown or revoked API key ({HEADER})", 401)
    return Authorization("basic", {"username": username, "password": ""})
