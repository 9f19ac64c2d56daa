//! edpo: epsilon-DPO preference optimisation over ONNX Runtime.
