//! Snapshot tests of what people read: every command's help, and the messages of usage errors,
//! runtime errors and successes, run through the real binary with trycmd (as clap and cargo
//! test their own command lines).
//!
//! - `cmd/help/*.toml`: `diskkit COMMAND --help` for every command (and `diskkit --help`, `-h`).
//! - `cmd/*.md`: sequences of commands with their exact output and exit status, in a sandbox
//!   directory (the `.in/` directory next to a case is its starting content).
//!
//! After an intended change of wording, `TRYCMD=overwrite cargo test -p diskkit-cli --test
//! snapshots` rewrites the expected files; review the diff like code.

#[test]
fn help_and_messages() {
    let cases = trycmd::TestCases::new();
    cases
        .register_bin("diskkit", std::path::Path::new(env!("CARGO_BIN_EXE_diskkit")))
        .default_bin_name("diskkit")
        // The same width and no colours whatever the environment (clap reads COLUMNS when
        // stdout is not a terminal, and CLICOLOR_FORCE).
        .env("COLUMNS", "100")
        .env("CLICOLOR_FORCE", "0")
        .env("NO_COLOR", "1")
        // Messages say "0.1.0"-independent things; the version line is redacted.
        .insert_var("[VERSION]", env!("CARGO_PKG_VERSION"))
        .unwrap();
    cases.case("tests/cmd/help/*.toml").case("tests/cmd/*.md");
}
