"""The `serve` step: answer predictions with the registered model version an alias names, and
follow the alias when it moves, without a restart and without dropping a request.

    python -m steps.serve                                   # MNIST_CNN@production on 127.0.0.1:5001
    mlflow run . -e serve -P workers=4 --env-manager local
    curl -F picture=@digit.png http://127.0.0.1:5001/predict

Model processes (MLflow's scoring server, with a route for pictures: mnistflow/serving.py) sit
behind nginx; a new version takes traffic only once it has loaded and classified known pictures
right (mnistflow/rollout.py). Ctrl-C stops it all. See docs/serving.md.
"""
from mnistflow import cli
from mnistflow.config import ServeConfig


def serve(cfg: ServeConfig) -> None:
    from mnistflow import rollout  # here: --help and a bad flag answer without loading MLflow

    rollout.serve(cfg)


def main(argv=None) -> None:
    cli.run("serve", serve, ServeConfig, __doc__, argv)


if __name__ == "__main__":
    main()
