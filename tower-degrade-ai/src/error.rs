use std::path::PathBuf;

use crate::FEATURES_KEY;

/// Why the ONNX predictor could not be built or run.
///
/// A missing library or model is reported here, at build of the predictor, never as a panic;
/// the rest of the stack runs without a predictor.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// No ONNX Runtime shared library was found. `tried` lists each place looked at and why it
    /// did not serve.
    LibraryNotFound {
        /// Places looked at, in order, with what was wrong with each.
        tried: Vec<String>,
    },
    /// The library was found but ONNX Runtime refused it (wrong version, not a library).
    Library {
        /// The library file.
        path: PathBuf,
        /// What ONNX Runtime said.
        reason: String,
    },
    /// The model file does not exist or cannot be read.
    ModelNotFound {
        /// The model file.
        path: PathBuf,
    },
    /// ONNX Runtime could not load the model (or the path is a directory).
    Model {
        /// The model file.
        path: PathBuf,
        /// What ONNX Runtime said.
        reason: String,
    },
    /// The model loads but does not take `window [batch, 64, 8]` float32 (and, if it has a
    /// second input, the long baseline `[batch, 5, 8]` it declares in its metadata:
    /// [`crate::baseline`]) and answer `p_anomaly [batch, 1]`.
    Contract {
        /// The model file.
        path: PathBuf,
        /// What differs.
        reason: String,
    },
    /// The model's metadata does not name, in order, the features the predictor feeds
    /// ([`tower_degrade::predict::FEATURES`]), under the key [`FEATURES_KEY`](crate::FEATURES_KEY).
    Features {
        /// The model file.
        path: PathBuf,
        /// The features the predictor feeds, in input order.
        expected: Vec<String>,
        /// The features the model names, in order; `None` when it has no such metadata.
        found: Option<Vec<String>>,
    },
    /// An inference failed, or answered something that is not a probability: NaN, an
    /// infinity, or a value outside 0..=1 (beyond a rounding error of 1e-6): a model that
    /// answers 5.0 is broken, not certain of a failure.
    Inference(String),
    /// A setting of the builder is out of its range (the model is not read).
    Setting {
        /// The setting, as its builder method is named (`threads`).
        setting: &'static str,
        /// What is wrong with the value.
        reason: String,
    },
    /// A recorder could not create or write its CSV files.
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::LibraryNotFound { tried } => {
                write!(
                    f,
                    "ONNX Runtime library not found (install it with `pip install onnxruntime==1.31.1` \
                     or point ORT_DYLIB_PATH at the library file, libonnxruntime.so.1.31.1 in the \
                     wheel's onnxruntime/capi); tried: "
                )?;
                f.write_str(&tried.join("; "))
            }
            Self::Library { path, reason } => {
                write!(f, "ONNX Runtime library {}: {reason}", path.display())
            }
            Self::ModelNotFound { path } => write!(f, "model file {} not found", path.display()),
            Self::Model { path, reason } => write!(f, "model {}: {reason}", path.display()),
            Self::Contract { path, reason } => write!(
                f,
                "model {} does not fit the predictor contract (window [batch, 64, 8] f32 -> \
                 p_anomaly [batch, 1]): {reason}",
                path.display()
            ),
            Self::Features {
                path,
                expected,
                found: Some(found),
            } => write!(
                f,
                "model {} was trained on features [{}] (its `{FEATURES_KEY}` metadata), but the \
                 predictor feeds [{}]",
                path.display(),
                found.join(", "),
                expected.join(", ")
            ),
            Self::Features {
                path,
                expected,
                found: None,
            } => write!(
                f,
                "model {} has no `{FEATURES_KEY}` metadata naming its input features; the \
                 predictor feeds [{}]. A model trained on exactly these, in this order, can be \
                 stamped with `python tower-degrade-ai/training/features.py MODEL.onnx`",
                path.display(),
                expected.join(", ")
            ),
            Self::Inference(reason) => write!(f, "inference failed: {reason}"),
            Self::Setting { setting, reason } => {
                write!(f, "OnnxPredictorBuilder::{setting}: {reason}")
            }
            Self::Io { path, reason } => write!(f, "{}: {reason}", path.display()),
        }
    }
}

impl std::error::Error for Error {}
