//! Log-probabilities of sampled tokens under the sampling policy.
//!
//! Definition (the one the trainer reproduces): for logits `z` over the full vocabulary and
//! sampling temperature `T`,
//! `log π(t) = z_t / T − log Σ_j exp(z_j / T)`, computed before any top-k / top-p / min-p
//! truncation. Greedy decoding (`T = 0`) records the `T = 1` value, i.e. the model's own
//! distribution. The host path below is one fused pass over the row with an exp that the
//! compiler vectorises; [`log_softmax_reference`] is the plain f64 oracle the tests compare with.

/// Temperature actually used for the log-prob: `T` when positive, else 1.
pub fn effective_temperature(temperature: f32) -> f32 {
    if temperature > 0.0 {
        temperature
    } else {
        1.0
    }
}

/// Max, argmax and `log Σ exp(z/T)` of one logit row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowStats {
    /// Largest logit.
    pub max: f32,
    /// Index of the largest logit (first one on ties).
    pub argmax: usize,
    /// `log Σ_j exp(z_j / T)`.
    pub log_sum_exp: f32,
    /// `1 / T` used for the sum.
    pub inv_temperature: f32,
}

impl RowStats {
    /// Log-probability of `token` in the row these stats were computed from.
    pub fn logprob(&self, logits: &[f32], token: usize) -> f32 {
        logits[token] * self.inv_temperature - self.log_sum_exp
    }
}

const LANES: usize = 8;

/// Computes [`RowStats`] in two vectorisable passes (max, then Σ exp).
///
/// # Panics
/// Panics on an empty row (the engine never passes one).
pub fn row_stats(logits: &[f32], temperature: f32) -> RowStats {
    assert!(!logits.is_empty(), "empty logit row");
    let inv_t = 1.0 / effective_temperature(temperature);

    let mut lane_max = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            lane_max[l] = if c[l] > lane_max[l] { c[l] } else { lane_max[l] };
        }
    }
    let mut max = tail.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for m in lane_max {
        max = max.max(m);
    }
    // First index holding the max (cheap: one scan that stops early).
    let argmax = logits.iter().position(|&x| x == max).unwrap_or(0);

    let shift = max * inv_t;
    let mut lane_sum = [0.0f32; LANES];
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        let mut x = [0.0f32; LANES];
        for l in 0..LANES {
            x[l] = c[l] * inv_t - shift;
        }
        let e = exp_lanes(x);
        for l in 0..LANES {
            lane_sum[l] += e[l];
        }
    }
    let mut sum: f64 = lane_sum.iter().map(|&s| s as f64).sum();
    for &z in tail {
        sum += ((z * inv_t - shift) as f64).exp();
    }
    RowStats { max, argmax, log_sum_exp: shift + sum.ln() as f32, inv_temperature: inv_t }
}

/// Log-probability of `token` under `softmax(logits / T)`; see the module docs.
pub fn token_logprob(logits: &[f32], token: usize, temperature: f32) -> f32 {
    row_stats(logits, temperature).logprob(logits, token)
}

/// Plain f64 log-softmax of `logits / T`: the oracle for tests and for checking device paths.
pub fn log_softmax_reference(logits: &[f32], temperature: f32) -> Vec<f64> {
    let inv_t = 1.0 / effective_temperature(temperature) as f64;
    let max = logits.iter().map(|&z| z as f64 * inv_t).fold(f64::NEG_INFINITY, f64::max);
    let lse = max + logits.iter().map(|&z| (z as f64 * inv_t - max).exp()).sum::<f64>().ln();
    logits.iter().map(|&z| z as f64 * inv_t - lse).collect()
}

/// `exp(x)` for 8 lanes, x ≤ 0 (arguments are shifted by the row max). Cephes-style range
/// reduction `x = n·ln2 + r`, degree-6 polynomial for `e^r` on |r| ≤ ln2/2; relative error
/// below 2e-7, flushes to 0 below -87. Written lane-wise so LLVM emits SIMD on any x86-64.
#[inline(always)]
fn exp_lanes(x: [f32; LANES]) -> [f32; LANES] {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let mut out = [0.0f32; LANES];
    for l in 0..LANES {
        let xv = x[l].max(-87.0);
        let n = (xv * LOG2E).round();
        let r = xv - n * LN2_HI - n * LN2_LO;
        let p = 1.987_569_1e-4_f32;
        let p = p * r + 1.398_199_9e-3;
        let p = p * r + 8.333_452e-3;
        let p = p * r + 4.166_579_6e-2;
        let p = p * r + 1.666_666_5e-1;
        let p = p * r + 0.5;
        let p = p * r * r + r + 1.0;
        let bits = ((n as i32 + 127) as u32) << 23;
        out[l] = p * f32::from_bits(bits);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng_row(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect()
    }

    #[test]
    fn exp_matches_std_over_the_reduced_range() {
        let mut worst = 0.0f64;
        for i in 0..20_000 {
            let x = -87.0 + 87.0 * i as f32 / 20_000.0;
            let got = exp_lanes([x; LANES])[0] as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 5e-7, "relative error {worst}");
    }

    #[test]
    fn logprobs_match_the_f64_oracle() {
        for (n, scale, t) in [(49_152, 30.0, 1.0), (1_001, 5.0, 0.7), (7, 100.0, 1.3), (64, 1e-3, 0.0)] {
            let row = rng_row(n, n as u64, scale);
            let oracle = log_softmax_reference(&row, t);
            let stats = row_stats(&row, t);
            for tok in [0, n / 3, n - 1, stats.argmax] {
                let got = stats.logprob(&row, tok) as f64;
                assert!((got - oracle[tok]).abs() < 2e-5, "n={n} t={t} tok={tok}: {got} vs {}", oracle[tok]);
            }
        }
    }

    #[test]
    fn argmax_is_first_maximum() {
        let row = [1.0, 3.0, -2.0, 3.0, 0.5, 0.5, 0.5, 0.5, 0.5, 3.0];
        assert_eq!(row_stats(&row, 1.0).argmax, 1);
    }

    #[test]
    fn greedy_uses_unit_temperature() {
        let row = rng_row(100, 3, 4.0);
        assert_eq!(token_logprob(&row, 5, 0.0), token_logprob(&row, 5, 1.0));
        assert_ne!(token_logprob(&row, 5, 0.5), token_logprob(&row, 5, 1.0));
    }
}
