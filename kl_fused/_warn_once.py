"""Warnings said once per process and key (a fallback is worth one line, not one per step)."""

import warnings

_said = set()


def warn_once(key, message, stacklevel=3):
    """RuntimeWarning `message` the first time `key` is seen. The default stacklevel points at the
    caller of the public function that calls this."""
    if key in _said:
        return
    _said.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


def forget(key):
    """Lets `key` warn again (for tests)."""
    _said.discard(key)
