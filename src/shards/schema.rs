//! The shard schema of `architecture.md` (one row per pair; response tokens only in the
//! per-token lists) and the conversion of scored pairs to and from Arrow record batches.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, Float32Array, ListArray, ListBuilder, PrimitiveArray,
    PrimitiveBuilder, RecordBatch, UInt64Array,
};
use arrow::datatypes::{
    ArrowPrimitiveType, DataType, Field, Float32Type, Schema, SchemaRef, UInt32Type,
};

use super::{ResponseScores, ScoredPair, ShardError};
use crate::data::tokenize::TokenizedPair;
use crate::data::Side;
use crate::table::column;

pub const PAIR_ID: &str = "pair_id";
pub const SOURCE_ROW: &str = "source_row";
pub const PROMPT_IDS: &str = "prompt_ids";
pub const PROMPT_TRUNCATED: &str = "prompt_truncated";
pub const RESPONSE_TRUNCATED: &str = "response_truncated";

/// The column names of one side of a pair.
pub struct SideColumns {
    /// The response's token ids.
    pub ids: &'static str,
    /// The reference's sum of its log-probs.
    pub logps: &'static str,
    pub token_logps: &'static str,
    pub topk_ids: &'static str,
    pub topk_logps: &'static str,
}

pub const CHOSEN: SideColumns = SideColumns {
    ids: "chosen_ids",
    logps: "ref_chosen_logps",
    token_logps: "ref_chosen_token_logps",
    topk_ids: "ref_chosen_topk_ids",
    topk_logps: "ref_chosen_topk_logps",
};

pub const REJECTED: SideColumns = SideColumns {
    ids: "rejected_ids",
    logps: "ref_rejected_logps",
    token_logps: "ref_rejected_token_logps",
    topk_ids: "ref_rejected_topk_ids",
    topk_logps: "ref_rejected_topk_logps",
};

pub fn columns_of(side: Side) -> &'static SideColumns {
    match side {
        Side::Chosen => &CHOSEN,
        Side::Rejected => &REJECTED,
    }
}

fn list_of(inner: DataType) -> DataType {
    DataType::List(Arc::new(Field::new("item", inner, true)))
}

/// The shard schema: `architecture.md`'s columns, plus `source_row` (the pair's index in the
/// input stream, which traces every row to its source line).
pub fn schema() -> SchemaRef {
    let u32_list = list_of(DataType::UInt32);
    let f32_list = list_of(DataType::Float32);
    let per_side = |kind: fn(&SideColumns) -> &'static str, dtype: &DataType| {
        Side::BOTH.map(|side| Field::new(kind(columns_of(side)), dtype.clone(), false))
    };
    let mut fields = vec![
        Field::new(PAIR_ID, DataType::UInt64, false),
        Field::new(SOURCE_ROW, DataType::UInt64, false),
        Field::new(PROMPT_IDS, u32_list.clone(), false),
    ];
    fields.extend(per_side(|c| c.ids, &u32_list));
    fields.extend(per_side(|c| c.logps, &DataType::Float32));
    fields.extend(per_side(|c| c.token_logps, &f32_list));
    fields.extend(per_side(|c| c.topk_ids, &list_of(u32_list.clone())));
    fields.extend(per_side(|c| c.topk_logps, &list_of(f32_list.clone())));
    fields.push(Field::new(PROMPT_TRUNCATED, DataType::Boolean, false));
    fields.push(Field::new(RESPONSE_TRUNCATED, DataType::Boolean, false));
    Arc::new(Schema::new(fields))
}

/// One list per row (e.g. token ids of each pair).
fn lists<'a, T: ArrowPrimitiveType>(rows: impl Iterator<Item = &'a [T::Native]>) -> ArrayRef {
    let mut b = ListBuilder::new(PrimitiveBuilder::<T>::new());
    for row in rows {
        b.values().append_slice(row);
        b.append(true);
    }
    Arc::new(b.finish())
}

/// One list of top-K lists per row, from token-major flattened values ([tokens × topk]).
fn nested_lists<'a, T: ArrowPrimitiveType>(
    rows: impl Iterator<Item = (&'a [T::Native], usize)>,
) -> ArrayRef {
    let mut b = ListBuilder::new(ListBuilder::new(PrimitiveBuilder::<T>::new()));
    for (flat, topk) in rows {
        for token in flat.chunks(topk.max(1)) {
            b.values().values().append_slice(token);
            b.values().append(true);
        }
        b.append(true);
    }
    Arc::new(b.finish())
}

/// Builds one Arrow batch from scored pairs (columns in schema order).
pub fn to_record_batch(pairs: &[ScoredPair]) -> Result<RecordBatch, arrow::error::ArrowError> {
    let sides = |f: &dyn Fn(Side) -> ArrayRef| Side::BOTH.map(f);
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from_iter_values(
            pairs.iter().map(|p| p.pair.pair_id),
        )),
        Arc::new(UInt64Array::from_iter_values(
            pairs.iter().map(|p| p.pair.source_row),
        )),
        lists::<UInt32Type>(pairs.iter().map(|p| p.pair.prompt_ids.as_slice())),
    ];
    columns.extend(sides(&|s| {
        lists::<UInt32Type>(pairs.iter().map(move |p| p.pair.response(s)))
    }));
    columns.extend(sides(&|s| {
        Arc::new(Float32Array::from_iter_values(
            pairs.iter().map(move |p| p.scores(s).logps),
        ))
    }));
    columns.extend(sides(&|s| {
        lists::<Float32Type>(
            pairs
                .iter()
                .map(move |p| p.scores(s).token_logps.as_slice()),
        )
    }));
    columns.extend(sides(&|s| {
        nested_lists::<UInt32Type>(
            pairs
                .iter()
                .map(move |p| (p.scores(s).topk_ids.as_slice(), p.topk)),
        )
    }));
    columns.extend(sides(&|s| {
        nested_lists::<Float32Type>(
            pairs
                .iter()
                .map(move |p| (p.scores(s).topk_logps.as_slice(), p.topk)),
        )
    }));
    columns.push(Arc::new(BooleanArray::from_iter(
        pairs.iter().map(|p| Some(p.pair.prompt_truncated)),
    )));
    columns.push(Arc::new(BooleanArray::from_iter(
        pairs.iter().map(|p| Some(p.pair.response_truncated)),
    )));
    RecordBatch::try_new(schema(), columns)
}

fn list_values<T: ArrowPrimitiveType>(list: &ListArray, row: usize) -> Vec<T::Native> {
    let values = list.value(row);
    values
        .as_any()
        .downcast_ref::<PrimitiveArray<T>>()
        .map(|a| a.values().to_vec())
        .unwrap_or_default()
}

/// A row's list of top-K lists, flattened token-major, and the top-K size (0: no tokens).
fn nested_values<T: ArrowPrimitiveType>(
    path: &Path,
    list: &ListArray,
    row: usize,
) -> Result<(Vec<T::Native>, usize), ShardError> {
    let inner = list.value(row);
    let inner =
        inner
            .as_any()
            .downcast_ref::<ListArray>()
            .ok_or_else(|| ShardError::NotAShard {
                path: path.to_path_buf(),
                message: "a top-K column is not a list of lists".into(),
            })?;
    let mut flat = Vec::new();
    let mut topk = 0;
    for t in 0..inner.len() {
        let v = list_values::<T>(inner, t);
        topk = v.len();
        flat.extend(v);
    }
    Ok((flat, topk))
}

/// The typed columns of one side in a batch read from `path`.
struct SideArrays {
    ids: ListArray,
    logps: Float32Array,
    token_logps: ListArray,
    topk_ids: ListArray,
    topk_logps: ListArray,
}

impl SideArrays {
    fn of(path: &Path, batch: &RecordBatch, side: Side) -> Result<Self, crate::Error> {
        let c = columns_of(side);
        Ok(SideArrays {
            ids: column(path, batch, c.ids, "list")?,
            logps: column(path, batch, c.logps, "float32")?,
            token_logps: column(path, batch, c.token_logps, "list")?,
            topk_ids: column(path, batch, c.topk_ids, "list")?,
            topk_logps: column(path, batch, c.topk_logps, "list")?,
        })
    }

    /// Row `i`'s response ids, its scores, and the top-K size.
    fn row(&self, path: &Path, i: usize) -> Result<(Vec<u32>, ResponseScores, usize), ShardError> {
        let (topk_ids, topk) = nested_values::<UInt32Type>(path, &self.topk_ids, i)?;
        let scores = ResponseScores {
            logps: self.logps.value(i),
            token_logps: list_values::<Float32Type>(&self.token_logps, i),
            topk_ids,
            topk_logps: nested_values::<Float32Type>(path, &self.topk_logps, i)?.0,
        };
        Ok((list_values::<UInt32Type>(&self.ids, i), scores, topk))
    }
}

/// The scored pairs of one record batch read from the shard `path`.
pub fn from_record_batch(
    path: &Path,
    batch: &RecordBatch,
) -> Result<Vec<ScoredPair>, crate::Error> {
    let pair_ids: UInt64Array = column(path, batch, PAIR_ID, "uint64")?;
    let source_rows: UInt64Array = column(path, batch, SOURCE_ROW, "uint64")?;
    let prompts: ListArray = column(path, batch, PROMPT_IDS, "list")?;
    let prompt_truncated: BooleanArray = column(path, batch, PROMPT_TRUNCATED, "boolean")?;
    let response_truncated: BooleanArray = column(path, batch, RESPONSE_TRUNCATED, "boolean")?;
    let chosen = SideArrays::of(path, batch, Side::Chosen)?;
    let rejected = SideArrays::of(path, batch, Side::Rejected)?;
    let mut out = Vec::with_capacity(batch.num_rows());
    for i in 0..batch.num_rows() {
        let (chosen_ids, chosen_scores, topk) = chosen.row(path, i)?;
        let (rejected_ids, rejected_scores, _) = rejected.row(path, i)?;
        out.push(ScoredPair {
            pair: TokenizedPair {
                pair_id: pair_ids.value(i),
                source_row: source_rows.value(i),
                prompt_ids: list_values::<UInt32Type>(&prompts, i),
                chosen_ids,
                rejected_ids,
                prompt_truncated: prompt_truncated.value(i),
                response_truncated: response_truncated.value(i),
            },
            topk,
            chosen: chosen_scores,
            rejected: rejected_scores,
        });
    }
    Ok(out)
}
