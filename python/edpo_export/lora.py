"""LoRA bundles (`python -m edpo_export --lora`): PEFT adapters on the exported model, the
manifest's `lora` section and the bundle's initial adapter folder.

The joint graph of a LoRA bundle takes the adapter matrices as its only parameter inputs and
returns only their gradients; the frozen base weights are initializers whose data are
references into params.safetensors, the file the reference graph reads too (graphs.py). The
reference graph is the base model's, byte for byte the graph of a full bundle of the same
model, so shards prepared with either bundle are interchangeable (`reference_sha256`, below).

`--lora-init ADAPTER_DIR` starts from an existing PEFT adapter (e.g. an SFT adapter): the
adapter's rank, alpha and targets are used, its matrices are the starting point, and the
reference is base + that adapter — edpo merges it (W + scaling · B·A) into the reference
graph's weights when it scores, so the reference does not silently become the raw base.

Names: adapters are stored under PEFT's saved key names
(`base_model.model.<module>.lora_A.weight`, `…lora_B.weight`), in the bundle's `adapter/`
folder (adapter_config.json + adapter_model.safetensors, what `PeftModel.from_pretrained`
reads) and in every checkpoint; the joint graph's adapter inputs carry the same names.
"""

from __future__ import annotations

import json
from pathlib import Path

from .common import ADAPTER_DIR, fail, log

# Keys of a PEFT LoraConfig that edpo cannot honour in its graphs; a --lora-init adapter
# that sets any of them (to a non-default value) is refused.
UNSUPPORTED = {
    "use_dora": False,
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "lora_bias": False,
    "use_qalora": False,
    "use_bdlora": False,
    "alora_invocation_tokens": None,
}
# Standard deviation of the seeded noise added to every lora_B of the goldens' adapter (a
# fresh adapter has B = 0, which would leave every lora_A without a gradient).
GOLDEN_B_NOISE = 0.02


def default_targets(model) -> list[str]:
    """PEFT's default LoRA targets for the model's architecture."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = model.config.model_type
    if model_type not in DEFAULTS:
        fail(f"PEFT has no default LoRA targets for model type `{model_type}`; pass `--lora-targets q_proj,v_proj` (module names) or `all-linear`")
    return list(DEFAULTS[model_type])


def saved_key(module: str, which: str) -> str:
    """PEFT's saved key of an adapter matrix (`which` is lora_A or lora_B) of `module`."""
    return f"base_model.model.{module}.{which}.weight"


def check_init_config(config_path: Path) -> dict:
    """The adapter_config.json of a --lora-init adapter, refused when edpo cannot train it."""
    if not config_path.is_file():
        fail(f"`--lora-init`: `{config_path}` not found; pass a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    cfg = json.loads(config_path.read_text())
    if cfg.get("peft_type") != "LORA":
        fail(f"`--lora-init`: `{config_path}` is a {cfg.get('peft_type')} adapter; edpo trains LoRA adapters only")
    for key, default in UNSUPPORTED.items():
        if cfg.get(key, default) not in (default, None, {}, False):
            fail(f"`--lora-init`: `{config_path}` sets `{key}` = {cfg[key]!r}, which edpo's LoRA graphs do not support; use a plain LoRA adapter")
    if cfg.get("bias", "none") != "none":
        fail(f"`--lora-init`: `{config_path}` trains biases (`bias` = {cfg['bias']!r}); edpo trains the LoRA matrices only (bias \"none\")")
    if cfg.get("lora_dropout", 0.0):
        log(f"--lora-init: the adapter's lora_dropout {cfg['lora_dropout']} is not applied (edpo's graphs have no dropout; TRL's DPOTrainer disables dropout by default too)")
    return cfg


def attach(model, args):
    """The model with a LoRA adapter injected (a PeftModel): a fresh one from the flags, or the
    --lora-init adapter (trainable). Base weights are frozen by PEFT."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    if args.lora_init:
        init = Path(args.lora_init)
        cfg = check_init_config(init / "adapter_config.json")
        given = {"--lora-rank": (args.lora_rank, cfg.get("r")), "--lora-alpha": (args.lora_alpha, cfg.get("lora_alpha"))}
        for flag, (value, theirs) in given.items():
            if value is not None and value != theirs:
                fail(f"`{flag} {value}` differs from the --lora-init adapter's {theirs}; leave it out (the adapter's config is used)")
        if args.lora_targets:
            fail("`--lora-targets` cannot be combined with `--lora-init` (the adapter's own targets are used)")
        peft_model = PeftModel.from_pretrained(model, init, is_trainable=True)
    else:
        targets = args.lora_targets
        if targets is None:
            targets = default_targets(model)
        elif targets != ["all-linear"] and any(t == "all-linear" for t in targets):
            fail("`--lora-targets all-linear` cannot be combined with module names")
        rank = args.lora_rank or 8
        alpha = args.lora_alpha if args.lora_alpha is not None else rank
        alpha = int(alpha) if float(alpha).is_integer() else alpha  # as PEFT writes it
        config = LoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
            target_modules="all-linear" if targets == ["all-linear"] else targets,
        )  # fmt: skip
        torch.manual_seed(args.lora_seed)  # PEFT draws lora_A (Kaiming uniform); lora_B = 0
        peft_model = get_peft_model(model, config)
    peft_model.eval()
    check_modules(peft_model)
    return peft_model


def adapter_modules(peft_model) -> list[dict]:
    """Every LoRA-wrapped module of the inner model: its path (Hugging Face names), the base
    weight it adapts, its two matrices' saved keys and shapes, fan_in_fan_out and scaling."""
    from peft.tuners.lora import LoraLayer

    inner = peft_model.base_model.model
    out = []
    for path, module in inner.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        (name,) = module.active_adapters
        a, b = module.lora_A[name].weight, module.lora_B[name].weight
        out.append({
            "module": path,
            "weight": f"{path}.weight",
            "lora_A": saved_key(path, "lora_A"),
            "lora_B": saved_key(path, "lora_B"),
            "rank": int(a.shape[0]),
            "fan_in_fan_out": bool(getattr(module, "fan_in_fan_out", False)),
            "scaling": float(module.scaling[name]),
            "shape_A": list(a.shape),
            "shape_B": list(b.shape),
        })  # fmt: skip
    return out


def check_modules(peft_model) -> None:
    """LoRA on the output projection is refused: the training graph computes it in slices of
    the base weight (objective.py), and a tied one is the input embedding too."""
    mods = adapter_modules(peft_model)
    if not mods:
        fail("the LoRA configuration matched no module of the model; check `--lora-targets` (PEFT module names such as q_proj,v_proj)")
    head = peft_model.base_model.model.get_output_embeddings()
    from peft.tuners.lora import LoraLayer

    if isinstance(head, LoraLayer):
        fail("LoRA on the output projection (lm_head) is not supported; leave it out of `--lora-targets`")


def graph_names(peft_model) -> dict[str, str]:
    """{parameter name in the inner model (after the exporter strips `model.`): graph name}:
    base weights get their Hugging Face names (`….base_layer.weight` → `….weight`), adapter
    matrices PEFT's saved keys."""
    inner = peft_model.base_model.model
    names = {}
    for name, _ in inner.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            module, which = name.split(".lora_A." if ".lora_A." in name else ".lora_B.")[0], ("lora_A" if ".lora_A." in name else "lora_B")
            names[name] = saved_key(module, which)
        else:
            names[name] = name.replace(".base_layer.", ".")
    return names


def adapter_state(peft_model) -> dict:
    """{saved key: tensor} of the adapter (what adapter_model.safetensors holds)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}


def save_adapter(peft_model, out: Path, base_model_dir: Path) -> list[str]:
    """Writes the initial adapter as a PEFT folder `out/adapter/`; returns the file names
    (relative to the bundle) for the manifest's hash list."""
    from safetensors.torch import save_file

    folder = out / ADAPTER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    config = peft_model.peft_config["default"]
    config.base_model_name_or_path = str(base_model_dir)
    config.inference_mode = True
    config.save_pretrained(folder)
    save_file(adapter_state(peft_model), folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return [f"{ADAPTER_DIR}/adapter_config.json", f"{ADAPTER_DIR}/adapter_model.safetensors"]


def golden_adapter(names: dict[str, str], seed: int = 11):
    """A function that adds seeded N(0, GOLDEN_B_NOISE²) noise to every lora_B of a model (so
    that every adapter matrix has a gradient in the goldens) and returns the adapter's values
    by stored name (`names`: parameter name → saved key)."""
    import torch

    def set_values(inner) -> dict:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in inner.named_parameters():
                if ".lora_B." in name:
                    p.add_(torch.randn(p.shape, generator=gen) * GOLDEN_B_NOISE)
        return {names[n]: p.detach().clone() for n, p in inner.named_parameters() if p.requires_grad}

    return set_values


def manifest_section(peft_model, args, reference_includes_adapter: bool) -> dict:
    """The manifest's `lora` section."""
    config = peft_model.peft_config["default"]
    mods = adapter_modules(peft_model)
    targets = config.target_modules
    targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else [targets]
    params = []
    for m in mods:
        params.append({"name": m["lora_A"], "shape": m["shape_A"], "dtype": "float32"})
        params.append({"name": m["lora_B"], "shape": m["shape_B"], "dtype": "float32"})
    return {
        "rank": int(config.r),
        "alpha": float(config.lora_alpha),
        "use_rslora": bool(config.use_rslora),
        "dropout": 0.0,
        "target_modules": targets,
        "adapter_dir": ADAPTER_DIR,
        "init_from": str(args.lora_init) if args.lora_init else None,
        "reference_includes_adapter": reference_includes_adapter,
        "num_parameters": sum(int(a) * int(b) for p in params for a, b in [p["shape"]]),
        "params": params,
        "modules": [{k: m[k] for k in ("module", "weight", "lora_A", "lora_B", "fan_in_fan_out", "scaling")} for m in mods],
    }


def lora_b_nonzero(peft_model) -> bool:
    """Whether any lora_B is non-zero (then base + adapter differs from the base)."""
    return any(bool(v.abs().max() > 0) for k, v in adapter_state(peft_model).items() if ".lora_B." in k)


def merge_numpy(weight, a, b, module: dict):
    """W + scaling · B·A in float64, rounded to float32 once (as edpo's Rust merge)."""
    import numpy as np

    delta = b.astype(np.float64) @ a.astype(np.float64) * module["scaling"]
    if module["fan_in_fan_out"]:
        delta = delta.T
    return (weight.astype(np.float64) + delta).astype(np.float32)


def merged_weights(bundle: Path, manifest: dict, adapters: dict | None = None) -> dict:
    """{stored name: merged weight} of the adapted modules of a LoRA bundle: `adapters` (by
    saved key; default: the bundle's initial adapter) merged into params.safetensors."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    spec = manifest["lora"]
    if adapters is None:
        adapters = load_file(bundle / spec["adapter_dir"] / "adapter_model.safetensors")
    out = {}
    with safe_open(bundle / manifest["params_file"], "np") as f:
        for m in spec["modules"]:
            out[m["weight"]] = merge_numpy(f.get_tensor(m["weight"]), adapters[m["lora_A"]], adapters[m["lora_B"]], m)
    return out
