"""ingest streams: a JSON array is decoded a chunk at a time and text documents a line at a time, giving exactly
the units (line, object or error, raw) that the whole-file readers at b6ab84d gave (tests/stream_reference.py),
on well-formed and broken files, with chunks small enough that every item crosses a chunk boundary; and the
ingest stage's outputs on the embedded default are the same bytes."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import stream_reference

from selfalign import ingest, io, params, readers

ROOT = Path(__file__).resolve().parent.parent


def units(it) -> list:
    """Units with errors made comparable (an exception compares by identity)."""
    return [
        (n, (o.path, o.line, o.reason, o.raw, o.code) if isinstance(o, io.JsonlLineError) else o, raw)
        for n, o, raw in it
    ]


def streamed(path: Path, chunk: int) -> list:
    with io.open_text(path) as f:
        return units(readers._array_units(str(path), f, chunk))


def array_texts() -> list[bytes]:
    rng = random.Random(0)
    items = [
        {
            "prompt": f"question {i} " + "x" * rng.randint(0, 40),
            "n": rng.randint(-(10**6), 10**6),
            "f": 1.5e-3,
            "nested": {"a": [1, 2, {"b": "ü ✓ 中文"}]},
        }
        for i in range(30)
    ]
    pretty = json.dumps(items, ensure_ascii=False, indent=2)
    compact = json.dumps(items, ensure_ascii=False)
    return [
        pretty.encode(),
        compact.encode(),  # several lines; one line (columns count from the line's start)
        ("\ufeff \n" + pretty).encode(),  # a BOM and blank space before the array
        compact.replace("}, {", "},\n\n   {", 5).encode(),
        json.dumps([1, "two", {"three": 3}, [4], 12345678901234567890, None]).encode(),  # non-objects; a long number
        pretty[:-40].encode(),  # cut off: the rest of the file is one error
        compact.replace("}, {", "} {", 1).encode(),  # a missing comma
        pretty.replace('"n": ', '"n": ,', 1).encode(),  # a syntax error inside an item
        pretty.encode().replace("ü".encode(), b"\xfc", 1),  # a byte that is not UTF-8 inside a string
        pretty.encode()[:-30] + b"\xff\xfe garbage",  # and one in a broken tail
        b"[" + b"[" * 3000 + b"]" * 3000 + b"]",  # nested too deeply
        b"[]",
        b"  [ ]  ",
        b"[",
        b"[{}",
        b'[{"a": 1},]',
    ]


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_json_array_units_match_the_whole_file_reader(tmp_path, chunk):
    for i, data in enumerate(array_texts()):
        path = tmp_path / f"a{i}.json"
        path.write_bytes(data)
        want = units(stream_reference.json_units(str(path)))
        assert streamed(path, chunk) == want, (i, chunk)
        assert units(readers.json_units(str(path))) == want


def test_json_array_errors_name_the_right_line_and_column_after_trimming(tmp_path):
    items = [{"k": "v" * 50} for _ in range(200)]
    text = json.dumps(items)  # one long line
    cut = text.index("}, {", 8000) + 3
    bad = text[:cut] + "@" + text[cut:]  # at column ~8,000 of line 1, after items the streaming reader dropped
    path = tmp_path / "one_line.json"
    path.write_text(bad, encoding="utf-8")
    want = units(stream_reference.json_units(str(path)))
    got = streamed(path, 256)
    assert got == want
    assert got[-1][1][1] == 1 and got[-1][1][2] == f"invalid JSON: Expecting value at column {cut + 1}"


def text_files() -> list[bytes]:
    rng = random.Random(1)
    pieces = ["word", "Phrase here.", "", "", " ", "\t", "  x", "y  ", "\u2028sep", "é", "\r", "\r\n"]
    out = []
    for _ in range(150):
        out.append("\n".join(rng.choice(pieces) for _ in range(rng.randint(0, 12))).encode())
    out += [
        b"",
        b"\n",
        b"a\n\nb\n",
        b"a\n \n\n  b",
        b"a \n\nb",
        b"a\n\t\n \nb",
        b"a\n\xff\n\nb\n",
        b"one\ntwo\n",
        b"p1 line1\np1 line2\n\n\n\np2\xe9 bad\n",
        b"last line no newline",
    ]
    return out


@pytest.mark.parametrize("documents", ["auto", "line", "blank"])
def test_text_documents_match_the_whole_file_reader(tmp_path, documents):
    for i, data in enumerate(text_files()):
        path = tmp_path / f"t{i}.txt"
        path.write_bytes(data)
        want = units(stream_reference.text_documents(str(path), documents))
        assert units(readers.text_documents(str(path), documents)) == want, (i, data)


def test_ingest_outputs_on_the_embedded_default_match_the_old_readers(tmp_path, monkeypatch):
    cfg = params.resolve(ingest.IngestConfig, ROOT / "params.yaml", "ingest")
    options = cfg.reader_options()

    def run(out: Path) -> dict:
        out.mkdir()
        with io.jsonl_writer(out / "records.jsonl") as write, io.jsonl_writer(out / "rejected.jsonl") as rej:
            for src in cfg.resolved_sources():
                ingest.ingest_source(src.replace(path=str(ROOT / src.path)), options, write, rej)
        return {p.name: p.read_bytes() for p in out.iterdir()}

    new = run(tmp_path / "new")
    monkeypatch.setattr(readers, "json_units", stream_reference.json_units)
    monkeypatch.setattr(readers, "text_documents", stream_reference.text_documents)
    old = run(tmp_path / "old")
    assert new == old and new["records.jsonl"].count(b"\n") > 150


@pytest.mark.slow
def test_a_large_json_array_is_read_in_bounded_memory(tmp_path):
    """A 200 MB array through the canonical reader: the reader's peak RSS stays far below the file's size."""
    path = tmp_path / "big.json"
    item = {
        "id": "",
        "kind": "prompt",
        "prompt": "Tell me about the sea. " * 40,
        "lang": "en",
        "source": "x",
        "meta": {},
    }
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n")
        for i in range(200_000):
            f.write(("," if i else "") + json.dumps({**item, "prompt": f"{i} {item['prompt']}"}) + "\n")
        f.write("]\n")
    size_mb = path.stat().st_size / 1e6
    code = (
        f"from selfalign import progress, readers; n = sum(1 for _ in readers.json_units({str(path)!r})); "
        "print(n, progress.peak_rss_mb())"
    )  # not ru_maxrss: it carries pytest's peak over fork and exec
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    n, rss_mb = out.split()
    assert int(n) == 200_000 and size_mb > 180
    assert float(rss_mb) < 150, f"peak RSS {rss_mb} MB reading a {size_mb:.0f} MB array"
