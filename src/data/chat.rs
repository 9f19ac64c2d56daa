//! Hugging Face chat templates (from `tokenizer_config.json`), rendered with minijinja.

use std::path::Path;

use minijinja::{context, Environment, Error, ErrorKind};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{DataError, Message, RowRef};

/// A compiled chat template and the special-token strings it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// sha256 of the template source (recorded in shard metadata).
    pub sha256: String,
}

fn token_text(cfg: &Value, key: &str) -> String {
    match cfg.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
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
        let cfg: Value = serde_json::from_str(&text).map_err(|e| DataError::Template {
            message: format!("`{}` is not valid JSON: {e}", path.display()),
        })?;
        let source = match cfg.get("chat_template") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_string)
                .ok_or_else(|| DataError::Template {
                    message: format!(
                        "`{}` has named chat templates but none called `default`",
                        path.display()
                    ),
                })?,
            _ => return Ok(None),
        };
        Self::new(
            &source,
            token_text(&cfg, "bos_token"),
            token_text(&cfg, "eos_token"),
        )
        .map(Some)
    }

    pub fn new(
        source: &str,
        bos_token: String,
        eos_token: String,
    ) -> Result<ChatTemplate, DataError> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| DataError::Template {
                message: format!("the chat template does not compile: {e}"),
            })?;
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
            sha256: Sha256::digest(source.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        })
    }

    /// Renders `messages`; `add_generation_prompt` opens an assistant turn at the end.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        at: &RowRef,
    ) -> Result<String, DataError> {
        let msgs: Vec<minijinja::Value> = messages
            .iter()
            .map(|m| {
                minijinja::Value::from_pairs([
                    ("role", minijinja::Value::from(m.role.as_str())),
                    ("content", minijinja::Value::from(m.content.as_str())),
                ])
            })
            .collect();
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| DataError::Template {
                message: e.to_string(),
            })?;
        template
            .render(context! {
                messages => msgs,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
            })
            .map_err(|e| DataError::Render {
                at: at.clone(),
                message: e.to_string(),
            })
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
        let t = ChatTemplate::new(src, String::new(), "<|im_end|>".into()).unwrap();
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
        let t = ChatTemplate::new(src, String::new(), String::new()).unwrap();
        assert_eq!(t.render(&[msg("user", "  x ")], false, &at()).unwrap(), "x");
        let err = t
            .render(&[msg("system", "x")], false, &at())
            .unwrap_err()
            .to_string();
        assert!(err.contains("first must be user"), "{err}");
    }
}
