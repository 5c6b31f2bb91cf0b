"""Usage errors through the installed console script: exit 2, one line on stderr, no traceback.

Each case is a mistake a user makes on the command line (unknown option, missing value, value
out of range, wrong type, bad choice, unknown subcommand, malformed KEY=VALUE...), caught by
click/typer or by the command before any model loads. Run as a subprocess so the real entry
point, with the installed typer and click, is what is tested.
"""

from __future__ import annotations

import pytest
from conftest import assert_one_line_error, run_console

USAGE_ERRORS = [
    (["evaluate", "--bogus"], ["no such option", "--bogus", "promptbench evaluate --help"]),
    (["evaluate", "--draws"], ["--draws", "requires an argument", "promptbench evaluate"]),
    (["evaluate", "--draws", "0"], ["invalid value for '--draws'", "1"]),
    (["evaluate", "--bootstrap", "-1"], ["invalid value for '--bootstrap'", "0"]),
    (["evaluate", "--seed", "x"], ["--seed", "integer"]),
    (["evaluate", "--amp=3"], ["--amp", "does not take a value"]),
    (["evaluate", "surplus"], ["unexpected extra argument", "surplus"]),
    (["list", "models"], ["'models' is not one of", "learners"]),
    (["list"], ["missing argument", "learners"]),
    (["frob"], ["no such command", "frob"]),
    (["report"], ["missing argument", "file"]),
    (["report", "--csv"], ["--csv", "requires an argument"]),
    (["train", "--epochs", "0"], ["invalid value for '--epochs'", "1"]),
    (["train", "--method-opt", "weighting"], ["--method-opt must be KEY=VALUE", "weighting"]),
    (["train", "--learner-opt", "=3"], ["--learner-opt must be KEY=VALUE"]),
    (["train", "--method", "ermm"], ["unknown method", "did you mean 'erm'"]),
    (["compare", "--shots", "many"], ["--shots", "integer"]),
    (["compare", "--bogus"], ["no such option", "promptbench compare"]),
]


@pytest.mark.parametrize(("args", "needles"), USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_usage_error_is_one_line_and_exit_code_2(args, needles, tmp_path):
    assert_one_line_error(run_console(*args, cwd=tmp_path, timeout=120), *needles)


def test_bare_command_shows_help():
    proc = run_console(timeout=120)
    assert "Usage" in proc.stdout and "evaluate" in proc.stdout and "Traceback" not in proc.stderr
