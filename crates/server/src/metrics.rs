//! `/metrics`: Prometheus text exposition (the `prometheus` crate, no protobuf).
//!
//! - `iapt_requests_running`, `iapt_requests_queued`: the engine's slots and queue, read at scrape time;
//! - `iapt_requests_in_flight{model}`: accepted requests not yet answered, per model (the base id
//!   or an adapter's name);
//! - `iapt_requests_total{model, outcome}`: ended requests (`stop`, `length`, `cancelled`, `error`);
//! - `iapt_prompt_tokens_total{model}`, `iapt_completion_tokens_total{model}`: tokens in and out;
//! - `iapt_time_to_first_token_seconds{model}`, `iapt_inter_token_latency_seconds{model}`:
//!   histograms, timed on the engine thread as tokens are produced (not as clients read them);
//! - `iapt_http_errors_total{status}`: error answers by HTTP status;
//! - `iapt_engine_steps_total`, `iapt_engine_step_seconds_total`: the engine's steps and their
//!   time; `iapt_engine_prefill_rows_total`: prompt rows (instruction and soft tokens) the engine
//!   decoded, which choices sharing a prefill count once (and rows the prefix cache gave, not at
//!   all); `iapt_prefix_cache_{hits,misses,tokens_reused,evictions}_total` and
//!   `iapt_prefix_cache_{bytes,entries}`: the prefix cache; `iapt_engine_decode_only_{steps,tokens,seconds,llama_seconds}_total`: the steps that held
//!   decode tokens only, and of their time what `llama_decode` took (the rest is the engine's
//!   own: batch, sampling, events), read at scrape time. Decode throughput is
//!   `decode_only_tokens / decode_only_seconds`;
//! - adapters: `iapt_adapters_resident` (read at scrape time), `iapt_adapter_evictions_total`,
//!   `iapt_adapter_loads_all_total` and `iapt_adapter_load_seconds_all_total` (every adapter), and
//!   per adapter `iapt_adapter_loads_total{model}`, `iapt_adapter_load_seconds_total{model}`,
//!   `iapt_adapter_resident_bytes{model}`. An evicted or unloaded adapter's series are dropped, so
//!   the label set stays bounded by the resident set and the requests in flight.

use iapt_engine::EngineStats;
use prometheus::{
    Counter, CounterVec, Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// The server's metrics and their registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub(crate) running: IntGauge,
    pub(crate) queued: IntGauge,
    pub(crate) in_flight: IntGaugeVec,
    pub(crate) requests: IntCounterVec,
    pub(crate) prompt_tokens: IntCounterVec,
    pub(crate) completion_tokens: IntCounterVec,
    pub(crate) ttft: HistogramVec,
    pub(crate) itl: HistogramVec,
    pub(crate) http_errors: IntCounterVec,
    engine: EngineCounters,
    pub(crate) adapters_resident: IntGauge,
    adapter_evictions: IntCounter,
    adapter_loads_all: IntCounter,
    adapter_load_seconds_all: Counter,
    adapter_loads: IntCounterVec,
    adapter_load_seconds: CounterVec,
    adapter_bytes: IntGaugeVec,
}

/// The engine's own counters ([`EngineStats`]), brought up to date at scrape time.
#[derive(Clone)]
struct EngineCounters {
    steps: IntCounter,
    step_seconds: Counter,
    prefill_rows: IntCounter,
    cache_hits: IntCounter,
    cache_misses: IntCounter,
    cache_tokens: IntCounter,
    cache_evictions: IntCounter,
    cache_bytes: IntGauge,
    cache_entries: IntGauge,
    decode_only_steps: IntCounter,
    decode_only_tokens: IntCounter,
    decode_only_seconds: Counter,
    decode_only_llama_seconds: Counter,
}

const LATENCY_BUCKETS: [f64; 14] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
        let counter = |name: &str, help: &str, labels: &[&str]| IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
        let int_counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid metric");
        let seconds = |name: &str, help: &str| Counter::new(name, help).expect("valid metric");
        let histogram = |name: &str, help: &str| {
            HistogramVec::new(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()), &["model"]).expect("valid metric")
        };
        let m = Metrics {
            running: gauge("iapt_requests_running", "Requests in an engine slot."),
            queued: gauge("iapt_requests_queued", "Requests waiting for an engine slot."),
            in_flight: IntGaugeVec::new(Opts::new("iapt_requests_in_flight", "Accepted requests not yet answered, per model."), &["model"])
                .expect("valid metric"),
            requests: counter("iapt_requests_total", "Ended generation requests, per model and outcome.", &["model", "outcome"]),
            prompt_tokens: counter("iapt_prompt_tokens_total", "Prompt tokens of accepted requests.", &["model"]),
            completion_tokens: counter("iapt_completion_tokens_total", "Generated tokens.", &["model"]),
            ttft: histogram("iapt_time_to_first_token_seconds", "From acceptance to the first generated token."),
            itl: histogram("iapt_inter_token_latency_seconds", "Between two generated tokens of one request."),
            http_errors: counter("iapt_http_errors_total", "Error answers, per HTTP status.", &["status"]),
            engine: EngineCounters {
                steps: int_counter("iapt_engine_steps_total", "Engine steps that decoded something."),
                step_seconds: seconds("iapt_engine_step_seconds_total", "Time of those steps."),
                prefill_rows: int_counter("iapt_engine_prefill_rows_total", "Prompt rows (instruction and soft tokens) decoded."),
                cache_hits: int_counter("iapt_prefix_cache_hits_total", "Requests that reused a cached prompt prefix."),
                cache_misses: int_counter("iapt_prefix_cache_misses_total", "Requests that found no prefix to reuse."),
                cache_tokens: int_counter("iapt_prefix_cache_tokens_reused_total", "Prompt tokens reused instead of computed."),
                cache_evictions: int_counter("iapt_prefix_cache_evictions_total", "Entries evicted."),
                cache_bytes: gauge("iapt_prefix_cache_bytes", "Bytes the prefix cache holds."),
                cache_entries: gauge("iapt_prefix_cache_entries", "Entries the prefix cache holds."),
                decode_only_steps: int_counter("iapt_engine_decode_only_steps_total", "Steps with decode tokens only (no prefill rows)."),
                decode_only_tokens: int_counter("iapt_engine_decode_only_tokens_total", "Tokens decoded in those steps."),
                decode_only_seconds: seconds("iapt_engine_decode_only_seconds_total", "Time of those steps."),
                decode_only_llama_seconds: seconds("iapt_engine_decode_only_llama_seconds_total", "Of that time, inside llama_decode."),
            },
            adapters_resident: gauge("iapt_adapters_resident", "Adapters resident in the engine."),
            adapter_evictions: int_counter("iapt_adapter_evictions_total", "Adapters evicted to make room for another."),
            adapter_loads_all: int_counter("iapt_adapter_loads_all_total", "Adapter loads at run time, every adapter."),
            adapter_load_seconds_all: seconds("iapt_adapter_load_seconds_all_total", "Time of those loads."),
            adapter_loads: counter("iapt_adapter_loads_total", "Loads of an adapter from the adapter directory on demand.", &["model"]),
            adapter_load_seconds: CounterVec::new(
                Opts::new("iapt_adapter_load_seconds_total", "Time of those loads (read, validate, build)."),
                &["model"],
            )
            .expect("valid metric"),
            adapter_bytes: IntGaugeVec::new(Opts::new("iapt_adapter_resident_bytes", "Bytes of a resident adapter's weights."), &["model"])
                .expect("valid metric"),
            registry,
        };
        let e = &m.engine;
        let all: [Box<dyn prometheus::core::Collector>; 29] = [
            Box::new(m.adapter_loads_all.clone()),
            Box::new(m.adapter_load_seconds_all.clone()),
            Box::new(m.adapters_resident.clone()),
            Box::new(m.adapter_evictions.clone()),
            Box::new(m.adapter_loads.clone()),
            Box::new(m.adapter_load_seconds.clone()),
            Box::new(m.adapter_bytes.clone()),
            Box::new(e.steps.clone()),
            Box::new(e.step_seconds.clone()),
            Box::new(e.prefill_rows.clone()),
            Box::new(e.cache_hits.clone()),
            Box::new(e.cache_misses.clone()),
            Box::new(e.cache_tokens.clone()),
            Box::new(e.cache_evictions.clone()),
            Box::new(e.cache_bytes.clone()),
            Box::new(e.cache_entries.clone()),
            Box::new(e.decode_only_steps.clone()),
            Box::new(e.decode_only_tokens.clone()),
            Box::new(e.decode_only_seconds.clone()),
            Box::new(e.decode_only_llama_seconds.clone()),
            Box::new(m.running.clone()),
            Box::new(m.queued.clone()),
            Box::new(m.in_flight.clone()),
            Box::new(m.requests.clone()),
            Box::new(m.prompt_tokens.clone()),
            Box::new(m.completion_tokens.clone()),
            Box::new(m.ttft.clone()),
            Box::new(m.itl.clone()),
            Box::new(m.http_errors.clone()),
        ];
        for c in all {
            m.registry.register(c).expect("unique metric names");
        }
        m
    }

    /// Brings the engine's counters up to `stats` (they only grow).
    pub(crate) fn set_engine(&self, stats: &EngineStats) {
        let e = &self.engine;
        let up = |c: &IntCounter, v: u64| c.inc_by(v.saturating_sub(c.get()));
        let up_s = |c: &Counter, v: std::time::Duration| c.inc_by((v.as_secs_f64() - c.get()).max(0.0));
        up(&e.steps, stats.steps);
        up_s(&e.step_seconds, stats.step_time);
        up(&e.prefill_rows, stats.prefill_rows);
        up(&e.cache_hits, stats.cache.hits);
        up(&e.cache_misses, stats.cache.misses);
        up(&e.cache_tokens, stats.cache.tokens_reused);
        up(&e.cache_evictions, stats.cache.evicted);
        e.cache_bytes.set(stats.cache.bytes as i64);
        e.cache_entries.set(stats.cache.entries as i64);
        up(&e.decode_only_steps, stats.decode_only_steps);
        up(&e.decode_only_tokens, stats.decode_only_tokens);
        up_s(&e.decode_only_seconds, stats.decode_only_time);
        up_s(&e.decode_only_llama_seconds, stats.decode_only_llama_time);
    }

    /// Counts an on-demand load of `model` that took `seconds`, holds `bytes` and evicted `evicted`.
    pub(crate) fn adapter_loaded(&self, model: &str, seconds: f64, bytes: usize, evicted: usize) {
        self.adapter_loads.with_label_values(&[model]).inc();
        self.adapter_load_seconds.with_label_values(&[model]).inc_by(seconds);
        self.adapter_bytes.with_label_values(&[model]).set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.adapter_evictions.inc_by(evicted as u64);
        self.adapter_loads_all.inc();
        self.adapter_load_seconds_all.inc_by(seconds);
    }

    /// Drops every series of `model` (an unloaded adapter), so the label set stays bounded by the
    /// adapters resident now.
    pub(crate) fn forget(&self, model: &str) {
        // A request of an evicted adapter may still be decoding: its in-flight count stays until
        // it ends (removing it now would make the decrement re-create it below zero).
        if self.in_flight.get_metric_with_label_values(&[model]).is_ok_and(|g| g.get() == 0) {
            let _ = self.in_flight.remove_label_values(&[model]);
        }
        let _ = self.adapter_loads.remove_label_values(&[model]);
        let _ = self.adapter_load_seconds.remove_label_values(&[model]);
        let _ = self.adapter_bytes.remove_label_values(&[model]);
        let _ = self.prompt_tokens.remove_label_values(&[model]);
        let _ = self.completion_tokens.remove_label_values(&[model]);
        let _ = self.ttft.remove_label_values(&[model]);
        let _ = self.itl.remove_label_values(&[model]);
        for outcome in ["stop", "length", "cancelled", "error"] {
            let _ = self.requests.remove_label_values(&[model, outcome]);
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("encoding to memory");
        String::from_utf8_lossy(&buf).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Counts a request in flight for `model` until dropped.
pub(crate) struct InFlight(IntGauge);

impl InFlight {
    pub fn new(m: &Metrics, model: &str) -> InFlight {
        let g = m.in_flight.with_label_values(&[model]);
        g.inc();
        InFlight(g)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_exposition_has_every_family_and_counts() {
        let m = Metrics::new();
        {
            let _a = InFlight::new(&m, "sorter");
            m.prompt_tokens.with_label_values(&["sorter"]).inc_by(7);
            m.ttft.with_label_values(&["sorter"]).observe(0.02);
            assert!(m.render().contains("iapt_requests_in_flight{model=\"sorter\"} 1"));
        }
        let text = m.render();
        assert!(text.contains("iapt_requests_in_flight{model=\"sorter\"} 0"), "{text}");
        assert!(text.contains("iapt_prompt_tokens_total{model=\"sorter\"} 7"), "{text}");
        assert!(text.contains("iapt_time_to_first_token_seconds_count{model=\"sorter\"} 1"), "{text}");
        assert!(text.contains("# TYPE iapt_requests_running gauge"), "{text}");
    }
}
