//! Why a batch cannot be planned, for every strategy and the toolkit they
//! share.

/// Why a batch cannot be planned.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanningError {
    #[error(
        "model {model} does not fit on {world} GPUs: its sharded states leave no memory for activations"
    )]
    ModelDoesNotFit { model: String, world: u32 },
    #[error(
        "sequence {id} of {length} tokens cannot fit even on the whole cluster ({world} GPUs hold at most {capacity} tokens of {model})"
    )]
    SequenceTooLong {
        id: usize,
        length: u64,
        world: u32,
        capacity: u64,
        model: String,
    },
    #[error("the {strategy} solver failed: {reason}")]
    Solver { strategy: String, reason: String },
    #[error(
        "the {strategy} strategy cannot keep to {limit} (only {supported} can); leave it unset or choose another strategy"
    )]
    UnsupportedLimit {
        strategy: &'static str,
        limit: &'static str,
        supported: &'static str,
    },
    #[error(
        "{what} of {length} tokens needs at least {needs} ranks of {capacity} tokens, but {limit} allows {degree}"
    )]
    DegreeTooSmall {
        /// `sequence 3`, or the context length.
        what: String,
        length: u64,
        needs: u32,
        capacity: u64,
        limit: &'static str,
        degree: u32,
    },
    #[error(
        "hdp-offload plans offloading activations to host memory, which this executor does not do; hdp plans the same without offloading"
    )]
    OffloadUnsupported,
    #[error("{CP_DEGREE} {degree} must not be greater than {MAX_CP_DEGREE} {most}")]
    DegreeOverCap { degree: u32, most: u32 },
    #[error("{limit} {degree} is more ranks than the {world} there are")]
    DegreeTooLarge {
        limit: &'static str,
        degree: u32,
        world: u32,
    },
}

/// The limit names, as the TrainingJob and the command lines spell them.
pub const CP_DEGREE: &str = "parallelism.cpDegree (--cp-degree)";
pub const MAX_CP_DEGREE: &str = "parallelism.maxCpDegree (--max-cp-degree)";

impl PlanningError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        match self {
            PlanningError::ModelDoesNotFit { .. } | PlanningError::SequenceTooLong { .. } => {
                "capacity"
            }
            PlanningError::Solver { .. } => "solver",
            PlanningError::UnsupportedLimit { .. }
            | PlanningError::DegreeTooSmall { .. }
            | PlanningError::DegreeTooLarge { .. }
            | PlanningError::DegreeOverCap { .. }
            | PlanningError::OffloadUnsupported => "limits",
        }
    }
}
