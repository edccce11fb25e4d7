"""Plot a run's loss curves and log the PNG back to that run.

    python researcher/log_plot.py --run-id <id>         # or --run_id <id>
    python researcher/log_plot.py --config cfg/log_plot.yaml --run-id <id> --out loss.png

A train run (or example 1) gets its step-level loss and per-epoch train/validation loss with the
epoch boundaries marked; a parent run (a tune study, example 2) its trials' validation losses
overlaid. The same code runs as the project's `plot_loss` step: mnistflow/plot_loss.py.
"""
import helpers
from mnistflow.errors import StepError
from mnistflow.flags import unwritable_image
from mnistflow.plot_loss import ARTIFACT, save_and_log

config = helpers.load_config("log_plot.yaml")
helpers.use_tracking(config)
if not config["run_id"]:
    helpers.error("give a run id: --run-id <id>")
out = config["out"] or f"plot_loss_{config['run_id']}.png"
if unwritable_image(out):  # before any drawing
    helpers.error(f"out={out}: cannot write this file ({unwritable_image(out)})")
try:
    save_and_log(config["run_id"], out)  # saved first: logged only once written
except StepError as exc:
    helpers.error(str(exc))
print(f"wrote {out} and logged it to run {config['run_id']} as {ARTIFACT}")
