//! `edpo inspect`: schema, row count, per-column statistics and prep settings of a shards
//! folder or any Parquet file, computed with polars.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use polars::prelude::*;
use serde::Serialize;

use crate::output::Printable;
use crate::shards::metadata::keys;
use crate::shards::{list_shards, ShardManifest};
use crate::table::read_metadata;

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("`{0}` does not exist")]
    NotFound(PathBuf),
    #[error("`{0}` has no Parquet files to inspect")]
    Empty(PathBuf),
    #[error("cannot read `{path}` as Parquet: {message}")]
    Read { path: PathBuf, message: String },
}

/// Statistics of one column.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ColumnStats {
    pub name: String,
    pub dtype: String,
    /// For list columns: quantiles (min, p50, p90, p99, max) of the list length.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub length_quantiles: Option<[f64; 5]>,
    /// For nested lists: min and max inner length (e.g. K of the top-K columns).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inner_length_range: Option<[f64; 2]>,
    /// Mean / min / max of the (flattened) numeric values.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// For boolean columns: how many rows are true.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub true_count: Option<u64>,
    pub null_count: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    pub path: PathBuf,
    pub files: usize,
    pub rows: u64,
    pub columns: Vec<ColumnStats>,
    /// Prep settings (from manifest.json or the file's edpo.* metadata), when present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prep: Option<serde_json::Value>,
    /// The other key-value metadata of the first file.
    pub metadata: BTreeMap<String, String>,
}

fn polars_err(path: &Path) -> impl Fn(PolarsError) -> InspectError + '_ {
    move |e| InspectError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn first_f64(df: &DataFrame, name: &str) -> Option<f64> {
    let col = df.column(name).ok()?;
    let col = col.cast(&DataType::Float64).ok()?;
    col.f64().ok()?.get(0)
}

/// Value statistics are shown for floating-point data (log-probs); integer columns are ids.
fn is_numeric(dtype: &DataType) -> bool {
    dtype.is_float()
}

/// The Parquet files `path` names: the file itself, a folder's shards, or (a folder without
/// shards) every Parquet file in it.
fn parquet_files(path: &Path) -> Result<Vec<PathBuf>, crate::Error> {
    if !path.exists() {
        return Err(InspectError::NotFound(path.to_path_buf()).into());
    }
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let shards = list_shards(path)?;
    if !shards.is_empty() {
        return Ok(shards);
    }
    let mut any: Vec<PathBuf> = std::fs::read_dir(path)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    any.retain(|p| p.extension().is_some_and(|e| e == "parquet"));
    any.sort();
    if any.is_empty() {
        return Err(InspectError::Empty(path.to_path_buf()).into());
    }
    Ok(any)
}

/// The polars expressions that compute one column's statistics.
fn stats_exprs(name: &PlSmallStr, dtype: &DataType) -> Vec<Expr> {
    let explode = ExplodeOptions {
        empty_as_null: false,
        keep_nulls: false,
    };
    let c = || col(name.clone());
    let mut exprs = vec![c().null_count().alias("nulls")];
    let mut values: Option<Expr> = None;
    match dtype {
        DataType::List(inner) => {
            let lens = c().list().len().cast(DataType::Float64);
            for (q, alias) in [
                (0.0, "q0"),
                (0.5, "q50"),
                (0.9, "q90"),
                (0.99, "q99"),
                (1.0, "q100"),
            ] {
                exprs.push(
                    lens.clone()
                        .quantile(lit(q), QuantileMethod::Nearest)
                        .alias(alias),
                );
            }
            match inner.as_ref() {
                DataType::List(leaf) => {
                    let tokens = c().explode(explode);
                    let inner_len = tokens.clone().list().len().cast(DataType::Float64);
                    exprs.push(inner_len.clone().min().alias("inner_min"));
                    exprs.push(inner_len.max().alias("inner_max"));
                    if is_numeric(leaf) {
                        values = Some(tokens.explode(explode));
                    }
                }
                leaf if is_numeric(leaf) => values = Some(c().explode(explode)),
                _ => {}
            }
        }
        DataType::Boolean => exprs.push(c().cast(DataType::UInt64).sum().alias("trues")),
        d if is_numeric(d) => values = Some(c()),
        _ => {}
    }
    if let Some(v) = values {
        let v = v.cast(DataType::Float64);
        exprs.push(v.clone().mean().alias("mean"));
        exprs.push(v.clone().min().alias("min"));
        exprs.push(v.max().alias("max"));
    }
    exprs
}

/// One column's statistics from the one-row frame `stats_exprs` computed.
fn column_stats(name: &str, dtype: &DataType, df: &DataFrame) -> ColumnStats {
    let get = |alias: &str| first_f64(df, alias);
    let quantiles = ["q0", "q50", "q90", "q99", "q100"].map(get);
    ColumnStats {
        name: name.to_string(),
        dtype: dtype.to_string(),
        length_quantiles: quantiles
            .iter()
            .all(Option::is_some)
            .then(|| quantiles.map(|q| q.unwrap_or_default())),
        inner_length_range: get("inner_min").zip(get("inner_max")).map(|(a, b)| [a, b]),
        mean: get("mean"),
        min: get("min"),
        max: get("max"),
        true_count: get("trues").map(|v| v as u64),
        null_count: get("nulls").unwrap_or(0.0) as u64,
    }
}

/// Prep settings: from a shards folder's manifest, else from the file's own metadata.
fn prep_settings(path: &Path, metadata: &BTreeMap<String, String>) -> Option<serde_json::Value> {
    let manifest = if path.is_dir() {
        ShardManifest::read(path).ok().flatten()
    } else {
        None
    };
    match manifest {
        Some(m) => Some(serde_json::json!({
            "settings": m.settings,
            "complete": m.complete,
            "shards": m.shards.len(),
            "bundle_sha256": m.bundle_sha256,
            "reference_sha256": m.reference_sha256,
            "topk": m.topk,
        })),
        None => metadata
            .get(keys::SETTINGS)
            .and_then(|s| serde_json::from_str(s).ok()),
    }
}

/// Builds the report for a Parquet file or a folder of them.
pub fn inspect(path: &Path) -> Result<InspectReport, crate::Error> {
    let files = parquet_files(path)?;
    let err = polars_err(path);
    let sources: Vec<PlRefPath> = files
        .iter()
        .map(|f| PlRefPath::try_from_path(f))
        .collect::<PolarsResult<_>>()
        .map_err(&err)?;
    let lf =
        LazyFrame::scan_parquet_files(sources.into_iter().collect(), ScanArgsParquet::default())
            .map_err(&err)?;
    let schema = lf.clone().collect_schema().map_err(&err)?;
    let rows = lf
        .clone()
        .select([len().alias("rows")])
        .collect()
        .map_err(&err)?;
    let rows = first_f64(&rows, "rows").unwrap_or(0.0) as u64;
    let mut columns = Vec::new();
    for (name, dtype) in schema.iter() {
        let df = lf
            .clone()
            .select(stats_exprs(name, dtype))
            .collect()
            .map_err(&err)?;
        columns.push(column_stats(name, dtype, &df));
    }
    let mut metadata = read_metadata(&files[0]).unwrap_or_default();
    let prep = prep_settings(path, &metadata);
    metadata.retain(|k, _| k != keys::SETTINGS && k != "ARROW:schema");
    Ok(InspectReport {
        path: path.to_path_buf(),
        files: files.len(),
        rows,
        columns,
        prep,
        metadata,
    })
}

fn num(v: Option<f64>) -> String {
    match v {
        None => "".into(),
        Some(x) if x.fract() == 0.0 && x.abs() < 1e12 => format!("{x:.0}"),
        Some(x) => format!("{x:.4}"),
    }
}

impl Printable for InspectReport {
    /// A human-readable table.
    fn to_table(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "{}: {} rows in {} file(s)\n\n",
            self.path.display(),
            self.rows,
            self.files
        ));
        out.push_str(&format!(
            "{:<26} {:<22} {:>30} {:>9} {:>10} {:>10} {:>10} {:>6}\n",
            "column", "dtype", "length min/p50/p90/p99/max", "inner", "mean", "min", "max", "nulls"
        ));
        for c in &self.columns {
            let lens = c
                .length_quantiles
                .map(|q| {
                    q.iter()
                        .map(|v| num(Some(*v)))
                        .collect::<Vec<_>>()
                        .join("/")
                })
                .unwrap_or_default();
            let inner = c
                .inner_length_range
                .map(|r| {
                    if r[0] == r[1] {
                        num(Some(r[0]))
                    } else {
                        format!("{}-{}", num(Some(r[0])), num(Some(r[1])))
                    }
                })
                .unwrap_or_default();
            let mean = match c.true_count {
                Some(t) => format!("{t} true"),
                None => num(c.mean),
            };
            let mut dtype = c.dtype.clone();
            dtype.truncate(22);
            out.push_str(&format!(
                "{:<26} {:<22} {:>30} {:>9} {:>10} {:>10} {:>10} {:>6}\n",
                c.name,
                dtype,
                lens,
                inner,
                mean,
                num(c.min),
                num(c.max),
                c.null_count
            ));
        }
        if let Some(prep) = &self.prep {
            out.push_str("\nprep settings:\n");
            out.push_str(&serde_json::to_string_pretty(prep).unwrap_or_default());
            out.push('\n');
        }
        if !self.metadata.is_empty() {
            out.push_str("\nmetadata:\n");
            for (k, v) in &self.metadata {
                let mut v = v.clone();
                if v.len() > 100 {
                    v.truncate(100);
                    v.push('…');
                }
                out.push_str(&format!("  {k} = {v}\n"));
            }
        }
        out
    }
}
