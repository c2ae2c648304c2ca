//! Parameter gradients handed out while the backward is still running, so that a data-parallel
//! trainer can start reducing them before it ends.
//!
//! With layer recomputation each block of the model (a layer's Mamba block; a layer's use of the
//! shared attention block with its `hybrid_linear`) is one autodiff node whose backward computes
//! the gradients of the block's parameters at once. While a [`GradientSink`] is installed on the
//! thread that runs the backward, each such backward hands the sink every parameter gradient it
//! computed (flattened; `None` for a parameter that got none). For a parameter that only this
//! block uses, that is the parameter's whole gradient for this backward; the shared block's
//! parameters get one part from each hybrid layer, and their gradient is the sum of the parts
//! (see [`ZambaModel::gradients_final_in_backward`]). The embedding (the lookup and the tied head)
//! and the final norm are outside every block: their gradients are final only when the backward
//! ends.

use std::cell::RefCell;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::Tensor;

use crate::ZambaModel;
use crate::exec::ActivationCheckpointing;

/// Receives `(parameter, flattened gradient)` as blocks' backwards compute them.
pub type GradientSink = Box<dyn FnMut(ParamId, Option<Tensor<1>>)>;

thread_local! {
    static SINK: RefCell<Option<GradientSink>> = const { RefCell::new(None) };
}

/// The installed sink of this thread; uninstalled when dropped.
#[must_use = "the sink is uninstalled when the guard drops"]
pub struct SinkGuard {
    _thread_bound: std::marker::PhantomData<*const ()>,
}

/// Installs `sink` on this thread until the guard drops.
///
/// # Panics
/// If this thread already has a sink.
pub fn install_gradient_sink(sink: GradientSink) -> SinkGuard {
    SINK.with_borrow_mut(|slot| {
        assert!(slot.is_none(), "a gradient sink is already installed");
        *slot = Some(sink);
    });
    SinkGuard {
        _thread_bound: std::marker::PhantomData,
    }
}

impl Drop for SinkGuard {
    fn drop(&mut self) {
        SINK.with_borrow_mut(|slot| *slot = None);
    }
}

/// Hands `grad` (of `param`) to this thread's sink, if it has one.
pub(crate) fn deliver<const D: usize>(param: ParamId, grad: Option<&Tensor<D>>) {
    SINK.with_borrow_mut(|slot| {
        if let Some(sink) = slot {
            let flat = grad.map(|g| {
                let numel = g.shape().num_elements();
                g.clone().reshape([numel])
            });
            sink(param, flat);
        }
    });
}

/// Ids of every float parameter of `module`, in visiting order.
fn param_ids(module: &impl Module) -> Vec<ParamId> {
    struct Ids(Vec<ParamId>);
    impl ModuleVisitor for Ids {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.push(param.id);
        }
    }
    let mut ids = Ids(Vec::new());
    module.visit(&mut ids);
    ids.0
}

impl ZambaModel {
    /// Parameters in the order the backward finishes their gradients, as far as the model
    /// knows it: layer by layer from the last, in each layer the Mamba block's (its norm and
    /// mixer), then `hybrid_linear` (the shared block's use, which comes before the Mamba block
    /// in the forward), and after the first hybrid layer's the shared block's (its last use in
    /// the backward). The embedding and the final norm are not in it.
    pub fn gradient_order(&self) -> Vec<ParamId> {
        let first_hybrid = self.layers.iter().position(|l| l.hybrid_linear.is_some());
        let mut order = Vec::new();
        for (i, layer) in self.layers.iter().enumerate().rev() {
            order.extend(param_ids(&layer.input_layernorm));
            order.extend(param_ids(&layer.mamba));
            if let Some(linear) = &layer.hybrid_linear {
                order.extend(param_ids(linear));
            }
            if Some(i) == first_hybrid {
                order.extend(param_ids(&self.shared));
            }
        }
        order
    }

    /// The parameters whose gradient the blocks' backwards hand to a [`GradientSink`] in full,
    /// each with the number of blocks that hand out a part of it (the gradient is their sum,
    /// added in the order they come, as autodiff adds them): with layer recomputation, every
    /// layer's own parameters (1) and the shared block's (one per hybrid layer); none otherwise.
    pub fn gradients_final_in_backward(&self) -> Vec<(ParamId, usize)> {
        if self.execution.checkpointing != ActivationCheckpointing::Layers {
            return Vec::new();
        }
        let uses = self
            .layers
            .iter()
            .filter(|l| l.hybrid_linear.is_some())
            .count();
        let shared = param_ids(&self.shared);
        self.gradient_order()
            .into_iter()
            .map(|id| (id, if shared.contains(&id) { uses } else { 1 }))
            .collect()
    }
}
