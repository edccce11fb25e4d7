"""Start (or stop) a shared, secured MLflow tracking server (see docs/server.md, "A shared server").

    export MLFLOW_AUTH_ADMIN_PASSWORD=…  MLFLOW_FLASK_SERVER_SECRET_KEY=…
    export PGPASSFILE=/srv/mlflow/.pgpass     # or PGPASSWORD, or the whole URL in MLFLOW_BACKEND_STORE_URI
    python serverFolder/shared_server.py --allowed-hosts mlflow.example.org --root /srv/mlflow \
        --backend-store-uri postgresql+psycopg2://mlflow@db.example.org/mlflow
    python serverFolder/shared_server.py --root /srv/mlflow --stop

On top of local_server.py it applies the hardening MLflow's maintainers recommend:
- the basic-auth app (per-user, per-experiment permissions), with mnistflow's API-key check as
  its authorization function (basic_auth.ini); the admin password comes from the environment,
  there is no default;
- --allowed-hosts: a request whose Host header is not the server's real name gets 403 (this
  stops DNS-rebinding attacks from a browser);
- job execution off (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false): the server runs no user code;
- model versions may only point at models the server holds (`mlflow-artifacts:` and MLflow 3's
  logged models, `models:/m-…`), never at a path on the server's disk or another URL;
- a run records the authenticated user as its user and `mlflow.user` tag (mnistflow.keystore);
- its files are its own: the root directory, the SQLite stores, the key store and the written
  auth ini are owner-only, and no database password is on any process's command line (the
  store URIs reach `mlflow server` in its environment variables).
It listens on 127.0.0.1 unless told otherwise: users reach it through nginx, which terminates
TLS (tls_proxy.py). Keys for users come from api_keys.py; users and permissions from users.py.
"""
import argparse
import configparser
import os
import sys

from local_server import HERE, NO_JOBS, launch, server_command, server_parser, stop, store_env
from mnistflow import keystore
from mnistflow.config import refuse_storage_password
from mnistflow.errors import ConfigError

REQUIRED_ENV = {
    "MLFLOW_AUTH_ADMIN_PASSWORD": "the password of the admin user (created on first start)",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "a random string that signs the UI's CSRF tokens, the same for every worker",
}
# A model version's source (MLflow applies the rule with re.search): MLflow 3 registers a run's
# model by its logged-model URI (models:/m-<id>), whose files the server keeps under
# mlflow-artifacts:/<path>. The whole string must match: no host (mlflow-artifacts://other.host),
# no '.' or '..' segment, no newline, no other scheme (file:, s3:, http:, runs:/).
_SEGMENT = r"(?!\.+(?:/|\Z))[\w.-]+"
HARDENING_ENV = {
    **NO_JOBS,
    "MLFLOW_CREATE_MODEL_VERSION_SOURCE_VALIDATION_REGEX": rf"\A(?:mlflow-artifacts:/{_SEGMENT}(?:/{_SEGMENT})*"
                                                           r"|models:/m-[0-9a-f]+)\Z",
}
AUTH_DB_ENV = "MNISTFLOW_AUTH_DB_URI"


def parse_args(argv=None) -> argparse.Namespace:
    parser = server_parser(__doc__, os.path.join(HERE, "shared"), workers=4)
    parser.add_argument("--allowed-hosts", default="",
                        help="comma-separated names clients use to reach the server (the TLS proxy's name)")
    parser.add_argument("--auth-db-uri", default="",
                        help=f"users and permissions; default ${AUTH_DB_ENV}, else sqlite:///<root>/basic_auth.db")
    args = parser.parse_args(argv)
    for option, uri in (("--backend-store-uri", args.backend_store_uri), ("--auth-db-uri", args.auth_db_uri)):
        try:
            refuse_storage_password(uri)  # the steps' check: a password in the user part or the query
        except ConfigError:
            parser.error(f"{option} carries a password, which every user of this machine can read on a command "
                         f"line; leave it out (PGPASSWORD, ~/.pgpass) or pass the whole URI in "
                         f"{'MLFLOW_BACKEND_STORE_URI' if option == '--backend-store-uri' else AUTH_DB_ENV}")
    if not args.stop:
        if not allowed_hosts(args.allowed_hosts):
            parser.error("--allowed-hosts is required: the name(s) clients use to reach the server")
        missing = [f"{name} ({why})" for name, why in REQUIRED_ENV.items() if not os.environ.get(name)]
        if missing:
            parser.error(f"set {'; '.join(missing)}")
    return args


def allowed_hosts(names: str) -> list[str]:
    # MLflow compares the whole Host header, port included: allow each name on any port.
    return [pattern for name in names.split(",") if name.strip() for pattern in (name.strip(), f"{name.strip()}:*")]


def write_auth_config(root: str, database_uri: str) -> str:
    """basic_auth.ini with this server's user store (owner-only: the URI may hold a password);
    the path for MLFLOW_AUTH_CONFIG_PATH."""
    config = configparser.ConfigParser()
    config.read(os.path.join(HERE, "basic_auth.ini"))
    # MLflow reads the file with interpolation, where '%%' stands for '%' (URL-encoded passwords have '%').
    config["mlflow"]["database_uri"] = database_uri.replace("%", "%%")
    path = os.path.join(root, "basic_auth.ini")
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        os.fchmod(f.fileno(), 0o600)  # one written by an older version may be readable by others
        config.write(f)
    return path


def start(args: argparse.Namespace) -> None:
    hosts = allowed_hosts(args.allowed_hosts)
    root = os.path.abspath(args.root)
    # Owner-only: everything this script and the server create (stores, artifacts, logs) and the root.
    os.umask(0o077)
    os.makedirs(root, exist_ok=True)
    os.chmod(root, 0o700)
    keys = os.environ.get(keystore.KEYS_DB_ENV) or os.path.join(root, "api_keys.db")
    try:
        keystore.create_store(keys)
    except (OSError, keystore.KeyStoreError) as exc:
        sys.exit(f"shared_server: cannot create the key store {keys} ({keystore.KEYS_DB_ENV}): {exc}")
    auth_db = args.auth_db_uri or os.environ.get(AUTH_DB_ENV) or f"sqlite:///{root}/basic_auth.db"
    env = {
        **os.environ, **HARDENING_ENV, **store_env(args, root),
        "MLFLOW_AUTH_CONFIG_PATH": write_auth_config(root, auth_db),
        keystore.KEYS_DB_ENV: keys,
    }
    command = server_command(args, root, "--app-name", "basic-auth", "--allowed-hosts", ",".join(hosts))
    launch("shared_server", command, root, f"http://{args.host}:{args.port}", args.timeout, env=env, host=hosts[0])
    print(f"API keys: {keystore.KEYS_DB_ENV}={keys} python serverFolder/api_keys.py issue USER")


if __name__ == "__main__":
    arguments = parse_args()
    stop("shared_server", arguments.root) if arguments.stop else start(arguments)
