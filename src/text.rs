//! Text helpers shared by every layer: "did you mean" suggestions and the names of
//! enumerated options (one table per enum, read by the recipe parser, the JSON report and the
//! command line alike).

/// An enum whose values have names (as written on the command line and in recipes).
pub trait Named: Sized + Copy + PartialEq + 'static {
    /// Every (name, value) pair: the first pair of each value is its name, later pairs of
    /// the same value are aliases accepted as well.
    const NAMES: &'static [(&'static str, Self)];

    /// The value with this name or alias.
    fn from_name(name: &str) -> Option<Self> {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
    }

    /// The value's name.
    fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, v)| *v == self)
            .map(|(n, _)| *n)
            .unwrap_or_default()
    }

    /// Whether `name` is a value's first name (not an alias).
    fn is_primary(name: &str) -> bool {
        Self::from_name(name).is_some_and(|v| v.name() == name)
    }
}

/// Closest name by edit distance, if reasonably close.
pub fn nearest<'a>(word: &str, names: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let upper = word.to_ascii_uppercase();
    names
        .map(|n| (edit_distance(&upper, &n.to_ascii_uppercase()), n))
        .filter(|(d, n)| *d <= (n.len() / 3).max(2))
        .min()
        .map(|(_, n)| n)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push(
                (prev[j] + usize::from(ca != *cb))
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1),
            );
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        let names = ["weight_sum", "add_difference", "GRAD_V"];
        assert_eq!(
            nearest("wieght_sum", names.iter().copied()),
            Some("weight_sum")
        );
        assert_eq!(nearest("grad_v", names.iter().copied()), Some("GRAD_V"));
        assert_eq!(nearest("something else", names.iter().copied()), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
