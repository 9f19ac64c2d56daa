"""Checking a bundle: file hashes against the manifest, then both graphs run in ONNX Runtime
on the golden batch and compared with PyTorch float64, within each output's noise band.

The band of an output is the error PyTorch float32 itself makes on the same batch, times the
manifest's `factor`, plus `floor` × max(1, largest |float64 value|) (goldens.py has the file
layout; the Rust twin is src/goldens/). Top-K ids may differ from float64's where the values
are within the band of each other; the per-pair steps must be identical where float64's
decision margin exceeds what the log-prob bands allow; gradients are judged by their relative
error, estimated from seeded ±1 projections (or exact for the few stored in full).
"""

from __future__ import annotations

import json
from pathlib import Path

from .common import GOLDENS_FORMAT, MANIFEST, PACKED_INPUTS, fail, packed_feeds, plain_gradient_feeds, sha256_file, takes_packed
from .goldens import project

PACKED_NAMES = {name for name, _, _ in PACKED_INPUTS}
REEXPORT = "re-export the bundle with `python -m edpo_export --model HF_DIR --out BUNDLE`"


class Bands:
    """The noise band of each output, from the manifest's `goldens` section and the goldens."""

    def __init__(self, spec: dict, goldens: dict):
        self.factor = float(spec["factor"])
        self.floor = float(spec["floor"])
        self.torch = spec["torch_fp32_error"]
        self.torch_grad = spec["torch_fp32_grad_error"]
        self.goldens = goldens

    def abs(self, output: str, golden: str) -> float:
        import numpy as np

        scale = max(1.0, float(np.abs(self.goldens[golden]).max()))
        return self.factor * self.torch[output] + self.floor * scale

    def grad(self, name: str) -> float:
        return self.factor * self.torch_grad[name] + self.floor


class Checks:
    """Printed check lines and the labels of the failed ones."""

    def __init__(self):
        self.failures: list[str] = []

    def __call__(self, label: str, ok: bool, detail: str) -> None:
        print(f"  {'ok  ' if ok else 'FAIL'} {label:<40} {detail}")
        if not ok:
            self.failures.append(label)

    def within(self, label: str, err: float, band: float, torch_err: float) -> None:
        self(label, err <= band, f"ORT {err:.2e} {'≤' if err <= band else '>'} band {band:.2e} (torch fp32 {torch_err:.2e})")


def open_bundle(bundle: Path) -> dict:
    """The manifest, after every file's hash was checked and the goldens format is known."""
    manifest_path = bundle / MANIFEST
    if not manifest_path.is_file():
        fail(f"`{manifest_path}` not found: not an edpo bundle")
    manifest = json.loads(manifest_path.read_text())
    for name, meta in manifest["files"].items():
        digest = sha256_file(bundle / name)
        if digest != meta["sha256"]:
            fail(f"`{bundle / name}` has sha256 {digest}, the manifest says {meta['sha256']}: {REEXPORT}")
    spec = manifest.get("goldens")
    if spec is None:
        fail(f"`{manifest_path}` lists no goldens: {REEXPORT}")
    if spec.get("format", 1) != GOLDENS_FORMAT:
        fail(
            f"`{bundle / spec['file']}` holds goldens format {spec.get('format', 1)} (fp32 outputs, fixed "
            f"tolerances); verify reads format {GOLDENS_FORMAT} (float64 outputs, noise bands): {REEXPORT}"
        )
    return manifest


def topk_ids_outside_band(got, ids64, vals64, band: float):
    """(ids differing from float64's, how many of them are not near-ties): an id at rank j is
    fine when its float64 log-prob (looked up among the K + E stored ranks) is within `band`
    of float64's value at rank j; an id beyond the stored ranks is not."""
    import numpy as np

    k = got.shape[-1]
    match = got[..., :, None] == ids64[..., None, :]
    found = match.any(-1)
    rank = match.argmax(-1)
    value = np.take_along_axis(vals64, rank, axis=-1)
    near = found & (np.abs(value - vals64[..., :k]) <= band)
    differ = got != ids64[..., :k]
    return int(differ.sum()), int((differ & ~near).sum())


def check_reference(bundle: Path, manifest: dict, goldens: dict, bands: Bands, check: Checks, opts) -> None:
    import numpy as np
    import onnxruntime as ort

    spec = manifest["graphs"]["reference"]
    overrides = reference_overrides(bundle, manifest)
    if overrides:  # options of this session only; the arrays stay alive until it has run
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        names = [g for g, stored in spec["weights"].items() if stored in overrides]
        values = [ort.OrtValue.ortvalue_from_numpy(overrides[spec["weights"][g]]) for g in names]
        opts.add_external_initializers(names, values)
    sess = ort.InferenceSession(str(bundle / spec["file"]), opts, providers=["CPUExecutionProvider"])
    feeds = {i["name"]: goldens[f"reference.in.{i['name']}"] for i in spec["inputs"] if i["name"] not in PACKED_NAMES}
    if takes_packed(spec):  # packed rows: the real tokens' labels only (padding has no packed slot)
        import torch

        from .objective import loss_positions

        feeds["label_positions"] = loss_positions(torch.from_numpy(feeds["attention_mask"])).numpy()
        feeds.update(packed_feeds(spec, feeds))
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    k = outs["topk_ids"].shape[-1]
    # At real tokens only: the values at padding are not defined (the scoring attention may be
    # causal without the padding mask, which gives real tokens of right-padded rows the same values).
    real = goldens["reference.in.attention_mask"] == 1
    vals64, ids64 = goldens["reference.f64.topk_logps"][real], goldens["reference.f64.topk_ids"][real]
    for name, want in (("token_logps", goldens["reference.f64.token_logps"][real]), ("topk_logps", vals64[..., :k])):
        err = float(np.abs(outs[name][real].astype(np.float64) - want).max())
        band = bands.abs(f"reference.{name}", f"reference.f64.{name}")
        check.within(f"reference {name} (max abs)", err, band, bands.torch[f"reference.{name}"])
    band = bands.abs("reference.topk_logps", "reference.f64.topk_logps")
    differ, bad = topk_ids_outside_band(outs["topk_ids"][real], ids64, vals64, band)
    check(
        "reference topk_ids (near-ties allowed)",
        bad == 0,
        f"{differ} differ from float64, {bad} of them outside the band {band:.2e}",
    )


def reference_overrides(bundle: Path, manifest: dict) -> dict:
    """The reference's weights that differ from params.safetensors: a LoRA bundle's --lora-init
    adapter merged into its modules (as edpo merges it when it scores); empty otherwise."""
    spec = manifest.get("lora")
    if not spec or not spec["reference_includes_adapter"]:
        return {}
    from .lora import merged_weights

    return merged_weights(bundle, manifest)


def trained_params(bundle: Path, manifest: dict, goldens: dict) -> dict:
    """The values the joint graph is run with on the goldens: `train.in.param.<name>` where the
    goldens have them (a LoRA bundle's adapter), else the bundle's (initial adapter or θ₀)."""
    from safetensors.numpy import load_file

    spec = manifest.get("lora")
    path = bundle / spec["adapter_dir"] / "adapter_model.safetensors" if spec else bundle / manifest["params_file"]
    params = load_file(path)
    return {name: goldens.get(f"train.in.param.{name}", value) for name, value in params.items()}


def check_steps(got, goldens: dict, bands: Bands, check: Checks) -> None:
    """Steps must equal float64's on every pair whose decision margin exceeds what the log-prob
    bands allow: g₊ − g and g − g₋ each combine four log-probs."""
    band_logps = bands.abs("train.logps", "train.f64.logps")
    band_mix = max(bands.abs(f"train.{n}", f"train.f64.{n}") for n in ("logps_plus", "logps_minus"))
    band = 2.0 * (band_logps + band_mix)
    want = goldens["train.f64.steps"]
    decided = goldens["train.f64.step_margin"] > band
    ok = bool((got[decided] == want[decided]).all())
    check(
        "train steps (decided pairs identical)",
        ok,
        f"{got.tolist()} vs float64 {want.tolist()}; {int(decided.sum())} of {len(want)} pairs have a margin > {band:.2e}",
    )


def grad_error(name: str, grad, goldens: dict) -> float:
    """Relative error of a gradient against float64: exact for the tensors stored in full,
    else estimated from the projections (E[(e·r)²] = ‖e‖²)."""
    import numpy as np

    norm = max(float(goldens[f"train.grad.norm.{name}"]), 1e-300)
    full = goldens.get(f"train.grad.full.{name}")
    if full is not None:
        return float(np.linalg.norm(grad.astype(np.float64) - full)) / norm
    want = goldens[f"train.grad.proj.{name}"]
    got = project(name, grad.reshape(-1), len(want))
    return float(np.sqrt(np.mean((got - want) ** 2))) / norm


def check_gradients(grads: dict, goldens: dict, bands: Bands, check: Checks) -> None:
    rows = []
    for name, grad in grads.items():
        err, band = grad_error(name, grad, goldens), bands.grad(name)
        rows.append((err / band, name, err, band))
        if err > band:
            check.within(f"grad {name} (rel)", err, band, bands.torch_grad[name])
    ratio, name, err, band = max(rows)
    check(
        f"gradients, {len(rows)} tensors (rel)",
        ratio <= 1.0,
        f"closest to its band: {name}: ORT {err:.2e} vs band {band:.2e} (torch fp32 {bands.torch_grad[name]:.2e})",
    )


def check_train(bundle: Path, manifest: dict, goldens: dict, bands: Bands, check: Checks, opts) -> None:
    import numpy as np
    import onnxruntime as ort
    spec = manifest["graphs"]["train"]
    params = trained_params(bundle, manifest, goldens)
    sess = ort.InferenceSession(str(bundle / spec["file"]), opts, providers=["CPUExecutionProvider"])
    feeds = {i["name"]: goldens[f"train.in.{i['name']}"] for i in spec["inputs"]}
    for graph_name, stored in spec["param_inputs"].items():
        feeds[graph_name] = params[stored]
    feeds.update(plain_gradient_feeds(spec, feeds))
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    for name in ("loss", "logps", "logps_plus", "logps_minus"):
        err = float(np.abs(outs[name].astype(np.float64) - goldens[f"train.f64.{name}"]).max())
        check.within(f"train {name} (max abs)", err, bands.abs(f"train.{name}", f"train.f64.{name}"), bands.torch[f"train.{name}"])
    check_steps(outs["steps"], goldens, bands, check)
    grads: dict = {}
    for out_name, graph_name in spec["grad_outputs"].items():
        stored = spec["param_inputs"][graph_name]
        grads[stored] = grads.get(stored, 0) + outs[out_name]
    check_gradients(grads, goldens, bands, check)


def verify(bundle: Path) -> int:
    import onnxruntime as ort
    from safetensors.numpy import load_file

    manifest = open_bundle(bundle)
    spec = manifest["goldens"]
    goldens = load_file(bundle / spec["file"])
    bands = Bands(spec, goldens)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    check = Checks()
    print(f"verify {bundle}: ONNX Runtime vs PyTorch float64; band = {bands.factor:g} × torch fp32 error + {bands.floor:.2e} × max(1, |value|)")
    check_reference(bundle, manifest, goldens, bands, check, opts)
    check_train(bundle, manifest, goldens, bands, check, opts)
    steps = goldens["train.f64.steps"]
    print(f"  golden batch: {len(steps)} pairs, {int((steps != 0).sum())} with a non-zero ε-step")
    if check.failures:
        print(f"verify FAILED: {len(check.failures)} check(s)")
        return 1
    print("verify passed")
    return 0
