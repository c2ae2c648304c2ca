//! Today's unfused ops on the Cube path, as the chains of Burn tensor ops they are written as
//! (`zamba_kernels`' `*_reference` compositions, differentiated by Burn's autodiff).

/// One direction of an op written as Burn tensor ops: each op one kernel reading its operands
/// and writing its result. `volumes`: tensors of the op's main shape read + written.
pub(super) struct Passes {
    pub(super) volumes: f64,
    pub(super) kernels: f64,
}

/// An op of today's Cube path, forward and backward (autodiff of the same ops).
pub(super) struct Unfused {
    pub(super) forward: Passes,
    pub(super) backward: Passes,
}

impl Unfused {
    /// `(volumes, kernels)` of `forwards` forwards and one backward.
    pub(super) fn per_step(&self, forwards: f64) -> (f64, f64) {
        (
            forwards * self.forward.volumes + self.backward.volumes,
            forwards * self.forward.kernels + self.backward.kernels,
        )
    }
}

/// `log_softmax` (max, subtract, exp, sum, log, subtract: 8 volumes) and the target pick; backward:
/// the pick's scatter into zeros (2), the sums' broadcasts and the exp's gradient (8).
pub(super) const UNFUSED_CROSS_ENTROPY: Unfused = Unfused {
    forward: Passes {
        volumes: 8.0,
        kernels: 6.0,
    },
    backward: Passes {
        volumes: 10.0,
        kernels: 7.0,
    },
};

/// AdamW per tensor as 16 Burn ops on f32 (36 volumes of the tensor), no backward.
pub(super) const UNFUSED_ADAMW: Unfused = Unfused {
    forward: Passes {
        volumes: 36.0,
        kernels: 16.0,
    },
    backward: Passes {
        volumes: 0.0,
        kernels: 0.0,
    },
};
