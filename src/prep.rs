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

use crate::batch::pair_of_row;
use crate::bundle::Bundle;
use crate::data::chat::ChatTemplate;
use crate::data::pairs::{detect, Columns, Format, RowOutcome, RowParser};
use crate::data::source::{self, RowStream, SourceFile};
use crate::data::tokenize::{EncodeOutcome, Encoder, ResponseEos, TokenizedPair, Truncation};
use crate::data::{DataError, PairInput, PromptMismatch, SkipReason};
use crate::graphs::ReferenceGraph;
use crate::output::Printable;
use crate::progress::Progress;
use crate::runtime::SessionConfig;
use crate::scoring::{score_pair_rows, BatchStats};
use crate::shards::{
    list_shards, shard_file_name, write_shard, ResponseScores, ScoredPair, ShardManifest,
    ShardMetadata, ShardStats,
};
use crate::Error;

pub const EDPO_VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, thiserror::Error)]
pub enum PrepError {
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

/// Checked prep settings.
#[derive(Debug, Clone)]
pub struct PrepConfig {
    pub model: PathBuf,
    pub data: Vec<PathBuf>,
    pub out: PathBuf,
    pub format: Format,
    pub columns: Columns,
    pub truncation: Truncation,
    /// Whether EOS ends every response (TRL 0.13's rule by default).
    pub response_eos: ResponseEos,
    /// What a row gets whose string prompt is not its conversations' last user turn.
    pub prompt_mismatch: PromptMismatch,
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

impl PrepSummary {
    /// Adds one shard's statistics.
    fn add(&mut self, stats: &ShardStats) {
        self.rows_read += stats.rows_in;
        self.pairs_written += stats.pairs;
        for (reason, n) in &stats.skipped {
            *self.skipped.entry(reason.clone()).or_default() += n;
        }
        self.response_tokens += stats.response_tokens;
        self.sequence_tokens += stats.sequence_tokens;
        self.padded_tokens += stats.padded_tokens;
    }
}

impl Printable for PrepSummary {
    fn to_table(&self) -> String {
        let mut s = format!(
            "prep: {} pairs written to {} ({} shards, {} reused)\n  format {}, top-K {}, rows read {}\n",
            self.pairs_written,
            self.out.display(),
            self.shards,
            self.shards_reused,
            self.format,
            self.topk,
            self.rows_read
        );
        if self.skipped.is_empty() {
            s.push_str("  skipped: none\n");
        }
        for (reason, n) in &self.skipped {
            let why = SkipReason::from_name(reason)
                .map(|r| r.describe())
                .unwrap_or("");
            s.push_str(&format!("  skipped {n:>6} {reason}: {why}\n"));
        }
        s.push_str(&format!(
            "  tokens scored {} (response tokens {}), padding {:.1}%\n  wall {:.1}s, {:.1} pairs/s, {:.0} tokens/s\n",
            self.sequence_tokens,
            self.response_tokens,
            100.0 * self.padding_fraction,
            self.wall_seconds,
            self.pairs_per_second,
            self.tokens_per_second
        ));
        s
    }
}

/// Everything fixed before the first row is read.
struct Plan {
    bundle: Bundle,
    files: Vec<SourceFile>,
    format: Format,
    encoder: Encoder,
    topk: usize,
    pad_id: u32,
    fingerprint: String,
    settings: serde_json::Value,
}

fn check_flags(cfg: &PrepConfig) -> Result<(), PrepError> {
    let flag = |flag, message: &str| {
        Err(PrepError::Flag {
            flag,
            message: message.to_string(),
        })
    };
    if cfg.shard_size == 0 {
        return flag("--shard-size", "must be at least 1");
    }
    if cfg.batch_tokens < 2 {
        return flag("--batch-tokens", "must be at least 2");
    }
    if cfg.truncation.max_length == Some(0) || cfg.truncation.max_length == Some(1) {
        return flag(
            "--max-length",
            "must be at least 2 (one prompt and one response token)",
        );
    }
    if cfg.truncation.max_prompt_length == Some(0) {
        return flag("--max-prompt-length", "must be at least 1");
    }
    Ok(())
}

/// The tokenizer (and chat template) of the bundle, checked against its vocabulary.
fn open_encoder(
    bundle: &Bundle,
    truncation: Truncation,
    response_eos: ResponseEos,
) -> Result<Encoder, Error> {
    let template = ChatTemplate::from_tokenizer_config(&bundle.path("tokenizer_config.json"))?;
    let special = &bundle.manifest.special_tokens;
    let encoder = Encoder::new(
        &bundle.path("tokenizer.json"),
        template,
        special.eos.id,
        special.bos.id,
        truncation,
        response_eos,
    )?;
    let vocab = bundle.manifest.vocab_size;
    if encoder.vocab_size() > vocab {
        return Err(PrepError::VocabMismatch {
            tokenizer: encoder.vocab_size(),
            model: vocab,
        }
        .into());
    }
    Ok(encoder)
}

fn value_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an empty or mixed list",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The data format: as given, or detected from the first row.
fn detect_format(files: &[SourceFile], cfg: &PrepConfig) -> Result<Format, Error> {
    if cfg.format != Format::Auto {
        return Ok(cfg.format);
    }
    let mut stream = RowStream::new(files.to_vec());
    let first = stream.next_row()?.ok_or_else(|| DataError::EmptyFile {
        path: files[0].path.clone(),
    })?;
    if let Some(format) = detect(&first.fields, &cfg.columns) {
        return Ok(format);
    }
    let mut cols: Vec<&str> = first.fields.keys().map(String::as_str).collect();
    cols.sort();
    let chosen = &cfg.columns.chosen;
    let why = match first.fields.get(chosen) {
        None => format!("no column `{chosen}`"),
        Some(v) => format!(
            "column `{chosen}` is {}, expected a string, a list of messages or a list of token ids",
            value_kind(v)
        ),
    };
    Err(PrepError::UnknownFormat {
        at: format!("`{}` first row", files[0].path.display()),
        why,
        columns: cols.join(", "),
    }
    .into())
}

fn plan(cfg: &PrepConfig) -> Result<Plan, Error> {
    check_flags(cfg)?;
    let bundle = Bundle::open(&cfg.model)?;
    let vocab = bundle.manifest.vocab_size;
    let topk = cfg.topk.unwrap_or(bundle.manifest.topk_default);
    if topk == 0 || topk > vocab {
        return Err(PrepError::Flag {
            flag: "--topk",
            message: format!("K = {topk} must be between 1 and the vocabulary size {vocab}"),
        }
        .into());
    }
    let encoder = open_encoder(&bundle, cfg.truncation, cfg.response_eos)?;
    let files = source::resolve(&cfg.data)?;
    let format = detect_format(&files, cfg)?;
    if matches!(format, Format::Chat) && !encoder.has_template() {
        return Err(DataError::NoChatTemplate.into());
    }
    let settings = json!({
        "edpo_version": EDPO_VERSION,
        "reference_sha256": bundle.reference_sha256,
        "topk": topk,
        "format": format.name(),
        "columns": cfg.columns,
        "max_length": cfg.truncation.max_length,
        "max_prompt_length": cfg.truncation.max_prompt_length,
        "response_eos": cfg.response_eos,
        "prompt_mismatch": cfg.prompt_mismatch,
        "template_sha256": encoder.template_sha256(),
        "data": files.iter().map(|f| json!({"path": f.path, "bytes": f.bytes})).collect::<Vec<_>>(),
        "shard_size": cfg.shard_size,
        "batch_tokens": cfg.batch_tokens,
        "limit": cfg.limit,
    });
    let fingerprint = crate::bundle::sha256_hex(settings.to_string().as_bytes());
    Ok(Plan {
        pad_id: bundle.manifest.special_tokens.pad_id(),
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
    fn next_shard(&mut self, tokenize: bool) -> Result<Option<ShardInput>, Error> {
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
    topk: usize,
    batch_tokens: usize,
    pad_id: u32,
) -> Result<(Vec<ScoredPair>, BatchStats), Error> {
    let n = pairs.len();
    let refs: Vec<&TokenizedPair> = pairs.iter().collect();
    let mut rows: Vec<ResponseScores> = vec![ResponseScores::default(); 2 * n];
    let stats = score_pair_rows(graph, &refs, topk, batch_tokens, pad_id, |row, out, r| {
        let (index, side) = pair_of_row(row, n);
        let start = refs[index].prompt_ids.len();
        let end = start + refs[index].response(side).len();
        let token_logps: Vec<f32> = (start..end).map(|t| out.token_logps[[r, t]]).collect();
        let mut topk_ids = Vec::with_capacity((end - start) * topk);
        let mut topk_logps = Vec::with_capacity((end - start) * topk);
        for t in start..end {
            for j in 0..topk {
                topk_ids.push(out.topk_ids[[r, t, j]] as u32);
                topk_logps.push(out.topk_logps[[r, t, j]]);
            }
        }
        rows[row] = ResponseScores {
            logps: token_logps.iter().map(|&v| f64::from(v)).sum::<f64>() as f32,
            token_logps,
            topk_ids,
            topk_logps,
        };
    })?;
    let rejected = rows.split_off(n);
    let scored = pairs
        .into_iter()
        .zip(rows.into_iter().zip(rejected))
        .map(|(pair, (chosen, rejected))| ScoredPair {
            pair,
            topk,
            chosen,
            rejected,
        })
        .collect();
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

fn existing_shards(dir: &Path, plan: &Plan) -> Result<Existing, Error> {
    let manifest = ShardManifest::read(dir)?;
    let files = list_shards(dir)?;
    let foreign = match &manifest {
        Some(m) if m.fingerprint != plan.fingerprint => Some(format!(
            "reference {} vs {}, settings fingerprint {} vs {}",
            short(&m.reference_sha256),
            short(&plan.bundle.reference_sha256),
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
        let Ok(meta) = ShardMetadata::read(&f) else {
            continue;
        };
        if meta.fingerprint == plan.fingerprint {
            done.insert(meta.shard.index, meta.shard);
        }
    }
    Ok(Existing::Resumable(done))
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// The shards of this run already complete in `--out`, and the foreign files `--overwrite`
/// will replace (refused without it).
fn claim_output(
    cfg: &PrepConfig,
    plan: &Plan,
) -> Result<(BTreeMap<usize, ShardStats>, Vec<PathBuf>), Error> {
    check_writable(&cfg.out)?;
    match existing_shards(&cfg.out, plan)? {
        Existing::Resumable(done) => Ok((done, Vec::new())),
        Existing::Foreign { what, .. } if !cfg.overwrite => Err(PrepError::OtherSettings {
            dir: cfg.out.clone(),
            what,
        }
        .into()),
        Existing::Foreign { files, .. } => Ok((BTreeMap::new(), files)),
    }
}

impl Plan {
    /// A reader of the input, shard by shard, from the first row.
    fn reader<'a>(&'a self, cfg: &'a PrepConfig) -> ShardReader<'a> {
        ShardReader {
            stream: RowStream::new(self.files.clone()),
            parser: RowParser {
                columns: &cfg.columns,
                format: self.format,
                vocab_size: self.bundle.manifest.vocab_size,
                prompt_mismatch: cfg.prompt_mismatch,
            },
            encoder: &self.encoder,
            seen: HashSet::new(),
            next_row: 0,
            limit: cfg.limit,
            shard_size: cfg.shard_size,
        }
    }

    /// The metadata of a shard of this run.
    fn shard_metadata(&self, stats: &ShardStats) -> ShardMetadata {
        ShardMetadata {
            version: EDPO_VERSION.to_string(),
            bundle_sha256: self.bundle.bundle_sha256.clone(),
            reference_sha256: self.bundle.reference_sha256.clone(),
            fingerprint: self.fingerprint.clone(),
            topk: self.topk,
            template_sha256: self.encoder.template_sha256().unwrap_or("").to_string(),
            settings: self.settings.clone(),
            shard: stats.clone(),
        }
    }
}

/// Pass 1: reads, parses and tokenises every shard not done yet (no scoring), so that a bad
/// row stops the run before hours of scoring; returns the number of pairs, for progress.
fn count_pairs(
    cfg: &PrepConfig,
    plan: &Plan,
    done: &BTreeMap<usize, ShardStats>,
) -> Result<u64, Error> {
    let mut reader = plan.reader(cfg);
    let (mut pairs, mut index) = (0u64, 0usize);
    while let Some(shard) = reader.next_shard(!done.contains_key(&index))? {
        pairs += done
            .get(&index)
            .map_or(shard.pairs.len() as u64, |s| s.pairs);
        index += 1;
    }
    Ok(pairs)
}

/// Scores one shard's pairs and writes its file and the updated manifest.
fn write_scored_shard(
    cfg: &PrepConfig,
    plan: &Plan,
    graph: &mut ReferenceGraph,
    index: usize,
    shard: ShardInput,
    manifest: &mut ShardManifest,
) -> Result<ShardStats, Error> {
    let n_pairs = shard.pairs.len() as u64;
    let (scored, batch_stats) =
        score_pairs(graph, shard.pairs, plan.topk, cfg.batch_tokens, plan.pad_id)?;
    let stats = ShardStats {
        file: shard_file_name(index),
        index,
        first_source_row: shard.first_source_row,
        rows_in: shard.rows_in,
        pairs: n_pairs,
        skipped: shard.skipped,
        response_tokens: scored
            .iter()
            .map(|p| (p.pair.chosen_ids.len() + p.pair.rejected_ids.len()) as u64)
            .sum(),
        sequence_tokens: batch_stats.sequence_tokens,
        padded_tokens: batch_stats.padded_tokens,
    };
    write_shard(
        &cfg.out.join(&stats.file),
        &scored,
        &plan.shard_metadata(&stats),
    )?;
    crate::crash::point("prep.shard-written");
    manifest.shards.retain(|s| s.index != index);
    manifest.shards.push(stats.clone());
    manifest.shards.sort_by_key(|s| s.index);
    manifest.write(&cfg.out)?;
    Ok(stats)
}

/// Runs prep end to end.
pub fn run(cfg: &PrepConfig) -> Result<PrepSummary, Error> {
    let started = Instant::now();
    let plan = plan(cfg)?;
    let (done, replace) = claim_output(cfg, &plan)?;
    let total_pairs = count_pairs(cfg, &plan, &done)?;
    for f in &replace {
        std::fs::remove_file(f).map_err(|e| PrepError::Unwritable {
            dir: cfg.out.clone(),
            message: e.to_string(),
        })?;
    }
    let mut manifest = ShardManifest {
        edpo_version: EDPO_VERSION.into(),
        bundle_sha256: plan.bundle.bundle_sha256.clone(),
        reference_sha256: plan.bundle.reference_sha256.clone(),
        fingerprint: plan.fingerprint.clone(),
        topk: plan.topk,
        settings: plan.settings.clone(),
        complete: false,
        shards: done.values().cloned().collect(),
    };
    manifest.write(&cfg.out)?;

    let mut graph: Option<ReferenceGraph> = None;
    let progress = Progress::new(total_pairs, "pairs", cfg.quiet);
    let mut reader = plan.reader(cfg);
    let mut summary = PrepSummary {
        out: cfg.out.clone(),
        format: plan.format.name().into(),
        topk: plan.topk,
        ..PrepSummary::default()
    };
    let (mut index, mut scored_pairs, mut scored_tokens) = (0usize, 0u64, 0u64);
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
            let stats = write_scored_shard(cfg, &plan, graph, index, shard, &mut manifest)?;
            scored_pairs += stats.pairs;
            scored_tokens += stats.sequence_tokens;
            stats
        };
        progress.inc(stats.pairs);
        let secs = scoring_started.elapsed().as_secs_f64().max(1e-9);
        progress.set_message(format!(
            "{:.1} pairs/s, {:.0} tokens/s",
            scored_pairs as f64 / secs,
            scored_tokens as f64 / secs
        ));
        summary.add(&stats);
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
    summary.pairs_per_second = scored_pairs as f64 / secs;
    summary.tokens_per_second = scored_tokens as f64 / secs;
    Ok(summary)
}
