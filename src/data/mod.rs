//! Preference data: reading inputs, recognising their format, chat templates, tokenisation.
//!
//! A row becomes a [`PairInput`] (prompt / chosen / rejected as text, messages or token ids),
//! then a [`tokenize::TokenizedPair`]. Rows that cannot be used are either a [`DataError`]
//! (the whole run stops with exit code 2 and a message naming file, row and column) or a
//! counted [`SkipReason`].

pub mod chat;
pub mod ids;
pub mod pairs;
pub mod source;
pub mod tokenize;

use std::path::PathBuf;

pub use pairs::{Columns, Content, Format, Message, PairInput, PromptMismatch, RowRef};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(
        "`--data {path}` does not exist; pass a Parquet/JSONL file, a folder of them, or a glob"
    )]
    NotFound { path: PathBuf },
    #[error("`--data {pattern}` matched no files")]
    NothingMatched { pattern: String },
    #[error("`--data {pattern}` is not a valid glob: {message}")]
    BadGlob { pattern: String, message: String },
    #[error("folder `{path}` has no .parquet or .jsonl files")]
    EmptyFolder { path: PathBuf },
    #[error("`{path}` is neither Parquet (.parquet), JSON lines (.jsonl, .ndjson, .json) nor Arrow (.arrow); convert it or rename it")]
    UnsupportedFile { path: PathBuf },
    #[error("cannot read `{path}`: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{path}` is empty (no rows); remove it from `--data`")]
    EmptyFile { path: PathBuf },
    #[error("`{path}` is not a readable Parquet file ({message}); re-write it, e.g. with pyarrow")]
    BadParquet { path: PathBuf, message: String },
    #[error("`{path}` is not a readable Arrow IPC stream ({message}); pass the folder that `datasets`' `save_to_disk` wrote, or convert the data to Parquet")]
    BadArrow { path: PathBuf, message: String },
    #[error("`{path}` is a `datasets` DatasetDict (splits: {splits}); pass one split's folder, e.g. `--data {example}`")]
    DatasetDict {
        path: PathBuf,
        splits: String,
        example: PathBuf,
    },
    #[error("`{path}` is not a `datasets` save_to_disk state file: {message}")]
    BadDatasetFolder { path: PathBuf, message: String },
    #[error("`{path}` line {line}: invalid JSON ({message}); every line must be one JSON object")]
    BadJson {
        path: PathBuf,
        line: u64,
        message: String,
    },
    #[error("`{path}` line {line}: not valid UTF-8 ({message}); re-encode the file as UTF-8")]
    Utf8 {
        path: PathBuf,
        line: u64,
        message: String,
    },
    #[error("{at}: no column `{column}` (columns: {available}); name the right one with `{flag}`")]
    MissingColumn {
        at: RowRef,
        column: String,
        available: String,
        flag: &'static str,
    },
    #[error("{at}: column `{column}` {problem}")]
    BadValue {
        at: RowRef,
        column: String,
        problem: String,
    },
    #[error("{at}: column `{column}` has a message with role `{role}`; roles must be system, user, assistant, tool or developer")]
    UnknownRole {
        at: RowRef,
        column: String,
        role: String,
    },
    #[error("{at}: column `{column}` is in format `{got}`, not `{want}` detected at the first row; use one format per run (or pass `--format`)")]
    MixedFormats {
        at: RowRef,
        column: String,
        got: &'static str,
        want: &'static str,
    },
    #[error(
        "{at}: token id {id} in column `{column}` is outside the model's vocabulary (size {vocab})"
    )]
    TokenOutOfRange {
        at: RowRef,
        column: String,
        id: i64,
        vocab: usize,
    },
    #[error("the data is conversational but the bundle's tokenizer_config.json has no chat template; add one (`chat_template`) and re-export, or pass plain text")]
    NoChatTemplate,
    #[error("{message}")]
    Template { message: String },
    #[error("{at}: rendering the chat template failed: {message}")]
    Render { at: RowRef, message: String },
    #[error("{at}: column `{column}` holds the prompt {prompt:?}, which is not the last user turn of the chosen and rejected conversations (their shared prefix is the prompt, as in TRL); fix the row, or leave out `--prompt-mismatch error` to count and skip such rows")]
    PromptMismatch {
        at: RowRef,
        column: String,
        prompt: String,
    },
    #[error("{at}: the chat template does not render the prompt as a prefix of prompt + response, so the response cannot be separated")]
    TemplateNotPrefix { at: RowRef },
    #[error("tokenizer: {message}")]
    Tokenizer { message: String },
}

impl DataError {
    pub fn exit_code(&self) -> i32 {
        match self {
            DataError::Tokenizer { .. } => 1,
            _ => 2,
        }
    }
}

/// One response of a preference pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    Chosen,
    Rejected,
}

impl Side {
    /// Both sides, chosen first (the batch layout's order).
    pub const BOTH: [Side; 2] = [Side::Chosen, Side::Rejected];
}

/// Why a row was left out (counted and reported, never silent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SkipReason {
    NullField,
    EmptyPrompt,
    EmptyResponse,
    NoAssistantTurn,
    PromptFillsMaxLength,
    DuplicateId,
    PromptMismatch,
}

impl SkipReason {
    pub const ALL: [SkipReason; 7] = [
        SkipReason::NullField,
        SkipReason::EmptyPrompt,
        SkipReason::EmptyResponse,
        SkipReason::NoAssistantTurn,
        SkipReason::PromptFillsMaxLength,
        SkipReason::DuplicateId,
        SkipReason::PromptMismatch,
    ];

    /// Stable name used in summaries, metadata and JSON.
    pub fn name(self) -> &'static str {
        match self {
            SkipReason::NullField => "null_field",
            SkipReason::EmptyPrompt => "empty_prompt",
            SkipReason::EmptyResponse => "empty_response",
            SkipReason::NoAssistantTurn => "no_assistant_turn",
            SkipReason::PromptFillsMaxLength => "prompt_fills_max_length",
            SkipReason::DuplicateId => "duplicate_id",
            SkipReason::PromptMismatch => "prompt_mismatch",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            SkipReason::NullField => "a prompt/chosen/rejected value is null or absent",
            SkipReason::EmptyPrompt => {
                "the prompt is empty and the tokenizer has no BOS token to start the sequence"
            }
            SkipReason::EmptyResponse => "the chosen or rejected response is empty",
            SkipReason::NoAssistantTurn => {
                "the chosen or rejected conversation has no assistant turn"
            }
            SkipReason::PromptFillsMaxLength => {
                "the prompt fills --max-length, leaving no response token"
            }
            SkipReason::DuplicateId => "the pair id repeats an earlier row's (the first is kept)",
            SkipReason::PromptMismatch => {
                "the string prompt is not the conversations' last user turn (`--prompt-mismatch error` to stop instead)"
            }
        }
    }

    pub fn from_name(name: &str) -> Option<SkipReason> {
        SkipReason::ALL.into_iter().find(|r| r.name() == name)
    }
}
