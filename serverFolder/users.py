"""Create users, change their passwords and grant them permissions on a secured server (admin only).

    export MLFLOW_TRACKING_URI=https://mlflow.example.org
    export MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=…   # the admin's login
    python serverFolder/users.py create alice               # asks for alice's password
    python serverFolder/users.py password alice             # asks for the new one
    python serverFolder/users.py grant alice mnist-study EDIT   # READ | EDIT | MANAGE | DENY

Passwords are read from the terminal (or one line of standard input, for scripts), never from
the command line, where other users of the machine could see them. The permission is on the
experiment with that name: READ sees its runs, EDIT also logs to it, MANAGE also grants others, DENY
shuts the user out of it.
A new experiment is managed by its creator and readable by everyone (basic_auth.ini).
"""
import getpass
import sys
import warnings

from mnistflow import auth
from mnistflow.errors import StepError
from mnistflow.flags import OneLineParser

PERMISSIONS = ("READ", "EDIT", "MANAGE", "DENY")


def read_password(prompt: str) -> str:
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    password = getpass.getpass(prompt)
    if password != getpass.getpass("again: "):
        sys.exit("users: the two passwords differ; nothing changed")
    return password


def admin_client(uri: str):
    """MLflow's AuthServiceClient for the server at `uri`. MLflow is imported only here and in main
    once the flags are read: --help and a bad flag answer without loading it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation warnings from inside MLflow's server package
        from mlflow.server.auth.client import AuthServiceClient
    return AuthServiceClient(uri)


def grant_permission(admin, username: str, experiment_id: str, permission: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        admin.grant_user_permission(username, "experiment", experiment_id, permission)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        # The auth API has no "update" for a user's experiment permission: replace it.
        admin.revoke_user_permission(username, "experiment", experiment_id)
        admin.grant_user_permission(username, "experiment", experiment_id, permission)


def main(argv=None) -> None:
    parser = OneLineParser(prog="users", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("create", "password"):
        commands.add_parser(name).add_argument("username")
    grant = commands.add_parser("grant")
    grant.add_argument("username")
    grant.add_argument("experiment", help="the experiment's name")
    grant.add_argument("permission", type=str.upper)
    args = parser.parse_args(argv)
    if args.command == "grant" and args.permission not in PERMISSIONS:
        parser.error(f"permission {args.permission!r} is not allowed; choose from {', '.join(PERMISSIONS)}")
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = mlflow.get_tracking_uri()
    if not auth.is_http(uri):
        parser.error(f"MLFLOW_TRACKING_URI is {uri!r}: set it to the tracking server's https:// URI")
    try:
        auth.check_reachable(uri)  # MLflow's client would retry a server that is down for minutes
    except StepError as exc:
        parser.error(str(exc))
    admin = admin_client(uri)
    try:
        if args.command == "grant":
            experiment = mlflow.MlflowClient(uri).get_experiment_by_name(args.experiment)
            if experiment is None:
                parser.error(f"no experiment named {args.experiment!r} on {uri}")
            grant_permission(admin, args.username, experiment.experiment_id, args.permission)
            print(f"{args.username} now has {args.permission} on experiment {args.experiment!r}")
            return
        password = read_password(f"password for {args.username}: ")
        if not password:
            parser.error("the password is empty")
        if args.command == "create":
            admin.create_user(args.username, password)
            print(f"created user {args.username}")
        else:
            admin.update_user_password(args.username, password)
            print(f"changed the password of {args.username}")
    except MlflowException as exc:
        if exc.get_http_status_code() in (401, 403):
            parser.error(f"{uri} refused the admin login: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                         "to an admin's")
        parser.error(str(exc.message).splitlines()[0])  # the server's words: unknown user, name taken, ...


if __name__ == "__main__":
    main()
