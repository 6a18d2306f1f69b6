//! Property tests: a small pickle writer that emits state_dicts the way `torch.save` does
//! (protocol 2, memoized globals, persistent ids), then
//! - the reader returns exactly the tensors that were written (keys, storages, offsets, shapes, strides);
//! - reading any strided view out of a zip, in either byte order, equals a naive element-by-element gather.

use std::io::{Cursor, Write};

use iapt_convert::{read_state_dict, StorageRef, TensorRef, TorchDType, TorchZip, TorchZipError};
use proptest::prelude::*;

const DTYPES: [(TorchDType, &str); 6] = [
    (TorchDType::F32, "FloatStorage"),
    (TorchDType::F16, "HalfStorage"),
    (TorchDType::BF16, "BFloat16Storage"),
    (TorchDType::F64, "DoubleStorage"),
    (TorchDType::I64, "LongStorage"),
    (TorchDType::U8, "ByteStorage"),
];

struct Writer {
    out: Vec<u8>,
    memo: Vec<String>,
}

impl Writer {
    fn int(&mut self, v: u64) {
        if v < 256 {
            self.out.extend([b'K', v as u8]);
        } else if v < 65536 {
            self.out.push(b'M');
            self.out.extend((v as u16).to_le_bytes());
        } else if v < (1 << 31) {
            self.out.push(b'J');
            self.out.extend((v as u32).to_le_bytes());
        } else {
            self.out.extend([0x8a, 8]);
            self.out.extend(v.to_le_bytes());
        }
    }

    fn str(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend((s.len() as u32).to_le_bytes());
        self.out.extend(s.as_bytes());
    }

    /// A global, memoized the first time and fetched with BINGET afterwards (as pickle does).
    fn global(&mut self, module: &str, name: &str) {
        let id = format!("{module}\n{name}\n");
        if let Some(i) = self.memo.iter().position(|m| *m == id) {
            self.out.extend([b'h', i as u8]);
        } else {
            self.out.push(b'c');
            self.out.extend(id.as_bytes());
            self.out.extend([b'q', self.memo.len() as u8]);
            self.memo.push(id);
        }
    }

    fn dims(&mut self, d: &[u64]) {
        self.out.push(b'(');
        for &x in d {
            self.int(x);
        }
        self.out.push(b't');
    }
}

fn class_of(dt: TorchDType) -> &'static str {
    DTYPES.iter().find(|(d, _)| *d == dt).map(|(_, c)| *c).unwrap()
}

/// A state_dict pickle as torch.save writes it.
fn write_state_dict(tensors: &[(String, TensorRef)]) -> Vec<u8> {
    let mut w = Writer { out: vec![0x80, 2], memo: Vec::new() };
    w.global("collections", "OrderedDict");
    w.out.extend([b')', b'R', b'(']);
    for (key, t) in tensors {
        w.str(key);
        w.global("torch._utils", "_rebuild_tensor_v2");
        w.out.extend([b'(', b'(']);
        w.str("storage");
        w.global("torch", class_of(t.storage.dtype));
        w.str(&t.storage.key);
        w.str("cpu");
        w.int(t.storage.numel);
        w.out.extend([b't', b'Q']);
        w.int(t.offset);
        w.dims(&t.shape);
        w.dims(&t.stride);
        w.out.push(0x89);
        w.global("collections", "OrderedDict");
        w.out.extend([b')', b'R', b't', b'R']);
    }
    w.out.extend([b'u', b'.']);
    w.out
}

fn tensor_strategy() -> impl Strategy<Value = TensorRef> {
    (0..DTYPES.len(), "[0-9]{1,3}", 0u64..1 << 40, 0u64..100, prop::collection::vec((0u64..6, 0u64..100_000), 0..5)).prop_map(
        |(d, key, numel, offset, dims)| TensorRef {
            storage: StorageRef { key, dtype: DTYPES[d].0, numel },
            offset,
            shape: dims.iter().map(|x| x.0).collect(),
            stride: dims.iter().map(|x| x.1).collect(),
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn pickles_round_trip(tensors in prop::collection::vec(tensor_strategy(), 0..6)) {
        let named: Vec<(String, TensorRef)> = tensors.into_iter().enumerate().map(|(i, t)| (format!("m.layers.{i}.w"), t)).collect();
        let sd = read_state_dict(&write_state_dict(&named)).unwrap();
        prop_assert_eq!(sd.tensors, named);
        prop_assert!(sd.skipped.is_empty());
    }

    #[test]
    fn strided_views_read_like_a_naive_gather(
        d in 0..3usize,
        dims in prop::collection::vec((1u64..5, 0u64..7), 0..4),
        offset in 0u64..9,
        extra in 0u64..5,
        big in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let dtype = DTYPES[d].0;
        let item = dtype.size();
        let shape: Vec<u64> = dims.iter().map(|x| x.0).collect();
        let stride: Vec<u64> = dims.iter().map(|x| x.1).collect();
        let last = offset + shape.iter().zip(&stride).map(|(n, s)| (n - 1) * s).sum::<u64>();
        let numel = last + 1 + extra;
        // Element values, little-endian; the file stores them in `big` order.
        let le: Vec<u8> = (0..numel as usize * item).map(|i| (seed.wrapping_mul(i as u64 + 1) >> 13) as u8).collect();
        let stored: Vec<u8> = if big { le.chunks(item).flat_map(|c| c.iter().rev().copied()).collect() } else { le.clone() };
        let t = TensorRef { storage: StorageRef { key: "0".into(), dtype, numel }, offset, shape: shape.clone(), stride: stride.clone() };
        let pkl = write_state_dict(&[("w".into(), t.clone())]);

        let mut zw = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        for (name, data) in [("archive/data.pkl", pkl), ("archive/byteorder", if big { b"big".to_vec() } else { b"little".to_vec() }), ("archive/data/0", stored)] {
            zw.start_file(name, opts).unwrap();
            zw.write_all(&data).unwrap();
        }
        let bytes = zw.finish().unwrap().into_inner();
        let mut z = TorchZip::new(Cursor::new(bytes)).unwrap();
        let count: u64 = shape.iter().product();
        match z.read_tensor(&t) {
            Ok(got) => {
                let mut want = Vec::new();
                let mut idx = vec![0u64; shape.len()];
                for _ in 0..count {
                    let e = (offset + idx.iter().zip(&stride).map(|(i, s)| i * s).sum::<u64>()) as usize;
                    want.extend_from_slice(&le[e * item..(e + 1) * item]);
                    for k in (0..shape.len()).rev() {
                        idx[k] += 1;
                        if idx[k] < shape[k] { break; }
                        idx[k] = 0;
                    }
                }
                prop_assert_eq!(got, want);
            }
            // Broadcast views (more elements than the storage holds) are refused, nothing else is.
            Err(TorchZipError::BadView { .. }) => prop_assert!(count > numel),
            Err(e) => prop_assert!(false, "{e}"),
        }
    }
}
