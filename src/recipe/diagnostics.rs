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
    /// The recipe file it is in.
    pub path: PathBuf,
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

/// All errors found in one recipe (and the files it includes).
#[derive(Debug, Clone)]
pub struct RecipeErrors {
    /// Every file read: path and text; positions refer to `sources[current]`.
    sources: Vec<(PathBuf, String)>,
    current: usize,
    /// The errors, in file order.
    pub errors: Vec<RecipeError>,
}

impl RecipeErrors {
    /// An empty collection for `text` read from `path`.
    pub fn new(path: &Path, text: &str) -> Self {
        RecipeErrors {
            sources: vec![(path.to_path_buf(), text.to_string())],
            current: 0,
            errors: Vec::new(),
        }
    }

    /// Registers another file (an include); returns its index for [`RecipeErrors::at`].
    pub fn add_source(&mut self, path: &Path, text: &str) -> usize {
        self.sources.push((path.to_path_buf(), text.to_string()));
        self.sources.len() - 1
    }

    /// Every file read (the recipe and the files it includes), for `watch`.
    pub fn files(&self) -> Vec<PathBuf> {
        self.sources.iter().map(|(p, _)| p.clone()).collect()
    }

    /// The source positions currently refer to.
    pub fn current(&self) -> usize {
        self.current
    }

    /// The path of source `i`.
    pub fn source_path(&self, i: usize) -> &Path {
        &self.sources[i.min(self.sources.len() - 1)].0
    }

    /// Makes positions of later `push` calls refer to source `i`.
    pub fn at(&mut self, i: usize) -> &mut Self {
        self.current = i.min(self.sources.len() - 1);
        self
    }

    /// Adds the errors of another collection (say, a YAML error in an included file).
    pub fn extend(&mut self, other: RecipeErrors) {
        self.errors.extend(other.errors);
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
        let (path, text) = &self.sources[self.current];
        let span = loc.span();
        let offset = span.byte_offset().unwrap_or(span.offset()) as usize;
        let len = span.byte_len().unwrap_or(span.len()).max(1) as usize;
        let offset = offset.min(text.len());
        let len = len.min(text.len() - offset);
        self.errors.push(RecipeError {
            message,
            path: path.clone(),
            line: loc.line(),
            column: loc.column(),
            source_code: NamedSource::new(path.display().to_string(), text.clone()),
            span: Some(SourceSpan::new(offset.into(), len)),
            help,
        });
    }

    /// Records an error without a position.
    pub fn push_plain(&mut self, message: String) {
        let (path, text) = &self.sources[self.current];
        self.errors.push(RecipeError {
            message,
            path: path.clone(),
            line: 0,
            column: 0,
            source_code: NamedSource::new(path.display().to_string(), text.clone()),
            span: None,
            help: None,
        });
    }

    /// `Err(self)` if any error was recorded.
    pub fn finish(mut self) -> Result<(), RecipeErrors> {
        if self.errors.is_empty() {
            return Ok(());
        }
        let order: Vec<PathBuf> = self.sources.iter().map(|s| s.0.clone()).collect();
        let file = |p: &PathBuf| order.iter().position(|o| o == p).unwrap_or(0);
        self.errors
            .sort_by_key(|e| (file(&e.path), e.line, e.column));
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
            format!("{}:{}:{}", e.path.display(), e.line, e.column)
        } else {
            e.path.display().to_string()
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

impl crate::error::Located for RecipeErrors {
    fn render(&self) -> String {
        RecipeErrors::render(self)
    }
}

/// For "unknown field `x`, expected one of a, b, c": the closest expected name.
fn hint_for_unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let (field, expected) = rest.split_once('`')?;
    let list = expected.split_once("expected one of ")?.1;
    let names = list.split(", ").map(|n| n.trim_matches('`'));
    crate::text::nearest(field, names).map(|n| format!("did you mean `{n}`?"))
}
