//! The architecture table: which llama.cpp graph node carries the residual stream entering each
//! layer, per architecture (`general.architecture`), for the llama.cpp bundled with
//! llama-cpp-sys-2 0.1.161 (the `iapt` binary) and the one vendored in llama-cpp-python 0.3.36
//! (libiapt's tested hosts), which name these nodes alike.
//!
//! In that version the graph builders name the nodes with `cb(tensor, name, il)`, which formats
//! `"{name}-{il}"` for a layer and `"{name}"` otherwise:
//! - layer 0 reads the embeddings as they enter layer 0, after any architecture-specific scaling:
//!   `embd` (the output of `build_inp_embd`; `inp_embd` is the input leaf used only for embedding
//!   inputs, not the token path) for llama, qwen2, qwen3 and phi3; `inp_scaled` for gemma2 (a
//!   `ggml_scale` by sqrt(n_embd) of `embd`, which is the unscaled embedding there) and gemma3
//!   (`build_inp_embd` scales the token rows and the builder renames that node `inp_scaled`, so no
//!   `embd` is left);
//! - layer l > 0 reads `l_out-{l-1}`, the previous layer's output (for the post-norm Gemma 2/3
//!   blocks too: `l_out` is the residual sum after the FFN's post-norm, and the next layer's
//!   `attn_norm` and its residual add `sa_out` both read it);
//! - the last layer's `l_out` holds only the output rows (llama.cpp drops the others inside the last
//!   layer) and is never touched.
//!
//! Only architectures whose graphs were checked against an independent reference are listed: every
//! entry must have parity fixtures (Hugging Face transformers in float64), and `tests/parity.rs`
//! fails if one has none, if llama.cpp renames the nodes, or if a layer stops reading them (in
//! `iapt-llama`; libiapt's host tests check the other llama.cpp's logits the same way).

/// How the hook finds the layer inputs of one architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchSpec {
    /// `general.architecture`.
    pub name: &'static str,
    /// The node holding layer 0's input.
    pub layer0_node: &'static str,
    /// The prefix of layer l's input node, followed by `l - 1` (`l_out-`).
    pub layer_out_prefix: &'static str,
}

/// Supported architectures (verified by the parity tests).
pub const ARCHS: &[ArchSpec] = &[
    // Llama 2/3, Mistral and other llama-architecture GGUFs.
    ArchSpec { name: "llama", layer0_node: "embd", layer_out_prefix: "l_out-" },
    ArchSpec { name: "qwen2", layer0_node: "embd", layer_out_prefix: "l_out-" },
    ArchSpec { name: "qwen3", layer0_node: "embd", layer_out_prefix: "l_out-" },
    // Gemma 2: embeddings scaled by sqrt(n_embd) (`inp_scaled`), post-norm blocks, soft-capping.
    ArchSpec { name: "gemma2", layer0_node: "inp_scaled", layer_out_prefix: "l_out-" },
    // Gemma 3 (text): as Gemma 2 with q/k norms; the scaled embeddings are renamed `inp_scaled`.
    ArchSpec { name: "gemma3", layer0_node: "inp_scaled", layer_out_prefix: "l_out-" },
    // Phi-3 and Phi-4 (fused qkv and gate/up projections).
    ArchSpec { name: "phi3", layer0_node: "embd", layer_out_prefix: "l_out-" },
];

/// The spec for an architecture, if supported.
pub fn arch_spec(arch: &str) -> Option<&'static ArchSpec> {
    ARCHS.iter().find(|a| a.name == arch)
}

/// Names of the supported architectures (llama.cpp's `general.architecture`), comma-separated, in
/// the table's order (for error messages).
pub fn supported_archs() -> String {
    ARCHS.iter().map(|a| a.name).collect::<Vec<_>>().join(", ")
}

impl ArchSpec {
    /// The node name holding the input of `layer`.
    pub fn layer_input_node(&self, layer: usize) -> String {
        if layer == 0 {
            self.layer0_node.to_owned()
        } else {
            format!("{}{}", self.layer_out_prefix, layer - 1)
        }
    }

    /// The layer whose input `node` holds, for a model of `n_layer` layers (the last layer's output
    /// maps to nothing).
    pub fn layer_of(&self, node: &str, n_layer: usize) -> Option<usize> {
        if node == self.layer0_node {
            return Some(0);
        }
        let k: usize = node.strip_prefix(self.layer_out_prefix)?.parse().ok()?;
        (k + 1 < n_layer).then_some(k + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_last_layer_is_never_claimed() {
        let a = arch_spec("llama").unwrap();
        for l in 0..4 {
            assert_eq!(a.layer_of(&a.layer_input_node(l), 4), Some(l));
        }
        assert_eq!(a.layer_of("l_out-3", 4), None);
        assert_eq!(a.layer_of("inp_embd", 4), None);
        assert_eq!(a.layer_of("l_out-x", 4), None);
        assert!(arch_spec("mamba").is_none());
        let g = arch_spec("gemma2").unwrap();
        assert_eq!(g.layer_input_node(0), "inp_scaled");
        assert_eq!(g.layer_of("embd", 4), None, "gemma2's embd is the unscaled embedding");
        assert_eq!(g.layer_of("inp_scaled", 4), Some(0));
    }
}
