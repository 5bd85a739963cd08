//! What the machine is and where its CPU goes, from `/proc` (Linux).

use serde::Serialize;
use std::path::Path;

/// Facts about the machine a run came from.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Logical CPUs.
    pub cpus: usize,
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
    /// Total memory, MiB.
    pub memory_mib: u64,
    /// PostgreSQL `server_version`.
    pub postgres_version: String,
    /// Kernel release.
    pub kernel: String,
}

impl Machine {
    /// Reads the facts (the PostgreSQL version is given by the caller).
    pub fn read(postgres_version: String) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|line| line.strip_prefix("model name"))
            .and_then(|rest| rest.split_once(':'))
            .map(|(_, model)| model.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|info| field_kib(&info, "MemTotal:"))
            .map(|kib| kib / 1024)
            .unwrap_or(0);
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            memory_mib,
            postgres_version,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|k| k.trim().to_owned())
                .unwrap_or_default(),
        }
    }
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut values = text.split_whitespace().map(|v| v.parse().unwrap_or(0.0));
    [
        values.next().unwrap_or(0.0),
        values.next().unwrap_or(0.0),
        values.next().unwrap_or(0.0),
    ]
}

fn field_kib(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse().ok())
}

/// Clock ticks per second of /proc/<pid>/stat times.
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}

/// (ppid, utime + stime, cutime + cstime) of a process, in clock ticks.
fn stat(pid: u32) -> Option<(u32, u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): ppid is field 4, utime..cstime are fields 14..17.
    let number = |field: usize| fields.get(field - 3)?.parse::<u64>().ok();
    Some((
        number(4)? as u32,
        number(14)? + number(15)?,
        number(16)? + number(17)?,
    ))
}

/// CPU seconds used by a process itself (not its children).
pub fn cpu_seconds(pid: u32, ticks: f64) -> f64 {
    stat(pid).map_or(0.0, |(_, own, _)| own as f64 / ticks)
}

/// The parent of a process.
pub fn parent(pid: u32) -> Option<u32> {
    stat(pid).map(|(ppid, _, _)| ppid)
}

/// CPU seconds of a whole PostgreSQL cluster: the postmaster, its live children, and the children
/// that have exited (the postmaster has reaped them, so their time is in its cutime/cstime).
pub fn cluster_cpu_seconds(postmaster: u32, ticks: f64) -> f64 {
    let Some((_, own, reaped)) = stat(postmaster) else {
        return 0.0;
    };
    let mut total = own + reaped;
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some((ppid, own, _)) = stat(pid) {
                if ppid == postmaster {
                    total += own;
                }
            }
        }
    }
    total as f64 / ticks
}

/// Peak resident set size (`VmHWM`) of a process, in MiB.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status =
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status")).ok()?;
    field_kib(&status, "VmHWM:").map(|kib| kib as f64 / 1024.0)
}
