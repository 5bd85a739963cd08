//! `fhir-outbox demo` end to end: the binary, its own throwaway cluster, its built-in receiver.

use regex::Regex;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The tour must end on its own: 5 s of writes, then at most 20 s for the last retries, plus the
/// cluster's start and stop. Far above that means it hangs.
const LIMIT: Duration = Duration::from_secs(120);

fn number(output: &str, pattern: &str) -> u64 {
    let regex = Regex::new(pattern).unwrap();
    let captures = regex
        .captures(output)
        .unwrap_or_else(|| panic!("`{pattern}` not in the output:\n{output}"));
    captures[1].parse().unwrap()
}

#[test]
fn the_tour_delivers_verified_notifications_with_retries_and_ends_by_itself() {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fhir-outbox"))
        .args([
            "demo",
            "--duration-seconds",
            "5",
            "--writes-per-second",
            "8",
        ])
        // The tour's own throwaway cluster, even where the tests' environment names a database.
        .env_remove("DATABASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fhir-outbox demo");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    // Read both pipes while the demo runs, so that neither fills up and blocks it.
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        stdout.read_to_string(&mut text).unwrap();
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        stderr.read_to_string(&mut text).unwrap();
        text
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > LIMIT {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("the demo did not end within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (output, errors) = (out.join().unwrap(), err.join().unwrap());
    assert!(status.success(), "exit status {status}\n{output}\n{errors}");

    assert!(
        number(&output, r"signatures verified: (\d+)") > 0,
        "{output}"
    );
    assert_eq!(number(&output, r"unverified: (\d+)"), 0, "{output}");
    assert_eq!(
        number(&output, r"duplicate webhook-ids: (\d+)"),
        0,
        "{output}"
    );
    assert!(
        number(&output, r"Deliveries: (\d+) succeeded") > 0,
        "{output}"
    );
    assert_eq!(number(&output, r"(\d+) still open"), 0, "{output}");
    assert!(
        number(&output, r"Audit: +(\d+) AuditEvents") > 0,
        "every attempt's AuditEvent is counted:\n{output}"
    );
    assert!(
        number(&output, r"retries: (\d+)") > 0,
        "a retry happened:\n{output}"
    );
    assert_eq!(
        number(&output, r"subscription issues: (\d+)"),
        0,
        "{output}"
    );
    // Not a terminal: progress lines, no cursor movement.
    assert!(output.contains("[writing"), "{output}");
    assert!(!output.contains('\x1b'), "no escape sequences in a pipe");
    for table in [
        "fhir_outbox.outbox",
        "fhir_outbox.delivery ",
        "fhir_outbox.delivery_attempt",
        "fhir_outbox.audit_event",
        "fhir_outbox.subscription_issue",
    ] {
        assert!(output.contains(table), "the SQL hint shows {table}");
    }
    assert!(output.contains("The throwaway cluster is stopped and removed."));
}
