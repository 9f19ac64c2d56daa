//! Hugging Face chat templates (from `tokenizer_config.json`), rendered with minijinja exactly
//! as transformers' `apply_chat_template` renders them with Jinja2: `trim_blocks` and
//! `lstrip_blocks` on, no trailing newline kept, loop controls, the `{% generation %}` tag,
//! the globals `raise_exception`, `strftime_now`, `namespace` and `dict`, transformers' own
//! `tojson` (`json.dumps`), Python's `str()` for printed values and Python string methods, and
//! the variables `messages`, `tools` = `documents` = None, `add_generation_prompt` and every
//! named special token of the tokenizer config.
//!
//! A template is untrusted input: each render has a fuel budget (minijinja's count of steps
//! and allocated bytes) and a cap on the rendered length, both scaled by the conversation's size.

mod python;

use std::path::Path;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::ValueKind;
use minijinja::{Environment, Error, ErrorKind, State, Value};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

use super::{DataError, Message, RowRef};

/// The named special tokens transformers passes to templates (`SPECIAL_TOKENS_ATTRIBUTES`).
const SPECIAL_TOKENS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// Fuel of one render: a base (about a million steps, tens of MB) plus some per message and
/// per byte of the conversation, so long conversations are never refused.
const FUEL_BASE: u64 = 1_000_000;
const FUEL_PER_MESSAGE: u64 = 2_000;
const FUEL_PER_BYTE: u64 = 1;
/// Cap on the rendered text: 1 MiB plus 8 bytes per byte of the conversation.
const OUTPUT_BASE: usize = 1 << 20;
const OUTPUT_PER_BYTE: usize = 8;

const TEMPLATE: &str = "chat_template";

/// A compiled chat template and the special-token strings it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Fuel the compiled environment runs with; larger inputs get a fresh one.
    fuel: u64,
    source: String,
    /// Where the template came from, for messages.
    origin: String,
    /// Named special tokens (name, text) that are set in the tokenizer config.
    specials: Vec<(&'static str, String)>,
    /// sha256 of the template source (recorded in shard metadata).
    pub sha256: String,
}

fn token_text(cfg: &Json, key: &str) -> Option<String> {
    match cfg.get(key) {
        Some(Json::String(s)) => Some(s.clone()),
        Some(Json::Object(o)) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

/// Marks an error raised by the template itself through `raise_exception`.
#[derive(Debug)]
struct Raised;

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("raised by the template")
    }
}

impl std::error::Error for Raised {}

/// Rewrites `{% generation %}` / `{% endgeneration %}` (transformers' extension: it renders its
/// body unchanged and only notes where the body lands, for assistant masks) into
/// `{% if true %}` / `{% endif %}`: block tags again, so whitespace control and trim/lstrip
/// behave as in Jinja2.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            rest = tag;
            break;
        };
        let inner = &tag[2..end];
        let (lead, body) = match inner.strip_prefix(['-', '+']) {
            Some(b) => (&inner[..1], b),
            None => ("", inner),
        };
        let (body, trail) = match body.strip_suffix(['-', '+']) {
            Some(b) => (b, &body[b.len()..]),
            None => (body, ""),
        };
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => out.push_str(&format!("{{%{lead} {r} {trail}%}}")),
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message).with_source(Raised))
}

/// transformers' `TemplateNamespace`: no attributes starting with `_`.
fn namespace(defaults: Option<minijinja::value::ValueOrKwargs>) -> Result<Value, Error> {
    let defaults = defaults.map(|d| d.into_value());
    if let Some(d) = &defaults {
        if d.kind() == ValueKind::Map {
            for key in d.try_iter()? {
                if key.as_str().is_some_and(|k| k.starts_with('_')) {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        format!("Chat templates cannot store underscore-prefixed attributes on a namespace, but got '{key}'"),
                    ));
                }
            }
        }
    }
    minijinja::functions::namespace(defaults.map(Into::into))
}

/// Python string methods on top of minijinja-contrib's (`strip`, `split` and `title` with
/// Python's definitions of whitespace and words).
fn unknown_method(
    state: &mut State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    if let Some(s) = value.as_str() {
        let text_arg = |i: usize| args.get(i).filter(|v| !v.is_none()).map(|v| v.as_str());
        match (method, args.len()) {
            ("strip" | "lstrip" | "rstrip", 0 | 1) => {
                let chars = match text_arg(0) {
                    None => None,
                    Some(Some(c)) => Some(c),
                    Some(None) => {
                        return Err(Error::new(
                            ErrorKind::InvalidOperation,
                            format!("{method} arg must be None or str"),
                        ))
                    }
                };
                return Ok(Value::from(python::strip(
                    s,
                    chars,
                    method != "rstrip",
                    method != "lstrip",
                )));
            }
            ("split", 0..=2) if text_arg(0).is_none() => {
                let max = args.get(1).and_then(Value::as_i64).unwrap_or(-1);
                return Ok(Value::from(python::split_whitespace(s, max)));
            }
            ("title", 0) => return Ok(Value::from(python::title(s))),
            ("isspace", 0) => {
                return Ok(Value::from(
                    !s.is_empty() && s.chars().all(python::is_space),
                ))
            }
            _ => {}
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// Jinja2's `trim` filter: `str.strip(chars)`.
fn trim(value: &Value, chars: Option<String>) -> String {
    let mut text = String::new();
    python::py_str(value, &mut text);
    python::strip(&text, chars.as_deref(), true, true)
}

/// Jinja2's `string` filter: `str(value)`.
fn string(value: &Value) -> String {
    let mut text = String::new();
    python::py_str(value, &mut text);
    text
}

/// Jinja2's `iterable` test: `iter(value)` works (None is not iterable, undefined is).
fn is_iterable(value: &Value) -> bool {
    !value.is_none() && value.try_iter().is_ok()
}

/// An environment configured like transformers' `_compile_jinja_template`, holding the template.
fn environment(source: &str, origin: &str, fuel: u64) -> Result<Environment<'static>, DataError> {
    let mut env = Environment::new();
    let syntax = SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .keep_trailing_newline(false)
        .build()
        .expect("the default delimiters are valid");
    env.set_syntax(syntax);
    env.set_debug(false);
    env.set_fuel(Some(fuel));
    env.set_unknown_method_callback(unknown_method);
    env.set_formatter(|out, _state, value| {
        let mut text = String::new();
        python::py_str(value, &mut text);
        out.write_str(&text)
            .map_err(|_| Error::from(ErrorKind::WriteFailure))
    });
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", |format: String| {
        python::strftime_now(&format)
    });
    env.add_function("namespace", namespace);
    env.add_function("dict", minijinja::functions::dict);
    env.add_filter("tojson", python::tojson);
    env.add_filter("trim", trim);
    env.add_filter("string", string);
    env.add_test("iterable", is_iterable);
    env.add_template_owned(TEMPLATE, rewrite_generation_tags(source))
        .map_err(|e| DataError::Template {
            message: format!("{origin} does not compile: {e}"),
        })?;
    Ok(env)
}

/// Collects the rendered text, refusing to grow past `limit` bytes.
struct CappedOutput {
    buf: Vec<u8>,
    limit: usize,
    overflowed: bool,
}

impl std::io::Write for CappedOutput {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > self.limit {
            self.overflowed = true;
            return Err(std::io::Error::other("rendered text too long"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ChatTemplate {
    /// Reads the template of a `tokenizer_config.json`; None when it has none.
    pub fn from_tokenizer_config(path: &Path) -> Result<Option<ChatTemplate>, DataError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(DataError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let cfg: Json = serde_json::from_str(&text).map_err(|e| DataError::Template {
            message: format!("`{}` is not valid JSON: {e}", path.display()),
        })?;
        let source = match cfg.get("chat_template") {
            Some(Json::String(s)) => s.clone(),
            Some(Json::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Json::as_str))
                .map(str::to_string)
                .ok_or_else(|| DataError::Template {
                    message: format!(
                        "`{}` has named chat templates but none called `default`",
                        path.display()
                    ),
                })?,
            _ => return Ok(None),
        };
        let specials = SPECIAL_TOKENS
            .iter()
            .filter_map(|&name| token_text(&cfg, name).map(|text| (name, text)))
            .collect();
        Self::with_origin(&source, specials, format!(" of `{}`", path.display())).map(Some)
    }

    /// A template from its source, with the named special tokens it may refer to
    /// (`bos_token`, `eos_token`, …).
    pub fn new(
        source: &str,
        specials: Vec<(&'static str, String)>,
    ) -> Result<ChatTemplate, DataError> {
        Self::with_origin(source, specials, String::new())
    }

    fn with_origin(
        source: &str,
        specials: Vec<(&'static str, String)>,
        origin: String,
    ) -> Result<ChatTemplate, DataError> {
        let sha256: String = Sha256::digest(source.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let origin = format!("the chat template{origin} (sha256 {})", &sha256[..12]);
        Ok(ChatTemplate {
            env: environment(source, &origin, FUEL_BASE)?,
            fuel: FUEL_BASE,
            source: source.to_string(),
            origin,
            specials,
            sha256,
        })
    }

    fn context(&self, messages: &[Message], add_generation_prompt: bool) -> Value {
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_pairs([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ])
            })
            .collect();
        let mut vars: Vec<(&str, Value)> = self
            .specials
            .iter()
            .map(|(name, text)| (*name, Value::from(text.as_str())))
            .collect();
        vars.push(("messages", Value::from(msgs)));
        vars.push(("tools", Value::from(())));
        vars.push(("documents", Value::from(())));
        vars.push(("add_generation_prompt", Value::from(add_generation_prompt)));
        Value::from_pairs(vars)
    }

    /// What went wrong, naming the template (and the line, where minijinja knows it).
    fn describe(&self, e: &Error, out: &CappedOutput, fuel: u64) -> String {
        let origin = &self.origin;
        let line = e
            .line()
            .map(|l| format!(" at line {l}"))
            .unwrap_or_default();
        let raised = std::error::Error::source(e).is_some_and(|s| s.is::<Raised>());
        match e.kind() {
            _ if raised => format!(
                "{origin} raised an error{line}: {}",
                e.detail().unwrap_or_default()
            ),
            ErrorKind::OutOfFuel => format!(
                "{origin} ran past its budget of {fuel} fuel (minijinja's count of steps and \
                 64-byte blocks of data) for this conversation: it loops or builds far more text \
                 than the messages need. A chat template is untrusted input; check it"
            ),
            ErrorKind::WriteFailure if out.overflowed => format!(
                "{origin} rendered more than {} bytes for this conversation. A chat template is \
                 untrusted input; check it",
                out.limit
            ),
            kind => match e.detail() {
                Some(detail) => format!("{origin} failed{line}: {kind}: {detail}"),
                None => format!("{origin} failed{line}: {kind}"),
            },
        }
    }

    /// Renders `messages`; `add_generation_prompt` opens an assistant turn at the end.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        at: &RowRef,
    ) -> Result<String, DataError> {
        let bytes: usize = messages
            .iter()
            .map(|m| m.role.len() + m.content.len())
            .sum();
        let fuel =
            FUEL_BASE + FUEL_PER_MESSAGE * messages.len() as u64 + FUEL_PER_BYTE * bytes as u64;
        let larger;
        let env = if fuel <= self.fuel {
            &self.env
        } else {
            larger = environment(&self.source, &self.origin, fuel)?;
            &larger
        };
        let template = env
            .get_template(TEMPLATE)
            .map_err(|e| DataError::Template {
                message: format!("chat template: {e}"),
            })?;
        let mut out = CappedOutput {
            buf: Vec::new(),
            limit: OUTPUT_BASE + OUTPUT_PER_BYTE * bytes,
            overflowed: false,
        };
        let rendered =
            template.render_captured_to(self.context(messages, add_generation_prompt), &mut out);
        match rendered {
            Ok(_) => Ok(String::from_utf8(out.buf).expect("minijinja writes UTF-8")),
            Err(e) => Err(DataError::Render {
                at: at.clone(),
                message: self.describe(&e, &out, fuel),
            }),
        }
    }

    /// Prompt text (with the generation prompt) and the response texts that follow it
    /// (TRL's `maybe_apply_chat_template`): response = render(prompt + response) minus prompt.
    pub fn render_pair(
        &self,
        prompt: &[Message],
        chosen: &[Message],
        rejected: &[Message],
        at: &RowRef,
    ) -> Result<(String, String, String), DataError> {
        let prompt_text = self.render(prompt, true, at)?;
        let mut responses = Vec::with_capacity(2);
        for response in [chosen, rejected] {
            let mut all = prompt.to_vec();
            all.extend_from_slice(response);
            let full = self.render(&all, false, at)?;
            let rest = full
                .strip_prefix(&prompt_text)
                .ok_or_else(|| DataError::TemplateNotPrefix { at: at.clone() })?;
            responses.push(rest.to_string());
        }
        let rejected_text = responses.pop().expect("two responses");
        let chosen_text = responses.pop().expect("two responses");
        Ok((prompt_text, chosen_text, rejected_text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at() -> RowRef {
        RowRef {
            path: "x.jsonl".into(),
            row: 0,
            line: Some(1),
        }
    }

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn chatml_pair_splits_at_the_generation_prompt() {
        let src = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let t = ChatTemplate::new(src, vec![("eos_token", "<|im_end|>".into())]).unwrap();
        let (p, c, r) = t
            .render_pair(
                &[msg("user", "hi")],
                &[msg("assistant", "good")],
                &[msg("assistant", "bad")],
                &at(),
            )
            .unwrap();
        assert_eq!(p, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
        assert_eq!(c, "good<|im_end|>\n");
        assert_eq!(r, "bad<|im_end|>\n");
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0]['content'].strip() }}";
        let t = ChatTemplate::new(src, vec![]).unwrap();
        assert_eq!(t.render(&[msg("user", "  x ")], false, &at()).unwrap(), "x");
        let err = t
            .render(&[msg("system", "x")], false, &at())
            .unwrap_err()
            .to_string();
        assert!(err.contains("first must be user"), "{err}");
    }

    fn render(src: &str, messages: &[Message], gen: bool) -> Result<String, DataError> {
        ChatTemplate::new(src, vec![("bos_token", "<s>".into())])?.render(messages, gen, &at())
    }

    #[test]
    fn block_tags_trim_and_lstrip_like_transformers() {
        let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[U] {{ m.content }}\n    {% endif %}\n{% endfor %}\n";
        assert_eq!(
            render(src, &[msg("user", "a"), msg("user", "b")], false).unwrap(),
            "[U] a\n[U] b\n"
        );
        // Jinja2 drops one trailing newline of the template (keep_trailing_newline off).
        assert_eq!(render("x\n", &[], false).unwrap(), "x");
    }

    #[test]
    fn generation_tags_render_their_body() {
        let src = "{% for m in messages %}{%- generation -%}\n {{ m.content }} {% endgeneration %}|{% endfor %}";
        assert_eq!(render(src, &[msg("assistant", "a")], false).unwrap(), "a |");
        assert_eq!(
            rewrite_generation_tags("{%+ generation %}"),
            "{%+ if true %}"
        );
    }

    #[test]
    fn values_print_and_serialise_like_python() {
        let src = "{{ tools is iterable }} {{ foo is iterable }} {{ tools }} {{ documents is none }} {{ [1, 'a'] }} {{ bos_token }} {{ 1.0 }} {{ none|string }} {{ eos_token is defined }}";
        assert_eq!(
            render(src, &[], false).unwrap(),
            "False True None True [1, 'a'] <s> 1.0 None False"
        );
        let src = "{{ {'b': [1, 2.5, none, true], 'a': 'é<\"\n'}|tojson }}|{{ {'b': 1, 'a': {}}|tojson(indent=2, sort_keys=true) }}|{{ 'é'|tojson(true) }}|{{ [1]|tojson(separators=(',', ':')) }}";
        assert_eq!(
            render(src, &[], false).unwrap(),
            "{\"b\": [1, 2.5, null, true], \"a\": \"é<\\\"\\n\"}|{\n  \"a\": {},\n  \"b\": 1\n}|\"\\u00e9\"|[1]"
        );
    }

    #[test]
    fn globals_and_python_methods_exist() {
        let src = "{% set ns = namespace(n=0, found=false) %}{% for m in messages[::-1] %}{% if m.content.startswith('x') %}{% set ns.n = ns.n + 1 %}{% break %}{% endif %}{% endfor %}{{ ns.n }} {{ dict(a=1).a }} {{ strftime_now('%Y')|length }} {{ ' a\u{1f}'.strip()|length }} {{ 'ab cd'.title() }} {{ 'a  b'.split()|length }}";
        assert_eq!(
            render(src, &[msg("user", "xa"), msg("user", "xb")], false).unwrap(),
            "1 1 4 1 Ab Cd 2"
        );
        let err = render("{% set ns = namespace(_x=1) %}", &[], false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("underscore-prefixed"), "{err}");
    }

    #[test]
    fn raised_errors_name_the_row_the_template_and_the_message() {
        let src = "{% if messages[0].role == 'system' %}\n{{ raise_exception('System role not supported') }}\n{% endif %}";
        let err = render(src, &[msg("system", "x")], false)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("`x.jsonl` line 1"), "{err}");
        assert!(
            err.contains("raised an error at line 2: System role not supported"),
            "{err}"
        );
        assert!(err.contains("the chat template (sha256 "), "{err}");
    }

    #[test]
    fn runaway_templates_stop_quickly() {
        let started = std::time::Instant::now();
        let fuel = [
            "{% for i in range(10000) %}{% for j in range(10000) %}{% set x = i * j %}{% endfor %}{% endfor %}",
            "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
            "{% set x = 'x' * 100000000 %}",
        ];
        for src in fuel {
            let err = render(src, &[msg("user", "hi")], false)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("ran past its budget of 1002006 fuel"),
                "{src}: {err}"
            );
        }
        let src = "{% for i in range(20000) %}{{ messages[0].content }}{% endfor %}";
        let err = render(src, &[msg("user", &"y".repeat(100))], false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("rendered more than 1049408 bytes"), "{err}");
        assert!(
            started.elapsed().as_secs_f64() < 5.0,
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn long_conversations_get_a_larger_budget() {
        let long = "word ".repeat(400_000);
        let src = "{% for m in messages %}{{ m.content|trim }}{% endfor %}";
        let out = render(src, &[msg("user", &long), msg("assistant", &long)], false).unwrap();
        assert_eq!(out.len(), 2 * (long.len() - 1));
        let many: Vec<Message> = (0..3000).map(|i| msg("user", &i.to_string())).collect();
        let src = "{% for m in messages %}{% if m.role == 'user' %}{{ m.content.strip() ~ ' ' }}{% endif %}{% endfor %}";
        assert!(render(src, &many, false).is_ok());
    }

    #[test]
    fn other_errors_name_the_template_line_and_kind() {
        let err = render(
            "{{ messages[0].content.nosuchmethod() }}",
            &[msg("user", "x")],
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("the chat template (sha256 "), "{err}");
        assert!(err.contains("failed at line 1: unknown method"), "{err}");
        let err = ChatTemplate::new("{% if %}", vec![])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("does not compile: syntax error"), "{err}");
    }
}
