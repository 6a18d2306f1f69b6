//! `iapt generate --adapter A --hidden H.npy -o P.npy [--layer L]`: run the soft-prompt generator
//! on hidden states saved with NumPy, for checking an adapter against the training code.
//!
//! H is float32, C order: `[n_layer, n, n_embd]` (the instruction's hidden states entering each
//! layer), or `[n, n_embd]` with `--layer L`. P is float32 `[n_layer, n_soft_tokens, n_embd]`, or
//! `[n_soft_tokens, n_embd]` with `--layer L`, written atomically. `--reference` computes with the
//! f64 reference implementation instead of the f32 production path; `--check` computes both and
//! prints the relative error of the f32 path per layer.
//!
//! Exit codes: 0 success; 1 bad input (invalid adapter, wrong dtype or shape, non-finite values);
//! 2 an input file that cannot be opened, an unusable output path (`crate::files`), or `--threads 0`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use iapt_format::{validate_file, write_atomically, Code};
use iapt_generator::{reference, Generator, GeneratorError};
use iapt_npy::{Dtype, NpyError};

use super::{exit, EXIT_FAILURE, EXIT_USAGE};
use crate::files;

/// Arguments of `iapt generate`.
#[derive(clap::Args)]
pub struct Args {
    /// The adapter (either container).
    #[arg(long, value_name = "ADAPTER")]
    pub adapter: PathBuf,
    /// Hidden states: float32 .npy of shape [n_layer, n, n_embd] ([n, n_embd] with --layer).
    #[arg(long, value_name = "H.npy")]
    pub hidden: PathBuf,
    /// Where to write the soft tokens: float32 .npy of shape [n_layer, n_soft_tokens, n_embd]
    /// ([n_soft_tokens, n_embd] with --layer).
    #[arg(short, long, value_name = "P.npy")]
    pub output: PathBuf,
    /// Run only this layer; the hidden states are then [n, n_embd].
    #[arg(long, value_name = "L")]
    pub layer: Option<usize>,
    /// Threads per layer for the f32 path.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub threads: usize,
    /// Compute with the f64 reference implementation (slow; the output is still float32).
    #[arg(long, conflicts_with = "check")]
    pub reference: bool,
    /// Also run the f64 reference and print the f32 path's relative error per layer.
    #[arg(long)]
    pub check: bool,
}

/// A bad-input failure: the message to print and the exit code.
struct Bad(u8, String);

/// Runs `iapt generate`.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    match generate(args) {
        Ok(code) => Ok(code),
        Err(Bad(code, msg)) => {
            eprintln!("error: {msg}");
            Ok(exit(code))
        }
    }
}

impl From<crate::fail::Fail> for Bad {
    fn from(f: crate::fail::Fail) -> Bad {
        Bad(f.kind.exit_code(), f.message)
    }
}

fn generate(args: &Args) -> Result<ExitCode, Bad> {
    let inputs = files::inputs(&[("the adapter", &args.adapter), ("the hidden states", &args.hidden)])?;
    files::output("-o", &args.output, &["npy"], &inputs)?;
    let v = validate_file(&args.adapter, None);
    let Some(adapter) = v.adapter else {
        for f in &v.report.findings {
            eprintln!("{}: {f}", args.adapter.display());
        }
        let code = if v.report.has(Code::Unreadable) { EXIT_USAGE } else { EXIT_FAILURE };
        return Err(Bad(code, format!("{} is not a valid IAPT adapter (run `iapt validate` for the full report)", args.adapter.display())));
    };
    let gen = Generator::from_adapter(&adapter).map_err(|e| Bad(EXIT_FAILURE, format!("{}: {e}", args.adapter.display())))?;
    let gen = gen.with_threads(args.threads).map_err(|e| Bad(EXIT_USAGE, format!("--threads {}: {e}", args.threads)))?;
    let (n_layer, d, m) = (gen.n_layer(), gen.n_embd(), gen.n_soft_tokens());

    let h = read_hidden(&args.hidden)?;
    let hp = args.hidden.display();
    let layers: Vec<usize> = match args.layer {
        Some(l) if l >= n_layer => {
            let which = if n_layer == 1 { "one layer, 0".to_owned() } else { format!("{n_layer} layers, 0 to {}", n_layer - 1) };
            return Err(Bad(EXIT_FAILURE, format!("--layer {l} does not exist: the adapter has {which}; pick one of them")));
        }
        Some(l) => vec![l],
        None => (0..n_layer).collect(),
    };
    let (want_rank, want_shape) = match args.layer {
        Some(_) => (2, "[n, n_embd]".to_owned()),
        None => (3, format!("[n_layer = {n_layer}, n, n_embd]")),
    };
    if h.shape.len() != want_rank {
        let fix = if args.layer.is_some() {
            "pass the hidden states of that one layer, e.g. numpy.save(path, h[L])"
        } else {
            "stack every layer's hidden states, or pass --layer L for a single [n, n_embd] array"
        };
        return Err(Bad(
            EXIT_FAILURE,
            format!("{hp}: shape {:?} has {} dimensions, but {want_shape} is required; {fix}", h.shape, h.shape.len()),
        ));
    }
    let n = h.shape[want_rank - 2];
    if h.shape[want_rank - 1] != d {
        return Err(Bad(
            EXIT_FAILURE,
            format!(
                "{hp}: the last dimension is {} but the adapter's n_embd is {d}; the hidden states must come from the adapter's base model",
                h.shape[want_rank - 1]
            ),
        ));
    }
    if want_rank == 3 && h.shape[0] != n_layer {
        return Err(Bad(
            EXIT_FAILURE,
            format!(
                "{hp}: the first dimension is {} but the adapter has {n_layer} layers; save one [n, n_embd] slice per layer, stacked, or use --layer",
                h.shape[0]
            ),
        ));
    }
    if n == 0 {
        return Err(Bad(EXIT_FAILURE, format!("{hp}: the instruction has 0 rows; the soft tokens need at least one instruction row")));
    }

    let per_layer = n * d;
    let mut out = vec![0.0f32; layers.len() * m * d];
    for (i, &l) in layers.iter().enumerate() {
        let rows = &h.data[i * per_layer..(i + 1) * per_layer];
        let dst = &mut out[i * m * d..(i + 1) * m * d];
        let bad_rows = |e: GeneratorError| match e {
            GeneratorError::NonFiniteInput { row } if rows.chunks(d).nth(row).is_some_and(|r| r.iter().all(|v| v.is_finite())) => Bad(
                EXIT_FAILURE,
                format!(
                    "{hp}: layer {l}, row {row}: the values are finite but so large that the adapter's attention scores overflow; \
                     check the hidden states are the model's (not scaled or corrupted)"
                ),
            ),
            GeneratorError::NonFiniteInput { row } => {
                Bad(EXIT_FAILURE, format!("{hp}: layer {l}, row {row} holds NaN or infinite values; hidden states must be finite"))
            }
            e => Bad(EXIT_FAILURE, format!("layer {l}: {e}")),
        };
        if args.reference || args.check {
            if let Some(row) = rows.chunks(d).position(|r| r.iter().any(|v| !v.is_finite())) {
                return Err(bad_rows(GeneratorError::NonFiniteInput { row }));
            }
            let r64: Vec<f64> = rows.iter().map(|&v| f64::from(v)).collect();
            let want = reference::generate(&adapter, l, &r64).map_err(bad_rows)?;
            if args.reference {
                dst.iter_mut().zip(&want).for_each(|(o, &w)| *o = w as f32);
            } else {
                gen.generate(l, rows, dst).map_err(bad_rows)?;
                let err = iapt_generator::reference::rel_err(dst, &want);
                eprintln!("layer {l}: max |f32 - f64| / max |f64| = {err:.3e}");
            }
        } else {
            gen.generate(l, rows, dst).map_err(bad_rows)?;
        }
    }

    let shape: Vec<usize> = if args.layer.is_some() { vec![m, d] } else { vec![n_layer, m, d] };
    write_atomically(&args.output, |w| iapt_npy::write_f32(w, &shape, &out).map_err(npy_to_io))
        .with_context(|| format!("writing {}", args.output.display()))
        .map_err(|e| Bad(EXIT_FAILURE, format!("{e:#}")))?;
    eprintln!(
        "wrote {} (float32 {shape:?}: {} layer(s) x {m} soft tokens x {d}, from {n} instruction rows{})",
        args.output.display(),
        layers.len(),
        if args.reference { ", f64 reference" } else { "" }
    );
    Ok(ExitCode::SUCCESS)
}

/// Reads H, turning every failure into a message that names the file, the rule and the fix.
fn read_hidden(path: &Path) -> Result<iapt_npy::Array<f32>, Bad> {
    let p = path.display();
    let header = std::fs::File::open(path)
        .map_err(|e| Bad(EXIT_USAGE, format!("{p}: cannot open: {e}")))
        .and_then(|f| iapt_npy::read_header(&mut std::io::BufReader::new(f)).map_err(|e| bad_npy(path, e)))?;
    if header.dtype != Dtype::F32 {
        return Err(Bad(
            EXIT_FAILURE,
            format!(
                "{p}: the hidden states are {} but must be float32; save them with numpy.save(path, h.astype(numpy.float32))",
                header.dtype
            ),
        ));
    }
    iapt_npy::read_f32_file(path).map_err(|e| bad_npy(path, e))
}

fn bad_npy(path: &Path, e: NpyError) -> Bad {
    let code = if matches!(e, NpyError::Io(_)) { EXIT_USAGE } else { EXIT_FAILURE };
    Bad(code, format!("{}: {e}", path.display()))
}

fn npy_to_io(e: NpyError) -> std::io::Error {
    match e {
        NpyError::Io(e) => e,
        other => std::io::Error::other(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use iapt_format::{Container, DType, Role};
    use iapt_generator::testing::{all_activations, fresh_seed, random_adapter, rel_err, AdapterSpec, Rng};

    use super::*;

    fn args(dir: &Path, layer: Option<usize>) -> Args {
        Args {
            adapter: dir.join("a.safetensors"),
            hidden: dir.join("h.npy"),
            output: dir.join("p.npy"),
            layer,
            threads: 1,
            reference: false,
            check: false,
        }
    }

    fn save_npy(path: &Path, shape: &[usize], data: &[f32]) {
        let mut f = std::fs::File::create(path).unwrap();
        iapt_npy::write_f32(&mut f, shape, data).unwrap();
    }

    #[test]
    fn matches_the_f64_reference_for_every_activation() {
        let seed = fresh_seed();
        let mut rng = Rng::new(seed);
        let dir = tempfile::tempdir().unwrap();
        for act in all_activations(4) {
            let r = act.rational().map_or(6, |rc| rc.groups * 3);
            let mut spec = AdapterSpec::small(3, 24, 4, r, act);
            spec.dtype = DType::FLOATS[rng.below(3)];
            spec.shared = if rng.below(2) == 0 { vec![Role::UpWeight] } else { vec![] };
            let adapter = random_adapter(&spec, &mut rng).unwrap();
            adapter.save(dir.path().join("a.safetensors"), Container::Safetensors).unwrap();
            let n = 1 + rng.below(20);
            let h = rng.vec_f32(3 * n * 24, 1.0);
            save_npy(&dir.path().join("h.npy"), &[3, n, 24], &h);
            let mut a = args(dir.path(), None);
            a.threads = 1 + rng.below(2);
            assert_eq!(run(&a).unwrap(), ExitCode::SUCCESS, "seed {seed}");
            let p = iapt_npy::read_f32_file(dir.path().join("p.npy")).unwrap();
            assert_eq!(p.shape, vec![3, 4, 24]);
            for l in 0..3 {
                let rows: Vec<f64> = h[l * n * 24..(l + 1) * n * 24].iter().map(|&v| f64::from(v)).collect();
                let want = reference::generate(&adapter, l, &rows).unwrap();
                let err = rel_err(&p.data[l * 96..(l + 1) * 96], &want);
                assert!(err <= 1e-5, "seed {seed}: {act:?} layer {l}: rel err {err:e}");
            }
            // One layer.
            save_npy(&dir.path().join("h.npy"), &[n, 24], &h[n * 24..2 * n * 24]);
            assert_eq!(run(&args(dir.path(), Some(1))).unwrap(), ExitCode::SUCCESS);
            let one = iapt_npy::read_f32_file(dir.path().join("p.npy")).unwrap();
            assert_eq!(one.shape, vec![4, 24]);
            assert!(rel_err(&one.data, &p.data[96..192].iter().map(|&v| f64::from(v)).collect::<Vec<_>>()) <= 1e-6);
        }
    }

    #[test]
    fn reference_and_check_modes() {
        let mut rng = Rng::new(fresh_seed());
        let dir = tempfile::tempdir().unwrap();
        let adapter = random_adapter(&AdapterSpec::small(2, 8, 2, 4, iapt_format::Activation::Gelu), &mut rng).unwrap();
        adapter.save(dir.path().join("a.safetensors"), Container::Gguf).unwrap();
        save_npy(&dir.path().join("h.npy"), &[2, 3, 8], &rng.vec_f32(48, 1.0));
        let mut a = args(dir.path(), None);
        a.reference = true;
        assert_eq!(run(&a).unwrap(), ExitCode::SUCCESS);
        a.reference = false;
        a.check = true;
        assert_eq!(run(&a).unwrap(), ExitCode::SUCCESS);
    }

    #[test]
    fn bad_inputs_exit_1_or_2_and_write_nothing() {
        let mut rng = Rng::new(fresh_seed());
        let dir = tempfile::tempdir().unwrap();
        let adapter = random_adapter(&AdapterSpec::small(2, 8, 2, 4, iapt_format::Activation::Relu), &mut rng).unwrap();
        adapter.save(dir.path().join("a.safetensors"), Container::Safetensors).unwrap();
        let h = dir.path().join("h.npy");
        type Case<'a> = (Option<usize>, Box<dyn Fn() + 'a>, u8);
        let cases: Vec<Case<'_>> = vec![
            (None, Box::new(|| save_npy(&h, &[2, 3, 7], &[0.0; 42])), 1),     // wrong n_embd
            (None, Box::new(|| save_npy(&h, &[3, 3, 8], &[0.0; 72])), 1),     // wrong n_layer
            (None, Box::new(|| save_npy(&h, &[3, 8], &[0.0; 24])), 1),        // 2-D without --layer
            (Some(0), Box::new(|| save_npy(&h, &[2, 3, 8], &[0.0; 48])), 1),  // 3-D with --layer
            (Some(2), Box::new(|| save_npy(&h, &[3, 8], &[0.0; 24])), 1),     // no such layer
            (None, Box::new(|| save_npy(&h, &[2, 0, 8], &[])), 1),            // no rows
            (Some(1), Box::new(|| save_npy(&h, &[1, 8], &[f32::NAN; 8])), 1), // non-finite
            (None, Box::new(|| std::fs::write(&h, b"not numpy").unwrap()), 1),
            (
                None,
                Box::new(|| {
                    // float64 data
                    let mut b = iapt_npy::header_bytes(Dtype::F64, &[2, 3, 8]);
                    b.extend(std::iter::repeat_n(0u8, 48 * 8));
                    std::fs::write(&h, b).unwrap();
                }),
                1,
            ),
            (None, Box::new(|| std::fs::remove_file(&h).unwrap()), 2), // missing file
        ];
        for (i, (layer, setup, code)) in cases.into_iter().enumerate() {
            setup();
            let a = args(dir.path(), layer);
            assert_eq!(run(&a).unwrap(), exit(code), "case {i}");
            assert!(!a.output.exists(), "case {i}: nothing may be written");
        }
        let mut a = args(dir.path(), None);
        a.adapter = dir.path().join("missing.gguf");
        assert_eq!(run(&a).unwrap(), exit(EXIT_USAGE));
        save_npy(&h, &[2, 3, 8], &[0.0; 48]);
        let mut a = args(dir.path(), None);
        a.threads = 0;
        assert_eq!(run(&a).unwrap(), exit(EXIT_USAGE));
        assert!(!a.output.exists());
    }
}
