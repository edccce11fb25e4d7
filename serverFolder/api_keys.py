"""Issue, revoke and list the API keys a secured tracking server accepts (see docs/server.md).

    python serverFolder/api_keys.py issue alice            # prints alice's new key, once
    python serverFolder/api_keys.py issue alice --days 90  # a key that stops working after 90 days
    python serverFolder/api_keys.py revoke alice           # every active key of alice stops working
    python serverFolder/api_keys.py revoke --key 3f2a9c    # one key, by the id `list` shows
    python serverFolder/api_keys.py list

Run it on the server machine with the server's MNISTFLOW_API_KEYS_DB (or --db): the store
shared_server.py created, never a new one. The user must exist in the server's user store (the
admin creates users with users.py); `issue` reads it through the server's basic_auth.ini
(--auth-config: default $MLFLOW_AUTH_CONFIG_PATH, else basic_auth.ini beside the key store,
where shared_server.py writes both). The key then acts as that user, with that user's
permissions. Only a hash of each key is stored: a lost key is revoked and reissued.
"""
import argparse
import os
import sys
import time

from local_server import positive
from mnistflow import auth, keystore
from mnistflow.flags import OneLineParser

DAY_S = 24 * 3600


def when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def state(revoked: float | None, expires: float | None) -> str:
    if revoked:
        return "REVOKED"
    if expires is None:
        return "active"
    return f"active until {when(expires)}" if expires > time.time() else f"EXPIRED {when(expires)}"


def main(argv=None) -> None:
    parser = OneLineParser(prog="api_keys", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("issue", "revoke", "list"))
    parser.add_argument("username", nargs="?")
    parser.add_argument("--db", default=os.environ.get(keystore.KEYS_DB_ENV, ""),
                        help=f"the key store; default ${keystore.KEYS_DB_ENV}")
    parser.add_argument("--days", type=positive(float, "a number of days"), help="issue: the key expires after this many days")
    parser.add_argument("--key", default="", help="revoke: the id (from list) of the one key to revoke")
    parser.add_argument("--auth-config", default=os.environ.get("MLFLOW_AUTH_CONFIG_PATH", ""),
                        help="issue: the server's basic_auth.ini; default beside the key store")
    args = parser.parse_args(argv)
    if not args.db:
        parser.error(f"say where the key store is: --db PATH or {keystore.KEYS_DB_ENV}")
    if args.action == "issue" and not args.username or args.action == "revoke" and not (args.username or args.key):
        parser.error(f"{args.action} needs a username" + (" or --key ID" if args.action == "revoke" else ""))
    try:
        if args.action == "issue":
            auth_config = args.auth_config or os.path.join(os.path.dirname(os.path.abspath(args.db)), "basic_auth.ini")
            keystore.check_store(args.db)  # before the user store, found beside it: name a mistyped --db first
            if not keystore.user_exists(auth_config, args.username):
                raise keystore.KeyStoreError(f"no user {args.username!r} on the server; create it first "
                                             "(users.py create NAME)")
            expires = None if args.days is None else time.time() + args.days * DAY_S
            key = keystore.issue_key(args.db, args.username, expires)
            print(f"API key for {args.username} (shown once; the user exports it as {auth.KEY_ENV}):", file=sys.stderr)
            print(key)
        elif args.action == "revoke" and args.key:
            print(f"revoked key {args.key} of {keystore.revoke_key(args.db, args.key)}")
        elif args.action == "revoke":
            print(f"revoked {keystore.revoke_keys(args.db, args.username)} key(s) of {args.username}")
        else:
            for username, key_id, created, revoked, expires in keystore.list_keys(args.db):
                print(f"{username:<20} id {key_id}  issued {when(created)}  {state(revoked, expires)}")
    except keystore.KeyStoreError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    main()
