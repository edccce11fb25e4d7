"""Command lines for steps and scripts: a parser that reports a bad flag in one line, the flags of a
settings dataclass with each one's meaning, and the checks of a file the command is to write.

A setting's default and meaning are written once, as the dataclass field (`setting`); `--help`
and docs/parameters.md's tables (`markdown_table`) are made from it. Nothing here loads PyTorch,
MLflow or matplotlib until it is needed, so reading flags answers fast.
"""
import argparse
import dataclasses
import os
import re
import tempfile

from mnistflow.errors import ConfigError


def setting(default, meaning: str):
    """A settings dataclass field: its default and what it means (Markdown, as docs/parameters.md shows it)."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"meaning": meaning})
    return dataclasses.field(default=default, metadata={"meaning": meaning})


def like(cls, name: str):
    """A field with the default and meaning of `cls`'s setting `name`: one a step passes on to another."""
    [field] = [field for field in dataclasses.fields(cls) if field.name == name]
    return setting(default_of(field), field.metadata["meaning"])


def default_of(field: dataclasses.Field):
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def as_parameter(value) -> str:
    """A default as `-P` and the command line take it: booleans true/false, an empty list as ""."""
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value == [] else str(value)


def shown_default(field: dataclasses.Field) -> str:
    """A field's default as `-P` takes it, `""` when empty."""
    return as_parameter(default_of(field)) or '""'


def plain(markdown: str) -> str:
    """A meaning for a terminal: links as their text, no backticks."""
    return re.sub(r"\[([^]]+)\]\([^)]+\)", r"\1", markdown).replace("`", "")


def markdown_table(cls) -> str:
    """The parameter table of a settings dataclass, as docs/parameters.md shows it."""
    rows = ["| parameter | default | meaning |", "| --- | --- | --- |"]
    for field in dataclasses.fields(cls):
        rows.append(f"| `{field.name}` | `{shown_default(field)}` | {field.metadata['meaning']} |")
    return "\n".join(rows)


def parse_bool(text: str) -> bool:
    # MLflow passes every parameter as a string, so `-P register=true` arrives as "true".
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no", ""):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean; use true or false")


class OneLineParser(argparse.ArgumentParser):
    """Reports a bad flag in one line (not usage + error) and exits with code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field, spelt --max_train_samples or --max-train-samples, its help the field's meaning."""
    for field in dataclasses.fields(cls):
        flags = [f"--{field.name}"] + ([f"--{field.name.replace('_', '-')}"] if "_" in field.name else [])
        # argparse %-formats help texts.
        help_text = f"{plain(field.metadata['meaning'])} (default: {shown_default(field)})".replace("%", "%%")
        if field.type == list[str]:
            parser.add_argument(*flags, dest=field.name, nargs="+", default=[], help=help_text)
        else:
            kind = parse_bool if field.type is bool else field.type
            parser.add_argument(*flags, dest=field.name, type=kind, default=field.default, help=help_text)


def from_args(args: argparse.Namespace, cls):
    return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})


def parse(cls, prog: str, description: str, argv=None):
    """A step's flags as its checked config (`cls(...).validate()`); a bad value exits with one line and code 2."""
    parser = OneLineParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, cls)
    cfg = from_args(parser.parse_args(argv), cls)
    try:
        return cfg.validate()
    except ConfigError as exc:
        parser.exit(2, f"{prog}: error: {exc}\n")


def unwritable(path: str) -> str:
    """Why no file can be written at `path` ("" when it can, or when no path is given); leaves nothing behind."""
    if not path:
        return ""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return "it is a folder"
    if not os.path.isdir(folder):
        return f"no folder {folder}"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return "the file is read-only"
    name_max = os.pathconf(folder, "PC_NAME_MAX")
    if len(os.fsencode(os.path.basename(path))) > name_max:
        return f"its name is longer than the {name_max} bytes {folder} allows"
    try:
        tempfile.TemporaryFile(dir=folder).close()  # what the folder allows, even to root on a read-only disk
    except OSError as exc:
        return f"{folder}: {exc.strerror}"
    return ""


def unwritable_image(path: str) -> str:
    """Why no figure can be saved at `path` ("" when one can, or when no path is given): what
    `unwritable` says, or a name that does not end in a format matplotlib writes (without one,
    matplotlib would add .png to the name)."""
    if not path:
        return ""
    # Imported here: reading the flags of steps that draw nothing needs no matplotlib.
    from matplotlib.backend_bases import FigureCanvasBase

    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if os.path.splitext(path)[1][1:].lower() not in formats:
        return "its name must end in a format matplotlib writes: " + ", ".join(f".{name}" for name in formats)
    return unwritable(path)
