//! Tokenising pairs (tokenizers, in parallel with rayon) like TRL 0.13's
//! `DPOTrainer.tokenize_row` (the paper's code base): prompt, chosen and rejected text are
//! tokenised separately without special tokens, EOS is appended to both responses (plain and
//! conversational alike; `--response-eos never` for templates that close their turns
//! themselves), `--max-prompt-length` keeps the end of the prompt and `--max-length` cuts the
//! end of the responses.

use std::path::Path;

use rayon::prelude::*;
use tokenizers::Tokenizer;

use super::chat::ChatTemplate;
use super::pairs::{Content, PairInput};
use super::{DataError, SkipReason};

/// Whether EOS is appended to every chosen and rejected response.
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
pub enum ResponseEos {
    /// Append the tokenizer's EOS id to both responses of every text or chat row (TRL 0.13's
    /// `tokenize_row`, which the paper trained with).
    #[default]
    Always,
    /// Leave responses as tokenised (for templates whose turns already end with EOS).
    Never,
}

/// Truncation limits in tokens (None = no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Truncation {
    pub max_length: Option<usize>,
    pub max_prompt_length: Option<usize>,
}

/// A pair ready for scoring: response tokens follow the prompt tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedPair {
    pub pair_id: u64,
    pub source_row: u64,
    pub prompt_ids: Vec<u32>,
    pub chosen_ids: Vec<u32>,
    pub rejected_ids: Vec<u32>,
    pub prompt_truncated: bool,
    pub response_truncated: bool,
}

impl TokenizedPair {
    /// The token ids of one response.
    pub fn response(&self, side: super::Side) -> &[u32] {
        match side {
            super::Side::Chosen => &self.chosen_ids,
            super::Side::Rejected => &self.rejected_ids,
        }
    }
}

pub enum EncodeOutcome {
    Pair(TokenizedPair),
    Skip(SkipReason),
}

/// Turns [`PairInput`]s into token ids.
pub struct Encoder {
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    eos_id: Option<u32>,
    bos_id: Option<u32>,
    truncation: Truncation,
    response_eos: ResponseEos,
}

impl Encoder {
    pub fn new(
        tokenizer_json: &Path,
        template: Option<ChatTemplate>,
        eos_id: Option<u32>,
        bos_id: Option<u32>,
        truncation: Truncation,
        response_eos: ResponseEos,
    ) -> Result<Self, DataError> {
        let tokenizer = Tokenizer::from_file(tokenizer_json).map_err(|e| DataError::Tokenizer {
            message: format!("cannot load `{}`: {e}", tokenizer_json.display()),
        })?;
        Ok(Encoder {
            tokenizer,
            template,
            eos_id,
            bos_id,
            truncation,
            response_eos,
        })
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn template_sha256(&self) -> Option<&str> {
        self.template.as_ref().map(|t| t.sha256.as_str())
    }

    pub fn has_template(&self) -> bool {
        self.template.is_some()
    }

    fn encode_text(&self, text: &str) -> Result<Vec<u32>, DataError> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| DataError::Tokenizer {
                message: e.to_string(),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// A response's ids, with EOS appended under `ResponseEos::Always` (an empty response stays
    /// empty, to be counted as a skip).
    fn encode_response(&self, text: &str) -> Result<Vec<u32>, DataError> {
        let mut ids = self.encode_text(text)?;
        if self.response_eos == ResponseEos::Always && !text.is_empty() {
            ids.extend(self.eos_id);
        }
        Ok(ids)
    }

    /// Tokenises and truncates one pair.
    pub fn encode(&self, pair: &PairInput) -> Result<EncodeOutcome, DataError> {
        let (mut prompt, mut chosen, mut rejected) =
            match (&pair.prompt, &pair.chosen, &pair.rejected) {
                (Content::Tokens(p), Content::Tokens(c), Content::Tokens(r)) => {
                    (p.clone(), c.clone(), r.clone())
                }
                (Content::Text(p), Content::Text(c), Content::Text(r)) => (
                    self.encode_text(p)?,
                    self.encode_response(c)?,
                    self.encode_response(r)?,
                ),
                (Content::Messages(p), Content::Messages(c), Content::Messages(r)) => {
                    let template = self.template.as_ref().ok_or(DataError::NoChatTemplate)?;
                    let (p, c, r) = template.render_pair(p, c, r, &pair.at)?;
                    (
                        self.encode_text(&p)?,
                        self.encode_response(&c)?,
                        self.encode_response(&r)?,
                    )
                }
                _ => unreachable!("a row's three fields share one format"),
            };
        if chosen.is_empty() || rejected.is_empty() {
            return Ok(EncodeOutcome::Skip(SkipReason::EmptyResponse));
        }
        if prompt.is_empty() {
            match self.bos_id {
                Some(bos) => prompt.push(bos),
                None => return Ok(EncodeOutcome::Skip(SkipReason::EmptyPrompt)),
            }
        }
        let mut prompt_truncated = false;
        if let Some(max_prompt) = self.truncation.max_prompt_length {
            if prompt.len() > max_prompt {
                prompt.drain(..prompt.len() - max_prompt);
                prompt_truncated = true;
            }
        }
        let mut response_truncated = false;
        if let Some(max_len) = self.truncation.max_length {
            if prompt.len() >= max_len {
                return Ok(EncodeOutcome::Skip(SkipReason::PromptFillsMaxLength));
            }
            let budget = max_len - prompt.len();
            for response in [&mut chosen, &mut rejected] {
                if response.len() > budget {
                    response.truncate(budget);
                    response_truncated = true;
                }
            }
        }
        Ok(EncodeOutcome::Pair(TokenizedPair {
            pair_id: pair.pair_id,
            source_row: pair.source_row,
            prompt_ids: prompt,
            chosen_ids: chosen,
            rejected_ids: rejected,
            prompt_truncated,
            response_truncated,
        }))
    }

    /// Encodes many pairs in parallel, keeping their order; a failure is the first failing
    /// row's (in row order, whichever thread got there first).
    pub fn encode_all(&self, pairs: &[PairInput]) -> Result<Vec<EncodeOutcome>, DataError> {
        let results: Vec<Result<EncodeOutcome, DataError>> =
            pairs.par_iter().map(|p| self.encode(p)).collect();
        results.into_iter().collect()
    }
}
