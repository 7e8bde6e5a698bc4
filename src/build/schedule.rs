//! Running the nodes that are out of date: up to `jobs` at a time, each once the nodes it
//! reads are done.

use std::collections::{BTreeMap, BTreeSet};

use super::{NodePlan, NodeReport};
use crate::error::{Error, Result};
use crate::recipe::Recipe;

/// Runs `work` on every node of `nodes` (in dependency order), up to `jobs` at a time, each
/// after the nodes among `nodes` it reads. Without `keep_going`, stops starting nodes after the
/// first failure and returns it once the running ones finish. With it, a failed node's
/// dependents fail without running (sweeps aside: they draw the cells that exist), every
/// other node still runs, and the failures come back in their reports' `error`
/// (`failed_early`: the reports of nodes that failed their checks at plan time).
pub(super) fn schedule<'p>(
    nodes: &[&'p NodePlan],
    recipe: &Recipe,
    jobs: usize,
    failed_early: BTreeMap<String, NodeReport>,
    keep_going: bool,
    work: impl Fn(&'p NodePlan) -> Result<NodeReport> + Sync,
) -> Result<BTreeMap<String, NodeReport>> {
    let names: BTreeSet<&str> = nodes.iter().map(|p| p.name.as_str()).collect();
    let mut pending: Vec<&NodePlan> = nodes.to_vec();
    let mut done: BTreeMap<String, NodeReport> = failed_early;
    let failed_report = |p: &NodePlan, e: &Error| NodeReport {
        error: Some(e.to_string()),
        ..NodeReport::nothing_done(p)
    };
    let failure = std::thread::scope(|s| {
        let mut failure = None;
        let (tx, rx) = std::sync::mpsc::channel();
        let mut running = 0usize;
        // The model the last generate node started with: a ready node that generates from it
        // goes first, so the cells of a sweep that share a model load it once.
        let model_of = |p: &NodePlan| {
            recipe.nodes[&p.name]
                .generation()
                .map(|(input, _)| input.name().to_string())
        };
        let mut last_model: Option<String> = None;
        loop {
            while failure.is_none() && running < jobs {
                let ready: Vec<usize> = (0..pending.len())
                    .filter(|&i| {
                        recipe.nodes[&pending[i].name]
                            .node_inputs()
                            .iter()
                            .all(|n| !names.contains(n) || done.contains_key(*n))
                    })
                    .collect();
                let same_model = ready
                    .iter()
                    .copied()
                    .find(|&i| last_model.is_some() && model_of(pending[i]) == last_model);
                let Some(i) = same_model.or(ready.first().copied()) else {
                    break;
                };
                if let Err(e) = crate::progress::check_cancel() {
                    failure = Some(e);
                    break;
                }
                let p = pending.remove(i);
                if let Some(m) = model_of(p) {
                    last_model = Some(m);
                }
                let node = &recipe.nodes[&p.name];
                let broken = node
                    .node_inputs()
                    .into_iter()
                    .find(|i| done.get(*i).is_some_and(|r| r.error.is_some()));
                if let (Some(input), false) = (broken, node.runs_with_failed_inputs()) {
                    let e = Error::Failed(format!("node `{}`: its input `{input}` failed", p.name));
                    done.insert(p.name.clone(), failed_report(p, &e));
                    continue;
                }
                let (tx, work) = (tx.clone(), &work);
                running += 1;
                s.spawn(move || {
                    // A panic in one node must not leave the scheduler waiting for its report.
                    let _bars = crate::progress::in_node(&p.name);
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(p)))
                        .unwrap_or_else(|_| {
                            Err(Error::Failed(format!("node `{}`: internal error", p.name)))
                        });
                    let _ = tx.send((p, result));
                });
            }
            if running == 0 {
                break;
            }
            let (p, result) = rx.recv().expect("a running node reports");
            running -= 1;
            match result {
                Ok(r) => {
                    done.insert(p.name.clone(), r);
                }
                Err(e) if keep_going => {
                    done.insert(p.name.clone(), failed_report(p, &e));
                }
                Err(e) => failure = failure.or(Some(e)),
            }
        }
        failure
    });
    match failure {
        Some(e) => Err(e),
        None => Ok(done),
    }
}
