"""A steady Locust load on the serve step's /predict, in the background: Locust's own runner
(bench/locustfile.py, one picture a request), and who answered each request when. bench/serving.py
and tests/test_serve.py put their load on with it.

    load = Load("http://127.0.0.1:5001", png_bytes, folder)
    ... move the alias ...
    answers = load.stop()   # [(sent, status, version), ...]; status 0: no answer at all
"""
import os
import signal
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


class Load:
    def __init__(self, url: str, picture: bytes, folder: str, users: int = 4, rate_per_user: float = 6,
                 env: dict | None = None, minutes: int = 60):
        """`users` Locust users, each sending `rate_per_user` requests a second at most, for
        `minutes` at most (bounded, whatever the caller does)."""
        self.log = os.path.join(folder, "answers.csv")
        picture_path = os.path.join(folder, "load-picture.png")
        with open(picture_path, "wb") as f:
            f.write(picture)
        locust = os.path.join(os.path.dirname(sys.executable), "locust")
        self.process = subprocess.Popen(
            [locust, "-f", os.path.join(HERE, "locustfile.py"), "--headless", "--users", str(users),
             "--spawn-rate", str(users), "--host", url, "--run-time", f"{minutes}m", "--only-summary",
             "--loglevel", "ERROR"], cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**(env or os.environ), "SERVING_BENCH_PICTURE": picture_path, "SERVING_BENCH_LOG": self.log,
                 "SERVING_BENCH_RATE_PER_USER": str(rate_per_user)})

    @property
    def results(self) -> list[tuple[float, int, str]]:
        """(when sent, time.time(); HTTP status; the X-Model-Version that answered) of each answer so far."""
        if not os.path.exists(self.log):
            return []
        with open(self.log) as f:
            lines = f.read().split("\n")[:-1]  # the last is being written, or empty
        return [(float(sent), int(status), version) for sent, status, version in (line.split(",") for line in lines)]

    def stop(self) -> list[tuple[float, int, str]]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # Locust's own stop: requests in flight end
        self.process.wait(timeout=60)
        return self.results

    def rate(self) -> float:
        """Answers a second, from the first to the last."""
        answered = self.results
        return len(answered) / (answered[-1][0] - answered[0][0])
