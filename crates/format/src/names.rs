//! Tensor names of spec v1 (`iapt.{scope}.{role}`), the roles, and the shape each role must have.

use std::fmt;

use crate::config::AdapterConfig;

/// What a tensor is for inside one layer's generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// `down.weight`, shape `[r, d]`: the down-projection W_down.
    DownWeight,
    /// `down.bias`, shape `[r]`: optional bias of the down-projection.
    DownBias,
    /// `pool.query`, shape `[m, r]`: one learned query row per soft token.
    PoolQuery,
    /// `up.weight`, shape `[d, r]`: the up-projection W_up.
    UpWeight,
    /// `up.bias`, shape `[d]`: optional bias of the up-projection.
    UpBias,
    /// `act.num`, shape `[G, M+1]`: rational numerator coefficients (rational activations only).
    ActNum,
    /// `act.den`, shape `[G, N]` (`[G, N+1]` for variant C): rational denominator coefficients.
    ActDen,
}

impl Role {
    /// Every role, in the canonical order used when writing files.
    pub const ALL: [Role; 7] =
        [Role::DownWeight, Role::DownBias, Role::PoolQuery, Role::UpWeight, Role::UpBias, Role::ActNum, Role::ActDen];

    /// The role's suffix in tensor names, e.g. `down.weight`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::DownWeight => "down.weight",
            Role::DownBias => "down.bias",
            Role::PoolQuery => "pool.query",
            Role::UpWeight => "up.weight",
            Role::UpBias => "up.bias",
            Role::ActNum => "act.num",
            Role::ActDen => "act.den",
        }
    }

    /// Parses a role suffix.
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Whether this is one of the two large matrices (`down.weight`, `up.weight`), the roles that
    /// may be stored as Q8_0 (spec 1.1).
    pub fn is_matrix(self) -> bool {
        matches!(self, Role::DownWeight | Role::UpWeight)
    }

    /// Whether a valid adapter must contain this role (biases are optional; the activation
    /// coefficients are required exactly when the activation is rational).
    pub fn is_required(self, config: &AdapterConfig) -> bool {
        match self {
            Role::DownWeight | Role::PoolQuery | Role::UpWeight => true,
            Role::DownBias | Role::UpBias => false,
            Role::ActNum | Role::ActDen => config.activation.rational().is_some(),
        }
    }

    /// Whether this role may appear at all under `config`.
    pub fn is_allowed(self, config: &AdapterConfig) -> bool {
        match self {
            Role::ActNum | Role::ActDen => config.activation.rational().is_some(),
            _ => true,
        }
    }

    /// The row-major (PyTorch-order) shape this role must have under `config`.
    pub fn expected_shape(self, config: &AdapterConfig) -> Vec<u64> {
        let d = u64::from(config.n_embd);
        let r = u64::from(config.bottleneck);
        let m = u64::from(config.n_soft_tokens);
        match self {
            Role::DownWeight => vec![r, d],
            Role::DownBias => vec![r],
            Role::PoolQuery => vec![m, r],
            Role::UpWeight => vec![d, r],
            Role::UpBias => vec![d],
            Role::ActNum | Role::ActDen => {
                let rat = config.activation.rational();
                let (g, n) = match (self, rat) {
                    (Role::ActNum, Some(rc)) => (rc.groups, rc.numerator_degree + 1),
                    (Role::ActDen, Some(rc)) => (rc.groups, rc.denominator_len()),
                    _ => (0, 0),
                };
                vec![u64::from(g), u64::from(n)]
            }
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a tensor applies: one layer, or every layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// `shared`: one tensor used by every layer.
    Shared,
    /// `blk.{l}`: the tensor of layer `l`.
    Layer(u32),
}

/// A parsed spec-v1 tensor name, `iapt.{scope}.{role}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorName {
    /// Which layer(s) the tensor serves.
    pub scope: Scope,
    /// What the tensor is.
    pub role: Role,
}

impl TensorName {
    /// A per-layer name.
    pub fn layer(layer: u32, role: Role) -> Self {
        TensorName { scope: Scope::Layer(layer), role }
    }

    /// A shared name.
    pub fn shared(role: Role) -> Self {
        TensorName { scope: Scope::Shared, role }
    }

    /// Parses `iapt.blk.{l}.{role}` or `iapt.shared.{role}`. Layer numbers are canonical decimal
    /// (no sign, no leading zeros); anything else is `None`.
    pub fn parse(name: &str) -> Option<TensorName> {
        let rest = name.strip_prefix("iapt.")?;
        if let Some(role) = rest.strip_prefix("shared.") {
            return Some(TensorName::shared(Role::parse(role)?));
        }
        let rest = rest.strip_prefix("blk.")?;
        let (num, role) = rest.split_once('.')?;
        if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) || (num.len() > 1 && num.starts_with('0')) {
            return None;
        }
        let layer: u32 = num.parse().ok()?;
        Some(TensorName::layer(layer, Role::parse(role)?))
    }

    /// The sort key of the canonical tensor order: shared tensors first (by role), then layer by
    /// layer, roles in [`Role::ALL`] order.
    pub fn canonical_key(&self) -> (u8, u32, Role) {
        match self.scope {
            Scope::Shared => (0, 0, self.role),
            Scope::Layer(l) => (1, l, self.role),
        }
    }
}

impl fmt::Display for TensorName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.scope {
            Scope::Shared => write!(f, "iapt.shared.{}", self.role),
            Scope::Layer(l) => write!(f, "iapt.blk.{l}.{}", self.role),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for role in Role::ALL {
            for n in [TensorName::shared(role), TensorName::layer(0, role), TensorName::layer(31, role)] {
                assert_eq!(TensorName::parse(&n.to_string()), Some(n));
            }
        }
    }

    #[test]
    fn non_canonical_names_are_rejected() {
        for bad in [
            "iapt.blk.01.down.weight",
            "iapt.blk.-1.down.weight",
            "iapt.blk..down.weight",
            "iapt.blk.1.down.weights",
            "blk.1.down.weight",
            "iapt.shared.pool.key",
            "iapt.blk.99999999999.up.bias",
        ] {
            assert_eq!(TensorName::parse(bad), None, "{bad}");
        }
    }
}
