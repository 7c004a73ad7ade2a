"""One check for every stage: a bad value on the command line is a one-line usage error, before any work."""

from __future__ import annotations

import time

from click.testing import CliRunner


def assert_rejected(main, args: list[str], setting: str, *expect: str) -> str:
    """Run a stage's click `main` with `--set setting`; it must exit 2 within a second with one error line
    naming the key and the value (and any `expect` words, e.g. what is allowed). Returns the line."""
    start = time.perf_counter()
    result = CliRunner().invoke(main, [*args, "--set", setting])
    elapsed = time.perf_counter() - start
    assert result.exit_code == 2, (setting, result.exit_code, result.output, result.exception)
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, result.output
    key, value = setting.split("=", 1)
    line = lines[0]
    assert key.split(".")[-1] in line, (setting, line)
    if "unknown key" not in line:  # a typo'd key is named with the keys allowed; its value means nothing
        assert value in line or repr(value) in line, (setting, line)
    for word in expect:
        assert word in line, (word, line)
    assert elapsed < 1.0, f"{setting}: rejected after {elapsed:.2f} s"
    return line
