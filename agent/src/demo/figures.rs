//! The key figures the demo reads from its own `/metrics` at the end, so that a newcomer sees
//! what the telemetry says about the run it just watched.

use std::collections::BTreeMap;

/// What `/metrics` says about the run, summed over tables.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Figures {
    /// `philotes_buffer_events_processed_total`: change events committed to Iceberg.
    pub rows: f64,
    /// `philotes_iceberg_commits_total`.
    pub commits: f64,
    /// `philotes_cdc_freshness_seconds_count`: transactions (per table) made visible.
    pub transactions: f64,
    /// Freshness quantiles over every table (None without observations).
    pub freshness_p50: Option<f64>,
    /// 99th percentile of freshness.
    pub freshness_p99: Option<f64>,
    /// `philotes_cdc_slot_lag_bytes`, the largest over pipelines.
    pub slot_lag_bytes: f64,
}

/// One sample line of a Prometheus text exposition: name, labels, value.
fn sample(line: &str) -> Option<(&str, BTreeMap<&str, &str>, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (series, value) = line.rsplit_once(' ')?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        v => v.parse().ok()?,
    };
    let (name, labels) = match series.split_once('{') {
        Some((n, rest)) => (n, rest.strip_suffix('}')?),
        None => (series, ""),
    };
    let labels = labels
        .split(',')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.trim(), v.trim().trim_matches('"')))
        })
        .collect();
    Some((name, labels, value))
}

/// The `q` quantile of cumulative buckets (key: the bound's bits; value: upper bound and
/// count), interpolated linearly inside the bucket as PromQL's `histogram_quantile` does.
pub fn quantile(q: f64, buckets: &BTreeMap<u64, (f64, f64)>) -> Option<f64> {
    let total = buckets.values().last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (upper, count) in buckets.values() {
        if *count >= rank {
            if upper.is_infinite() {
                // Beyond the last finite bound: report that bound, as Prometheus does.
                return Some(lower);
            }
            let inside = count - below;
            let frac = if inside > 0.0 {
                (rank - below) / inside
            } else {
                1.0
            };
            return Some(lower + (upper - lower) * frac);
        }
        lower = *upper;
        below = *count;
    }
    Some(lower)
}

/// The freshness histogram's cumulative buckets summed over tables, keyed by the bound's bits
/// (which sort like the bounds, every bound being positive).
pub fn freshness_buckets(text: &str) -> BTreeMap<u64, (f64, f64)> {
    let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for (name, labels, v) in text.lines().filter_map(sample) {
        if name != "philotes_cdc_freshness_seconds_bucket" {
            continue;
        }
        let le = match labels.get("le") {
            Some(&"+Inf") => f64::INFINITY,
            Some(b) => match b.parse::<f64>() {
                Ok(b) => b,
                Err(_) => continue,
            },
            None => continue,
        };
        buckets.entry(le.to_bits()).or_insert((le, 0.0)).1 += v;
    }
    buckets
}

/// Read the figures from an exposition.
pub fn read(text: &str) -> Figures {
    let mut f = Figures::default();
    for (name, _, v) in text.lines().filter_map(sample) {
        match name {
            "philotes_buffer_events_processed_total" => f.rows += v,
            "philotes_iceberg_commits_total" => f.commits += v,
            "philotes_cdc_freshness_seconds_count" => f.transactions += v,
            "philotes_cdc_slot_lag_bytes" => f.slot_lag_bytes = f.slot_lag_bytes.max(v),
            _ => {}
        }
    }
    let buckets = freshness_buckets(text);
    f.freshness_p50 = quantile(0.5, &buckets);
    f.freshness_p99 = quantile(0.99, &buckets);
    f
}

impl std::fmt::Display for Figures {
    fn fmt(&self, out: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = |v: Option<f64>| v.map_or("–".to_string(), |s| format!("{s:.2}s"));
        write!(
            out,
            "{} rows committed in {} commits; freshness p50 {} p99 {} over {} transactions; slot lag {} B",
            self.rows,
            self.commits,
            secs(self.freshness_p50),
            secs(self.freshness_p99),
            self.transactions,
            self.slot_lag_bytes
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A hand-written exposition in the format opentelemetry-prometheus renders (no agent
    // involved: this checks the reading, the demo test checks the figures of a real run).
    const TEXT: &str = r#"# HELP philotes_buffer_events_processed_total Change events committed
# TYPE philotes_buffer_events_processed_total counter
philotes_buffer_events_processed_total{otel_scope_name="philotes",source="shop"} 120
philotes_iceberg_commits_total{otel_scope_name="philotes",source="shop",table="public.a"} 3
philotes_iceberg_commits_total{otel_scope_name="philotes",source="shop",table="public.b"} 2
philotes_cdc_slot_lag_bytes{otel_scope_name="philotes",source="shop"} 4096
philotes_cdc_freshness_seconds_bucket{source="shop",table="public.a",le="0.5"} 10
philotes_cdc_freshness_seconds_bucket{source="shop",table="public.a",le="1"} 30
philotes_cdc_freshness_seconds_bucket{source="shop",table="public.a",le="+Inf"} 40
philotes_cdc_freshness_seconds_count{source="shop",table="public.a"} 40
philotes_cdc_freshness_seconds_bucket{source="shop",table="public.b",le="0.5"} 10
philotes_cdc_freshness_seconds_bucket{source="shop",table="public.b",le="1"} 10
philotes_cdc_freshness_seconds_bucket{source="shop",table="public.b",le="+Inf"} 10
philotes_cdc_freshness_seconds_count{source="shop",table="public.b"} 10
"#;

    #[test]
    fn reads_counters_and_interpolates_quantiles_over_tables() {
        let f = read(TEXT);
        assert_eq!(f.rows, 120.0);
        assert_eq!(f.commits, 5.0);
        assert_eq!(f.transactions, 50.0);
        assert_eq!(f.slot_lag_bytes, 4096.0);
        // 50 observations: 20 ≤ 0.5, 40 ≤ 1; rank 25 lies in (0.5, 1] at 5/20 of it.
        assert!((f.freshness_p50.unwrap() - 0.625).abs() < 1e-9, "{f:?}");
        // rank 49.5 lies beyond the last finite bound.
        assert_eq!(f.freshness_p99, Some(1.0));
    }

    #[test]
    fn no_observations_no_quantiles() {
        let f = read("philotes_iceberg_commits_total{table=\"x\"} 0\n");
        assert_eq!((f.freshness_p50, f.freshness_p99), (None, None));
        assert!(f.to_string().contains("p50 –"));
    }
}
