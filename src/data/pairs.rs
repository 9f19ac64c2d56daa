//! Recognising a row's format and turning it into a prompt / chosen / rejected triple.
//!
//! Formats (TRL's dataset formats): plain strings with a `prompt`; conversational message
//! lists with an explicit prompt; implicit prompt (chosen and rejected are whole
//! conversations or strings sharing a prefix, which becomes the prompt); pre-tokenised id lists.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::source::SourceRow;
use super::{DataError, SkipReason};

/// Where a row came from, for messages: "`file.jsonl` line 7" or "`file.parquet` row 12".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowRef {
    pub path: PathBuf,
    pub row: u64,
    pub line: Option<u64>,
}

impl std::fmt::Display for RowRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(line) => write!(f, "`{}` line {line}", self.path.display()),
            None => write!(f, "`{}` row {}", self.path.display(), self.row),
        }
    }
}

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Detect from the first row.
    #[default]
    Auto,
    /// `prompt`, `chosen`, `rejected` strings.
    Plain,
    /// Message lists (`role`/`content`) with an explicit prompt.
    Chat,
    /// Chosen and rejected are whole conversations (or strings) sharing the prompt as a prefix.
    Implicit,
    /// Token id lists.
    Tokenized,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Auto => "auto",
            Format::Plain => "plain",
            Format::Chat => "chat",
            Format::Implicit => "implicit",
            Format::Tokenized => "tokenized",
        }
    }
}

/// Column names (configurable with `--prompt-column` etc.).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Columns {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    /// Optional stable id column; when absent, the pair id comes from file name and row.
    pub id: String,
}

impl Default for Columns {
    fn default() -> Self {
        Columns {
            prompt: "prompt".into(),
            chosen: "chosen".into(),
            rejected: "rejected".into(),
            id: "id".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A prompt or response before tokenisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Text(String),
    Messages(Vec<Message>),
    Tokens(Vec<u32>),
}

/// One usable row.
#[derive(Debug, Clone)]
pub struct PairInput {
    pub at: RowRef,
    /// Index of the row in the whole input stream (all files, in order).
    pub source_row: u64,
    pub pair_id: u64,
    pub prompt: Content,
    pub chosen: Content,
    pub rejected: Content,
}

/// Result of reading one row.
#[derive(Debug, Clone)]
pub enum RowOutcome {
    Pair(PairInput),
    Skip(SkipReason),
}

pub const ROLES: [&str; 5] = ["system", "user", "assistant", "tool", "developer"];

/// Detects the format from a row's fields (used on the first row). Conversations beside a
/// string prompt (HuggingFaceH4/ultrafeedback_binarized's layout) are implicit-prompt rows, as
/// TRL's `maybe_extract_prompt` treats them.
pub fn detect(fields: &Map<String, Value>, columns: &Columns) -> Option<Format> {
    let chosen = fields.get(&columns.chosen)?;
    let prompt = fields.get(&columns.prompt);
    let list_prompt = matches!(prompt, Some(Value::Array(_)));
    match chosen {
        Value::String(_) if prompt.is_some() => Some(Format::Plain),
        Value::String(_) => Some(Format::Implicit),
        Value::Array(items) => match items.first() {
            Some(Value::Number(_)) => Some(Format::Tokenized),
            Some(Value::Object(_)) if list_prompt => Some(Format::Chat),
            Some(Value::Object(_)) => Some(Format::Implicit),
            _ => None,
        },
        _ => None,
    }
}

/// 64-bit stable id: from the id column's value, else from the file name and row.
pub fn pair_id(id_value: Option<&Value>, path: &Path, file_row: u64) -> u64 {
    let key = match id_value {
        Some(Value::String(s)) => format!("id:{s}"),
        Some(v) if !v.is_null() => format!("id:{v}"),
        _ => format!(
            "row:{}:{file_row}",
            path.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        ),
    };
    let digest = Sha256::digest(key.as_bytes());
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

pub struct RowParser<'a> {
    pub columns: &'a Columns,
    pub format: Format,
    pub vocab_size: usize,
    pub prompt_mismatch: PromptMismatch,
}

/// What a row gets whose string prompt differs from its conversations' last user turn.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum PromptMismatch {
    /// Leave the row out, counted as `prompt_mismatch`.
    #[default]
    Skip,
    /// Stop with an error naming the row.
    Error,
}

/// Whether a string prompt is the last user turn of a conversation's prompt messages
/// (edges' whitespace ignored).
fn prompt_matches(text: &str, prompt: &[Message]) -> bool {
    prompt
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .is_some_and(|m| m.content.trim() == text.trim())
}

/// A row's field that the format needs, with the flag that names its column.
struct Required<'a> {
    column: &'a str,
    flag: &'static str,
}

impl RowParser<'_> {
    /// The columns this format reads.
    fn required(&self) -> Vec<Required<'_>> {
        let cols = self.columns;
        let mut out = Vec::with_capacity(3);
        if !matches!(self.format, Format::Implicit) {
            out.push(Required {
                column: &cols.prompt,
                flag: "--prompt-column",
            });
        }
        out.push(Required {
            column: &cols.chosen,
            flag: "--chosen-column",
        });
        out.push(Required {
            column: &cols.rejected,
            flag: "--rejected-column",
        });
        out
    }

    /// A missing column is an error on a table's schema (Parquet) or a file's first row, and a
    /// counted skip on a later JSONL row (as is a null value); None when every field is there.
    fn check_fields(&self, row: &SourceRow, at: &RowRef) -> Result<Option<SkipReason>, DataError> {
        for Required { column, flag } in self.required() {
            match row.fields.get(column) {
                None if row.line.is_none() || row.file_row == 0 => {
                    let mut keys: Vec<&str> = row.fields.keys().map(String::as_str).collect();
                    keys.sort();
                    return Err(DataError::MissingColumn {
                        at: at.clone(),
                        column: column.to_string(),
                        available: keys.join(", "),
                        flag,
                    });
                }
                None | Some(Value::Null) => return Ok(Some(SkipReason::NullField)),
                Some(_) => {}
            }
        }
        if let Some(detected) = detect(&row.fields, self.columns) {
            let compatible = detected == self.format
                || (self.format == Format::Implicit && detected != Format::Tokenized);
            if !compatible {
                return Err(DataError::MixedFormats {
                    at: at.clone(),
                    column: self.columns.chosen.clone(),
                    got: detected.name(),
                    want: self.format.name(),
                });
            }
        }
        Ok(None)
    }

    /// The shared prefix of two conversations is the prompt (TRL's `extract_prompt`); a string
    /// prompt beside them (the UltraFeedback layout) must be its last user turn.
    fn implicit_messages(
        &self,
        row: &SourceRow,
        at: &RowRef,
    ) -> Result<Result<(Content, Content, Content), SkipReason>, DataError> {
        let cols = self.columns;
        let field = |c: &str| row.fields.get(c).expect("checked by check_fields");
        let c = messages(field(&cols.chosen), at, &cols.chosen)?;
        let r = messages(field(&cols.rejected), at, &cols.rejected)?;
        let shared = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
        if let Some(Value::String(text)) = row.fields.get(&cols.prompt) {
            if !prompt_matches(text, &c[..shared]) {
                return match self.prompt_mismatch {
                    PromptMismatch::Skip => Ok(Err(SkipReason::PromptMismatch)),
                    PromptMismatch::Error => Err(DataError::PromptMismatch {
                        at: at.clone(),
                        column: cols.prompt.clone(),
                        prompt: excerpt(text),
                    }),
                };
            }
        }
        Ok(Ok((
            Content::Messages(c[..shared].to_vec()),
            Content::Messages(c[shared..].to_vec()),
            Content::Messages(r[shared..].to_vec()),
        )))
    }

    /// The prompt, chosen and rejected contents of a row in the run's format, or why the row
    /// is left out.
    fn contents(
        &self,
        row: &SourceRow,
        at: &RowRef,
    ) -> Result<Result<(Content, Content, Content), SkipReason>, DataError> {
        let cols = self.columns;
        let field = |c: &str| row.fields.get(c).expect("checked by check_fields");
        let tokens_of = |c: &str| tokens(field(c), at, c, self.vocab_size).map(Content::Tokens);
        Ok(Ok(match self.format {
            Format::Plain => (
                Content::Text(string(field(&cols.prompt), at, &cols.prompt)?),
                Content::Text(string(field(&cols.chosen), at, &cols.chosen)?),
                Content::Text(string(field(&cols.rejected), at, &cols.rejected)?),
            ),
            Format::Chat => (
                Content::Messages(messages(field(&cols.prompt), at, &cols.prompt)?),
                Content::Messages(messages(field(&cols.chosen), at, &cols.chosen)?),
                Content::Messages(messages(field(&cols.rejected), at, &cols.rejected)?),
            ),
            Format::Tokenized => (
                tokens_of(&cols.prompt)?,
                tokens_of(&cols.chosen)?,
                tokens_of(&cols.rejected)?,
            ),
            Format::Implicit => match (field(&cols.chosen), field(&cols.rejected)) {
                (Value::String(c), Value::String(r)) => {
                    let (p, c, r) = split_common_text(c, r);
                    (Content::Text(p), Content::Text(c), Content::Text(r))
                }
                _ => return self.implicit_messages(row, at),
            },
            Format::Auto => unreachable!("format is resolved before parsing"),
        }))
    }

    /// Parses one row in the run's (already detected) format.
    pub fn parse(
        &self,
        row: &SourceRow,
        path: &Path,
        source_row: u64,
    ) -> Result<RowOutcome, DataError> {
        let at = RowRef {
            path: path.to_path_buf(),
            row: row.file_row,
            line: row.line,
        };
        if let Some(skip) = self.check_fields(row, &at)? {
            return Ok(RowOutcome::Skip(skip));
        }
        let id = pair_id(row.fields.get(&self.columns.id), path, row.file_row);
        let (prompt, chosen, rejected) = match self.contents(row, &at)? {
            Ok(contents) => contents,
            Err(skip) => return Ok(RowOutcome::Skip(skip)),
        };
        if let (Content::Messages(c), Content::Messages(r)) = (&chosen, &rejected) {
            let has_assistant = |m: &[Message]| m.iter().any(|m| m.role == "assistant");
            if !has_assistant(c) || !has_assistant(r) {
                return Ok(RowOutcome::Skip(SkipReason::NoAssistantTurn));
            }
        }
        if is_empty(&chosen) || is_empty(&rejected) {
            return Ok(RowOutcome::Skip(SkipReason::EmptyResponse));
        }
        Ok(RowOutcome::Pair(PairInput {
            at,
            source_row,
            pair_id: id,
            prompt,
            chosen,
            rejected,
        }))
    }
}

/// The start of a long text, for messages.
fn excerpt(text: &str) -> String {
    let mut out: String = text.chars().take(80).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    out
}

fn is_empty(c: &Content) -> bool {
    match c {
        Content::Text(s) => s.is_empty(),
        Content::Messages(m) => m.is_empty() || m.iter().all(|m| m.content.is_empty()),
        Content::Tokens(t) => t.is_empty(),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn string(v: &Value, at: &RowRef, column: &str) -> Result<String, DataError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        other => Err(DataError::BadValue {
            at: at.clone(),
            column: column.to_string(),
            problem: format!("is {}, expected a string (plain format)", type_name(other)),
        }),
    }
}

fn messages(v: &Value, at: &RowRef, column: &str) -> Result<Vec<Message>, DataError> {
    let bad = |problem: String| DataError::BadValue {
        at: at.clone(),
        column: column.to_string(),
        problem,
    };
    let Value::Array(items) = v else {
        return Err(bad(format!(
            "is {}, expected a list of {{\"role\", \"content\"}} messages (conversational format)",
            type_name(v)
        )));
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Value::Object(obj) = item else {
            return Err(bad(format!(
                "message {i} is {}, expected an object with `role` and `content`",
                type_name(item)
            )));
        };
        let role = match obj.get("role") {
            Some(Value::String(r)) => r.clone(),
            _ => return Err(bad(format!("message {i} has no string `role`"))),
        };
        if !ROLES.contains(&role.as_str()) {
            return Err(DataError::UnknownRole {
                at: at.clone(),
                column: column.to_string(),
                role,
            });
        }
        let content = match obj.get("content") {
            Some(Value::String(c)) => c.clone(),
            Some(Value::Null) | None => String::new(),
            Some(other) => {
                return Err(bad(format!(
                    "message {i} has `content` of type {}, expected a string",
                    type_name(other)
                )))
            }
        };
        out.push(Message { role, content });
    }
    Ok(out)
}

fn tokens(v: &Value, at: &RowRef, column: &str, vocab: usize) -> Result<Vec<u32>, DataError> {
    let Value::Array(items) = v else {
        return Err(DataError::BadValue {
            at: at.clone(),
            column: column.to_string(),
            problem: format!(
                "is {}, expected a list of token ids (tokenized format)",
                type_name(v)
            ),
        });
    };
    items
        .iter()
        .map(|item| {
            let id = item.as_i64().ok_or_else(|| DataError::BadValue {
                at: at.clone(),
                column: column.to_string(),
                problem: format!("holds {}, expected integer token ids", type_name(item)),
            })?;
            if id < 0 || id as usize >= vocab {
                return Err(DataError::TokenOutOfRange {
                    at: at.clone(),
                    column: column.to_string(),
                    id,
                    vocab,
                });
            }
            Ok(id as u32)
        })
        .collect()
}

/// TRL's implicit-prompt rule for strings: the longest common prefix is the prompt, moved back
/// by one when the responses would start right after a space.
fn split_common_text(chosen: &str, rejected: &str) -> (String, String, String) {
    let mut idx = chosen
        .char_indices()
        .zip(rejected.chars())
        .find(|((_, a), b)| a != b)
        .map(|((i, _), _)| i)
        .unwrap_or_else(|| chosen.len().min(rejected.len()));
    while !rejected.is_char_boundary(idx) {
        idx -= 1;
    }
    if idx > 0 && chosen[..idx].ends_with(' ') {
        idx -= 1;
    }
    (
        chosen[..idx].to_string(),
        chosen[idx..].to_string(),
        rejected[idx..].to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implicit_text_prompt_is_the_shared_prefix() {
        let (p, c, r) = split_common_text("Q: hi A: good", "Q: hi A: bad");
        assert_eq!(p, "Q: hi A:");
        assert_eq!(c, " good");
        assert_eq!(r, " bad");
    }

    #[test]
    fn pair_ids_are_stable_and_distinct() {
        let a = pair_id(None, Path::new("d/x.jsonl"), 3);
        assert_eq!(a, pair_id(None, Path::new("other/x.jsonl"), 3));
        assert_ne!(a, pair_id(None, Path::new("d/x.jsonl"), 4));
        let s = Value::String("abc".into());
        assert_eq!(
            pair_id(Some(&s), Path::new("a"), 0),
            pair_id(Some(&s), Path::new("b"), 9)
        );
    }
}
