//! Recipe errors that point: `file:line:column`, a caret snippet, and a hint.

use std::fmt;
use std::path::{Path, PathBuf};

use miette::{Diagnostic, GraphicalReportHandler, GraphicalTheme, NamedSource, SourceSpan};
use serde_saphyr::Location;

/// One error in a recipe.
#[derive(Debug, Clone, thiserror::Error, Diagnostic)]
#[error("{message}")]
pub struct RecipeError {
    /// What is wrong.
    pub message: String,
    /// 1-based line, 0 when unknown.
    pub line: u64,
    /// 1-based column, 0 when unknown.
    pub column: u64,
    #[source_code]
    source_code: NamedSource<String>,
    #[label("here")]
    span: Option<SourceSpan>,
    /// A suggestion.
    #[help]
    pub help: Option<String>,
}

/// All errors found in one recipe.
#[derive(Debug, Clone)]
pub struct RecipeErrors {
    path: PathBuf,
    text: String,
    /// The errors, in file order.
    pub errors: Vec<RecipeError>,
}

impl RecipeErrors {
    /// An empty collection for `text` read from `path`.
    pub fn new(path: &Path, text: &str) -> Self {
        RecipeErrors {
            path: path.to_path_buf(),
            text: text.to_string(),
            errors: Vec::new(),
        }
    }

    /// A recipe that could not be read at all.
    pub fn io(path: &Path, e: &std::io::Error) -> Self {
        let mut s = Self::new(path, "");
        s.push_plain(format!("cannot read recipe: {e}"));
        s
    }

    /// A YAML syntax or type error from the parser.
    pub fn yaml(path: &Path, text: &str, e: &serde_saphyr::Error) -> Self {
        let mut s = Self::new(path, text);
        // The bare message: the snippet and "line N column M" are rendered by us.
        let full = e.without_snippet().to_string();
        let mut message = full.lines().next().unwrap_or_default().trim();
        message = message.strip_prefix("error: ").unwrap_or(message);
        if message.starts_with("line ") {
            message = message.split_once(": ").map(|(_, m)| m).unwrap_or(message);
        }
        let message = message
            .split(" at line ")
            .next()
            .unwrap_or(message)
            .to_string();
        let help = hint_for_unknown_field(&message);
        match e.location() {
            Some(loc) => s.push(&loc, message, help),
            None => s.push_plain(message),
        }
        s
    }

    /// Records an error at `loc`.
    pub fn push(&mut self, loc: &Location, message: String, help: Option<String>) {
        let span = loc.span();
        let offset = span.byte_offset().unwrap_or(span.offset()) as usize;
        let len = span.byte_len().unwrap_or(span.len()).max(1) as usize;
        let offset = offset.min(self.text.len());
        let len = len.min(self.text.len() - offset);
        self.errors.push(RecipeError {
            message,
            line: loc.line(),
            column: loc.column(),
            source_code: NamedSource::new(self.path.display().to_string(), self.text.clone()),
            span: Some(SourceSpan::new(offset.into(), len)),
            help,
        });
    }

    /// Records an error without a position.
    pub fn push_plain(&mut self, message: String) {
        self.errors.push(RecipeError {
            message,
            line: 0,
            column: 0,
            source_code: NamedSource::new(self.path.display().to_string(), self.text.clone()),
            span: None,
            help: None,
        });
    }

    /// `Err(self)` if any error was recorded.
    pub fn finish(mut self) -> Result<(), RecipeErrors> {
        if self.errors.is_empty() {
            return Ok(());
        }
        self.errors.sort_by_key(|e| (e.line, e.column));
        Err(self)
    }

    /// Renders every error with its snippet (no colours), for terminals and tests.
    pub fn render(&self) -> String {
        let handler =
            GraphicalReportHandler::new_themed(GraphicalTheme::unicode_nocolor()).with_width(100);
        let mut out = String::new();
        for e in &self.errors {
            if e.span.is_some() {
                // miette's box header carries file:line:column.
                let _ = handler.render_report(&mut out, e);
            } else {
                out.push_str(&format!("{}: error: {}\n", self.location_of(e), e.message));
                if let Some(h) = &e.help {
                    out.push_str(&format!("  help: {h}\n"));
                }
            }
        }
        out
    }

    fn location_of(&self, e: &RecipeError) -> String {
        if e.line > 0 {
            format!("{}:{}:{}", self.path.display(), e.line, e.column)
        } else {
            self.path.display().to_string()
        }
    }
}

impl fmt::Display for RecipeErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self
            .errors
            .iter()
            .map(|e| {
                let help = e
                    .help
                    .as_ref()
                    .map(|h| format!(" ({h})"))
                    .unwrap_or_default();
                format!("{}: {}{help}", self.location_of(e), e.message)
            })
            .collect();
        f.write_str(&lines.join("\n"))
    }
}

impl std::error::Error for RecipeErrors {}

/// For "unknown field `x`, expected one of a, b, c": the closest expected name.
fn hint_for_unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let (field, expected) = rest.split_once('`')?;
    let list = expected.split_once("expected one of ")?.1;
    let names = list.split(", ").map(|n| n.trim_matches('`'));
    crate::merge::weights::nearest(field, names).map(|n| format!("did you mean `{n}`?"))
}
