"""The `evaluate` step: any logged or registered model on a dataset's test split, as a run of its own.

    python -m steps.evaluate --model_uri models:/MNIST_CNN@production
    python -m steps.evaluate --model_uri runs:/<run_id>/model --dataset mnist
    mlflow run . -e evaluate -P model_uri=models:/MNIST_CNN/3 --env-manager local

The model is scored on the dataset it was trained on (its metadata says which); a dataset
given that is another one is refused. Only models mnistflow logs are loaded unless
allow_pickled_models=true (see mnistflow/logged_model.py).

The run holds test_loss, test_accuracy, per-class precision/recall/F1, the classification
report and the confusion matrix, exactly as a train run does, so the two compare side by side.
"""
from mnistflow import cli
from mnistflow.config import EvaluateConfig


def evaluate(cfg: EvaluateConfig) -> None:
    # Here, not at the top: --help and a bad flag answer without loading torch or MLflow.
    import mlflow

    from mnistflow import data as datasets, logged_model, report, tracking

    model = logged_model.load(cfg.model_uri, cfg.allow_pickled_models)
    dataset = logged_model.dataset_for(model, cfg.model_uri, cfg.dataset)
    data = datasets.load(dataset, cfg.data_dir)

    # Its params hold the dataset as given ("" = the model's); the one scored is resolved_dataset.
    with tracking.step_run(f"evaluate-{dataset}", cfg, "development", dataset=dataset, data=data, contexts=("test",),
                           tags={"model_uri": cfg.model_uri}) as (run, _):
        mlflow.log_params({"resolved_dataset": dataset, "test_size": len(data.test)})
        log_probs = logged_model.log_probabilities(model, data.pixels(data.test).numpy())
        results = report.log_test_scores(log_probs, data)
    print(f"evaluated {cfg.model_uri} on the {dataset} test set ({len(data.test)} images): "
          f"test_accuracy={results['test_accuracy']:.4f} test_loss={results['test_loss']:.4f}; run {run.info.run_id}",
          flush=True)


def main(argv=None) -> None:
    cli.run("evaluate", evaluate, EvaluateConfig, __doc__, argv)


if __name__ == "__main__":
    main()
