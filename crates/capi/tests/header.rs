//! `include/iapt.h` is what cbindgen generates from this crate: regenerated here and compared byte
//! for byte, so the committed header cannot drift from the Rust code. `IAPT_BLESS=1` rewrites it.

use std::path::Path;

#[test]
fn committed_header_equals_cbindgen_output() {
    let krate = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(krate.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut out = Vec::new();
    cbindgen::Builder::new().with_crate(krate).with_config(config).generate().expect("cbindgen generates the header").write(&mut out);
    let generated = String::from_utf8(out).expect("utf-8 header");
    let path = krate.join("../../include/iapt.h");
    if std::env::var_os("IAPT_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("write include/iapt.h");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "include/iapt.h differs from cbindgen's output; regenerate it with IAPT_BLESS=1 cargo test -p iapt-capi --test header\n--- generated:\n{generated}"
    );
}
