"""The chat assistant (issue 15): the stdlib-chat instruction set (fixed splits, varied phrasing, two-turn
conversations, every record inside the quickstart's context), its evaluator, a short SFT run that it scores as better,
and a server that lists the chat specialist first so that the chat page opens on it."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict

import httpx
import pytest

from conftest import ServerProcess, make_adapter, tiny_overrides
from fmforge.data.stdlib_tasks import CHAT_KINDS, CHAT_QUESTIONS, FOLLOW_UPS, chat_questions, module_answer
from fmforge.data.tasks import task_records

SPLITS = ("train", "val", "test")
KEY = "test-key"


def function_of(where: str) -> str:
    """'stdlib-chat:test:json/decoder.py:JSONDecoder.decode' -> 'json/decoder.py:JSONDecoder.decode'."""
    return where.split(":", 2)[2]


@pytest.fixture(scope="module")
def chats() -> dict[str, list[tuple[str, dict]]]:
    return {split: task_records("stdlib-chat", split) for split in SPLITS}


# ---- the data set ------------------------------------------------------------------------------------------------

def test_splits_are_fixed_disjoint_by_function_and_those_of_the_other_stdlib_sets(chats):
    functions = {split: {function_of(where) for where, _ in chats[split]} for split in SPLITS}
    assert len(functions["train"]) > 2500 and len(functions["val"]) > 300 and len(functions["test"]) > 300
    assert not functions["train"] & functions["test"] and not functions["train"] & functions["val"]
    assert not functions["val"] & functions["test"]
    # the same split as stdlib-docstring / -body: no chat training function is a test function of theirs, or back
    docstring = {split: {function_of(w) for w, _ in task_records("stdlib-docstring", split)} for split in SPLITS}
    assert functions["test"] <= docstring["test"] and not functions["train"] & docstring["test"]
    assert not docstring["train"] & functions["test"]
    assert task_records("stdlib-chat", "test", 20) == chats["test"][:20]  # fixed: the same records every time


def question_template(record: dict) -> str:
    """The first question with the function's own text blanked: which phrasing was used."""
    question = record["messages"][0]["content"]
    for template in (t for templates in CHAT_QUESTIONS.values() for t in templates):
        pattern = re.escape(template).replace(r"\{name\}", ".+").replace(r"\{doc\}", ".+").replace(r"\{code\}", ".+")
        if re.fullmatch(pattern, question, re.S):
            return template
    raise AssertionError(f"no template matches {question!r}")


def test_phrasing_varies_and_two_turn_conversations_ask_about_the_same_function(chats):
    train = [record for _, record in chats["train"]]
    assert set(Counter(r["kind"] for r in train)) == set(CHAT_KINDS)
    assert min(Counter(r["kind"] for r in train).values()) > len(train) / len(CHAT_KINDS) / 2  # roughly even
    for first in ("write", "explain", "module"):
        used = Counter(question_template(r) for r in train if r["kind"].split("+")[0] == first)
        assert set(used) == set(CHAT_QUESTIONS[first]) and min(used.values()) > 30, used
    follow_ups = Counter(r["messages"][2]["content"] for r in train if "+" in r["kind"])
    assert set(follow_ups) == {q for asked in FOLLOW_UPS.values() for q in asked}

    for where, record in chats["train"]:
        roles = [m["role"] for m in record["messages"]]
        turns = record["kind"].split("+")
        assert roles == ["user", "assistant"] * len(turns)
        module = function_of(where).split("/")[0].split(".py")[0]
        replies = dict(zip(turns, [m["content"] for m in record["messages"][1::2]]))
        if "module" in replies:
            assert replies["module"] == module_answer(module)
        if "write" in replies:
            assert replies["write"].startswith(("def ", "async def ", "@"))
            name = function_of(where).rsplit(":", 1)[-1].rsplit(".", 1)[-1]
            assert re.search(rf"^(async )?def {name}\s*\(", replies["write"], re.M)
        if "explain" in replies:
            # the explanation is the docstring's first line, which the code in the question does not show
            assert 10 <= len(replies["explain"]) <= 120 and "\n" not in replies["explain"]
            assert all(replies["explain"] not in m["content"] for m in record["messages"][0::2])


def test_every_record_renders_with_the_chat_template_inside_the_quickstarts_context(chats, tmp_path_factory):
    """With the tokenizer the quickstart trains (4,096-token BPE of the stdlib) and its recipe's context."""
    from fmforge.cli import builtin_recipe, train_tokenizer_from_sources
    from fmforge.config import load_recipe
    from fmforge.data.finetune import sft_example

    tokenizer = train_tokenizer_from_sources(["stdlib"], 4096, "text", "text")
    context = load_recipe(builtin_recipe("quickstart"), []).model.context_length
    assert context == 256
    lengths = []
    for split in SPLITS:
        for where, record in chats[split]:
            example = sft_example(record, tokenizer, where)
            assert sum(example.loss_mask) >= 2  # an assistant reply and its end-of-turn to learn
            lengths.append(len(example.tokens))
    assert max(lengths) <= context and sum(lengths) / len(lengths) < context / 2


def test_the_dedicated_sets_asked_through_chat_are_their_functions_in_their_order():
    docstring = task_records("stdlib-docstring", "test", 30)
    asked = chat_questions("stdlib-docstring", "test", 30)
    assert [w for w, _ in asked] == [w for w, _ in docstring]
    for (_, record), (_, chat) in zip(docstring, asked):
        assert chat["kind"] == "explain" and chat["messages"][-1]["content"] == record["completion"].strip()
    module = task_records("stdlib-module", "test", 30)
    asked = chat_questions("stdlib-module", "test", 30)
    assert [(w, module_answer(r["label"])) for w, r in module] == [(w, c["messages"][-1]["content"]) for w, c in asked]
    from fmforge.errors import DataError
    with pytest.raises(DataError, match="stdlib-chat is not asked through chat; use one of stdlib-docstring"):
        chat_questions("stdlib-chat", "test")


# ---- a chat specialist, scored and served --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_base(prepared, tmp_path_factory):
    """The tiny model of the `checkpoint` fixture with the quickstart's context (256; most conversations fit)."""
    from fmforge.cli import main

    out = tmp_path_factory.mktemp("chat-base") / "run"
    assert main(["pretrain", *tiny_overrides(prepared, out, max_steps=30, lr=1e-2, eval_interval=30,
                                             checkpoint_interval=30, context_length=256)]) == 0
    return out


@pytest.fixture(scope="module")
def chat_tuned(chat_base, tmp_path_factory):
    """chat_base fine-tuned 60 steps on stdlib-chat (all weights: its few 64-wide layers leave a LoRA little to
    steer; the quickstart's LoRA works on a 6-layer, 256-wide base)."""
    from fmforge.cli import main

    out = tmp_path_factory.mktemp("chat-full") / "run"
    assert main(["finetune", "--checkpoint", str(chat_base), "--data", "stdlib-chat", "--method", "full",
                 "--out", str(out), "--max_steps", "60", "--batch_size", "8", "--lr", "3e-3", "--eval_interval", "60",
                 "--checkpoint_interval", "60", "--log_interval", "20"]) == 0
    return out


def evaluate(checkpoint, out, capsys) -> dict:
    from fmforge.cli import main

    assert main(["eval", "--checkpoint", str(checkpoint), "--tasks", "stdlib-chat", "--limit", "24",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    return json.loads((out / "report.json").read_text())["results"]["stdlib-chat"]


def test_a_short_sft_run_is_scored_better_by_the_chat_evaluator(chat_base, chat_tuned, tmp_path, capsys):
    before = evaluate(chat_base, tmp_path / "base", capsys)
    after = evaluate(chat_tuned, tmp_path / "tuned", capsys)
    assert before["examples"] == after["examples"] == 24
    assert after["bits_per_byte"] < 0.9 * before["bits_per_byte"], (before, after)
    kinds = {key.split(".")[0] for key in after if "." in key}
    assert {"module", "explain+module", "write+module"} <= kinds
    assert sum(after[f"{kind}.examples"] for kind in kinds) == 24  # the breakdown covers every record once
    for kind in ("module", "explain+module", "write+module"):  # "It comes from `...`.": the fixed part is learnt
        assert after[f"{kind}.bits_per_byte"] < 0.8 * before[f"{kind}.bits_per_byte"], (kind, before, after)
    for key in after:
        if key.endswith(("exact_match", "similarity")):
            assert 0 <= after[key] <= 1


def test_a_record_without_a_final_reply_is_one_error_line(checkpoint, tmp_path, capsys):
    from fmforge.cli import main

    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
                    + "\n" + json.dumps({"messages": [{"role": "user", "content": "and then?"}]}) + "\n")
    assert main(["eval", "--checkpoint", str(checkpoint), "--tasks", f"sft:{data}"]) != 0
    error = capsys.readouterr().err.strip()
    assert error == (f"error: {data}:2: the last message must be the assistant's reply (it is what is scored)")


@pytest.fixture(scope="module")
def chat_server(chat_base, tmp_path_factory):
    """The base, a completion specialist and a chat specialist (a LoRA on stdlib-chat), given in that order."""
    from fmforge.checkpoint import resolve_checkpoint
    from fmforge.cli import main

    base = resolve_checkpoint(chat_base)
    root = tmp_path_factory.mktemp("specialists")
    docstring = make_adapter(base, root / "docstring", 1, ["q_proj", "v_proj"], 4)
    assert main(["finetune", "--checkpoint", str(base), "--data", "stdlib-chat", "--out", str(root / "chat"),
                 "--max_steps", "4", "--eval_interval", "4", "--checkpoint_interval", "4"]) == 0
    process = ServerProcess("--checkpoint", str(base), "--adapter", f"docstring={docstring}",
                            "--adapter", f"chat={root / 'chat'}", "--api-key", KEY, "--max-batch", "2")
    yield process
    assert process.stop() == 0, process.output()


def test_the_server_lists_the_chat_specialist_first(chat_server):
    listed = httpx.get(chat_server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
    assert [(m["id"], m.get("task"), m["parent"]) for m in listed] == [
        ("chat", "sft", "base"), ("base", None, None), ("docstring", None, "base")]


def test_the_chat_page_opens_on_the_chat_specialist(browser, chat_server):
    context = browser.new_context(http_credentials={"username": "user", "password": KEY})
    try:
        page = context.new_page()
        page.goto(chat_server.url + "/")
        page.wait_for_selector("#model option[value='docstring']", state="attached")
        assert page.locator("#model").input_value() == "chat"
        assert page.locator("#model option").all_inner_texts() == [
            "chat (specialist, sft)", "base (base)", "docstring (specialist)"]
    finally:
        context.close()
