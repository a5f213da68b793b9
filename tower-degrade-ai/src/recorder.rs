//! [`Recorder`]: dumps every tick's features per class to CSV, the format the evaluation
//! harness reads, so traces of a running service under fault injection can be evaluated and
//! trained on.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tower_degrade::BoxError;
use tower_degrade::predict::{FEATURES, N_FEATURES, Predictor, WINDOW};

use crate::Error;

/// Marks the ticks during which a fault is injected into one class: the `fault` column of its
/// CSV. Clone it into whatever injects the fault.
///
/// The column documents the experiment; the harness does not use it as the label. What a
/// predictor must foresee is the SLO breach, which the harness finds in the features (an
/// injected fault may never breach, or breach long after it starts).
#[derive(Debug, Clone, Default)]
pub struct Fault(Arc<AtomicBool>);

impl Fault {
    /// From the next tick on, rows are marked `on`.
    pub fn set(&self, on: bool) {
        self.0.store(on, Ordering::Relaxed);
    }

    /// Whether the fault is marked.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A [`Predictor`] that writes each tick's newest features per class to `<dir>/<class>.csv`,
/// optionally wrapping the predictor that really decides (its probability is recorded too).
/// In file names, a class name's characters other than ASCII letters, digits, `-` and `_`
/// become `_`; two classes that would share a file (`pay.ment`, `pay_ment`) are refused at
/// warm-up, naming both.
///
/// Columns: `time_s`, the eight [`FEATURES`], `p_anomaly`, `fault`. The evaluation harness
/// (`tower-degrade-ai/training/evaluate.py --traces DIR`) reads a directory of such files.
///
/// ```no_run
/// use std::time::Duration;
/// use tower_degrade::{ClassConfig, Degrader, predict::PredictorConfig};
/// use tower_degrade_ai::Recorder;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut recorder = Recorder::new("traces/run-1", Duration::from_millis(500))?;
/// let fault = recorder.fault("payment");
/// let degrader = Degrader::builder("shop")
///     .class(ClassConfig::gold("payment"))
///     .predictor(recorder, PredictorConfig::default())
///     .build()?;
/// fault.set(true); // while a fault is injected into `payment`
/// # Ok(()) }
/// ```
pub struct Recorder {
    dir: PathBuf,
    tick: Duration,
    faults: Vec<(String, Fault)>,
    inner: Option<Box<dyn Predictor>>,
    files: Vec<(PathBuf, BufWriter<File>, Option<Fault>)>,
    step: u64,
    /// A write failed and has been logged; cleared (and said) when one succeeds again.
    failing: bool,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("dir", &self.dir)
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    /// Records into `dir` (created if missing); `tick` is the control loop's interval, for
    /// the `time_s` column.
    pub fn new(dir: impl Into<PathBuf>, tick: Duration) -> Result<Self, Error> {
        let dir = dir.into();
        if dir.as_os_str().is_empty() {
            // Else the working directory, which nobody named.
            return Err(Error::Io {
                path: dir,
                reason: "an empty path: name the directory to record into (`.` for the \
                         working directory)"
                    .to_owned(),
            });
        }
        std::fs::create_dir_all(&dir).map_err(|e| Error::Io {
            path: dir.clone(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            dir,
            tick,
            faults: Vec::new(),
            inner: None,
            files: Vec::new(),
            step: 0,
            failing: false,
        })
    }

    /// Also run `inner`, whose probabilities reach the breaker and the `p_anomaly` column. A
    /// tick the recording cannot be written (a full disk) still answers `inner`'s
    /// probabilities: the failure is logged once, and again when writing resumes.
    pub fn wrap(mut self, inner: impl Predictor) -> Self {
        self.inner = Some(Box::new(inner));
        self
    }

    /// The handle that marks faults injected into `class` (the `fault` column of its file).
    pub fn fault(&mut self, class: &str) -> Fault {
        if let Some((_, f)) = self.faults.iter().find(|(c, _)| c == class) {
            return f.clone();
        }
        let f = Fault::default();
        self.faults.push((class.to_owned(), f.clone()));
        f
    }

    fn write_rows(&mut self, input: &[f32], out: &[f32]) -> Result<(), Error> {
        // Counted whether or not the rows are written: after a failed tick, `time_s` is
        // still the tick's own.
        let time = self.tick.as_secs_f64() * self.step as f64;
        self.step += 1;
        for (class, (path, file, fault)) in self.files.iter_mut().enumerate() {
            let fault = u8::from(fault.as_ref().is_some_and(Fault::get));
            let newest = (class * WINDOW + WINDOW - 1) * N_FEATURES;
            let io = |e: std::io::Error| Error::Io {
                path: path.clone(),
                reason: e.to_string(),
            };
            write!(file, "{time:.3}").map_err(io)?;
            for v in &input[newest..newest + N_FEATURES] {
                write!(file, ",{v}").map_err(io)?;
            }
            writeln!(file, ",{},{fault}", out[class]).map_err(io)?;
            file.flush().map_err(io)?;
        }
        Ok(())
    }
}

/// A class name as a file name: anything but ASCII letters, digits, `-` and `_` becomes `_`.
fn file_name(class: &str) -> String {
    class
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn create(dir: &Path, class: &str) -> Result<(PathBuf, BufWriter<File>, Option<Fault>), Error> {
    let path = dir.join(format!("{}.csv", file_name(class)));
    let io = |e: std::io::Error| Error::Io {
        path: path.clone(),
        reason: e.to_string(),
    };
    let mut file = BufWriter::new(File::create(&path).map_err(io)?);
    writeln!(file, "time_s,{},p_anomaly,fault", FEATURES.join(",")).map_err(io)?;
    Ok((path, file, None))
}

impl Predictor for Recorder {
    fn predict(&mut self, input: &[f32], out: &mut [f32]) -> Result<(), BoxError> {
        match &mut self.inner {
            Some(inner) => inner.predict(input, out)?,
            None => out.fill(0.0),
        }
        // The recording serves the predictor, not the other way round: a trace that cannot
        // be written does not take early warning away.
        match self.write_rows(input, out) {
            Ok(()) if self.failing => {
                self.failing = false;
                tracing::info!(dir = %self.dir.display(), "recording resumed");
            }
            Ok(()) => {}
            Err(e) if !self.failing => {
                self.failing = true;
                tracing::warn!(error = %e,
                    "a tick's features cannot be recorded; predictions go on (said once until a \
                     write succeeds)");
            }
            Err(_) => {}
        }
        Ok(())
    }

    fn warm_up(&mut self, classes: &[&str]) -> Result<(), BoxError> {
        // `file_name` is not one-to-one (`a.b`, `a:b` and `a_b` are all `a_b`): two classes
        // in one file would interleave their rows.
        for (i, a) in classes.iter().enumerate() {
            if let Some(b) = classes[..i].iter().find(|b| file_name(b) == file_name(a)) {
                return Err(Error::Io {
                    path: self.dir.join(format!("{}.csv", file_name(a))),
                    reason: format!(
                        "classes `{b}` and `{a}` would both be recorded in this file: rename one"
                    ),
                }
                .into());
            }
        }
        self.files = classes
            .iter()
            .map(|c| create(&self.dir, c))
            .collect::<Result<_, _>>()?;
        for (class, (_, _, fault)) in classes.iter().zip(&mut self.files) {
            *fault = self
                .faults
                .iter()
                .find(|(c, _)| c == class)
                .map(|(_, f)| f.clone());
        }
        if let Some(inner) = &mut self.inner {
            inner.warm_up(classes)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers 0.25 for every class.
    struct Quarter;

    impl Predictor for Quarter {
        fn predict(&mut self, _input: &[f32], out: &mut [f32]) -> Result<(), BoxError> {
            out.fill(0.25);
            Ok(())
        }
    }

    #[test]
    fn writes_each_ticks_newest_features_per_class_with_the_fault_mark() {
        let dir = std::env::temp_dir().join(format!("tdai-rec-{}", std::process::id()));
        let mut rec = Recorder::new(&dir, Duration::from_millis(500)).unwrap();
        let fault = rec.fault("b");
        let mut rec = rec.wrap(Quarter);
        rec.warm_up(&["a", "b"]).unwrap();
        let mut input = vec![0.0f32; 2 * WINDOW * N_FEATURES];
        let newest = |class: usize| (class * WINDOW + WINDOW - 1) * N_FEATURES;
        for f in 0..N_FEATURES {
            input[newest(0) + f] = f as f32;
            input[newest(1) + f] = 10.0 + f as f32;
        }
        // an older tick's values must not be written
        input[newest(0) - 1] = 99.0;
        let mut out = [0.0; 2];
        rec.predict(&input, &mut out).unwrap();
        fault.set(true);
        rec.predict(&input, &mut out).unwrap();
        assert_eq!(out, [0.25, 0.25]);

        let a = std::fs::read_to_string(dir.join("a.csv")).unwrap();
        let b = std::fs::read_to_string(dir.join("b.csv")).unwrap();
        let header = format!("time_s,{},p_anomaly,fault", FEATURES.join(","));
        assert_eq!(
            a.lines().collect::<Vec<_>>(),
            [
                header.as_str(),
                "0.000,0,1,2,3,4,5,6,7,0.25,0",
                "0.500,0,1,2,3,4,5,6,7,0.25,0"
            ]
        );
        assert_eq!(
            b.lines().skip(1).collect::<Vec<_>>(),
            [
                "0.000,10,11,12,13,14,15,16,17,0.25,0",
                "0.500,10,11,12,13,14,15,16,17,0.25,1"
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unwritable_directory_is_an_error_naming_it() {
        let file = std::env::temp_dir().join(format!("tdai-file-{}", std::process::id()));
        std::fs::write(&file, b"").unwrap();
        let err = Recorder::new(file.join("sub"), Duration::from_millis(500)).unwrap_err();
        assert!(
            matches!(&err, Error::Io { path, .. } if path == &file.join("sub")),
            "{err}"
        );
        std::fs::remove_file(&file).unwrap();
        let err = Recorder::new("", Duration::from_millis(500)).unwrap_err();
        assert!(err.to_string().contains("an empty path"), "{err}");
    }

    #[test]
    fn two_classes_of_one_file_name_are_refused_naming_both() {
        let dir = std::env::temp_dir().join(format!("tdai-rec-same-{}", std::process::id()));
        let mut rec = Recorder::new(&dir, Duration::from_millis(500)).unwrap();
        let err = rec.warm_up(&["pay.ment", "stock", "pay_ment"]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("pay_ment.csv") && text.contains("`pay.ment` and `pay_ment`"),
            "{text}"
        );
        rec.warm_up(&["pay.ment", "stock"]).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_tick_that_cannot_be_recorded_still_answers_the_wrapped_predictor() {
        let dir = std::env::temp_dir().join(format!("tdai-rec-full-{}", std::process::id()));
        let mut rec = Recorder::new(&dir, Duration::from_millis(500))
            .unwrap()
            .wrap(Quarter);
        // Every write to the class's file fails: a full disk.
        std::os::unix::fs::symlink("/dev/full", dir.join("a.csv")).unwrap();
        // The header is buffered; the first row's flush fails.
        rec.warm_up(&["b", "a"]).unwrap();
        let input = vec![0.0f32; 2 * WINDOW * N_FEATURES];
        for _ in 0..3 {
            let mut out = [0.0; 2];
            rec.predict(&input, &mut out).unwrap();
            assert_eq!(out, [0.25, 0.25]);
        }
        assert!(rec.failing);
        // The class whose file can be written keeps each tick's own time.
        let b = std::fs::read_to_string(dir.join("b.csv")).unwrap();
        let times: Vec<&str> = b.lines().skip(1).map(|l| &l[..5]).collect();
        assert_eq!(times, ["0.000", "0.500", "1.000"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn class_names_become_safe_file_names() {
        assert_eq!(file_name("pay/ment v2"), "pay_ment_v2");
        assert_eq!(file_name("../etc"), "___etc");
    }
}
