"""The ingest stage: every reader on real samples, web segmentation, conservation, stable ids, both CLIs."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from config_checks import assert_rejected
from stage_loader import load_stage

from selfalign import io, params, readers, records
from selfalign.ingest import IngestConfig

ROOT = Path(__file__).resolve().parent.parent
FIX = Path(__file__).resolve().parent / "fixtures" / "ingest"


ingest = load_stage("ingest")


def run(fmt: str, name: str, lang: str = "en", **options) -> tuple[list[dict], list[dict]]:
    path = FIX / name if (FIX / name).exists() else Path(name)
    items = list(readers.read(fmt, str(path), lang, "src", **options))
    kept = [r for r in items if not readers.is_rejected(r)]
    for r in kept:
        records.validate(r)
        assert fmt == "canonical" or r["id"] == records.record_id(r)  # canonical keeps given ids
    return kept, [r for r in items if readers.is_rejected(r)]


def reasons(rejected: list[dict]) -> list[tuple[str, int]]:
    return [(r["reason"], r["line"]) for r in rejected]


def roles(record: dict) -> str:
    return "".join(m["role"][0] for m in record["messages"])


# --- chat readers ---------------------------------------------------------------------------


def test_guanaco_keeps_single_turn_pairs_like_humpback():
    kept, rej = run("guanaco", "guanaco_best_path.jsonl")
    assert reasons(rej) == [("multi_turn", 1), ("multi_turn", 2)]
    assert rej[0]["file"].endswith("guanaco_best_path.jsonl") and "raw" in rej[0]
    lines = (FIX / "guanaco_best_path.jsonl").read_text().splitlines()
    text = json.loads(lines[2])["text"]
    human, assistant = text.split("### Assistant:")
    assert kept[0]["messages"] == [
        {"role": "user", "content": human.split("### Human:")[1].strip()},
        {"role": "assistant", "content": assistant.strip()},
    ]
    assert [r["meta"]["line"] for r in kept] == [3, 4, 5, 6]

    kept, rej = run("guanaco", "guanaco_best_path.jsonl", multi_turn=True)
    assert rej == [] and len(kept) == 6
    assert roles(kept[0]) == "uaua" and "### " not in json.dumps(kept[0]["messages"])


def test_oasst_follows_the_best_ranked_eligible_path(tmp_path):
    kept, rej = run("oasst", "oasst_trees.jsonl")
    assert reasons(rej) == [("ineligible_prompt", 1), ("no_reply", 4)]
    assert "synthetic" in rej[0]["detail"]
    tree = json.loads((FIX / "oasst_trees.jsonl").read_text().splitlines()[1])
    root = tree["prompt"]
    best = min((m for m in root["replies"] if m.get("rank") is not None), key=lambda m: m["rank"])
    assert kept[0]["messages"][:2] == [
        {"role": "user", "content": root["text"]},
        {"role": "assistant", "content": best["text"]},
    ]
    assert all(re.fullmatch(r"(ua)+", roles(r)) for r in kept)

    # the real tree has no deleted or rejected message; mark the best reply so, and the next best is taken
    for flag in ({"deleted": True}, {"review_result": False}):
        t = json.loads(json.dumps(tree))
        next(m for m in t["prompt"]["replies"] if m["message_id"] == best["message_id"]).update(flag)
        (tmp_path / "t.jsonl").write_text(json.dumps(t) + "\n")
        (rec,), _ = run("oasst", str(tmp_path / "t.jsonl"))
        second = min(
            (m for m in root["replies"] if m.get("rank") is not None and m is not best), key=lambda m: m["rank"]
        )
        assert rec["messages"][1]["content"] == second["text"] != best["text"]


def test_alpaca_array_and_jsonl():
    kept, rej = run("alpaca", "alpaca_first12.json")
    src = json.loads((FIX / "alpaca_first12.json").read_text())
    assert rej == [] and len(kept) == 12
    for r, s in zip(kept, src, strict=True):
        assert r["messages"][0]["content"] == (
            f"{s['instruction']}\n\n{s['input']}" if s["input"] else s["instruction"]
        )
        assert r["messages"][1]["content"] == s["output"]
    assert any(s["input"] for s in src)
    assert kept[1]["meta"]["line"] == 7  # each array item keeps the line it starts on

    kept, rej = run("alpaca", "chatdoctor_ms.jsonl", lang="ms")
    assert len(kept) == 4 and reasons(rej) == [("missing_field", 3)]
    assert "'instruction'" in rej[0]["detail"] and kept[0]["lang"] == "ms"


def test_self_instruct_seed_tasks_one_record_per_instance():
    kept, rej = run("self_instruct", "seed_tasks.jsonl")
    tasks = [json.loads(line) for line in (FIX / "seed_tasks.jsonl").read_text().splitlines()]
    assert rej == [] and len(kept) == sum(len(t["instances"]) for t in tasks) == 4
    assert kept[0]["meta"]["orig_id"] == "seed_task_0" and kept[0]["meta"]["instance"] == 0
    assert kept[0]["messages"][1]["content"] == tasks[0]["instances"][0]["output"]


def test_sft_reads_gpt4all_and_rejects_its_two_broken_lines():
    kept, rej = run("sft", "gpt4all_ms.jsonl", lang="ms")
    assert reasons(rej) == [("invalid_json", 3), ("invalid_json", 8)]
    assert all(r["file"] == str(FIX / "gpt4all_ms.jsonl") and r["raw"] for r in rej)
    assert "Extra data" in rej[0]["detail"]
    assert len(kept) + len(rej) == 10  # records in = kept + rejected, one per line
    assert kept[0]["meta"]["orig_source"] == "bigscience/p3"  # gpt4all's own `source` field, kept

    kept, rej = run("sft", "mschatgpt_sft.jsonl", lang="ms")
    assert len(kept) == 4 and reasons(rej) == [("missing_field", 3)] and "'prompt'" in rej[0]["detail"]
    assert "tokens" in kept[0]["meta"]


def test_conversation_text_in_korean_and_malay():
    kept, rej = run("conversation", "kochatgpt_conversation.txt", lang="ko")
    assert rej == [] and [roles(r) for r in kept] == ["uauauaua"] * 3
    assert kept[0]["messages"][0]["content"] == "괜찮습니다. 무엇을 도와드릴까요?"

    kept, rej = run("conversation", "mychatgpt_conversation.txt", lang="ms")
    assert reasons(rej) == [("invalid_record", 40), ("invalid_record", 51), ("invalid_record", 62)]
    assert all(r["detail"].startswith("turns: ") for r in rej) and "empty" in rej[2]["detail"]
    assert [r["meta"]["line"] for r in kept] == [1, 9, 19, 29, 63]
    assert kept[1]["messages"][0]["content"].startswith("Akan saya lakukan")  # `Orang:` without brackets
    assert roles(kept[2]) == "uauauaua"  # `<Chabot>:`
    assert kept[3]["meta"]["dropped_turn"].startswith("Oleh karena itu")  # trailing user turn kept in meta
    assert roles(kept[3]) == "uauauaua"


def test_vigogne_messages_and_a_system_role(tmp_path):
    kept, rej = run("messages", "vigogne_chat.jsonl", lang="fr")
    assert rej == [] and [roles(r) for r in kept] == ["ua", "ua", "uaua"]
    assert kept[0]["meta"]["orig_id"] == "oasst-20230412-fr-00000000"

    real = json.loads((FIX / "vigogne_chat.jsonl").read_text().splitlines()[0])
    with_system = {**real, "messages": [{"role": "system", "content": "Tu es Vigogne."}] + real["messages"]}
    bad_role = {**real, "messages": [{"role": "bot", "content": "x"}]}
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(o) for o in (with_system, bad_role)) + "\n")
    (rec,), (bad,) = run("messages", str(tmp_path / "c.jsonl"), lang="fr")
    assert rec["system"] == "Tu es Vigogne." and rec["messages"] == kept[0]["messages"] and rec["id"] != kept[0]["id"]
    assert bad["reason"] == "wrong_field" and "messages[0].role" in bad["detail"] and bad["line"] == 2


# --- preference and prompt readers ----------------------------------------------------------


def test_rm_expands_a_ranking_to_all_ordered_pairs():
    kept, rej = run("rm", "mschatgpt_rm.jsonl", lang="ms")
    assert reasons(rej) == [("missing_field", 4), ("wrong_field", 5)]
    assert "'ranking'" in rej[0]["detail"] and "'ranking'" in rej[1]["detail"]
    first = json.loads((FIX / "mschatgpt_rm.jsonl").read_text().splitlines()[0])
    pairs = [r for r in kept if r["meta"]["line"] == 1]
    assert len(pairs) == 3 and len(kept) == 9  # 3 completions -> 3 ordered pairs, per good line
    best, mid, worst = (first[f"completion_{i}"] for i in first["ranking"])  # ranking: indices, best first
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(best, mid), (best, worst), (mid, worst)]
    assert all(p["prompt"] == first["prompt"] and p["kind"] == "preference" for p in pairs)


@pytest.mark.parametrize(
    "line,order,off_topic",
    [
        (2, [2, 0, 1], "Pada kesempatan itu, terjadi puncak pencarian di Google."),  # "how many blocks?" -> Google
        (3, [1, 2, 0], "Diameter domain metalik lebih besar dari domain hiperonik."),  # "which candidate?" -> metals
    ],
)
def test_rm_ranking_lists_indices_best_first_on_3_cycles(line, order, off_topic):
    """The rows where the two readings of `ranking` disagree: KoChatGPT's generator put the k-th best answer at
    completion_{ranking[k]}; reading ranking[i] as completion_i's rank would prefer the off-topic answer."""
    src = json.loads((FIX / "mschatgpt_rm.jsonl").read_text().splitlines()[line - 1])
    assert src["ranking"] == order
    by_rank = sorted(range(3), key=lambda i: order[i])  # the other reading: ranking[i] = rank of completion_i
    assert by_rank != order
    kept, _ = run("rm", "mschatgpt_rm.jsonl", lang="ms")
    pairs = [(p["chosen"], p["rejected"]) for p in kept if p["meta"]["line"] == line]
    best, mid, worst = (src[f"completion_{i}"] for i in order)
    assert pairs == [(best, mid), (best, worst), (mid, worst)]
    assert worst == off_topic and all(
        rejected == off_topic for chosen, rejected in pairs if off_topic in (chosen, rejected)
    )
    assert [(p["meta"]["chosen_index"], p["meta"]["rejected_index"]) for p in kept if p["meta"]["line"] == line] == [
        (order[0], order[1]),
        (order[0], order[2]),
        (order[1], order[2]),
    ]


def test_sharegpt_preference_keeps_system_and_rejects_multi_turn():
    kept, rej = run("sharegpt_preference", "dpo_en_demo_first12.json")
    src = json.loads((FIX / "dpo_en_demo_first12.json").read_text())
    multi = [i for i, s in enumerate(src) if sum(m["from"] == "human" for m in s["conversations"]) > 1]
    assert len(rej) == len(multi) > 0 and {r["reason"] for r in rej} == {"multi_turn"}
    assert len(kept) + len(rej) == 12
    with_sys = [
        (r, s)
        for r, s in zip(kept, [s for i, s in enumerate(src) if i not in multi], strict=True)
        if s["conversations"][0]["from"] == "system"
    ]
    assert with_sys, "the fixture must hold a system-prompt record"
    for r, s in with_sys:
        assert r["system"] == s["conversations"][0]["value"] and r["prompt"] == s["conversations"][1]["value"]
        assert r["chosen"] == s["chosen"]["value"] and r["rejected"] == s["rejected"]["value"]


def test_ppo_prompts_from_a_json_array_and_json_lines():
    kept, rej = run("ppo", "kochatgpt_ppo_first10.json", lang="ko")
    src = json.loads((FIX / "kochatgpt_ppo_first10.json").read_text())
    assert rej == [] and [r["prompt"] for r in kept] == [s["prompt"] for s in src]
    assert {r["kind"] for r in kept} == {"prompt"} and [r["meta"]["line"] for r in kept][:3] == [2, 5, 8]
    kept, rej = run("ppo", "mschatgpt_ppo.jsonl", lang="ms")
    assert rej == [] and len(kept) == 5


def test_broken_json_array_is_one_rejected_record_naming_the_line(tmp_path):
    text = (FIX / "kochatgpt_ppo_first10.json").read_text()
    (tmp_path / "p.json").write_text(text.replace('"\n    },', '"\n    } oops', 1))
    kept, rej = run("ppo", str(tmp_path / "p.json"))
    assert [r["meta"]["line"] for r in kept] == [2]  # the item before the error is read, the rest is one reject
    assert len(rej) == 1 and rej[0]["reason"] == "invalid_json" and rej[0]["line"] == 4 and "oops" in rej[0]["raw"]


BAD_BYTES = b'{"instruction": "Bad \xff\xfe bytes", "input": "", "output": "Kept out."}'


@pytest.mark.parametrize(
    "fmt, lines",
    [
        (
            "alpaca",
            [
                b'{"instruction": "Say hi.", "input": "", "output": "Hi there."}',
                BAD_BYTES,
                b'{"instruction": "Name a colour.", "input": "", "output": "Blue."}',
            ],
        ),
        (
            "conversation",
            [
                b"<<start conversation>>",
                "<사람>: 안녕?".encode(),
                "<챗봇>: 안녕하세요.".encode(),
                b"<<start conversation>>",
                b"<\xec\xb0>: \xff",
                b"<<start conversation>>",
                "<사람>: 뭐 해?".encode(),
                "<챗봇>: 공부해.".encode(),
            ],
        ),
        (
            "text",
            [b"First document, all of it readable.", b"Second \xc3\x28 document.", b"Third document, readable too."],
        ),
    ],
)
def test_a_line_that_is_not_utf8_is_one_reject_and_a_bom_is_skipped(tmp_path, fmt, lines):
    """Before: a UnicodeDecodeError traceback with no file or line, the whole file lost; a BOM made the first
    record invalid_json."""
    path = tmp_path / "in.txt"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    kept, rej = run(fmt, str(path), min_chars=1)
    assert len(kept) == 2 and reasons(rej) == [("invalid_utf8", 5 if fmt == "conversation" else 2)]
    assert rej[0]["file"] == str(path) and "not valid UTF-8" in rej[0]["detail"]
    assert "\\xff" in rej[0]["raw"] or "\\xc3(" in rej[0]["raw"]  # the bad bytes, shown as escapes
    assert not any("\ufeff" in json.dumps(r, ensure_ascii=False) for r in kept)


def test_json_array_with_bad_bytes_in_one_item_rejects_that_item(tmp_path):
    path = tmp_path / "p.json"
    path.write_bytes(b'\xef\xbb\xbf[\n {"prompt": "one"},\n {"prompt": "tw\xffo"},\n {"prompt": "three"}\n]\n')
    kept, rej = run("ppo", str(path))
    assert [r["prompt"] for r in kept] == ["one", "three"] and reasons(rej) == [("invalid_utf8", 3)]


def test_stage_writes_the_invalid_utf8_reject_and_names_a_directory_source(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b"\n".join([BAD_BYTES, b'{"instruction": "Hi?", "input": "", "output": "Hi."}']))
    res = CliRunner().invoke(
        ingest.main, ["--input", str(tmp_path / "a.jsonl"), "--format", "alpaca", "--output", str(tmp_path / "o.jsonl")]
    )
    assert res.exit_code == 0, res.output
    (rej,) = io.load_jsonl(tmp_path / "o.rejected.jsonl")
    assert (rej["reason"], rej["line"]) == ("invalid_utf8", 1) and len(io.load_jsonl(tmp_path / "o.jsonl")) == 1
    (tmp_path / "dir.jsonl").mkdir()
    p = write_params(tmp_path, [{"path": str(tmp_path / "dir.jsonl"), "format": "alpaca"}])
    res = CliRunner().invoke(ingest.main, ["--params", str(p), "--output-dir", str(tmp_path / "out")])
    assert res.exit_code == 2 and "dir.jsonl is a directory" in res.output and "Traceback" not in res.output


def test_canonical_round_trip_keeps_ids_and_rejects_a_bad_record(tmp_path):
    kept, _ = run("alpaca", "alpaca_first12.json")
    translated = {
        **kept[0],
        "lang": "ms",
        "messages": [{"role": "user", "content": "Beri tiga petua."}, {"role": "assistant", "content": "1. Makan."}],
    }
    broken = {k: v for k, v in kept[1].items() if k != "messages"}
    io.write_jsonl(tmp_path / "c.jsonl", kept + [translated, broken])
    again, rej = run("canonical", str(tmp_path / "c.jsonl"))
    assert again[:12] == kept
    assert again[12]["id"] == kept[0]["id"] and again[12]["lang"] == "ms"  # a translation keeps its original's id
    assert reasons(rej) == [("invalid_record", 14)] and "'messages'" in rej[0]["detail"]

    # a canonical source given a role takes only that role's kind; the others are rejected, not lost
    out = tmp_path / "p.jsonl"
    res = CliRunner().invoke(
        ingest.main,
        ["--input", str(tmp_path / "c.jsonl"), "--format", "canonical", "--role", "preference", "--output", str(out)],
    )
    assert res.exit_code == 1 and "below min_success" in res.output, res.output  # nothing came through: not a success
    assert io.load_jsonl(out) == []
    assert Counter(r["reason"] for r in io.load_jsonl(tmp_path / "p.rejected.jsonl")) == {
        "wrong_kind": 13,
        "invalid_record": 1,
    }


# --- web text and segmentation ------------------------------------------------------------


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


@pytest.mark.parametrize("bounds", [(200, 1500), (50, 300), (400, 800)])
def test_segmentation_bounds_and_no_text_lost(bounds):
    lo, hi = bounds
    docs = [json.loads(line) for line in (FIX / "c4_docs.jsonl").read_text().splitlines()]
    kept, rej = run("c4", "c4_docs.jsonl", min_chars=lo, max_chars=hi)
    assert all(lo <= len(r["text"]) <= hi for r in kept)
    assert all(r["reason"] == "segment_too_short" and len(r["record"]["text"]) < lo for r in rej)
    by_line = Counter(r["meta"]["line"] for r in kept) + Counter(r["line"] for r in rej)
    assert sorted(by_line) == [1, 2, 3, 4, 5]
    for line, doc in enumerate(docs, 1):
        segs = sorted(
            [r for r in kept if r["meta"]["line"] == line] + [r["record"] for r in rej if r["line"] == line],
            key=lambda r: r["meta"]["segment"],
        )
        assert _squash("".join(s["text"] for s in segs)) == _squash(doc["text"])
    long_doc = [r for r in kept if r["meta"]["line"] == 4]
    assert len(long_doc) >= len(docs[3]["text"]) // hi  # the 15,760-char document is cut up


def test_segment_cuts_at_sentence_ends_and_merges_tiny_paragraphs():
    sentence = "This sentence is exactly fifty characters long ok. "
    para = (sentence * 10).strip()  # 509 chars
    segs = readers.segment(f"Title\n{para}\nShort tail.", 100, 300)
    assert all(len(s) <= 300 for s in segs)
    assert segs[0].startswith("Title\nThis sentence") and segs[-1].endswith("ok.\nShort tail.")
    assert all(s.endswith(".") for s in segs)  # cuts fall on sentence ends
    assert readers.segment("\n \n", 10, 20) == []
    with pytest.raises(ValueError, match="min_chars"):
        readers.segment("x", 30, 20)
    # one sentence longer than max_chars is cut at a word boundary
    assert all(len(s) <= 40 and not s.startswith(" ") for s in readers.segment("word " * 30, 10, 40))


def test_text_reader_lines_and_blank_separated_documents():
    kept, rej = run("text", "leipzig_fr.txt", lang="fr", min_chars=20, max_chars=1000)
    n_lines = len((FIX / "leipzig_fr.txt").read_text().split("\n")) - 1
    assert len(kept) + len(rej) == n_lines == 30
    assert {r["lang"] for r in kept} == {"fr"}
    blank, _ = run("text", "c4_paragraphs.txt", documents="blank", min_chars=1, max_chars=100000)
    auto, _ = run("text", "c4_paragraphs.txt", min_chars=1, max_chars=100000)
    c4, _ = run("c4", "c4_docs.jsonl", min_chars=1, max_chars=100000)
    assert [r["text"] for r in auto] == [r["text"] for r in blank] == [r["text"] for r in c4[: len(blank)]]
    assert len({r["meta"]["line"] for r in blank}) == 3
    with pytest.raises(ValueError, match="auto\\|line\\|blank"):
        run("text", "leipzig_fr.txt", documents="paragraph")


# --- the stage ------------------------------------------------------------------------------


def write_params(tmp_path: Path, sources: list[dict], extra: str = "") -> Path:
    p = tmp_path / "params.yaml"
    lines = ["ingest:", "  segment: {min_chars: 200, max_chars: 1500}", extra, "  sources:"]
    lines += [f"    - {json.dumps(s)}" for s in sources]
    p.write_text("\n".join(line for line in lines if line) + "\n")
    return p


SOURCES = [
    {"path": str(FIX / "gpt4all_ms.jsonl"), "format": "sft", "lang": "ms"},
    {"path": str(FIX / "guanaco_best_path.jsonl"), "format": "guanaco"},
    {"path": str(FIX / "c4_docs.jsonl"), "format": "c4", "role": "web"},
    {"path": str(FIX / "mschatgpt_rm.jsonl"), "format": "rm", "lang": "ms", "name": "rm_ms"},
]


def test_params_cli_writes_every_role_and_conserves_records(tmp_path):
    p = write_params(tmp_path, SOURCES)
    out, metrics = tmp_path / "data", tmp_path / "m.json"
    res = CliRunner().invoke(ingest.main, ["--params", str(p), "--output-dir", str(out), "--metrics", str(metrics)])
    assert res.exit_code == 0, res.output
    assert sorted(f.name for f in out.iterdir()) == [
        "preference.jsonl",
        "prompts.jsonl",
        "rejected.jsonl",
        "seed.jsonl",
        "web.jsonl",
    ]
    assert (out / "prompts.jsonl").read_text() == ""  # no source has that role: written, empty
    m = json.loads(metrics.read_text())
    by = {s["name"]: s for s in m["sources"]}
    assert by["gpt4all_ms"]["lines_read"] == 10 and by["gpt4all_ms"]["rejected_by_reason"] == {"invalid_json": 2}
    assert by["rm_ms"]["kept"] == 9 and by["rm_ms"]["role"] == "preference"
    assert by["guanaco_best_path"]["lang"] == "en"
    for s in m["sources"]:
        assert s["records_in"] == s["kept"] + s["rejected"] == s["kept"] + sum(s["rejected_by_reason"].values())
    seed, rej = io.load_jsonl(out / "seed.jsonl"), io.load_jsonl(out / "rejected.jsonl")
    assert len(seed) == 8 + 4 == m["outputs"]["seed"]
    assert len(rej) == m["rejected"] and m["records_in"] == m["kept"] + len(rej)
    assert {(r["source"], r["line"]) for r in rej if r["reason"] == "invalid_json"} == {
        ("gpt4all_ms", 3),
        ("gpt4all_ms", 8),
    }
    assert len(io.load_jsonl(out / "web.jsonl")) == m["outputs"]["web"] == by["c4_docs"]["kept"]

    # stable ids: a second run writes the same bytes
    out2 = tmp_path / "data2"
    assert CliRunner().invoke(ingest.main, ["--params", str(p), "--output-dir", str(out2)]).exit_code == 0
    for f in out.iterdir():
        assert (out2 / f.name).read_bytes() == f.read_bytes()


def test_by_hand_cli(tmp_path):
    out, rej = tmp_path / "a.jsonl", tmp_path / "a.rej.jsonl"
    res = CliRunner().invoke(
        ingest.main,
        [
            "--input",
            str(FIX / "chatdoctor_ms.jsonl"),
            "--format",
            "alpaca",
            "--output",
            str(out),
            "--rejected",
            str(rej),
            "--lang",
            "ms",
        ],
    )
    assert res.exit_code == 0, res.output
    assert len(io.load_jsonl(out)) == 4 and io.load_jsonl(rej)[0]["line"] == 3
    assert {r["lang"] for r in io.load_jsonl(out)} == {"ms"}

    out = tmp_path / "t.jsonl"
    res = CliRunner().invoke(
        ingest.main,
        [
            "--input",
            str(FIX / "leipzig_fr.txt"),
            "--format",
            "text",
            "--lang",
            "fr",
            "--output",
            str(out),
            "--set",
            "segment.min_chars=100",
        ],
    )
    assert res.exit_code == 0, res.output
    kept, short = io.load_jsonl(out), io.load_jsonl(tmp_path / "t.rejected.jsonl")
    assert len(kept) + len(short) == 30 and all(len(r["text"]) >= 100 for r in kept) and short
    help_text = CliRunner().invoke(ingest.main, ["--help"]).output
    assert all(name in help_text for name in readers.READERS)


def test_clear_errors_for_unknown_format_key_and_role(tmp_path):
    res = CliRunner().invoke(
        ingest.main,
        ["--input", str(FIX / "seed_tasks.jsonl"), "--format", "alpacca", "--output", str(tmp_path / "o.jsonl")],
    )
    assert res.exit_code == 2 and "alpacca" in res.output and "alpaca" in res.output
    bad = [
        ([{"path": "x.json", "format": "alpacca"}], "", "sources\\[0\\]\\.format: 'alpacca' is not one of alpaca \\|"),
        ([{"path": "x.json", "format": "alpaca", "langauge": "ms"}], "", "unknown key 'langauge'"),
        ([{"path": "x.json", "format": "rm", "role": "seed"}], "", "format rm makes preference records"),
        ([{"format": "alpaca"}], "", "sources\\[0\\]\\.path: required"),
        ([], "  min_char: 3", "unknown key 'min_char'"),
    ]
    for sources, extra, message in bad:
        with pytest.raises(params.ParamsError, match=message):
            params.resolve(IngestConfig, write_params(tmp_path, sources, extra), "ingest")
        res = CliRunner().invoke(
            ingest.main, ["--params", str(tmp_path / "params.yaml"), "--output-dir", str(tmp_path)]
        )
        assert res.exit_code == 2 and re.search(message, res.output)


def test_default_params_ingest_the_embedded_sample(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    res = CliRunner().invoke(
        ingest.main,
        ["--params", "params.yaml", "--output-dir", str(tmp_path / "d"), "--metrics", str(tmp_path / "m.json")],
    )
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["outputs"]["seed"] == 94 and m["outputs"]["preference"] == 194 and m["outputs"]["prompts"] == 89
    assert 150 <= m["outputs"]["web"] <= 250
    assert m["records_in"] == m["kept"] + m["rejected"]


def test_a_source_read_with_the_wrong_format_fails_the_stage_after_writing(tmp_path):
    """Before: C4 documents read as alpaca gave 0 records and exit 0, so DVC recorded the stage as done."""
    res = CliRunner().invoke(
        ingest.main,
        [
            "--input",
            str(FIX / "c4_docs.jsonl"),
            "--format",
            "alpaca",
            "--output",
            str(tmp_path / "o.jsonl"),
            "--metrics",
            str(tmp_path / "m.json"),
        ],
    )
    assert res.exit_code == 1 and "c4_docs.jsonl (alpaca): 0 of" in res.output and "below min_success 0.5" in res.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["kept"] == 0 and m["rejected"] == m["records_in"] > 0 and m["success"]["sources_below"] == 1
    assert len(io.load_jsonl(tmp_path / "o.rejected.jsonl")) == m["rejected"]


# --- the config: every value typed and range-checked before any work --------------------------


@pytest.mark.parametrize(
    "setting, allowed",
    [
        ("text_documents=paragraph", "line | blank | auto"),
        ("min_success=2", "<= 1"),
        ("segment.min_chars=ten", "an integer"),
        ("segment.max_chars=0", "1 <="),
        ("segment.min_chars=2000", "above max_chars 1500"),
        ("sources=x", "a list"),
        ("multi_turn=maybe", "true or false"),
    ],
)
def test_a_bad_setting_is_one_line_naming_key_and_value(tmp_path, setting, allowed):
    """The wrong type, range, choice or key stops the stage in under a second, before a file is read."""
    out = tmp_path / "out"
    line = assert_rejected(ingest.main, ["--output-dir", str(out)], setting, allowed)
    assert "ingest" in line and not out.exists()


def test_an_unknown_key_is_one_line_naming_it_and_the_known_ones(tmp_path):
    # not assert_rejected: the unknown-key line does not repeat the value (/tmp/h/config_bugs.md)
    res = CliRunner().invoke(ingest.main, ["--output-dir", str(tmp_path / "out"), "--set", "nope=1"])
    errors = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert res.exit_code == 2 and errors == [
        "Error: ingest: unknown key 'nope'; known keys: lang, min_success, multi_turn, segment, sources, text_documents"
    ]


@pytest.mark.parametrize(
    "sources, message",
    [
        ("[{path: a.json, format: alpacca}]", "ingest.sources[0].format: 'alpacca' is not one of alpaca | c4"),
        ("[{path: a.json, format: canonical}]", "ingest.sources[0].role: format canonical makes records of any kind"),
        ("[{path: a.json}]", "ingest.sources[0].format: required"),
        ("[{path: a.json, format: rm, role: web}]", "format rm makes preference records, but role web takes web"),
        ("[{path: a.json, format: sft, role: chat}]", "ingest.sources[0].role: 'chat' is not one of seed | web"),
    ],
)
def test_a_bad_source_entry_names_its_index_and_key(tmp_path, sources, message):
    res = CliRunner().invoke(ingest.main, ["--output-dir", str(tmp_path / "out"), "--set", f"sources={sources}"])
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "out").exists()


def test_params_yaml_is_the_code_default_and_a_yaml_string_number_is_a_float(tmp_path):
    data = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    assert IngestConfig.from_dict(data["ingest"], "ingest") == IngestConfig()
    p = tmp_path / "p.yaml"
    p.write_text("ingest:\n  min_success: 5e-1\n")  # YAML 1.1 reads 5e-1 (no dot) as a string
    assert yaml.safe_load(p.read_text())["ingest"]["min_success"] == "5e-1"
    assert params.resolve(IngestConfig, p, "ingest").min_success == 0.5


def test_a_source_takes_its_defaults_from_its_format_the_section_and_its_file_name():
    cfg = params.resolve(
        IngestConfig,
        None,
        "ingest",
        ["lang=ms", "sources=[{path: d/rm.v2.jsonl, format: rm}, {path: e.json, format: canonical, role: seed}]"],
    )
    rm, canonical = cfg.resolved_sources()
    assert (rm.role, rm.lang, rm.name) == ("preference", "ms", "rm")
    assert (canonical.role, canonical.name) == ("seed", "e")
    assert cfg.sources[0].role is None  # the config keeps what params said; resolving fills in


def test_by_hand_a_canonical_file_needs_no_role_and_a_wrong_role_is_refused(tmp_path):
    kept, _ = run("alpaca", "alpaca_first12.json")
    io.write_jsonl(tmp_path / "c.jsonl", kept)
    res = CliRunner().invoke(
        ingest.main,
        ["--input", str(tmp_path / "c.jsonl"), "--format", "canonical", "--output", str(tmp_path / "o.jsonl")],
    )
    assert res.exit_code == 0, res.output
    assert io.load_jsonl(tmp_path / "o.jsonl") == kept
    res = CliRunner().invoke(
        ingest.main,
        [
            "--input",
            str(FIX / "mschatgpt_rm.jsonl"),
            "--format",
            "rm",
            "--role",
            "seed",
            "--output",
            str(tmp_path / "r"),
        ],
    )
    assert res.exit_code == 2 and "format rm makes preference records, but role seed takes chat records" in res.output
