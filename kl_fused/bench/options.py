"""What every benchmark mode shares on the command line: the Mode record a mode registers, the
dtype names, and the parsing helpers for comma lists, positive integers and the device."""

import argparse
import os
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
DEVICE_TYPES = ("cpu", "cuda")
DEFAULT_REPS = {"cpu": 10, "cuda": 50}


@dataclass(frozen=True)
class Mode:
    """One kind of measurement. The command line has one flag per mode (the default mode has none);
    cli.py lists the modes, and a new one is a file that defines its Mode plus one line there.

    add_arguments(parser) adds the mode's own flags; selected(args) says whether the parsed
    arguments ask for it; resolve(args) validates and resolves the mode's options in place
    (raising ValueError with a message for the user); run(args, environment) runs it and returns
    the exit code. providers maps the names --providers accepts to their descriptions.
    """

    name: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    selected: Callable[[argparse.Namespace], bool]
    resolve: Callable[[argparse.Namespace], None]
    run: Callable[[argparse.Namespace, dict], int]
    providers: Mapping[str, str]


def comma_list(text):
    return [item.strip() for item in text.split(",") if item.strip()]


def positive_int(text, what):
    if not text.strip().isdigit() or int(text) == 0:
        raise ValueError(f"{what} must be a positive integer, got {text!r}")
    return int(text)


def positive_ints(text, what):
    return [positive_int(item, what) for item in comma_list(text)]


def choices(text, allowed, what):
    chosen = comma_list(text)
    unknown = [item for item in chosen if item not in allowed]
    if unknown or not chosen:
        raise ValueError(f"unknown {what} {unknown or text!r}; choose from {list(allowed)}")
    return chosen


def resolve_device(text):
    try:
        device = torch.device(text or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:  # torch's message lists the device types it knows
        raise ValueError(f"--device {text}: {error}") from None
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"--device must be cpu or cuda, got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    return device


def check_output_path(path, flag):
    """An output file the run will write at its end: its directory must exist and be writable, and it
    must not be a directory, so that a long run does not end in a traceback. Nothing is created."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a directory; give a file path")
    if not os.path.isdir(directory):
        raise ValueError(f"{flag} {path}: the directory {directory} does not exist")
    if not os.access(directory, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"{flag} {path} is not writable")


def available_providers(names, providers, device):
    """The names among `names` whose provider (providers[name].unavailable_reason(device) is None)
    can run on `device`, printing why each other one is skipped."""
    available = []
    for name in names:
        reason = providers[name].unavailable_reason(device)
        if reason is None:
            available.append(name)
        else:
            print(f"note: skipping provider '{name}': {reason}")
    return available
