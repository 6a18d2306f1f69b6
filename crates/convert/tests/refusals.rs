//! One small hand-made input per refusal of the pickle reader and the torch zip reader: each
//! must fail with its documented error (never a panic, never a large allocation).

use std::io::{Cursor, Read, Write};
use std::path::Path;

use iapt_convert::{read_state_dict, PickleError, TorchZip, TorchZipError, MAX_DEPTH, MAX_ENTRIES};

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../converters/python/fixtures").join(name)).unwrap()
}

/// The entries of a fixture zip, in order.
fn entries(name: &str) -> Vec<(String, Vec<u8>)> {
    let mut z = zip::ZipArchive::new(Cursor::new(fixture(name))).unwrap();
    (0..z.len())
        .map(|i| {
            let mut f = z.by_index(i).unwrap();
            let mut b = Vec::new();
            f.read_to_end(&mut b).unwrap();
            (f.name().to_owned(), b)
        })
        .collect()
}

fn zip_of(files: &[(String, Vec<u8>)], method: zip::CompressionMethod) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    for (name, data) in files {
        w.start_file(name.as_str(), zip::write::SimpleFileOptions::default().compression_method(method)).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

fn forbidden(pickle: &[u8]) -> String {
    match read_state_dict(pickle) {
        Err(PickleError::ForbiddenGlobal { name, .. }) => name,
        other => panic!("expected a forbidden global, got {other:?}"),
    }
}

#[test]
fn globals_outside_the_allow_list_are_refused_by_name() {
    // cbuiltins\neval\n ('1+1',) R
    assert_eq!(forbidden(b"\x80\x02cbuiltins\neval\nq\x00X\x03\x00\x00\x001+1\x85R."), "builtins.eval");
    // Protocol 4 spelling: STACK_GLOBAL of two short strings.
    assert_eq!(forbidden(b"\x80\x04\x8c\x05posix\x8c\x06system\x93X\x02\x00\x00\x00id\x85R."), "posix.system");
    // A near miss of an allowed name.
    assert_eq!(forbidden(b"\x80\x02ctorch._utils\n_rebuild_tensor\n."), "torch._utils._rebuild_tensor");
    assert_eq!(forbidden(b"\x80\x02ctorch\nload\n."), "torch.load");
}

#[test]
fn unsupported_opcodes_are_refused() {
    // INST (protocol 0) and NEWOBJ are how objects get built; neither is accepted.
    for (bytes, opcode) in [(&b"\x80\x02(iposix\nsystem\n."[..], b'i'), (&b"\x80\x02)\x81."[..], 0x81), (&b"I1\n."[..], b'I')] {
        match read_state_dict(bytes) {
            Err(PickleError::UnsupportedOpcode { opcode: o, .. }) => assert_eq!(o, opcode),
            other => panic!("{bytes:?}: {other:?}"),
        }
    }
}

#[test]
fn lengths_are_checked_before_allocating() {
    for bytes in
        [&b"\x80\x02X\xff\xff\xff\xff"[..], b"\x80\x04\x8d\xff\xff\xff\xff\xff\xff\xff\x7fabc", b"\x80\x02B\xff\xff\xff\x7f", b"\x80\x02}"]
    {
        assert!(matches!(read_state_dict(bytes), Err(PickleError::Truncated { .. })), "{bytes:?}");
    }
}

#[test]
fn nesting_is_capped() {
    let mut p = b"\x80\x02)".to_vec();
    p.extend(std::iter::repeat_n(0x85u8, MAX_DEPTH + 1)); // TUPLE1 around and around
    p.push(b'.');
    assert!(matches!(read_state_dict(&p), Err(PickleError::Limit { what: "nesting depth", .. })));
}

#[test]
fn copy_on_write_amplification_hits_the_work_budget() {
    // A 1000-element list, then "memoize it, append to it" over and over: each append copies it.
    let mut p = b"\x80\x02](".to_vec();
    p.extend(std::iter::repeat_n(&b"K\x01"[..], 1000).flatten());
    p.push(b'e');
    p.extend(std::iter::repeat_n(&b"q\x00K\x01a"[..], 17_000).flatten());
    p.push(b'.');
    assert!(matches!(read_state_dict(&p), Err(PickleError::Limit { .. })), "{:?}", read_state_dict(&p).err());
}

/// Issue 27, finding 4: a few hundred bytes of pickle whose memoized dicts share each other
/// describe 2^40 entries (dict k holds dict k-1 twice, 40 deep); flattening them is bounded, and
/// refused fast and small.
#[test]
fn shared_dicts_cannot_fan_out() {
    let key = |s: &str| [b"X".as_slice(), &(s.len() as u32).to_le_bytes(), s.as_bytes()].concat();
    let mut p = b"\x80\x02}(".to_vec();
    p.extend(key("x"));
    p.extend(b"Nuq\x000"); // d0 = {"x": None}, memo 0, popped
    for i in 1u8..=40 {
        p.extend(b"}(");
        p.extend(key("a"));
        p.extend([b'h', i - 1]);
        p.extend(key("b"));
        p.extend([b'h', i - 1]);
        p.extend([b'u', b'q', i]); // d_i = {"a": d_{i-1}, "b": d_{i-1}}, memo i
        if i < 40 {
            p.push(b'0'); // popped: only the last dict stays on the stack
        }
    }
    p.push(b'.');
    assert!(p.len() < 1024, "{} bytes", p.len());
    let t0 = std::time::Instant::now();
    let r = read_state_dict(&p);
    assert!(
        matches!(r, Err(PickleError::Limit { what: "entries of the flattened state_dict", limit }) if limit == MAX_ENTRIES),
        "{:?}",
        r.err()
    );
    assert!(t0.elapsed() < std::time::Duration::from_secs(1), "{:?}", t0.elapsed());
}

#[test]
fn malformed_pickles_are_refused() {
    for bytes in [
        &b"\x80\x02h\x05."[..],                            // memo read before write
        b"\x80\x02K\x01K\x02.",                            // two values at STOP
        b"\x80\x02K\x01R.",                                // REDUCE with too little on the stack
        b"\x80\x02)Q.",                                    // persistent id that is not a storage tuple
        b"\x80\x09}.",                                     // unknown protocol
        b"\x80\x02ccollections\nOrderedDict\nK\x01\x85R.", // OrderedDict with arguments
    ] {
        assert!(matches!(read_state_dict(bytes), Err(PickleError::Malformed { .. })), "{bytes:?}: {:?}", read_state_dict(bytes));
    }
    assert!(matches!(read_state_dict(b"\x80\x02K\x05."), Err(PickleError::NotAStateDict { found: "int" })));
}

#[test]
fn a_real_state_dict_pickle_reads() {
    let (_, pkl) = entries("ref_f32.pt").into_iter().find(|(n, _)| n.ends_with("/data.pkl")).unwrap();
    let sd = read_state_dict(&pkl).unwrap();
    assert_eq!(sd.tensors.len(), 17); // 14 generator tensors, 2 layer norms, 1 step counter
    let (_, down) = sd.tensors.iter().find(|(k, _)| k.ends_with("layers.1.prompt_generator.down.weight")).unwrap();
    assert_eq!((down.shape.clone(), down.stride.clone()), (vec![8, 32], vec![32, 1]));
}

#[test]
fn zip_problems_are_reported() {
    let files = entries("ref_f32.pt");
    let only = |keep: &dyn Fn(&str) -> bool| files.iter().filter(|(n, _)| keep(n)).cloned().collect::<Vec<_>>();

    // No data.pkl.
    let z = zip_of(&only(&|n| !n.ends_with("data.pkl")), zip::CompressionMethod::Stored);
    assert!(matches!(TorchZip::new(Cursor::new(z)), Err(TorchZipError::NoPickle { found: 0 })));

    // Storages missing.
    let z = zip_of(&only(&|n| !n.contains("/data/")), zip::CompressionMethod::Stored);
    let mut tz = TorchZip::new(Cursor::new(z)).unwrap();
    let t = tz.tensors()[0].1.clone();
    assert!(matches!(tz.read_tensor(&t), Err(TorchZipError::MissingStorage { .. })));

    // A compressed storage.
    let z = zip_of(&files, zip::CompressionMethod::Deflated);
    let mut tz = TorchZip::new(Cursor::new(z)).unwrap();
    let t = tz.tensors()[0].1.clone();
    assert!(matches!(tz.read_tensor(&t), Err(TorchZipError::CompressedStorage { .. })));

    // A storage shorter than the pickle says.
    let mut short = files.clone();
    for (n, d) in &mut short {
        if n.contains("/data/") {
            d.truncate(d.len() - 4);
        }
    }
    let mut tz = TorchZip::new(Cursor::new(zip_of(&short, zip::CompressionMethod::Stored))).unwrap();
    let t = tz.tensors()[0].1.clone();
    assert!(matches!(tz.read_tensor(&t), Err(TorchZipError::StorageSize { .. })));

    // An unknown byte order.
    let mut odd = files.clone();
    for (n, d) in &mut odd {
        if n.ends_with("/byteorder") {
            *d = b"middle".to_vec();
        }
    }
    assert!(matches!(TorchZip::new(Cursor::new(zip_of(&odd, zip::CompressionMethod::Stored))), Err(TorchZipError::ByteOrder(_))));

    // Not a zip at all.
    assert!(matches!(TorchZip::new(Cursor::new(b"PK\x03\x04 not really".to_vec())), Err(TorchZipError::Zip(_) | TorchZipError::Io(_))));
}

#[test]
fn big_endian_storages_read_as_little_endian_values() {
    let mut le = TorchZip::new(Cursor::new(fixture("ref_f32.pt"))).unwrap();
    let mut be = TorchZip::new(Cursor::new(fixture("big_endian.pt"))).unwrap();
    assert_eq!(be.byteorder(), iapt_convert::ByteOrder::Big);
    let tensors: Vec<_> = le.tensors().to_vec();
    for (key, t) in tensors {
        let (_, t2) = be.tensors().iter().find(|(k, _)| *k == key).unwrap().clone();
        assert_eq!(le.read_tensor(&t).unwrap(), be.read_tensor(&t2).unwrap(), "{key}");
    }
}
