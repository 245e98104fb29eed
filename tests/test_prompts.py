"""Prompt files (``shortcuts.prompts``): one reader for bench, agreement and calibrate; text lines,
``{"text": ...}`` and ``{"messages": [...]}`` chat requests rendered with the model's chat template."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from support.models import word_tokenizer

from shortcuts.errors import CorpusError
from shortcuts.prompts import encode, held_out_prompts, plain_chat, read_prompt_file, read_prompts

CHAT = [{"role": "user", "content": "the king of the river"}]


def _jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    return path


def test_every_kind_of_line_is_read_in_order(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "p.jsonl", [{"text": " the war "}, {"messages": CHAT, "kind": "x"}, {"text": "  "}])
    assert read_prompt_file(f) == ["the war", CHAT]  # extra keys ignored, blank prompts skipped
    txt = tmp_path / "p.txt"
    txt.write_text("the war\n\n{\"text\": \"taken as text\"}\n")
    assert read_prompt_file(txt) == ["the war", '{"text": "taken as text"}']


@pytest.mark.parametrize(("row", "needle"), [
    ("{not json", "not JSON"), (json.dumps({"prompt": "x"}), "'text' string or a 'messages' list"),
    (json.dumps({"messages": []}), "non-empty list"), (json.dumps({"messages": [{"role": "user"}]}), "non-empty list"),
    (json.dumps(["the"]), "'text' string"),
])
def test_bad_lines_name_their_line(tmp_path: Path, row: str, needle: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"text": "fine"}) + "\n" + row + "\n")
    with pytest.raises(CorpusError, match=needle) as e:
        read_prompt_file(f)
    assert "bad.jsonl:2" in str(e.value)
    with pytest.raises(CorpusError, match="corpus not found"):
        read_prompt_file(tmp_path / "missing.jsonl")


def test_chat_requests_go_through_the_template_and_are_never_cut(tmp_path: Path) -> None:
    tok = word_tokenizer()  # its template joins the contents; a real model's adds its role tokens
    lm = SimpleNamespace(tokenizer=tok)
    rendered = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert encode(tok, CHAT) == list(rendered)
    assert encode(tok, "the war") == list(tok("the war")["input_ids"])
    f = _jsonl(tmp_path / "p.jsonl", [{"text": "the old city of the river"}, {"messages": CHAT}])
    assert read_prompts(lm, f, n=1, max_tokens=3) == [encode(tok, "the old city of the river")[-3:]]  # its end
    assert read_prompts(lm, f, max_tokens=64) == [encode(tok, "the old city of the river"), encode(tok, CHAT)]
    with pytest.raises(CorpusError, match="chat request of 5 tokens"):
        read_prompts(lm, f, max_tokens=3)
    shuffled = held_out_prompts(lm, f, 2, min_tokens=1, max_tokens=2)  # texts cut to their start, chats whole
    assert sorted(shuffled) == sorted([encode(tok, "the old"), encode(tok, CHAT)])


def test_a_model_without_a_template_gets_plain_turns() -> None:
    tok = word_tokenizer()
    tok.chat_template = None
    assert plain_chat(CHAT) == "User: the king of the river\n\nAssistant:"
    assert encode(tok, CHAT) == list(tok(plain_chat(CHAT))["input_ids"])
