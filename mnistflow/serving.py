"""One model process of the serve step: MLflow's scoring server for one registered model version,
with a route that takes pictures.

    MNISTFLOW_SERVE_MODEL=models:/MNIST_CNN/3 uvicorn --factory mnistflow.serving:create_app --port 5101

Started without MNISTFLOW_SERVE_MODEL, it is a spare: everything imported, no version loaded,
until the serve step tells it which to load (POST /load), so that a new version takes traffic
in about the time its weights take to read rather than an interpreter's start.

MLflow's own routes answer as under `mlflow models serve` (`/invocations` takes the signature's
(N, 1, 28, 28) arrays; `/ping`, `/health`, `/version`). `POST /predict` takes pictures (PNG,
JPEG, ...), either as a file upload (`curl -F picture=@digit.png`, any number of files) or as
JSON `{"pictures": ["<base64>", ...]}`, brings each to the MNIST convention as the predict step
does, and answers per picture its class, its probabilities, an id, whether the model is unsure
(its confidence below the threshold logged with it) and, for a digit model, the number read
(digits left to right, "?" for an unsure one) with each digit's class and confidence; or
{"error": ...} for a picture that cannot be read or shows no digit (a request where no picture
can be answered is a 400); every response names the version that answered in the header
X-Model-Version. A bad request gets a 4xx with one line of JSON, {"error": "..."}, and the
process goes on serving. With a key store (MNISTFLOW_SERVE_KEYS),
every request but /health and /ping must carry an active API key in X-Api-Key.
"""
import asyncio
import base64
import binascii
import ctypes
import hmac
import json
import os
import signal
import time
import uuid

import numpy as np

from mnistflow import images, inference_log, keystore, logged_model, reading
from mnistflow.errors import ImageError, StepError, first_line

MODEL_ENV = "MNISTFLOW_SERVE_MODEL"  # models:/<name>/<version>: the one version this process serves
WARM_ENV = "MNISTFLOW_SERVE_WARM"  # a spare's: a version to load once and forget, so that its next load is quick
TOKEN_ENV = "MNISTFLOW_SERVE_TOKEN"  # what a POST /load must carry: only the serve step picks the version
TOKEN_HEADER = "X-Serve-Token"  # where it carries it (the proxy drops it from what clients send)
PARENT_ENV = "MNISTFLOW_SERVE_PARENT"  # the serve step's pid: a model process ends when it does
KEYS_ENV = "MNISTFLOW_SERVE_KEYS"  # the tracking server's API key store: requests must carry a key from it
OWN_CHECK = "mnistflow.own_check"  # in a request's scope: it carries the token, the step's check of a version
OPEN_PATHS = ("/health", "/ping")  # liveness, for probes and the proxy: they tell nothing of the model
MAX_BODY_BYTES = 10 * 1024 * 1024  # a request's pictures, all together
MAX_PICTURES = 1000
VERSION_HEADER = "X-Model-Version"
HOW = "send {\"pictures\": [\"<base64 PNG or JPEG>\", ...]} or upload files with -F picture=@file.png"
FEEDBACK_HOW = "send {\"id\": \"<a prediction's id>\", \"label\": <the true class, its index or name>}"
LOG_ENV = "MNISTFLOW_SERVE_LOG"  # the inference log's URL; "" for none


def die_with_parent(parent: int) -> None:
    """End this process (SIGTERM) when `parent`, which started it, ends, however it ends, so that
    a killed serve step leaves no process behind: Linux's PR_SET_PDEATHSIG; elsewhere nothing."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it ended before the line above
        os.kill(os.getpid(), signal.SIGTERM)


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def pictures_of_json(body: bytes) -> list[tuple[str, bytes]]:
    """(name, bytes) of each picture of a JSON body {"pictures": [base64, ...]}."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the body is not JSON ({exc}); {HOW}") from None
    pictures = request.get("pictures") if isinstance(request, dict) else None
    if not isinstance(pictures, list) or not all(isinstance(p, str) for p in pictures):
        raise BadRequest("the JSON must be {\"pictures\": [\"<base64 PNG or JPEG>\", ...]}, a list of strings")
    decoded = []
    for i, text in enumerate(pictures):
        try:
            decoded.append((f"picture {i}", base64.b64decode(text, validate=True)))
        except (binascii.Error, ValueError):
            raise BadRequest(f"picture {i} is not base64") from None
    return decoded


async def body_of(request) -> bytes:
    """The request's body, refused once it passes MAX_BODY_BYTES (a chunked one declares no length)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise BadRequest(f"the body is over {MAX_BODY_BYTES} bytes, the most allowed", 413)
    if not body:
        raise BadRequest(f"the body is empty; {HOW}")
    return bytes(body)


async def pictures_of_upload(headers, body: bytes) -> list[tuple[str, bytes]]:
    """(file name, bytes) of each file of a multipart/form-data body."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream():
        yield body

    try:
        form = await MultiPartParser(headers, stream(), max_files=MAX_PICTURES).parse()
    except MultiPartException as exc:
        raise BadRequest(f"the upload cannot be read: {exc.message}") from None
    files = [value for _, value in form.multi_items() if not isinstance(value, str)]
    return [(upload.filename or f"picture {i}", await upload.read()) for i, upload in enumerate(files)]


def version_of(uri: str) -> str:
    """The version models:/<name>/<version> names."""
    return uri.rstrip("/").rsplit("/", 1)[-1]


def version_app(uri: str, log: "inference_log.InferenceLog | None" = None):
    """The FastAPI app of one model version: MLflow's scoring server and /predict, /metadata,
    /feedback; each prediction of /predict goes to `log` when there is one."""
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from mlflow.pyfunc import scoring_server
    from sqlalchemy.exc import SQLAlchemyError

    model = logged_model.load(uri)
    version = version_of(uri)
    model_name = uri.removeprefix("models:/").rsplit("/", 1)[0]
    # Pictures made as the model's training images were (as the predict step does).
    dataset, classes = logged_model.trained_on(model) or "mnist", logged_model.class_names(model)
    abstain_below = logged_model.abstain_threshold(model)
    app = scoring_server.init(model)

    def answer(pictures: list[tuple[str, bytes]], started: float, record: bool) -> dict:
        """Each picture's prediction, or {"error": ...} for one that cannot be read or shows no
        digit; ImageError when no picture can be answered."""
        def ink_in(_, picture: tuple[str, bytes]):
            name, data = picture
            return images.ink_of(images.decode(data, name), name)

        inks, unanswered = images.each(ink_in, dict(enumerate(pictures)))
        if not inks:
            raise ImageError(unanswered[0])
        inputs = np.stack([images.fit(ink, dataset) for ink in inks.values()])
        probabilities = logged_model.probabilities(model, inputs[:, None])
        answered = {i: {"id": uuid.uuid4().hex, "class": classes[int(p.argmax())],
                        "probabilities": {name: round(float(value), 6) for name, value in zip(classes, p)},
                        "unsure": bool(p.max() < abstain_below)}
                    for i, p in zip(inks, probabilities)}
        if dataset == "mnist":  # the picture read as a number too: its digits left to right
            for i, found in zip(inks, reading.read(model, list(inks.values()))):
                answered[i]["number"] = found.number()
                answered[i]["digits"] = [{"class": int(p.argmax()), "confidence": round(float(p.max()), 6)}
                                         for p in found.probabilities]
        predictions = [answered[i] if i in answered else {"error": unanswered[i]} for i in range(len(pictures))]
        if log is not None and record:
            now = time.time()
            latency_ms = (time.perf_counter() - started) * 1000
            for prediction, p, ink, model_input in zip(answered.values(), probabilities, inks.values(), inputs):
                log.record({"id": prediction["id"], "time": now, "model_name": model_name, "version": version,
                            "latency_ms": latency_ms, "class_index": int(p.argmax()), "confidence": float(p.max()),
                            **inference_log.features(ink, model_input)})
        return {"model_uri": uri, "version": version, "predictions": predictions}

    @app.get("/metadata")
    async def describe():
        return {"model_uri": uri, "version": version, "dataset": dataset, "classes": classes}

    @app.post("/predict")
    async def predict(request: Request):
        started = time.perf_counter()
        try:
            body = await body_of(request)
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                pictures = await pictures_of_upload(request.headers, body)
            else:
                pictures = pictures_of_json(body)
            if len(pictures) > MAX_PICTURES:
                raise BadRequest(f"{len(pictures)} pictures; at most {MAX_PICTURES} per request are allowed", 413)
            if not pictures:
                raise BadRequest(f"no pictures: {HOW}")
            return await asyncio.to_thread(answer, pictures, started, OWN_CHECK not in request.scope)
        except (BadRequest, ImageError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=getattr(exc, "status", 400))

    @app.post("/feedback")
    async def feedback(request: Request):
        """{"id": "<a prediction's id>", "label": <the true class: its index or its name>}"""
        try:
            if log is None:
                raise BadRequest("the inference log is off (inference_log), so feedback has nowhere to go", 404)
            try:
                body = json.loads(await body_of(request))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise BadRequest(FEEDBACK_HOW) from None
            if not isinstance(body, dict) or not isinstance(body.get("id"), str):
                raise BadRequest(FEEDBACK_HOW)
            label = body.get("label")
            index = classes.index(label) if label in classes else label
            if type(index) is not int or not 0 <= index < len(classes):
                raise BadRequest(f"label {label!r} is not allowed; give a class index from 0 to {len(classes) - 1} "
                                 f"or a class name ({classes[0]!r}, ...)")
            await asyncio.to_thread(log.label, body["id"], index)
            return {"id": body["id"], "label": index, "class": classes[index]}
        except (BadRequest, inference_log.FeedbackError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        except SQLAlchemyError as exc:
            return JSONResponse({"error": f"the inference log cannot take feedback now ({first_line(exc)}); "
                                          "try again"}, status_code=503)

    return app


class Process:
    """What uvicorn runs: the app of the version loaded, or, in a spare process that has loaded
    none yet, 503 to everything but POST /load. A spare has imported everything a version needs,
    so that loading one takes about as long as reading its weights."""

    def __init__(self, token: str, keys: str = "", log: "inference_log.InferenceLog | None" = None):
        """`keys`: an API key store, "" asks no key; `log`: where predictions are recorded."""
        self.token, self.keys, self.log, self.app, self.version_header = token, keys, log, None, []

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.lifespan(receive, send)
        if scope["type"] == "http" and scope["path"] == "/load" and scope["method"] == "POST":
            return await self.load(scope, receive, send)
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            if refusal := self.refusal(scope["path"], headers):
                return await respond(send, 401, {"error": refusal})
            if self.has_token(headers):  # the step's check of a version: no user's traffic, not recorded
                scope = {**scope, OWN_CHECK: True}
        if self.app is None:
            return await respond(send, 503, {"error": "no model loaded yet"})
        await self.app(scope, receive, send if scope["type"] != "http" else self.naming_the_version(send))

    def use(self, uri: str) -> None:
        """Answer with the version `uri` names (models:/<name>/<version>) from now on."""
        self.app = version_app(uri, self.log)
        self.version_header = [(VERSION_HEADER.lower().encode(), version_of(uri).encode())]

    def naming_the_version(self, send):
        """`send` that adds the version's header to every response (plain ASGI: a FastAPI
        middleware costs a request more than the rest of the route's own work does)."""
        async def sending(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.version_header]}
            await send(message)
        return sending

    def refusal(self, path: str, headers: dict) -> str:
        """Why a request may not be answered ("" when it may): with a key store, each one but
        OPEN_PATHS carries an active API key, or the serve step's token (its check of a version)."""
        if not self.keys or path in OPEN_PATHS or self.has_token(headers):
            return ""
        key = headers.get(keystore.HEADER.lower().encode())
        if key is None:
            return keystore.MISSING_KEY
        try:
            return "" if keystore.user_of(self.keys, key.decode(errors="replace")) else keystore.BAD_KEY
        except keystore.KeyStoreError as exc:
            return f"the key store cannot be read ({exc})"

    def has_token(self, headers: dict) -> bool:
        sent = headers.get(TOKEN_HEADER.lower().encode(), b"")
        return bool(self.token) and hmac.compare_digest(sent, self.token.encode())

    async def lifespan(self, receive, send):
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})

    async def load(self, scope, receive, send):
        """POST /load {"model_uri": "models:/<name>/<version>"}, with the token the serve step gave
        this process in TOKEN_HEADER: once, in a spare."""
        if not self.has_token(dict(scope["headers"])):
            return await respond(send, 403, {"error": f"a wrong or missing {TOKEN_HEADER}"})
        if self.app is not None:
            return await respond(send, 409, {"error": "this process has loaded a version already"})
        body = b""
        while (message := await receive())["type"] == "http.request":
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            uri = json.loads(body)["model_uri"]
            await asyncio.to_thread(self.use, uri)
        except StepError as exc:
            return await respond(send, 400, {"error": str(exc)})
        except (ValueError, KeyError, TypeError):
            return await respond(send, 400, {"error": "send {\"model_uri\": \"models:/<name>/<version>\"}"})
        await respond(send, 200, {"loaded": uri})


async def respond(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def create_app():
    """uvicorn's --factory: the app of the version $MNISTFLOW_SERVE_MODEL names, or a spare
    process that loads one when the serve step (token $MNISTFLOW_SERVE_TOKEN) asks."""
    if os.environ.get(PARENT_ENV, "").isdigit():
        die_with_parent(int(os.environ[PARENT_ENV]))
    log = inference_log.InferenceLog(os.environ[LOG_ENV]) if os.environ.get(LOG_ENV) else None
    process = Process(os.environ.get(TOKEN_ENV, ""), os.environ.get(KEYS_ENV, ""), log)
    if os.environ.get(MODEL_ENV):
        process.use(os.environ[MODEL_ENV])
    elif os.environ.get(WARM_ENV):
        # A first load imports and caches for seconds (the store, torch.export's loader, MLflow's
        # check of the installed packages); a spare does it now, on the version serving, and forgets it.
        version_app(os.environ[WARM_ENV])
    return process
