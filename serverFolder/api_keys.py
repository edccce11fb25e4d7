"""Issue, revoke and list the API keys a secured tracking server accepts (see README.md).

    python serverFolder/api_keys.py issue alice     # prints alice's new key, once
    python serverFolder/api_keys.py revoke alice    # every active key of alice stops working
    python serverFolder/api_keys.py list

Run it on the server machine with the server's MNISTFLOW_API_KEYS_DB (or --db). The user must
exist in the server's user store (the admin creates users in the UI or through the auth REST
API); the key then acts as that user, with that user's permissions. Only a hash of each key is stored: a lost key is revoked and reissued.
"""
import argparse
import os
import sys
import time

from mnistflow import auth, keystore


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("issue", "revoke", "list"))
    parser.add_argument("username", nargs="?")
    parser.add_argument("--db", default=os.environ.get(keystore.KEYS_DB_ENV, ""),
                        help=f"the key store; default ${keystore.KEYS_DB_ENV}")
    args = parser.parse_args(argv)
    if not args.db:
        parser.error(f"say where the key store is: --db PATH or {keystore.KEYS_DB_ENV}")
    if args.action != "list" and not args.username:
        parser.error(f"{args.action} needs a username")
    if args.action == "issue":
        key = keystore.issue_key(args.db, args.username)
        print(f"API key for {args.username} (shown once; the user exports it as {auth.KEY_ENV}):", file=sys.stderr)
        print(key)
    elif args.action == "revoke":
        print(f"revoked {keystore.revoke_keys(args.db, args.username)} key(s) of {args.username}")
    else:
        for username, prefix, created, revoked in keystore.list_keys(args.db):
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(created))
            print(f"{username:<20} sha256 {prefix}…  issued {when}  {'REVOKED' if revoked else 'active'}")


if __name__ == "__main__":
    main()
