//! The recipe graph: its edges, and as text for mermaid or Graphviz (`mergesmith dag`). Node
//! shapes follow what each kind makes; labels are each node's summary.

use super::Recipe;
use crate::nodes::Makes;

/// Graph output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DagFormat {
    /// Mermaid flowchart (renders in GitHub, GitLab and many editors).
    Mermaid,
    /// Graphviz dot.
    Dot,
}

impl crate::text::Named for DagFormat {
    const NAMES: &'static [(&'static str, Self)] =
        &[("mermaid", DagFormat::Mermaid), ("dot", DagFormat::Dot)];
}

impl Recipe {
    /// Every edge of the recipe graph, (from, to), in a stable order.
    pub fn edges(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for name in &self.order {
            for from in self.nodes[name].reads() {
                out.push((from.to_string(), name.clone()));
            }
        }
        out
    }

    /// The recipe graph as text: models as cylinders, checkpoint nodes as boxes, LoRA nodes as
    /// hexagons, saves as files.
    pub fn dag(&self, format: DagFormat) -> String {
        let id = |s: &str| s.replace(|c: char| !c.is_ascii_alphanumeric() && c != '_', "_");
        let mut out = String::new();
        match format {
            DagFormat::Mermaid => {
                out.push_str("graph LR\n");
                for m in self.models.keys() {
                    out.push_str(&format!("  {}[(\"{m}\")]\n", id(m)));
                }
                for name in &self.order {
                    let node = &self.nodes[name];
                    let (open, close) = match node.kind().makes {
                        Makes::Checkpoint => ("[", "]"),
                        Makes::Lora => ("{{", "}}"),
                        Makes::Images => ("[[", "]]"),
                        Makes::File => ("[/", "/]"),
                    };
                    out.push_str(&format!(
                        "  {}{open}\"{name}<br/>{}\"{close}\n",
                        id(name),
                        node.summary()
                    ));
                }
                for (a, b) in self.edges() {
                    out.push_str(&format!("  {} --> {}\n", id(&a), id(&b)));
                }
            }
            DagFormat::Dot => {
                out.push_str("digraph recipe {\n  rankdir=LR;\n");
                for m in self.models.keys() {
                    out.push_str(&format!("  \"{m}\" [shape=cylinder];\n"));
                }
                for name in &self.order {
                    let shape = match self.nodes[name].kind().makes {
                        Makes::Checkpoint => "box",
                        Makes::Lora => "hexagon",
                        Makes::File => "note",
                        Makes::Images => "box3d",
                    };
                    out.push_str(&format!("  \"{name}\" [shape={shape}];\n"));
                }
                for (a, b) in self.edges() {
                    out.push_str(&format!("  \"{a}\" -> \"{b}\";\n"));
                }
                out.push_str("}\n");
            }
        }
        out
    }
}
