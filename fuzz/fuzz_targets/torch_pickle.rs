//! Fuzz the restricted unpickler: the input becomes `archive/data.pkl` of a torch zip
//! archive, which must be read or refused, never executed and never a panic.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", opts).unwrap();
    zip.write_all(data).unwrap();
    zip.start_file("archive/data/0", opts).unwrap();
    zip.write_all(&[0u8; 64]).unwrap();
    let bytes = zip.finish().unwrap().into_inner();
    let _ = mergesmith::checkpoint::pickle::read_tensors(&bytes);
});
