//! The README runs as written: every ```sql block goes through psql against a fresh database, and
//! every ```sh / ```console block runs with the built binary first on `PATH`. A block that is only
//! illustrative says so on the line before its fence: `<!-- readme-test: skip (why) -->`; an unmarked
//! block that cannot run fails this test.
//!
//! Placeholders get real values: `<project uuid>` and `$PROJECT` a project created here.

use crate::common::TestDb;
use std::path::Path;

const SKIP_MARKER: &str = "<!-- readme-test: skip";

/// A fenced block of README.md.
struct Block {
    /// The language after the fence.
    language: String,
    /// 1-based line of the opening fence.
    line: usize,
    /// Its text.
    text: String,
    /// The reason it is skipped, when marked.
    skip: Option<String>,
}

fn blocks(readme: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut previous = "";
    let mut open: Option<Block> = None;
    for (index, line) in readme.lines().enumerate() {
        match open.as_mut() {
            Some(block) => {
                if line.trim_start().starts_with("```") {
                    blocks.push(open.take().expect("a block is open"));
                } else {
                    block.text.push_str(line);
                    block.text.push('\n');
                }
            }
            None => {
                if let Some(language) = line.trim_start().strip_prefix("```") {
                    let skip = previous
                        .trim()
                        .strip_prefix(SKIP_MARKER)
                        .map(|rest| rest.trim_end_matches("-->").trim().to_owned());
                    open = Some(Block {
                        language: language.trim().to_owned(),
                        line: index + 1,
                        text: String::new(),
                        skip,
                    });
                }
            }
        }
        previous = line;
    }
    assert!(open.is_none(), "README.md ends inside a fenced block");
    blocks
}

/// The commands of a shell block: a `console` block's lines that start with `$ ` (the others are
/// output), a `sh` block whole.
fn script(block: &Block) -> String {
    if block.language == "console" {
        block
            .text
            .lines()
            .filter_map(|line| line.strip_prefix("$ "))
            .map(|line| format!("{line}\n"))
            .collect()
    } else {
        block.text.clone()
    }
}

fn run_shell(script: &str, url: &str, project: &str) -> Result<String, String> {
    let binary = Path::new(env!("CARGO_BIN_EXE_fhir-outbox"));
    let path = format!(
        "{}:{}",
        binary.parent().expect("the binary's directory").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = std::process::Command::new("sh")
        .args(["-e", "-c", script])
        .env("PATH", path)
        .env("DATABASE_URL", url)
        .env("PROJECT", project)
        .env("FHIR_OUTBOX_LOG", "off")
        .env("FHIR_OUTBOX_ADMIN_ADDR", "off")
        .env_remove("FHIR_OUTBOX_PROJECT")
        .output()
        .expect("run sh");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

#[tokio::test]
async fn every_sql_and_shell_block_of_the_readme_runs_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("read README.md");
    let db = TestDb::new().await;
    let project = db.project().await.to_string();
    let (mut ran, mut skipped) = (0, 0);
    for block in blocks(&readme) {
        let runnable = matches!(block.language.as_str(), "sql" | "sh" | "console");
        if !runnable {
            continue;
        }
        if let Some(reason) = &block.skip {
            assert!(
                reason.starts_with('(') && reason.len() > 2,
                "README.md line {}: a skip marker needs a reason: `{SKIP_MARKER} (why) -->`",
                block.line
            );
            skipped += 1;
            continue;
        }
        let outcome = match block.language.as_str() {
            "sql" => db.psql(&block.text.replace("<project uuid>", &project)),
            _ => {
                let script = script(&block);
                assert!(
                    script
                        .lines()
                        .any(|line| line.trim_start().starts_with("fhir-outbox ")),
                    "README.md line {}: a {} block that runs no `fhir-outbox` command; mark it \
                     `{SKIP_MARKER} (why) -->` if it is illustrative",
                    block.line,
                    block.language
                );
                run_shell(&script, &db.url, &project)
            }
        };
        if let Err(error) = outcome {
            panic!(
                "README.md line {}: the {} block fails as written (mark it `{SKIP_MARKER} (why) -->` \
                 if it is only illustrative):\n{}\n--- error ---\n{error}",
                block.line, block.language, block.text
            );
        }
        ran += 1;
    }
    assert!(ran >= 8, "only {ran} README blocks ran");
    assert!(skipped >= 1, "the skip markers were not recognised");
    // What the blocks did is there: the Subscription, and the patient's history.
    let subscription = db
        .psql(&format!(
            "SELECT status FROM fhir_outbox.subscription_delivery_status WHERE project_id = '{project}' AND subscription_id = 'heart-rate-hook'"
        ))
        .unwrap();
    assert_eq!(subscription, "active");
}

#[test]
fn markers_are_read_from_the_line_before_the_fence() {
    let text =
        "a\n<!-- readme-test: skip (illustrative) -->\n```sh\nfoo\n```\n```sql\nSELECT 1;\n```\n";
    let found = blocks(text);
    assert_eq!(found.len(), 2);
    assert_eq!(found[0].skip.as_deref(), Some("(illustrative)"));
    assert_eq!(found[0].text, "foo\n");
    assert_eq!(found[1].skip, None);
    assert_eq!(found[1].line, 6);
}
