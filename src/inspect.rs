//! `edpo inspect`: schema, row count, per-column statistics and prep settings of a shards
//! folder or any Parquet file, computed with polars.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use polars::prelude::*;
use serde::Serialize;

use crate::shards::{list_shards, read_metadata, ShardManifest};

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("`{0}` does not exist")]
    NotFound(PathBuf),
    #[error("`{0}` has no Parquet files to inspect")]
    Empty(PathBuf),
    #[error("cannot read `{path}` as Parquet: {message}")]
    Read { path: PathBuf, message: String },
}

impl InspectError {
    pub fn exit_code(&self) -> i32 {
        2
    }
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

/// Builds the report for a Parquet file or a folder of them.
pub fn inspect(path: &Path) -> Result<InspectReport, InspectError> {
    if !path.exists() {
        return Err(InspectError::NotFound(path.to_path_buf()));
    }
    let files: Vec<PathBuf> = if path.is_dir() {
        let shards = list_shards(path).map_err(|e| InspectError::Read {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        if shards.is_empty() {
            let mut any: Vec<PathBuf> = std::fs::read_dir(path)
                .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
                .unwrap_or_default();
            any.retain(|p| p.extension().is_some_and(|e| e == "parquet"));
            any.sort();
            any
        } else {
            shards
        }
    } else {
        vec![path.to_path_buf()]
    };
    if files.is_empty() {
        return Err(InspectError::Empty(path.to_path_buf()));
    }
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
    let explode = ExplodeOptions {
        empty_as_null: false,
        keep_nulls: false,
    };
    let mut columns = Vec::new();
    for (name, dtype) in schema.iter() {
        let mut stats = ColumnStats {
            name: name.to_string(),
            dtype: dtype.to_string(),
            ..ColumnStats::default()
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
        let df = lf.clone().select(exprs).collect().map_err(&err)?;
        stats.null_count = first_f64(&df, "nulls").unwrap_or(0.0) as u64;
        if let (Some(a), Some(b), Some(cq), Some(d), Some(e)) = (
            first_f64(&df, "q0"),
            first_f64(&df, "q50"),
            first_f64(&df, "q90"),
            first_f64(&df, "q99"),
            first_f64(&df, "q100"),
        ) {
            stats.length_quantiles = Some([a, b, cq, d, e]);
        }
        if let (Some(a), Some(b)) = (first_f64(&df, "inner_min"), first_f64(&df, "inner_max")) {
            stats.inner_length_range = Some([a, b]);
        }
        stats.mean = first_f64(&df, "mean");
        stats.min = first_f64(&df, "min");
        stats.max = first_f64(&df, "max");
        stats.true_count = first_f64(&df, "trues").map(|v| v as u64);
        columns.push(stats);
    }
    let mut metadata = read_metadata(&files[0]).unwrap_or_default();
    let manifest = if path.is_dir() {
        ShardManifest::read(path).ok().flatten()
    } else {
        None
    };
    let prep = match manifest {
        Some(m) => Some(serde_json::json!({
            "settings": m.settings,
            "complete": m.complete,
            "shards": m.shards.len(),
            "bundle_sha256": m.bundle_sha256,
            "topk": m.topk,
        })),
        None => metadata
            .get("edpo.settings")
            .and_then(|s| serde_json::from_str(s).ok()),
    };
    metadata.retain(|k, _| k != "edpo.settings" && k != "ARROW:schema");
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

impl InspectReport {
    /// A human-readable table.
    pub fn to_table(&self) -> String {
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
