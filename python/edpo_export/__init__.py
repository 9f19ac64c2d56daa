"""edpo_export: a Hugging Face causal LM → an edpo model bundle (ONNX graphs, weights,
tokenizer, PyTorch goldens, manifest), and the check of a bundle against its goldens.

    python -m edpo_export --model HF_DIR --out BUNDLE
    python -m edpo_export --verify BUNDLE

`objective` holds the ε-DPO objective in PyTorch (traced into the training graph, and the
oracle of the tests and baselines); it imports torch, so it is not imported here.
"""

from .cli import TOPK_DEFAULT, main, verify

__all__ = ["TOPK_DEFAULT", "main", "verify"]
