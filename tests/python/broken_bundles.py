"""Deliberately broken copies of a bundle, for the tests that `verify` catches them: one
weight scaled in params.safetensors, a wrong rotary base in the reference graph, two gradient
outputs of the joint graph swapped, and goldens of the old format. Each break updates the
file's hash in the manifest, so that only the numerical check (not the hash check) can see it."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np

from conftest import edpo_bin

MANIFEST = "edpo-model.json"
# The weight scaled by 1 + 1e-3 (the final norm's gain: nothing after it cancels the scale) and
# two gradient outputs of equal shape swapped, in the broken-bundle tests.
SCALED = "model.norm.weight"
SWAPPED = ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight")


def rust_verify(bundle):
    """(exit code, {check label: check}, stderr) of `edpo verify --json`."""
    out = subprocess.run([edpo_bin(), "verify", "--json", "--model", str(bundle)], capture_output=True, text=True)
    checks = {c["check"]: c for c in json.loads(out.stdout)["checks"]} if out.returncode in (0, 1) else {}
    return out.returncode, checks, out.stderr


def failed(checks: dict) -> set[str]:
    return {label for label, c in checks.items() if not c["ok"]}


def copy_bundle(src: Path, dst: Path, only: tuple[str, ...] | None = None) -> Path:
    """A copy of the bundle `src` at `dst`; with `only`, just those files (and the manifest)
    are copied and the others are symbolic links (a real model's weights are 0.5 GB)."""
    if only is None:
        shutil.copytree(src, dst)
        return dst
    dst.mkdir(parents=True)
    for path in src.iterdir():
        if path.name in only or path.name == MANIFEST:
            shutil.copy(path, dst / path.name)
        else:
            (dst / path.name).symlink_to(path.resolve())
    return dst


def manifest(bundle: Path) -> dict:
    return json.loads((bundle / MANIFEST).read_text())


def write_manifest(bundle: Path, value: dict) -> None:
    (bundle / MANIFEST).write_text(json.dumps(value, indent=2) + "\n")


def rehash(bundle: Path, name: str) -> None:
    """Record the current sha256 and size of the bundle file `name` in the manifest, and the
    reference identity that covers it (as the exporter computes both)."""
    from edpo_export.common import ADAPTER_DIR, PARAMS_FILE, REFERENCE_FILE, TOKENIZER_FILES, reference_sha256

    m = manifest(bundle)
    data = (bundle / name).read_bytes()
    m["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    if "reference_sha256" in m:
        with_adapter = (m.get("lora") or {}).get("reference_includes_adapter")
        adapter = [f for f in m["files"] if with_adapter and f.startswith(ADAPTER_DIR + "/")]
        m["reference_sha256"] = reference_sha256(m["files"], [REFERENCE_FILE, PARAMS_FILE, *TOKENIZER_FILES, *adapter])
    write_manifest(bundle, m)


def scale_weight(bundle: Path, tensor: str, factor: float) -> None:
    """Multiply one float32 tensor of params.safetensors by `factor` in place (same offsets,
    so the reference graph's external weights still point at the right bytes)."""
    path = bundle / "params.safetensors"
    data = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + header_len])[tensor]
    begin, end = (8 + header_len + o for o in meta["data_offsets"])
    values = np.frombuffer(bytes(data[begin:end]), dtype="<f4") * np.float32(factor)
    data[begin:end] = values.astype("<f4").tobytes()
    path.write_bytes(bytes(data))
    rehash(bundle, "params.safetensors")


def set_rotary_base(bundle: Path, base: float) -> tuple[float, float]:
    """Rewrite the rotary `inv_freq` constant of the reference graph for another base θ
    (inv_freq_i = θ^(−2i/d)); returns (old θ, new θ)."""
    import onnx
    from onnx import numpy_helper

    path = bundle / "reference.onnx"
    model = onnx.load(path, load_external_data=False)
    (init,) = [t for t in model.graph.initializer if t.name.endswith("inv_freq")]
    old = numpy_helper.to_array(init)
    dim = 2 * old.size
    old_base = float(old[1] ** (-dim / 2.0))  # inv_freq_1 = θ^(−2/d)
    new = (1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)).astype(np.float32)
    init.CopyFrom(numpy_helper.from_array(new, init.name))
    onnx.save(model, path)
    rehash(bundle, "reference.onnx")
    return old_base, base


def swap_gradient_outputs(bundle: Path, first: str, second: str) -> None:
    """Swap the values of two gradient outputs of the joint graph (same shape): the graph
    still runs and the contract still matches, but `grad.<first>` carries second's gradient."""
    import onnx

    path = bundle / "policy.train.onnx"
    model = onnx.load(path)
    a, b = f"grad.{first}", f"grad.{second}"
    tmp = "edpo_swap_tmp"
    for node in model.graph.node:
        for field in (node.input, node.output):
            for i, name in enumerate(field):
                field[i] = {a: tmp, b: a}.get(name, name)
            for i, name in enumerate(field):
                field[i] = b if name == tmp else name
    onnx.save(model, path)
    rehash(bundle, "policy.train.onnx")


def as_goldens_format_1(bundle: Path) -> None:
    """Make the manifest's goldens section look like an old export's (format 1)."""
    m = manifest(bundle)
    m["goldens"] = {"file": m["goldens"]["file"], "tolerances": {"loss_abs": 1e-5, "grad_rel": 1e-4, "logps_abs": 1e-4}}
    write_manifest(bundle, m)
