//! The boot script every instance of a pool runs: rendered from the pool, the same for every
//! job of a pool version, with no secrets in it.

use std::fmt::Write as _;

/// EC2 accepts at most 16 KiB of user-data before base64.
pub const MAX_USER_DATA_BYTES: usize = 16 * 1024;

/// The boot script, kept whole in `boot.sh` so that shellcheck and editors see what runs.
pub const BOOT_SCRIPT: &str = include_str!("boot.sh");

/// What the boot script is rendered from: nothing secret, and nothing that differs between
/// the jobs of a pool version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootParams<'a> {
    /// Where the instance calls back (`server.public_url`).
    pub public_url: &'a str,
    /// `namespace/name` of the pool.
    pub pool: &'a str,
    /// The user the runner runs as.
    pub runner_user: &'a str,
    /// PEM the instance trusts for `public_url`, when not the AMI's roots.
    pub ca_pem: Option<&'a str>,
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

/// Renders the boot script: its first line, the parameters as quoted assignments, then the
/// rest of it without its comment lines (they explain the script to its readers and would
/// only take the pool's `userData` room under EC2's 16 KiB; boot.sh has no here-document or
/// multi-line string with a line starting with `#`).
pub fn render(params: &BootParams<'_>) -> Result<String, TooLarge> {
    let (shebang, body) = BOOT_SCRIPT
        .split_once('\n')
        .expect("boot.sh has more than one line");
    let mut script = String::with_capacity(BOOT_SCRIPT.len() + 512);
    let w = &mut script;
    let _ = writeln!(w, "{shebang}");
    for (name, value) in [
        ("PACER_URL", params.public_url.trim_end_matches('/')),
        ("PACER_POOL", params.pool),
        ("RUNNER_USER", params.runner_user),
        ("PACER_POOL_SCRIPT", params.extra.unwrap_or_default()),
        ("PACER_CA_PEM", params.ca_pem.unwrap_or_default()),
    ] {
        let _ = writeln!(w, "{name}={}", shell_quote(value));
    }
    for line in body.lines().filter(|l| !l.trim_start().starts_with('#')) {
        script.push_str(line);
        script.push('\n');
    }
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
            public_url: "https://pacer.example.com/",
            pool: "ci/linux",
            runner_user: "runner",
            ca_pem: None,
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
    fn the_parameters_come_first_and_the_script_follows_without_its_comments() {
        let extra = "echo one\necho 'two' \"$HOME\"\n";
        let script = render(&params(Some(extra))).unwrap();
        assert!(script.starts_with("#!/bin/bash\nPACER_URL='https://pacer.example.com'\n"));
        let code: Vec<&str> = BOOT_SCRIPT
            .lines()
            .skip(1)
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect();
        assert!(script.ends_with(&format!("{}\n", code.join("\n"))));
        assert_eq!(
            script
                .lines()
                .filter(|l| l.trim_start().starts_with('#'))
                .count(),
            1,
            "only the shebang"
        );
        // What bash assigns is the pool's script, byte for byte.
        let prefix = script.split("set -Eeuo pipefail").next().unwrap();
        let out = run_bash(&format!("{prefix}\nprintf %s \"$PACER_POOL_SCRIPT\""));
        assert_eq!(String::from_utf8(out.stdout).unwrap(), extra);
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
}
