"""Start (or stop) a shared, secured MLflow tracking server (see README.md, "A shared server").

    export MLFLOW_AUTH_ADMIN_PASSWORD=…  MLFLOW_FLASK_SERVER_SECRET_KEY=…
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
  logged models, `models:/m-…`), never at a path on the server's disk or another URL.
It listens on 127.0.0.1 unless told otherwise: users reach it through nginx, which terminates
TLS (tls_proxy.py). Keys for users come from api_keys.py; users and permissions from users.py.
"""
import argparse
import configparser
import os
import sys

from local_server import HERE, NO_JOBS, launch, server_command, server_parser, stop

REQUIRED_ENV = {
    "MLFLOW_AUTH_ADMIN_PASSWORD": "the password of the admin user (created on first start)",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "a random string that signs the UI's CSRF tokens, the same for every worker",
}
HARDENING_ENV = {
    **NO_JOBS,
    # MLflow 3 registers a run's model by its logged-model URI (models:/m-<id>), whose files the
    # server keeps under mlflow-artifacts:; anything else (file:, s3:, http:) is refused.
    "MLFLOW_CREATE_MODEL_VERSION_SOURCE_VALIDATION_REGEX": r"^(mlflow-artifacts:/|models:/m-[0-9a-f]+$)",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = server_parser(__doc__, os.path.join(HERE, "shared"), workers=4)
    parser.add_argument("--allowed-hosts", default="",
                        help="comma-separated names clients use to reach the server (the TLS proxy's name)")
    parser.add_argument("--auth-db-uri", default="", help="users and permissions; default sqlite:///<root>/basic_auth.db")
    return parser.parse_args(argv)


def allowed_hosts(names: str) -> list[str]:
    # MLflow compares the whole Host header, port included: allow each name on any port.
    return [pattern for name in names.split(",") if name.strip() for pattern in (name.strip(), f"{name.strip()}:*")]


def write_auth_config(root: str, database_uri: str) -> str:
    """basic_auth.ini with this server's user store; the path for MLFLOW_AUTH_CONFIG_PATH."""
    config = configparser.ConfigParser()
    config.read(os.path.join(HERE, "basic_auth.ini"))
    config["mlflow"]["database_uri"] = database_uri
    path = os.path.join(root, "basic_auth.ini")
    with open(path, "w") as f:
        config.write(f)
    return path


def start(args: argparse.Namespace) -> None:
    hosts = allowed_hosts(args.allowed_hosts)
    if not hosts:
        sys.exit("shared_server: --allowed-hosts is required: the name(s) clients use to reach the server")
    missing = [f"{name} ({why})" for name, why in REQUIRED_ENV.items() if not os.environ.get(name)]
    if missing:
        sys.exit(f"shared_server: set {'; '.join(missing)}")
    root = os.path.abspath(args.root)
    os.makedirs(root, exist_ok=True)
    env = {
        **os.environ, **HARDENING_ENV,
        "MLFLOW_AUTH_CONFIG_PATH": write_auth_config(root, args.auth_db_uri or f"sqlite:///{root}/basic_auth.db"),
        "MNISTFLOW_API_KEYS_DB": os.environ.get("MNISTFLOW_API_KEYS_DB") or os.path.join(root, "api_keys.db"),
    }
    command = server_command(args, root, "--app-name", "basic-auth", "--allowed-hosts", ",".join(hosts))
    launch("shared_server", command, root, f"http://{args.host}:{args.port}", args.timeout, env=env, host=hosts[0])
    print(f"API keys: MNISTFLOW_API_KEYS_DB={env['MNISTFLOW_API_KEYS_DB']} python serverFolder/api_keys.py issue USER")


if __name__ == "__main__":
    arguments = parse_args()
    stop("shared_server", arguments.root) if arguments.stop else start(arguments)
