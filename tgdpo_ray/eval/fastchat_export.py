"""Our answers and judgments in FastChat's layout, so that FastChat's own tools (show_result.py, its QA browser,
its agreement scripts) read an eval folder:

    model_answer/<model>.jsonl           per question: question_id, answer_id, model_id,
                                         choices [{index: 0, turns}], tstamp (gen_model_answer.py's record)
    model_judgment/<judge>_single.jsonl  per judgment: question_id, model, judge [judge model, prompt name],
                                         user_prompt, judgment, score, turn, tstamp (play_a_match_single's record)
    model_judgment/<judge>_pair.jsonl    per question, turn and comparison, both orders in one record: question_id,
                                         model_1, model_2, g1_winner, g2_winner, judge, g1_user_prompt, g1_judgment,
                                         g2_user_prompt, g2_judgment, turn, tstamp (play_a_match_pair's record)

Written afresh from answers.jsonl's and judgments.jsonl's records at the end of every eval, so the two folders
always say what those files say. What FastChat cannot express is kept only in ours: the parse error, earlier
attempts, token counts, the answer errors.

How our records map onto FastChat's:
- an unparseable, failed or not-asked judgment (score None, winner None) is FastChat's "no verdict": score -1
  (single), "error" (pairwise); show_result.py leaves both out, as our statistics do;
- our pairwise "ab" order (model_a's answer shown first) is FastChat's game 1 with model_1 = model_a, "ba" its
  game 2; a winner is named "model_1", "model_2" or "tie", as in FastChat's records;
- <judge> is the judge's model name (or the rule's module:function) with "/" made "--", as the
  nvidia-mtbench-evaluator copy of gen_judgment.py names its file; a model's file name is made the same way.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from tgdpo_ray.common.jsonl import json_digest

ANSWER_DIR, JUDGMENT_DIR = "model_answer", "model_judgment"


def file_stem(name: str) -> str:
    """A model or judge name as a file name: "Qwen/Qwen2.5-7B" -> "Qwen--Qwen2.5-7B"."""
    return name.strip("/").replace("/", "--")


def fastchat_question_id(question_id: str):
    """Our ids are strings; FastChat's MT-Bench ids are integers, and its scripts look answers up by the id in
    question.jsonl: a decimal id goes back to an int, anything else stays a string."""
    return int(question_id) if question_id.isdigit() and str(int(question_id)) == question_id else question_id


def judge_model(identity: str) -> str:
    """The judge's model name from our judge identity ("vllm:<model>", "openai:<model>", "rule:<module:function>")."""
    return identity.split(":", 1)[1]


def fastchat_score(score: Optional[float]):
    """Ours -> FastChat's: None (no verdict) is -1; a whole number is written as FastChat writes [[8]], an int."""
    if score is None:
        return -1
    return int(score) if float(score).is_integer() else score


def user_prompts(tasks: Optional[list[dict]]) -> dict[str, str]:
    """digest -> the user message the judge saw (FastChat's user_prompt); a rule judge saw none."""
    prompts = {}
    for task in tasks or []:
        messages = task["messages"]
        if isinstance(messages, list):
            prompts[task["digest"]] = next((m["content"] for m in messages if m["role"] == "user"), "")
    return prompts


def answer_record(record: dict, tstamp: float) -> dict:
    return {"question_id": fastchat_question_id(record["question_id"]),
            # FastChat draws a random id; ours is the answer's own digest, so a re-export gives the same ids.
            "answer_id": json_digest([record["model"], record["question_id"], record["turns"]]),
            "model_id": record["model"],
            "choices": [{"index": 0, "turns": list(record["turns"])}],
            "tstamp": tstamp}


def single_record(record: dict, prompts: dict[str, str], tstamp: float) -> dict:
    return {"question_id": fastchat_question_id(record["question_id"]), "model": record["model"],
            "judge": [judge_model(record["judge"]), record["prompt"]],
            "user_prompt": prompts.get(record["digest"], ""), "judgment": record["judge_text"],
            "score": fastchat_score(record["score"]), "turn": record["turn"], "tstamp": tstamp}


def game_winner(record: Optional[dict]) -> str:
    """One order's verdict in FastChat's words; a missing or unparseable one is "error"."""
    if record is None:
        return "error"
    return {record["model_a"]: "model_1", record["model_b"]: "model_2", "tie": "tie"}.get(record["winner"], "error")


def pair_record(ab: Optional[dict], ba: Optional[dict], prompts: dict[str, str], tstamp: float) -> dict:
    first = ab or ba  # both orders share the comparison, question, turn, judge and prompt name
    return {"question_id": fastchat_question_id(first["question_id"]),
            "model_1": first["model_a"], "model_2": first["model_b"],
            "g1_winner": game_winner(ab), "g2_winner": game_winner(ba),
            "judge": [judge_model(first["judge"]), first["prompt"]],
            "g1_user_prompt": prompts.get(ab["digest"], "") if ab else "",
            "g1_judgment": ab["judge_text"] if ab else "",
            "g2_user_prompt": prompts.get(ba["digest"], "") if ba else "",
            "g2_judgment": ba["judge_text"] if ba else "",
            "turn": first["turn"], "tstamp": tstamp}


def write_folder(directory: Path, files: dict[str, list[dict]]) -> list[Path]:
    """Write each file name's records as JSON lines; other .jsonl files there (a model or judge no longer in the
    eval) are removed, since FastChat's scripts read every file in the folder."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in set(directory.glob("*.jsonl")) - {directory / name for name in files}:
        stale.unlink()
    for name, records in files.items():
        (directory / name).write_text("".join(json.dumps(record) + "\n" for record in records))
    return [directory / name for name in files]


def write_fastchat_files(eval_dir: Path, answers: list[dict], judgments: list[dict],
                         tasks: Optional[list[dict]] = None, tstamp: Optional[float] = None) -> dict[str, list[Path]]:
    """Write model_answer/ and model_judgment/ in eval_dir from answers.jsonl's and judgments.jsonl's records;
    `tasks` (flow.judgment_tasks) give the judge's prompts, else user_prompt is empty. Returns the files written,
    {"answers": [...], "judgments": [...]}."""
    eval_dir, now = Path(eval_dir), time.time() if tstamp is None else tstamp
    prompts = user_prompts(tasks)

    by_model: dict[str, list[dict]] = {}
    for record in answers:
        by_model.setdefault(record["model"], []).append(answer_record(record, now))
    by_file: dict[str, list[dict]] = {}  # judgment file name -> records
    units: dict[tuple, dict] = {}  # (judge, model_a, model_b, question, turn) -> {"ab": record, "ba": record}
    for record in judgments:
        if record["mode"] == "single":
            name = f"{file_stem(judge_model(record['judge']))}_single.jsonl"
            by_file.setdefault(name, []).append(single_record(record, prompts, now))
        else:
            key = (record["judge"], record["model_a"], record["model_b"], record["question_id"], record["turn"])
            units.setdefault(key, {})[record["order"]] = record
    for (judge, *_), orders in units.items():
        name = f"{file_stem(judge_model(judge))}_pair.jsonl"
        by_file.setdefault(name, []).append(pair_record(orders.get("ab"), orders.get("ba"), prompts, now))

    return {"answers": write_folder(eval_dir / ANSWER_DIR, {f"{file_stem(model)}.jsonl": records
                                                            for model, records in by_model.items()}),
            "judgments": write_folder(eval_dir / JUDGMENT_DIR, by_file)}
