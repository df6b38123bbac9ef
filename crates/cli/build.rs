//! Build script of the `npsflow` binary: captures the git revision for the `revision` label
//! of `npsflow_build_info` (`unknown` outside a git checkout or without git). It runs again
//! only when HEAD or the branch it points to moves, and only this small crate is rebuilt.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}

fn main() {
    let revision = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=NPSFLOW_GIT_REVISION={revision}");
    // Rerun when HEAD moves (checkout, commit) or the branch's ref does; never for other
    // files (without any rerun-if-changed cargo would rerun on every change in the crate).
    println!("cargo:rerun-if-changed=build.rs");
    let path = |args: &[&str]| git(args).map(|p| Path::new(&p).to_path_buf());
    if let Some(head) = path(&["rev-parse", "--path-format=absolute", "--git-path", "HEAD"]) {
        println!("cargo:rerun-if-changed={}", head.display());
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        if let Some(reference) =
            path(&["rev-parse", "--path-format=absolute", "--git-path", &branch])
        {
            println!("cargo:rerun-if-changed={}", reference.display());
        }
        if let Some(packed) = path(&[
            "rev-parse",
            "--path-format=absolute",
            "--git-path",
            "packed-refs",
        ]) {
            println!("cargo:rerun-if-changed={}", packed.display());
        }
    }
}
