"""Rebuild the embedded default inputs in data/sample/ from the shared data copies (run once by hand).

    python data/sample/make_sample.py --shared ../shared/data --out data/sample

Not part of the pipeline: it records exactly how each file was cut (see SOURCES.md), so a
reviewer can re-derive it byte for byte. Only permissively licensed sources are used.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import click

C4_DOCS = 40           # first documents of c4_demo.jsonl; about 180 segments at 200-1500 chars
# Preference pairs: every single-turn record of dpo_en_demo.json (194 of 300). The reward stage holds
# 64 pairs out for its accuracy interval and needs the rest to train; 120 left 46 after the hold-out.

# Follow-up prompter turns kept as stand-alone PPO prompts: 30-300 chars on one line, not opening
# with a conversational reaction, and without words that point back at earlier turns.
_REACTIONS = set("and but so ok okay thanks thank great well oh yes no yeah wow cool nice what's why how's hmm please".split())
_BACK_REFS = set("it its it's that that's this these those they them their there above previous earlier said mentioned "
                 "instead again else also too more another other same one ones he she him her his".split())


def standalone(text: str) -> bool:
    words = re.findall(r"[a-z']+", text.lower())
    return (30 <= len(text) <= 300 and "\n" not in text and bool(words) and words[0] not in _REACTIONS
            and not _BACK_REFS & set(words))


def followups(tree: dict) -> list[str]:
    """Prompter messages below the root, depth first in file order, that are not deleted, rejected or synthetic."""
    out: list[str] = []

    def walk(msg: dict, depth: int) -> None:
        if (msg["role"] == "prompter" and depth > 0 and not msg.get("deleted") and msg.get("review_result") is not False
                and not msg.get("synthetic")):
            out.append(msg["text"].strip())
        for reply in msg.get("replies") or []:
            walk(reply, depth + 1)
    walk(tree["prompt"], 0)
    return out


@click.command()
@click.option("--shared", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def main(shared: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shared / "oasst/en_100_tree.guanaco_style_single_turn.jsonl", out / "oasst_seed.guanaco.jsonl")

    with open(shared / "web_corpus/c4_demo.jsonl", encoding="utf-8") as f:
        lines = [next(f) for _ in range(C4_DOCS)]
    (out / "c4_web.jsonl").write_text("".join(lines), encoding="utf-8")

    pairs = json.loads((shared / "orca_style/dpo_en_demo.json").read_text(encoding="utf-8"))
    single = [p for p in pairs if sum(m["from"] == "human" for m in p["conversations"]) == 1]
    # the original's own layout: indent 2, ASCII escapes, trailing newline
    (out / "orca_dpo_pairs.json").write_text(json.dumps(single, indent=2) + "\n", encoding="utf-8")

    trees = [json.loads(line) for line in open(shared / "oasst/en_100_tree.jsonl", encoding="utf-8")]
    seed_text = (out / "oasst_seed.guanaco.jsonl").read_text(encoding="utf-8")
    prompts, seen = [], set()
    for tree in trees:
        for text in followups(tree):
            if standalone(text) and text not in seen and text not in seed_text:
                seen.add(text)
                prompts.append({"prompt": text})
    # KoChatGPT's kochatgpt_3_PPO.jsonl layout: one JSON array, indent 4, UTF-8, no trailing newline
    (out / "oasst_ppo_prompts.json").write_text(json.dumps(prompts, indent=4, ensure_ascii=False), encoding="utf-8")
    click.echo(f"c4 docs {len(lines)}, preference pairs {len(single)}, ppo prompts {len(prompts)}")


if __name__ == "__main__":
    main()
