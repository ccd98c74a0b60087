//! The boot script every instance of a pool runs: rendered from the pool, the same for every
//! job of a pool version, with no secrets in it.

use std::fmt::Write as _;

/// EC2 accepts at most 16 KiB of user-data before base64.
pub const MAX_USER_DATA_BYTES: usize = 16 * 1024;

/// What the boot script is rendered from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootParams<'a> {
    /// Where the instance calls back (`server.public_url`).
    pub public_url: &'a str,
    /// `namespace/name` of the pool.
    pub pool: &'a str,
    /// actions/runner release; `None` installs the latest.
    pub runner_version: Option<&'a str>,
    /// The pool's own script, run before the runner starts.
    pub extra: Option<&'a str>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the rendered user-data is {size} bytes; EC2 allows at most {MAX_USER_DATA_BYTES}: shorten spec.userData"
)]
pub struct TooLarge {
    pub size: usize,
}

/// Quotes a value for bash so that it is taken literally, whatever it contains.
pub fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// A here-document delimiter that does not occur as a line of `body`.
fn delimiter_for(body: &str) -> String {
    (0..)
        .map(|n| format!("PACER_USER_DATA_{n}"))
        .find(|d| !body.lines().any(|line| line.trim_end() == d))
        .expect("some delimiter is free")
}

/// Renders the boot script.
pub fn render(params: &BootParams<'_>) -> Result<String, TooLarge> {
    let mut script = String::new();
    let w = &mut script;
    let _ = writeln!(w, "#!/bin/bash");
    let _ = writeln!(
        w,
        "# Pacer runner boot script for pool {}. Rendered by Pacer: do not edit.",
        params.pool.replace('\n', " ")
    );
    let _ = writeln!(w, "set -euo pipefail");
    let _ = writeln!(w, "PACER_URL={}", shell_quote(params.public_url));
    let _ = writeln!(w, "PACER_POOL={}", shell_quote(params.pool));
    let _ = writeln!(
        w,
        "RUNNER_VERSION={}",
        shell_quote(params.runner_version.unwrap_or(""))
    );
    let _ = writeln!(w, "export PACER_URL PACER_POOL RUNNER_VERSION");
    // The instance shuts down on failure; the launch template makes shutdown terminate it.
    let _ = writeln!(
        w,
        "fail() {{ echo \"pacer: $*\" >&2; shutdown -h now || true; exit 1; }}"
    );
    if let Some(extra) = params.extra.filter(|e| !e.trim().is_empty()) {
        let delimiter = delimiter_for(extra);
        let _ = writeln!(w, "mkdir -p /var/lib/pacer");
        let _ = writeln!(w, "cat >/var/lib/pacer/pool-user-data.sh <<'{delimiter}'");
        let _ = write!(w, "{extra}");
        if !extra.ends_with('\n') {
            let _ = writeln!(w);
        }
        let _ = writeln!(w, "{delimiter}");
        let _ = writeln!(
            w,
            "bash /var/lib/pacer/pool-user-data.sh || fail \"the pool's userData script failed\""
        );
    }
    let _ = writeln!(
        w,
        "fail \"this Pacer version cannot start runners yet: the boot protocol (bootstrap, register, complete) is not implemented\""
    );
    if script.len() > MAX_USER_DATA_BYTES {
        return Err(TooLarge { size: script.len() });
    }
    Ok(script)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(extra: Option<&str>) -> BootParams<'_> {
        BootParams {
            public_url: "https://pacer.example.com",
            pool: "ci/linux",
            runner_version: Some("2.329.0"),
            extra,
        }
    }

    fn run_bash(script: &str) -> std::process::Output {
        std::process::Command::new("bash")
            .arg("-c")
            .arg(script)
            .output()
            .unwrap()
    }

    #[test]
    fn quoting_keeps_any_value_literal_in_bash() {
        for value in [
            "plain",
            "it's",
            "$(touch /tmp/pwned)",
            "a\nb",
            "'; echo injected; '",
            "`id`",
            "\\",
        ] {
            let out = run_bash(&format!("printf %s {}", shell_quote(value)));
            assert_eq!(String::from_utf8(out.stdout).unwrap(), value);
        }
    }

    #[test]
    fn extra_user_data_survives_verbatim_even_with_our_delimiter_in_it() {
        let extra = "echo one\nPACER_USER_DATA_0\necho 'two' \"$HOME\"\n";
        let script = render(&params(Some(extra))).unwrap();
        assert!(script.contains("<<'PACER_USER_DATA_1'"));
        // Extract what bash would write to the file, without running the rest.
        let heredoc = script
            .split("<<'PACER_USER_DATA_1'\n")
            .nth(1)
            .unwrap()
            .split("\nPACER_USER_DATA_1\n")
            .next()
            .unwrap();
        assert_eq!(format!("{heredoc}\n"), extra);
    }

    #[test]
    fn the_script_is_valid_bash() {
        let script = render(&params(Some("apt-get install -y jq"))).unwrap();
        let out = std::process::Command::new("bash")
            .arg("-n")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn user_data_over_16_kib_is_refused() {
        let big = "#".repeat(MAX_USER_DATA_BYTES);
        let err = render(&params(Some(&big))).unwrap_err();
        assert!(err.size > MAX_USER_DATA_BYTES);
        assert!(render(&params(Some(&"#".repeat(8192)))).is_ok());
    }

    #[test]
    fn the_placeholder_fails_loudly() {
        let script = render(&params(None)).unwrap();
        assert!(
            script
                .trim_end()
                .lines()
                .last()
                .unwrap()
                .starts_with("fail ")
        );
    }
}
