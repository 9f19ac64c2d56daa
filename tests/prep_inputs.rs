//! `edpo prep` on the malformed-input corpus (tests/malformed/, made by make_corpus.py):
//! every case ends with exit code 2 and a message naming the file/row/column and the fix, or
//! with a counted skip — never a panic — and shards already in `--out` stay untouched.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;

fn corpus(name: &str) -> PathBuf {
    repo_root().join("tests/malformed").join(name)
}

/// A folder holding a previous, complete prep run (other settings), and its files' bytes.
fn previous_run(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let out = dir.join("shards");
    run_ok(
        edpo()
            .args(["--quiet", "prep", "--limit", "20", "--model"])
            .arg(sample_bundle())
            .arg("--data")
            .arg(repo_root().join("data-samples/prefs/train.plain.jsonl"))
            .arg("--out")
            .arg(&out),
    );
    snapshot(&out)
}

fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().to_string(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

/// Runs prep over `data` with `--overwrite` into a folder that holds another run's shards.
fn prep_over_previous(data: &[PathBuf], extra: &[&str]) -> (std::process::Output, bool) {
    let tmp = tempfile::tempdir().unwrap();
    let before = previous_run(tmp.path());
    let out = tmp.path().join("shards");
    let mut cmd = edpo();
    cmd.args(["--quiet", "prep", "--overwrite", "--json", "--model"])
        .arg(sample_bundle())
        .arg("--out")
        .arg(&out);
    for d in data {
        cmd.arg("--data").arg(d);
    }
    cmd.args(extra);
    let output = cmd.output().unwrap();
    let untouched = snapshot(&out) == before;
    (output, untouched)
}

fn expect_error(data: &[PathBuf], extra: &[&str], needles: &[&str]) {
    let (out, untouched) = prep_over_previous(data, extra);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{data:?} {extra:?}: expected exit 2, stderr:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    for n in needles {
        assert!(
            stderr.contains(n),
            "{data:?}: stderr lacks {n:?}:\n{stderr}"
        );
    }
    assert!(
        untouched,
        "{data:?}: the shards already in --out were changed"
    );
}

fn expect_skips(data: &[PathBuf], extra: &[&str], pairs: u64, skipped: &[(&str, u64)]) {
    let (out, _) = prep_over_previous(data, extra);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{data:?}: expected success, stderr:\n{stderr}"
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json summary");
    assert_eq!(summary["pairs_written"], pairs, "{summary}");
    for (reason, n) in skipped {
        assert_eq!(summary["skipped"][reason], *n, "{reason}: {summary}");
    }
}

#[test]
fn the_corpus_has_at_least_twenty_cases() {
    assert!(corpus_files() >= 20, "{} files", corpus_files());
}

#[test]
fn missing_column_names_file_column_and_flag() {
    expect_error(
        &[corpus("missing_column.jsonl")],
        &[],
        &[
            "missing_column.jsonl",
            "line 1",
            "`rejected`",
            "--rejected-column",
        ],
    );
    expect_error(
        &[corpus("missing_column.parquet")],
        &[],
        &["missing_column.parquet", "`rejected`", "--rejected-column"],
    );
}

#[test]
fn null_values_are_counted_skips() {
    expect_skips(&[corpus("null_values.jsonl")], &[], 2, &[("null_field", 1)]);
    expect_skips(
        &[corpus("null_values.parquet")],
        &[],
        2,
        &[("null_field", 1)],
    );
}

#[test]
fn wrong_types_name_the_row_and_column() {
    expect_error(
        &[corpus("wrong_type.jsonl")],
        &[],
        &["wrong_type.jsonl", "line 3", "`chosen`", "a number"],
    );
    expect_error(
        &[corpus("wrong_type.parquet")],
        &[],
        &["wrong_type.parquet", "first row", "`chosen`", "a number"],
    );
    expect_error(
        &[corpus("chat_not_a_list.jsonl")],
        &[],
        &["line 2", "`chosen`", "format `plain`"],
    );
}

#[test]
fn empty_strings_are_counted_skips() {
    expect_skips(
        &[corpus("empty_strings.jsonl")],
        &[],
        2,
        &[("empty_response", 2)],
    );
}

#[test]
fn invalid_utf8_names_the_line() {
    expect_error(
        &[corpus("invalid_utf8.jsonl")],
        &[],
        &["invalid_utf8.jsonl", "line 2", "UTF-8"],
    );
}

#[test]
fn truncated_parquet_is_refused() {
    expect_error(
        &[corpus("truncated.parquet")],
        &[],
        &["truncated.parquet", "not a readable Parquet"],
    );
}

#[test]
fn empty_file_is_refused() {
    expect_error(&[corpus("empty.jsonl")], &[], &["empty.jsonl", "empty"]);
}

#[test]
fn conversation_without_assistant_turn_is_skipped() {
    expect_skips(
        &[corpus("no_assistant_turn.jsonl")],
        &[],
        2,
        &[("no_assistant_turn", 1)],
    );
}

#[test]
fn unknown_role_is_refused() {
    expect_error(
        &[corpus("unknown_role.jsonl")],
        &[],
        &["line 2", "`narrator`", "roles must be"],
    );
    expect_error(
        &[corpus("message_without_role.jsonl")],
        &[],
        &["line 2", "no string `role`"],
    );
}

#[test]
fn over_length_rows_are_truncated_or_skipped() {
    expect_skips(
        &[corpus("over_length.jsonl")],
        &["--max-length", "24"],
        2,
        &[("prompt_fills_max_length", 1)],
    );
    let (out, _) = prep_over_previous(
        &[corpus("over_length.jsonl")],
        &["--max-prompt-length", "6"],
    );
    assert_eq!(out.status.code(), Some(0));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["pairs_written"], 3, "{summary}");
}

#[test]
fn duplicate_ids_keep_the_first() {
    expect_skips(
        &[corpus("duplicate_ids.jsonl")],
        &[],
        3,
        &[("duplicate_id", 1)],
    );
}

#[test]
fn invalid_json_lines_are_refused() {
    expect_error(
        &[corpus("invalid_json.jsonl")],
        &[],
        &["invalid_json.jsonl", "line 2", "invalid JSON"],
    );
    expect_error(
        &[corpus("not_an_object.jsonl")],
        &[],
        &["not_an_object.jsonl", "line 2", "not a JSON object"],
    );
}

#[test]
fn token_ids_are_checked_against_the_vocabulary() {
    expect_error(
        &[corpus("token_out_of_range.jsonl")],
        &[],
        &["line 2", "99999", "vocabulary"],
    );
    expect_error(
        &[corpus("token_not_integer.jsonl")],
        &[],
        &["line 2", "integer token ids"],
    );
}

#[test]
fn mixed_formats_are_refused() {
    expect_error(
        &[corpus("mixed_formats.jsonl")],
        &[],
        &["line 2", "`chosen`", "format `chat`", "`plain`"],
    );
}

#[test]
fn paths_that_are_not_data_are_refused() {
    expect_error(
        &[corpus("pairs.csv")],
        &[],
        &["pairs.csv", "neither Parquet"],
    );
    expect_error(
        &[corpus("does_not_exist.jsonl")],
        &[],
        &["does_not_exist.jsonl", "does not exist"],
    );
    expect_error(
        &[corpus("nomatch-*.jsonl")],
        &[],
        &["nomatch-*.jsonl", "matched no files"],
    );
    let empty = tempfile::tempdir().unwrap();
    expect_error(
        &[empty.path().to_path_buf()],
        &[],
        &["no .parquet or .jsonl files"],
    );
}

#[test]
fn empty_prompt_without_bos_is_skipped() {
    // The sample tokenizer has no BOS token, so an empty prompt cannot start a sequence.
    expect_skips(
        &[corpus("empty_prompt.jsonl")],
        &[],
        2,
        &[("empty_prompt", 1)],
    );
}

#[test]
fn bad_flags_are_usage_errors() {
    let good = repo_root().join("data-samples/prefs/heldout.plain.jsonl");
    expect_error(
        std::slice::from_ref(&good),
        &["--topk", "100000"],
        &["--topk", "vocabulary size 512"],
    );
    expect_error(
        std::slice::from_ref(&good),
        &["--max-length", "1"],
        &["--max-length"],
    );
    expect_error(&[good], &["--device", "gpu"], &["--device gpu"]);
}

#[test]
fn tokenizer_larger_than_the_model_vocabulary_is_refused() {
    let (_tmp, bundle) = bundle_copy();
    let manifest_path = bundle.join("edpo-model.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    manifest["vocab_size"] = serde_json::json!(300);
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let out = edpo()
        .args(["--quiet", "prep", "--model"])
        .arg(&bundle)
        .arg("--data")
        .arg(repo_root().join("data-samples/prefs/heldout.plain.jsonl"))
        .arg("--out")
        .arg(out_dir.path().join("s"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("512 tokens") && stderr.contains("300"),
        "{stderr}"
    );
}

#[test]
fn unwritable_output_folder_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let out = edpo()
        .args(["--quiet", "prep", "--model"])
        .arg(sample_bundle())
        .arg("--data")
        .arg(repo_root().join("data-samples/prefs/heldout.plain.jsonl"))
        .arg("--out")
        .arg(file.join("shards"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not writable") && stderr.contains("--out"),
        "{stderr}"
    );
}

#[test]
fn other_settings_are_refused_without_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let before = previous_run(tmp.path());
    let out = edpo()
        .args(["--quiet", "prep", "--limit", "30", "--model"])
        .arg(sample_bundle())
        .arg("--data")
        .arg(repo_root().join("data-samples/prefs/train.plain.jsonl"))
        .arg("--out")
        .arg(tmp.path().join("shards"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--overwrite") && stderr.contains("fingerprint"),
        "{stderr}"
    );
    assert!(
        stderr.contains("limit: 20 then, 30 now"),
        "names the setting that differs: {stderr}"
    );
    assert_eq!(snapshot(&tmp.path().join("shards")), before);
}

/// Rows in the HuggingFaceH4/ultrafeedback_binarized layout: a string prompt beside whole
/// conversations that repeat the user turn.
fn ultrafeedback_rows(dir: &Path) -> PathBuf {
    let turn = |role: &str, content: &str| serde_json::json!({"role": role, "content": content});
    let row = |id: usize, prompt: &str, user: &str| {
        serde_json::json!({
            "id": format!("u{id}"),
            "prompt": prompt,
            "chosen": [turn("user", user), turn("assistant", &format!("A lovely answer {id}."))],
            "rejected": [turn("user", user), turn("assistant", &format!("A dull answer {id}."))],
        })
        .to_string()
    };
    let lines = [
        row(0, "Tell me about the book.", "Tell me about the book."),
        row(1, " Tell me about the movie.\n", "Tell me about the movie."),
        row(
            2,
            "Tell me about the book.",
            "Tell me about something else.",
        ),
        row(3, "What did you think?", "What did you think?"),
    ];
    let path = dir.join("ultrafeedback.jsonl");
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

#[test]
fn string_prompts_beside_conversations_use_the_shared_prefix_and_count_mismatches() {
    let tmp = tempfile::tempdir().unwrap();
    let data = ultrafeedback_rows(tmp.path());
    expect_skips(
        std::slice::from_ref(&data),
        &[],
        3,
        &[("prompt_mismatch", 1)],
    );
    expect_error(
        &[data],
        &["--prompt-mismatch", "error"],
        &[
            "line 3",
            "`prompt`",
            "last user turn",
            "--prompt-mismatch error",
        ],
    );
}

/// The chosen ids of every pair of a shards folder, by source row.
fn chosen_ids(shards: &Path) -> Vec<Vec<u32>> {
    let mut pairs: Vec<_> = edpo::shards::list_shards(shards)
        .unwrap()
        .iter()
        .flat_map(|f| edpo::shards::read_shard(f).unwrap())
        .collect();
    pairs.sort_by_key(|p| p.pair.source_row);
    pairs.into_iter().map(|p| p.pair.chosen_ids).collect()
}

#[test]
fn chat_responses_end_with_eos_unless_response_eos_never() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = edpo::bundle::Bundle::open(&sample_bundle()).unwrap();
    let eos = bundle
        .manifest
        .special_tokens
        .eos
        .id
        .expect("the sample tokenizer has EOS");
    let prep = |out: &Path, extra: &[&str]| {
        run_ok(
            edpo()
                .args(["--quiet", "prep", "--limit", "12", "--model"])
                .arg(sample_bundle())
                .arg("--data")
                .arg(repo_root().join("data-samples/prefs/heldout.chat.jsonl"))
                .arg("--out")
                .arg(out)
                .args(extra),
        );
    };
    let (always, never) = (tmp.path().join("always"), tmp.path().join("never"));
    prep(&always, &[]);
    prep(&never, &["--response-eos", "never"]);
    let (with_eos, without) = (chosen_ids(&always), chosen_ids(&never));
    assert_eq!(with_eos.len(), 12);
    for (a, b) in with_eos.iter().zip(&without) {
        assert_eq!(
            a.last(),
            Some(&eos),
            "TRL 0.13 appends EOS to chat responses"
        );
        assert_eq!(&a[..a.len() - 1], b.as_slice(), "otherwise the same ids");
    }
    let settings = edpo::shards::ShardManifest::read(&never)
        .unwrap()
        .unwrap()
        .settings;
    assert_eq!(
        settings["response_eos"], "never",
        "recorded in the shard settings"
    );
}

/// A chat template is untrusted input: nested `range(10000)` loops (10⁸ steps, gigabytes of
/// text) end at once with exit code 2 and a message naming the row and the template.
#[test]
fn runaway_chat_templates_stop_at_once() {
    let loops = [
        "{% for i in range(10000) %}{% for j in range(10000) %}{{ i }}{% endfor %}{% endfor %}",
        "{% for i in range(10000) %}{% for j in range(10000) %}{% set x = i * j %}{% endfor %}{% endfor %}",
        "{% set ns = namespace(s=messages[0].content) %}{% for i in range(10000) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    ];
    for template in loops {
        let (_tmp, bundle) = bundle_copy();
        let config_path = bundle.join("tokenizer_config.json");
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
        config["chat_template"] = serde_json::json!(template);
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        rehash(&bundle, "tokenizer_config.json");
        let out_dir = tempfile::tempdir().unwrap();
        let started = std::time::Instant::now();
        let out = edpo()
            .args(["--quiet", "prep", "--limit", "4", "--model"])
            .arg(&bundle)
            .arg("--data")
            .arg(repo_root().join("data-samples/prefs/heldout.chat.jsonl"))
            .arg("--out")
            .arg(out_dir.path().join("s"))
            .output()
            .unwrap();
        let elapsed = started.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("{template}: failed after {elapsed:?}: {stderr}");
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("heldout.chat.jsonl` line"), "{stderr}");
        assert!(stderr.contains("tokenizer_config.json"), "{stderr}");
        assert!(
            stderr.contains("ran past its budget") || stderr.contains("rendered more than"),
            "{stderr}"
        );
        assert!(elapsed.as_secs_f64() < 10.0, "took {elapsed:?}");
    }
}
