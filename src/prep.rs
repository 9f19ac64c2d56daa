//! The prep stage: read preference data, tokenise it, score every pair once with the reference
//! graph and write resumable Parquet shards (architecture.md, issue "edpo prep").
//!
//! Determinism is what makes resume safe: shard i always holds the usable pairs among input
//! rows [i·S, (i+1)·S) (S = `shard_size`), scored in the same batches, so a rerun after a
//! crash rewrites only missing shards and produces exactly the pairs of an uninterrupted run.
//! It also lets many processes share the work (`worker`): worker I of N scores shards
//! i ≡ I (mod N), reading only their rows (`duplicates` keeps the duplicate-id rule whole), and
//! the complete manifest is written by whichever finds every shard in place (`output`).

mod duplicates;
mod output;
pub mod worker;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
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
    shard_file_name, write_shard, ResponseScores, ScoredPair, ShardManifest, ShardMetadata,
    ShardStats,
};
use crate::stages::StageTimes;
use crate::Error;
use duplicates::EarlierPairs;
pub use worker::Worker;

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
    #[error("`--finalize`: `{dir}` lacks shards {missing} of {total}; run the workers that score them again (shard i is worker i mod N's), or the same command without `--finalize` to score them here")]
    Incomplete {
        dir: PathBuf,
        missing: String,
        total: usize,
    },
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
    /// Which shards this process scores (all of them: [`Worker::ALONE`]).
    pub worker: Worker,
    /// Where `worker` came from (a flag, Slurm or Kubernetes variables), for the summary.
    pub worker_from: String,
    /// Only write the complete manifest (every shard must be in place); score nothing.
    pub finalize: bool,
}

/// Where a prep process's time went before scoring, in seconds: reaching its first row, the
/// duplicate-id pass (its own rows' ids, then the other rows' before them), validating its rows.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct InputTimes {
    pub first_row_s: f64,
    pub duplicate_pass_s: f64,
    pub validate_s: f64,
    /// Rows outside this process's shards whose pair ids were read.
    pub id_rows_scanned: u64,
    /// Of those, rows read in full because a row of its own repeats their id.
    pub id_candidates: u64,
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
    /// Of `sequence_tokens`, those of prefixes a pair's two rows ran once.
    pub shared_tokens: u64,
    /// Padding's share of the tokens the scoring graph ran.
    pub padding_fraction: f64,
    pub wall_seconds: f64,
    pub pairs_per_second: f64,
    pub tokens_per_second: f64,
    /// This process's part, `I/N` (`0/1`: one process, every shard).
    pub worker: String,
    pub worker_from: String,
    /// Shards of the whole input, and whether every one is in place (manifest complete).
    pub shards_total: usize,
    pub complete: bool,
    pub input: InputTimes,
    /// Wall seconds of the scoring pass by stage: reading and tokenising rows
    /// (`read_tokenize`), building the session (`session`), inside ONNX Runtime (`graph_run`),
    /// padding batches and copying outputs out (`batch_and_unpack`), writing shards (`parquet`).
    pub stages: StageTimes,
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
        self.shared_tokens += stats.shared_tokens;
    }
}

impl PrepSummary {
    /// What a worker did and whether the output is complete.
    fn worker_line(&self) -> String {
        let done = if self.complete {
            format!(
                "all {} shards in place, manifest.json complete",
                self.shards_total
            )
        } else {
            "other shards still missing: the worker that completes the last one writes manifest.json (or run the same command with `--finalize`)".to_string()
        };
        format!(
            "  worker {} ({}): {} of {} shards; {done}\n",
            self.worker, self.worker_from, self.shards, self.shards_total
        )
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
        if self.worker != "0/1" {
            s.push_str(&self.worker_line());
        }
        let shared = if self.shared_tokens > 0 {
            format!(
                "; {} in prefixes run once for both rows of a pair",
                self.shared_tokens
            )
        } else {
            String::new()
        };
        s.push_str(&format!(
            "  tokens scored {} (response tokens {}{shared}), padding {:.1}%\n  wall {:.1}s, {:.1} pairs/s, {:.0} tokens/s\n",
            self.sequence_tokens,
            self.response_tokens,
            100.0 * self.padding_fraction,
            self.wall_seconds,
            self.pairs_per_second,
            self.tokens_per_second
        ));
        if self.shards > self.shards_reused {
            s.push_str(&format!(
                "  time: {}\n",
                self.stages.line(self.wall_seconds)
            ));
        }
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

/// How the rows of one shard are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    /// Skipped without parsing: another worker's shard, or one complete already.
    Skip,
    /// Parsed (pair ids and skips), not tokenised.
    Parse,
    /// Parsed and tokenised.
    Tokenize,
}

/// Reads input rows shard by shard: parse, drop duplicates, tokenise; counts skips.
struct ShardReader<'a> {
    stream: RowStream,
    parser: RowParser<'a>,
    encoder: &'a Encoder,
    /// Pair ids of the rows read so far that parsed into pairs.
    seen: HashSet<u64>,
    /// The pairs among the rows not read (complete shards, other workers') that rows read
    /// would repeat.
    earlier: &'a EarlierPairs,
    next_row: u64,
    next_index: usize,
    limit: Option<u64>,
    shard_size: usize,
    /// When the first row of a shard read (not skipped) was parsed.
    first_row_at: Option<Instant>,
}

/// One shard's input rows: counted only (skipped), or read into its usable pairs.
struct ShardInput {
    index: usize,
    first_source_row: u64,
    rows_in: u64,
    read: bool,
    pairs: Vec<TokenizedPair>,
    /// (input row, pair id) of every row that parsed into a pair, duplicates included.
    ids: Vec<(u64, u64)>,
    skipped: BTreeMap<String, u64>,
}

fn count_skip(skipped: &mut BTreeMap<String, u64>, reason: SkipReason) {
    *skipped.entry(reason.name().into()).or_default() += 1;
}

impl ShardReader<'_> {
    /// The next shard, read as `how` says for its index (None after the last input row).
    fn next_shard(&mut self, how: impl Fn(usize) -> Read) -> Result<Option<ShardInput>, Error> {
        let index = self.next_index;
        let first = self.next_row;
        let size = self.shard_size as u64;
        let want = self
            .limit
            .map_or(size, |l| l.saturating_sub(first).min(size));
        if want == 0 {
            return Ok(None);
        }
        let mode = how(index);
        let mut shard = ShardInput {
            index,
            first_source_row: first,
            rows_in: 0,
            read: mode != Read::Skip,
            pairs: Vec::new(),
            ids: Vec::new(),
            skipped: BTreeMap::new(),
        };
        if mode == Read::Skip {
            shard.rows_in = self.stream.skip_rows(want)?;
        } else {
            // Decode a Parquet file for this shard's rows only when the next shard is skipped.
            let window = (how(index + 1) == Read::Skip).then_some(want);
            self.stream.set_window(window);
            let inputs = self.read_rows(want, &mut shard)?;
            if mode == Read::Tokenize {
                self.tokenize(&inputs, &mut shard)?;
            }
        }
        if shard.rows_in == 0 {
            return Ok(None);
        }
        self.next_row += shard.rows_in;
        self.next_index += 1;
        Ok(Some(shard))
    }

    /// Parses up to `want` rows into `shard`; returns the pairs left after the duplicate rule.
    fn read_rows(&mut self, want: u64, shard: &mut ShardInput) -> Result<Vec<PairInput>, Error> {
        let mut inputs = Vec::new();
        while shard.rows_in < want {
            let Some(row) = self.stream.next_row()? else {
                break;
            };
            self.first_row_at.get_or_insert_with(Instant::now);
            let source_row = shard.first_source_row + shard.rows_in;
            let path = self.stream.files()[row.file_index].path.clone();
            let outcome = self.parser.parse(&row, &path, source_row)?;
            shard.rows_in += 1;
            match outcome {
                RowOutcome::Skip(reason) => count_skip(&mut shard.skipped, reason),
                RowOutcome::Pair(pair) => {
                    shard.ids.push((source_row, pair.pair_id));
                    let fresh = self.seen.insert(pair.pair_id);
                    if fresh && !self.earlier.repeats(pair.pair_id, source_row) {
                        inputs.push(pair);
                    } else {
                        count_skip(&mut shard.skipped, SkipReason::DuplicateId);
                    }
                }
            }
        }
        Ok(inputs)
    }

    fn tokenize(&self, inputs: &[PairInput], shard: &mut ShardInput) -> Result<(), Error> {
        for outcome in self.encoder.encode_all(inputs)? {
            match outcome {
                EncodeOutcome::Pair(p) => shard.pairs.push(p),
                EncodeOutcome::Skip(reason) => count_skip(&mut shard.skipped, reason),
            }
        }
        Ok(())
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

impl Plan {
    /// A reader of the input, shard by shard, from the first row.
    fn reader<'a>(&'a self, cfg: &'a PrepConfig, earlier: &'a EarlierPairs) -> ShardReader<'a> {
        ShardReader {
            stream: RowStream::new(self.files.clone()),
            parser: self.parser(cfg),
            encoder: &self.encoder,
            seen: HashSet::new(),
            earlier,
            next_row: 0,
            next_index: 0,
            limit: cfg.limit,
            shard_size: cfg.shard_size,
            first_row_at: None,
        }
    }

    fn parser<'a>(&'a self, cfg: &'a PrepConfig) -> RowParser<'a> {
        RowParser {
            columns: &cfg.columns,
            format: self.format,
            vocab_size: self.bundle.manifest.vocab_size,
            prompt_mismatch: cfg.prompt_mismatch,
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

/// The shards this process scores: its worker's, less those complete already.
struct Work {
    worker: Worker,
    done: BTreeMap<usize, ShardStats>,
}

impl Work {
    fn scores(&self, index: usize) -> bool {
        self.worker.owns(index) && !self.done.contains_key(&index)
    }

    /// Shards scored here are read `mode`, the others skipped.
    fn read(&self, mode: Read) -> impl Fn(usize) -> Read + '_ {
        move |index| if self.scores(index) { mode } else { Read::Skip }
    }
}

/// Peak resident memory of this process so far, in MB (0 where unknown).
fn peak_rss_mb() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct we own; zeroed is a valid rusage.
    let ok = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } == 0;
    if !ok {
        return 0.0;
    }
    // SAFETY: initialised above (zeroed, then filled by getrusage).
    unsafe { usage.assume_init() }.ru_maxrss as f64 / 1024.0
}

/// The duplicate-id rule's part outside the rows scored here: the rows of the shards scored
/// here are parsed for their pair ids, then the other rows before them are scanned for theirs
/// (nothing to do when this process scores every shard from the first).
fn duplicate_pass(
    cfg: &PrepConfig,
    plan: &Plan,
    work: &Work,
    times: &mut InputTimes,
) -> Result<EarlierPairs, Error> {
    if !cfg.worker.shared() && work.done.is_empty() {
        return Ok(EarlierPairs::default());
    }
    let started = Instant::now();
    let none = EarlierPairs::default();
    let mut reader = plan.reader(cfg, &none);
    let (mut own, mut own_ids) = (Vec::new(), Vec::new());
    while let Some(shard) = reader.next_shard(work.read(Read::Parse))? {
        if shard.read {
            own.push(shard.first_source_row..shard.first_source_row + shard.rows_in);
            own_ids.extend(shard.ids);
        }
    }
    times.first_row_s = reader
        .first_row_at
        .map_or(0.0, |t| t.duration_since(started).as_secs_f64());
    let pass = duplicates::earlier_pairs(&plan.files, &plan.parser(cfg), &own, &own_ids)?;
    times.duplicate_pass_s = started.elapsed().as_secs_f64();
    times.id_rows_scanned = pass.rows_scanned;
    times.id_candidates = pass.candidates;
    tracing::info!(
        worker = %cfg.worker,
        first_row_s = times.first_row_s,
        own_rows_s = times.duplicate_pass_s - pass.seconds,
        id_scan_s = pass.seconds,
        rows_scanned = pass.rows_scanned,
        candidates = pass.candidates,
        peak_rss_mb = peak_rss_mb(),
        "duplicate-id pass done"
    );
    Ok(pass.earlier)
}

/// Pass 1: reads, parses and tokenises the shards scored here (no scoring), so that a bad row
/// stops the run before hours of scoring; returns this worker's pairs (for progress) and the
/// number of shards of the whole input.
fn count_pairs(
    cfg: &PrepConfig,
    plan: &Plan,
    work: &Work,
    earlier: &EarlierPairs,
    times: &mut InputTimes,
) -> Result<(u64, usize), Error> {
    let started = Instant::now();
    let mut reader = plan.reader(cfg, earlier);
    let (mut pairs, mut shards) = (0u64, 0usize);
    while let Some(shard) = reader.next_shard(work.read(Read::Tokenize))? {
        pairs += match work.done.get(&shard.index) {
            Some(stats) if cfg.worker.owns(shard.index) => stats.pairs,
            _ => shard.pairs.len() as u64,
        };
        shards += 1;
    }
    if times.first_row_s == 0.0 {
        times.first_row_s = reader
            .first_row_at
            .map_or(0.0, |t| t.duration_since(started).as_secs_f64());
    }
    times.validate_s = started.elapsed().as_secs_f64();
    tracing::info!(
        worker = %cfg.worker,
        validate_s = times.validate_s,
        shards,
        peak_rss_mb = peak_rss_mb(),
        "rows validated"
    );
    Ok((pairs, shards))
}

/// Scores one shard's pairs and writes its file (and, one process alone, the updated manifest).
fn write_scored_shard(
    cfg: &PrepConfig,
    plan: &Plan,
    graph: &mut ReferenceGraph,
    shard: ShardInput,
    manifest: Option<&mut ShardManifest>,
    times: &mut StageTimes,
) -> Result<ShardStats, Error> {
    let n_pairs = shard.pairs.len() as u64;
    let graph_before = graph.run_seconds();
    let (scored, batch_stats) = times.time("batch_and_unpack", || {
        score_pairs(graph, shard.pairs, plan.topk, cfg.batch_tokens, plan.pad_id)
    })?;
    times.split(
        "batch_and_unpack",
        "graph_run",
        graph.run_seconds() - graph_before,
    );
    let stats = ShardStats {
        file: shard_file_name(shard.index),
        index: shard.index,
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
        shared_tokens: batch_stats.shared_tokens,
    };
    times.time("parquet", || {
        write_shard(
            &cfg.out.join(&stats.file),
            &scored,
            &plan.shard_metadata(&stats),
        )
    })?;
    crate::crash::point("prep.shard-written");
    if let Some(manifest) = manifest {
        manifest.shards.retain(|s| s.index != stats.index);
        manifest.shards.push(stats.clone());
        manifest.shards.sort_by_key(|s| s.index);
        times.time("parquet", || manifest.write(&cfg.out))?;
    }
    Ok(stats)
}

/// Pass 2: scores the shards of this process and writes them; counts this worker's shards
/// complete already as reused.
fn score_shards(
    cfg: &PrepConfig,
    plan: &Plan,
    work: &Work,
    earlier: &EarlierPairs,
    total_pairs: u64,
    mut manifest: Option<&mut ShardManifest>,
) -> Result<PrepSummary, Error> {
    let mut graph: Option<ReferenceGraph> = None;
    let progress = Progress::new(total_pairs, "pairs", cfg.quiet);
    let mut reader = plan.reader(cfg, earlier);
    let mut summary = PrepSummary {
        out: cfg.out.clone(),
        format: plan.format.name().into(),
        topk: plan.topk,
        worker: cfg.worker.to_string(),
        ..PrepSummary::default()
    };
    let (mut scored_pairs, mut scored_tokens) = (0u64, 0u64);
    let scoring_started = Instant::now();
    let mut times = StageTimes::default();
    while let Some(shard) = times.time("read_tokenize", || {
        reader.next_shard(work.read(Read::Tokenize))
    })? {
        let stats = if shard.read {
            let graph = match graph.as_mut() {
                Some(g) => g,
                None => graph.insert(times.time("session", || {
                    ReferenceGraph::new(&plan.bundle, None, &cfg.session)
                })?),
            };
            let stats =
                write_scored_shard(cfg, plan, graph, shard, manifest.as_deref_mut(), &mut times)?;
            scored_pairs += stats.pairs;
            scored_tokens += stats.sequence_tokens;
            stats
        } else if let Some(stats) = work
            .done
            .get(&shard.index)
            .filter(|_| cfg.worker.owns(shard.index))
        {
            summary.shards_reused += 1;
            stats.clone()
        } else {
            continue; // another worker's
        };
        progress.inc(stats.pairs);
        let secs = scoring_started.elapsed().as_secs_f64().max(1e-9);
        progress.set_message(format!(
            "{:.1} pairs/s, {:.0} tokens/s",
            scored_pairs as f64 / secs,
            scored_tokens as f64 / secs
        ));
        summary.add(&stats);
        summary.shards += 1;
    }
    progress.finish();
    let secs = scoring_started.elapsed().as_secs_f64().max(1e-9);
    summary.pairs_per_second = scored_pairs as f64 / secs;
    summary.tokens_per_second = scored_tokens as f64 / secs;
    summary.stages = times;
    Ok(summary)
}

/// The number of shards of the whole input (its rows counted, not read).
fn count_shards(cfg: &PrepConfig, plan: &Plan) -> Result<usize, Error> {
    let none = EarlierPairs::default();
    let mut reader = plan.reader(cfg, &none);
    let mut shards = 0;
    while reader.next_shard(|_| Read::Skip)?.is_some() {
        shards += 1;
    }
    Ok(shards)
}

/// `--finalize`: writes the complete manifest when every shard is in place, else says which
/// are missing.
fn finalize_only(cfg: &PrepConfig, plan: &Plan) -> Result<PrepSummary, Error> {
    output::check_same_run(cfg, plan)?;
    let total = count_shards(cfg, plan)?;
    let manifest =
        output::finalize(cfg, plan, total)?.map_err(|missing| PrepError::Incomplete {
            dir: cfg.out.clone(),
            missing: ranges_text(&missing),
            total,
        })?;
    let mut summary = PrepSummary {
        out: cfg.out.clone(),
        format: plan.format.name().into(),
        topk: plan.topk,
        worker: "finalize".into(),
        shards: total,
        shards_reused: total,
        shards_total: total,
        complete: true,
        ..PrepSummary::default()
    };
    for stats in &manifest.shards {
        summary.add(stats);
    }
    Ok(summary)
}

/// Shard indices as short text: "3, 7-9, 12".
fn ranges_text(indices: &[usize]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < indices.len() {
        let mut j = i;
        while j + 1 < indices.len() && indices[j + 1] == indices[j] + 1 {
            j += 1;
        }
        parts.push(if j > i {
            format!("{}-{}", indices[i], indices[j])
        } else {
            indices[i].to_string()
        });
        i = j + 1;
    }
    parts.join(", ")
}

/// Runs prep end to end: this process's shards (all of them, or its worker's), then the
/// complete manifest if every shard is in place.
pub fn run(cfg: &PrepConfig) -> Result<PrepSummary, Error> {
    let started = Instant::now();
    let plan = plan(cfg)?;
    if cfg.finalize {
        let mut summary = finalize_only(cfg, &plan)?;
        summary.wall_seconds = started.elapsed().as_secs_f64();
        return Ok(summary);
    }
    let (done, replace) = output::claim_output(cfg, &plan)?;
    let work = Work {
        worker: cfg.worker,
        done,
    };
    let mut times = InputTimes::default();
    let earlier = duplicate_pass(cfg, &plan, &work, &mut times)?;
    let (total_pairs, total_shards) = count_pairs(cfg, &plan, &work, &earlier, &mut times)?;
    output::remove_replaced(cfg, &plan, &replace)?;
    // One process keeps the manifest up to date as it goes; workers leave it alone.
    let mut manifest = if cfg.worker.shared() {
        output::ensure_manifest(cfg, &plan, &work.done)?;
        None
    } else {
        let m = output::manifest(&plan, work.done.values().cloned().collect(), false);
        m.write(&cfg.out)?;
        Some(m)
    };
    let mut summary = score_shards(cfg, &plan, &work, &earlier, total_pairs, manifest.as_mut())?;
    summary.complete = match manifest {
        Some(mut m) => {
            m.complete = true;
            m.write(&cfg.out)?;
            true
        }
        None => output::finalize(cfg, &plan, total_shards)?.is_ok(),
    };
    summary.shards_total = total_shards;
    summary.worker_from = cfg.worker_from.clone();
    summary.input = times;
    summary.padding_fraction = if summary.padded_tokens > 0 {
        1.0 - (summary.sequence_tokens - summary.shared_tokens) as f64
            / summary.padded_tokens as f64
    } else {
        0.0
    };
    summary.wall_seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}
