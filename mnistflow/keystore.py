"""API keys, the server's side: a key store, and the check that maps a request's key to its user.

`authenticate` is the `authorization_function` of `mlflow server --app-name basic-auth` (see
serverFolder/); a known key becomes its user, whose per-experiment permissions then apply to
every route, and a run the request creates records that user, whatever the client claimed. The
client's side, which sends the key, is mnistflow/auth.py.
"""
import hashlib
import os
import secrets
import sqlite3
import time
import urllib.parse

from mnistflow.auth import HEADER, KEY_ENV

KEYS_DB_ENV = "MNISTFLOW_API_KEYS_DB"  # the server's key store (a SQLite file)
RUN_USER_TAG = "mlflow.user"


MISSING_KEY = f"missing {HEADER} header: set {KEY_ENV}"
BAD_KEY = f"unknown, revoked or expired API key ({HEADER})"


class KeyStoreError(Exception):
    """A key store that cannot be used as asked; the message is one line for the admin."""


# Only a SHA-256 of each key is stored. Keys are 32 random bytes, so a fast hash is enough: there
# is no password-sized search space for a slow hash to protect.

def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_store(path: str) -> None:
    """Create the key store at `path` (owner-only) unless it exists; shared_server.py does this at start."""
    if os.path.exists(path):
        check_store(path)  # another file is neither made owner-only nor given a table
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    os.chmod(path, 0o600)  # a store made by an older version may be readable by others
    with _connect(path):
        pass


def check_store(path: str) -> None:
    """KeyStoreError unless `path` is a key store file: an SQLite database with no table but api_keys
    (a mistyped path never makes a new, empty one, nor adds the table to another database)."""
    if not os.path.isfile(path):
        raise KeyStoreError(f"no key store at {path}; shared_server.py creates it "
                            f"(<root>/api_keys.db, or ${KEYS_DB_ENV})")
    db = sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=ro", uri=True)
    try:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.OperationalError as exc:  # unreadable, or locked for longer than sqlite3's wait
        raise KeyStoreError(f"cannot read the key store {path}: {exc}") from None
    except sqlite3.DatabaseError:
        raise KeyStoreError(f"{path} is not a key store: it is not an SQLite database") from None
    finally:
        db.close()
    others = sorted(name for name in tables - {"api_keys"} if not name.startswith("sqlite_"))
    if others:
        raise KeyStoreError(f"{path} is not a key store: it is another SQLite database (tables "
                            f"{', '.join(others[:3])}{', ...' if len(others) > 3 else ''})")


def _connect(path: str) -> sqlite3.Connection:
    check_store(path)
    db = sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=rw", uri=True)
    db.execute("CREATE TABLE IF NOT EXISTS api_keys (key_hash TEXT PRIMARY KEY, username TEXT NOT NULL, "
               "created REAL NOT NULL, revoked REAL)")
    if "expires" not in {row[1] for row in db.execute("PRAGMA table_info(api_keys)")}:
        db.execute("ALTER TABLE api_keys ADD COLUMN expires REAL")  # stores made before keys could expire
    return db


def issue_key(path: str, username: str, expires: float | None = None) -> str:
    """A new key for `username`, valid until `expires` (seconds since the epoch; None: until
    revoked); shown once, stored only as its hash."""
    key = secrets.token_urlsafe(32)
    with _connect(path) as db:
        db.execute("INSERT INTO api_keys (key_hash, username, created, revoked, expires) VALUES (?, ?, ?, NULL, ?)",
                   (_hash(key), username, time.time(), expires))
    return key


def user_exists(auth_config: str, username: str) -> bool:
    """Whether the server's user store (the `database_uri` of its basic-auth ini) has `username`."""
    import configparser

    import sqlalchemy

    config = configparser.ConfigParser()  # with interpolation ('%%' is '%'), as MLflow reads it
    try:
        if not config.read(auth_config) or not config.has_option("mlflow", "database_uri"):
            raise KeyStoreError(f"no server auth config at {auth_config}; shared_server.py writes it as "
                                "<root>/basic_auth.ini (or set MLFLOW_AUTH_CONFIG_PATH)")
        uri = config["mlflow"]["database_uri"]
    except configparser.InterpolationError as exc:  # its message would show the value: a password, maybe
        raise KeyStoreError(f"{auth_config}: {exc.option} has a '%' not written '%%' (MLflow reads the file "
                            "with interpolation)") from None
    except (configparser.Error, UnicodeDecodeError) as exc:
        raise KeyStoreError(f"{auth_config} is not an ini file MLflow can read ({type(exc).__name__})") from None
    try:  # their messages would show the URL, password included
        database = sqlalchemy.engine.make_url(uri).database
    except sqlalchemy.exc.ArgumentError:
        raise KeyStoreError(f"{auth_config}: database_uri is not a database URL (dialect://user@host/name)") from None
    if uri.startswith("sqlite:") and not os.path.isfile(database or ""):
        raise KeyStoreError(f"the server's user store {database} does not exist; start shared_server.py first")
    try:
        engine = sqlalchemy.create_engine(uri)
    except (sqlalchemy.exc.NoSuchModuleError, ImportError):  # an unknown dialect, or its driver not installed
        raise KeyStoreError(f"{auth_config}: database_uri names a database this Python has no driver for") from None
    try:
        with engine.connect() as connection:
            return connection.execute(sqlalchemy.text("SELECT 1 FROM users WHERE username = :name"),
                                      {"name": username}).first() is not None
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise KeyStoreError(f"cannot read the server's user store: {type(getattr(exc, 'orig', None) or exc).__name__}") from None
    finally:
        engine.dispose()


def revoke_keys(path: str, username: str) -> int:
    """Revoke every active key of `username`; returns how many."""
    with _connect(path) as db:
        return db.execute("UPDATE api_keys SET revoked = ? WHERE username = ? AND revoked IS NULL",
                          (time.time(), username)).rowcount


def revoke_key(path: str, key_id: str) -> str:
    """Revoke the one key whose id (the hash prefix `list_keys` shows) starts with `key_id`; its user."""
    if len(key_id) < 6 or any(c not in "0123456789abcdef" for c in key_id):
        raise KeyStoreError(f"key id {key_id!r} is not allowed; give 6 or more hex digits of an id from 'list'")
    with _connect(path) as db:
        matches = db.execute("SELECT key_hash, username FROM api_keys WHERE substr(key_hash, 1, ?) = ?",
                             (len(key_id), key_id)).fetchall()
        if len(matches) != 1:
            raise KeyStoreError(f"key id {key_id!r} matches {len(matches)} keys; give one id from 'list'")
        [(key_hash, username)] = matches
        db.execute("UPDATE api_keys SET revoked = ? WHERE key_hash = ? AND revoked IS NULL", (time.time(), key_hash))
    return username


def list_keys(path: str) -> list[tuple]:
    """(username, key id: the hash's first 12 hex digits, created, revoked, expires) for every key ever issued."""
    with _connect(path) as db:
        return db.execute("SELECT username, substr(key_hash, 1, 12), created, revoked, expires FROM api_keys "
                          "ORDER BY created").fetchall()


def user_of(path: str, key: str) -> str | None:
    """The user of an active key: issued, not revoked, not expired."""
    with _connect(path) as db:
        row = db.execute("SELECT username FROM api_keys WHERE key_hash = ? AND revoked IS NULL "
                         "AND (expires IS NULL OR expires > ?)", (_hash(key), time.time())).fetchone()
    return row[0] if row else None


def authenticate():
    """The server's authorization_function: X-Api-Key first, else the auth app's basic auth
    (which the admin scripts use). A missing, unknown, revoked or expired key gets 401 and nothing
    is run. The request then acts as that user, and says so in what it writes (`_as_user`)."""
    from flask import Response, request
    from mlflow.server.auth import authenticate_request_basic_auth
    from werkzeug.datastructures import Authorization

    key = request.headers.get(HEADER)
    if key is None:
        if request.authorization is None:
            return Response(MISSING_KEY, 401)
        authorization = authenticate_request_basic_auth()
    else:
        username = user_of(os.environ[KEYS_DB_ENV], key)
        if username is None:
            return Response(BAD_KEY, 401)
        authorization = Authorization("basic", {"username": username, "password": ""})
    if isinstance(authorization, Authorization):
        return _as_user(request, authorization.username) or authorization
    return authorization


# The routes that write a run's user. MLflow takes both from the client (its OS user), so the
# server rewrites them to the authenticated user: the run's record is then an audit trail.
CREATE_RUN = "/mlflow/runs/create"
TAG_WRITES = ("/mlflow/runs/set-tag", "/mlflow/runs/delete-tag", "/mlflow/runs/log-batch")


def _as_user(request, username: str):
    """Make a CreateRun request record `username` as the run's user and `mlflow.user` tag, and
    refuse any other request that sets or deletes `mlflow.user`; None, or the refusal."""
    from flask import Response

    rule = request.url_rule.rule if request.url_rule else ""
    if request.method != "POST" or not rule.endswith((CREATE_RUN, *TAG_WRITES)):
        return None
    # MLflow's handler reads this same parsed body later (Flask caches it), so changing it here
    # changes what is stored. A body that is not a JSON object (MLflow also accepts a JSON string
    # holding one, parsed again later) would escape the change: refused.
    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        return Response("the request body must be a JSON object", 400)
    if rule.endswith(CREATE_RUN):
        body["user_id"] = username
        body["tags"] = [tag for tag in body.get("tags") or []
                        if not (isinstance(tag, dict) and tag.get("key") == RUN_USER_TAG)]
        body["tags"].append({"key": RUN_USER_TAG, "value": username})
        return None
    keys = [body.get("key")] + [tag.get("key") for tag in body.get("tags") or [] if isinstance(tag, dict)]
    if RUN_USER_TAG in keys:
        return Response(f"{RUN_USER_TAG} is set by the server to the user who created the run", 403)
    return None
