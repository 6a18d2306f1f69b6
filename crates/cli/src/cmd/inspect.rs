//! `iapt inspect FILE [--json]`: config, tensor table, parameter count and bytes.

use std::path::PathBuf;
use std::process::ExitCode;

use iapt_format::{validate_file, Activation, Adapter, Code};

use super::{exit, EXIT_FAILURE, EXIT_USAGE};

/// Arguments of `iapt inspect`.
#[derive(clap::Args)]
pub struct Args {
    /// The adapter file (either container).
    pub file: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `iapt inspect`.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    crate::files::input("the adapter", &args.file)?;
    let v = validate_file(&args.file, None);
    let Some(a) = v.adapter else {
        for f in &v.report.findings {
            eprintln!("{}: {f}", args.file.display());
        }
        eprintln!("error: {} is not a valid IAPT adapter (run `iapt validate` for the full report)", args.file.display());
        return Ok(exit(if v.report.has(Code::Unreadable) { EXIT_USAGE } else { EXIT_FAILURE }));
    };
    if args.json {
        crate::outln!("{}", serde_json::to_string_pretty(&to_json(&a))?)?;
    } else {
        print_text(&a)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn to_json(a: &Adapter) -> serde_json::Value {
    let c = a.config();
    let activation = match &c.activation {
        Activation::Rational(r) => serde_json::json!({
            "kind": "rational", "variant": r.variant.as_str(), "numerator_degree": r.numerator_degree,
            "denominator_degree": r.denominator_degree, "groups": r.groups,
        }),
        other => serde_json::json!({ "kind": other.name() }),
    };
    serde_json::json!({
        "container": a.source().map(|(_, c)| c.to_string()),
        "config": {
            "spec_version": c.spec_version.to_string(), "n_layer": c.n_layer, "n_embd": c.n_embd,
            "n_soft_tokens": c.n_soft_tokens, "bottleneck": c.bottleneck, "activation": activation,
            "pool_type": "query", "pool_scale": c.pool_scale, "base_model_arch": c.base_model_arch,
        },
        "metadata": a.extras().iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.to_text()))).collect::<serde_json::Map<_, _>>(),
        "tensors": a.tensors().iter().map(|t| serde_json::json!({
            "name": t.name().to_string(), "dtype": t.dtype().to_string(), "shape": t.shape(), "bytes": t.byte_len(),
        })).collect::<Vec<_>>(),
        "parameters": a.param_count(),
        "bytes": a.data_bytes(),
        "warnings": a.warnings(),
    })
}

fn print_text(a: &Adapter) -> std::io::Result<()> {
    let c = a.config();
    if let Some((p, cont)) = a.source() {
        crate::outln!("file:            {} ({cont})", p.display())?;
    }
    crate::outln!("spec version:    {}", c.spec_version)?;
    crate::outln!("base model arch: {}", c.base_model_arch)?;
    crate::outln!("n_layer:         {}", c.n_layer)?;
    crate::outln!("n_embd:          {}", c.n_embd)?;
    crate::outln!("n_soft_tokens:   {}", c.n_soft_tokens)?;
    crate::outln!("bottleneck:      {}", c.bottleneck)?;
    match &c.activation {
        Activation::Rational(r) => crate::outln!(
            "activation:      rational (variant {}, degrees {}/{}, {} group{})",
            r.variant.as_str(),
            r.numerator_degree,
            r.denominator_degree,
            r.groups,
            if r.groups == 1 { "" } else { "s" }
        )?,
        other => crate::outln!("activation:      {}", other.name())?,
    }
    crate::outln!("pool:            query, scale {}", c.pool_scale)?;
    for (k, v) in a.extras() {
        crate::outln!("{k}: {}", v.to_text())?;
    }
    crate::outln!()?;
    let w = a.tensors().iter().map(|t| t.name().to_string().len()).max().unwrap_or(4).max(4);
    crate::outln!("{:<w$}  {:<5}  {:<14}  {:>12}", "name", "dtype", "shape", "bytes")?;
    for t in a.tensors() {
        crate::outln!(
            "{:<w$}  {:<5}  {:<14}  {:>12}",
            t.name().to_string(),
            t.dtype().to_string(),
            format!("{:?}", t.shape()),
            t.byte_len()
        )?;
    }
    crate::outln!()?;
    crate::outln!("parameters: {}", a.param_count())?;
    crate::outln!("data bytes: {}", a.data_bytes())?;
    for w in a.warnings() {
        crate::outln!("{w}")?;
    }
    Ok(())
}
