//! The prep stage: read preference data, tokenise it, score every pair once with the reference
//! graph and write resumable Parquet shards (architecture.md, issue "edpo prep").
//!
//! Determinism is what makes resume safe: shard i always holds the usable pairs among input
//! rows [i·S, (i+1)·S) (S = `shard_size`), scored in the same batches, so a rerun after a
//! crash rewrites only missing shards and produces exactly the pairs of an uninterrupted run.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;

use crate::bundle::{Bundle, BundleError};
use crate::data::chat::ChatTemplate;
use crate::data::pairs::{detect, Columns, Format, RowOutcome, RowParser};
use crate::data::source::{self, RowStream, SourceFile};
use crate::data::tokenize::{EncodeOutcome, Encoder, TokenizedPair, Truncation};
use crate::data::{DataError, PairInput, SkipReason};
use crate::graphs::{GraphError, ReferenceGraph};
use crate::progress::Progress;
use crate::runtime::SessionConfig;
use crate::scoring::{pair_sequences, score_sequences, BatchStats};
use crate::shards::{
    list_shards, read_metadata, shard_file_name, write_shard, ScoredPair, ShardError,
    ShardManifest, ShardStats,
};

pub const EDPO_VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, thiserror::Error)]
pub enum PrepError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Shard(#[from] ShardError),
    #[error("`{flag}`: {message}")]
    Flag { flag: &'static str, message: String },
    #[error("the tokenizer has {tokenizer} tokens but the model's vocabulary is {model}; the bundle's tokenizer.json does not belong to its model — re-export with the right `--tokenizer`")]
    VocabMismatch { tokenizer: usize, model: usize },
    #[error("`{dir}` already holds shards made with other settings or another model ({what}); pass `--overwrite` to replace them, or choose another `--out`")]
    OtherSettings { dir: PathBuf, what: String },
    #[error("output folder `{dir}` is not writable: {message}; choose another `--out` or fix its permissions")]
    Unwritable { dir: PathBuf, message: String },
    #[error("{at}: cannot tell the data format from the first row: {why} (columns: {columns}); pass `--format` and the column flags")]
    UnknownFormat {
        at: String,
        why: String,
        columns: String,
    },
}

impl PrepError {
    pub fn exit_code(&self) -> i32 {
        match self {
            PrepError::Bundle(e) => e.exit_code(),
            PrepError::Data(e) => e.exit_code(),
            PrepError::Graph(e) => e.exit_code(),
            PrepError::Shard(e) => e.exit_code(),
            _ => 2,
        }
    }
}

/// Checked prep settings.
#[derive(Debug, Clone)]
pub struct PrepConfig {
    pub model: PathBuf,
    pub data: Vec<PathBuf>,
    pub out: PathBuf,
    pub format: Format,
    pub columns: Columns,
    pub truncation: Truncation,
    /// Top-K size; None = the bundle's default.
    pub topk: Option<usize>,
    pub session: SessionConfig,
    /// Token budget of one scoring batch (rows × padded length).
    pub batch_tokens: usize,
    /// Input rows per shard.
    pub shard_size: usize,
    /// Use only the first N input rows.
    pub limit: Option<u64>,
    pub overwrite: bool,
    pub quiet: bool,
}

/// What a prep run did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PrepSummary {
    pub out: PathBuf,
    pub format: String,
    pub topk: usize,
    pub rows_read: u64,
    pub pairs_written: u64,
    pub skipped: BTreeMap<String, u64>,
    pub shards: usize,
    pub shards_reused: usize,
    pub response_tokens: u64,
    pub sequence_tokens: u64,
    pub padded_tokens: u64,
    pub padding_fraction: f64,
    pub wall_seconds: f64,
    pub pairs_per_second: f64,
    pub tokens_per_second: f64,
}

/// Everything fixed before the first row is read.
struct Plan {
    bundle: Bundle,
    files: Vec<SourceFile>,
    format: Format,
    encoder: Encoder,
    topk: usize,
    fingerprint: String,
    settings: serde_json::Value,
}

fn plan(cfg: &PrepConfig) -> Result<Plan, PrepError> {
    if cfg.shard_size == 0 {
        return Err(PrepError::Flag {
            flag: "--shard-size",
            message: "must be at least 1".into(),
        });
    }
    if cfg.batch_tokens < 2 {
        return Err(PrepError::Flag {
            flag: "--batch-tokens",
            message: "must be at least 2".into(),
        });
    }
    if cfg.truncation.max_length == Some(0) || cfg.truncation.max_length == Some(1) {
        return Err(PrepError::Flag {
            flag: "--max-length",
            message: "must be at least 2 (one prompt and one response token)".into(),
        });
    }
    if cfg.truncation.max_prompt_length == Some(0) {
        return Err(PrepError::Flag {
            flag: "--max-prompt-length",
            message: "must be at least 1".into(),
        });
    }
    let bundle = Bundle::open(&cfg.model)?;
    let vocab = bundle.manifest.vocab_size;
    let topk = cfg.topk.unwrap_or(bundle.manifest.topk_default);
    if topk == 0 || topk > vocab {
        return Err(PrepError::Flag {
            flag: "--topk",
            message: format!("K = {topk} must be between 1 and the vocabulary size {vocab}"),
        });
    }
    let template = ChatTemplate::from_tokenizer_config(&bundle.path("tokenizer_config.json"))?;
    let special = &bundle.manifest.special_tokens;
    let encoder = Encoder::new(
        &bundle.path("tokenizer.json"),
        template,
        special.eos.id,
        special.bos.id,
        cfg.truncation,
    )?;
    if encoder.vocab_size() > vocab {
        return Err(PrepError::VocabMismatch {
            tokenizer: encoder.vocab_size(),
            model: vocab,
        });
    }
    let files = source::resolve(&cfg.data)?;
    let format = match cfg.format {
        Format::Auto => {
            let mut stream = RowStream::new(files.clone());
            let first = stream.next_row()?.ok_or_else(|| DataError::EmptyFile {
                path: files[0].path.clone(),
            })?;
            detect(&first.fields, &cfg.columns).ok_or_else(|| {
                let mut cols: Vec<&str> = first.fields.keys().map(String::as_str).collect();
                cols.sort();
                let why = match first.fields.get(&cfg.columns.chosen) {
                    None => format!("no column `{}`", cfg.columns.chosen),
                    Some(v) => format!(
                        "column `{}` is {}, expected a string, a list of messages or a list of token ids",
                        cfg.columns.chosen,
                        match v {
                            serde_json::Value::Null => "null",
                            serde_json::Value::Bool(_) => "a boolean",
                            serde_json::Value::Number(_) => "a number",
                            serde_json::Value::String(_) => "a string",
                            serde_json::Value::Array(_) => "an empty or mixed list",
                            serde_json::Value::Object(_) => "an object",
                        }
                    ),
                };
                PrepError::UnknownFormat {
                    at: format!("`{}` first row", files[0].path.display()),
                    why,
                    columns: cols.join(", "),
                }
            })?
        }
        f => f,
    };
    if matches!(format, Format::Chat) && !encoder.has_template() {
        return Err(DataError::NoChatTemplate.into());
    }
    let settings = json!({
        "edpo_version": EDPO_VERSION,
        "bundle_sha256": bundle.bundle_sha256,
        "params_sha256": bundle.manifest.files.get(&bundle.manifest.params_file).map(|f| f.sha256.clone()),
        "topk": topk,
        "format": format.name(),
        "columns": cfg.columns,
        "max_length": cfg.truncation.max_length,
        "max_prompt_length": cfg.truncation.max_prompt_length,
        "template_sha256": encoder.template_sha256(),
        "data": files.iter().map(|f| json!({"path": f.path, "bytes": f.bytes})).collect::<Vec<_>>(),
        "shard_size": cfg.shard_size,
        "batch_tokens": cfg.batch_tokens,
        "limit": cfg.limit,
    });
    let fingerprint = crate::bundle::sha256_hex(settings.to_string().as_bytes());
    Ok(Plan {
        bundle,
        files,
        format,
        encoder,
        topk,
        fingerprint,
        settings,
    })
}

/// Reads input rows shard by shard: parse, drop duplicates, tokenise; counts skips.
struct ShardReader<'a> {
    stream: RowStream,
    parser: RowParser<'a>,
    encoder: &'a Encoder,
    seen: HashSet<u64>,
    next_row: u64,
    limit: Option<u64>,
    shard_size: usize,
}

/// The usable pairs of one shard's input rows.
struct ShardInput {
    first_source_row: u64,
    rows_in: u64,
    pairs: Vec<TokenizedPair>,
    skipped: BTreeMap<String, u64>,
}

impl ShardReader<'_> {
    fn next_shard(&mut self, tokenize: bool) -> Result<Option<ShardInput>, PrepError> {
        let first = self.next_row;
        let mut inputs: Vec<PairInput> = Vec::new();
        let mut skipped: BTreeMap<String, u64> = BTreeMap::new();
        let mut rows_in = 0u64;
        while rows_in < self.shard_size as u64 {
            if self.limit.is_some_and(|l| self.next_row >= l) {
                break;
            }
            let Some(row) = self.stream.next_row()? else {
                break;
            };
            let path = self.stream.files()[row.file_index].path.clone();
            let outcome = self.parser.parse(&row, &path, self.next_row)?;
            self.next_row += 1;
            rows_in += 1;
            match outcome {
                RowOutcome::Skip(reason) => *skipped.entry(reason.name().into()).or_default() += 1,
                RowOutcome::Pair(pair) => {
                    if !self.seen.insert(pair.pair_id) {
                        *skipped
                            .entry(SkipReason::DuplicateId.name().into())
                            .or_default() += 1;
                    } else {
                        inputs.push(pair);
                    }
                }
            }
        }
        if rows_in == 0 {
            return Ok(None);
        }
        let mut pairs = Vec::new();
        if tokenize {
            for outcome in self.encoder.encode_all(&inputs)? {
                match outcome {
                    EncodeOutcome::Pair(p) => pairs.push(p),
                    EncodeOutcome::Skip(reason) => {
                        *skipped.entry(reason.name().into()).or_default() += 1
                    }
                }
            }
        }
        Ok(Some(ShardInput {
            first_source_row: first,
            rows_in,
            pairs,
            skipped,
        }))
    }
}

/// Scores the pairs of one shard with the reference graph.
fn score_pairs(
    graph: &mut ReferenceGraph,
    pairs: Vec<TokenizedPair>,
    k: usize,
    batch_tokens: usize,
    pad_id: u32,
) -> Result<(Vec<ScoredPair>, BatchStats), PrepError> {
    let seqs = pair_sequences(&pairs);
    let mut scored: Vec<ScoredPair> = pairs
        .into_iter()
        .map(|pair| ScoredPair {
            pair,
            ref_chosen_logps: 0.0,
            ref_rejected_logps: 0.0,
            ref_chosen_token_logps: Vec::new(),
            ref_rejected_token_logps: Vec::new(),
            ref_chosen_topk_ids: Vec::new(),
            ref_rejected_topk_ids: Vec::new(),
            ref_chosen_topk_logps: Vec::new(),
            ref_rejected_topk_logps: Vec::new(),
            k,
        })
        .collect();
    let stats = score_sequences(graph, &seqs, k, batch_tokens, pad_id, |si, out, row| {
        let target = &mut scored[si / 2];
        let range = target.pair.prompt_ids.len()..seqs[si].len();
        let token_logps: Vec<f32> = range.clone().map(|t| out.token_logps[[row, t]]).collect();
        let mut topk_ids = Vec::with_capacity(range.len() * k);
        let mut topk_logps = Vec::with_capacity(range.len() * k);
        for t in range {
            for j in 0..k {
                topk_ids.push(out.topk_ids[[row, t, j]] as u32);
                topk_logps.push(out.topk_logps[[row, t, j]]);
            }
        }
        let total = token_logps.iter().map(|&v| f64::from(v)).sum::<f64>() as f32;
        if si % 2 == 1 {
            target.ref_rejected_logps = total;
            target.ref_rejected_token_logps = token_logps;
            target.ref_rejected_topk_ids = topk_ids;
            target.ref_rejected_topk_logps = topk_logps;
        } else {
            target.ref_chosen_logps = total;
            target.ref_chosen_token_logps = token_logps;
            target.ref_chosen_topk_ids = topk_ids;
            target.ref_chosen_topk_logps = topk_logps;
        }
    })?;
    Ok((scored, stats))
}

fn check_writable(dir: &Path) -> Result<(), PrepError> {
    let unwritable = |message: String| PrepError::Unwritable {
        dir: dir.to_path_buf(),
        message,
    };
    std::fs::create_dir_all(dir).map_err(|e| unwritable(e.to_string()))?;
    let probe = dir.join(".edpo-write-probe");
    std::fs::write(&probe, b"ok").map_err(|e| unwritable(e.to_string()))?;
    std::fs::remove_file(&probe).map_err(|e| unwritable(e.to_string()))
}

/// What `--out` already holds.
enum Existing {
    /// Shards of this very run (same fingerprint), complete ones by index.
    Resumable(BTreeMap<usize, ShardStats>),
    /// Shards of another run or model: refused unless `--overwrite`, and deleted only after
    /// the new input was validated (a failed run must not lose what was there).
    Foreign { what: String, files: Vec<PathBuf> },
}

fn existing_shards(dir: &Path, plan: &Plan) -> Result<Existing, PrepError> {
    let manifest = ShardManifest::read(dir)?;
    let files = list_shards(dir)?;
    let foreign = match &manifest {
        Some(m) if m.fingerprint != plan.fingerprint => Some(format!(
            "bundle {} vs {}, settings fingerprint {} vs {}",
            short(&m.bundle_sha256),
            short(&plan.bundle.bundle_sha256),
            short(&m.fingerprint),
            short(&plan.fingerprint)
        )),
        None if !files.is_empty() => Some("shards without a manifest.json".to_string()),
        _ => None,
    };
    if let Some(what) = foreign {
        return Ok(Existing::Foreign { what, files });
    }
    let mut done = BTreeMap::new();
    for f in files {
        // A shard is complete when it was renamed into place; its own metadata says which
        // run and which input rows it holds.
        let Ok(meta) = read_metadata(&f) else {
            continue;
        };
        if meta.get("edpo.fingerprint") != Some(&plan.fingerprint) {
            continue;
        }
        if let Some(stats) = meta
            .get("edpo.shard")
            .and_then(|s| serde_json::from_str::<ShardStats>(s).ok())
        {
            done.insert(stats.index, stats);
        }
    }
    Ok(Existing::Resumable(done))
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// Runs prep end to end.
pub fn run(cfg: &PrepConfig) -> Result<PrepSummary, PrepError> {
    let started = Instant::now();
    let plan = plan(cfg)?;
    check_writable(&cfg.out)?;
    let existing = existing_shards(&cfg.out, &plan)?;
    let (done, replace) = match existing {
        Existing::Resumable(done) => (done, Vec::new()),
        Existing::Foreign { what, files } => {
            if !cfg.overwrite {
                return Err(PrepError::OtherSettings {
                    dir: cfg.out.clone(),
                    what,
                });
            }
            (BTreeMap::new(), files)
        }
    };
    let parser = RowParser {
        columns: &cfg.columns,
        format: plan.format,
        vocab_size: plan.bundle.manifest.vocab_size,
    };

    // Pass 1: read, parse and tokenise everything (no scoring) so that a bad row stops the
    // run before hours of scoring; also counts the pairs for the progress bar.
    let mut reader = ShardReader {
        stream: RowStream::new(plan.files.clone()),
        parser: RowParser { ..parser },
        encoder: &plan.encoder,
        seen: HashSet::new(),
        next_row: 0,
        limit: cfg.limit,
        shard_size: cfg.shard_size,
    };
    let mut total_pairs = 0u64;
    let mut total_shards = 0usize;
    while let Some(shard) = reader.next_shard(!done.contains_key(&total_shards))? {
        total_pairs += done
            .get(&total_shards)
            .map_or(shard.pairs.len() as u64, |s| s.pairs);
        total_shards += 1;
    }

    for f in &replace {
        std::fs::remove_file(f).map_err(|e| PrepError::Unwritable {
            dir: cfg.out.clone(),
            message: e.to_string(),
        })?;
    }

    let mut manifest = ShardManifest {
        edpo_version: EDPO_VERSION.into(),
        bundle_sha256: plan.bundle.bundle_sha256.clone(),
        fingerprint: plan.fingerprint.clone(),
        topk: plan.topk,
        settings: plan.settings.clone(),
        complete: false,
        shards: done.values().cloned().collect(),
    };
    manifest.write(&cfg.out)?;

    let mut graph: Option<ReferenceGraph> = None;
    let pad_id = plan
        .bundle
        .manifest
        .special_tokens
        .pad
        .id
        .or(plan.bundle.manifest.special_tokens.eos.id)
        .unwrap_or(0);
    let progress = Progress::new(total_pairs, "pairs", cfg.quiet);
    let mut reader = ShardReader {
        stream: RowStream::new(plan.files.clone()),
        parser,
        encoder: &plan.encoder,
        seen: HashSet::new(),
        next_row: 0,
        limit: cfg.limit,
        shard_size: cfg.shard_size,
    };
    let mut summary = PrepSummary {
        out: cfg.out.clone(),
        format: plan.format.name().into(),
        topk: plan.topk,
        ..PrepSummary::default()
    };
    let mut index = 0usize;
    let mut scored_now = (0u64, 0u64); // pairs, tokens scored in this process
    let scoring_started = Instant::now();
    while let Some(shard) = reader.next_shard(!done.contains_key(&index))? {
        let stats = if let Some(stats) = done.get(&index) {
            summary.shards_reused += 1;
            stats.clone()
        } else {
            let graph = match graph.as_mut() {
                Some(g) => g,
                None => graph.insert(ReferenceGraph::new(&plan.bundle, None, &cfg.session)?),
            };
            let n_pairs = shard.pairs.len() as u64;
            let (scored, batch_stats) =
                score_pairs(graph, shard.pairs, plan.topk, cfg.batch_tokens, pad_id)?;
            let response_tokens: u64 = scored
                .iter()
                .map(|p| (p.pair.chosen_ids.len() + p.pair.rejected_ids.len()) as u64)
                .sum();
            let stats = ShardStats {
                file: shard_file_name(index),
                index,
                first_source_row: shard.first_source_row,
                rows_in: shard.rows_in,
                pairs: n_pairs,
                skipped: shard.skipped,
                response_tokens,
                sequence_tokens: batch_stats.sequence_tokens,
                padded_tokens: batch_stats.padded_tokens,
            };
            let mut meta = BTreeMap::new();
            meta.insert("edpo.version".to_string(), EDPO_VERSION.to_string());
            meta.insert(
                "edpo.bundle_sha256".to_string(),
                plan.bundle.bundle_sha256.clone(),
            );
            meta.insert("edpo.fingerprint".to_string(), plan.fingerprint.clone());
            meta.insert("edpo.topk".to_string(), plan.topk.to_string());
            meta.insert(
                "edpo.template_sha256".to_string(),
                plan.encoder.template_sha256().unwrap_or("").to_string(),
            );
            meta.insert("edpo.settings".to_string(), plan.settings.to_string());
            meta.insert(
                "edpo.shard".to_string(),
                serde_json::to_string(&stats).expect("stats serialise"),
            );
            write_shard(&cfg.out.join(&stats.file), &scored, &meta)?;
            scored_now.0 += n_pairs;
            scored_now.1 += batch_stats.sequence_tokens;
            manifest.shards.retain(|s| s.index != index);
            manifest.shards.push(stats.clone());
            manifest.shards.sort_by_key(|s| s.index);
            manifest.write(&cfg.out)?;
            stats
        };
        progress.inc(stats.pairs);
        let secs = scoring_started.elapsed().as_secs_f64().max(1e-9);
        progress.set_message(format!(
            "{:.1} pairs/s, {:.0} tokens/s",
            scored_now.0 as f64 / secs,
            scored_now.1 as f64 / secs
        ));
        summary.rows_read += stats.rows_in;
        summary.pairs_written += stats.pairs;
        for (reason, n) in &stats.skipped {
            *summary.skipped.entry(reason.clone()).or_default() += n;
        }
        summary.response_tokens += stats.response_tokens;
        summary.sequence_tokens += stats.sequence_tokens;
        summary.padded_tokens += stats.padded_tokens;
        index += 1;
    }
    progress.finish();
    manifest.complete = true;
    manifest.write(&cfg.out)?;
    summary.shards = index;
    summary.padding_fraction = if summary.padded_tokens > 0 {
        1.0 - summary.sequence_tokens as f64 / summary.padded_tokens as f64
    } else {
        0.0
    };
    summary.wall_seconds = started.elapsed().as_secs_f64();
    let secs = scoring_started.elapsed().as_secs_f64().max(1e-9);
    summary.pairs_per_second = scored_now.0 as f64 / secs;
    summary.tokens_per_second = scored_now.1 as f64 / secs;
    Ok(summary)
}
