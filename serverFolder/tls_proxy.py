"""Start (or stop) nginx terminating TLS in front of a tracking server (nginx.conf, make_certs.sh).

    serverFolder/make_certs.sh serverFolder/tls mlflow.example.org
    python serverFolder/tls_proxy.py --server-name mlflow.example.org --listen 0.0.0.0:443 \
        --upstream 127.0.0.1:5000 --cert serverFolder/tls/server.crt --key serverFolder/tls/server.key
    python serverFolder/tls_proxy.py --stop

Clients then use https://<server name> and, for a self-made CA,
MLFLOW_TRACKING_SERVER_CERT_PATH=<dir>/ca.crt. Needs nginx (`apt-get install nginx-light`).
Started as root, nginx's workers run as www-data. Responses carry HSTS; request bodies are
limited to --max-body-size; requests with a password (basic auth) are rate-limited per address.
"""
import argparse
import os
import re
import sys

from local_server import HERE, address, folder, is_host, launch, positive, stop
from mnistflow import nginx
from mnistflow.flags import OneLineParser


def body_size(text: str) -> str:
    if not re.fullmatch(r"[1-9][0-9]*[kKmMgG]?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; give a size above 0 in bytes, "
                                         "or with k, m or g (nginx's client_max_body_size), e.g. 2g")
    return text


def request_rate(text: str) -> str:
    if not re.fullmatch(r"[1-9][0-9]*r/[sm]", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; give requests per second or per minute "
                                         "(nginx's limit_req_zone rate), e.g. 5r/s or 30r/m")
    return text


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server-name", default="localhost", help="the name clients use; the certificate's name")
    parser.add_argument("--listen", type=address, default="127.0.0.1:8443", help="address:port nginx listens on")
    parser.add_argument("--upstream", type=address, default="127.0.0.1:5000", help="the tracking server's address:port")
    parser.add_argument("--max-body-size", type=body_size, default="2g",
                        help="the largest request body (an uploaded file), e.g. 500m; default 2g")
    parser.add_argument("--login-rate", type=request_rate, default="5r/s",
                        help="requests with a password, per client address (a burst of 20 more waits its turn, "
                             "then 429), e.g. 30r/m; default 5r/s")
    parser.add_argument("--cert", default=os.path.join(HERE, "tls", "server.crt"))
    parser.add_argument("--key", default=os.path.join(HERE, "tls", "server.key"))
    parser.add_argument("--cafile", default="", help="CA to verify the proxy with while waiting for it; "
                                                     "default: the system's, or ca.crt beside --cert")
    parser.add_argument("--root", type=folder, default=os.path.join(HERE, "tls_proxy"),
                        help="directory for the config, logs, pid")
    parser.add_argument("--timeout", type=positive(float, "a number of seconds"), default=60,
                        help="seconds to wait for the proxy to answer")
    parser.add_argument("--stop", action="store_true", help="stop the proxy started with this --root")
    args = parser.parse_args(argv)
    refusal = "" if args.stop else unusable(args)
    if refusal:
        parser.error(refusal)
    return args


def unusable(args: argparse.Namespace) -> str:
    """Why the server name or a path cannot go into nginx.conf ("" when they all can)."""
    if not is_host(args.server_name):
        return f"--server-name {args.server_name!r} is not allowed; give a host name or an IP address"
    for option, path in (("--cert", args.cert), ("--key", args.key), ("--root", args.root)):
        if refusal := nginx.unwritable(option, path):
            return refusal
    for option, path in (("--cert", args.cert), ("--key", args.key)):
        if not os.path.isfile(path):
            return f"{option} {path} is not a file; make the certificate and key with serverFolder/make_certs.sh"
    return ""


def render(args: argparse.Namespace, root: str, user: str, temp: str) -> str:
    values = {"USER": user, "ROOT": root, "TEMP": temp, "LISTEN": args.listen,
              "SERVER_NAME": args.server_name, "CERT": os.path.abspath(args.cert), "KEY": os.path.abspath(args.key),
              "UPSTREAM": args.upstream, "MAX_BODY_SIZE": args.max_body_size, "LOGIN_RATE": args.login_rate,
              "TLS_SETTINGS": nginx.tls_settings(" " * 8)}
    with open(os.path.join(HERE, "nginx.conf")) as f:
        text = f.read()
    text = re.sub(r"@([A-Z_]+)@", lambda placeholder: values[placeholder.group(1)], text)  # one pass: a value may hold '@'
    path = os.path.join(root, "nginx.conf")
    with open(path, "w") as f:
        f.write(text)
    return path


def start(args: argparse.Namespace) -> None:
    program = nginx.binary()
    if not program:
        sys.exit("tls_proxy: nginx is not installed (apt-get install nginx-light)")
    root = os.path.abspath(args.root)
    os.makedirs(root, exist_ok=True)
    user, temp = nginx.workers_account(root)
    if not user:
        sys.exit(f"tls_proxy: started as root, nginx's workers run as {nginx.WORKER_USER} with {nginx.WORKER_TEMP}, "
                 "which Debian's nginx package creates; install it or start tls_proxy.py as another user")
    config = render(args, root, user, temp)
    sibling_ca = os.path.join(os.path.dirname(os.path.abspath(args.cert)), "ca.crt")
    port = args.listen.rsplit(":", 1)[1]
    url = f"https://[{args.server_name}]:{port}" if ":" in args.server_name else f"https://{args.server_name}:{port}"
    launch("tls_proxy", [program, "-c", config, "-e", os.path.join(root, "error.log")], root, url, args.timeout,
           cafile=args.cafile or (sibling_ca if os.path.exists(sibling_ca) else ""))
    print(f"export MLFLOW_TRACKING_URI={url}")


if __name__ == "__main__":
    arguments = parse_args()
    stop("tls_proxy", arguments.root) if arguments.stop else start(arguments)
