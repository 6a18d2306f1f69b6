//! Chat templates: how OpenAI-style `(role, content)` messages become the instruction text, the
//! one place `iapt run --chat`, `iapt batch --chat` and `iapt serve`'s `/v1/chat/completions` render
//! a conversation.
//!
//! A template is one of two kinds, as in llama-server:
//! - **Jinja**, rendered with `minijinja` (with `minijinja-contrib`'s Python-compatible string and
//!   dict methods, which the templates shipped in real GGUFs call): the GGUF's own
//!   `tokenizer.chat_template` (as llama-server's `--jinja`, its default), or a file given with
//!   `--chat-template FILE`. The variables are Hugging Face's: `messages` (each `{role, content}`),
//!   `add_generation_prompt` (true), `bos_token`, `eos_token`; and `raise_exception(msg)`, which a
//!   template calls to refuse a conversation (the message reaches the client). The model's own
//!   template is the truth: llama.cpp's built-in look-alike of a format can differ from it (the
//!   Llama 2 fixture's template drops system messages; llama.cpp's `llama2` keeps them).
//! - **llama.cpp's built-in formats** (`llama_chat_apply_template`) by name (`chatml`, `llama3`,
//!   `gemma`, ..., [`iapt_llama::builtin_chat_templates`]) with `--chat-template NAME`, and for a
//!   GGUF template that minijinja cannot compile but llama.cpp recognises.
//!
//! The rendered text is tokenized with special-token text parsed; BOS is added as the model says,
//! unless the rendered text already starts with it (a Jinja template that writes `{{ bos_token }}`,
//! as Llama's do, must not get a second one).
//!
//! For IAPT the instruction is the whole rendered text, generation prompt included: the adapter's
//! soft tokens follow the assistant prefix, as they follow a completions prompt.

use std::path::Path;

use iapt_llama::{LlamaError, Model};
use minijinja::{Environment, ErrorKind, Value};

/// The template's name inside the Jinja environment.
const JINJA_NAME: &str = "chat";

/// Why a chat template cannot be built or applied.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The model has no template and none was given.
    #[error("the model has no chat template: give one with --chat-template NAME|FILE (built-in names: {names})")]
    NoTemplate {
        /// llama.cpp's built-in names, comma-separated.
        names: String,
    },
    /// `--chat-template` is neither a built-in name nor a readable file.
    #[error("--chat-template {value:?}: not a llama.cpp built-in template ({names}) and not a readable file: {source}")]
    Unknown {
        /// What was given.
        value: String,
        /// llama.cpp's built-in names, comma-separated.
        names: String,
        /// Why the file could not be read.
        source: std::io::Error,
    },
    /// A Jinja template does not compile.
    #[error("chat template {origin}: {detail}")]
    Syntax {
        /// Where the template came from (a file, or the GGUF).
        origin: String,
        /// minijinja's message, with the line.
        detail: String,
    },
    /// The template refused or failed on these messages (`raise_exception`, an undefined
    /// function, ...), or llama.cpp could not apply its own template.
    #[error("{detail}")]
    Render {
        /// What the template or llama.cpp said.
        detail: String,
    },
}

/// A chat template, ready to render (see the module doc).
#[derive(Debug)]
pub struct ChatTemplate {
    kind: Kind,
    origin: String,
}

#[derive(Debug)]
enum Kind {
    /// A name or template text that llama.cpp's `llama_chat_apply_template` applies.
    Llama(String),
    /// A compiled Jinja template (the environment holds it under [`JINJA_NAME`]).
    Jinja(Box<Environment<'static>>),
}

/// A rendered conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The instruction text.
    pub text: String,
    /// Whether tokenizing it adds BOS/EOS as the model says (false when the text starts with BOS).
    pub add_special: bool,
}

fn builtin_names() -> String {
    iapt_llama::builtin_chat_templates().join(", ")
}

/// Whether `value` is one of llama.cpp's built-in template names.
fn is_builtin(value: &str) -> bool {
    iapt_llama::builtin_chat_templates().iter().any(|n| n == value)
}

impl ChatTemplate {
    /// `--chat-template VALUE`: a llama.cpp built-in name, else a Jinja template file.
    pub fn from_arg(value: &str) -> Result<ChatTemplate, ChatError> {
        if is_builtin(value) {
            return Ok(ChatTemplate { kind: Kind::Llama(value.to_owned()), origin: format!("llama.cpp built-in {value:?}") });
        }
        let source = std::fs::read_to_string(Path::new(value)).map_err(|source| ChatError::Unknown {
            value: value.to_owned(),
            names: builtin_names(),
            source,
        })?;
        ChatTemplate::jinja(source, format!("file {value}"))
    }

    /// Checks a `--chat-template` value before any work: a built-in name, or a file that exists
    /// ([`ChatError::Unknown`] otherwise; the file is read and compiled by [`ChatTemplate::from_arg`]).
    pub fn check_arg(value: &str) -> Result<(), ChatError> {
        match is_builtin(value) {
            true => Ok(()),
            false => std::fs::metadata(value).map(|_| ()).map_err(|source| ChatError::Unknown {
                value: value.to_owned(),
                names: builtin_names(),
                source,
            }),
        }
    }

    /// The model's own template (GGUF `tokenizer.chat_template`) as Jinja; when minijinja cannot
    /// compile it, llama.cpp's built-in format it recognises, else the Jinja error. `None` when
    /// the model has none.
    pub fn from_model(model: &Model) -> Result<Option<ChatTemplate>, ChatError> {
        let Some(text) = model.chat_template() else { return Ok(None) };
        match ChatTemplate::jinja(text.clone(), "the model's (GGUF tokenizer.chat_template), Jinja".to_owned()) {
            Ok(t) => Ok(Some(t)),
            Err(e) if iapt_llama::apply_chat_template_named(&text, &[("user", "x")]).is_ok() => {
                let origin = format!("the model's (GGUF), as llama.cpp's built-in format renders it (minijinja: {e})");
                Ok(Some(ChatTemplate { kind: Kind::Llama(text), origin }))
            }
            Err(e) => Err(e),
        }
    }

    /// The template a command uses: `--chat-template` if given, else the model's.
    pub fn resolve(arg: Option<&str>, model: &Model) -> Result<ChatTemplate, ChatError> {
        match arg {
            Some(v) => ChatTemplate::from_arg(v),
            None => ChatTemplate::from_model(model)?.ok_or_else(|| ChatError::NoTemplate { names: builtin_names() }),
        }
    }

    /// A Jinja template from its source; `origin` names it in errors.
    pub fn jinja(source: String, origin: String) -> Result<ChatTemplate, ChatError> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned(JINJA_NAME, source).map_err(|e| ChatError::Syntax { origin: origin.clone(), detail: detail(&e) })?;
        Ok(ChatTemplate { kind: Kind::Jinja(Box::new(env)), origin })
    }

    /// Where the template came from, in words (for the server's start line and errors).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Renders `messages` with the generation prompt (see the module doc for BOS).
    pub fn render(&self, model: &Model, messages: &[(&str, &str)]) -> Result<Rendered, ChatError> {
        match &self.kind {
            Kind::Llama(t) => {
                iapt_llama::apply_chat_template_named(t, messages).map(|text| Rendered { text, add_special: true }).map_err(|e| match e {
                    LlamaError::ChatTemplate { detail } => ChatError::Render { detail },
                    other => ChatError::Render { detail: other.to_string() },
                })
            }
            Kind::Jinja(env) => {
                let piece = |t: Option<iapt_llama::Token>| {
                    t.map(|t| String::from_utf8_lossy(&model.token_text(t)).into_owned()).unwrap_or_default()
                };
                let bos = piece(model.bos());
                let msgs: Vec<Value> =
                    messages.iter().map(|(role, content)| minijinja::context! { role => *role, content => *content }).collect();
                let ctx = minijinja::context! {
                    messages => msgs,
                    add_generation_prompt => true,
                    bos_token => bos.clone(),
                    eos_token => piece(model.eos()),
                };
                let tmpl = env.get_template(JINJA_NAME).map_err(|e| ChatError::Render { detail: detail(&e) })?;
                let text = tmpl.render(ctx).map_err(|e| ChatError::Render { detail: detail(&e) })?;
                let starts_with_bos = !bos.is_empty() && text.starts_with(&bos);
                Ok(Rendered { add_special: !(starts_with_bos && model.add_bos()), text })
            }
        }
    }
}

/// minijinja's message: for `raise_exception`, the template's own words; otherwise the kind, the
/// detail and the line.
fn detail(e: &minijinja::Error) -> String {
    match (e.kind(), e.detail(), e.line()) {
        (ErrorKind::InvalidOperation, Some(d), _) => d.to_owned(),
        (_, _, Some(line)) => format!("{e} (template line {line})"),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jinja_syntax_error_names_the_origin() {
        let e = ChatTemplate::jinja("{% for m in messages %}".to_owned(), "file t.jinja".to_owned()).unwrap_err();
        assert!(matches!(&e, ChatError::Syntax { origin, .. } if origin == "file t.jinja"), "{e}");
    }

    #[test]
    fn an_unknown_name_that_is_no_file_lists_the_builtin_names() {
        let e = ChatTemplate::from_arg("no-such-template-or-file").unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ChatError::Unknown { .. }));
        assert!(msg.contains("chatml") && msg.contains("llama3"), "{msg}");
    }

    #[test]
    fn a_builtin_name_is_llama_cpps() {
        let t = ChatTemplate::from_arg("chatml").unwrap();
        assert!(matches!(t.kind, Kind::Llama(ref n) if n == "chatml"));
    }
}
