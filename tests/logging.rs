//! What `pacer run` writes to stderr when it is not a terminal (a pod's log, a file).

use std::process::Command;

/// `pacer run` with a configuration that does not exist: it logs why it stopped, and exits.
fn stderr_of_a_failed_run(format: Option<&str>) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pacer"));
    command
        .args(["run", "--config", "/nonexistent/pacer.yaml"])
        .env_remove("PACER_LOG_FORMAT");
    if let Some(format) = format {
        command.env("PACER_LOG_FORMAT", format);
    }
    let out = command.output().unwrap();
    assert!(!out.status.success());
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn text_logs_written_to_a_file_carry_no_colour_codes() {
    let text = stderr_of_a_failed_run(Some("text"));
    assert!(text.contains("pacer stopped"), "{text}");
    assert!(!text.contains('\u{1b}'), "colour codes in {text:?}");
}

#[test]
fn logs_are_json_lines_when_stderr_is_not_a_terminal() {
    let text = stderr_of_a_failed_run(None);
    let line = text.lines().find(|l| l.contains("pacer stopped")).unwrap();
    let record: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(record["level"], "ERROR", "{line}");
}
