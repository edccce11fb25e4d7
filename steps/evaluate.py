"""The `evaluate` step: any logged or registered model on a dataset's test split, as a run of its own.

    python -m steps.evaluate --model_uri models:/MNIST_CNN@production
    python -m steps.evaluate --model_uri runs:/<run_id>/model --dataset mnist
    mlflow run . -e evaluate -P model_uri=models:/MNIST_CNN/3 --env-manager local

The model is scored on the dataset it was trained on (its metadata says which); a dataset
given that is another one is refused. Only models mnistflow logs are loaded unless
allow_pickled_models=true (see mnistflow/inference.py).

The run holds test_loss, test_accuracy, per-class precision/recall/F1, the classification
report and the confusion matrix, exactly as a train run does, so the two compare side by side.
"""
import gc
import sys

import mlflow

from mnistflow import data as datasets
from mnistflow import inference, tracking
from mnistflow.config import ConfigError, EvaluateConfig, parse
from mnistflow.data import DataError


def main(argv=None) -> None:
    cfg = parse(EvaluateConfig, "evaluate", __doc__, argv)
    try:
        model = inference.load(cfg.model_uri, cfg.allow_pickled_models)
        dataset = inference.dataset_for(model, cfg.model_uri, cfg.dataset)
        data = datasets.load(dataset, cfg.data_dir)
    except (ConfigError, DataError) as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        sys.exit(2)

    with tracking.tracked_run(run_name=f"evaluate-{dataset}") as (run, _):
        tracking.log_config(cfg)  # dataset as given ("" = the model's); the one scored is resolved_dataset
        mlflow.log_params({"resolved_dataset": dataset, "test_size": len(data.test)})
        mlflow.set_tags({**tracking.run_tags("development", dataset), "model_uri": cfg.model_uri})
        tracking.log_datasets(data, contexts=("test",))
        results = tracking.log_test_scores(inference.log_probabilities(model, data.pixels(data.test).numpy()), data)
    print(f"evaluated {cfg.model_uri} on the {dataset} test set ({len(data.test)} images): "
          f"test_accuracy={results['test_accuracy']:.4f} test_loss={results['test_loss']:.4f}; run {run.info.run_id}",
          flush=True)
    gc.freeze()  # skip the slow final garbage collection at exit (see steps/train.py)


if __name__ == "__main__":
    main()
