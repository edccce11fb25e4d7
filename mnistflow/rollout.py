"""The serve step's machinery: model processes (mnistflow/serving.py) behind nginx, following a
registry alias, one version at a time.

Blue/green: when the alias names another version, a second set of model processes starts on it
(green), each is checked (it answers /health, and classifies the known pictures, the first of its
dataset's test set, well enough), and only then does nginx point at them; nginx's reload lets
requests in flight finish on the old set (blue), which is stopped once nginx's old workers are
gone. A version that fails to start or to pass the check never takes traffic: the old one keeps
serving, and the refusal is one line here and a tag on the model version in the registry.
nginx retries a request on another process when one fails to answer (a crashed process), and a
process that dies is started again.
"""
import base64
import hashlib
import hmac
import io
import json
import os
import secrets
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

from mnistflow import inference_log, keystore, monitoring, nginx, serving
from mnistflow.config import LOOPBACK_HOSTS, ServeConfig
from mnistflow.errors import ConfigError, NotFound, StepError, first_line

WEBHOOK_PREFIX = "mnistflow-serve-"  # the names of the serve step's registry webhooks
REFUSED_TAG = "mnistflow.serve_refused"  # on a model version: why the serve step would not send it traffic
KNOWN_PICTURES = 100
SUPERVISE_S = 0.5  # how soon a model process that died is started again
START_TIMEOUT_S = 120
PRUNE_S = 3600  # how often the inference log loses its old rows
CONFIG = """\
{user}worker_processes 1;
pid "{root}/nginx.pid";
error_log "{root}/error.log" warn;
daemon off;
events {{ worker_connections 1024; }}
http {{
    access_log "{root}/access.log";
    client_body_temp_path "{temp}/body";
    proxy_temp_path "{temp}/proxy";
    fastcgi_temp_path "{temp}/fastcgi";
    uwsgi_temp_path "{temp}/uwsgi";
    scgi_temp_path "{temp}/scgi";
    client_max_body_size {max_body};
    client_body_buffer_size {max_body};  # a request's pictures stay in memory, not in a temporary file
    include "{root}/upstream.conf";
    # The canary: its share of the requests goes to the challenger's processes; requests with the
    # same X-Split-Key to the same version, the others at random.
    map $http_x_split_key $split_key {{ "" $request_id; default $http_x_split_key; }}
    split_clients "$split_key" $model_pool {{ {canary_split}* models; }}
    server {{
        listen {listen};{tls}
        # nginx's own refusals as the model processes' are: one line of JSON.
        error_page 413 /413.json;
        error_page 502 503 504 /5xx.json;
        error_page 497 =400 /http.json;  # plain http to the https port
        location = /http.json {{
            internal;
            default_type application/json;
            return 400 '{{"error": "this endpoint takes https only"}}\n';
        }}
        location = /413.json {{
            internal;
            default_type application/json;
            return 413 '{{"error": "the body is over {max_body} bytes, the most allowed"}}\n';
        }}
        location = /5xx.json {{
            internal;
            default_type application/json;
            return 503 '{{"error": "no model process answered; try again"}}\n';
        }}
        location / {{
            proxy_pass http://$model_pool;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header {token_header} "";  # the step's own, never a client's
            # A process that refuses the connection or drops it (crashed, or being replaced) costs
            # the client nothing: the request goes to the next one. Predictions change no state,
            # so a POST may be sent again.
            proxy_next_upstream error timeout http_502 http_503 non_idempotent;
            proxy_next_upstream_tries 3;
            proxy_read_timeout 60s;
        }}
    }}
}}
"""


def get(url: str, timeout: float = 5, headers: dict | None = None, context=None) -> bytes:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
        return response.read()


def answers(url: str, context=None) -> bool:
    """Whether something answers at `url`, with any status."""
    try:
        get(url, timeout=2, context=context)
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def post_json(url: str, body: dict, timeout: float = 60, headers: dict | None = None) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def end(processes, sig: int, timeout: float) -> None:
    """Send `sig` to each process still running, then wait for all; kill one that outlasts `timeout`."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(sig)
    for process in processes:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Pool:
    """The model processes of one version, each on a loopback port of its own. They start as
    spares (mnistflow/serving.py), so that a pool can be made ready before it is needed; `load`
    gives them their version."""

    def __init__(self, count: int, root: str, token: str, keys: str, log_url: str, warm_uri: str = ""):
        """`keys`: the API key store requests must carry a key from ("" for none); `log_url`: the
        inference log's ("" for none); `warm_uri`: a version the spares load once and forget,
        which makes their next load quick."""
        from mlflow.utils import find_free_port

        self.root, self.token, self.keys, self.log_url, self.warm_uri = root, token, keys, log_url, warm_uri
        self.signed = {serving.TOKEN_HEADER: token}  # the step's own requests: no API key needed
        self.model_uri = self.version = ""
        self.processes = {find_free_port(): None for _ in range(count)}
        for port in self.processes:
            self.start(port)

    def log_path(self, port: int) -> str:
        return os.path.join(self.root, f"model-{port}.log")

    def start(self, port: int) -> None:
        """A spare on `port`, or, once the pool has its version, a process that loads it as it starts."""
        env = {**os.environ, serving.TOKEN_ENV: self.token, serving.KEYS_ENV: self.keys, serving.LOG_ENV: self.log_url,
               serving.MODEL_ENV: self.model_uri, serving.WARM_ENV: self.warm_uri, serving.PARENT_ENV: str(os.getpid())}
        with open(self.log_path(port), "ab") as log:
            self.processes[port] = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--factory", "mnistflow.serving:create_app", "--host", "127.0.0.1",
                 "--port", str(port), "--log-level", "warning", "--timeout-graceful-shutdown", "30"],
                stdout=log, stderr=subprocess.STDOUT, env=env)

    def up(self, timeout: float = START_TIMEOUT_S) -> str:
        """"" once every process answers (a spare says 503: no version yet); else why not."""
        deadline = time.monotonic() + timeout
        waiting = set(self.processes)
        while waiting:
            for port in list(waiting):
                if self.processes[port].poll() is not None:
                    return f"its model process exited ({self.last_line(port)})"
                if answers(f"http://127.0.0.1:{port}/health"):
                    waiting.discard(port)
            if time.monotonic() > deadline:
                return f"its model processes did not answer within {timeout:.0f} s"
            time.sleep(0.1)
        return ""

    def load(self, model_uri: str, version: str) -> str:
        """"" once every process has loaded `model_uri`; else why not."""
        self.model_uri, self.version = model_uri, version
        for port in self.processes:
            try:
                post_json(f"http://127.0.0.1:{port}/load", {"model_uri": model_uri}, START_TIMEOUT_S, self.signed)
            except urllib.error.HTTPError as exc:
                return f"it did not load ({json.loads(exc.read() or b'{}').get('error', exc)})"
            except OSError as exc:
                return f"it did not load ({exc})"
        return ""

    def last_line(self, port: int) -> str:
        with open(self.log_path(port), errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
        return lines[-1] if lines else "no output"

    def check(self, known: "KnownPictures", min_accuracy: float) -> str:
        """"" when each process classifies the known pictures well enough; else why not."""
        for port in self.processes:
            base = f"http://127.0.0.1:{port}"
            try:
                metadata = json.loads(get(f"{base}/metadata", headers=self.signed))
                pictures, labels = known.of(metadata["dataset"])
                answer = post_json(f"{base}/predict", {"pictures": pictures}, headers=self.signed)
                right = sum(metadata["classes"].index(prediction["class"]) == label
                            for prediction, label in zip(answer["predictions"], labels))
            except (OSError, ValueError, KeyError) as exc:
                return f"its check request failed ({exc})"
            if right / len(labels) < min_accuracy:
                return (f"it classified {right} of the {len(labels)} known {metadata['dataset']} pictures right, "
                        f"below check_accuracy={min_accuracy}")
        return ""

    def restart_dead(self) -> list[int]:
        """Start again each process that has exited, loading the pool's version; their ports."""
        dead = [port for port, process in self.processes.items() if process.poll() is not None]
        for port in dead:
            self.start(port)
        return dead

    def stop(self) -> None:
        end(self.processes.values(), signal.SIGTERM, 40)  # uvicorn finishes the requests it holds, then exits


class KnownPictures:
    """The first pictures of each dataset's test split, as PNG in base64, with their labels."""

    def __init__(self, data_dir: str):
        self.data_dir, self.cache = data_dir, {}

    def of(self, dataset: str) -> tuple[list[str], list[int]]:
        if dataset not in self.cache:
            from PIL import Image

            from mnistflow import data as datasets

            data = datasets.load(dataset, self.data_dir)
            pixels = (data.pixels(data.test)[:KNOWN_PICTURES, 0].numpy() * 255).round().astype("uint8")
            encoded = []
            for picture in pixels:
                png = io.BytesIO()
                Image.fromarray(picture).save(png, "PNG")
                encoded.append(base64.b64encode(png.getvalue()).decode())
            self.cache[dataset] = encoded, data.test.labels[:KNOWN_PICTURES].tolist()
        return self.cache[dataset]


class Proxy:
    """nginx on host:port in front of one pool at a time; with a certificate and its key, https only."""

    def __init__(self, listen: str, root: str, tls_cert: str = "", tls_key: str = "", canary_share: float = 0):
        program = nginx.binary()
        if not program:
            raise ConfigError("the serve step needs nginx (apt-get install nginx-light)")
        if not nginx.NGINX_PATH.fullmatch(root):
            raise ConfigError(f"{root!r} cannot be written into nginx.conf; set TMPDIR to a plainer directory")
        user, temp = nginx.workers_account(root)
        if not user:
            raise ConfigError(f"started as root, nginx's workers run as {nginx.WORKER_USER} with {nginx.WORKER_TEMP}, "
                              "which Debian's nginx package creates; install it or serve as another user")
        tls = ""
        if tls_cert:  # paths nginx.conf can hold (ServeConfig checked them)
            indent = "\n" + " " * 8
            listen += " ssl"
            tls = (f'{indent}ssl_certificate "{os.path.abspath(tls_cert)}";'
                   f'{indent}ssl_certificate_key "{os.path.abspath(tls_key)}";{indent}{nginx.tls_settings(indent[1:])}')
        self.root = root
        config = os.path.join(root, "nginx.conf")
        with open(config, "w") as f:
            f.write(CONFIG.format(user=f"user {user};\n" if os.geteuid() == 0 else "", root=root, temp=temp,
                                  listen=listen, tls=tls, max_body=serving.MAX_BODY_BYTES,
                                  token_header=serving.TOKEN_HEADER,
                                  canary_split=f"{canary_share * 100:.2f}% challenger; " if canary_share else ""))
        self.command = [program, "-c", config, "-e", os.path.join(root, "error.log")]
        self.process = None

    def point_at(self, ports, canary_ports=()) -> None:
        """Send new requests to `ports`, the canary's share of them to `canary_ports` when given: a
        reload lets the requests in flight finish where they are."""
        with open(os.path.join(self.root, "upstream.conf"), "w") as f:
            for name, group in (("models", ports), ("challenger", canary_ports or ports)):
                servers = "".join(f"    server 127.0.0.1:{port} max_fails=1 fail_timeout=1s;\n" for port in group)
                f.write(f"upstream {name} {{\n{servers}    keepalive 16;\n}}\n")
        if self.process is None:
            parent = os.getpid()  # started before any thread of the step's: preexec_fn is safe here
            self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            preexec_fn=lambda: serving.die_with_parent(parent))
            return
        old_workers = self.workers()
        self.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while old_workers & self.workers() and time.monotonic() < deadline:
            time.sleep(0.05)

    def workers(self) -> set[int]:
        """The pids of nginx's worker processes (the master's children)."""
        import psutil

        return {child.pid for child in psutil.Process(self.process.pid).children()}

    def wait_up(self, url: str, timeout: float = 30) -> None:
        import ssl

        # Whether this nginx answers, not whom to trust: its certificate is checked by its clients.
        context = ssl._create_unverified_context() if url.startswith("https:") else None
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                with open(os.path.join(self.root, "error.log"), errors="replace") as log:
                    lines = log.read().strip().splitlines() or ["no error logged"]
                raise ConfigError(f"nginx did not start: {lines[-1]}")
            if answers(f"{url}/health", context):
                return
            if time.monotonic() > deadline:
                raise StepError(f"nginx did not answer at {url} within {timeout} s")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process:
            end([self.process], signal.SIGQUIT, 30)  # nginx's graceful stop: requests in flight finish


class AliasWebhook:
    """MLflow's registry webhook for the alias's events, received here at `address` (HOST:PORT; by
    default a free port of loopback): `moved` is set when MLflow says the alias was set or deleted,
    so that the step looks at once instead of at its next poll. Each delivery must carry MLflow's
    HMAC signature made with this webhook's secret, and be less than five minutes old (a replayed
    one is not)."""

    MAX_AGE_S = 300

    def __init__(self, client, name: str, aliases: tuple, address: str = "127.0.0.1:0"):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.client, self.name, self.aliases = client, name, aliases
        self.secret, self.moved = secrets.token_urlsafe(32), threading.Event()
        webhook = self

        class Delivery(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(min(length, 65536))
                status = 204 if webhook.accept(self.headers, body) else 401
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):  # the step's output stays its own
                pass

        for stale in client.list_webhooks():  # left by a serve step that was killed: nothing answers there
            if stale.name.startswith(WEBHOOK_PREFIX) and not answers(stale.url):
                client.delete_webhook(stale.webhook_id)
        class Receiver(ThreadingHTTPServer):
            def server_bind(self):
                # HTTPServer's own looks the address up in DNS (socket.getfqdn), for a name unused here.
                socketserver.TCPServer.server_bind(self)

        host, _, port = address.rpartition(":")
        self.server = Receiver((host, int(port)), Delivery)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        url = f"http://{host}:{self.server.server_address[1]}/alias"
        try:
            self.webhook_id = client.create_webhook(
                name=f"{WEBHOOK_PREFIX}{uuid.uuid4().hex[:8]}", url=url, secret=self.secret,
                events=["model_version_alias.created", "model_version_alias.deleted"],
                description=f"the serve step following {name}@{' and @'.join(aliases)} (removed when it stops)").webhook_id
        except Exception:
            self.server.shutdown()
            raise

    def accept(self, headers, body: bytes) -> bool:
        delivery, sent = headers.get("X-MLflow-Delivery-Id", ""), headers.get("X-MLflow-Timestamp", "")
        signed = f"{delivery}.{sent}.{body.decode(errors='replace')}".encode()
        expected = "v1," + base64.b64encode(hmac.new(self.secret.encode(), signed, hashlib.sha256).digest()).decode()
        if not (hmac.compare_digest(headers.get("X-MLflow-Signature", ""), expected) and sent.isdigit()
                and abs(time.time() - int(sent)) < self.MAX_AGE_S):
            return False
        try:
            data = json.loads(body).get("data") or {}
        except (ValueError, AttributeError):
            return False
        if data.get("name") == self.name and data.get("alias") in self.aliases:
            self.moved.set()
        return True

    def close(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.delete_webhook(self.webhook_id)
        except MlflowException as exc:
            say(f"cannot remove webhook {self.webhook_id}: {first_line(exc)}")
        self.server.shutdown()


def alias_events(client, name: str, aliases: tuple, poll_interval: float,
                 webhook_address: str = "") -> "tuple[AliasWebhook | None, str]":
    """(the webhook, how the alias is followed): by MLflow's registry webhooks where the tracking
    server takes them (one on this machine, or one elsewhere told `webhook_address`), else by
    polling alone."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = urllib.parse.urlsplit(mlflow.get_registry_uri())
    polling = f"by polling every {poll_interval:g} s"
    if uri.scheme not in ("http", "https"):
        return None, polling
    if uri.hostname not in LOOPBACK_HOSTS and not webhook_address:
        return None, f"{polling} (for webhooks from a tracking server on another machine, give webhook_address)"
    try:
        webhook = AliasWebhook(client, name, aliases, webhook_address or "127.0.0.1:0")
        return webhook, f"by MLflow's registry webhooks, and {polling}"
    except MlflowException as exc:
        return None, f"{polling} (the tracking server took no webhook: {first_line(exc)})"


def port_free(host: str, port: int | str) -> bool:
    """Whether nginx could listen on host:port (as nginx does, past connections closing there)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
        except OSError:
            return False
    return True


def alias_version(client, name: str, alias: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        raise NotFound(f"{name}@{alias}: no such registered model or alias; promote a version with "
                       "`mlflow run . -e register` first") from None


def serve(cfg: ServeConfig) -> None:
    """Serve models:/<model_name>@<alias> on host:port until Ctrl-C or SIGTERM, following the alias,
    with the version @<canary_alias> names, when there is one, taking canary_share of the requests
    until it is promoted, removed, or breaches a canary limit (and is removed here); over https
    with tls_cert and tls_key, to requests with a key from api_keys_db when given; recording each
    prediction in inference_log ("" = beside a SQLite registry, "off" = nowhere) for keep_days."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    name, alias, api_keys_db = cfg.model_name, cfg.alias, cfg.api_keys_db
    if api_keys_db:
        try:
            keystore.check_store(api_keys_db)
        except keystore.KeyStoreError as exc:
            raise ConfigError(f"api_keys_db: {exc}") from None
        api_keys_db = os.path.abspath(api_keys_db)
    client = mlflow.MlflowClient()
    version = alias_version(client, name, alias)
    if not port_free(cfg.host, cfg.port):
        raise ConfigError(f"port {cfg.port} on {cfg.host} is in use; give another port")
    if cfg.webhook_address and not port_free(*cfg.webhook_address.rsplit(":", 1)):
        raise ConfigError(f"webhook_address {cfg.webhook_address}: cannot listen there (the port is in use, or the "
                          "host is not an address of this machine)")
    log_url = "" if cfg.inference_log == "off" else cfg.inference_log or inference_log.default_url(
        mlflow.get_registry_uri())
    log = open_log(log_url, cfg.keep_days) if log_url else None
    root = tempfile.mkdtemp(prefix="mnistflow-serve-")
    token = secrets.token_hex(16)
    known = KnownPictures(cfg.data_dir)
    listen = f"[{cfg.host}]:{cfg.port}" if ":" in cfg.host else f"{cfg.host}:{cfg.port}"
    url = f"{'https' if cfg.tls_cert else 'http'}://{listen}"
    refused, ended, pools = set(), set(), []  # pools: every one started and not yet stopped, for Ctrl-C at any point
    live = canary = None  # the pools answering: the alias's version, and the canary's
    canary_since = 0.0

    def new_pool(count: int, warm_uri: str = "") -> Pool:
        pools.append(Pool(count, root, token, api_keys_db, log_url, warm_uri))
        return pools[-1]

    def drop(pool: Pool) -> None:
        pool.stop()
        pools.remove(pool)

    def checked(pool: Pool, version: str) -> bool:
        """Whether `pool` has loaded `version` and answers right; if not, one line, a tag, and the pool stopped."""
        reason = pool.up() or pool.load(f"models:/{name}/{version}", version) or pool.check(known, cfg.check_accuracy)
        if not reason:
            return True
        drop(pool)
        refused.add(version)
        say(f"refused version {version} of {name}: {reason}")
        tag(version, REFUSED_TAG, reason)
        return False

    def tag(version: str, key: str, value: str) -> None:
        try:
            client.set_model_version_tag(name, version, key, value[:5000])
        except MlflowException as exc:
            say(f"cannot tag version {version} with {key}: {first_line(exc)}")

    def point() -> None:
        proxy.point_at(live.processes, canary.processes if canary else ())

    def follow_canary() -> None:
        """Start, judge or end the canary, as @canary_alias and the inference log say."""
        nonlocal canary, canary_since
        try:
            wanted = alias_version(client, name, cfg.canary_alias)
        except NotFound:
            wanted = None
        if canary is not None and wanted != canary.version:
            was, canary = canary, None
            point()
            drop(was)
            print(f"canary of version {was.version} ended: @{cfg.canary_alias} "
                  + (f"now names version {wanted}" if wanted else "was removed"), flush=True)
        if canary is None and wanted and wanted != live.version and wanted not in refused | ended:
            pool = new_pool(1)
            if checked(pool, wanted):
                canary, canary_since = pool, time.time()
                point()
                print(f"canary: version {wanted} (@{cfg.canary_alias}) takes {cfg.canary_share:.0%} of the requests "
                      f"beside version {live.version}", flush=True)
        if canary is not None and log is not None:
            why = monitoring.canary_breach(log.window(name, seconds=time.time() - canary_since), live.version,
                                           canary.version, cfg.canary_min_rows, cfg.canary_max_error_gap,
                                           cfg.canary_max_latency_ms)
            if why:
                was, canary = canary, None
                ended.add(was.version)
                point()
                drop(was)
                client.delete_registered_model_alias(name, cfg.canary_alias)
                tag(was.version, monitoring.CANARY_TAG, f"aborted by the serve step: {why}")
                say(f"canary of version {was.version} aborted, @{cfg.canary_alias} removed: {why}")

    def stop_on_sigterm(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop_on_sigterm)
    proxy = webhook = None
    aliases = (alias, cfg.canary_alias) if cfg.canary_share else (alias,)
    try:
        proxy = Proxy(listen, root, cfg.tls_cert, cfg.tls_key, cfg.canary_share)
        live = new_pool(cfg.workers)
        if not checked(live, version):
            raise StepError(f"version {version} of {name}@{alias} cannot be served (see the line above)")
        point()
        proxy.wait_up(url)
        webhook, following = alias_events(client, name, aliases, cfg.poll_interval, cfg.webhook_address)
        keys = ", to requests with an API key (X-Api-Key)" if api_keys_db else ""
        recording = f"recording predictions in {log_url}" if log else "recording no predictions"
        canary_note = (f"; @{cfg.canary_alias} takes {cfg.canary_share:.0%} of the requests as a canary"
                       + ("" if log else " (its limits unwatched: the inference log is off)")) if cfg.canary_share else ""
        print(f"serving {name}@{alias} (version {version}) at {url}{keys} with {cfg.workers} model processes, "
              f"following the alias {following}, {recording}{canary_note}; POST /predict takes pictures, "
              "/invocations arrays, /feedback true labels; Ctrl-C stops", flush=True)
        spare = new_pool(cfg.workers, live.model_uri)  # the next version's processes, made ready while this one serves
        next_look = next_prune = time.monotonic() + cfg.poll_interval
        while True:  # every SUPERVISE_S: a dead process started again; the aliases read when told or due
            tick = min(SUPERVISE_S, cfg.poll_interval)
            told = webhook.moved.wait(tick) if webhook else time.sleep(tick)
            for pool in (live, canary) if canary else (live,):
                for port in pool.restart_dead():
                    say(f"the model process on port {port} exited; started again")
            if log and time.monotonic() > next_prune:
                next_prune = time.monotonic() + PRUNE_S
                try:
                    log.prune(cfg.keep_days)
                except SQLAlchemyError as exc:  # serving goes on
                    say(f"cannot prune the inference log ({first_line(exc)})")
            if not told and time.monotonic() < next_look:
                continue
            if told:
                webhook.moved.clear()
            next_look = time.monotonic() + cfg.poll_interval
            try:
                wanted = alias_version(client, name, alias)
                if wanted != live.version and wanted not in refused:
                    green, spare = spare, None
                    green.restart_dead()  # a spare that died waiting is no fault of the version's
                    if checked(green, wanted):
                        blue, live = live, green
                        point()
                        drop(blue)
                        print(f"serving {name}@{alias} version {wanted} (was {blue.version}) at {url}", flush=True)
                    spare = new_pool(cfg.workers, live.model_uri)
                if cfg.canary_share:
                    follow_canary()
            except (NotFound, MlflowException, SQLAlchemyError, OSError) as exc:
                say(f"cannot read {name}'s aliases or log ({first_line(exc)}); version {live.version} keeps serving")
    except KeyboardInterrupt:
        print("serve: stopped", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if webhook is not None:
            webhook.close()
        if proxy is not None:
            proxy.stop()
        for pool in pools:
            pool.stop()
        shutil.rmtree(root, ignore_errors=True)


def open_log(url: str, keep_days: float) -> "inference_log.InferenceLog":
    """The inference log at `url`, its table made and its rows older than `keep_days` gone."""
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    try:
        log = inference_log.InferenceLog(url)
        log.prune(keep_days)
    except (ArgumentError, SQLAlchemyError, ImportError) as exc:
        raise ConfigError(f"inference_log {url} cannot be used: {first_line(exc)}") from None
    return log


def say(line: str) -> None:
    print(f"serve: {line}", file=sys.stderr, flush=True)
