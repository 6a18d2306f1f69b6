//! `iapt bench`: prefill and decode throughput of the base model and of the model with an IAPT
//! adapter, side by side in one process with the same context settings (see
//! `crate::tools::bench` for the method).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::tools::bench::{bench, bench_batch, BatchDecode, BenchConfig, PairRatios, Throughput};

use crate::args::{open_adapter, EngineShape, RuntimeArgs};
use crate::fail::Fail;
use crate::files;

/// Arguments of `iapt bench`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The base model (GGUF).
    #[arg(long, value_name = "BASE.gguf")]
    pub model: PathBuf,
    /// The IAPT adapter.
    #[arg(long, value_name = "ADAPTER")]
    pub adapter: PathBuf,
    /// Tokens in the prefill (with the adapter: instruction plus soft tokens).
    #[arg(long, default_value_t = 512, value_name = "N")]
    pub prompt_len: usize,
    /// Decode steps.
    #[arg(long, default_value_t = 128, value_name = "N")]
    pub gen: usize,
    /// Measured repetitions per variant (after one warm-up), each a base/IAPT pair; the median of
    /// the per-pair ratios (with their min and max) is reported next to the best and median runs.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub reps: usize,
    /// Also measure decode with this many sequences decoding together (base: all without the
    /// adapter; IAPT: all prefilled with it), e.g. `--batch 4,16`; 1 is the run above.
    #[arg(long, value_delimiter = ',', default_value = "16", value_name = "N,...")]
    pub batch: Vec<usize>,
    /// Also write the results as one JSON object (settings, devices, best and median runs).
    #[arg(long, value_name = "OUT.json")]
    pub json: Option<PathBuf>,
    /// Model and context.
    #[command(flatten)]
    pub ctx: RuntimeArgs,
}

/// Runs `iapt bench`.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    iapt_llama::set_verbose(args.ctx.verbose);
    if args.reps == 0 || args.gen < 2 {
        return Err(Fail::usage("--reps must be at least 1 and --gen at least 2").into());
    }
    if let Some(b) = args.batch.iter().find(|&&b| !(1..=256).contains(&b)) {
        return Err(Fail::usage(format!("--batch {b}: each batch must be 1..=256 sequences")).into());
    }
    args.ctx.check()?;
    let inputs = files::inputs(&[("the base model", &args.model), ("the adapter", &args.adapter)])?;
    if let Some(out) = &args.json {
        files::output("--json", out, &["json"], &inputs)?;
    }
    let mut ctx = args.ctx.clone();
    ctx.ctx_size = ctx.ctx_size.max(u32::try_from(args.prompt_len + args.gen).unwrap_or(u32::MAX));
    let adapter = open_adapter(&args.adapter, &args.model)?;
    let model = args.ctx.load_model(&args.model)?;
    let threads = args.ctx.threads();
    let cfg = BenchConfig { prompt_len: args.prompt_len, gen: args.gen, reps: args.reps, engine: ctx.engine_config(EngineShape::SINGLE)? };
    eprintln!(
        "model {} ({} parameters, {} layers, n_embd {}), adapter m = {}, r = {}; {} threads, prompt {} tokens, {} decode steps",
        args.model.display(),
        model.n_params(),
        model.n_layer(),
        model.n_embd(),
        adapter.config().n_soft_tokens,
        adapter.config().bottleneck,
        threads,
        args.prompt_len,
        args.gen
    );
    let r = bench(&model, &adapter, &cfg, &mut |line| eprintln!("{line}"))?;
    let mut batches = vec![BatchDecode { batch: 1, base_tps: r.base.decode_tps, iapt_tps: r.iapt.decode_tps, pairs: r.decode_pairs }];
    for &b in args.batch.iter().filter(|&&b| b > 1) {
        batches.push(bench_batch(&model, &adapter, &cfg, b, &mut |line| eprintln!("{line}"))?);
    }
    if let Some(path) = &args.json {
        let tp = |t: Throughput| serde_json::json!({ "prefill_tps": t.prefill_tps, "decode_tps": t.decode_tps });
        let pairs = |p: PairRatios| serde_json::json!({ "median": p.median, "min": p.min, "max": p.max });
        let v = serde_json::json!({
            "model": args.model.display().to_string(),
            "adapter": args.adapter.display().to_string(),
            "n_params": model.n_params(),
            "n_layer": model.n_layer(),
            "n_embd": model.n_embd(),
            "n_soft_tokens": adapter.config().n_soft_tokens,
            "bottleneck": adapter.config().bottleneck,
            "prompt_len": args.prompt_len,
            "gen": args.gen,
            "reps": args.reps,
            "threads": threads,
            "n_gpu_layers": args.ctx.model_params().llama_n_gpu_layers(),
            "devices": super::devices::devices_line(),
            "base": tp(r.base),
            "iapt": tp(r.iapt),
            "base_median": tp(r.base_median),
            "iapt_median": tp(r.iapt_median),
            "prefill_ratio": r.prefill_ratio(),
            "decode_ratio": r.decode_ratio(),
            "hook_secs": r.hook_secs,
            "base_prefill_secs": r.base_prefill_secs,
            "hook_remote_copies": r.hook_remote_copies,
            "prefill_pair_ratio": pairs(r.prefill_pairs),
            "decode_pair_ratio": pairs(r.decode_pairs),
            "hook_split_secs": { "read": r.hook_split[0], "generate": r.hook_split[1], "write": r.hook_split[2], "rest": r.hook_split[3] },
            "rpc": args.ctx.rpc,
            "decode_at_batch": batches.iter().map(|b| serde_json::json!({
                "batch": b.batch, "base_tps": b.base_tps, "iapt_tps": b.iapt_tps, "pair_ratio": pairs(b.pairs),
            })).collect::<Vec<_>>(),
        });
        iapt_format::write_atomically(path, |w| serde_json::to_writer_pretty(w, &v).map_err(std::io::Error::other))?;
    }
    crate::outln!("| variant | prefill tok/s (best) | decode tok/s (best) | prefill tok/s (median) | decode tok/s (median) |")?;
    crate::outln!("|---|---|---|---|---|")?;
    let (b, i, bm, im) = (r.base, r.iapt, r.base_median, r.iapt_median);
    crate::outln!("| base | {:.2} | {:.2} | {:.2} | {:.2} |", b.prefill_tps, b.decode_tps, bm.prefill_tps, bm.decode_tps)?;
    crate::outln!("| IAPT | {:.2} | {:.2} | {:.2} | {:.2} |", i.prefill_tps, i.decode_tps, im.prefill_tps, im.decode_tps)?;
    crate::outln!(
        "| IAPT / base | {:.3}x | {:.3}x | {:.3}x | {:.3}x |",
        r.prefill_ratio(),
        r.decode_ratio(),
        im.prefill_tps / bm.prefill_tps,
        im.decode_tps / bm.decode_tps
    )?;
    crate::outln!(
        "\nhook time per IAPT prefill (median): {:.1} ms = {:.2}% of the base prefill ({:.0} ms)",
        r.hook_secs * 1e3,
        100.0 * r.hook_secs / r.base_prefill_secs,
        r.base_prefill_secs * 1e3
    )?;
    let [read, generate, write, rest] = r.hook_split.map(|v| v * 1e3);
    crate::outln!(
        "  split (medians): reading rows {read:.1} ms, generating {generate:.1} ms, writing rows {write:.1} ms, rest {rest:.1} ms"
    )?;
    let (p, d) = (r.prefill_pairs, r.decode_pairs);
    crate::outln!(
        "IAPT / base per pair over {} pairs: prefill median {:.3}x (min {:.3}x, max {:.3}x), decode median {:.3}x (min {:.3}x, max {:.3}x)",
        args.reps,
        p.median,
        p.min,
        p.max,
        d.median,
        d.min,
        d.max
    )?;
    crate::outln!("\n| decode, sequences at once | base tok/s (best) | IAPT tok/s (best) | IAPT / base (median of pairs) |")?;
    crate::outln!("|---:|---:|---:|---:|")?;
    for b in &batches {
        crate::outln!(
            "| {} | {:.2} | {:.2} | {:.3}x (min {:.3}x, max {:.3}x) |",
            b.batch,
            b.base_tps,
            b.iapt_tps,
            b.pairs.median,
            b.pairs.min,
            b.pairs.max
        )?;
    }
    if r.hook_remote_copies > 0 {
        crate::outln!(
            "hook row copies outside host memory per IAPT prefill: {} (one round trip each); the hook time then includes waiting for \
             the device or worker to finish computing each node it reads, so the prefill ratio is the measure of IAPT's cost",
            r.hook_remote_copies
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
