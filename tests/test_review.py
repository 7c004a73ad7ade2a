"""Human review: the export to Label Studio / Argilla, the import of a Label Studio export, the stage, its
place in the DVC graph, and the round trip through a real Label Studio server.

Label Studio pins numpy, openai and pyarrow below this project's, so it cannot share the venv: the
round-trip test runs the `label-studio` found by LABEL_STUDIO_BIN or on PATH (an install in its own venv:
python -m venv /tmp/ls && /tmp/ls/bin/pip install label-studio==1.23.2) and skips without one.
tests/fixtures/review/label_studio_export.json is an export that such a server wrote (see SOURCES.md).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from config_checks import assert_rejected
from stage_loader import load_stage

from selfalign import review
from selfalign.review import ReviewConfig

ROOT = Path(__file__).resolve().parent.parent
FIX = Path(__file__).resolve().parent / "fixtures" / "review"
SOURCE = FIX / "curate"  # 4 kept + 4 rejected records of a real curate round (iter2)
stage = load_stage("review")


def write_params(path: Path, **review_cfg) -> Path:
    cfg = {"source": "curate", "sample": {"kept": 20, "rejected": 20}, "seed": 0, **review_cfg}
    path.write_text(
        yaml.safe_dump({"curate": {"iterations": {"iter2": {"scorer": "m1", "trains": "m2"}}}, "review": cfg})
    )
    return path


def items():
    return review.load_source(SOURCE / "iter2" / "kept.jsonl", SOURCE / "iter2" / "rejected.jsonl")


def ls_export(decisions: dict[str, list[str | None]], notes: dict[str, str] | None = None) -> list[dict]:
    """A Label Studio JSON export of our tasks: each uid's annotations (None = a skipped, cancelled one)."""
    notes = notes or {}
    tasks = []
    for i, (uid, votes) in enumerate(decisions.items(), 1):
        anns = []
        for j, v in enumerate(votes):
            result = (
                []
                if v is None
                else [
                    {
                        "id": f"r{j}",
                        "from_name": "verdict",
                        "to_name": "response",
                        "type": "choices",
                        "origin": "manual",
                        "value": {"choices": [v]},
                    }
                ]
            )
            if uid in notes and v is not None:
                result.append(
                    {
                        "id": f"n{j}",
                        "from_name": "note",
                        "to_name": "response",
                        "type": "textarea",
                        "origin": "manual",
                        "value": {"text": [notes[uid]]},
                    }
                )
            anns.append({"id": i * 10 + j, "completed_by": 1, "result": result, "was_cancelled": v is None})
        tasks.append({"id": i, "data": {"uid": uid}, "annotations": anns, "predictions": []})
    return tasks


def run_stage(tmp_path: Path, annotations: Path, **review_cfg):
    params_file = write_params(tmp_path / "params.yaml", **review_cfg)
    out, export, metrics = tmp_path / "out", tmp_path / "export", tmp_path / "metrics.json"
    res = CliRunner().invoke(
        stage.main,
        [
            "--params",
            str(params_file),
            "--input",
            str(SOURCE),
            "--annotations",
            str(annotations),
            "--output-dir",
            str(out),
            "--export-dir",
            str(export),
            "--metrics",
            str(metrics),
        ],
    )
    return res, out, export, metrics


# --- pure functions ---------------------------------------------------------------------------------------


def test_uid_follows_what_the_annotator_saw():
    rec = json.loads((SOURCE / "iter2" / "kept.jsonl").read_text().splitlines()[0])
    same = {**rec, "meta": {"score": 1.0}}  # a new score does not make it another record
    edited = {**rec, "messages": [rec["messages"][0], {"role": "assistant", "content": "changed"}]}
    assert review.uid(rec) == review.uid(same) != review.uid(edited)


def test_sample_is_seeded_and_growing_it_only_adds():
    its = items()
    a, b = review.sample(its, 2, 2, seed=0), review.sample(list(reversed(its)), 2, 2, seed=0)
    assert [x["uid"] for x in a] == [x["uid"] for x in b]
    assert [x["auto"] for x in a] == ["accept", "accept", "reject", "reject"]
    bigger = review.sample(its, 3, 2, seed=0)
    assert {x["uid"] for x in a} < {x["uid"] for x in bigger}
    assert len(review.sample(its, -1, -1, seed=0)) == 8
    assert [x["uid"] for x in review.sample(its, 2, 0, seed=1)] != [
        x["uid"] for x in review.sample(its, 2, 0, seed=0)
    ] or len({x["uid"] for x in its if x["auto"] == "accept"}) <= 2


def test_label_studio_config_is_xml_whose_variables_every_task_fills():
    tasks = review.label_studio_tasks(items(), "curate")
    config = review.label_studio_config("curate")
    root = ET.fromstring(config)
    choices = root.find("Choices")
    assert choices.get("name") == "verdict" and choices.get("toName") == "response"
    assert [c.get("value") for c in choices] == list(review.VERDICTS)
    names = {el.get("name") for el in root.iter() if el.get("name")}
    for t in tasks:
        for var in {v.strip("$") for el in root.iter() for v in (el.get("value") or "").split() if v.startswith("$")}:
            assert var in t["data"], var
        for p in t["predictions"]:  # a prediction's result must name controls of this config
            assert {r["from_name"] for r in p["result"]} <= names and {r["to_name"] for r in p["result"]} <= names
    auto = {t["data"]["uid"]: t["predictions"][0]["result"][0]["value"]["choices"] for t in tasks}
    assert sorted(map(tuple, auto.values())) == [("accept",)] * 4 + [("reject",)] * 4


def test_argilla_export_validates_with_the_argilla_client():
    rg = pytest.importorskip("argilla")
    from unittest import mock

    # Argilla's objects look up a default client on construction; its server (with Elasticsearch) cannot run
    # here, so a stand-in client is set; the fields, questions, metadata and records are Argilla's own classes.
    with mock.patch.object(rg.Argilla, "_default_client", mock.MagicMock()):
        ours = review.argilla_settings("curate")
        settings = rg.Settings._from_dict(ours)
        assert [f.name for f in settings.fields] == ["instruction", "response", "system", "context"]
        assert settings.questions["verdict"].labels == list(review.VERDICTS)
        back = settings.serialize()
        for key in ("fields", "questions", "metadata"):
            strip = [
                {k: v for k, v in x.items() if k not in ("id", "inserted_at", "updated_at", "dataset_id")}
                for x in back[key]
            ]
            assert strip == ours[key], key
        for rec in review.argilla_records(items(), "curate"):
            r = rg.Record.from_dict(rec)
            assert set(r.fields) <= {f.name for f in settings.fields}
            assert set(r.metadata) <= {m.name for m in settings.metadata}
            d = r.to_dict()
            assert d["suggestions"]["verdict"]["value"] in review.VERDICTS and d["id"] == rec["metadata"]["uid"]


def test_argilla_answers_made_by_its_client_apply(tmp_path):
    """Our Argilla records, answered as the client holds them (Record with Responses) and written by its own
    JSON writer (what dataset.records.to_json uses), are read back like a Label Studio export."""
    rg = pytest.importorskip("argilla")
    import uuid
    from unittest import mock

    its = items()
    k = [x["uid"] for x in its if x["auto"] == "accept"]
    r = [x["uid"] for x in its if x["auto"] == "reject"]
    answers = {k[0]: ("reject", "off topic"), r[0]: ("accept", ""), k[1]: ("accept", "")}
    rows = []
    with mock.patch.object(rg.Argilla, "_default_client", mock.MagicMock()):
        for rec in review.argilla_records(its, "curate"):
            record = rg.Record.from_dict(rec)
            if rec["id"] in answers:
                value, note = answers[rec["id"]]
                user = uuid.uuid4()
                record.responses.add(rg.Response("verdict", value, user_id=user, status="submitted"))
                if note:
                    record.responses.add(rg.Response("note", note, user_id=user, status="submitted"))
            rows.append(record)
        from argilla.records._io import JsonIO

        path = JsonIO.to_json(rows, tmp_path / "argilla_answers.json")
    rows = json.loads(path.read_text())
    verdicts = review.read_annotations(path)
    assert {u: v["verdict"] for u, v in verdicts.items()} == {u: a[0] for u, a in answers.items()}
    kept, rejected, counts = review.apply(its, verdicts)
    assert (counts["human_rejected"], counts["human_accepted"], counts["agreed"]) == (1, 1, 1)
    assert [json.loads(x)["detail"] for x in rejected if json.loads(x)["reason"] == "human_rejected"] == ["off topic"]
    bad = [{**rows[0], "responses": {"verdict": [{"value": "maybe", "user_id": "u"}]}}]
    path.write_text(json.dumps(bad, default=str))
    with pytest.raises(review.ReviewError, match=r"record 0 .*responses.verdict\[0\].value"):
        review.read_annotations(path)


def test_apply_without_annotations_writes_the_source_back_unchanged():
    kept, rejected, counts = review.apply(items(), {})
    assert "".join(line + "\n" for line in kept) == (SOURCE / "iter2" / "kept.jsonl").read_text()
    assert "".join(line + "\n" for line in rejected) == (SOURCE / "iter2" / "rejected.jsonl").read_text()
    assert counts == {"stale": 0}


def test_overrides_move_records_and_say_why(tmp_path):
    its = items()
    k = [x["uid"] for x in its if x["auto"] == "accept"]
    r = [x["uid"] for x in its if x["auto"] == "reject"]
    export = ls_export(
        {
            k[0]: ["reject"],
            k[1]: ["accept"],
            r[0]: ["accept", "accept", "reject"],
            r[1]: [None],
            r[2]: ["accept", "reject"],
            "0" * 20: ["reject"],
        },
        notes={k[0]: "answers another question"},
    )
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(export))
    verdicts = review.read_annotations(path)
    assert r[1] not in verdicts  # only a skipped annotation
    assert verdicts[r[2]]["conflict"] and verdicts[r[2]]["verdict"] is None
    kept, rejected, counts = review.apply(its, verdicts)
    assert len(kept) + len(rejected) == len(its)
    kept_ids = [json.loads(line)["id"] for line in kept]
    rej = [json.loads(line) for line in rejected]
    human = [x for x in rej if x["reason"] == "human_rejected"]
    assert len(human) == 1 and human[0]["record"]["id"] == its[0]["record"]["id"]
    assert human[0]["detail"] == "answers another question" and human[0]["stage"] == "review"
    promoted = json.loads(kept[-1])
    assert promoted["meta"]["review"] == {"verdict": "accept", "overrode": "below_cutoff", "note": "", "annotations": 3}
    assert len(kept_ids) == 4 and its[0]["record"]["id"] not in kept_ids
    assert counts == {"annotated": 4, "conflicts": 1, "agreed": 1, "human_rejected": 1, "human_accepted": 1, "stale": 1}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[{"id": 1, "data": {}}]', "task 0 (id 1): field 'data.uid'"),
        ('{"tasks": []}', "expected a JSON list of tasks"),
        ('[\n{"data": {"uid": "x"},}\n]', ":2: invalid JSON"),
        (
            json.dumps(
                [
                    {
                        "id": 7,
                        "data": {"uid": "x"},
                        "annotations": [
                            {"result": [{"from_name": "verdict", "type": "choices", "value": {"choices": ["maybe"]}}]}
                        ],
                    }
                ]
            ),
            "task 0 (id 7): annotation 0: field 'value.choices'",
        ),
    ],
)
def test_a_malformed_export_is_an_error_naming_where(tmp_path, content, message):
    path = tmp_path / "annotations.json"
    path.write_text(content)
    with pytest.raises(review.ReviewError, match=message.replace("(", r"\(").replace(")", r"\)")):
        review.read_annotations(path)


def test_real_label_studio_export_fixture_applies():
    """An export written by a real Label Studio 1.23.2 server for tasks made from SOURCE (SOURCES.md)."""
    verdicts = review.read_annotations(FIX / "label_studio_export.json")
    its = items()
    assert set(verdicts) <= {x["uid"] for x in its} and len(verdicts) >= 2
    kept, rejected, counts = review.apply(its, verdicts)
    assert counts["human_rejected"] >= 1 and counts["human_accepted"] >= 1 and counts["stale"] == 0
    assert len(kept) + len(rejected) == len(its)


# --- the stage --------------------------------------------------------------------------------------------


def test_stage_without_annotations_is_byte_identical_and_exports(tmp_path):
    res, out, export, metrics = run_stage(tmp_path, tmp_path / "absent.json", sample={"kept": 3, "rejected": 2})
    assert res.exit_code == 0, res.output
    assert (out / "kept.jsonl").read_bytes() == (SOURCE / "iter2" / "kept.jsonl").read_bytes()
    assert (out / "rejected.jsonl").read_bytes() == (SOURCE / "iter2" / "rejected.jsonl").read_bytes()
    m = json.loads(metrics.read_text())
    assert m["records_in"] == m["kept"] + m["rejected"] == 8 and m["exported"] == 5 and m["annotated"] == 0
    tasks = json.loads((export / "label_studio_tasks.json").read_text())
    assert len(tasks) == 5 and len(json.loads((export / "argilla_records.json").read_text())) == 5
    ET.fromstring((export / "label_studio_config.xml").read_text())
    (tmp_path / "empty.json").write_text("[]\n")  # the committed data/review/annotations.json
    res2, out2, _, _ = run_stage(tmp_path, tmp_path / "empty.json")
    assert res2.exit_code == 0 and (out2 / "kept.jsonl").read_bytes() == (SOURCE / "iter2" / "kept.jsonl").read_bytes()


def test_stage_applies_annotations_with_counts(tmp_path):
    its = items()
    k = [x["uid"] for x in its if x["auto"] == "accept"]
    r = [x["uid"] for x in its if x["auto"] == "reject"]
    ann = tmp_path / "annotations.json"
    ann.write_text(json.dumps(ls_export({k[0]: ["reject"], k[1]: ["reject"], r[3]: ["accept"]})))
    res, out, _, metrics = run_stage(tmp_path, ann)
    assert res.exit_code == 0, res.output
    m = json.loads(metrics.read_text())
    assert (m["kept"], m["rejected"], m["human_rejected"], m["human_accepted"]) == (3, 5, 2, 1)
    assert m["rejected_by_reason"] == {"below_cutoff": 3, "human_rejected": 2} and m["agreement"] == 0.0


@pytest.mark.parametrize(
    ("source", "kept_name", "meta_key"),
    [("verify/seed", "kept.jsonl", "verify"), ("localise", "seed.jsonl", "localise")],
)
def test_stage_reviews_verify_and_localise_outputs(tmp_path, source, kept_name, meta_key):
    """verify@<name> writes data/verify/<name>/kept.jsonl + rejected.jsonl, localise data/localise/seed.jsonl +
    rejected.jsonl (records.rejected wrapping the record, the step's verdict in meta)."""
    src = tmp_path / "data" / source
    src.mkdir(parents=True)
    recs = [json.loads(line) for line in (SOURCE / "iter2" / "kept.jsonl").read_text().splitlines()]
    step = {"verdict": "correct", "reason": "answers it", "confidence": 0.9}
    kept = [{**r, "meta": {meta_key: step}} for r in recs[:3]]
    bad = {**recs[3], "meta": {meta_key: {**step, "verdict": "incorrect"}}}
    rejected = [
        {"reason": "incorrect", "stage": meta_key, "detail": "wrong year", "record": bad, "id": bad["id"]},
        {"reason": "invalid_json", "stage": meta_key, "file": "x.jsonl", "line": 3, "raw": "{"},
        {"reason": "invalid_record", "stage": meta_key, "record": {"messages": ["not a turn"]}},  # passes through
    ]
    (src / kept_name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    (src / "rejected.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected))
    its = review.load_source(*review.source_files(source, src, None))
    assert [x["auto"] for x in its] == ["accept"] * 3 + ["reject"] * 3 and its[-1]["uid"] is its[-2]["uid"] is None
    ann = tmp_path / "annotations.json"
    ann.write_text(json.dumps(ls_export({its[3]["uid"]: ["accept"]})))
    params_file = write_params(tmp_path / "params.yaml", source=source)
    out, export, metrics = tmp_path / "out", tmp_path / "export", tmp_path / "m.json"
    res = CliRunner().invoke(
        stage.main,
        [
            "--params",
            str(params_file),
            "--input",
            str(src),
            "--annotations",
            str(ann),
            "--output-dir",
            str(out),
            "--export-dir",
            str(export),
            "--metrics",
            str(metrics),
        ],
    )
    assert res.exit_code == 0, res.output
    m = json.loads(metrics.read_text())
    assert (m["records_in"], m["kept"], m["rejected"], m["human_accepted"], m["exported"]) == (6, 4, 2, 1, 4)
    task = json.loads((export / "label_studio_tasks.json").read_text())[-1]["data"]
    assert task["auto_reason"] == "incorrect" and task["auto_detail"] == "wrong year"
    assert json.loads(task["context"])[meta_key]["verdict"] == "incorrect"
    assert json.loads((out / "kept.jsonl").read_text().splitlines()[-1])["meta"]["review"]["overrode"] == "incorrect"
    with pytest.raises(review.ReviewError, match="verify/<name>"):
        review.source_files("verify", src, None)


def test_stage_rejects_bad_params_and_files(tmp_path):
    res, *_ = run_stage(tmp_path, tmp_path / "absent.json", source="translate")
    assert res.exit_code != 0 and "review.source" in res.output
    res, *_ = run_stage(tmp_path, tmp_path / "absent.json", sample={"kept": "all", "rejected": 1})
    assert res.exit_code != 0 and "review.sample.kept" in res.output
    bad = tmp_path / "bad.json"
    bad.write_text('[{"data": {}}]')
    res, *_ = run_stage(tmp_path, bad)
    assert res.exit_code != 0 and f"{bad}: task 0" in res.output


@pytest.mark.parametrize(
    "setting, words",
    [
        ("sample.kept=-2", ["-1 <="]),
        ("sample.rejected=all", ["an integer"]),
        ("source=translate", ["curate, verify/<name> or localise"]),
        ("source=verify", ["verify/<name>"]),
        ("seed=0.5", ["an integer"]),
        ("sample.accepted=5", ["unknown key", "kept, rejected"]),
    ],
)
def test_a_bad_setting_is_one_line_before_any_work(setting, words, tmp_path):
    args = ["--input", str(SOURCE), "--annotations", str(tmp_path / "absent.json"), "--output-dir", str(tmp_path / "o")]
    assert_rejected(
        stage.main, [*args, "--export-dir", str(tmp_path / "e"), "--metrics", str(tmp_path / "m")], setting, *words
    )
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()


def test_code_defaults_are_params_yaml():
    assert ReviewConfig.from_dict(yaml.safe_load((ROOT / "params.yaml").read_text())["review"], "review") == (
        ReviewConfig()
    )


# --- the graph --------------------------------------------------------------------------------------------

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_graph_review_sits_between_the_last_round_and_sft_final():
    rv = DVC["review"]
    assert "data/review/annotations.json" in rv["deps"] and "data/${review.source}" in rv["deps"]
    assert "--annotations data/review/annotations.json" in rv["cmd"]
    final = DVC["sft"]["foreach"]["final"]
    assert "data/review/kept.jsonl" in final.values() and "--curated data/review/kept.jsonl" in DVC["sft"]["do"]["cmd"]
    # Changing the annotations reruns review and what reads its kept set; nothing else depends on them.
    readers = [
        name for name, s in DVC.items() if "data/review" in json.dumps([s.get("foreach"), s.get("do", s)["deps"]])
    ]
    assert sorted(readers) == ["review", "sft"]
    assert json.loads((ROOT / "data" / "review" / "annotations.json").read_text()) == []


@pytest.mark.slow
def test_changing_annotations_reruns_only_what_follows_in_real_dvc(tmp_path):
    """A tiny graph with the real review stage: source -> review -> reader, and a sibling that reads the source."""
    repo = tmp_path / "repo"
    (repo / "data" / "review").mkdir(parents=True)
    shutil.copytree(SOURCE, repo / "data" / "curate")
    write_params(repo / "params.yaml", sample={"kept": 2, "rejected": 2})
    (repo / "data" / "review" / "annotations.json").write_text("[]\n")
    rv = DVC["review"]
    reader = "python -c \"import sys; open(sys.argv[2], 'w').write(str(len(open(sys.argv[1]).readlines())))\""
    graph = {
        "stages": {
            "review": {
                "cmd": rv["cmd"].replace("python stages/review.py", f"python {ROOT}/stages/review.py"),
                "deps": [d for d in rv["deps"] if not d.startswith(("stages/", "selfalign/"))],
                "params": rv["params"],
                "outs": rv["outs"],
                "metrics": rv["metrics"],
            },
            "reader": {
                "cmd": f"{reader} data/review/kept.jsonl count.txt",
                "deps": ["data/review/kept.jsonl"],
                "outs": ["count.txt"],
            },
            "sibling": {
                "cmd": f"{reader} data/curate/iter2/rejected.jsonl sibling.txt",
                "deps": ["data/curate/iter2/rejected.jsonl"],
                "outs": ["sibling.txt"],
            },
        }
    }
    (repo / "dvc.yaml").write_text(yaml.safe_dump(graph, sort_keys=False))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def sh(*cmd):
        p = subprocess.run(list(cmd), cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout

    sh("git", "init", "-q")
    sh("dvc", "init", "-q")
    first = sh("dvc", "repro")
    assert {"review", "reader", "sibling"} <= {
        line.split("'")[1] for line in first.splitlines() if "Running stage" in line
    }
    assert (repo / "count.txt").read_text() == "4"
    its = items()
    uid = next(x["uid"] for x in its if x["auto"] == "accept")
    (repo / "data" / "review" / "annotations.json").write_text(json.dumps(ls_export({uid: ["reject"]})))
    status = sh("dvc", "status")
    assert "review:" in status and "sibling" not in status
    again = sh("dvc", "repro")
    ran = {line.split("'")[1] for line in again.splitlines() if "Running stage" in line}
    assert ran == {"review", "reader"}, again
    assert (repo / "count.txt").read_text() == "3"


# --- the round trip through a real Label Studio server ------------------------------------------------------


def label_studio_bin() -> str | None:
    return os.environ.get("LABEL_STUDIO_BIN") or shutil.which("label-studio")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(
    label_studio_bin() is None,
    reason="no label-studio: its pins clash with this venv's (numpy, "
    "openai, pyarrow); install it in its own venv and set LABEL_STUDIO_BIN (module docstring)",
)
def test_round_trip_through_a_real_label_studio_server(tmp_path):
    requests = pytest.importorskip("requests")
    port, token = free_port(), "5e1fa119" * 5
    user, password = "reviewer@example.com", "review-pass-1"
    env = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(tmp_path / "ls"),
        "DJANGO_DB": "sqlite",
        "LABEL_STUDIO_USERNAME": user,
        "LABEL_STUDIO_PASSWORD": password,
        "LABEL_STUDIO_USER_TOKEN": token,
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
    }
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [label_studio_bin(), "start", "--no-browser", "--port", str(port), "--internal-host", "127.0.0.1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        # A fresh SQLite database migrates first: up 59 s after start on an idle box, 154 s at load 17 on 2 cores.
        deadline = time.monotonic() + 420
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "label-studio did not start in 420 s"
            time.sleep(1)
        # Label Studio >= 1.17 turns legacy tokens off per organisation: the user logs in once and turns them on.
        s = requests.Session()
        s.get(f"{base}/user/login/")
        s.post(
            f"{base}/user/login/",
            data={"email": user, "password": password, "csrfmiddlewaretoken": s.cookies["csrftoken"]},
            headers={"Referer": f"{base}/user/login/"},
        ).raise_for_status()
        s.post(
            f"{base}/api/jwt/settings",
            json={"api_tokens_enabled": True, "legacy_api_tokens_enabled": True},
            headers={"X-CSRFToken": s.cookies["csrftoken"], "Referer": base},
        ).raise_for_status()
        api = requests.Session()
        api.headers["Authorization"] = f"Token {token}"

        res, _, export, _ = run_stage(tmp_path, tmp_path / "absent.json", sample={"kept": -1, "rejected": -1})
        assert res.exit_code == 0, res.output
        exported = label_studio_round_trip(
            api,
            base,
            export,
            decide=lambda data: ("reject" if data["auto_verdict"] == "accept" else "accept", "reviewer disagrees"),
            limit=2,
        )
        (tmp_path / "annotations.json").write_text(json.dumps(exported))
        res, out, _, metrics = run_stage(tmp_path, tmp_path / "annotations.json")
        assert res.exit_code == 0, res.output
        m = json.loads(metrics.read_text())
        assert (m["annotated"], m["human_rejected"], m["human_accepted"], m["stale"]) == (4, 2, 2, 0), m
        assert (m["kept"], m["rejected"]) == (4, 4)
        human = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
        assert [r["detail"] for r in human if r["reason"] == "human_rejected"] == ["reviewer disagrees"] * 2
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def label_studio_round_trip(api, base: str, export_dir: Path, decide, limit: int) -> list[dict]:
    """Create a project with our config, import our tasks, annotate `limit` tasks of each automatic verdict
    through the API (decide(data) -> (verdict, note)), and return the project's JSON export."""
    config = (export_dir / "label_studio_config.xml").read_text()
    tasks = json.loads((export_dir / "label_studio_tasks.json").read_text())
    project = api.post(f"{base}/api/projects", json={"title": "selfalign review", "label_config": config})
    assert project.status_code == 201, project.text
    pid = project.json()["id"]
    imported = api.post(f"{base}/api/projects/{pid}/import", json=tasks)
    assert imported.status_code == 201 and imported.json()["task_count"] == len(tasks), imported.text
    listed = api.get(f"{base}/api/tasks", params={"project": pid, "page_size": 1000}).json()["tasks"]
    done = {"accept": 0, "reject": 0}
    for task in listed:
        auto = task["data"]["auto_verdict"]
        if done[auto] >= limit:
            continue
        done[auto] += 1
        verdict, note = decide(task["data"])
        ann = api.post(
            f"{base}/api/tasks/{task['id']}/annotations",
            json={
                "result": [
                    {"from_name": "verdict", "to_name": "response", "type": "choices", "value": {"choices": [verdict]}},
                    {"from_name": "note", "to_name": "response", "type": "textarea", "value": {"text": [note]}},
                ]
            },
        )
        assert ann.status_code == 201, ann.text
    exported = api.get(f"{base}/api/projects/{pid}/export", params={"exportType": "JSON"})
    assert exported.status_code == 200, exported.text
    return exported.json()
