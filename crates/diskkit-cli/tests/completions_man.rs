//! Shell completions and man pages: generated for every shell and every command, and used by
//! the real shells and `man` (bash, zsh, fish and man-db; .ci/run installs them).

mod support;

use std::process::Command;

use support::{diskkit_ok, Dir};

/// Every command with its own man page.
const PAGES: [&str; 44] = [
    "diskkit",
    "diskkit-create",
    "diskkit-info",
    "diskkit-convert",
    "diskkit-check",
    "diskkit-compare",
    "diskkit-map",
    "diskkit-resize",
    "diskkit-read",
    "diskkit-write",
    "diskkit-discard",
    "diskkit-layer",
    "diskkit-layer-create",
    "diskkit-snapshot",
    "diskkit-restore",
    "diskkit-commit",
    "diskkit-rebase",
    "diskkit-flatten",
    "diskkit-serve",
    "diskkit-partitions",
    "diskkit-ls",
    "diskkit-cat",
    "diskkit-stat",
    "diskkit-cp",
    "diskkit-kernel",
    "diskkit-unpack",
    "diskkit-boot",
    "diskkit-pull",
    "diskkit-push",
    "diskkit-bundle",
    "diskkit-bundle-create",
    "diskkit-bundle-extract",
    "diskkit-bundle-verify",
    "diskkit-bundle-info",
    "diskkit-cache",
    "diskkit-cache-fetch",
    "diskkit-cache-instance",
    "diskkit-cache-release",
    "diskkit-cache-ls",
    "diskkit-cache-rm",
    "diskkit-cache-gc",
    "diskkit-prefetch",
    "diskkit-completions",
    "diskkit-manpages",
];

fn run(program: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (.ci/run installs it): {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn completions_generate_for_every_shell() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let script = diskkit_ok(&["completions", shell]);
        for word in ["create", "unpack", "layer", "allow-parent-dir", "image-format"] {
            assert!(script.contains(word), "{shell} script lacks {word}");
        }
    }
}

/// Ask bash's completion function for the candidates of a partial command line.
fn bash_complete(script: &str, words: &[&str]) -> Vec<String> {
    let words_q: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let program = format!(
        "source '{script}'\nCOMP_WORDS=({})\nCOMP_CWORD={}\nCOMP_LINE='{}'\nCOMP_POINT=${{#COMP_LINE}}\n\
         _diskkit diskkit '{}' '{}'\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"",
        words_q.join(" "),
        words.len() - 1,
        words.join(" "),
        words[words.len() - 1],
        words[words.len() - 2],
    );
    let (ok, out, err) = run("bash", &["-c", &program]);
    assert!(ok, "bash completion failed: {err}");
    out.lines().map(str::to_owned).collect()
}

#[test]
fn bash_completes_commands_options_and_values() {
    let d = Dir::new();
    let script = d.s("diskkit.bash");
    std::fs::write(&script, diskkit_ok(&["completions", "bash"])).unwrap();
    let (ok, _, err) = run("bash", &["-n", &script]);
    assert!(ok, "bash -n: {err}");
    assert_eq!(bash_complete(&script, &["diskkit", "cre"]), ["create"]);
    assert_eq!(
        bash_complete(&script, &["diskkit", "layer", "create", "--par"]),
        ["--parent", "--parent-sha256"]
    );
    let mut formats = bash_complete(&script, &["diskkit", "create", "-O", ""]);
    formats.sort();
    assert_eq!(formats, ["asif", "qcow2", "raw"]);
    // Only the options the command takes.
    let write = bash_complete(&script, &["diskkit", "write", "--"]);
    assert!(write.contains(&"--offset".to_owned()), "{write:?}");
    assert!(!write.contains(&"--detached".to_owned()), "{write:?}");
}

#[test]
fn fish_completes_commands() {
    let d = Dir::new();
    let script = d.s("diskkit.fish");
    std::fs::write(&script, diskkit_ok(&["completions", "fish"])).unwrap();
    let (ok, _, err) = run("fish", &["--no-execute", &script]);
    assert!(ok, "fish --no-execute: {err}");
    let (ok, out, err) = run(
        "fish",
        &["-c", &format!("source '{script}'; complete -C 'diskkit unp'")],
    );
    assert!(ok, "fish: {err}");
    assert!(out.lines().any(|l| l.starts_with("unpack\t")), "{out}");
    let (_, out, _) = run(
        "fish",
        &[
            "-c",
            &format!("source '{script}'; complete -C 'diskkit serve --tl'"),
        ],
    );
    assert!(out.lines().any(|l| l.starts_with("--tls-cert")), "{out}");
}

#[test]
fn zsh_script_parses() {
    let d = Dir::new();
    let script = d.s("_diskkit");
    std::fs::write(&script, diskkit_ok(&["completions", "zsh"])).unwrap();
    let (ok, _, err) = run("zsh", &["-n", &script]);
    assert!(ok, "zsh -n: {err}");
}

#[test]
fn man_pages_render() {
    let d = Dir::new();
    let dir = d.path("man1");
    let said = diskkit_ok(&["manpages", dir.to_str().unwrap()]);
    assert_eq!(
        said.trim(),
        format!("wrote {} man pages into '{}'", PAGES.len(), dir.display())
    );
    let mut written: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    written.sort();
    let mut expected: Vec<String> = PAGES.iter().map(|p| format!("{p}.1")).collect();
    expected.sort();
    assert_eq!(written, expected);
    for page in PAGES {
        let file = dir.join(format!("{page}.1"));
        let out = Command::new("man")
            .args(["--warnings", "-l"])
            .arg(&file)
            .env("MANWIDTH", "80")
            .env("MAN_DISABLE_SECCOMP", "1")
            .output()
            .expect("man (man-db)");
        let text = String::from_utf8_lossy(&out.stdout);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "man -l {page}: {err}");
        assert!(err.trim().is_empty(), "groff warnings for {page}: {err}");
        for section in ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS"] {
            assert!(text.contains(section), "{page} lacks {section}:\n{text}");
        }
        if page != "diskkit-layer" {
            assert!(text.contains("EXAMPLES"), "{page} lacks EXAMPLES:\n{text}");
        }
        let name = page.replace('-', " ");
        assert!(text.contains(&name), "{page} does not name '{name}':\n{text}");
    }
    // The main page explains the conventions and lists the exit statuses.
    let out = Command::new("man")
        .arg("-l")
        .arg(dir.join("diskkit.1"))
        .env("MANWIDTH", "80")
        .env("MAN_DISABLE_SECCOMP", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in ["EXIT STATUS", "FORMATS", "--allow-parent-dir", "diskkit-unpack"] {
        assert!(text.contains(needle), "diskkit.1 lacks {needle}:\n{text}");
    }
}
