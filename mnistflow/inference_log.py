"""The inference log: one row per prediction the serve step made (when, which version, how fast,
what it answered and how sure it was, and a few numbers that describe the picture), and the true
label once feedback gives it. The monitor compares these rows with the model's reference.

Each model process hands its rows to a writer thread (`InferenceLog.record`), which inserts them
in batches: a prediction never waits for the database. When the database is slow or gone, rows
are dropped and counted (`dropped`), never a prediction. Any SQLAlchemy URL: SQLite by default,
PostgreSQL on a shared server (its password in PGPASSWORD or ~/.pgpass, never in the URL).
"""
import os
import queue
import threading
import time

import numpy as np
from PIL import Image

from mnistflow import images
from mnistflow.errors import StepError

TABLE = "predictions"
# What describes a picture, compact enough to keep for every prediction: of the ink in the picture
# as sent (images.ink_of) and of what the model saw (images.fit). The picture itself is not kept.
FEATURES = {
    "picture_width": "the picture's width, pixels",
    "picture_height": "the picture's height, pixels",
    "ink_fraction": "the share of the picture's pixels that are ink",
    "box_width": "the ink's bounding box, as a share of the picture's width",
    "box_height": "the ink's bounding box, as a share of the picture's height",
    "box_x": "the bounding box's centre, as a share of the picture's width (0.5: centred)",
    "box_y": "the bounding box's centre, as a share of the picture's height (0.5: centred)",
    "input_mean": "the mean of the 28x28 input the model saw",
    "input_grey": "the share of the input's ink pixels that are grey (between 0.1 and 0.9): blur",
}
QUEUE_ROWS = 10_000  # rows waiting for the writer, at most; beyond it they are dropped
BATCH_S = 0.2  # the writer inserts what arrived in this long, in one transaction


class FeedbackError(StepError):
    """Feedback that cannot be taken: the message is one line for the client."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def features(ink: np.ndarray, model_input: np.ndarray) -> dict[str, float]:
    """FEATURES of one picture: `ink` from images.ink_of, `model_input` from images.fit. Few numpy
    calls: this runs in the request, for every picture."""
    height, width = ink.shape
    across, down = ink.any(axis=0), ink.any(axis=1)
    left, right = int(across.argmax()), width - int(across[::-1].argmax())
    top, bottom = int(down.argmax()), height - int(down[::-1].argmax())
    inked = model_input > 0.1
    inked_count = np.count_nonzero(inked)
    return {
        "picture_width": float(width), "picture_height": float(height),
        "ink_fraction": np.count_nonzero(ink) / ink.size,
        "box_width": (right - left) / width, "box_height": (bottom - top) / height,
        "box_x": (left + right) / 2 / width, "box_y": (top + bottom) / 2 / height,
        "input_mean": float(model_input.mean()),
        "input_grey": np.count_nonzero(inked & (model_input < 0.9)) / inked_count if inked_count else 0.0,
    }


def as_served(pixels: np.ndarray, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """(FEATURES (N, 9), model inputs (N, 28, 28)) of (N, 28, 28) [0, 1] pixels sent to the serve
    step as 28x28 PNGs would be: the reference a model's traffic is compared with."""
    rows, inputs = [], []
    for pixels_of_one in pixels:
        ink = images.ink_of(Image.fromarray(np.round(pixels_of_one * 255).astype(np.uint8)))
        inputs.append(images.fit(ink, dataset))
        rows.append(list(features(ink, inputs[-1]).values()))
    return np.array(rows, dtype=np.float64), np.stack(inputs)


def default_url(registry_uri: str) -> str:
    """The inference log's default: inference.db in the folder of a SQLite registry, else here."""
    folder = os.path.dirname(registry_uri.removeprefix("sqlite:///")) if registry_uri.startswith("sqlite:///") else ""
    return f"sqlite:///{os.path.join(folder, 'inference.db')}"


def table(metadata):
    import sqlalchemy as sa

    return sa.Table(
        TABLE, metadata,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("time", sa.Float, nullable=False, index=True),
        sa.Column("model_name", sa.String(256), nullable=False),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("class_index", sa.Integer, nullable=False),
        sa.Column("confidence", sa.Float, nullable=False),
        *(sa.Column(name, sa.Float, nullable=False) for name in FEATURES),
        sa.Column("label", sa.Integer),
        sa.Column("labelled_at", sa.Float),
    )


class InferenceLog:
    def __init__(self, url: str, create: bool = True):
        """The log at `url`, its table made when `create`; else StepError when it has none."""
        import sqlalchemy as sa

        database = sa.engine.make_url(url).database
        if not create and url.startswith("sqlite") and not os.path.isfile(database or ""):
            # Opening it would make an empty file.
            raise StepError(f"{url} holds no inference log: no such file; give the serve step's inference_log")
        self.engine = sa.create_engine(url, **({"connect_args": {"timeout": 5}} if url.startswith("sqlite") else {}))
        if url.startswith("sqlite"):
            sa.event.listen(self.engine, "connect", self.sqlite_settings)
        self.table = table(sa.MetaData())
        if create:
            self.table.metadata.create_all(self.engine)
        elif not sa.inspect(self.engine).has_table(TABLE):
            raise StepError(f"{url} holds no inference log; give the serve step's inference_log")
        self.columns = [column.name for column in self.table.columns if column.name not in ("label", "labelled_at")]
        marker = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"  # SQLite's, or psycopg2's
        self.insert = (f"INSERT INTO {TABLE} ({', '.join(self.columns)}) "
                       f"VALUES ({', '.join(marker for _ in self.columns)})")
        self.waiting, self.dropped, self.writer = queue.Queue(QUEUE_ROWS), 0, None

    @staticmethod
    def sqlite_settings(connection, _) -> None:
        # Several model processes write at once: WAL lets readers (the monitor) in meanwhile. A
        # commit need not wait for the disk (synchronous=NORMAL): a crash of the machine may lose
        # the last rows, never the database.
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")

    def record(self, row: dict) -> None:
        """Keep `row` (every column but label) once the writer gets to it; never blocks."""
        if self.writer is None:
            self.writer = threading.Thread(target=self.write, daemon=True)
            self.writer.start()
        try:
            self.waiting.put_nowait(row)
        except queue.Full:
            self.dropped += 1

    def write(self) -> None:
        from sqlalchemy.exc import SQLAlchemyError

        while True:
            batch = [self.waiting.get()]
            time.sleep(BATCH_S)
            while not self.waiting.empty() and len(batch) < QUEUE_ROWS:
                batch.append(self.waiting.get_nowait())
            try:
                with self.engine.begin() as connection:
                    # The driver's own executemany: half the time of SQLAlchemy's, in a thread
                    # that shares the interpreter with the requests.
                    connection.exec_driver_sql(self.insert, [tuple(row[name] for name in self.columns) for row in batch])
            except SQLAlchemyError:
                self.dropped += len(batch)

    def label(self, prediction_id: str, label: int, wait_s: float = 2.0) -> None:
        """Attach the true `label` (a class index) to the prediction `prediction_id`, once. A
        prediction made an instant ago may still be on its way to the database: waited for."""
        import sqlalchemy as sa

        deadline = time.monotonic() + wait_s
        while True:
            with self.engine.begin() as connection:
                # Only a row without a label changes: of two feedbacks at once, one wins.
                if connection.execute(self.table.update().where(
                        (self.table.c.id == prediction_id) & self.table.c.label.is_(None))
                        .values(label=label, labelled_at=time.time())).rowcount:
                    return
                found = connection.execute(sa.select(self.table.c.label)
                                           .where(self.table.c.id == prediction_id)).first()
            if found is not None:
                raise FeedbackError(f"prediction {prediction_id} has a label already ({found.label}); "
                                    "feedback is taken once", 409)
            if time.monotonic() > deadline:
                raise FeedbackError(f"no prediction with id {prediction_id!r} in the inference log", 404)
            time.sleep(0.1)

    def window(self, model_name: str, seconds: float = 0, rows: int = 0):
        """`model_name`'s predictions of the last `seconds`, or its newest `rows`: a pandas table."""
        import pandas
        import sqlalchemy as sa

        query = sa.select(self.table).where(self.table.c.model_name == model_name)
        if seconds:
            query = query.where(self.table.c.time >= time.time() - seconds)
        else:
            query = query.order_by(self.table.c.time.desc()).limit(rows)
        with self.engine.connect() as connection:
            return pandas.read_sql(query, connection)

    def prune(self, keep_days: float) -> int:
        """Delete the rows older than `keep_days`; how many."""
        with self.engine.begin() as connection:
            return connection.execute(self.table.delete().where(
                self.table.c.time < time.time() - keep_days * 86400)).rowcount
