//! Pure statistics of the benchmark: the median of repeated runs with its spread, and
//! percentiles of latency samples. No I/O, no clock.

use serde::Serialize;

/// The median of a figure over several runs, with the range it came from.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    /// Median of the runs (mean of the middle two for an even count).
    pub median: f64,
    /// Smallest run.
    pub min: f64,
    /// Largest run.
    pub max: f64,
    /// `(max - min) / |median|`: the relative spread (0 for one run; `None` in JSON when the
    /// median is 0).
    pub spread: Option<f64>,
    /// How many runs.
    pub runs: usize,
}

impl Summary {
    /// Summary of `values`, ignoring NaN; `None` when nothing is left.
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let median = median_sorted(&sorted);
        let (min, max) = (sorted[0], sorted[sorted.len() - 1]);
        let spread = (median != 0.0).then(|| (max - min) / median.abs());
        Some(Self {
            median,
            min,
            max,
            spread,
            runs: sorted.len(),
        })
    }
}

fn median_sorted(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        f64::midpoint(sorted[n / 2 - 1], sorted[n / 2])
    }
}

/// The median of `values` (NaN ignored); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    Summary::of(values).map(|s| s.median)
}

/// The `q`-quantile (0..=1) of sorted samples, nearest rank: the smallest sample with at least
/// `q` of the samples at or below it. `None` when empty.
pub fn percentile_sorted(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let q = q.clamp(0.0, 1.0);
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "rank of at most a few million samples, q in 0..=1"
    )]
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Percentiles of a set of latency samples in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
}

impl Percentiles {
    /// Percentiles of `samples` (sorted here); `None` when empty.
    pub fn of(samples: &mut [u64]) -> Option<Self> {
        samples.sort_unstable();
        Some(Self {
            count: samples.len(),
            p50_ns: percentile_sorted(samples, 0.50)?,
            p99_ns: percentile_sorted(samples, 0.99)?,
            p999_ns: percentile_sorted(samples, 0.999)?,
            max_ns: *samples.last()?,
        })
    }
}

/// `a / b`, or NaN when `b` is zero or either is NaN (shown as "n/a").
pub fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 || a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a / b
    }
}

#[cfg(test)]
#[expect(clippy::float_cmp, reason = "exact values by construction")]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[7.0]), Some(7.0));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0));
        assert_eq!(median(&[f64::NAN]), None);
    }

    #[test]
    fn summary_spread_is_range_over_median() {
        let s = Summary::of(&[90.0, 100.0, 110.0, 100.0, 100.0]).unwrap();
        assert_eq!(s.median, 100.0);
        assert_eq!((s.min, s.max), (90.0, 110.0));
        assert!((s.spread.unwrap() - 0.2).abs() < 1e-12);
        assert_eq!(s.runs, 5);
        assert_eq!(Summary::of(&[0.0, 0.0]).unwrap().spread, None);
        assert_eq!(Summary::of(&[3.0]).unwrap().spread, Some(0.0));
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut samples: Vec<u64> = (1..=1000).rev().collect();
        let p = Percentiles::of(&mut samples).unwrap();
        assert_eq!(p.count, 1000);
        assert_eq!(p.p50_ns, 500);
        assert_eq!(p.p99_ns, 990);
        assert_eq!(p.p999_ns, 999);
        assert_eq!(p.max_ns, 1000);
        assert_eq!(percentile_sorted(&[5], 0.999), Some(5));
        assert_eq!(percentile_sorted(&[1, 2], 0.0), Some(1));
        assert_eq!(percentile_sorted(&[], 0.5), None);
        assert!(Percentiles::of(&mut []).is_none());
    }

    #[test]
    fn ratio_is_nan_when_undefined() {
        assert_eq!(ratio(6.0, 3.0), 2.0);
        assert!(ratio(1.0, 0.0).is_nan());
        assert!(ratio(f64::NAN, 1.0).is_nan());
    }
}
