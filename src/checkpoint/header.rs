//! Parsing and validation of the safetensors header.
//!
//! The parser works on the raw bytes of a file (usually a memory map) and checks every
//! structural rule of the format before any tensor is touched, so a malformed file is
//! reported precisely instead of causing a panic or a huge allocation.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;

use crate::dtype::DType;
use crate::error::HeaderError;

/// Header lengths above this are refused (the reference implementation uses the same bound).
pub const MAX_HEADER_LEN: u64 = 100 * 1024 * 1024;

/// One tensor as described by the header: offsets are relative to the data section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderEntry {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape (empty for scalars).
    pub shape: Vec<usize>,
    /// First byte, relative to the start of the data section.
    pub begin: usize,
    /// One past the last byte, relative to the start of the data section.
    pub end: usize,
}

/// A validated safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Length of the JSON header in bytes (the value of the 8-byte prefix).
    pub header_len: usize,
    /// Tensors sorted by name.
    pub entries: Vec<HeaderEntry>,
    /// The `__metadata__` map (empty if absent).
    pub metadata: BTreeMap<String, String>,
}

impl Header {
    /// Absolute offset of the data section in the file.
    pub fn data_start(&self) -> usize {
        8 + self.header_len
    }
}

/// Object entries in file order, keeping duplicates so they can be reported.
struct OrderedEntries(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for OrderedEntries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OrderedEntries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    out.push((k, v));
                }
                Ok(OrderedEntries(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Parses and validates the header of a complete safetensors file held in `bytes`.
pub fn parse(bytes: &[u8]) -> Result<Header, HeaderError> {
    let file_len = bytes.len() as u64;
    if file_len < 8 {
        return Err(HeaderError::TooShort { len: file_len });
    }
    let mut prefix = [0u8; 8];
    prefix.copy_from_slice(&bytes[..8]);
    let header_len = u64::from_le_bytes(prefix);
    if header_len > MAX_HEADER_LEN {
        return Err(HeaderError::HeaderTooLarge {
            header_len,
            limit: MAX_HEADER_LEN,
        });
    }
    if header_len > file_len - 8 {
        return Err(HeaderError::HeaderBeyondFile {
            header_len,
            available: file_len - 8,
        });
    }
    let header_len = header_len as usize;
    let json =
        std::str::from_utf8(&bytes[8..8 + header_len]).map_err(|_| HeaderError::InvalidUtf8)?;
    let data_len = bytes.len() - 8 - header_len;
    let (entries, metadata) = parse_json(json)?;
    check_ranges(&entries, data_len)?;
    let mut entries = entries;
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Header {
        header_len,
        entries,
        metadata,
    })
}

type ParsedJson = (Vec<HeaderEntry>, BTreeMap<String, String>);

fn parse_json(json: &str) -> Result<ParsedJson, HeaderError> {
    let trimmed = json.trim_start();
    if !trimmed.starts_with('{') {
        // Either not JSON at all or a JSON value of the wrong kind.
        return match serde_json::from_str::<Value>(json) {
            Ok(_) => Err(HeaderError::NotAnObject),
            Err(e) => Err(HeaderError::InvalidJson(e.to_string())),
        };
    }
    let OrderedEntries(raw) =
        serde_json::from_str(json).map_err(|e| HeaderError::InvalidJson(e.to_string()))?;
    let mut seen = std::collections::HashSet::with_capacity(raw.len());
    let mut entries = Vec::with_capacity(raw.len());
    let mut metadata = BTreeMap::new();
    for (name, value) in raw {
        if !seen.insert(name.clone()) {
            return Err(HeaderError::DuplicateKey(name));
        }
        if name == "__metadata__" {
            metadata = parse_metadata(value)?;
        } else {
            entries.push(parse_entry(name, value)?);
        }
    }
    Ok((entries, metadata))
}

fn parse_metadata(value: Value) -> Result<BTreeMap<String, String>, HeaderError> {
    let Value::Object(map) = value else {
        return Err(HeaderError::BadMetadata(
            "expected an object of strings".into(),
        ));
    };
    map.into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k, s)),
            other => Err(HeaderError::BadMetadata(format!(
                "value of `{k}` must be a string, found {}",
                json_kind(&other)
            ))),
        })
        .collect()
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_entry(name: String, value: Value) -> Result<HeaderEntry, HeaderError> {
    let bad = |reason: String| HeaderError::BadEntry {
        name: name.clone(),
        reason,
    };
    let Value::Object(obj) = value else {
        return Err(bad(format!(
            "expected an object, found {}",
            json_kind(&value)
        )));
    };
    for key in obj.keys() {
        if !matches!(key.as_str(), "dtype" | "shape" | "data_offsets") {
            return Err(bad(format!("unexpected field `{key}`")));
        }
    }
    let dtype_str = match obj.get("dtype") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(bad(format!(
                "`dtype` must be a string, found {}",
                json_kind(other)
            )))
        }
        None => return Err(bad("missing `dtype`".into())),
    };
    let dtype: DType = dtype_str.parse().map_err(|_| HeaderError::UnknownDtype {
        name: name.clone(),
        dtype: dtype_str.clone(),
    })?;
    // Only exact header spellings are valid in a file (the parser also accepts "fp16").
    if dtype.name() != dtype_str {
        return Err(HeaderError::UnknownDtype {
            name,
            dtype: dtype_str,
        });
    }
    let shape = usize_list(obj.get("shape"), "shape").map_err(&bad)?;
    let offsets = usize_list(obj.get("data_offsets"), "data_offsets").map_err(&bad)?;
    let [begin, end] = offsets[..] else {
        return Err(bad(format!(
            "`data_offsets` must have 2 values, found {}",
            offsets.len()
        )));
    };
    if begin > end {
        return Err(HeaderError::InvertedRange { name, begin, end });
    }
    let elements = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .and_then(|n| dtype.byte_len(n));
    let Some(expected) = elements else {
        return Err(HeaderError::ShapeOverflow { name, shape });
    };
    if expected != end - begin {
        return Err(HeaderError::SizeMismatch {
            name,
            dtype,
            shape,
            expected,
            actual: end - begin,
        });
    }
    Ok(HeaderEntry {
        name,
        dtype,
        shape,
        begin,
        end,
    })
}

fn usize_list(value: Option<&Value>, field: &str) -> Result<Vec<usize>, String> {
    let Some(value) = value else {
        return Err(format!("missing `{field}`"));
    };
    let Value::Array(items) = value else {
        return Err(format!(
            "`{field}` must be an array, found {}",
            json_kind(value)
        ));
    };
    items
        .iter()
        .map(|v| {
            v.as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| format!("`{field}` must hold non-negative integers, found {v}"))
        })
        .collect()
}

/// Checks that the ranges tile the data section exactly: in bounds, no overlap, no holes.
fn check_ranges(entries: &[HeaderEntry], data_len: usize) -> Result<(), HeaderError> {
    let mut order: Vec<&HeaderEntry> = entries.iter().collect();
    order.sort_by(|a, b| (a.begin, a.end, &a.name).cmp(&(b.begin, b.end, &b.name)));
    // Bounds first: a cut file shows up as its last tensor running past the end.
    let last_end = order.iter().map(|e| e.end).max().unwrap_or(0);
    for e in &order {
        if e.end > data_len {
            let is_tail = e.end == last_end && e.begin <= data_len;
            let cut = order.iter().filter(|o| o.end > data_len).count() == 1;
            return Err(if is_tail && cut {
                HeaderError::Truncated {
                    name: e.name.clone(),
                    end: e.end,
                    data_len,
                }
            } else {
                HeaderError::OutOfBounds {
                    name: e.name.clone(),
                    begin: e.begin,
                    end: e.end,
                    data_len,
                }
            });
        }
    }
    let mut pos = 0usize;
    let mut prev: Option<&HeaderEntry> = None;
    for e in &order {
        if e.begin < pos {
            return Err(HeaderError::Overlap {
                first: prev.map(|p| p.name.clone()).unwrap_or_default(),
                second: e.name.clone(),
            });
        }
        if e.begin > pos {
            return Err(HeaderError::Gap {
                from: pos,
                to: e.begin,
                next: e.name.clone(),
            });
        }
        pos = e.end;
        if e.end > e.begin {
            prev = Some(e);
        }
    }
    if pos < data_len {
        return Err(HeaderError::TrailingBytes {
            extra: data_len - pos,
        });
    }
    Ok(())
}
