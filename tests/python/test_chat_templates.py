"""`edpo prep` renders real Hugging Face chat templates exactly as transformers does, and
tokenises conversational pairs by TRL 0.13's rule, row by row.

The templates are public ones, not ours: 15 from the npm package @huggingface/ollama-utils@0.0.18
(`src/chat-template-automap.ts`, the `tokenizer.chat_template` of public GGUF models) and one
from llama.cpp's `models/templates` in the PyPI sdist of llama-cpp-python 0.3.16 (Cohere
command-r7b, whose output depends on lstrip_blocks). scripts/fetch_chat_templates.sh fetches
them into a cache and checks their hashes; nothing of them is stored in this repository.

Expected ids: `trl.data_utils.maybe_apply_chat_template` (prompt rendered with the generation
prompt, each response = render(prompt + response) minus the prompt) and then
`DPOTrainer.tokenize_row` (prompt, chosen and rejected tokenised separately without special
tokens, EOS appended to both responses). TRL 0.13's dpo_trainer module does not import under
transformers 5, so `tokenize_row` is taken out of the installed `trl/trainer/dpo_trainer.py`
with `ast` and run as it is: still the library's own code.

All templates use the sample bundle's tokenizer (byte-level BPE, so any text tokenises) with
`bos_token` set to one of its special tokens; the parity is of text, so one tokenizer serves.
"""

import ast
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from broken_bundles import rehash
from conftest import BUNDLE, ROOT, edpo_bin

CACHE = Path(os.environ.get("EDPO_CHAT_TEMPLATES", Path.home() / ".cache/edpo/chat-templates"))

# (source key, model family, sha256 of the template text, renders a system message).
# Keys of OLLAMA_CHAT_TEMPLATE_MAPPING name the npm set; "command-r7b.jinja" is the sdist file.
TEMPLATES = [
    ("library/llama2:7b", "meta-llama/Llama-2-7b-chat-hf", "e8d5b5a546d3f19df16a5320c614fab05bdc4edd50e850f1afd947b503ea41cf", True),
    ("library/tinyllama:1.1b", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "66291cf0045c2425a3a667cf3cbb7af2b11f09e025c02f97245323ab79119362", True),
    ("library/mistral:7b-instruct-fp16", "mistralai/Mistral-7B-Instruct (v0.1 template)", "7e995b379ec01747807246483647cd99030abf331653f1119e16d7ac041a3495", False),
    ("library/mixtral:8x7b", "mistralai/Mixtral-8x7B-Instruct-v0.1", "796853172235ab3aaa4810013ddfe2eab481bda3306dad4f700c00d436eed596", True),
    ("library/gemma2:2b", "google/gemma-2-2b-it", "ecd6ae513fe103f0eb62e8ab5bfa8d0fe45c1074fa398b089c93a7e70c15cfd6", False),
    ("library/gemma3:270m", "google/gemma-3-270m-it", "7de1c58e208eda46e9c7f86397df37ec49883aeece39fb961e0a6b24088dd3c4", True),
    ("library/llama3.2:3b", "meta-llama/Llama-3.2-3B-Instruct", "5816fce10444e03c2e9ee1ef8a4a1ea61ae7e69e438613f3b17b69d0426223a4", True),
    ("library/qwen2.5:0.5b", "Qwen/Qwen2.5-0.5B-Instruct", "d5495a1e5db0611132a97e46a65dbb64a642a499421228b9c8b93229097fa9a4", True),
    ("library/qwen3:0.6b", "Qwen/Qwen3-0.6B", "87a2728cb8dc9fe424d624542f6060ec05a1d285ebbec578bb078900e33396b5", True),
    ("library/phi3.5:3.8b", "microsoft/Phi-3.5-mini-instruct", "78d976a442bcde2f0be15aafbb8e3050e1104f86732266f68403251b89982a90", True),
    ("library/smollm2:135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "872be49dbb638044ad01b60388f48d469ff2980e5f0dccdc22ec907db54d0788", True),
    ("library/deepseek-coder:1.3b", "deepseek-ai/deepseek-coder-1.3b-instruct", "993c0af704bad76aeba4263a5318f7873a06420a8eb7d40b72a49c39599c0a66", True),
    ("library/command-r:35b", "CohereForAI/c4ai-command-r-v01", "6269c0952a633ea8ec6ac9e7cc28e7af15295b0819fd7c09fab3f0e6a392c7e1", True),
    ("library/falcon2:11b", "tiiuae/falcon-11B", "2c575663fbb6c03a6af2cb20f5e8b3b764af5d66c6465d4067ff5c8b25ee3d0b", True),
    ("library/openchat:7b", "openchat/openchat-3.5-0106", "901b10d47195fadb5692137ecd4b2733730be9d32fde6c6eae23e5153712525e", True),
    ("command-r7b.jinja", "CohereForAI/c4ai-command-r7b-12-2024 (tool_use file)", "0c3f266d86f93a1f50f1573648ba005cb9691ff176c2cfd7ca1a0a33fd7023ec", True),
]


def m(role, content):
    return {"role": role, "content": content}


# System messages, multi-turn prompts, whitespace at the edges of contents, non-ASCII text,
# text that looks like template syntax, and Python-only whitespace (U+001F).
ROWS = [
    {"prompt": [m("system", "You are a helpful assistant."), m("user", "What is the capital of France?")],
     "chosen": [m("assistant", "The capital of France is Paris.")],
     "rejected": [m("assistant", "I think it is Lyon.")]},
    {"prompt": [m("user", "  Hello there!  \n")],
     "chosen": [m("assistant", "\n Hi! How can I help? \n")],
     "rejected": [m("assistant", "  go away\t")]},
    {"prompt": [m("system", " Réponds en français, s'il te plaît. \n"), m("user", "Ça va ?"),
                m("assistant", "Oui, ça va très bien !"), m("user", "Et en japonais ? 日本語で答えて。")],
     "chosen": [m("assistant", "はい、元気です。😊")],
     "rejected": [m("assistant", "Да, всё хорошо.")]},
    {"prompt": [m("user", "Write {{ name }} in braces; keep <b>tags</b> & 'quotes' \"as is\"."),
                m("assistant", "{{ name }} <b>tags</b> & 'quotes' \"as is\""),
                m("user", "Now with per cent signs: 100% {% done %}")],
     "chosen": [m("assistant", "100% {% done %}")],
     "rejected": [m("assistant", "100 percent")]},
    {"prompt": [m("system", "Line one.\nLine two.\n\n"), m("user", "\n\nSummarise:\n- a\n- b\n")],
     "chosen": [m("assistant", "- a and b\n")],
     "rejected": [m("assistant", "\n\n- b\n")]},
    {"prompt": [m("user", "Ποιο είναι το 2+2;"), m("assistant", "4"), m("user", "Και το 3×3; 🤔"),
                m("assistant", "9"), m("user", "Danke schön — ¿y 4×4?")],
     "chosen": [m("assistant", "16 ✓")],
     "rejected": [m("assistant", "\t15\n")]},
    {"prompt": [m("system", "你是一个乐于助人的助手。"), m("user", "  用一句话介绍你自己。  ")],
     "chosen": [m("assistant", " 我是一个助手。 ")],
     "rejected": [m("assistant", "I am\u00a0a bot\u2003")]},
    {"prompt": [m("user", "tab\tand a unit separator\u001f at the end\u001f")],
     "chosen": [m("assistant", "\u001fok\u001f")],
     "rejected": [m("assistant", "no")]},
]

SPECIALS = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|pad|>"}


def js_string(src: str, i: int) -> tuple[str, int]:
    """A JavaScript string literal starting at src[i] (its quote): (text, index after it)."""
    quote, i, out = src[i], i + 1, []
    simple = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "v": "\v", "0": "\0", "\n": ""}
    while src[i] != quote:
        c = src[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        e = src[i + 1]
        if e == "u" and src[i + 2] == "{":
            j = src.index("}", i)
            out.append(chr(int(src[i + 3 : j], 16)))
            i = j + 1
        elif e == "u":
            out.append(chr(int(src[i + 2 : i + 6], 16)))
            i += 6
        elif e == "x":
            out.append(chr(int(src[i + 2 : i + 4], 16)))
            i += 4
        else:
            out.append(simple.get(e, e))
            i += 2
    # \uD83D\uDE00 pairs decode to surrogates above; join them into one character.
    return "".join(out).encode("utf-16", "surrogatepass").decode("utf-16"), i + 1


def automap_templates(ts: str) -> list[tuple[str, str]]:
    """OLLAMA_CHAT_TEMPLATE_MAPPING's entries: (model key, the `gguf` template)."""
    out = []
    for match in re.finditer(r"\bmodel:\s*", ts):
        key, j = js_string(ts, match.end())
        k = ts.index("gguf:", j) + len("gguf:")
        while ts[k] in " \t\n":
            k += 1
        out.append((key, js_string(ts, k)[0]))
    return out


@pytest.fixture(scope="module")
def templates() -> dict[str, str]:
    subprocess.run([str(ROOT / "scripts/fetch_chat_templates.sh")], check=True)
    entries = automap_templates((CACHE / "chat-template-automap.ts").read_text(encoding="utf-8"))
    assert len(entries) == 97
    found = dict(entries)
    found["command-r7b.jinja"] = (CACHE / "command-r7b.jinja").read_text(encoding="utf-8")
    out = {}
    for key, family, sha, _ in TEMPLATES:
        text = found[key]
        assert hashlib.sha256(text.encode()).hexdigest() == sha, f"{key} ({family}) changed"
        out[key] = text
    return out


def tokenize_row_from_trl():
    """`DPOTrainer.tokenize_row` of the installed TRL, compiled from its source file."""
    trl_dir = Path(importlib.util.find_spec("trl").submodule_search_locations[0])
    path = trl_dir / "trainer" / "dpo_trainer.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "tokenize_row")
    fn.decorator_list = []  # a @staticmethod in the class
    namespace: dict = {}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["tokenize_row"]


def rows_for(accepts_system: bool) -> list[dict]:
    if accepts_system:
        return ROWS
    return [{**r, "prompt": [x for x in r["prompt"] if x["role"] != "system"]} for r in ROWS]


def make_bundle(dst: Path, template: str) -> Path:
    """The sample bundle with `template` as its chat template (manifest hash updated)."""
    shutil.copytree(BUNDLE, dst)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config.update(SPECIALS, chat_template=template)
    (dst / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))
    rehash(dst, "tokenizer_config.json")
    return dst


def run_prep(bundle: Path, data: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [edpo_bin(), "--quiet", "prep", "--model", str(bundle), "--data", str(data), "--out", str(out)],
        capture_output=True, text=True,
    )  # fmt: skip


def expected_ids(tok, rows, tokenize_row) -> list[dict]:
    from trl.data_utils import maybe_apply_chat_template

    out = []
    for row in rows:
        text = maybe_apply_chat_template(row, tok)
        out.append(tokenize_row(text, tok, None, None, False))
    return out


def first_difference(tok, name, row, want, got) -> str | None:
    for side in ("prompt", "chosen", "rejected"):
        w, g = want[f"{side}_input_ids"], got[f"{side}_ids"]
        if w == g:
            continue
        i = next((i for i, (a, b) in enumerate(zip(w, g)) if a != b), min(len(w), len(g)))
        return (
            f"{name} row {row} {side}: first difference at token {i} of {len(w)} expected / {len(g)} got\n"
            f"  expected: {tok.decode(w[:i])!r} | {tok.decode(w[i:])!r}\n"
            f"  edpo:     {tok.decode(g[:i])!r} | {tok.decode(g[i:])!r}"
        )
    return None


def test_prep_matches_transformers_and_trl_on_real_templates(templates, tmp_path):
    from transformers import AutoTokenizer

    tokenize_row = tokenize_row_from_trl()
    failures, compared = [], 0
    for n, (key, family, _, accepts_system) in enumerate(TEMPLATES):
        bundle = make_bundle(tmp_path / f"bundle-{n}", templates[key])
        rows = rows_for(accepts_system)
        data = tmp_path / f"rows-{n}.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tok = AutoTokenizer.from_pretrained(bundle)
        # Templates that print today's date (strftime_now) are rendered before and after edpo,
        # so a run across midnight still compares like with like.
        before = expected_ids(tok, rows, tokenize_row)
        proc = run_prep(bundle, data, tmp_path / f"shards-{n}")
        assert proc.returncode == 0, f"{key} ({family}): edpo prep failed\n{proc.stderr}"
        after = expected_ids(tok, rows, tokenize_row)
        table = pq.read_table(sorted((tmp_path / f"shards-{n}").glob("part-*.parquet"))).to_pylist()
        got = sorted(table, key=lambda r: r["source_row"])
        assert len(got) == len(rows), f"{key}: {len(got)} rows written of {len(rows)}"
        for i, row in enumerate(got):
            diffs = [first_difference(tok, f"{key} ({family})", i, want[i], row) for want in (before, after)]
            if all(diffs):
                failures.append(diffs[0])
            compared += 1
    assert not failures, f"{len(failures)} of {compared} rows differ:\n" + "\n".join(failures)
    assert compared == len(TEMPLATES) * len(ROWS) == 128


def test_the_templates_cover_trim_and_lstrip_blocks(templates):
    """Rendering with Jinja2's defaults (no trim_blocks / lstrip_blocks) changes some outputs:
    the parity above would catch either option missing in edpo."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    changed = {"trim_blocks": [], "lstrip_blocks": []}
    for key, _, _, accepts_system in TEMPLATES:
        compiled = _compile_jinja_template(templates[key])
        kwargs = dict(messages=rows_for(accepts_system)[2]["prompt"], add_generation_prompt=True,
                      tools=None, documents=None, **SPECIALS)  # fmt: skip
        reference = compiled.render(**kwargs)
        for option in changed:
            plain = compiled.environment.overlay(**{option: False}).from_string(templates[key])
            if plain.render(**kwargs) != reference:
                changed[option].append(key)
    assert len(changed["trim_blocks"]) >= 3, changed
    assert changed["lstrip_blocks"] == ["command-r7b.jinja"], changed


def test_template_errors_name_the_row_and_the_message(templates, tmp_path):
    bundle = make_bundle(tmp_path / "bundle", templates["library/gemma2:2b"])
    data = tmp_path / "rows.jsonl"
    rows = [rows_for(False)[1], ROWS[0]]  # the second row has a system message
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    proc = run_prep(bundle, data, tmp_path / "shards")
    assert proc.returncode == 2, proc.stderr
    assert f"`{data}` line 2" in proc.stderr, proc.stderr
    assert "raised an error at line 1: System role not supported" in proc.stderr, proc.stderr
    assert "tokenizer_config.json" in proc.stderr, proc.stderr
