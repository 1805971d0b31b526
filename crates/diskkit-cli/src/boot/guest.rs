//! Running COMMAND in the guest through systemd, and the channel its output and exit status
//! come back on.
//!
//! Verified by booting Debian 12 (systemd 252.39) under QEMU 7.2 TCG:
//! - PID 1 imports system credentials from QEMU's fw_cfg (`-fw_cfg
//!   name=opt/io.systemd.credentials/NAME,file=F`; it loads `qemu_fw_cfg` itself) into
//!   `/run/credentials/@system/NAME` (mode 0400, root). SMBIOS type 11 strings
//!   (`io.systemd.credential.binary:NAME=BASE64`) work too on x86, but an arm64 guest booted
//!   without firmware has no SMBIOS tables, so diskkit uses fw_cfg on both.
//! - `systemd.run=CMD` (systemd-run-generator) makes `kernel-command-line.service` the
//!   boot's goal (`kernel-command-line.target`, which only needs `basic.target`) and
//!   `systemd.run_success_action=` / `_failure_action=` say what happens when it ends.
//!   `systemd.wants=multi-user.target` keeps the normal services starting in parallel, and
//!   the script below waits for them with `systemctl start multi-user.target` (which joins
//!   the queued job): "the system is up" means multi-user.target was reached.
//! - So `systemd.run="/bin/sh /run/credentials/@system/diskkit.run"` runs a script that is
//!   itself a credential: the command line carries no user text at all (no quoting through
//!   the kernel's and systemd's parsers, no `$` or `%` expansion by `ExecStart=`).
//! - The script finds virtio-serial ports by name in `/sys/class/virtio-ports/*/name` (it
//!   does not depend on udev's `/dev/virtio-ports` links); `virtio_console` is a module on
//!   Debian's cloud kernel and may load after basic.target, so it waits for it.
//!
//! The command's stdout and stderr go to two ports of their own and its exit status to a
//! third, so nothing the kernel or systemd prints on the console can be mistaken for them.
//! A blocking write to a port returns once QEMU has written the bytes to its socket, so
//! when the status line arrives every byte of output is already in diskkit's sockets.

/// Port for the command's stdout.
pub(crate) const PORT_STDOUT: &str = "io.diskkit.stdout";
/// Port for the command's stderr.
pub(crate) const PORT_STDERR: &str = "io.diskkit.stderr";
/// Port for `up` and `exit N` lines.
pub(crate) const PORT_STATUS: &str = "io.diskkit.status";
/// The credential holding the script.
pub(crate) const RUN_CREDENTIAL: &str = "diskkit.run";

/// Quote a word for the guest's `/bin/sh`.
pub(crate) fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The kernel command line options that start the script.
pub(crate) fn kernel_args() -> Vec<String> {
    vec![
        format!("systemd.run=\"/bin/sh /run/credentials/@system/{RUN_CREDENTIAL}\""),
        // Power off once the script is done, whatever it returns (the status went over the
        // port); `-force` stops services by killing them and unmounts, which keeps a
        // persistent overlay consistent without waiting for every unit to stop.
        "systemd.run_success_action=poweroff-force".to_owned(),
        "systemd.run_failure_action=poweroff-force".to_owned(),
        "systemd.wants=multi-user.target".to_owned(),
    ]
}

/// The script run in the guest: wait for multi-user.target and the ports, say `up`, run
/// `argv` as root in `/root` with stdin from /dev/null, say `exit N`.
pub(crate) fn script(argv: &[String]) -> String {
    let command: Vec<String> = argv.iter().map(|a| sh_quote(a)).collect();
    format!(
        r#"# diskkit boot: runs the command given after -- (started by systemd.run=)
export HOME=/root USER=root LOGNAME=root
systemctl start multi-user.target >/dev/null 2>&1
port() {{
  for d in /sys/class/virtio-ports/*; do
    if [ -r "$d/name" ] && [ "$(cat "$d/name")" = "$1" ] && [ -c "/dev/${{d##*/}}" ]; then
      echo "/dev/${{d##*/}}"
      return 0
    fi
  done
  return 1
}}
i=0
until status=$(port {PORT_STATUS}) && out=$(port {PORT_STDOUT}) && err=$(port {PORT_STDERR}); do
  [ "$i" = 0 ] && modprobe virtio_console >/dev/null 2>&1
  i=$((i + 1))
  if [ "$i" -gt 1200 ]; then
    echo "diskkit: no virtio-serial ports {PORT_STATUS}" >&2
    exit 1
  fi
  sleep 0.1 2>/dev/null || sleep 1
done
exec 3>"$status"
echo up >&3
cd /root 2>/dev/null || cd /
(exec {command}) </dev/null >"$out" 2>"$err"
echo "exit $?" >&3
"#,
        command = command.join(" ")
    )
}

/// A line from the status port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    /// The system is up and the command starts.
    Up,
    /// The command ended with this status.
    Exit(u8),
}

/// Parse one status line; unknown lines are ignored (`None`).
pub(crate) fn parse_status(line: &str) -> Option<Status> {
    let line = line.trim();
    if line == "up" {
        return Some(Status::Up);
    }
    let code: u32 = line.strip_prefix("exit ")?.trim().parse().ok()?;
    Some(Status::Exit(u8::try_from(code).unwrap_or(255)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(parse_status("up\n"), Some(Status::Up));
        assert_eq!(parse_status("exit 7"), Some(Status::Exit(7)));
        assert_eq!(parse_status("exit 300"), Some(Status::Exit(255)));
        assert_eq!(parse_status("exit x"), None);
        assert_eq!(parse_status("hello"), None);
    }

    /// The script's quoting survives a real shell: run its command part with `sh` locally.
    #[test]
    fn quoting_round_trips_through_sh() {
        let argv = [
            "printf".to_owned(),
            "%s|".to_owned(),
            "it's".to_owned(),
            "$HOME `x` \"q\" \\ * ;".to_owned(),
            String::new(),
        ];
        let cmd: Vec<String> = argv.iter().map(|a| sh_quote(a)).collect();
        let out = std::process::Command::new("sh")
            .args(["-c", &format!("(exec {})", cmd.join(" "))])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "it's|$HOME `x` \"q\" \\ * ;||"
        );
    }

    #[test]
    fn script_parses() {
        let s = script(&["sh".to_owned(), "-c".to_owned(), "exit 7".to_owned()]);
        let out = std::process::Command::new("sh")
            .args(["-n", "-c", &s])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(s.contains("(exec 'sh' '-c' 'exit 7')"));
    }
}
