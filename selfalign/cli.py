"""What every stage script shares at its front door: one logging setup and the params options."""

from __future__ import annotations

import logging

from selfalign.params import params_option, set_option  # noqa: F401  (stages take both from here or params)

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    """One log line format for every stage (dvc repro interleaves them), timestamped to read a run's pace."""
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt="%H:%M:%S")
