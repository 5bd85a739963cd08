//! The `fhirpath` scenario: what hostile subscription criteria cost before the evaluation budget
//! stops them. Runs in this process without PostgreSQL.
//!
//! Each expression of [`hostile::expressions`] is evaluated once on a Patient near the store's
//! 4 MiB limit, with `%current` bound to it as the dispatcher does. Per evaluation it records
//! the CPU time of this thread (`/proc/thread-self/schedstat`, nanoseconds), the growth of peak
//! RSS over the RSS before it (`VmHWM` after, reset through `/proc/self/clear_refs`, minus
//! `VmRSS` before), and the budget's own accounting (steps, bytes allocated). RSS growth can
//! read low when the allocator reuses memory it already holds; the budget's bytes are the
//! upper bound the limits enforce.

use serde_json::json;

use super::scenarios::Results;
use super::{BenchError, Figure, Scenario, Target};
use fhir_outbox::fhirpath::{Environment, Expression, Limits, hostile};

/// The store's resource size limit, less room for the envelope.
const RESOURCE_BYTES: usize = 4_100_000;
/// The targets the default limits are calibrated for.
const CPU_MS_TARGET: f64 = 100.0;
const MEMORY_MIB_TARGET: f64 = 64.0;

/// CPU nanoseconds this thread has run.
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse().ok())
}

/// Make `VmHWM` start again from the current RSS (Linux ≥ 4.0); `false` if not possible.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Runs the scenario.
pub fn run(results: &mut Results) -> Result<(), BenchError> {
    let patient = hostile::large_patient(RESOURCE_BYTES);
    let resource_bytes = patient.to_string().len();
    let identifiers = patient["identifier"].as_array().map_or(0, Vec::len);
    let env = Environment::new().with_variable("current", &patient);
    let limits = Limits::default();
    // Warm up the type model and the allocator outside the measurements.
    let warm = Expression::parse("%current.identifier.where(value = 'x').exists()")
        .map_err(|e| BenchError::Other(e.to_string()))?;
    let _ = warm.evaluate(&patient, &env);

    let peak_resettable = reset_peak_rss();
    let mut rows = Vec::new();
    let (mut cpus, mut walls, mut rss, mut bytes) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut stopped = 0usize;
    let family = hostile::expressions();
    for source in &family {
        let expr = Expression::parse(source).map_err(|e| BenchError::Other(e.to_string()))?;
        reset_peak_rss();
        let rss_before = status_kib("VmRSS:").unwrap_or(0);
        let cpu_before = thread_cpu_ns().unwrap_or(0);
        let wall = std::time::Instant::now();
        let (out, spent) = expr.evaluate_measured(&patient, &env);
        let wall_ms = wall.elapsed().as_secs_f64() * 1e3;
        let cpu_ms = thread_cpu_ns().unwrap_or(0).saturating_sub(cpu_before) as f64 / 1e6;
        let rss_growth_mib =
            status_kib("VmHWM:").unwrap_or(0).saturating_sub(rss_before) as f64 / 1024.0;
        let outcome = match &out {
            Err(e) if e.is_budget_exhausted() => {
                stopped += 1;
                e.to_string()
            }
            Err(e) => format!("OTHER ERROR: {e}"),
            Ok(items) => format!("NOT STOPPED: {} items", items.len()),
        };
        drop(out);
        let budget_mib = spent.bytes as f64 / (1 << 20) as f64;
        eprintln!(
            "bench: fhirpath {cpu_ms:7.1} ms cpu {wall_ms:7.1} ms wall {rss_growth_mib:6.1} MiB rss {budget_mib:6.1} MiB budget  {source}  -> {outcome}"
        );
        cpus.push(cpu_ms);
        walls.push(wall_ms);
        rss.push(rss_growth_mib);
        bytes.push(budget_mib);
        rows.push(json!({
            "expression": source,
            "cpu_ms": cpu_ms,
            "wall_ms": wall_ms,
            "peak_rss_growth_mib": rss_growth_mib,
            "budget_steps": spent.steps,
            "budget_bytes": spent.bytes,
            "outcome": outcome,
        }));
    }
    let n = family.len();
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let s = Scenario::Fhirpath;
    let note = format!(
        "{n} hostile expressions on a {:.1} MiB Patient ({identifiers} identifiers)",
        resource_bytes as f64 / (1 << 20) as f64
    );
    results.figures.extend([
        Figure::new(
            s,
            "fhirpath.cpu_ms.max",
            "FHIRPath hostile: CPU per evaluation, max",
            max(&cpus),
            "ms",
        )
        .target(Target::AtMost(CPU_MS_TARGET))
        .note(note.clone()),
        Figure::new(
            s,
            "fhirpath.wall_ms.max",
            "FHIRPath hostile: wall time per evaluation, max",
            max(&walls),
            "ms",
        ),
        Figure::new(
            s,
            "fhirpath.cpu_ms.median",
            "FHIRPath hostile: CPU per evaluation, median",
            median(&mut cpus.clone()),
            "ms",
        ),
        Figure::new(
            s,
            "fhirpath.rss_growth_mib.max",
            "FHIRPath hostile: peak RSS growth, max",
            max(&rss),
            "MiB",
        )
        .target(Target::AtMost(MEMORY_MIB_TARGET))
        .note(if peak_resettable {
            "VmHWM after minus VmRSS before, per evaluation"
        } else {
            "VmHWM could not be reset: growth over the whole run"
        }),
        Figure::new(
            s,
            "fhirpath.budget_mib.max",
            "FHIRPath hostile: bytes charged to the budget, max",
            max(&bytes),
            "MiB",
        )
        .target(Target::AtMost(MEMORY_MIB_TARGET))
        .note(format!(
            "limit {} MiB, cumulative allocation",
            limits.max_bytes >> 20
        )),
        Figure::new(
            s,
            "fhirpath.stopped",
            "FHIRPath hostile: stopped by the budget",
            stopped as f64,
            "expr",
        )
        .target(Target::AtLeast(n as f64)),
    ]);
    results.details.insert(
        "fhirpath".into(),
        json!({
            "resource_bytes": resource_bytes,
            "identifiers": identifiers,
            "limits": {
                "max_steps": limits.max_steps,
                "max_bytes": limits.max_bytes,
                "max_collection": limits.max_collection,
                "max_string": limits.max_string,
            },
            "evaluations": rows,
        }),
    );
    Ok(())
}
