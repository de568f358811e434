//! AdamW with its state in named tensors (saved and loaded with a
//! checkpoint), global-norm gradient clipping, and a learning rate with linear
//! warm-up then cosine decay.
//!
//! Every rank holds the same all-reduced gradients and applies the same
//! update, so the replicas never drift apart.

use std::path::Path;

use tch::Tensor;

/// What went wrong in the optimizer.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("optimizer state {path}: {reason}")]
    State { path: String, reason: String },
    #[error("optimizer setting {field} = {value} is out of range: {reason}")]
    Config {
        field: &'static str,
        value: f64,
        reason: &'static str,
    },
}

impl OptimError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        match self {
            OptimError::Torch(_) => "torch",
            OptimError::State { .. } => "checkpoint",
            OptimError::Config { .. } => "optimizer_config",
        }
    }
}

/// Optimizer and schedule settings.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Peak learning rate, reached at the end of the warm-up.
    pub lr: f64,
    /// Learning rate at the end of the cosine decay, as a fraction of `lr`.
    pub min_lr_ratio: f64,
    pub warmup_steps: u64,
    /// Steps of the whole schedule (warm-up included).
    pub total_steps: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices only (not to norm scales).
    pub weight_decay: f64,
    /// Largest global gradient norm; larger gradients are scaled down to it.
    pub clip_norm: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 3e-3,
            min_lr_ratio: 0.1,
            warmup_steps: 10,
            total_steps: 1000,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            clip_norm: 1.0,
        }
    }
}

impl AdamWConfig {
    /// Refuses settings that cannot train.
    pub fn validate(&self) -> Result<(), OptimError> {
        let check = |ok: bool, field: &'static str, value: f64, reason: &'static str| {
            if ok {
                Ok(())
            } else {
                Err(OptimError::Config {
                    field,
                    value,
                    reason,
                })
            }
        };
        check(
            self.lr > 0.0 && self.lr.is_finite(),
            "lr",
            self.lr,
            "must be positive",
        )?;
        check(
            (0.0..=1.0).contains(&self.min_lr_ratio),
            "min_lr_ratio",
            self.min_lr_ratio,
            "must be in [0, 1]",
        )?;
        check(
            (0.0..1.0).contains(&self.beta1),
            "beta1",
            self.beta1,
            "must be in [0, 1)",
        )?;
        check(
            (0.0..1.0).contains(&self.beta2),
            "beta2",
            self.beta2,
            "must be in [0, 1)",
        )?;
        check(self.eps > 0.0, "eps", self.eps, "must be positive")?;
        check(
            self.weight_decay >= 0.0,
            "weight_decay",
            self.weight_decay,
            "must not be negative",
        )?;
        check(
            self.clip_norm > 0.0,
            "clip_norm",
            self.clip_norm,
            "must be positive",
        )
    }

    /// The learning rate of step `step` (0-based): linear warm-up to `lr`,
    /// then cosine decay to `lr · min_lr_ratio` at `total_steps`.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / decay as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)
    }
}

/// AdamW over a fixed list of named parameters.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<(String, Tensor)>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    /// Updates applied so far.
    steps: i64,
}

/// What one update did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Update {
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

impl AdamW {
    /// AdamW over `params` (named tensors the model keeps; the optimizer
    /// holds its own handles on the same storage).
    pub fn over(params: &[(String, Tensor)], config: AdamWConfig) -> Result<AdamW, OptimError> {
        AdamW::new(
            params
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect(),
            config,
        )
    }

    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig) -> Result<AdamW, OptimError> {
        config.validate()?;
        let zeros = |p: &Tensor| tch::no_grad(|| p.f_zeros_like());
        let exp_avg = params
            .iter()
            .map(|(_, p)| zeros(p))
            .collect::<Result<_, _>>()?;
        let exp_avg_sq = params
            .iter()
            .map(|(_, p)| zeros(p))
            .collect::<Result<_, _>>()?;
        Ok(AdamW {
            config,
            params,
            exp_avg,
            exp_avg_sq,
            steps: 0,
        })
    }

    pub fn steps(&self) -> i64 {
        self.steps
    }

    /// Sets the count of updates applied (the schedule's position), as a
    /// resumed run's was.
    pub fn set_steps(&mut self, steps: i64) {
        self.steps = steps;
    }

    /// Clips the gradients to the global norm, then applies one AdamW update
    /// at the schedule's learning rate for the next step.
    pub fn step(&mut self) -> Result<Update, OptimError> {
        let c = &self.config;
        let lr = c.lr_at(self.steps as u64);
        tch::no_grad(|| -> Result<Update, OptimError> {
            // Each gradient's sum of squares, summed in f64 in order; read
            // from the device in one transfer (a GPU is then waited for once,
            // not once per parameter). Exact conversions: the same sum as
            // reading each one.
            let mut sums = Vec::new();
            for (_, p) in &self.params {
                let g = p.grad();
                if g.defined() {
                    sums.push(g.f_pow_tensor_scalar(2)?.f_sum(None)?);
                }
            }
            let squares: f64 = if sums.is_empty() {
                0.0
            } else {
                Vec::<f64>::try_from(
                    Tensor::f_stack(&sums, 0)?
                        .f_to_kind(tch::Kind::Double)?
                        .f_to_device(tch::Device::Cpu)?,
                )?
                .into_iter()
                .sum()
            };
            let grad_norm = squares.sqrt();
            let clip = if grad_norm > c.clip_norm {
                c.clip_norm / (grad_norm + 1e-6)
            } else {
                1.0
            };
            self.steps += 1;
            let t = self.steps as f64;
            let (bias1, bias2) = (1.0 - c.beta1.powf(t), 1.0 - c.beta2.powf(t));
            for (i, (_, p)) in self.params.iter().enumerate() {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let g = g.f_mul_scalar(clip)?;
                let mut p = p.shallow_clone();
                if c.weight_decay > 0.0 && p.dim() >= 2 {
                    let _ = p.f_mul_scalar_(1.0 - lr * c.weight_decay)?;
                }
                let m = &mut self.exp_avg[i];
                let _ = m.f_mul_scalar_(c.beta1)?;
                let _ = m.f_add_(&g.f_mul_scalar(1.0 - c.beta1)?)?;
                let v = &mut self.exp_avg_sq[i];
                let _ = v.f_mul_scalar_(c.beta2)?;
                let _ = v.f_add_(&g.f_mul(&g)?.f_mul_scalar(1.0 - c.beta2)?)?;
                let denom = v.f_div_scalar(bias2)?.f_sqrt()?.f_add_scalar(c.eps)?;
                let update = m.f_div_scalar(bias1)?.f_div(&denom)?.f_mul_scalar(lr)?;
                let _ = p.f_sub_(&update)?;
            }
            Ok(Update { lr, grad_norm })
        })
    }

    /// The moments by name, as [`AdamW::save`] names them.
    pub fn moments(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .zip(self.exp_avg.iter().zip(&self.exp_avg_sq))
            .flat_map(|((name, _), (m, v))| {
                [
                    (format!("exp_avg.{name}"), m.shallow_clone()),
                    (format!("exp_avg_sq.{name}"), v.shallow_clone()),
                ]
            })
            .collect()
    }

    /// Saves the moments and the step count (safetensors).
    pub fn save(&self, path: &Path) -> Result<(), OptimError> {
        let mut named: Vec<(String, Tensor)> = Vec::with_capacity(2 * self.params.len() + 1);
        for (i, (name, _)) in self.params.iter().enumerate() {
            named.push((format!("exp_avg.{name}"), self.exp_avg[i].shallow_clone()));
            named.push((
                format!("exp_avg_sq.{name}"),
                self.exp_avg_sq[i].shallow_clone(),
            ));
        }
        named.push(("steps".to_string(), Tensor::from_slice(&[self.steps])));
        Tensor::write_safetensors(&named, path).map_err(|e| OptimError::State {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
    }

    /// Loads what [`AdamW::save`] wrote, for the same parameters.
    pub fn load(&mut self, path: &Path) -> Result<(), OptimError> {
        let bad = |reason: String| OptimError::State {
            path: path.display().to_string(),
            reason,
        };
        let named: std::collections::BTreeMap<String, Tensor> = Tensor::read_safetensors(path)
            .map_err(|e| bad(e.to_string()))?
            .into_iter()
            .collect();
        let get = |key: String, like: &Tensor| -> Result<Tensor, OptimError> {
            let t = named
                .get(&key)
                .ok_or_else(|| bad(format!("no tensor {key}")))?;
            if t.size() != like.size() {
                return Err(bad(format!(
                    "{key} has shape {:?}, the parameter {:?}",
                    t.size(),
                    like.size()
                )));
            }
            // Saved from any device, read onto the parameter's.
            Ok(t.f_to_device(like.device())?)
        };
        let mut exp_avg = Vec::with_capacity(self.params.len());
        let mut exp_avg_sq = Vec::with_capacity(self.params.len());
        for (name, p) in &self.params {
            exp_avg.push(get(format!("exp_avg.{name}"), p)?);
            exp_avg_sq.push(get(format!("exp_avg_sq.{name}"), p)?);
        }
        let steps = named
            .get("steps")
            .ok_or_else(|| bad("no tensor steps".to_string()))?
            .f_int64_value(&[0])?;
        self.exp_avg = exp_avg;
        self.exp_avg_sq = exp_avg_sq;
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::OptimizerConfig;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let c = AdamWConfig {
            lr: 1.0,
            warmup_steps: 4,
            total_steps: 14,
            min_lr_ratio: 0.1,
            ..Default::default()
        };
        assert!((c.lr_at(0) - 0.25).abs() < 1e-12);
        assert!((c.lr_at(3) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(4) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(9) - 0.55).abs() < 1e-12);
        assert!((c.lr_at(14) - 0.1).abs() < 1e-12);
        assert!((c.lr_at(100) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn bad_settings_are_named() {
        let err = AdamWConfig {
            lr: 0.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("lr = 0"), "{err}");
        assert_eq!(err.category(), "optimizer_config");
    }

    /// Parameters and inputs for a small problem, drawn from `seed` without
    /// libtorch's global generator (tests run in parallel).
    fn problem(seed: u64) -> (tch::nn::VarStore, Tensor) {
        let mut rng = weft_planner::rng::SplitMix64::new(seed);
        let mut values = |n: usize| -> Tensor {
            let v: Vec<f32> = (0..n)
                .map(|_| rng.below(2000) as f32 / 1000.0 - 1.0)
                .collect();
            Tensor::from_slice(&v)
        };
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let w = values(12).reshape([3, 4]);
        let b = values(4);
        let _w = vs.root().var_copy("w", &w);
        let _b = vs.root().var_copy("b", &b);
        (vs, values(24).reshape([8, 3]))
    }

    fn loss(vs: &tch::nn::VarStore, x: &Tensor) -> Tensor {
        let vars = vs.variables();
        (x.matmul(&vars["w"]) + &vars["b"])
            .pow_tensor_scalar(2)
            .mean(None)
    }

    fn sorted(vs: &tch::nn::VarStore) -> Vec<(String, Tensor)> {
        let mut v: Vec<_> = vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    #[test]
    fn matches_libtorchs_adamw_without_clipping() {
        // Same hyper-parameters, constant learning rate, decay on every tensor
        // of rank 2 only in ours: compare on a problem with matrices alone.
        let (ours_vs, x) = problem(1);
        let (theirs_vs, _) = problem(1);
        let config = AdamWConfig {
            lr: 0.01,
            warmup_steps: 0,
            min_lr_ratio: 1.0,
            weight_decay: 0.0,
            clip_norm: 1e9,
            ..Default::default()
        };
        let mut ours = AdamW::new(sorted(&ours_vs), config).unwrap();
        let mut theirs = tch::nn::AdamW {
            beta1: 0.9,
            beta2: 0.95,
            wd: 0.0,
            eps: 1e-8,
            amsgrad: false,
        }
        .build(&theirs_vs, 0.01)
        .unwrap();
        for _ in 0..20 {
            for (_, mut t) in ours_vs.variables() {
                t.zero_grad();
            }
            loss(&ours_vs, &x).backward();
            ours.step().unwrap();
            theirs.backward_step(&loss(&theirs_vs, &x));
        }
        let (a, b) = (ours_vs.variables(), theirs_vs.variables());
        for name in ["w", "b"] {
            let diff = (&a[name] - &b[name]).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{name}: {diff}");
        }
    }

    #[test]
    fn clipping_bounds_the_norm_and_state_round_trips() {
        let (vs, x) = problem(2);
        let config = AdamWConfig {
            clip_norm: 1e-3,
            ..Default::default()
        };
        let mut opt = AdamW::new(sorted(&vs), config.clone()).unwrap();
        loss(&vs, &x).backward();
        let update = opt.step().unwrap();
        assert!(update.grad_norm > 1e-3);
        let path =
            std::env::temp_dir().join(format!("weft-adamw-{}.safetensors", std::process::id()));
        opt.save(&path).unwrap();
        let mut again = AdamW::new(sorted(&vs), config).unwrap();
        again.load(&path).unwrap();
        assert_eq!(again.steps(), 1);
        for (a, b) in opt.exp_avg.iter().zip(&again.exp_avg) {
            assert_eq!((a - b).abs().max().double_value(&[]), 0.0);
        }
        // The first moment of a clipped step is (1 − β1)·clipped gradient.
        let m_norm: f64 = opt
            .exp_avg
            .iter()
            .map(|m| {
                m.pow_tensor_scalar(2)
                    .sum(tch::Kind::Float)
                    .double_value(&[])
            })
            .sum::<f64>()
            .sqrt();
        assert!((m_norm - 0.1 * 1e-3).abs() < 1e-6, "{m_norm}");
        let _ = std::fs::remove_file(&path);
    }
}
