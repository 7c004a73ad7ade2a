"""selfalign.progress: the records/s line on a TTY and in a log, and peak RSS."""

import io
import logging

from selfalign import progress


def test_track_yields_everything_and_reports_rate_and_eta_on_a_tty():
    out = io.StringIO()
    got = list(progress.track(range(5), desc="clean", every_s=0, tty=True, stream=out))
    assert got == [0, 1, 2, 3, 4]
    text = out.getvalue()
    assert "\rclean: 1/5 records" in text and "ETA" in text and "records/s" in text
    assert text.endswith("\x1b[K\n") and "clean: 5/5 records" in text.splitlines()[-1]


def test_track_logs_when_not_a_tty(caplog):
    with caplog.at_level(logging.INFO, logger="progress"):
        list(progress.track(iter(range(3)), desc="ingest", log_every_s=0, tty=False, stream=io.StringIO()))
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("ingest: 3 records") and "done in" in line for line in lines)
    assert len(lines) == 4  # one per record (log_every_s=0) and the closing line


def test_peak_rss_grows_with_a_big_allocation_and_rates_names_it():
    before = progress.peak_rss_mb()
    block = bytearray(200 * 1024 * 1024)
    block[::4096] = b"x" * len(block[::4096])  # touch every page so it is resident
    assert progress.peak_rss_mb() >= before + 150 or before > 200
    r = progress.rates(1000, 2.0)
    assert r["records_per_s"] == 500.0 and r["peak_rss_mb"] >= 200
    assert progress.rates(0, 0)["records_per_s"] is None
