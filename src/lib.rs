//! edpo: offline preference optimisation of language models with ε-DPO over ONNX Runtime.
//!
//! Stages and modules follow `architecture.md`: a model *bundle* (exported by
//! `pipelines/export.py`) holds a reference scoring graph and a joint training graph;
//! `runtime` loads ONNX Runtime, `bundle` checks the bundle, `graphs` runs both graphs.

pub mod bundle;
pub mod data;
pub mod eval;
pub mod goldens;
pub mod graphs;
pub mod inspect;
pub mod objective;
pub mod params;
pub mod prep;
pub mod progress;
pub mod report;
pub mod runtime;
mod runtime_cuda;
pub mod scoring;
pub mod shards;
pub mod study;
pub mod train;
