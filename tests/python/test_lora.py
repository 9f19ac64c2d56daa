"""LoRA bundles (`python -m edpo_export --lora`): the joint graph trains the adapter only over
base weights read from params.safetensors; its adapter gradients equal PyTorch + PEFT autograd
in float64; exact-mode training equals the PyTorch reference trainer with the same PEFT adapter;
`final/` loads with `PeftModel.from_pretrained` and `final/merged` with `AutoModelForCausalLM`,
both scoring as edpo does; `--lora-init` makes base + that adapter the reference."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from conftest import BUNDLE, PY_ENV, ROOT, edpo_bin
from edpo_export.common import PARAMS_FILE, REFERENCE_FILE, TOKENIZER_FILES, plain_gradient_feeds, reference_sha256

LORA_BUNDLE = ROOT / "data-samples" / "bundle-lora"
HP = ["--lr", "1e-2", "--beta", "0.1", "--epsilon", "0.05"]
# Exact mode against PyTorch: the loss and β trajectories (relative), the trained adapter
# (relative L2 per tensor; measured 2e-6 to 7e-6 over 8 steps on the sample model).
LOSS_RTOL, BETA_RTOL, ADAPTER_RTOL = 1e-5, 1e-5, 1e-4
# Log-probs of final/ loaded in transformers vs edpo's scoring (sum over a response, nats).
LOGP_ATOL = 1e-4


def manifest(bundle: Path) -> dict:
    return json.loads((bundle / "edpo-model.json").read_text())


def run(*args, **kw):
    return subprocess.run([edpo_bin(), "--quiet", *map(str, args)], check=True, capture_output=True, **kw)


@pytest.fixture(scope="session")
def lora_exported(tmp_path_factory, samples):
    """LoRA exports of the tiny configs with the flags of conftest's `exported` (so their
    base weights and reference graphs are those of the full bundles): {arch: bundle}."""
    import edpo_export

    flags = {"qwen2": ["--lora-targets", "all-linear"], "gpt2": []}
    cache = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            out = tmp_path_factory.mktemp(f"lora-{arch}")
            edpo_export.main([
                "--model", str(samples / "configs" / f"{arch}-tiny"), "--random-init", "0", "--out", str(out),
                "--topk-default", "8", "--lora", "--lora-rank", "4", "--lora-alpha", "8", *flags[arch],
            ])  # fmt: skip
            cache[arch] = out
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_lora_graph_takes_the_adapter_and_reads_the_base_from_params(exported, lora_exported, arch, capsys):
    import onnx

    from edpo_export.verify import verify

    full, lora = exported(arch), lora_exported(arch)
    assert verify(lora) == 0, capsys.readouterr().out
    m, fm = manifest(lora), manifest(full)
    spec, train = m["lora"], m["graphs"]["train"]
    adapters = {p["name"] for p in spec["params"]}
    assert adapters and all(".lora_A." in n or ".lora_B." in n for n in adapters)
    assert set(train["param_inputs"]) == adapters and set(train["grad_outputs"].values()) == adapters
    targets = {mod["module"].rsplit(".", 1)[-1] for mod in spec["modules"]}
    assert targets == ({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} if arch == "qwen2" else {"c_attn"})
    # The same base: params.safetensors and the reference graph byte for byte, so one reference.
    for name in (PARAMS_FILE, REFERENCE_FILE, *TOKENIZER_FILES):
        assert m["files"][name]["sha256"] == fm["files"][name]["sha256"], name
    assert m["reference_sha256"] == reference_sha256(fm["files"], [REFERENCE_FILE, PARAMS_FILE, *TOKENIZER_FILES])
    # Every base weight is an initializer whose data is a range of params.safetensors, each
    # range read once (a tied embedding is one initializer); nothing else of size is stored.
    proto = onnx.load(str(lora / "policy.train.onnx"), load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    where = [{e.key: e.value for e in t.external_data} for t in external]
    assert {w["location"] for w in where} == {PARAMS_FILE}
    assert len({(w["offset"], w["length"]) for w in where}) == len(where) == len(fm["params"])
    assert {t.name for t in external} == set(train["base_weights"])
    inline = sum(len(t.raw_data) for t in proto.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL)
    assert inline < 4096, inline
    inputs = {i.name for i in proto.graph.input}
    acc = train["grad_accumulation"]
    assert inputs == {i["name"] for i in train["inputs"]} | adapters | set(acc["accumulators"].values())


def test_adapter_gradients_match_pytorch_peft_autograd(lora_exported):
    """The joint graph's adapter gradients on the golden batch (adapter with non-zero B) vs
    float64 autograd through PEFT's own LoRA layers (dense logits): within 1e-5 relative."""
    import onnxruntime as ort
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.numpy import load_file

    from edpo_bench.torch_train import load_model
    from edpo_export.common import TRAIN_BATCH_INPUTS
    from edpo_export.objective import EpsDpoLoss

    bundle = lora_exported("qwen2")
    m = manifest(bundle)
    goldens = load_file(bundle / "goldens.safetensors")
    adapter = {k[len("train.in.param."):]: v for k, v in goldens.items() if k.startswith("train.in.param.")}
    assert set(adapter) == set(m["graphs"]["train"]["param_inputs"])
    assert all(np.abs(v).max() > 0 for k, v in adapter.items() if ".lora_B." in k)
    sess = ort.InferenceSession(str(bundle / "policy.train.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i["name"]: goldens[f"train.in.{i['name']}"] for i in m["graphs"]["train"]["inputs"]}
    feeds = {**feeds, **adapter}
    feeds.update(plain_gradient_feeds(m["graphs"]["train"], feeds))
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))

    peft_model = PeftModel.from_pretrained(load_model(bundle), bundle / "adapter", is_trainable=True)
    set_peft_model_state_dict(peft_model, {k: torch.from_numpy(v) for k, v in adapter.items()})
    inner = peft_model.base_model.model.double()
    args = [torch.from_numpy(feeds[n]) if feeds[n].dtype == np.int64 else torch.from_numpy(feeds[n]).double() for n, _, _ in TRAIN_BATCH_INPUTS]
    EpsDpoLoss(inner)(*args)[0].backward()
    checked = 0
    for name, p in inner.named_parameters():
        if not p.requires_grad:
            assert p.grad is None
            continue
        module, which = name.split(".lora_")
        key = f"base_model.model.{module}.lora_{which[0]}.weight"
        want = p.grad.numpy()
        got = outs[f"grad.{key}"].astype(np.float64)
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel <= 1e-5, f"{key}: relative error {rel:.2e}"
        checked += 1
    assert checked == len(adapter) == 2 * 7 * 2  # A and B of 7 linear layers in 2 layers


def exact_runs(tmp: Path, bundle: Path, shards: Path, steps: int, extra=()):
    """edpo train --reference online and the PyTorch reference trainer on its step order."""
    run_dir = tmp / "run"
    run("train", "--model", bundle, "--shards", shards, "--out", run_dir, "--reference", "online", "--batch-size", 16,
        "--micro-batch", 8, "--max-steps", steps, *HP, *extra)  # fmt: skip
    torch_json, torch_params = tmp / "torch.json", tmp / "torch.safetensors"
    subprocess.run([sys.executable, "-m", "edpo_bench.torch_train", "--bundle", str(bundle), "--shards", str(shards),
                    "--order", str(run_dir / "pairs.parquet"), "--steps", str(steps), "--micro-batch", "8", *HP,
                    "--out", str(torch_json), "--save-params", str(torch_params)],
                   check=True, env=PY_ENV, capture_output=True)  # fmt: skip
    return run_dir, json.loads(torch_json.read_text()), torch_params


def assert_same_training(run_dir: Path, ref: dict, torch_params: Path, steps: int) -> dict:
    """Loss and β trajectories, every pair's step k and the trained adapter as in PyTorch."""
    from safetensors.numpy import load_file

    metrics = pl.read_parquet(run_dir / "metrics.parquet").sort("step")
    assert metrics.height == steps
    np.testing.assert_allclose(metrics["loss"].to_numpy(), ref["loss"], rtol=LOSS_RTOL, err_msg="loss")
    np.testing.assert_allclose(metrics["kl/beta"].to_numpy(), ref["beta"], rtol=BETA_RTOL, err_msg="β")
    pairs = pl.read_parquet(run_dir / "pairs.parquet").join(pl.DataFrame(ref["pairs"]), on=["step", "pair_id"], suffix="_torch")
    assert pairs.height == 16 * steps
    differ = int((pairs["k"] != pairs["k_torch"]).sum())
    assert differ == 0, f"{differ} pairs took another step"
    assert {-1, 1} <= set(pairs["k"].to_list()), "both non-zero steps occur"
    ours, theirs = load_file(run_dir / "final/adapter_model.safetensors"), load_file(torch_params)
    assert set(ours) == set(theirs)
    rel = {k: float(np.linalg.norm(ours[k] - v) / np.linalg.norm(v)) for k, v in theirs.items()}
    assert max(rel.values()) <= ADAPTER_RTOL, rel
    return {"max_adapter_rel": max(rel.values()), "k_nonzero": int((pairs["k"] != 0).sum())}


@pytest.fixture(scope="module")
def sample_shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora-shards")
    run("prep", "--model", BUNDLE, "--data", ROOT / "data-samples/prefs/train.chat.jsonl", "--out", d, "--limit", 160)
    return d


def test_exact_mode_matches_pytorch_peft_and_final_loads_in_peft_and_transformers(sample_shards, tmp_path):
    """Shards of the full sample bundle train its LoRA twin; 8 exact-mode steps equal the
    PyTorch reference trainer with the same PEFT adapter; final/ and final/merged load in
    PEFT / transformers with edpo's log-probs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edpo_bench.torch_train import load_model

    run_dir, ref, torch_params = exact_runs(tmp_path, LORA_BUNDLE, sample_shards, 8, ["--merge"])
    assert_same_training(run_dir, ref, torch_params, 8)
    per_pair = tmp_path / "scores.parquet"
    run("eval", "--model", LORA_BUNDLE, "--shards", sample_shards, "--params", run_dir / "final", "--per-pair", per_pair)
    want = {r["pair_id"]: r for r in pl.read_parquet(per_pair).iter_rows(named=True)}
    peft_model = PeftModel.from_pretrained(load_model(LORA_BUNDLE), run_dir / "final").eval()
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "final" / "merged", dtype=torch.float32).eval()
    rows = pl.read_parquet(sorted(sample_shards.glob("part-*.parquet"))).head(24)
    moved = 0.0
    for row in rows.iter_rows(named=True):
        for side in ("chosen", "rejected"):
            ids = torch.tensor([row["prompt_ids"] + row[f"{side}_ids"]])
            p = len(row["prompt_ids"])
            for model in (peft_model, merged):
                with torch.no_grad():
                    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
                total = float(logp[torch.arange(p - 1, ids.shape[1] - 1), ids[0, p:]].sum())
                assert abs(total - want[row["pair_id"]][f"logps_{side}"]) < LOGP_ATOL
            moved = max(moved, abs(want[row["pair_id"]][f"logps_{side}"] - want[row["pair_id"]][f"ref_logps_{side}"]))
    assert moved > 1e-2, "training moved the policy away from the reference"


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory, samples):
    """An 'SFT' adapter made by PEFT on the sample base: random non-zero lora_B, targets other
    than the defaults, lora_dropout 0.05 (not applied: edpo's graphs have no dropout)."""
    from peft import LoraConfig, get_peft_model

    from edpo_export.graphs import load_model

    base = load_model(samples / "configs" / "llama-tiny", 0)  # the sample bundle's weights
    torch.manual_seed(5)
    config = LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "k_proj", "up_proj"], lora_dropout=0.05)
    peft_model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    out = tmp_path_factory.mktemp("sft-adapter")
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def init_bundle(tmp_path_factory, samples, sft_adapter):
    import edpo_export

    out = tmp_path_factory.mktemp("lora-init")
    edpo_export.main([
        "--model", str(samples / "configs" / "llama-tiny"), "--random-init", "0", "--topk-default", "16",
        "--lora-init", str(sft_adapter), "--out", str(out),
    ])  # fmt: skip
    return out


def test_lora_init_makes_base_plus_adapter_the_reference(init_bundle, sft_adapter, sample_shards, tmp_path, capsys):
    from peft import PeftModel

    from edpo_bench.torch_train import load_model
    from edpo_export.verify import verify

    assert verify(init_bundle) == 0, capsys.readouterr().out
    m, full = manifest(init_bundle), manifest(BUNDLE)
    assert m["lora"]["reference_includes_adapter"] and m["lora"]["rank"] == 2
    assert m["files"][PARAMS_FILE]["sha256"] == full["files"][PARAMS_FILE]["sha256"]
    # Shards of the base model do not fit this reference.
    failed = subprocess.run([edpo_bin(), "--quiet", "train", "--model", str(init_bundle), "--shards", str(sample_shards),
                             "--out", str(tmp_path / "refused"), "--max-steps", "1"], capture_output=True, text=True)  # fmt: skip
    assert failed.returncode == 2 and "another reference" in failed.stderr, failed.stderr
    # Prep scores with the adapter merged: the log-probs of PEFT's base + adapter.
    shards = tmp_path / "shards"
    run("prep", "--model", init_bundle, "--data", ROOT / "data-samples/prefs/train.chat.jsonl", "--out", shards, "--limit", 160)
    ours = pl.read_parquet(sorted(shards.glob("part-*.parquet")))
    base_scores = pl.read_parquet(sorted(sample_shards.glob("part-*.parquet")))
    reference = PeftModel.from_pretrained(load_model(BUNDLE), sft_adapter).eval()
    for row in ours.head(12).iter_rows(named=True):
        ids = torch.tensor([row["prompt_ids"] + row["chosen_ids"]])
        p = len(row["prompt_ids"])
        with torch.no_grad():
            logp = torch.log_softmax(reference(input_ids=ids).logits[0, :-1].float(), -1)
        assert abs(float(logp[torch.arange(p - 1, ids.shape[1] - 1), ids[0, p:]].sum()) - row["ref_chosen_logps"]) < LOGP_ATOL
    gap = (ours["ref_chosen_logps"] - base_scores["ref_chosen_logps"]).abs().max()
    assert gap > 0.1, f"the reference is not the raw base (max |Δ| {gap})"
    # Training from the adapter: exact mode equals PyTorch with the same PEFT adapter.
    run_dir, ref, torch_params = exact_runs(tmp_path, init_bundle, shards, 6)
    assert_same_training(run_dir, ref, torch_params, 6)
