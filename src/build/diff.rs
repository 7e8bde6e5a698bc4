//! Why a node is stale: the differences between its last and current key preimages.

use serde_json::Value;

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}...", s.chars().take(57).collect::<String>())
    } else {
        s
    }
}

/// Human-readable differences, e.g. `merge.alpha IN04: 0.3 -> 0.35` or
/// `input model real changed content`.
pub fn reasons(old: &Value, new: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk("", old, new, &mut out);
    if out.is_empty() {
        out.push("its result is not in the cache".into());
    }
    out
}

fn walk(path: &str, old: &Value, new: &Value, out: &mut Vec<String>) {
    if old == new {
        return;
    }
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            // An input whose content changed reads better as one line.
            if let (Some(Value::String(m)), Some(c1), Some(c2)) =
                (b.get("model"), a.get("content"), b.get("content"))
            {
                if a.get("model") == b.get("model") && c1 != c2 {
                    out.push(format!("input model `{m}` changed content"));
                    return;
                }
            }
            if let (Some(Value::String(n)), Some(k1), Some(k2)) =
                (b.get("node"), a.get("key"), b.get("key"))
            {
                if a.get("node") == b.get("node") && k1 != k2 {
                    out.push(format!("input node `{n}` changed"));
                    return;
                }
            }
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let null = Value::Null;
                walk(
                    &join(k),
                    a.get(k).unwrap_or(&null),
                    b.get(k).unwrap_or(&null),
                    out,
                );
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            let names = crate::arch::family::list_of_len(a.len());
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                match (names, x.is_number() && y.is_number()) {
                    (Some(n), true) if x != y => out.push(format!("{path} {}: {x} -> {y}", n[i])),
                    _ => walk(&format!("{path}[{i}]"), x, y, out),
                }
            }
        }
        _ => out.push(format!("{path}: {} -> {}", short(old), short(new))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn readable_reasons() {
        let mut v = vec![0.5; 26];
        let old = json!({"merge": {"alpha": v.clone(), "mode": "weight_sum"}, "inputs": [{"model": "a", "content": "x"}]});
        v[5] = 0.7;
        let new = json!({"merge": {"alpha": v, "mode": "add_difference"}, "inputs": [{"model": "a", "content": "y"}]});
        assert_eq!(
            reasons(&old, &new),
            vec![
                "input model `a` changed content".to_string(),
                "merge.alpha IN04: 0.5 -> 0.7".to_string(),
                "merge.mode: \"weight_sum\" -> \"add_difference\"".to_string(),
            ]
        );
        assert_eq!(
            reasons(&json!({"a": 0.3}), &json!({"a": 0.35})),
            vec!["a: 0.3 -> 0.35".to_string()]
        );
    }
}
