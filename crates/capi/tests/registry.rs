//! libiapt's registry (`iapt_registry_*`), through its C functions: least-recently-used eviction
//! of adapters nobody holds, adapters held by the caller never dropped (a full registry refuses,
//! changing nothing), one load for concurrent first gets, a file replaced on disk loaded again
//! (old handles stay valid and keep the old weights), a touched file not reloaded, and bad input
//! refused with a code and a message.

use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};

use iapt::{
    iapt_adapter_free, iapt_adapter_n_soft_tokens, iapt_registry_free, iapt_registry_get, iapt_registry_new, iapt_registry_stats,
    IaptAdapter, IaptRegistry, IAPT_ERR_NULL, IAPT_OK,
};
use iapt_format::rng::Rng;
use iapt_format::{Activation, Container};
use iapt_generator::synthetic::{random_adapter, AdapterSpec};

/// Writes a random adapter with `m` soft tokens to `dir/name`.
fn write_adapter(dir: &Path, name: &str, m: u32, seed: u64) -> PathBuf {
    let spec = AdapterSpec::small(2, 16, m, 8, Activation::Gelu);
    let a = random_adapter(&spec, &mut Rng::new(seed)).expect("valid synthetic adapter");
    let p = dir.join(name);
    a.save(&p, Container::Safetensors).expect("save");
    p
}

/// `iapt_registry_get` on the registry at address `r` (an address, so threads can share it: the
/// registry is thread-safe by contract): `Ok(handle)` or `Err(message)`.
fn get(r: usize, p: &Path) -> Result<*mut IaptAdapter, String> {
    let c = CString::new(p.as_os_str().as_encoded_bytes()).expect("no NUL");
    let mut err = [0 as c_char; 512];
    let a = iapt_registry_get(r as *const IaptRegistry, c.as_ptr(), err.as_mut_ptr(), err.len());
    if a.is_null() {
        let bytes: Vec<u8> = err.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
        Err(String::from_utf8_lossy(&bytes).into_owned())
    } else {
        Ok(a)
    }
}

struct Reg(*mut IaptRegistry);

impl Reg {
    fn new(max_resident: i32, max_bytes: i64) -> Reg {
        let r = iapt_registry_new(max_resident, max_bytes, std::ptr::null_mut(), 0);
        assert!(!r.is_null());
        Reg(r)
    }

    /// `Ok(handle)` or `Err(message)`.
    fn get(&self, p: &Path) -> Result<*mut IaptAdapter, String> {
        get(self.0 as usize, p)
    }

    /// (resident, bytes, loads)
    fn stats(&self) -> (i64, i64, i64) {
        let (mut n, mut b, mut l) = (-1, -1, -1);
        assert_eq!(iapt_registry_stats(self.0, &mut n, &mut b, &mut l), IAPT_OK);
        (n, b, l)
    }
}

impl Drop for Reg {
    fn drop(&mut self) {
        iapt_registry_free(self.0);
    }
}

#[test]
fn least_recently_used_adapters_nobody_holds_are_dropped_and_held_ones_stay() {
    let dir = tempfile::tempdir().unwrap();
    let p: Vec<PathBuf> = (0..4).map(|i| write_adapter(dir.path(), &format!("a{i}.iapt.safetensors"), 2, 10 + i)).collect();
    let reg = Reg::new(2, 0);
    for q in &p[..2] {
        iapt_adapter_free(reg.get(q).unwrap());
    }
    // a0 is used again, so a1 is the least recently used when a2 comes.
    let a0 = reg.get(&p[0]).unwrap();
    iapt_adapter_free(a0);
    let a2 = reg.get(&p[2]).unwrap();
    assert_eq!(reg.stats().0, 2);
    assert_eq!(reg.stats().2, 3, "a0, a1, a2 loaded once each");
    // a0 is still resident (no load), a1 was dropped (loaded again).
    let again0 = reg.get(&p[0]).unwrap();
    assert_eq!(again0, a0, "a0 stayed resident: the same adapter");
    assert_eq!(reg.stats().2, 3);
    // Now a0 and a2 are both held: a third adapter finds no room and changes nothing.
    let e = reg.get(&p[3]).unwrap_err();
    assert!(e.contains("in use"), "{e}");
    assert_eq!(reg.stats(), (2, reg.stats().1, 3));
    iapt_adapter_free(again0);
    let a3 = reg.get(&p[3]).unwrap();
    assert_eq!(reg.stats().2, 4);
    // a2 (held) is still the same resident adapter; a0 was the one dropped.
    let again2 = reg.get(&p[2]).unwrap();
    assert_eq!(again2, a2);
    for a in [a2, again2, a3] {
        iapt_adapter_free(a);
    }
}

#[test]
fn a_byte_limit_bounds_the_resident_weights() {
    let dir = tempfile::tempdir().unwrap();
    let p: Vec<PathBuf> = (0..3).map(|i| write_adapter(dir.path(), &format!("b{i}.iapt.safetensors"), 2, 20 + i)).collect();
    let probe = Reg::new(0, 0);
    iapt_adapter_free(probe.get(&p[0]).unwrap());
    let one = probe.stats().1;
    assert!(one > 0);
    // Room for two adapters' weights, not three.
    let reg = Reg::new(0, 2 * one + one / 2);
    for q in &p {
        iapt_adapter_free(reg.get(q).unwrap());
        assert!(reg.stats().1 <= 2 * one + one / 2, "{:?}", reg.stats());
    }
    assert_eq!(reg.stats().0, 2);
}

#[test]
fn concurrent_first_gets_of_one_path_load_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_adapter(dir.path(), "c.iapt.safetensors", 3, 30);
    let reg = Reg::new(4, 0);
    let handles: Vec<usize> = std::thread::scope(|s| {
        let (r, p) = (reg.0 as usize, &p);
        let ts: Vec<_> = (0..8).map(|_| s.spawn(move || get(r, p).map(|a| a as usize))).collect();
        ts.into_iter().map(|t| t.join().unwrap().unwrap()).collect()
    });
    assert!(handles.windows(2).all(|w| w[0] == w[1]), "every get returned the same adapter");
    assert_eq!(reg.stats().2, 1, "one load");
    for h in handles {
        iapt_adapter_free(h as *mut IaptAdapter);
    }
}

#[test]
fn a_file_replaced_on_disk_is_loaded_again_and_a_touched_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_adapter(dir.path(), "d.iapt.safetensors", 2, 40);
    let reg = Reg::new(4, 0);
    let old = reg.get(&p).unwrap();
    assert_eq!(iapt_adapter_n_soft_tokens(old), 2);
    // Rewritten with the same bytes (a new inode and time): the same adapter, no load.
    let bytes = std::fs::read(&p).unwrap();
    std::fs::remove_file(&p).unwrap();
    std::fs::write(&p, &bytes).unwrap();
    let same = reg.get(&p).unwrap();
    assert_eq!(same, old);
    assert_eq!(reg.stats().2, 1);
    // Replaced by another adapter (3 soft tokens): loaded again; the old handle keeps its adapter.
    let other = write_adapter(dir.path(), "tmp.iapt.safetensors", 3, 41);
    std::fs::rename(&other, &p).unwrap();
    let new = reg.get(&p).unwrap();
    assert_ne!(new, old);
    assert_eq!(iapt_adapter_n_soft_tokens(new), 3);
    assert_eq!(iapt_adapter_n_soft_tokens(old), 2, "the old handle still holds the old adapter");
    assert_eq!(reg.stats().0, 1, "one resident adapter per path");
    assert_eq!(reg.stats().2, 2);
    for a in [old, same, new] {
        iapt_adapter_free(a);
    }
}

#[test]
fn bad_input_is_refused_with_a_code_and_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Reg::new(1, 0);
    let e = reg.get(&dir.path().join("missing.iapt.gguf")).unwrap_err();
    assert!(e.contains("missing.iapt.gguf") && e.contains("cannot open"), "{e}");
    let junk = dir.path().join("junk.iapt.gguf");
    std::fs::write(&junk, b"GGUF\x03\0\0\0 not really").unwrap();
    let e = reg.get(&junk).unwrap_err();
    assert!(e.contains("not a valid IAPT adapter"), "{e}");
    assert_eq!(reg.stats(), (0, 0, 0));
    let mut err = [0 as c_char; 128];
    assert!(iapt_registry_new(-1, 0, err.as_mut_ptr(), err.len()).is_null());
    assert!(iapt_registry_get(std::ptr::null(), c"x".as_ptr(), std::ptr::null_mut(), 0).is_null());
    assert_eq!(iapt_registry_stats(std::ptr::null(), std::ptr::null_mut(), std::ptr::null_mut(), std::ptr::null_mut()), IAPT_ERR_NULL);
}
