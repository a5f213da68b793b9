//! The failure predictor beside the protected run (feature `predictor`): the bundled model, or
//! the configured file, attached with the library's defaults.
//!
//! By default the predictor's threshold calibrates per class over its first 30 minutes, in
//! which it only reports. A storm of a minute is all warm-up, so the predictor acts on nothing
//! here: the report scores what it reported against `[predictor] alarm_at` (the seed's 0.87,
//! 2 ticks in a row) beside what the reactive rules did in the same run.

use tower_degrade::DegraderBuilder;

use crate::config::Config;

/// Whether the configured predictor loads, checked before the storm: a build with the
/// predictor that cannot run it (no ONNX Runtime, a file that is not a model) is refused
/// then, not reported after both runs. A build without it says nothing: its `[predictor]`
/// is read and left out of the run (the report says why).
pub(crate) fn check(config: &Config) -> Result<(), String> {
    let Some(_section) = &config.predictor else {
        return Ok(());
    };
    #[cfg(feature = "predictor")]
    {
        use tower_degrade_ai::OnnxPredictor;
        let model = if _section.model == "bundled" {
            OnnxPredictor::bundled()
        } else {
            OnnxPredictor::load(&_section.model)
        };
        model
            .map(drop)
            .map_err(|e| config.file.error("predictor.model", e).to_string())
    }
    #[cfg(not(feature = "predictor"))]
    Ok(())
}

/// `b` with the predictor attached, and what was attached, or why nothing was.
pub(crate) fn attach(
    config: &Config,
    b: DegraderBuilder,
) -> (DegraderBuilder, Result<String, String>) {
    let Some(section) = &config.predictor else {
        return (b, Err("no [predictor] in the configuration".into()));
    };
    #[cfg(feature = "predictor")]
    {
        use tower_degrade::predict::PredictorConfig;
        use tower_degrade_ai::OnnxPredictor;

        let model = if section.model == "bundled" {
            OnnxPredictor::bundled()
        } else {
            OnnxPredictor::load(&section.model)
        };
        match model {
            Ok(m) => {
                let what = format!(
                    "{} model (on the {}), alarm at p >= {} for 2 ticks",
                    section.model,
                    format!("{:?}", m.device()).to_lowercase(),
                    section.alarm_at
                );
                (b.predictor(m, PredictorConfig::default()), Ok(what))
            }
            Err(e) => (b, Err(format!("the predictor did not load: {e}"))),
        }
    }
    #[cfg(not(feature = "predictor"))]
    {
        let _ = section;
        (
            b,
            Err("not in this build: run the example with `--features predictor`".into()),
        )
    }
}
