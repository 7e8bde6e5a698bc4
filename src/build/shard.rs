//! Sharded builds: `--shard I/N` builds a deterministic slice of a recipe's work, so that N
//! machines sharing a remote cache (a Slurm job array, a Kubernetes Indexed Job, a CI matrix)
//! build a recipe together, and a final build or report anywhere assembles the rest from hits.
//!
//! The work is cut into *units*: every demanded target, except that a sweep (`xy`) is
//! replaced by its cells (the grid needs all of them, so it is composed by the final build)
//! and a save by the node it saves (the file belongs on the machine that asks for it).
//! Each unit gets an estimated cost (`NodeKind::cost`, in units of one SD1 merge; one
//! 512x512 sampling step is about 0.05): the costs of the nodes it needs, a node needed by k
//! units counting 1/k for each. Units go, most expensive first, to the least loaded shard
//! (ties to the lower index): the same recipe gives every machine the same slices, whatever
//! its local cache holds. Nodes that several units need are built by every shard that needs
//! them unless the remote has them already; build them first (`mergesmith build --remote R
//! NODE`) when they are expensive.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::Result;
use crate::recipe::Recipe;

/// One slice of N: `index` in `0..count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This slice, from 0.
    pub index: usize,
    /// How many slices.
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        let bad = || {
            format!(
                "`{text}`: expected I/N with 0 <= I < N (e.g. 0/4; shard indices start at 0, \
                 as $SLURM_ARRAY_TASK_ID and $JOB_COMPLETION_INDEX do)"
            )
        };
        let (i, n) = text.split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

/// The targets of shard `shard` among `targets` (every node nothing else reads when empty):
/// the units assigned to it, in recipe order.
pub fn targets(recipe: &Recipe, targets: &[String], shard: Shard) -> Result<Vec<String>> {
    super::needed(recipe, targets)?; // unknown targets are errors
    let demanded: Vec<&str> = match targets.is_empty() {
        true => super::default_targets(recipe),
        false => targets.iter().map(String::as_str).collect(),
    };
    let mut units: Vec<&str> = Vec::new();
    for t in demanded {
        units.extend(recipe.nodes[t].shard_units(t));
    }
    let mut seen = BTreeSet::new();
    units.retain(|u| seen.insert(*u));
    // What each unit needs, and how many units need each node.
    let needs = units
        .iter()
        .map(|u| super::needed(recipe, &[u.to_string()]))
        .collect::<Result<Vec<BTreeSet<String>>>>()?;
    let mut sharing: BTreeMap<&str, usize> = BTreeMap::new();
    for n in needs.iter().flatten() {
        *sharing.entry(n.as_str()).or_default() += 1;
    }
    let mut costed: Vec<(f64, usize)> = needs
        .iter()
        .enumerate()
        .map(|(i, need)| {
            let cost = need
                .iter()
                .map(|n| recipe.nodes[n].cost() / sharing[n.as_str()] as f64)
                .sum();
            (cost, i)
        })
        .collect();
    costed.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut load = vec![0.0f64; shard.count];
    let mut mine = BTreeSet::new();
    for (cost, i) in costed {
        let to = (0..shard.count)
            .min_by(|a, b| load[*a].total_cmp(&load[*b]).then(a.cmp(b)))
            .expect("at least one shard");
        load[to] += cost;
        if to == shard.index {
            mine.insert(i);
        }
    }
    let order: BTreeMap<&str, usize> = recipe
        .order
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    let mut out: Vec<&str> = mine.into_iter().map(|i| units[i]).collect();
    out.sort_by_key(|n| order.get(n).copied().unwrap_or(usize::MAX));
    Ok(out.into_iter().map(String::from).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_syntax() {
        assert_eq!(
            "1/4".parse::<Shard>().unwrap(),
            Shard { index: 1, count: 4 }
        );
        assert!("4/4".parse::<Shard>().is_err());
        assert!("0/0".parse::<Shard>().is_err());
        assert!("a/2".parse::<Shard>().is_err());
        assert!("2".parse::<Shard>().unwrap_err().contains("start at 0"));
    }
}
