"""API keys, the server's side: a key store, and the check that maps a request's key to its user.

`authenticate` is the `authorization_function` of `mlflow server --app-name basic-auth` (see
serverFolder/); a known key becomes its user, whose per-experiment permissions then apply to
every route. The client's side, which sends the key, is mnistflow/auth.py.
"""
import hashlib
import os
import secrets
import sqlite3
import time

from mnistflow.auth import HEADER, KEY_ENV

KEYS_DB_ENV = "MNISTFLOW_API_KEYS_DB"  # the server's key store (a SQLite file)


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
