//! The interface through which the policy engine, the predictor (and, next, the adaptive
//! concurrency limit) plug into the tick.

use std::sync::Arc;

use crate::breaker::State;
use crate::class::ClassId;
use crate::classify::RequestView;
use crate::gate::Packed;
use crate::window::History;

/// One stage of the control loop. Every method has a do-nothing default, and `()` is the stage
/// that does nothing (as tower-http's `impl OnFailure for ()`), so a feature that is compiled
/// out is a `()` stage rather than a `#[cfg]` in the loop.
///
/// The loop calls, each tick: [`observe`](Self::observe) once, after every class's window was
/// read and before the breakers step; then [`decide`](Self::decide) with every class's
/// directive so far (a class under a manual command keeps its own: `ClassTick::manual`). The data path calls
/// [`per_request`](Self::per_request) only for a class whose published directive carries the
/// per-request bit.
pub(crate) trait Stage: Send + Sync {
    /// Work over every class at once (one batched model run).
    fn observe(&self, _batch: &mut Batch<'_>) {}

    /// The directives to publish, given the ones so far (indexed by class), for the classes
    /// in `classes`.
    fn decide(&self, _classes: &[ClassTick], _directives: &mut [Packed]) {}

    /// The directive for one request of a class with per-request rules.
    fn per_request(&self, _class: usize, directive: Packed, _req: &RequestView<'_>) -> Packed {
        directive.with_overlay(false)
    }
}

impl Stage for () {}

/// What [`Stage::observe`] sees of a tick: every class's features, and a per-class signal the
/// breakers read.
pub(crate) struct Batch<'a> {
    /// Number of classes, in registry order.
    pub(crate) classes: usize,
    /// Write class `i`'s `[WINDOW, N_FEATURES]` feature block into the slice.
    pub(crate) features: &'a dyn Fn(usize, &mut [f32]),
    /// Per class, the failure predictor's probability for this tick.
    pub(crate) predictions: &'a mut [Option<f64>],
}

/// What [`Stage::decide`] sees of one class.
// Read by the stages that exist; with every optional one compiled out, nobody reads it.
#[cfg_attr(not(feature = "rhai"), allow(dead_code))]
#[derive(Debug, Clone)]
pub(crate) struct ClassTick {
    pub(crate) id: ClassId,
    pub(crate) history: Arc<History>,
    pub(crate) state: State,
    pub(crate) prediction: Option<f64>,
    /// The class's admission limiter after this tick's update, if admission is on.
    pub(crate) admission: Option<crate::admit::LimiterState>,
    /// Under a manual command, which beats every stage: its policies run (their alerts are
    /// raised, their errors counted) but their decisions are not applied.
    pub(crate) manual: bool,
}
