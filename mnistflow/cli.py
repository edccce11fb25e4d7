"""What every step does around its work: read its flags, make sure the tracking server lets this
client in, report what stopped it in one line with an exit code, and exit fast.
"""
import gc
import sys

from mnistflow import auth, flags
from mnistflow.errors import StepError


def run(prog: str, step, config_class, description: str, argv=None) -> None:
    """`step(cfg)` with the config its flags give (see mnistflow/config.py); a StepError is one line
    on stderr, `<prog>: error: <message>` (`refused` for a refusal), and the error's exit code."""
    cfg = flags.parse(config_class, prog, description, argv)
    try:
        auth.check_access()
        step(cfg)
    except StepError as exc:
        print(f"{prog}: {exc.verdict}: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
    # Python's last garbage collection at exit walks every object torch and mlflow made, for
    # seconds; frozen objects are skipped, and the OS frees the memory anyway.
    gc.freeze()
