//! The library's one error type, and the one place that decides a failure's exit code.
//!
//! Every module keeps a `thiserror` enum of its own failures; a function that can fail in
//! several modules returns [`Error`], which wraps them unchanged (messages are the modules').
//! [`Error::exit_code`] is the only mapping from a failure to the process exit code:
//! 2 when the user can fix it (a flag, an input, an installation), 1 for an internal failure.

use crate::bundle::BundleError;
use crate::config::ConfigError;
use crate::data::DataError;
use crate::goldens::GoldensError;
use crate::graphs::GraphError;
use crate::inspect::InspectError;
use crate::lora::LoraError;
use crate::params::ParamsError;
use crate::prep::PrepError;
use crate::report::ReportError;
use crate::runtime::RuntimeError;
use crate::shards::ShardError;
use crate::table::TableError;
use crate::train::checkpoint::CheckpointError;
use crate::train::TrainError;

/// Any failure of an edpo command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Params(#[from] ParamsError),
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Goldens(#[from] GoldensError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Shard(#[from] ShardError),
    #[error(transparent)]
    Table(#[from] TableError),
    #[error(transparent)]
    Prep(#[from] PrepError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Inspect(#[from] InspectError),
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error(transparent)]
    Lora(#[from] LoraError),
}

/// The user can fix it: a flag, an input file, the installation.
pub const EXIT_USER: u8 = 2;
/// Something failed inside edpo or ONNX Runtime (a bug, a broken graph, a failed write).
pub const EXIT_INTERNAL: u8 = 1;

impl Error {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        let internal = match self {
            Error::Runtime(e) => matches!(e, RuntimeError::Options(_)),
            Error::Graph(e) => !matches!(e, GraphError::Batch { .. }),
            Error::Data(e) => matches!(e, DataError::Tokenizer { .. }),
            Error::Train(e) => matches!(e, TrainError::NonFinite { .. } | TrainError::Write { .. }),
            Error::Checkpoint(_) => true,
            // A write that fails mid-run (disk full, folder gone): the output so far is intact.
            Error::Table(e) => matches!(e, TableError::Write { .. }),
            Error::Params(e) => matches!(e, ParamsError::Write { .. }),
            Error::Report(e) => matches!(e, ReportError::Draw { .. }),
            Error::Lora(e) => matches!(e, LoraError::Write { .. }),
            Error::Config(_)
            | Error::Bundle(_)
            | Error::Goldens(_)
            | Error::Shard(_)
            | Error::Prep(_)
            | Error::Inspect(_) => false,
        };
        if internal {
            EXIT_INTERNAL
        } else {
            EXIT_USER
        }
    }
}
