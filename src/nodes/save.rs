//! `save: NODE`: a node's result written to a file (a copy or reflink of the cached result,
//! or a hard link), never replacing a file the recipe did not write unless told to.

use std::path::{Path, PathBuf};

use serde_json::Value;
use serde_saphyr::Spanned;

use super::decl::{Link, NodeDecl};
use super::{preimage_value, InputKey};
use super::{
    CheckCx, Header, HitCx, Input, KeyCx, Kind, Makes, Node, NodeKind, Outcome, ParseCx, RunCx,
    Want,
};
use crate::error::Result;

/// The `save` kind.
pub static KIND: Kind = Kind {
    name: "save",
    usage: "`save: NODE`",
    fields: &["to", "overwrite", "link"],
    hint: None,
    makes: Makes::File,
    declared: |d| d.save.is_some(),
    parse,
};

/// Writing a node's result to a file.
#[derive(Debug, Clone)]
pub struct SaveNode {
    /// The node saved.
    pub from: String,
    /// Destination (absolute, resolved against the recipe directory).
    pub to: PathBuf,
    /// Replace a file mergesmith did not write.
    pub overwrite: bool,
    /// How the file is made.
    pub link: Link,
}

fn parse(name: &str, decl: &Spanned<NodeDecl>, cx: &mut dyn ParseCx) -> Option<Node> {
    let d = &decl.value;
    let from = cx.resolve(d.save.as_ref()?, Want::Any);
    let from = match from? {
        Input::Node(n) => n,
        Input::Model(m) => {
            cx.error(
                &d.save.as_ref()?.referenced,
                format!("`{m}` is a model: `save` takes a node"),
                None,
            );
            return None;
        }
    };
    let Some(to) = &d.to else {
        cx.error(
            &decl.referenced,
            format!("save node `{name}` needs `to: PATH`"),
            None,
        );
        return None;
    };
    Some(Node::Save(SaveNode {
        from,
        to: cx.path(to),
        overwrite: d.overwrite,
        link: d.link.unwrap_or_default(),
    }))
}

/// What a save's key is computed from: the result it writes and how.
#[derive(serde::Serialize)]
struct Preimage<'a> {
    op: &'static str,
    from: InputKey<'a>,
    link: Link,
}

impl NodeKind for SaveNode {
    fn kind(&self) -> &'static Kind {
        &KIND
    }

    fn node_inputs(&self) -> Vec<&str> {
        vec![self.from.as_str()]
    }

    fn reads(&self) -> Vec<&str> {
        vec![self.from.as_str()]
    }

    fn rename_inputs(&mut self, f: &dyn Fn(&str) -> String) {
        self.from = f(&self.from);
    }

    fn preimage(&self, _name: &str, cx: &KeyCx) -> Value {
        preimage_value(Preimage {
            op: "save",
            from: InputKey::Node {
                node: &self.from,
                key: cx.key(&self.from),
            },
            link: self.link,
        })
    }

    /// A save reads a stored result, no checkpoint header.
    fn check(&self, _cx: &CheckCx) -> Result<Option<Header>> {
        Ok(None)
    }

    /// Up to date when the file is still exactly what the last build wrote from the saved
    /// node's current result (checked by stamp, without reading it).
    fn is_current(&self, _key: &str, _preimage: &Value, cx: &HitCx) -> bool {
        cx.state.wrote(&self.to, &cx.keys[&self.from].0)
    }

    fn run(&self, _name: &str, _key: &str, _preimage: &Value, cx: &RunCx) -> Result<Outcome> {
        cx.save(
            &cx.keys[&self.from],
            &self.to,
            self.overwrite,
            self.link == Link::Hardlink,
        )?;
        Ok(Outcome {
            output: Some(self.to.clone()),
            ..Outcome::default()
        })
    }

    fn summary(&self) -> String {
        self.to
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    fn cost(&self) -> f64 {
        0.0
    }

    fn shard_units<'a>(&'a self, _name: &'a str) -> Vec<&'a str> {
        vec![self.from.as_str()]
    }

    fn output_file(&self) -> Option<&Path> {
        Some(&self.to)
    }

    fn output_file_mut(&mut self) -> Option<&mut PathBuf> {
        Some(&mut self.to)
    }
}
