//! Issue 14 item 9: the Debian package (`scripts/build-deb.sh`, cargo-deb) holds the binary,
//! the systemd units, `/etc/hyrelay/*.toml` as conffiles, the completions and the man
//! pages, and its binary runs. Built from the debug binary `cargo test` already made
//! (`--profile dev --no-build --fast`), so the test compiles nothing.

use std::path::Path;
use std::process::Command;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn debian_package_contents() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The target directory of this build (target/ or $CARGO_TARGET_DIR).
    let target = Path::new(env!("CARGO_BIN_EXE_hyrelay"))
        .parent()
        .unwrap()
        .parent()
        .unwrap();
    let out = tempfile::tempdir().unwrap();
    let have_cargo_deb = Command::new("cargo").args(["deb", "--version"]).output();
    assert!(
        have_cargo_deb.is_ok_and(|o| o.status.success()),
        "cargo-deb is missing: run scripts/setup-cargo-tools.sh"
    );
    run(Command::new(root.join("scripts/build-deb.sh"))
        .args(["--profile", "dev", "--no-build", "--fast", "--out"])
        .arg(out.path())
        .env("CARGO_TARGET_DIR", target));
    let deb = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("a .deb was written");

    let listing = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    let mode_of = |path: &str| {
        listing
            .lines()
            .find(|l| l.ends_with(&format!(" ./{path}")))
            .map(|l| l.split_whitespace().next().unwrap().to_owned())
            .unwrap_or_else(|| panic!("{path} not in the package:\n{listing}"))
    };
    assert_eq!(mode_of("usr/bin/hyrelay"), "-rwxr-xr-x");
    for f in [
        "usr/lib/systemd/system/hyrelay-relay.service",
        "usr/lib/systemd/system/hyrelay-hcm.service",
        "usr/lib/systemd/system/hyrelay-bridge.service",
        "etc/hyrelay/relay.toml",
        "etc/hyrelay/hcm.toml",
        "etc/hyrelay/bridge.toml",
        "usr/share/bash-completion/completions/hyrelay",
        "usr/share/zsh/vendor-completions/_hyrelay",
        "usr/share/fish/vendor_completions.d/hyrelay.fish",
        "usr/share/man/man1/hyrelay.1.gz",
        "usr/share/man/man1/hyrelay-hcm-add.1.gz",
        "usr/share/doc/hyrelay/README.md",
    ] {
        assert_eq!(mode_of(f), "-rw-r--r--", "{f}");
    }

    let info = run(Command::new("dpkg-deb").arg("-I").arg(&deb));
    for needle in [
        "Package: hyrelay",
        "Version: 0.1.0",
        "Section: net",
        "Depends: libc6",
        "conffiles",
    ] {
        assert!(info.contains(needle), "{needle:?} not in:\n{info}");
    }
    let package = run(Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Package"));
    assert_eq!(package.trim(), "hyrelay");
    let ctrl = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(ctrl.path()));
    let conffiles = std::fs::read_to_string(ctrl.path().join("conffiles")).unwrap();
    let mut listed: Vec<&str> = conffiles.lines().collect();
    listed.sort();
    assert_eq!(
        listed,
        [
            "/etc/hyrelay/bridge.toml",
            "/etc/hyrelay/hcm.toml",
            "/etc/hyrelay/relay.toml"
        ]
    );

    // What is inside works: the binary runs, the units call it by name, the completion is
    // for this binary's commands.
    let tree = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(tree.path()));
    let version = run(Command::new(tree.path().join("usr/bin/hyrelay")).arg("--version"));
    assert!(version.starts_with("hyrelay 0.1.0"), "{version}");
    let unit = std::fs::read_to_string(tree.path().join("usr/lib/systemd/system/hyrelay-hcm.service")).unwrap();
    assert!(
        unit.contains("\nExecStart=hyrelay ") && unit.contains("Type=notify"),
        "{unit}"
    );
    let bash = std::fs::read_to_string(tree.path().join("usr/share/bash-completion/completions/hyrelay")).unwrap();
    assert!(
        bash.contains("connection-string-file") && bash.contains("hyrelay"),
        "bash completion"
    );
}
