//! Profiles: the cost model's speeds as measured on a real device, so that the
//! planner prices steps as that device runs them rather than from datasheets.
//!
//! `weft-trainer profile` measures them with the trainer's own code (a real
//! training step on one rank, timed per component, and point-to-point
//! transfers between two ranks over the real collectives) and writes this
//! document; `weft plan|simulate --profile FILE` and the trainer's
//! `--profile FILE` plan with it. The speeds are absolute (TFLOP/s, GB/s), so
//! a profile applies to any GPU preset: [`Profile::calibrate`] turns them into
//! the efficiencies the cost model multiplies each GPU's peak by.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::cluster::GpuModel;
use crate::cost::CostCoefficients;
use crate::topology::Topology;

/// The version of the profile document this planner reads and writes.
pub const PROFILE_VERSION: u32 = 1;

/// Measured speeds of one device and of the link between two of its ranks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// [`PROFILE_VERSION`].
    pub version: u32,
    /// What was measured, in words (device, threads, model).
    pub device: String,
    /// FLOP/s the linear modules reached (embedding, projections, MLP, head;
    /// forward and backward), in TFLOP/s, counted as the cost model counts them.
    pub linear_tflops: f64,
    /// FLOP/s attention reached (forward and backward), in TFLOP/s, counted as
    /// the cost model counts it (causal: 2·s²·hidden per layer, forward).
    pub attention_tflops: f64,
    /// Bytes per second of a large point-to-point transfer between two ranks,
    /// in GB/s.
    pub link_gbytes_per_s: f64,
    /// Fixed cost of one point-to-point message, seconds.
    pub p2p_latency_s: f64,
    /// Seconds one StreamBP chunk adds per layer whatever its length
    /// ([`CostCoefficients::streambp_chunk_overhead_s`]): measured where
    /// the profile's steps stream, absent (the default stands) otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_bp_chunk_overhead_s: Option<f64>,
}

/// Why a profile cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProfileError {
    #[error("profile version {found}, but this planner reads version {PROFILE_VERSION}")]
    Version { found: u32 },
    #[error("profile field {field} is {value}: it must be a positive, finite number")]
    NotPositive { field: &'static str, value: f64 },
    #[error("profile field {field} is {value}: it must be a finite number, zero or more")]
    Negative { field: &'static str, value: f64 },
}

impl ProfileError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        "profile"
    }
}

impl Profile {
    /// Checks the version and that every speed is a positive, finite number.
    pub fn validate(&self) -> Result<(), ProfileError> {
        if self.version != PROFILE_VERSION {
            return Err(ProfileError::Version {
                found: self.version,
            });
        }
        for (field, value) in [
            ("linear_tflops", self.linear_tflops),
            ("attention_tflops", self.attention_tflops),
            ("link_gbytes_per_s", self.link_gbytes_per_s),
            ("p2p_latency_s", self.p2p_latency_s),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(ProfileError::NotPositive { field, value });
            }
        }
        if let Some(value) = self.stream_bp_chunk_overhead_s
            && !(value.is_finite() && value >= 0.0)
        {
            return Err(ProfileError::Negative {
                field: "stream_bp_chunk_overhead_s",
                value,
            });
        }
        Ok(())
    }

    /// Sets `coefficients` so the cost model, on GPUs of model `gpu` whose
    /// links run at `link_gbytes_per_s` (line rate), gives the measured
    /// speeds: each efficiency is the measured speed over that peak.
    pub fn calibrate(
        &self,
        gpu: &GpuModel,
        link_gbytes_per_s: f64,
        coefficients: &mut CostCoefficients,
    ) {
        let peak = gpu.peak_bf16_tflops.max(f64::MIN_POSITIVE);
        coefficients.linear_efficiency = self.linear_tflops / peak;
        coefficients.attention_efficiency = self.attention_tflops / peak;
        coefficients.link_efficiency =
            self.link_gbytes_per_s / link_gbytes_per_s.max(f64::MIN_POSITIVE);
        coefficients.p2p_latency_s = self.p2p_latency_s;
        if let Some(overhead) = self.stream_bp_chunk_overhead_s {
            coefficients.streambp_chunk_overhead_s = overhead;
        }
    }

    /// [`Profile::calibrate`] against the first GPU of `topology` and its
    /// node's NVLink: the device a profile measures is taken to be that
    /// GPU; other GPU models keep their peaks' ratio to it, and the network
    /// its line rates' ratio to NVLink (one link efficiency for both).
    pub fn calibrate_for(&self, topology: &Topology, coefficients: &mut CostCoefficients) {
        self.calibrate(
            topology.gpu_of(0),
            topology.nvlink_bytes_per_s(0) / 1e9,
            coefficients,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::CostModel;
    use crate::model::ModelSpec;

    fn profile() -> Profile {
        Profile {
            version: PROFILE_VERSION,
            device: "test".into(),
            linear_tflops: 0.2,
            attention_tflops: 0.05,
            link_gbytes_per_s: 2.0,
            p2p_latency_s: 1e-4,
            stream_bp_chunk_overhead_s: Some(2e-5),
        }
    }

    #[test]
    fn a_calibrated_cost_model_gives_the_measured_speeds() {
        let gpu = GpuModel::preset("h100").unwrap();
        let mut coefficients = CostCoefficients::default();
        profile().calibrate(&gpu, gpu.nvlink_gbytes_per_s, &mut coefficients);
        let model = ModelSpec::preset("llama-7b").unwrap();
        let calibrated = CostModel::new(model.clone(), coefficients.clone());
        let ideal = CostModel::new(
            model,
            CostCoefficients {
                linear_efficiency: 1.0,
                attention_efficiency: 1.0,
                ..Default::default()
            },
        );
        // Time at the measured speed = time at peak × peak / measured.
        let tokens = 4096.0;
        let ratio = calibrated.linear_time(tokens, &gpu) / ideal.linear_time(tokens, &gpu);
        assert!((ratio - gpu.peak_bf16_tflops / 0.2).abs() < 1e-6 * ratio);
        let ratio = calibrated.attention_compute_time(tokens, &gpu)
            / ideal.attention_compute_time(tokens, &gpu);
        assert!((ratio - gpu.peak_bf16_tflops / 0.05).abs() < 1e-6 * ratio);
        assert!((coefficients.link_efficiency * gpu.nvlink_gbytes_per_s - 2.0).abs() < 1e-9);
        assert_eq!(coefficients.p2p_latency_s, 1e-4);
        assert_eq!(coefficients.streambp_chunk_overhead_s, 2e-5);
        // A profile that did not stream leaves the default chunk cost.
        let mut plain = CostCoefficients::default();
        let unstreamed = Profile {
            stream_bp_chunk_overhead_s: None,
            ..profile()
        };
        unstreamed.calibrate(&gpu, gpu.nvlink_gbytes_per_s, &mut plain);
        assert_eq!(
            plain.streambp_chunk_overhead_s,
            CostCoefficients::default().streambp_chunk_overhead_s
        );
    }

    #[test]
    fn a_bad_profile_is_refused_by_field() {
        let mut p = profile();
        p.attention_tflops = 0.0;
        assert_eq!(
            p.validate().unwrap_err().to_string(),
            "profile field attention_tflops is 0: it must be a positive, finite number"
        );
        let mut p = profile();
        p.version = 7;
        assert!(p.validate().unwrap_err().to_string().contains("version 7"));
        let mut p = profile();
        p.stream_bp_chunk_overhead_s = Some(-1e-3);
        assert_eq!(
            p.validate().unwrap_err().to_string(),
            "profile field stream_bp_chunk_overhead_s is -0.001: it must be a finite number, zero or more"
        );
        assert!(profile().validate().is_ok());
    }
}
