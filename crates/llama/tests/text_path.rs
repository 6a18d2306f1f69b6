//! The text path never aborts (issue 27, finding 1): llama.cpp's tokenizer throws a C++
//! exception for a character a vocabulary without byte fallback cannot encode, and an exception
//! that reached Rust aborted the process. Every call that can throw now goes through the C++ shim.
//!
//! On every fixture vocabulary (the demo's SentencePiece model and each parity fixture's) and on
//! two vocabularies without byte fallback (the demo's and the llama fixture's with their 256 byte
//! tokens renamed, `<0x5A>` to `<0y5A>`: a character outside the vocabulary then makes llama.cpp's
//! tokenizer throw `std::out_of_range` from `unordered_map::at`), this tokenizes every single byte
//! that is a string on its own, every 2-byte UTF-8 sequence, control characters, long runs, and
//! combinations, with and without special tokens, then renders every token id of the vocabulary
//! back to bytes: each call returns tokens or a typed error ([`LlamaError::Unencodable`] names the
//! character), never an abort. A character the shim reports as unencodable is checked to be one:
//! tokenized alone it fails too; and the vocabularies without byte fallback must refuse some.

use std::path::PathBuf;

use iapt_llama::{gguf_probe, LlamaError, Model};

fn root() -> PathBuf {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    dir.join("../..")
}

/// Every vocabulary the repository carries: the demo's and the parity fixtures'.
fn vocabularies() -> Vec<PathBuf> {
    let mut v = vec![root().join("converters/python/demo/assets/base-q4_k_m.gguf")];
    let dir = root().join("converters/python/fixtures/models");
    let mut fixtures: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("fixtures")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with("-tiny-f32.gguf"))
        .collect();
    fixtures.sort();
    v.extend(fixtures);
    v
}

/// The texts to try: every 1-byte string (ASCII, controls included), every 2-byte UTF-8
/// sequence (U+0080..U+07FF), a few 3- and 4-byte characters, and longer mixes.
fn texts() -> Vec<String> {
    let mut out: Vec<String> = (0u32..0x80).filter_map(char::from_u32).map(String::from).collect();
    out.extend((0x80u32..0x800).filter_map(char::from_u32).map(String::from));
    for c in ['€', '中', '\u{FEFF}', '\u{200B}', '😀', '\u{10FFFF}'] {
        out.push(c.to_string());
    }
    for s in ["hello\n", "Z", "\t\t", " \u{0}x", "a\u{7f}b", "write the list backwards: é Z 中", "\r\n\r\n", "<s>", "</s><unk>"] {
        out.push(s.to_owned());
    }
    out.push("Zé\t".repeat(300));
    out
}

/// A copy of `src` (in `dir`) whose byte tokens are renamed so the vocabulary has no byte
/// fallback: every `<0x` in the metadata (before the tensor data) becomes `<0y`, same length.
fn without_byte_fallback(src: &std::path::Path, dir: &std::path::Path) -> PathBuf {
    let data_offset = gguf_probe(src).expect("probe").data_offset;
    let mut bytes = std::fs::read(src).unwrap();
    let meta = &mut bytes[..data_offset];
    let mut renamed = 0;
    for i in 0..meta.len().saturating_sub(3) {
        if &meta[i..i + 3] == b"<0x" {
            meta[i + 2] = b'y';
            renamed += 1;
        }
    }
    assert_eq!(renamed, 256, "{}: expected 256 byte tokens", src.display());
    let out = dir.join(format!("no-byte-fallback-{}", src.file_name().unwrap().to_string_lossy()));
    std::fs::write(&out, bytes).unwrap();
    out
}

#[test]
fn no_text_aborts_on_any_fixture_vocabulary() {
    let dir = tempfile::tempdir().unwrap();
    let mut vocabs: Vec<(PathBuf, bool)> = vocabularies().into_iter().map(|p| (p, false)).collect();
    for src in [&vocabs[0].0.clone(), &root().join("converters/python/fixtures/models/llama-tiny-f32.gguf")] {
        vocabs.push((without_byte_fallback(src, dir.path()), true));
    }
    for (path, no_fallback) in vocabs {
        let model = Model::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (mut ok, mut refused) = (0usize, 0usize);
        for text in texts() {
            for (add, parse) in [(true, false), (false, false), (true, true)] {
                match model.tokenize(&text, add, parse) {
                    Ok(tokens) => {
                        ok += 1;
                        assert!(
                            tokens.iter().all(|&t| t >= 0 && (t as usize) < model.n_vocab()),
                            "{}: {text:?}: ids out of range",
                            path.display()
                        );
                    }
                    Err(LlamaError::Unencodable { character, byte_offset }) => {
                        refused += 1;
                        let (c, i) = (character.expect("the culprit is named"), byte_offset.expect("and located"));
                        assert_eq!(text[i..].chars().next(), Some(c), "{text:?}: the offset points at the character");
                        let alone = model.tokenize(&c.to_string(), false, parse);
                        assert!(matches!(alone, Err(LlamaError::Unencodable { .. })), "{c:?} alone: {alone:?}");
                        let msg = LlamaError::Unencodable { character, byte_offset }.to_string();
                        assert!(msg.contains(&format!("U+{:04X}", u32::from(c))), "{msg}");
                    }
                    Err(e) => panic!("{}: {text:?}: unexpected error {e}", path.display()),
                }
            }
        }
        // Every id renders to bytes (special tokens as their text), and ids outside the vocabulary
        // render to nothing.
        for t in 0..model.n_vocab() as i32 {
            let _ = model.token_bytes(t);
        }
        assert!(model.token_bytes(-1).is_empty() && model.token_bytes(model.n_vocab() as i32).is_empty());
        if no_fallback {
            assert!(refused > 0, "{}: a vocabulary without byte fallback must refuse some characters", path.display());
            let e = model.tokenize("é", true, false).expect_err("é is not in the vocabulary");
            assert!(e.to_string().contains("'é' (U+00E9) at byte 0"), "{e}");
        }
        eprintln!("{}: {ok} tokenized, {refused} refused as unencodable", path.file_name().unwrap().to_string_lossy());
    }
}
