"""Locust's user for bench/load.py (the load of bench/serving.py and tests/test_serve.py): one
picture per request to the serve step's /predict, at a steady rate, each answer written as
`sent,status,version` to $SERVING_BENCH_LOG (read for which version answered when).

    SERVING_BENCH_PICTURE=digit.png SERVING_BENCH_LOG=answers.csv \
        locust -f bench/locustfile.py --headless --users 4 --spawn-rate 4 --host http://127.0.0.1:5001
"""
import os
import time

from locust import HttpUser, constant_throughput, task

PICTURE = open(os.environ["SERVING_BENCH_PICTURE"], "rb").read()
LOG = open(os.environ["SERVING_BENCH_LOG"], "a", buffering=1)
RATE = float(os.environ.get("SERVING_BENCH_RATE_PER_USER", "6"))


class PictureSender(HttpUser):
    wait_time = constant_throughput(RATE)

    @task
    def predict(self):
        sent = time.time()
        with self.client.post("/predict", files={"picture": ("digit.png", PICTURE, "image/png")},
                              catch_response=True) as response:
            LOG.write(f"{sent:.4f},{response.status_code},{response.headers.get('X-Model-Version', '')}\n")
