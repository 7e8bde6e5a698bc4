//! Property tests of the safetensors header parser: it never panics on arbitrary or
//! mutated input, and accepts exactly what the writer produces.
//! Run longer with `PROPTEST_CASES=200000 cargo test --release --test header_props`.

use std::collections::BTreeMap;

use mergesmith::checkpoint::header;
use mergesmith::checkpoint::writer::{layout, FileLayout, TensorSpec};
use mergesmith::dtype::DType;
use proptest::prelude::*;

fn dtype() -> impl Strategy<Value = DType> {
    prop::sample::select(vec![
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::F64,
        DType::I64,
        DType::U8,
        DType::Bool,
    ])
}

fn specs() -> impl Strategy<Value = Vec<TensorSpec>> {
    prop::collection::btree_map(
        "[a-z0-9_.]{1,12}",
        (dtype(), prop::collection::vec(0usize..5, 0..4)),
        0..8,
    )
    .prop_map(|m| {
        m.into_iter()
            .map(|(name, (dtype, shape))| TensorSpec { name, dtype, shape })
            .collect()
    })
}

fn file(specs: &[TensorSpec], md: &BTreeMap<String, String>) -> Vec<u8> {
    let FileLayout {
        header: mut bytes,
        ranges,
    } = layout(specs, md).unwrap();
    let data_len = ranges.iter().map(|r| r.1).max().unwrap_or(0);
    bytes.extend(std::iter::repeat_n(0xAB, data_len));
    bytes
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = header::parse(&bytes);
    }

    #[test]
    fn arbitrary_json_headers_never_panic(json in "\\{[\\[\\]{}\":,a-zF0-9_ ]{0,200}") {
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(json.as_bytes());
        bytes.extend_from_slice(&[0u8; 64]);
        let _ = header::parse(&bytes);
    }

    #[test]
    fn written_headers_round_trip(specs in specs(), md in prop::collection::btree_map("[a-z_]{1,6}", ".{0,10}", 0..3)) {
        let bytes = file(&specs, &md);
        let h = header::parse(&bytes).unwrap();
        prop_assert_eq!(&h.metadata, &md);
        prop_assert_eq!(h.entries.len(), specs.len());
        prop_assert_eq!(h.header_len % 8, 0);
        for e in &h.entries {
            let s = specs.iter().find(|s| s.name == e.name).unwrap();
            prop_assert_eq!((e.dtype, &e.shape), (s.dtype, &s.shape));
            prop_assert_eq!((h.data_start() + e.begin) % s.dtype.align(), 0);
        }
    }

    #[test]
    fn mutated_files_never_panic(specs in specs(), flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8), cut in any::<usize>()) {
        let mut bytes = file(&specs, &BTreeMap::new());
        for (at, v) in flips {
            let i = at % bytes.len();
            bytes[i] = v;
        }
        let _ = header::parse(&bytes);
        let _ = header::parse(&bytes[..cut % (bytes.len() + 1)]);
    }
}
