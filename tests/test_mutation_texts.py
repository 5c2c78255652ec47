"""The mutation check (tests/simt/mutation_check.py) names each injected bug by the exact text it
replaces; a refactor that rewrites that text turns the mutant STALE, and the check then tests
nothing. Only the `--ci` subset runs in `make test`, so every mutation's text is checked here, in
milliseconds, against the sources it mutates."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from simt import mutation_check  # noqa: E402


@pytest.mark.parametrize("mutation", mutation_check.MUTATIONS, ids=lambda m: m.name)
def test_mutation_text_occurs_exactly_once(mutation):
    source = (mutation_check.CUDA / mutation.file).read_text()
    assert source.count(mutation.old) == 1, (
        f"{mutation.name}: its text occurs {source.count(mutation.old)} times in {mutation.file}"
    )
    assert mutation.new != mutation.old


def test_mutation_names_are_unique():
    names = [m.name for m in mutation_check.MUTATIONS]
    assert len(names) == len(set(names))
