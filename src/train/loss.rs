//! Loss functions on per-token log-probs of completion tokens (prompt tokens are conditioning).
//!
//! Every loss exists twice: [`oracle`] holds plain f64 functions, and the tensor versions below
//! are checked against them (values here, gradients by finite differences in the tests).

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

/// How per-token policy losses are averaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Aggregation {
    /// Mean over every completion token of the batch (long answers weigh more).
    TokenMean,
    /// Mean over sequences of each sequence's token mean (GRPO paper).
    SequenceMean,
}

/// The training objective and its hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Objective {
    /// Negative log-likelihood of the completions (warm starts, SFT).
    Nll,
    /// PPO clipped surrogate with per-sample advantages (e.g. reward − V(s)).
    Ppo {
        /// Clip ε.
        clip: f64,
    },
    /// GRPO: PPO-clip with group-normalised rewards as advantages.
    Grpo {
        /// Clip ε.
        clip: f64,
        /// Token or sequence mean.
        aggregation: Aggregation,
    },
    /// Direct preference optimisation.
    Dpo {
        /// β.
        beta: f64,
    },
    /// Kahneman–Tversky optimisation (unpaired desirable/undesirable samples).
    Kto {
        /// β.
        beta: f64,
        /// Weight of desirable samples.
        desirable_weight: f64,
        /// Weight of undesirable samples.
        undesirable_weight: f64,
    },
    /// SimPO: length-normalised log-prob margin, no reference.
    Simpo {
        /// β.
        beta: f64,
        /// Target margin γ.
        gamma: f64,
    },
    /// ORPO: NLL on chosen plus λ · odds-ratio term.
    Orpo {
        /// λ.
        lambda: f64,
    },
}

impl Objective {
    /// The objective's name as used in configs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Objective::Nll => "nll",
            Objective::Ppo { .. } => "ppo",
            Objective::Grpo { .. } => "grpo",
            Objective::Dpo { .. } => "dpo",
            Objective::Kto { .. } => "kto",
            Objective::Simpo { .. } => "simpo",
            Objective::Orpo { .. } => "orpo",
        }
    }

    /// Defaults by name (TRL's defaults where they exist).
    pub fn by_name(name: &str) -> crate::Result<Objective> {
        Ok(match name {
            "nll" | "sft" => Objective::Nll,
            "ppo" => Objective::Ppo { clip: 0.2 },
            "grpo" => Objective::Grpo { clip: 0.2, aggregation: Aggregation::TokenMean },
            "dpo" => Objective::Dpo { beta: 0.1 },
            "kto" => Objective::Kto { beta: 0.1, desirable_weight: 1.0, undesirable_weight: 1.0 },
            "simpo" => Objective::Simpo { beta: 2.0, gamma: 0.5 },
            "orpo" => Objective::Orpo { lambda: 0.1 },
            _ => {
                return Err(crate::Error::invalid(
                    "objective",
                    format!("{name:?}: one of nll, ppo, grpo, dpo, kto, simpo, orpo"),
                ))
            }
        })
    }

    /// True for objectives that read a reference policy (the base model).
    pub fn needs_reference(&self) -> bool {
        matches!(self, Objective::Dpo { .. } | Objective::Kto { .. })
    }
}

/// `log σ(x)`, stable: `−softplus(−x)`.
fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    // softplus(y) = relu(y) + log(1 + exp(−|y|))
    let y = x.neg()?;
    let sp = (y.relu()? + (y.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    sp.neg()
}

/// PPO-clip (+ optional k3 KL and truncated importance weights) summed over tokens of one
/// sequence: `Σ_t w_t · (−min(r_t A, clip(r_t) A)) + β_kl · k3_t`, divided by `norm`.
#[allow(clippy::too_many_arguments)]
pub fn policy_sequence(
    lp: &Tensor,
    old: &Tensor,
    advantage: f64,
    clip: f64,
    weights: Option<&Tensor>,
    reference: Option<(&Tensor, f64)>,
    norm: f64,
) -> Result<Tensor> {
    let ratio = (lp - old)?.exp()?;
    let s1 = (&ratio * advantage)?;
    let s2 = (ratio.clamp(1.0 - clip, 1.0 + clip)? * advantage)?;
    let mut per_token = s1.minimum(&s2)?.neg()?;
    if let Some(w) = weights {
        per_token = (per_token * w)?;
    }
    if let Some((r, beta)) = reference {
        let d = (r - lp)?;
        let k3 = ((d.exp()? - &d)? - 1.0)?;
        per_token = (per_token + (k3 * beta)?)?;
    }
    per_token.sum_all()? / norm
}

/// NLL of one sequence: `−Σ_t lp_t / norm`.
pub fn nll_sequence(lp: &Tensor, norm: f64) -> Result<Tensor> {
    lp.sum_all()?.neg()? / norm
}

/// DPO for one pair of summed log-probs (policy and reference).
pub fn dpo(c: &Tensor, r: &Tensor, c_ref: f64, r_ref: f64, beta: f64) -> Result<Tensor> {
    let z = (((c - r)? - (c_ref - r_ref))? * beta)?;
    log_sigmoid(&z)?.neg()
}

/// KTO for one sample: `w · (1 − σ(β(ratio − z)))` (desirable) or `w · (1 − σ(β(z − ratio)))`.
pub fn kto(lp_sum: &Tensor, ref_sum: f64, z_ref: f64, desirable: bool, beta: f64, weight: f64) -> Result<Tensor> {
    let ratio = (lp_sum - ref_sum)?;
    let arg = if desirable { (ratio - z_ref)? } else { ratio.neg()?.affine(1.0, z_ref)? };
    let sig = (arg * beta)?.neg()?.exp()?.affine(1.0, 1.0)?.recip()?;
    (sig.neg()?.affine(1.0, 1.0)?) * weight
}

/// SimPO for one pair: `−log σ(β·mean(c) − β·mean(r) − γ)`.
pub fn simpo(c: &Tensor, c_len: usize, r: &Tensor, r_len: usize, beta: f64, gamma: f64) -> Result<Tensor> {
    let z = (((c * (beta / c_len as f64))? - (r * (beta / r_len as f64))?)? - gamma)?;
    log_sigmoid(&z)?.neg()
}

/// ORPO for one pair: mean-token NLL of chosen + λ·(−log σ(log odds(c) − log odds(r))), with
/// log odds(y) = m − log(1 − e^m) for the mean token log-prob m.
pub fn orpo(c: &Tensor, c_len: usize, r: &Tensor, r_len: usize, lambda: f64) -> Result<Tensor> {
    let mc = (c / c_len as f64)?;
    let mr = (r / r_len as f64)?;
    let log_odds = |m: &Tensor| -> Result<Tensor> { m - m.exp()?.neg()?.affine(1.0, 1.0)?.clamp(1e-12, 1.0)?.log()? };
    let term = log_sigmoid(&(log_odds(&mc)? - log_odds(&mr)?)?)?.neg()?;
    mc.neg()? + (term * lambda)?
}

/// Group-normalised advantages `(r − mean) / (std + ε)` (population std), per group id.
pub fn group_advantages(rewards: &[f64], groups: &[u64], eps: f64) -> Vec<f64> {
    let mut out = vec![0.0; rewards.len()];
    let mut ids: Vec<u64> = groups.to_vec();
    ids.sort_unstable();
    ids.dedup();
    for g in ids {
        let idx: Vec<usize> = (0..rewards.len()).filter(|&i| groups[i] == g).collect();
        let n = idx.len() as f64;
        let mean = idx.iter().map(|&i| rewards[i]).sum::<f64>() / n;
        let var = idx.iter().map(|&i| (rewards[i] - mean).powi(2)).sum::<f64>() / n;
        for &i in &idx {
            out[i] = (rewards[i] - mean) / (var.sqrt() + eps);
        }
    }
    out
}

/// Plain f64 versions of every loss: the oracle the tensor code is tested against.
pub mod oracle {
    fn log_sigmoid(x: f64) -> f64 {
        -((-x).max(0.0) + (1.0 + (-x.abs()).exp()).ln())
    }

    /// See [`super::policy_sequence`].
    pub fn policy_sequence(
        lp: &[f64],
        old: &[f64],
        adv: f64,
        clip: f64,
        w: Option<&[f64]>,
        reference: Option<(&[f64], f64)>,
        norm: f64,
    ) -> f64 {
        let mut s = 0.0;
        for t in 0..lp.len() {
            let r = (lp[t] - old[t]).exp();
            let obj = (r * adv).min(r.clamp(1.0 - clip, 1.0 + clip) * adv);
            let mut l = -obj * w.map_or(1.0, |w| w[t]);
            if let Some((rf, beta)) = reference {
                let d = rf[t] - lp[t];
                l += beta * (d.exp() - d - 1.0);
            }
            s += l;
        }
        s / norm
    }

    /// See [`super::nll_sequence`].
    pub fn nll_sequence(lp: &[f64], norm: f64) -> f64 {
        -lp.iter().sum::<f64>() / norm
    }

    /// See [`super::dpo`].
    pub fn dpo(c: f64, r: f64, c_ref: f64, r_ref: f64, beta: f64) -> f64 {
        -log_sigmoid(beta * ((c - c_ref) - (r - r_ref)))
    }

    /// See [`super::kto`].
    pub fn kto(lp: f64, rf: f64, z: f64, desirable: bool, beta: f64, w: f64) -> f64 {
        let ratio = lp - rf;
        let arg = if desirable { ratio - z } else { z - ratio };
        w * (1.0 - 1.0 / (1.0 + (-beta * arg).exp()))
    }

    /// See [`super::simpo`].
    pub fn simpo(c: f64, cl: usize, r: f64, rl: usize, beta: f64, gamma: f64) -> f64 {
        -log_sigmoid(beta * c / cl as f64 - beta * r / rl as f64 - gamma)
    }

    /// See [`super::orpo`].
    pub fn orpo(c: f64, cl: usize, r: f64, rl: usize, lambda: f64) -> f64 {
        let (mc, mr) = (c / cl as f64, r / rl as f64);
        let lo = |m: f64| m - (1.0 - m.exp()).max(1e-12).ln();
        -mc + lambda * -log_sigmoid(lo(mc) - lo(mr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn v(x: &[f64]) -> Tensor {
        Tensor::from_slice(x, x.len(), &Device::Cpu).unwrap()
    }
    fn s(t: Tensor) -> f64 {
        t.to_scalar::<f64>().unwrap()
    }
    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12 * (1.0 + b.abs()), "{a} vs {b}");
    }

    #[test]
    fn tensor_losses_equal_the_oracle() {
        let lp = [-0.5, -1.2, -0.05, -2.0];
        let old = [-0.7, -1.0, -0.4, -1.1]; // ratios both inside and outside [0.8, 1.2]
        let rf = [-0.6, -1.5, -0.1, -1.9];
        let w = [1.0, 0.5, 2.0, 1.0];
        for adv in [1.3, -0.7] {
            for (wt, re) in [(None, None), (Some(&w[..]), Some((&rf[..], 0.05)))] {
                let got = s(policy_sequence(
                    &v(&lp),
                    &v(&old),
                    adv,
                    0.2,
                    wt.map(v).as_ref(),
                    re.map(|(r, b)| (v(r), b)).as_ref().map(|(r, b)| (r, *b)),
                    7.0,
                )
                .unwrap());
                close(got, oracle::policy_sequence(&lp, &old, adv, 0.2, wt, re, 7.0));
            }
        }
        close(s(nll_sequence(&v(&lp), 3.0).unwrap()), oracle::nll_sequence(&lp, 3.0));
        let (c, r) = (v(&[-3.0]).sum_all().unwrap(), v(&[-5.5]).sum_all().unwrap());
        close(s(dpo(&c, &r, -3.4, -5.0, 0.1).unwrap()), oracle::dpo(-3.0, -5.5, -3.4, -5.0, 0.1));
        for d in [true, false] {
            close(s(kto(&c, -3.4, 0.2, d, 0.1, 1.5).unwrap()), oracle::kto(-3.0, -3.4, 0.2, d, 0.1, 1.5));
        }
        close(s(simpo(&c, 4, &r, 9, 2.0, 0.5).unwrap()), oracle::simpo(-3.0, 4, -5.5, 9, 2.0, 0.5));
        close(s(orpo(&c, 4, &r, 9, 0.1).unwrap()), oracle::orpo(-3.0, 4, -5.5, 9, 0.1));
    }

    #[test]
    fn log_sigmoid_is_stable_for_large_arguments() {
        let x = v(&[-800.0, 0.0, 800.0]);
        let y = log_sigmoid(&x).unwrap().to_vec1::<f64>().unwrap();
        assert!((y[0] + 800.0).abs() < 1e-9 && (y[1] + 2f64.ln()).abs() < 1e-12 && y[2].abs() < 1e-12, "{y:?}");
    }

    #[test]
    fn group_advantages_normalise_within_groups() {
        let a = group_advantages(&[1.0, 0.0, 1.0, 1.0, 0.5, 0.5], &[0, 0, 0, 0, 7, 7], 1e-6);
        let mean: f64 = a[..4].iter().sum::<f64>() / 4.0;
        assert!(mean.abs() < 1e-12);
        assert!((a[1] + 3f64.sqrt()).abs() < 1e-4, "{a:?}");
        assert_eq!(&a[4..], &[0.0, 0.0]); // identical rewards carry no signal
    }
}
