"""nginx as this project runs it (the tracking server's TLS proxy, the serve step's proxy): which
account its workers run as, where they write, and which paths its config can hold.
"""
import getpass
import os
import pwd
import re
import shutil

# When started as root, nginx's workers run as this account, with Debian's own temporary
# directories (owned by it), not as root.
WORKER_USER, WORKER_TEMP = "www-data", "/var/lib/nginx"
# nginx.conf holds the paths given in double quotes, where nginx reads a space, ';', '{' or '#' as
# part of the path; a quote or backslash would end or escape the string, '$' names a variable.
NGINX_PATH = re.compile(r'[^"\\$\x00-\x1f\x7f]+')
# A TLS server block's settings, for the tracking server's proxy and the serve step's alike:
# Mozilla's "intermediate" ones (TLS 1.2 with forward-secret AEAD ciphers only, and 1.3), and HSTS.
TLS_SETTINGS = """\
ssl_protocols TLSv1.2 TLSv1.3;
ssl_ciphers ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:\
ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305;
ssl_prefer_server_ciphers off;
add_header Strict-Transport-Security "max-age=63072000" always;"""


def unwritable(option: str, path: str) -> str:
    """Why nginx.conf cannot hold `path`, given as `option` ("" when it can)."""
    if NGINX_PATH.fullmatch(os.path.abspath(path)):
        return ""
    return (f"{option} {path!r} is not allowed; nginx.conf takes a path without a double quote, backslash, '$' "
            "or control character")


def tls_settings(indent: str) -> str:
    return TLS_SETTINGS.replace("\n", "\n" + indent)


def binary() -> str:
    """The nginx program; "" when it is not installed."""
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    return found if os.path.exists(found) else ""


def has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def workers_account(root: str) -> tuple[str, str]:
    """(user, temporary directory) for nginx's workers: www-data and Debian's directory when started
    as root, else this user and `root`/tmp (made here). "" as the user when root has no www-data."""
    if os.geteuid() == 0:
        return (WORKER_USER if has_user(WORKER_USER) and os.path.isdir(WORKER_TEMP) else ""), WORKER_TEMP
    os.makedirs(os.path.join(root, "tmp"), exist_ok=True)
    return getpass.getuser(), os.path.join(root, "tmp")
