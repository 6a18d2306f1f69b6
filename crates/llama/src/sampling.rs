//! Per-request sampling settings for llama.cpp's sampler chain ([`crate::SamplerChain`]) and the
//! rules they must follow, checked before any value reaches llama.cpp.

/// The settings of one request's sampler chain, in llama.cpp's terms (the names of `llama-cli`'s
/// options). The chain is: logit bias, penalties, top-k, top-p, min-p, temperature, then a seeded draw; with
/// `temperature == 0` it is penalties then greedy (the first most likely token).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerSettings {
    /// Temperature: 0 is greedy; must be finite and >= 0.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 disables it; must be >= 0.
    pub top_k: i32,
    /// Nucleus sampling: keep the smallest set with probability >= top_p; in (0, 1], 1 disables it.
    pub top_p: f32,
    /// Drop tokens below min_p times the top probability; in [0, 1], 0 disables it.
    pub min_p: f32,
    /// Repetition penalty (llama.cpp's `--repeat-penalty`); finite and > 0, 1 disables it.
    pub repeat_penalty: f32,
    /// Presence penalty; finite, 0 disables it.
    pub presence_penalty: f32,
    /// Frequency penalty; finite, 0 disables it.
    pub frequency_penalty: f32,
    /// How many recent tokens the penalties look at; >= 0, 0 disables the penalties.
    pub penalty_last_n: i32,
    /// Seed of the draw.
    pub seed: u32,
    /// Added to the logits of these tokens before every other stage (OpenAI's `logit_bias`,
    /// llama.cpp's `--logit-bias`); biases finite, ids checked against the vocabulary by
    /// [`crate::SamplerChain::new`].
    pub logit_bias: Vec<(crate::Token, f32)>,
}

impl Default for SamplerSettings {
    /// Greedy, every filter and penalty off, `penalty_last_n` 64 (llama.cpp's default).
    fn default() -> Self {
        SamplerSettings {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_last_n: 64,
            seed: 0,
            logit_bias: Vec::new(),
        }
    }
}

/// A sampler setting breaks its rule.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid sampling setting {field} = {value}: must be {rule}")]
pub struct InvalidSampling {
    /// The setting's name (`temperature`, `top_p`, ...).
    pub field: &'static str,
    /// The value given, as text.
    pub value: String,
    /// The rule it breaks.
    pub rule: &'static str,
}

impl SamplerSettings {
    /// Whether the chain ends in greedy selection (temperature 0).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Whether any penalty is active (so the chain has a penalties stage).
    pub fn has_penalties(&self) -> bool {
        self.penalty_last_n != 0 && (self.repeat_penalty != 1.0 || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0)
    }

    /// Checks every rule; the first broken one is the error.
    pub fn validate(&self) -> Result<(), InvalidSampling> {
        let bad = |field, value: &dyn std::fmt::Display, rule| Err(InvalidSampling { field, value: value.to_string(), rule });
        let t = self.temperature;
        if !t.is_finite() || t < 0.0 {
            return bad("temperature", &t, "a finite number >= 0 (0 is greedy)");
        }
        if self.top_k < 0 {
            return bad("top_k", &self.top_k, ">= 0 (0 disables it)");
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            return bad("top_p", &p, "in (0, 1] (1 disables it)");
        }
        let m = self.min_p;
        if !(0.0..=1.0).contains(&m) {
            return bad("min_p", &m, "in [0, 1] (0 disables it)");
        }
        let r = self.repeat_penalty;
        if !r.is_finite() || r <= 0.0 {
            return bad("repeat_penalty", &r, "a finite number > 0 (1 disables it)");
        }
        if !self.presence_penalty.is_finite() {
            return bad("presence_penalty", &self.presence_penalty, "finite (0 disables it)");
        }
        if !self.frequency_penalty.is_finite() {
            return bad("frequency_penalty", &self.frequency_penalty, "finite (0 disables it)");
        }
        if self.penalty_last_n < 0 {
            return bad("penalty_last_n", &self.penalty_last_n, ">= 0 (0 disables the penalties)");
        }
        if let Some((t, b)) = self.logit_bias.iter().find(|(t, b)| *t < 0 || !b.is_finite()) {
            return bad("logit_bias", &format!("{t}: {b}"), "token ids >= 0 with finite biases");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rule_names_its_field() {
        let cases: [(&str, SamplerSettings); 9] = [
            ("temperature", SamplerSettings { temperature: -0.1, ..Default::default() }),
            ("temperature", SamplerSettings { temperature: f32::NAN, ..Default::default() }),
            ("top_k", SamplerSettings { top_k: -1, ..Default::default() }),
            ("top_p", SamplerSettings { top_p: 0.0, ..Default::default() }),
            ("top_p", SamplerSettings { top_p: 1.5, ..Default::default() }),
            ("min_p", SamplerSettings { min_p: -0.5, ..Default::default() }),
            ("repeat_penalty", SamplerSettings { repeat_penalty: 0.0, ..Default::default() }),
            ("presence_penalty", SamplerSettings { presence_penalty: f32::INFINITY, ..Default::default() }),
            ("penalty_last_n", SamplerSettings { penalty_last_n: -2, ..Default::default() }),
        ];
        for (field, s) in cases {
            assert_eq!(s.validate().unwrap_err().field, field, "{s:?}");
        }
        assert!(SamplerSettings::default().validate().is_ok());
        assert!(SamplerSettings { top_p: 1.0, min_p: 1.0, temperature: 2.0, ..Default::default() }.validate().is_ok());
    }
}
