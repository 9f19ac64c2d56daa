//! edpo: offline preference optimisation of language models with ε-DPO over ONNX Runtime.
//!
//! `ARCHITECTURE.md` maps the modules and the data flow. In short: a model *bundle* (made by
//! `python -m edpo_export`) holds a reference scoring graph and a joint training graph;
//! `prep` scores preference pairs once into Parquet `shards`; `train` runs ε-DPO over them;
//! `eval`, `study`, `inspect` and `report` look at the results. `config` turns flags and
//! TOML files into each stage's checked configuration; `error` is the one error type.

pub mod batch;
pub mod bundle;
pub mod cli;
pub mod config;
pub mod crash;
pub mod data;
pub mod dist;
pub mod error;
pub mod eval;
pub mod file_hashes;
pub mod goldens;
pub mod graph_cache;
pub mod graphs;
pub mod in_place;
pub mod inspect;
pub mod lora;
pub mod objective;
pub mod output;
pub mod packing;
pub mod params;
pub mod prep;
pub mod progress;
pub mod report;
pub mod runtime;
mod runtime_cuda;
pub mod scoring;
pub mod shards;
pub mod stages;
pub mod study;
pub mod table;
pub mod train;

pub use error::Error;
