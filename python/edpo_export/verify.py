"""Checking a bundle: file hashes against the manifest, then both graphs run in ONNX Runtime
against the goldens PyTorch computed at export time, within the manifest's tolerances."""

from __future__ import annotations

import json
from pathlib import Path

from .common import MANIFEST, fail, sha256_file

def verify(bundle: Path) -> int:
    import numpy as np
    import onnxruntime as ort
    from safetensors.numpy import load_file

    manifest_path = bundle / MANIFEST
    if not manifest_path.is_file():
        fail(f"`{manifest_path}` not found: not an edpo bundle")
    manifest = json.loads(manifest_path.read_text())
    for name, meta in manifest["files"].items():
        digest = sha256_file(bundle / name)
        if digest != meta["sha256"]:
            fail(f"`{bundle / name}` has sha256 {digest}, the manifest says {meta['sha256']}: re-export the bundle")
    goldens = load_file(bundle / manifest["goldens"]["file"])
    tol = manifest["goldens"]["tolerances"]
    params = load_file(bundle / manifest["params_file"])
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    failures = []

    def check(label, ok, detail):
        print(f"  {'ok  ' if ok else 'FAIL'} {label:<48} {detail}")
        if not ok:
            failures.append(label)

    print(f"verify {bundle}")
    ref = ort.InferenceSession(str(bundle / manifest["graphs"]["reference"]["file"]), opts, providers=["CPUExecutionProvider"])
    feeds = {i["name"]: goldens[f"reference.in.{i['name']}"] for i in manifest["graphs"]["reference"]["inputs"]}
    outs = dict(zip([o.name for o in ref.get_outputs()], ref.run(None, feeds)))
    tl_err = float(np.abs(outs["token_logps"] - goldens["reference.out.token_logps"]).max())
    check("reference token_logps (abs)", tl_err <= tol["logps_abs"], f"max |Δ| = {tl_err:.2e}")
    tv_err = float(np.abs(outs["topk_logps"] - goldens["reference.out.topk_logps"]).max())
    check("reference topk_logps (abs)", tv_err <= tol["logps_abs"], f"max |Δ| = {tv_err:.2e}")
    ids_same = outs["topk_ids"] == goldens["reference.out.topk_ids"]
    # Ids may legitimately swap where two values tie within float noise.
    vals = goldens["reference.out.topk_logps"]
    tie = np.zeros_like(ids_same)
    tie[..., 1:] |= np.abs(np.diff(vals, axis=-1)) < 1e-5
    tie[..., :-1] |= np.abs(np.diff(vals, axis=-1)) < 1e-5
    check("reference topk_ids (untied values)", bool((ids_same | tie).all()), f"{int((~ids_same).sum())} differ, all at ties")

    train_meta = manifest["graphs"]["train"]
    train = ort.InferenceSession(str(bundle / train_meta["file"]), opts, providers=["CPUExecutionProvider"])
    feeds = {i["name"]: goldens[f"train.in.{i['name']}"] for i in train_meta["inputs"]}
    for graph_name, stored in train_meta["param_inputs"].items():
        feeds[graph_name] = params[stored]
    outs = dict(zip([o.name for o in train.get_outputs()], train.run(None, feeds)))
    loss_err = abs(float(outs["loss"]) - float(goldens["train.out.loss"]))
    check("train loss (abs)", loss_err <= tol["loss_abs"], f"|Δ| = {loss_err:.2e}")
    for name in ("logps", "logps_plus", "logps_minus"):
        err = float(np.abs(outs[name] - goldens[f"train.out.{name}"]).max())
        check(f"train {name} (abs)", err <= tol["logps_abs"], f"max |Δ| = {err:.2e}")
    same = bool((outs["steps"] == goldens["train.out.steps"]).all())
    check("train steps (identical)", same, f"{outs['steps'].tolist()} vs {goldens['train.out.steps'].tolist()}")
    grads: dict[str, np.ndarray] = {}
    for out_name, stored in train_meta["grad_outputs"].items():
        stored = train_meta["param_inputs"][stored]
        grads[stored] = grads.get(stored, 0) + outs[out_name]
    worst = (0.0, "")
    for stored, grad in grads.items():
        want = goldens[f"train.out.grad.{stored}"]
        rel = float(np.linalg.norm(grad - want) / max(np.linalg.norm(want), 1e-30))
        worst = max(worst, (rel, stored))
        if rel > tol["grad_rel"]:
            check(f"grad {stored} (rel)", False, f"{rel:.2e}")
    check(f"gradients, {len(grads)} tensors (rel, worst)", worst[0] <= tol["grad_rel"], f"{worst[0]:.2e} ({worst[1]})")
    nonzero = int((goldens["train.out.steps"] != 0).sum())
    print(f"  golden batch: {len(goldens['train.out.steps'])} pairs, {nonzero} with a non-zero ε-step")
    if failures:
        print(f"verify FAILED: {len(failures)} check(s)")
        return 1
    print("verify passed")
    return 0
