//! Fuzzes the `torch.save` zip reader of `iapt convert` (`iapt_convert::TorchZip`): the zip
//! structure, the pickle inside it, and reading every tensor view from its storage.
//!
//! Properties: never panics; every tensor it reads has exactly `numel x element size` bytes, and
//! no tensor is larger than the input (no allocation from a length the file merely claims).
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut z) = iapt_convert::TorchZip::new(Cursor::new(data)) else { return };
    let tensors = z.tensors().to_vec();
    for (key, t) in tensors {
        if let Ok(bytes) = z.read_tensor(&t) {
            let numel = t.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).expect("an accepted view has a finite size");
            assert_eq!(bytes.len() as u64, numel * t.storage.dtype.size() as u64, "{key}");
            assert!(bytes.len() <= data.len(), "{key}: {} bytes from a {}-byte input", bytes.len(), data.len());
        }
    }
});
