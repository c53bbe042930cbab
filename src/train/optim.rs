//! AdamW with global-norm clipping and a warm-up + constant/cosine learning-rate schedule.

use super::lora::cerr;
use crate::Result;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

/// Learning-rate schedule after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Constant learning rate.
    Constant,
    /// Cosine decay to `min_lr_ratio · lr` at `total_steps`.
    Cosine,
}

/// Optimiser settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OptimConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Adam β1.
    pub beta1: f64,
    /// Adam β2.
    pub beta2: f64,
    /// Adam ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0 = off).
    pub max_grad_norm: f64,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
    /// Schedule after warm-up.
    pub schedule: Schedule,
    /// Steps the cosine schedule spans.
    pub total_steps: u64,
    /// Final learning rate of the cosine schedule, as a fraction of `lr`.
    pub min_lr_ratio: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            warmup_steps: 0,
            schedule: Schedule::Constant,
            total_steps: 1000,
            min_lr_ratio: 0.1,
        }
    }
}

impl OptimConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        let bad = |w: &'static str, v: f64| crate::Error::invalid(w, format!("{v} is out of range"));
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(bad("optim.lr", self.lr));
        }
        if !(0.0..1.0).contains(&self.beta1) {
            return Err(bad("optim.beta1", self.beta1));
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return Err(bad("optim.beta2", self.beta2));
        }
        if self.eps.is_nan() || self.eps <= 0.0 {
            return Err(bad("optim.eps", self.eps));
        }
        if self.weight_decay < 0.0 || self.max_grad_norm < 0.0 {
            return Err(bad("optim.weight_decay / max_grad_norm", self.weight_decay.min(self.max_grad_norm)));
        }
        Ok(())
    }

    /// Learning rate at (0-based) step `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                let p = ((step - self.warmup_steps) as f64 / span).min(1.0);
                let min = self.lr * self.min_lr_ratio;
                min + 0.5 * (self.lr - min) * (1.0 + (std::f64::consts::PI * p).cos())
            }
        }
    }
}

/// AdamW state for a fixed list of parameters.
pub struct AdamW {
    /// Settings.
    pub cfg: OptimConfig,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates applied so far.
    pub t: u64,
}

impl AdamW {
    /// Zero state for `vars`.
    pub fn new(cfg: OptimConfig, vars: &[Var]) -> Result<AdamW> {
        cfg.validate()?;
        let zeros = |v: &Var| v.as_tensor().zeros_like().map_err(cerr);
        let m = vars.iter().map(zeros).collect::<Result<_>>()?;
        let v = vars.iter().map(zeros).collect::<Result<_>>()?;
        Ok(AdamW { cfg, m, v, t: 0 })
    }

    /// Global L2 norm of the gradients.
    pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
        let mut s = 0.0;
        for g in grads {
            s += g.to_dtype(DType::F64).and_then(|g| g.sqr()?.sum_all()?.to_scalar::<f64>()).map_err(cerr)?;
        }
        Ok(s.sqrt())
    }

    /// One update. Clips `grads` to the global norm, applies AdamW at the scheduled learning rate
    /// and returns (pre-clip gradient norm, learning rate).
    pub fn step(&mut self, vars: &[Var], grads: &[Tensor]) -> Result<(f64, f64)> {
        let norm = Self::global_norm(grads)?;
        let clip = if self.cfg.max_grad_norm > 0.0 && norm > self.cfg.max_grad_norm {
            self.cfg.max_grad_norm / norm
        } else {
            1.0
        };
        let lr = self.cfg.lr_at(self.t);
        self.t += 1;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        for (i, (p, g)) in vars.iter().zip(grads).enumerate() {
            let g = (g * clip).map_err(cerr)?;
            self.m[i] = ((&self.m[i] * b1).and_then(|m| m + (&g * (1.0 - b1))?)).map_err(cerr)?;
            self.v[i] = ((&self.v[i] * b2).and_then(|v| v + (g.sqr()? * (1.0 - b2))?)).map_err(cerr)?;
            let update = (|| {
                let mhat = (&self.m[i] / bc1)?;
                let vhat = (&self.v[i] / bc2)?;
                let adam = (mhat / (vhat.sqrt()? + self.cfg.eps)?)?;
                let decay = (p.as_tensor() * self.cfg.weight_decay)?;
                p.as_tensor() - ((adam + decay)? * lr)?
            })()
            .map_err(cerr)?;
            p.set(&update).map_err(cerr)?;
        }
        Ok((norm, lr))
    }

    /// The moments, for checkpoints (`m.{i}`, `v.{i}`).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.m.len());
        for (i, (m, v)) in self.m.iter().zip(&self.v).enumerate() {
            out.push((format!("m.{i}"), m.clone()));
            out.push((format!("v.{i}"), v.clone()));
        }
        out
    }

    /// Restores moments saved by [`AdamW::state`].
    pub fn load_state(&mut self, t: u64, mut get: impl FnMut(&str) -> Option<Tensor>) -> Result<()> {
        for i in 0..self.m.len() {
            let (m, v) = match (get(&format!("m.{i}")), get(&format!("v.{i}"))) {
                (Some(m), Some(v)) => (m, v),
                _ => return Err(crate::Error::invalid("checkpoint", format!("optimizer state lacks moment {i}"))),
            };
            if m.shape() != self.m[i].shape() || v.shape() != self.v[i].shape() {
                return Err(crate::Error::invalid("checkpoint", format!("optimizer moment {i} has another shape")));
            }
            self.m[i] = m.to_dtype(self.m[i].dtype()).map_err(cerr)?;
            self.v[i] = v.to_dtype(self.v[i].dtype()).map_err(cerr)?;
        }
        self.t = t;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedules() {
        let c = OptimConfig {
            lr: 1.0,
            warmup_steps: 4,
            schedule: Schedule::Cosine,
            total_steps: 14,
            min_lr_ratio: 0.0,
            ..Default::default()
        };
        assert_eq!(c.lr_at(0), 0.25);
        assert_eq!(c.lr_at(3), 1.0);
        assert!((c.lr_at(9) - 0.5).abs() < 1e-12);
        assert!(c.lr_at(14).abs() < 1e-12);
        assert_eq!(OptimConfig { lr: 0.3, ..Default::default() }.lr_at(100), 0.3);
    }

    #[test]
    fn adamw_matches_a_hand_computed_step_and_clips() {
        let p = Var::from_tensor(&Tensor::new(&[1.0f64, -2.0], &Device::Cpu).unwrap()).unwrap();
        let cfg = OptimConfig { lr: 0.1, weight_decay: 0.5, max_grad_norm: 1.0, ..Default::default() };
        let mut opt = AdamW::new(cfg, std::slice::from_ref(&p)).unwrap();
        let g = Tensor::new(&[3.0f64, 4.0], &Device::Cpu).unwrap(); // norm 5 → scaled to (0.6, 0.8)
        let (norm, lr) = opt.step(std::slice::from_ref(&p), &[g]).unwrap();
        assert_eq!((norm, lr), (5.0, 0.1));
        // First Adam step: m̂/√v̂ = sign(g) (up to ε); decay adds wd·p.
        let got = p.as_tensor().to_vec1::<f64>().unwrap();
        let want = [1.0 - 0.1 * (1.0 + 0.5), -2.0 - 0.1 * (1.0 - 1.0)];
        assert!((got[0] - want[0]).abs() < 1e-6 && (got[1] - want[1]).abs() < 1e-6, "{got:?}");
    }
}
