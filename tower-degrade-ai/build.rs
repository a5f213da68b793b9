//! Finds ONNX Runtime's shared library inside the `onnxruntime` Python wheel at build time, so
//! a binary built on a machine with the wheel installed finds the library without
//! `ORT_DYLIB_PATH`. Nothing is downloaded; when no wheel is found nothing is recorded and the
//! lookup happens at run time instead.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=ORT_DYLIB_PATH");
    println!("cargo:rerun-if-env-changed=PATH");
    println!("cargo:rerun-if-env-changed=VIRTUAL_ENV");
    let Ok(out) = Command::new("python3")
        .args([
            "-c",
            "import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))",
        ])
        .output()
    else {
        return;
    };
    if !out.status.success() {
        return;
    }
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let capi = Path::new(&dir).join("capi");
    let Ok(entries) = std::fs::read_dir(&capi) else {
        return;
    };
    let mut found: Vec<_> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.starts_with("libonnxruntime.so")
                || n.starts_with("libonnxruntime.") && n.ends_with(".dylib")
        })
        .collect();
    found.sort();
    if let Some(name) = found.last() {
        println!(
            "cargo:rustc-env=TOWER_DEGRADE_AI_ORT_BUILD_PATH={}",
            capi.join(name).display()
        );
    }
}
