#!/usr/bin/env python3
"""Writes the malformed-input corpus used by tests/prep_inputs.rs (run from this folder).

Each file is a small, deliberately broken (or awkward) preference dataset. The expected
outcome of `edpo prep` on each (exit code 2 and a message, or a counted skip) is listed in
tests/prep_inputs.rs next to the file name.
"""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
GOOD = {"prompt": "What did you think of the movie?", "chosen": "The movie was wonderful and lovely.", "rejected": "The movie was awful and dull."}


def good(i):
    return {"id": f"ok-{i}", **GOOD, "chosen": GOOD["chosen"] + f" {i}"}


def jsonl(name, rows):
    (HERE / name).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def chat(i, chosen_role="assistant", prompt_role="user"):
    return {
        "id": f"c-{i}",
        "prompt": [{"role": prompt_role, "content": "Tell me about the book."}],
        "chosen": [{"role": chosen_role, "content": f"A lovely book {i}."}],
        "rejected": [{"role": "assistant", "content": f"A dull book {i}."}],
    }


jsonl("missing_column.jsonl", [{k: v for k, v in good(i).items() if k != "rejected"} for i in range(3)])
jsonl("null_values.jsonl", [good(0), {**good(1), "chosen": None}, good(2)])
jsonl("wrong_type.jsonl", [good(0), good(1), {**good(2), "chosen": 42}])
jsonl("empty_strings.jsonl", [good(0), {**good(1), "chosen": ""}, {**good(2), "rejected": ""}, good(3)])
(HERE / "invalid_utf8.jsonl").write_bytes(
    (json.dumps(good(0)) + "\n").encode() + b'{"id": "x", "prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'
)
full = pa.Table.from_pylist([good(i) for i in range(50)])
pq.write_table(full, HERE / "_tmp.parquet")
data = (HERE / "_tmp.parquet").read_bytes()
(HERE / "truncated.parquet").write_bytes(data[: len(data) // 2])
(HERE / "_tmp.parquet").unlink()
(HERE / "empty.jsonl").write_bytes(b"")
jsonl("no_assistant_turn.jsonl", [chat(0), chat(1, chosen_role="user"), chat(2)])
jsonl("unknown_role.jsonl", [chat(0), chat(1, prompt_role="narrator")])
jsonl("over_length.jsonl", [good(0), {**good(1), "prompt": "Tell me " * 40 + "about it."}, good(2)])
jsonl("duplicate_ids.jsonl", [good(0), good(1), good(0), good(2)])
jsonl("invalid_json.jsonl", [good(0), '{"id": "broken", "prompt": "x", "chosen": '])
jsonl("not_an_object.jsonl", [good(0), "[1, 2, 3]"])
jsonl("token_out_of_range.jsonl", [
    {"id": "t0", "prompt": [5, 6, 7], "chosen": [8, 9], "rejected": [10, 11]},
    {"id": "t1", "prompt": [5, 6, 7], "chosen": [8, 99999], "rejected": [10, 11]},
])
jsonl("token_not_integer.jsonl", [
    {"id": "t0", "prompt": [5, 6, 7], "chosen": [8, 9], "rejected": [10, 11]},
    {"id": "t1", "prompt": [5, 6, 7], "chosen": [8, 1.5], "rejected": [10, 11]},
])
jsonl("mixed_formats.jsonl", [good(0), chat(1)])
(HERE / "pairs.csv").write_text("prompt,chosen,rejected\nq,a,b\n")
pq.write_table(pa.Table.from_pylist([{**good(i), "chosen": i} for i in range(3)]), HERE / "wrong_type.parquet")
pq.write_table(pa.Table.from_pylist([{"id": f"p{i}", "prompt": "q", "chosen": "a"} for i in range(3)]), HERE / "missing_column.parquet")
jsonl("message_without_role.jsonl", [chat(0), {**chat(1), "chosen": [{"content": "no role"}]}])
jsonl("empty_prompt.jsonl", [good(0), {**good(1), "prompt": ""}, good(2)])
pq.write_table(
    pa.Table.from_pylist([good(0), {**good(1), "rejected": None}, good(2)]), HERE / "null_values.parquet"
)
jsonl("chat_not_a_list.jsonl", [chat(0), {**chat(1), "chosen": "just a string"}])
print("corpus written to", HERE)
