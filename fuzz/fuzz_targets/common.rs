//! Shared body of the reader targets: no input may panic, and anything accepted as a valid adapter
//! must round-trip through both containers with the same config, metadata and tensor bytes, and
//! re-write byte-identically.

use iapt_format::{validate_bytes, Container};

pub fn check(data: &[u8]) {
    let v = validate_bytes(data);
    let Some(a) = v.adapter else { return };
    for c in [Container::Gguf, Container::Safetensors] {
        let bytes = a.to_bytes(c).expect("in-memory write cannot fail");
        let b = validate_bytes(&bytes).adapter.expect("our own output must validate");
        assert_eq!(a.config(), b.config());
        assert_eq!(a.extras(), b.extras());
        assert_eq!(a.tensors().len(), b.tensors().len());
        for (x, y) in a.tensors().iter().zip(b.tensors()) {
            assert_eq!(x.name(), y.name());
            assert_eq!(x.shape(), y.shape());
            assert_eq!(x.bytes().unwrap(), y.bytes().unwrap());
        }
        assert_eq!(b.to_bytes(c).unwrap(), bytes, "re-write must be byte-identical");
    }
}
