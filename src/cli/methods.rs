//! `mergesmith methods`: the merge methods and their parameters (from the method registry).

use clap::Args;
use mergesmith::error::Result;
use mergesmith::merge::method::REGISTRY;

use super::print_json;

/// Arguments of `methods`.
#[derive(Debug, Args)]
pub struct MethodsArgs {
    /// Print JSON instead of the Markdown table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `methods`.
pub fn run(a: MethodsArgs) -> Result<()> {
    if a.json {
        let all: Vec<_> = REGISTRY
            .iter()
            .map(|m| {
                serde_json::json!({
                    "name": m.name,
                    "summary": m.summary,
                    "takes": m.takes_text(),
                    "formula": m.formula,
                    "definition": m.source,
                    "parameters": m.params.iter().map(|p| serde_json::json!({
                        "name": p.name,
                        "doc": p.doc,
                        "default": p.default_text(),
                        "range": p.range_text(),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        return print_json(&all);
    }
    print!("{}", mergesmith::merge::method::markdown());
    Ok(())
}
