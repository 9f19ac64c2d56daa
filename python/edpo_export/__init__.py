"""edpo_export: a Hugging Face causal LM → an edpo model bundle (ONNX graphs, weights,
tokenizer, PyTorch goldens, manifest), and the check of a bundle against its goldens.

    python -m edpo_export --model HF_DIR --out BUNDLE
    python -m edpo_export --verify BUNDLE

Modules: `cli` (the command line), `bundle` (writes a bundle), `graphs` (loads the model and
traces both graphs), `goldens` (the fixed batch and PyTorch's float64 outputs on it), `verify`
(a bundle against its goldens in ONNX Runtime, within noise bands), `common` (file names,
graph I/O specs, the goldens' band settings, helpers) and `objective` (the ε-DPO objective
in PyTorch: traced into the training graph, and the oracle of the tests and baselines; it
imports torch, so it is not imported here). The other modules import torch, onnx and
transformers only when they run.
"""

from .cli import main
from .common import TOPK_DEFAULT

__all__ = ["TOPK_DEFAULT", "main"]
