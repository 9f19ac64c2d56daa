"""PyTorch baseline for `make bench-prep`: what a PyTorch tool does to precompute the
reference — Hugging Face model forward + log-softmax + gather + top-K — over the same pairs,
with the same tokenisation rules, length-bucketed batches and token budget as `edpo prep`.
Prints a JSON line with the tokens scored and the seconds spent."""

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=0, help="cut responses so prompt + response fits (0 = no limit)")
    ap.add_argument("--max-prompt-length", type=int, default=0, help="keep the end of longer prompts (0 = no limit)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.time()
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    bundle = Path(args.bundle)
    config = AutoConfig.from_pretrained(bundle)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()
    model.load_state_dict(load_file(bundle / "params.safetensors"), strict=False)
    model.tie_weights()
    tok = AutoTokenizer.from_pretrained(bundle)
    seqs = []
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    # JSON Lines are split on "\n" only: str.splitlines() would also split at U+2028 and other
    # Unicode line breaks that JSON strings may hold unescaped.
    for line in filter(str.strip, Path(args.data).read_text().split("\n")):
        row = json.loads(line)
        if isinstance(row["prompt"], list):  # chat rows: TRL 0.13's maybe_apply_chat_template
            prompt = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
            texts = [tok.apply_chat_template(row["prompt"] + row[c], tokenize=False)[len(prompt) :] for c in ("chosen", "rejected")]
        else:
            prompt, texts = row["prompt"], [row["chosen"], row["rejected"]]
        p = enc(prompt)
        if args.max_prompt_length:
            p = p[-args.max_prompt_length :]
        for resp in texts:
            r = enc(resp) + [tok.eos_token_id]
            if args.max_length:
                r = r[: max(0, args.max_length - len(p))]
            seqs.append((p, r))
    order = sorted(range(len(seqs)), key=lambda i: -(len(seqs[i][0]) + len(seqs[i][1])))
    batches, cur, longest = [], [], 0
    for i in order:
        n = len(seqs[i][0]) + len(seqs[i][1])
        if cur and (len(cur) + 1) * max(longest, n) > args.batch_tokens:
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    t_score = time.time()
    tokens = 0
    kept = []
    with torch.inference_mode():
        for b in batches:
            t = max(len(seqs[i][0]) + len(seqs[i][1]) for i in b)
            ids = torch.full((len(b), t), config.pad_token_id or 0, dtype=torch.long)
            mask = torch.zeros((len(b), t), dtype=torch.long)
            for r, i in enumerate(b):
                s = seqs[i][0] + seqs[i][1]
                ids[r, : len(s)] = torch.tensor(s)
                mask[r, : len(s)] = 1
                tokens += len(s)
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
            tok_lp = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            vals, top = torch.topk(logp, args.topk, dim=-1)
            for r, i in enumerate(b):
                p, resp = len(seqs[i][0]), len(seqs[i][1])
                sl = slice(p - 1, p + resp - 1)
                kept.append((tok_lp[r, sl].sum().item(), vals[r, sl].clone(), top[r, sl].clone()))
    t_end = time.time()
    print(json.dumps({"tokens": tokens, "sequences": len(seqs), "score_s": t_end - t_score, "total_s": t_end - t_start}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
