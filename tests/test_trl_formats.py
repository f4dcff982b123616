"""TRL's preference and SFT data forms, each written to a file and read by the real loader: the implicit-prompt
form (Anthropic HH), typed content parts, and messages-only rows for SFT."""

import json

import pytest

from tgdpo_ray.config.job import DataSection
from tgdpo_ray.data.preference import DataError, prepare_pairs

USER = {"role": "user", "content": "Repeat: apple river"}
EXPLICIT = {"prompt": [USER], "chosen": [{"role": "assistant", "content": "apple river"}],
            "rejected": [{"role": "assistant", "content": "apple stone"}]}


def section(path, **extra) -> DataSection:
    return DataSection.model_validate({"train": str(path), **extra})


def read(tokenizer, tmp_path, rows, chosen_only=False, **extra):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = section(path, **extra)
    return prepare_pairs(data.train, data, tokenizer, chosen_only=chosen_only)


def ids(prepared):
    return [{key: row[key] for key in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in prepared.rows]


def test_implicit_prompt_conversations_read_as_the_explicit_pair(tokenizer, tmp_path):
    implicit = {"chosen": EXPLICIT["prompt"] + EXPLICIT["chosen"], "rejected": EXPLICIT["prompt"] + EXPLICIT["rejected"]}
    assert ids(read(tokenizer, tmp_path, [implicit])) == ids(read(tokenizer, tmp_path, [EXPLICIT]))


def test_multi_turn_implicit_prompt_keeps_the_shared_turns_in_the_prompt(tokenizer, tmp_path):
    turns = [USER, {"role": "assistant", "content": "apple river"}, {"role": "user", "content": "Again"}]
    implicit = {"chosen": turns + [{"role": "assistant", "content": "apple river"}],
                "rejected": turns + [{"role": "assistant", "content": "no"}]}
    explicit = {"prompt": turns, "chosen": "apple river", "rejected": "no"}
    assert ids(read(tokenizer, tmp_path, [implicit])) == ids(read(tokenizer, tmp_path, [explicit]))


def test_anthropic_hh_strings_split_at_a_word_boundary(tokenizer, tmp_path):
    # HH's form: whole dialogues as text. The answers start "They" and "The": the shared "The" is not split off.
    hh = {"chosen": "\n\nHuman: Who is there?\n\nAssistant: They are friends.",
          "rejected": "\n\nHuman: Who is there?\n\nAssistant: The wind."}
    explicit = {"prompt": "\n\nHuman: Who is there?\n\nAssistant:", "chosen": "They are friends.", "rejected": "The wind."}
    assert ids(read(tokenizer, tmp_path, [hh])) == ids(read(tokenizer, tmp_path, [explicit]))


@pytest.mark.parametrize("row, detail", [
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "b"}]},
     "the two conversations differ from their first message"),
    ({"chosen": [USER, {"role": "assistant", "content": "x"}, {"role": "user", "content": "go on"}],
      "rejected": [USER, {"role": "assistant", "content": "x"}, {"role": "user", "content": "stop"}]},
     "goes on with a 'user' message"),
    ({"chosen": "Alpha beta", "rejected": "Gamma delta"}, "share no words at their start"),
])
def test_conversations_without_a_shared_prompt_are_a_named_bad_row(tokenizer, tmp_path, row, detail):
    with pytest.raises(DataError) as info:
        read(tokenizer, tmp_path, [EXPLICIT, row])
    assert str(info.value).startswith(f"{tmp_path / 'data.jsonl'}: line 2: no_common_prompt: ")
    assert detail in str(info.value)
    skipped = read(tokenizer, tmp_path, [EXPLICIT, row], bad_rows="skip")
    assert len(skipped.rows) == 1 and skipped.report()["skipped_by_reason"] == {"no_common_prompt": 1}


def test_typed_text_parts_read_as_plain_content(tokenizer, tmp_path):
    def typed(message, *texts):
        return {"role": message["role"], "content": [{"type": "text", "text": text} for text in texts]}

    row = {"prompt": [typed(USER, "Repeat:", "apple river")], "chosen": [typed(EXPLICIT["chosen"][0], "apple river")],
           "rejected": [typed(EXPLICIT["rejected"][0], "apple stone")]}
    joined = {**EXPLICIT, "prompt": [{"role": "user", "content": "Repeat:\napple river"}]}
    assert ids(read(tokenizer, tmp_path, [row])) == ids(read(tokenizer, tmp_path, [joined]))


def test_an_image_part_is_a_named_bad_row(tokenizer, tmp_path):
    row = {**EXPLICIT, "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]}
    with pytest.raises(DataError, match=r"line 1: non_string_content: prompt\[0\]\.content\[0\] is a 'image' part"):
        read(tokenizer, tmp_path, [row])


def test_messages_only_rows_serve_sft(tokenizer, tmp_path):
    conversation = {"messages": [{"role": "system", "content": "Be brief."}, USER,
                                 {"role": "assistant", "content": "apple river"}]}
    explicit = {"prompt": conversation["messages"][:2], "chosen": "apple river", "rejected": "apple stone"}
    [sft] = ids(read(tokenizer, tmp_path, [conversation], chosen_only=True))
    [pair] = ids(read(tokenizer, tmp_path, [explicit]))
    assert sft["prompt_ids"] == pair["prompt_ids"] and sft["chosen_ids"] == pair["chosen_ids"]
    assert sft["rejected_ids"] == []
    # A preference loss needs a rejected answer: the row is missing its fields, and the message says why.
    with pytest.raises(DataError, match=r"line 1: missing_field: no 'prompt' field .*serves loss.type sft only"):
        read(tokenizer, tmp_path, [conversation])


def test_messages_only_row_without_an_answer_is_a_bad_row(tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"line 1: missing_field: messages holds no assistant message"):
        read(tokenizer, tmp_path, [{"messages": [USER]}], chosen_only=True)

