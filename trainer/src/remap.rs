//! The remapping layer: moves token rows between the attention layout (each
//! rank holds its shards of the sequences it attends over) and the linear
//! layout (token-balanced, for the linear modules), as the step plan's remap
//! says, with one uneven all-to-all each way.
//!
//! The token-level mapping is [`weft_planner::plan::RemapRoutes`]: a rank keeps
//! the first tokens of its attention layout and sends the rest, in order, to
//! the plan's destinations; its linear layout is the kept tokens followed by
//! what it receives, by ascending source rank. Both directions are a
//! permutation and an all-to-all, so each is the other's transpose: the
//! backward of [`Remap::to_linear`] is [`Remap::to_attention`] of the gradient,
//! and vice versa.

use tch::{Kind, Tensor};
use weft_planner::plan::RemapRoutes;

use crate::comm::{CommError, ProcessGroup};

/// What went wrong in a remap.
#[derive(Debug, thiserror::Error)]
pub enum RemapError {
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("remap expects {expected} token rows, got {got}")]
    Rows { expected: i64, got: i64 },
}

impl RemapError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        match self {
            RemapError::Comm(e) => e.category(),
            RemapError::Torch(_) => "torch",
            RemapError::Rows { .. } => "remap_input",
        }
    }
}

/// One rank's remap of one micro-batch, ready to run.
#[derive(Debug)]
pub struct Remap {
    /// Rows of the all-to-all input, from attention-layout rows (by destination rank).
    gather_for_send: Tensor,
    /// Rows of the linear layout, from all-to-all output rows (by source rank).
    gather_linear: Tensor,
    /// The inverse permutations, for the way back.
    scatter_for_send: Tensor,
    scatter_linear: Tensor,
    input_splits: Vec<i64>,
    output_splits: Vec<i64>,
    attention_rows: i64,
    linear_rows: i64,
}

fn index(values: Vec<i64>) -> Tensor {
    Tensor::from_slice(&values)
}

fn inverse(permutation: &[i64]) -> Vec<i64> {
    let mut inverse = vec![0i64; permutation.len()];
    for (i, p) in permutation.iter().enumerate() {
        inverse[*p as usize] = i as i64;
    }
    inverse
}

impl Remap {
    /// The remap of `rank` in a world of `world` ranks along `routes`.
    pub fn new(routes: &RemapRoutes, rank: u32, world: u32) -> Remap {
        let held: i64 = routes.attention.iter().map(|r| r.len() as i64).sum();
        let keep = routes.keep as i64;
        let world = world as usize;
        // Input of the all-to-all, by destination: the kept rows go to this
        // rank itself; sent rows follow the kept ones in the attention layout,
        // in the order of `sends`.
        let mut input_splits = vec![0i64; world];
        let mut send_start = vec![0i64; world];
        let mut next = keep;
        for (to, n) in &routes.sends {
            send_start[*to as usize] = next;
            input_splits[*to as usize] = *n as i64;
            next += *n as i64;
        }
        input_splits[rank as usize] = keep;
        send_start[rank as usize] = 0;
        let gather_for_send: Vec<i64> = (0..world)
            .flat_map(|d| send_start[d]..send_start[d] + input_splits[d])
            .collect();
        // Output of the all-to-all, by source; the linear layout puts this
        // rank's own rows first, then the others' by ascending source.
        let mut output_splits = vec![0i64; world];
        for (from, n) in &routes.recvs {
            output_splits[*from as usize] = *n as i64;
        }
        output_splits[rank as usize] = keep;
        let mut offset = vec![0i64; world];
        let mut total = 0;
        for s in 0..world {
            offset[s] = total;
            total += output_splits[s];
        }
        let own = rank as usize;
        let gather_linear: Vec<i64> = std::iter::once(own)
            .chain((0..world).filter(|s| *s != own))
            .flat_map(|s| offset[s]..offset[s] + output_splits[s])
            .collect();
        let scatter_for_send = inverse(&gather_for_send);
        let scatter_linear = inverse(&gather_linear);
        Remap {
            attention_rows: held,
            linear_rows: total,
            gather_for_send: index(gather_for_send),
            gather_linear: index(gather_linear),
            scatter_for_send: index(scatter_for_send),
            scatter_linear: index(scatter_linear),
            input_splits,
            output_splits,
        }
    }

    /// The same remap with its index tensors on `device`, where the
    /// activations it moves live.
    pub fn on_device(self, device: tch::Device) -> Result<Remap, RemapError> {
        Ok(Remap {
            gather_for_send: self.gather_for_send.f_to_device(device)?,
            gather_linear: self.gather_linear.f_to_device(device)?,
            scatter_for_send: self.scatter_for_send.f_to_device(device)?,
            scatter_linear: self.scatter_linear.f_to_device(device)?,
            ..self
        })
    }

    /// Rows this rank holds in the linear layout.
    pub fn linear_rows(&self) -> i64 {
        self.linear_rows
    }

    /// Rows this rank holds in the attention layout.
    pub fn attention_rows(&self) -> i64 {
        self.attention_rows
    }

    fn rows(t: &Tensor, expected: i64) -> Result<(), RemapError> {
        let got = t.size().first().copied().unwrap_or(0);
        if got == expected {
            Ok(())
        } else {
            Err(RemapError::Rows { expected, got })
        }
    }

    fn moved(
        group: &mut ProcessGroup,
        input: &Tensor,
        rows: i64,
        output_splits: &[i64],
        input_splits: &[i64],
    ) -> Result<Tensor, RemapError> {
        let mut shape = input.size();
        shape[0] = rows;
        let mut output = Tensor::f_empty(shape.as_slice(), (input.kind(), input.device()))?;
        group.all_to_all(
            &mut output,
            &input.f_contiguous()?,
            output_splits,
            input_splits,
        )?;
        Ok(output)
    }

    /// Attention layout `[attention_rows, ...]` to linear layout `[linear_rows, ...]`.
    pub fn to_linear(&self, group: &mut ProcessGroup, x: &Tensor) -> Result<Tensor, RemapError> {
        Self::rows(x, self.attention_rows)?;
        let input = x.f_index_select(0, &self.gather_for_send)?;
        let output = Self::moved(
            group,
            &input,
            self.linear_rows,
            &self.output_splits,
            &self.input_splits,
        )?;
        Ok(output.f_index_select(0, &self.gather_linear)?)
    }

    /// Linear layout back to the attention layout: the inverse of
    /// [`Remap::to_linear`], and its backward.
    pub fn to_attention(&self, group: &mut ProcessGroup, x: &Tensor) -> Result<Tensor, RemapError> {
        Self::rows(x, self.linear_rows)?;
        let by_source = x.f_index_select(0, &self.scatter_linear)?;
        let back = Self::moved(
            group,
            &by_source,
            self.attention_rows,
            &self.input_splits,
            &self.output_splits,
        )?;
        Ok(back.f_index_select(0, &self.scatter_for_send)?)
    }
}

/// Token ids of an attention layout as rows of one column (`sequence * 10^6 +
/// position`, exact in fp32 for sequences below 16 and positions below 10^6),
/// for tests and `selfcheck`.
pub fn token_id_rows(routes: &RemapRoutes) -> Result<Tensor, RemapError> {
    let ids: Vec<f32> = routes
        .attention
        .iter()
        .flat_map(|run| (run.start..run.end).map(move |p| (run.sequence * 1_000_000 + p) as f32))
        .collect();
    Ok(Tensor::from_slice(&ids)
        .f_reshape([-1, 1])?
        .f_to_kind(Kind::Float)?)
}
