//! Python semantics that chat templates see through Jinja2 in transformers: `str()` of values,
//! `str.strip`/`split`/`title` (Python's whitespace), `json.dumps` (transformers' `tojson`)
//! and `datetime.now().strftime` (`strftime_now`).

use std::fmt::Write as _;

use minijinja::value::{from_args, Kwargs, Rest, ValueKind, ValueOrKwargs};
use minijinja::{Error, ErrorKind, State, Value};

/// Python's `str.isspace()` for one character: Rust's Unicode White_Space plus the
/// information separators U+001C..U+001F.
pub fn is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `str.strip()` / `lstrip()` / `rstrip()` with an optional set of characters (None: whitespace).
pub fn strip(s: &str, chars: Option<&str>, left: bool, right: bool) -> String {
    let matches = |c: char| match chars {
        Some(set) => set.contains(c),
        None => is_space(c),
    };
    let mut out = s;
    if left {
        out = out.trim_start_matches(matches);
    }
    if right {
        out = out.trim_end_matches(matches);
    }
    out.to_string()
}

/// `str.split()` without a separator: runs of whitespace, at most `maxsplit` splits (< 0: all).
pub fn split_whitespace(s: &str, maxsplit: i64) -> Vec<String> {
    let mut parts = Vec::new();
    let mut rest = s.trim_start_matches(is_space);
    while !rest.is_empty() {
        if maxsplit >= 0 && parts.len() as i64 >= maxsplit {
            parts.push(rest.to_string());
            break;
        }
        let end = rest.find(is_space).unwrap_or(rest.len());
        parts.push(rest[..end].to_string());
        rest = rest[end..].trim_start_matches(is_space);
    }
    parts
}

/// `str.title()`: a cased character after an uncased one starts a word.
pub fn title(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut prev_cased = false;
    for c in s.chars() {
        let cased = c.is_lowercase() || c.is_uppercase();
        if prev_cased {
            out.extend(c.to_lowercase());
        } else {
            out.extend(c.to_uppercase());
        }
        prev_cased = cased;
    }
    out
}

/// `repr(float)`: the shortest round-trip digits, in exponent form below 1e-4 and from 1e16.
pub fn float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.into();
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').expect("LowerExp has an exponent");
    let exp: i32 = exp.parse().expect("LowerExp exponent is an integer");
    if f != 0.0 && !(-4..16).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exp.abs());
    }
    let plain = format!("{f}");
    if plain.contains('.') {
        plain
    } else {
        plain + ".0"
    }
}

fn number_str(v: &Value) -> String {
    if v.is_integer() {
        v.to_string()
    } else {
        f64::try_from(v.clone()).map_or_else(|_| v.to_string(), float_repr)
    }
}

/// `repr(str)`: single quotes unless the text holds `'` and no `"`.
fn str_repr(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// `str(value)` (`repr` inside containers), as Jinja2 prints `{{ value }}`.
pub fn py_str(v: &Value, out: &mut String) {
    write_py(v, out, false);
}

fn write_py(v: &Value, out: &mut String, nested: bool) {
    match v.kind() {
        ValueKind::Undefined if !nested => {}
        ValueKind::None | ValueKind::Undefined => out.push_str("None"),
        ValueKind::Bool => out.push_str(if v.is_true() { "True" } else { "False" }),
        ValueKind::Number => out.push_str(&number_str(v)),
        ValueKind::String if nested => str_repr(v.as_str().unwrap_or_default(), out),
        ValueKind::String => out.push_str(v.as_str().unwrap_or_default()),
        ValueKind::Seq => {
            out.push('[');
            for (i, item) in v.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_py(&item, out, true);
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in v.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_py(&key, out, true);
                out.push_str(": ");
                write_py(&v.get_item(&key).unwrap_or_default(), out, true);
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{v}");
        }
    }
}

/// How `json.dumps` lays out its output.
struct JsonStyle {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

fn type_error(message: String) -> Error {
    Error::new(ErrorKind::InvalidOperation, message)
}

impl JsonStyle {
    /// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
    fn from_args(positional: [Option<Value>; 4], kwargs: &Kwargs) -> Result<JsonStyle, Error> {
        const NAMES: [&str; 4] = ["ensure_ascii", "indent", "separators", "sort_keys"];
        let mut args: [Option<Value>; 4] = positional;
        for (slot, name) in args.iter_mut().zip(NAMES) {
            if kwargs.has(name) {
                if slot.is_some() {
                    return Err(type_error(format!(
                        "tojson() got multiple values for argument '{name}'"
                    )));
                }
                *slot = Some(kwargs.get::<Value>(name)?);
            }
        }
        kwargs.assert_all_used()?;
        let [ensure_ascii, indent, separators, sort_keys] =
            args.map(|a| a.filter(|v| !v.is_none()));
        let indent = match indent {
            None => None,
            Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or("").to_string()),
            Some(v) => match v.as_i64() {
                Some(n) => Some(" ".repeat(n.clamp(0, 64) as usize)),
                None => {
                    return Err(type_error(format!(
                        "tojson: indent must be an int or a string, not {}",
                        v.kind()
                    )))
                }
            },
        };
        let (item_sep, key_sep) = match separators {
            None if indent.is_some() => (",".to_string(), ": ".to_string()),
            None => (", ".to_string(), ": ".to_string()),
            Some(v) => {
                let parts: Vec<Value> = v.try_iter()?.collect();
                match parts.as_slice() {
                    [a, b] if a.as_str().is_some() && b.as_str().is_some() => {
                        (a.to_string(), b.to_string())
                    }
                    _ => return Err(type_error("tojson: separators must be two strings".into())),
                }
            }
        };
        Ok(JsonStyle {
            ensure_ascii: ensure_ascii.is_some_and(|v| v.is_true()),
            indent,
            item_sep,
            key_sep,
            sort_keys: sort_keys.is_some_and(|v| v.is_true()),
        })
    }
}

fn json_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !(' '..='~').contains(&c)) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn json_number(v: &Value) -> String {
    if v.is_integer() {
        return v.to_string();
    }
    match f64::try_from(v.clone()) {
        Ok(f) if f.is_nan() => "NaN".into(),
        Ok(f) if f.is_infinite() => if f > 0.0 { "Infinity" } else { "-Infinity" }.into(),
        Ok(f) => float_repr(f),
        Err(_) => v.to_string(),
    }
}

/// A mapping key as `json.dumps` writes it (keys become strings).
fn json_key(k: &Value) -> Result<String, Error> {
    Ok(match k.kind() {
        ValueKind::String => k.as_str().unwrap_or_default().to_string(),
        ValueKind::Number => json_number(k),
        ValueKind::Bool => if k.is_true() { "true" } else { "false" }.into(),
        ValueKind::None => "null".into(),
        other => {
            return Err(type_error(format!(
                "tojson: keys must be str, int, float, bool or None, not {other}"
            )))
        }
    })
}

fn json_dump(
    v: &Value,
    style: &JsonStyle,
    level: usize,
    state: &State,
    out: &mut String,
) -> Result<(), Error> {
    state.consume_fuel(1)?;
    match v.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&json_number(v)),
        ValueKind::String => json_str(v.as_str().unwrap_or_default(), style.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Map => {
            let is_map = v.kind() == ValueKind::Map;
            let mut items: Vec<(Option<String>, Value)> = Vec::new();
            for item in v.try_iter()? {
                items.push(if is_map {
                    (Some(json_key(&item)?), v.get_item(&item)?)
                } else {
                    (None, item)
                });
            }
            if is_map && style.sort_keys {
                items.sort_by(|a, b| a.0.cmp(&b.0));
            }
            let (open, close) = if is_map { ('{', '}') } else { ('[', ']') };
            out.push(open);
            if items.is_empty() {
                out.push(close);
                return Ok(());
            }
            let newline = |out: &mut String, level: usize| {
                if let Some(indent) = &style.indent {
                    out.push('\n');
                    for _ in 0..level {
                        out.push_str(indent);
                    }
                }
            };
            for (i, (key, item)) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, level + 1);
                if let Some(key) = key {
                    json_str(key, style.ensure_ascii, out);
                    out.push_str(&style.key_sep);
                }
                json_dump(item, style, level + 1, state, out)?;
            }
            newline(out, level);
            out.push(close);
        }
        other => {
            return Err(type_error(format!(
                "tojson: object of type {other} is not JSON serializable"
            )))
        }
    }
    Ok(())
}

/// transformers' `tojson` filter: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, arguments by position or by name.
pub fn tojson(state: &State, value: &Value, args: Rest<ValueOrKwargs>) -> Result<String, Error> {
    let args = args.into_values();
    let (positional, kwargs) = from_args::<(&[Value], Kwargs)>(&args)?;
    if positional.len() > 4 {
        return Err(type_error(format!(
            "tojson() takes at most 5 arguments ({} given)",
            positional.len() + 1
        )));
    }
    let mut slots: [Option<Value>; 4] = Default::default();
    for (slot, v) in slots.iter_mut().zip(positional) {
        *slot = Some(v.clone());
    }
    let style = JsonStyle::from_args(slots, &kwargs)?;
    let mut out = String::new();
    json_dump(value, &style, 0, state, &mut out)?;
    Ok(out)
}

extern "C" {
    /// POSIX: reads `TZ` (or /etc/localtime) for localtime_r.
    fn tzset();
}

/// Python's `datetime.now().strftime(format)`: local time, C locale. A naive datetime, so
/// `%z` and `%Z` give nothing and `%f` the microseconds, as Python substitutes them.
pub fn strftime_now(format: &str) -> Result<String, Error> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| type_error(format!("strftime_now: the clock is before 1970 ({e})")))?;
    let mut fmt = String::with_capacity(format.len());
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            fmt.push(c);
            continue;
        }
        match chars.next() {
            Some('f') => fmt.push_str(&format!("{:06}", now.subsec_micros())),
            Some('z') | Some('Z') => {}
            Some(d) => {
                fmt.push('%');
                fmt.push(d);
            }
            None => fmt.push('%'),
        }
    }
    let fmt = std::ffi::CString::new(fmt)
        .map_err(|_| type_error("strftime_now: embedded null character".into()))?;
    let secs = now.as_secs() as libc::time_t;
    // SAFETY: `tm` is plain data filled by localtime_r; strftime writes at most `buf.len()`
    // bytes into `buf` and returns how many it wrote; `fmt` is NUL-terminated.
    unsafe {
        tzset();
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&secs, &mut tm).is_null() {
            return Err(type_error("strftime_now: no local time".into()));
        }
        let mut size = 256usize;
        loop {
            let mut buf = vec![0u8; size];
            let n = libc::strftime(buf.as_mut_ptr().cast(), buf.len(), fmt.as_ptr(), &tm);
            if n > 0 || size >= 256 * fmt.as_bytes().len().max(1) {
                buf.truncate(n);
                return Ok(String::from_utf8_lossy(&buf).into_owned());
            }
            size *= 2;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_like_python_repr() {
        for (f, want) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e-5, "1e-05"),
            (1.5e20, "1.5e+20"),
            (1e16, "1e+16"),
            (123456789012345.0, "123456789012345.0"),
            (0.0001, "0.0001"),
            (0.0, "0.0"),
        ] {
            assert_eq!(float_repr(f), want, "{f}");
        }
    }

    #[test]
    fn whitespace_is_pythons() {
        assert_eq!(strip("\u{1c} a \u{3000}\n", None, true, true), "a");
        assert_eq!(strip("xxaxx", Some("x"), true, false), "axx");
        assert_eq!(split_whitespace("  a b\u{1f}c  ", -1), ["a", "b", "c"]);
        assert_eq!(split_whitespace("  a b  c  ", 1), ["a", "b  c  "]);
        assert_eq!(
            title("they're bill's friends from the UK"),
            "They'Re Bill'S Friends From The Uk"
        );
    }

    #[test]
    fn python_str_of_values() {
        let list = Value::from(vec![
            Value::from(1),
            Value::from("it's"),
            Value::from(()),
            Value::from(true),
        ]);
        let v = Value::from_pairs([("a", list), ("b", Value::from(1.5))]);
        let mut s = String::new();
        py_str(&v, &mut s);
        assert_eq!(s, r#"{'a': [1, "it's", None, True], 'b': 1.5}"#);
    }

    #[test]
    fn strftime_handles_python_directives() {
        let s = strftime_now("%Y|%z|%Z|%f|%%").unwrap();
        let parts: Vec<&str> = s.split('|').collect();
        assert_eq!(parts.len(), 5, "{s}");
        assert_eq!(parts[0].len(), 4);
        assert_eq!((parts[1], parts[2], parts[4]), ("", "", "%"));
        assert_eq!(parts[3].len(), 6);
    }
}
