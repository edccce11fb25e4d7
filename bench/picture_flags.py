"""The flags of a bench that scores a model on seeded test pictures: --n, --seed and --data_dir,
and their one-line refusals (robustness.py, read_numbers.py, abstain.py)."""
import argparse

from mnistflow.config import SEEDS


def add(parser: argparse.ArgumentParser, n: int, what: str) -> None:
    """--n (`what`, `n` by default), --seed and --data_dir."""
    parser.add_argument("--n", type=int, default=n, help=what)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", "--data-dir", default="")


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One line and exit 2 for an --n below 1 or a --seed numpy does not take."""
    if args.n < 1:
        parser.error(f"--n {args.n} is not allowed; it must be >= 1")
    if not 0 <= args.seed < SEEDS:
        parser.error(f"--seed {args.seed} is not allowed; it must be in [0, {SEEDS - 1}]")
