//! Reading, validation and writing of safetensors files on real files.

use std::collections::BTreeMap;

use crate::common::*;
use mergesmith::checkpoint::writer::{SafetensorsWriter, TensorSpec};
use mergesmith::checkpoint::Checkpoint;
use mergesmith::dtype::DType;
use mergesmith::error::{Error, HeaderError};

fn header_error(header: &str, data: &[u8]) -> HeaderError {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.safetensors");
    raw_safetensors(&path, header, data);
    match Checkpoint::open(&path) {
        Err(Error::Safetensors { path: p, kind }) => {
            assert_eq!(p, path, "the error names the file");
            kind
        }
        other => panic!("expected a header error, got {other:?}"),
    }
}

const T: &str = r#""t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}"#;

#[test]
fn too_short() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("short.safetensors");
    std::fs::write(&path, [1u8, 2, 3]).unwrap();
    let err = Checkpoint::open(&path).unwrap_err();
    assert!(matches!(
        err,
        Error::Safetensors {
            kind: HeaderError::TooShort { len: 3 },
            ..
        }
    ));
    assert!(err.to_string().contains("short.safetensors"), "{err}");
}

#[test]
fn header_too_large_is_refused_without_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.safetensors");
    let mut bytes = u64::MAX.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&path, bytes).unwrap();
    assert!(matches!(
        Checkpoint::open(&path).unwrap_err(),
        Error::Safetensors {
            kind: HeaderError::HeaderTooLarge { .. },
            ..
        }
    ));
}

#[test]
fn header_beyond_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.safetensors");
    let mut bytes = 1000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{\"a\":");
    std::fs::write(&path, bytes).unwrap();
    assert_eq!(
        match Checkpoint::open(&path).unwrap_err() {
            Error::Safetensors { kind, .. } => kind,
            e => panic!("{e}"),
        },
        HeaderError::HeaderBeyondFile {
            header_len: 1000,
            available: 5
        }
    );
}

#[test]
fn invalid_utf8_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.safetensors");
    let mut bytes = 2u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[b'{', 0xff]);
    std::fs::write(&path, bytes).unwrap();
    assert!(matches!(
        Checkpoint::open(&path).unwrap_err(),
        Error::Safetensors {
            kind: HeaderError::InvalidUtf8,
            ..
        }
    ));
    assert!(matches!(
        header_error("{\"t\": [1,", &[]),
        HeaderError::InvalidJson(_)
    ));
    assert_eq!(header_error("[1, 2]", &[]), HeaderError::NotAnObject);
}

#[test]
fn entry_faults() {
    assert_eq!(
        header_error(&format!("{{{T},{T}}}"), &[0; 8]),
        HeaderError::DuplicateKey("t".into())
    );
    assert!(matches!(
        header_error(r#"{"t":{"shape":[2],"data_offsets":[0,8]}}"#, &[0; 8]),
        HeaderError::BadEntry { reason, .. } if reason.contains("dtype")
    ));
    assert!(matches!(
        header_error(
            r#"{"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#,
            &[0; 8]
        ),
        HeaderError::BadEntry { .. }
    ));
    assert_eq!(
        header_error(
            r#"{"t":{"dtype":"F17","shape":[2],"data_offsets":[0,8]}}"#,
            &[0; 8]
        ),
        HeaderError::UnknownDtype {
            name: "t".into(),
            dtype: "F17".into()
        }
    );
    assert!(matches!(
        header_error(&format!(r#"{{"__metadata__":{{"a":1}},{T}}}"#), &[0; 8]),
        HeaderError::BadMetadata(_)
    ));
    assert!(matches!(
        header_error(
            r#"{"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            &[0; 8]
        ),
        HeaderError::SizeMismatch {
            expected: 12,
            actual: 8,
            ..
        }
    ));
    assert!(matches!(
        header_error(
            r#"{"t":{"dtype":"F64","shape":[4611686018427387904,8],"data_offsets":[0,8]}}"#,
            &[0; 8]
        ),
        HeaderError::ShapeOverflow { .. }
    ));
}

#[test]
fn range_faults() {
    assert!(matches!(
        header_error(
            r#"{"t":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#,
            &[0; 8]
        ),
        HeaderError::InvertedRange {
            begin: 8,
            end: 0,
            ..
        }
    ));
    // Two tensors share bytes 4..8.
    let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    assert_eq!(
        header_error(h, &[0; 12]),
        HeaderError::Overlap {
            first: "a".into(),
            second: "b".into()
        }
    );
    // A hole between 8 and 12.
    let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[12,16]}}"#;
    assert_eq!(
        header_error(h, &[0; 16]),
        HeaderError::Gap {
            from: 8,
            to: 12,
            next: "b".into()
        }
    );
    // An offset far past the end of the file.
    let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4000,4004]}}"#;
    assert!(
        matches!(header_error(h, &[0; 8]), HeaderError::OutOfBounds { name, .. } if name == "b")
    );
    // Trailing garbage.
    assert_eq!(
        header_error(&format!("{{{T}}}"), &[0; 11]),
        HeaderError::TrailingBytes { extra: 3 }
    );
}

#[test]
fn truncated_real_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = synth(
        dir.path(),
        "m.safetensors",
        &tiny(mergesmith::arch::Family::builtin("sd1"), 1),
    );
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    match Checkpoint::open(&cut).unwrap_err() {
        Error::Safetensors {
            kind: HeaderError::Truncated { data_len, end, .. },
            ..
        } => {
            assert_eq!(end - data_len, 100)
        }
        e => panic!("{e}"),
    }
    // Cut inside the header.
    std::fs::write(&cut, &bytes[..1000]).unwrap();
    assert!(matches!(
        Checkpoint::open(&cut).unwrap_err(),
        Error::Safetensors {
            kind: HeaderError::HeaderBeyondFile { .. },
            ..
        }
    ));
}

fn sample_tensors() -> Vec<(TensorSpec, Vec<u8>)> {
    vec![
        (
            TensorSpec {
                name: "w".into(),
                dtype: DType::F16,
                shape: vec![2, 3],
            },
            (0u8..12).collect(),
        ),
        (
            TensorSpec {
                name: "ids".into(),
                dtype: DType::I64,
                shape: vec![1, 3],
            },
            [0i64, 1, 2].iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        (
            TensorSpec {
                name: "scalar".into(),
                dtype: DType::F32,
                shape: vec![],
            },
            2.5f32.to_le_bytes().to_vec(),
        ),
        (
            TensorSpec {
                name: "empty".into(),
                dtype: DType::BF16,
                shape: vec![0, 4],
            },
            vec![],
        ),
        (
            TensorSpec {
                name: "Ünïcode \"key\"".into(),
                dtype: DType::U8,
                shape: vec![3],
            },
            vec![7, 8, 9],
        ),
    ]
}

fn write(path: &std::path::Path, tensors: &[(TensorSpec, Vec<u8>)], reverse: bool) {
    let mut md = BTreeMap::new();
    md.insert("format".to_string(), "pt".to_string());
    md.insert("sd_merge_recipe".to_string(), "{\"a\": 1}".to_string());
    let specs = tensors.iter().map(|t| t.0.clone()).collect();
    let w = SafetensorsWriter::create(path, specs, &md, false).unwrap();
    let order: Vec<&(TensorSpec, Vec<u8>)> = if reverse {
        tensors.iter().rev().collect()
    } else {
        tensors.iter().collect()
    };
    for (spec, data) in order {
        w.write(&spec.name, data).unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn round_trip_and_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = sample_tensors();
    let (a, b) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    write(&a, &tensors, false);
    write(&b, &tensors, true);
    assert_eq!(
        std::fs::read(&a).unwrap(),
        std::fs::read(&b).unwrap(),
        "write order must not matter"
    );

    let ck = Checkpoint::open(&a).unwrap();
    assert_eq!(ck.tensors().len(), tensors.len());
    assert_eq!(ck.metadata()["format"], "pt");
    for (spec, data) in &tensors {
        let v = ck.view(&spec.name).unwrap();
        assert_eq!((v.dtype, v.shape), (spec.dtype, &spec.shape[..]));
        assert_eq!(&*v.data, &data[..]);
        assert!(
            matches!(v.data, std::borrow::Cow::Borrowed(_)),
            "zero-copy view"
        );
    }

    // The reference implementation accepts the file and sees the same data, aligned.
    let bytes = std::fs::read(&a).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(header_len % 8, 0);
    for (spec, data) in &tensors {
        let v = st.tensor(&spec.name).unwrap();
        assert_eq!(v.data(), &data[..]);
        let offset = v.data().as_ptr() as usize - bytes.as_ptr() as usize;
        assert_eq!(offset % spec.dtype.align(), 0, "{} is aligned", spec.name);
    }
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata().as_ref().unwrap()["sd_merge_recipe"],
        "{\"a\": 1}"
    );
}

#[test]
fn refuses_to_overwrite_unless_asked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.safetensors");
    std::fs::write(&path, b"precious").unwrap();
    let specs = vec![TensorSpec {
        name: "x".into(),
        dtype: DType::U8,
        shape: vec![1],
    }];
    assert!(matches!(
        SafetensorsWriter::create(&path, specs.clone(), &BTreeMap::new(), false),
        Err(Error::OutputExists { .. })
    ));
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    let w = SafetensorsWriter::create(&path, specs, &BTreeMap::new(), true).unwrap();
    w.write("x", &[5]).unwrap();
    w.finish().unwrap();
    assert_eq!(
        Checkpoint::open(&path)
            .unwrap()
            .view("x")
            .unwrap()
            .data
            .as_ref(),
        &[5]
    );
}

#[test]
fn interrupted_write_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.safetensors");
    let specs = vec![
        TensorSpec {
            name: "x".into(),
            dtype: DType::U8,
            shape: vec![1],
        },
        TensorSpec {
            name: "y".into(),
            dtype: DType::U8,
            shape: vec![1],
        },
    ];
    {
        let w = SafetensorsWriter::create(&path, specs.clone(), &BTreeMap::new(), false).unwrap();
        w.write("x", &[1]).unwrap();
        // dropped without finish: as if the process died mid-write
    }
    assert!(!path.exists());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "temp file removed"
    );

    let w = SafetensorsWriter::create(&path, specs, &BTreeMap::new(), false).unwrap();
    w.write("x", &[1]).unwrap();
    assert!(w.write("x", &[1]).is_err(), "double write");
    assert!(w.write("y", &[1, 2]).is_err(), "wrong length");
    let err = w.finish().unwrap_err();
    assert!(err.to_string().contains("`y` was never written"), "{err}");
    assert!(!path.exists());
}
