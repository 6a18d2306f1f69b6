//! The architecture table: which llama.cpp graph node carries the residual stream entering each
//! layer, per architecture (`general.architecture`), for the llama.cpp bundled with
//! llama-cpp-sys-2 0.1.161.
//!
//! In that version the graph builders name the nodes with `cb(tensor, name, il)`, which formats
//! `"{name}-{il}"` for a layer and `"{name}"` otherwise:
//! - layer 0 reads the node `embd` (the token embeddings after any scaling; `inp_embd` is the input
//!   leaf used only for embedding inputs, not the token path);
//! - layer l > 0 reads `l_out-{l-1}`, the previous layer's output;
//! - the last layer's `l_out` holds only the output rows (llama.cpp drops the others inside the last
//!   layer) and is never touched.
//!
//! Only architectures whose graphs were checked against an independent reference are listed; the
//! test `tests/parity.rs::hook_claims_the_expected_nodes` fails loudly if llama.cpp renames them.

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
];

/// The spec for an architecture, if supported.
pub fn arch_spec(arch: &str) -> Option<&'static ArchSpec> {
    ARCHS.iter().find(|a| a.name == arch)
}

/// Names of the supported architectures, comma-separated (for error messages).
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
    }
}
