//! Finding ONNX Runtime's shared library and holding the one ort environment of the process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use ort::environment::Environment;

use crate::Error;

/// The environment variable naming the library file; it wins over every other lookup.
pub const ORT_DYLIB_PATH: &str = "ORT_DYLIB_PATH";

/// ONNX Runtime allows one environment per process: the first predictor creates it, every
/// later one shares it (or the reason it could not be created).
static ENVIRONMENT: OnceLock<Result<(Environment, PathBuf), Error>> = OnceLock::new();

/// The process's ort environment, loading the library on first use.
pub(crate) fn environment() -> Result<&'static Environment, Error> {
    ENVIRONMENT
        .get_or_init(|| {
            let path = locate_library()?;
            let builder = ort::init_from(&path).map_err(|e| Error::Library {
                path: path.clone(),
                reason: load_reason(&e),
            })?;
            // ONNX Runtime's own lines (a kernel's error, written before the error comes back
            // to us) go to `tracing` at debug, not to stderr: a failing batch is said by the
            // predictor once, and a model failing at every tick wrote a line at every tick.
            let env = builder
                .with_name("tower-degrade")
                .with_telemetry(false)
                .with_logger(std::sync::Arc::new(
                    |level: ort::logging::LogLevel,
                     category: &str,
                     _id: &str,
                     at: &str,
                     message: &str| {
                        // Escaped: a model's node names are in them.
                        tracing::debug!(
                            target: "tower_degrade_ai::onnxruntime",
                            ?level, category, at, "{}", message.escape_debug()
                        );
                    },
                ))
                .build()
                .map_err(|e| Error::Library {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            // A custom logger is given every line from verbose up: only warnings and errors.
            env.set_log_level(ort::logging::LogLevel::Warning);
            tracing::info!(library = %path.display(), "ONNX Runtime loaded");
            Ok((env, path))
        })
        .as_ref()
        .map(|(env, _)| env)
        .map_err(Clone::clone)
}

/// The library the process loaded, once a predictor has been built.
pub fn loaded_library() -> Option<&'static Path> {
    match ENVIRONMENT.get() {
        Some(Ok((_, path))) => Some(path),
        _ => None,
    }
}

/// Where the ONNX Runtime library is: `ORT_DYLIB_PATH`, else the path found when this crate was
/// built, else the `onnxruntime` Python package of the `python3` on `PATH`.
///
/// Each place is checked for an existing file before ort sees it, so a missing library is
/// reported as [`Error::LibraryNotFound`] listing what was tried.
pub fn locate_library() -> Result<PathBuf, Error> {
    locate_with(std::env::var_os(ORT_DYLIB_PATH))
}

/// Why the library did not load, with the loader's own reason: ort's message ends at the
/// dynamic loader's "dlopen failed", which keeps the why ("invalid ELF header", a missing
/// dependency) as its source.
fn load_reason(e: &ort::LoadDynamicError) -> String {
    let mut reason = e.to_string();
    if let ort::LoadDynamicError::Dlopen { error, .. } = e {
        let mut source = std::error::Error::source(error);
        while let Some(s) = source {
            reason.push_str(": ");
            reason.push_str(&s.to_string());
            source = s.source();
        }
    }
    reason
}

/// [`locate_library`] with `explicit` as the value of `ORT_DYLIB_PATH`.
fn locate_with(explicit: Option<std::ffi::OsString>) -> Result<PathBuf, Error> {
    let mut tried = Vec::new();
    // Set but empty is not set (as a shell's `ORT_DYLIB_PATH= cmd` leaves it).
    let set_empty = explicit.as_ref().is_some_and(|p| p.is_empty());
    if let Some(path) = explicit.filter(|p| !p.is_empty()) {
        // A relative path is the current directory's, made absolute here: handed on as it is,
        // ort would look for it next to the executable first and the dynamic loader (for a
        // bare name) on its search path, so the file checked and the file loaded could differ.
        let path = std::path::absolute(&path).unwrap_or_else(|_| PathBuf::from(path));
        if path.is_file() {
            return Ok(path);
        }
        // An explicit path that is wrong is an error, not a cue to look elsewhere.
        let why = if path.is_dir() {
            "a directory: name the library file in it"
        } else {
            "no such file"
        };
        tried.push(format!("{ORT_DYLIB_PATH}={} ({why})", path.display()));
        return Err(Error::LibraryNotFound { tried });
    }
    tried.push(if set_empty {
        format!("{ORT_DYLIB_PATH} (set, but empty: taken as not set)")
    } else {
        format!("{ORT_DYLIB_PATH} (not set)")
    });
    match option_env!("TOWER_DEGRADE_AI_ORT_BUILD_PATH") {
        Some(path) if Path::new(path).is_file() => return Ok(PathBuf::from(path)),
        Some(path) => tried.push(format!("{path} (found at build time, now gone)")),
        None => tried.push("no library found at build time".into()),
    }
    match python_package_dir() {
        Ok(dir) => {
            let capi = dir.join("capi");
            match library_in(&capi) {
                Some(path) => return Ok(path),
                None => tried.push(format!("{} (no libonnxruntime.so*)", capi.display())),
            }
        }
        Err(why) => tried.push(format!("python3 -c 'import onnxruntime' ({why})")),
    }
    Err(Error::LibraryNotFound { tried })
}

fn python_package_dir() -> Result<PathBuf, String> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))",
        ])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(err.lines().last().unwrap_or("failed").trim().to_owned());
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The wheel ships only a versioned file (`libonnxruntime.so.1.31.1`), no unversioned link.
fn library_in(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("libonnxruntime.so")
                    || (n.starts_with("libonnxruntime.") && n.ends_with(".dylib"))
            })
        })
        .collect();
    found.sort();
    found.pop()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_versioned_library_only_among_the_wheels_files() {
        let dir = std::env::temp_dir().join(format!("tdai-capi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for name in [
            "libonnxruntime_providers_shared.so",
            "onnxruntime_pybind11_state.so",
        ] {
            std::fs::write(dir.join(name), b"").unwrap();
        }
        assert_eq!(library_in(&dir), None);
        std::fs::write(dir.join("libonnxruntime.so.1.31.1"), b"").unwrap();
        assert_eq!(library_in(&dir), Some(dir.join("libonnxruntime.so.1.31.1")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_that_is_not_a_library_says_why_the_loader_refused_it() {
        let path =
            std::env::temp_dir().join(format!("tdai-not-a-library-{}.so", std::process::id()));
        std::fs::write(&path, b"not a shared object\n").unwrap();
        let err = ort::init_from(&path)
            .err()
            .expect("a text file is not a library");
        let reason = load_reason(&err);
        std::fs::remove_file(&path).unwrap();
        // "dlopen failed: <path>: invalid ELF header" (glibc), or whatever the loader says
        let (_, why) = reason.split_once("dlopen failed: ").expect(&reason);
        assert!(!why.trim().is_empty(), "{reason}");
    }

    #[test]
    fn an_explicit_path_is_checked_and_an_empty_one_is_not_set() {
        let dir = std::env::temp_dir();
        let err = locate_with(Some(dir.clone().into_os_string())).unwrap_err();
        assert!(
            err.to_string()
                .contains("(a directory: name the library file in it)"),
            "{err}"
        );
        let missing = dir.join("no-such-libonnxruntime.so");
        let err = locate_with(Some(missing.into_os_string())).unwrap_err();
        assert!(err.to_string().contains("(no such file)"), "{err}");
        // Relative: the current directory's, absolute (what is checked is what is loaded).
        // (Cargo runs a crate's tests in its directory, where its manifest is: a file there.)
        let here = std::env::current_dir().unwrap();
        let found = locate_with(Some("Cargo.toml".into())).unwrap();
        assert_eq!(found, here.join("Cargo.toml"));
        assert!(found.is_absolute());
        // Empty: looked for elsewhere, as if not set.
        match locate_with(Some(std::ffi::OsString::new())) {
            Ok(path) => assert!(path.is_file()),
            Err(err) => assert!(
                err.to_string()
                    .contains("ORT_DYLIB_PATH (set, but empty: taken as not set)"),
                "{err}"
            ),
        }
    }
}
