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

/// How fast this machine runs two fixed pieces of work right now: the VM's speed moves by half or
/// more between hours (docs/performance.md), and a figure can only be compared with another run's
/// next to the speed each was measured at. Each is the best of three tries, so that a passing
/// blip does not count, while a slow hour does.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Speed {
    /// SHA-256 over 32 MiB in this process, one thread: MiB/s.
    pub sha256_mib_per_s: f64,
    /// `SELECT sum(i) FROM generate_series(1, 5000000)` in one PostgreSQL backend: millions of
    /// rows per second (none when no database runs).
    pub postgres_mrows_per_s: Option<f64>,
}

impl Speed {
    /// "SHA-256 1500 MiB/s, PostgreSQL 7.3 M rows/s".
    pub fn describe(&self) -> String {
        let postgres = self.postgres_mrows_per_s.map_or_else(String::new, |rate| {
            format!(", PostgreSQL {rate:.1} M rows/s")
        });
        format!("SHA-256 {:.0} MiB/s{postgres}", self.sha256_mib_per_s)
    }

    /// [`Speed::describe`], or "not measured".
    pub fn describe_measured(speed: Option<&Speed>) -> String {
        speed.map_or_else(|| "not measured".into(), Speed::describe)
    }
}

/// Measures [`Speed`] (about a second; `admin`: a connection to the bench's cluster, if any).
pub async fn speed(admin: Option<&sqlx::PgPool>) -> Result<Speed, super::BenchError> {
    // Off the async threads: the loopback receiver shares this runtime.
    let sha256 = tokio::task::spawn_blocking(|| {
        use sha2::Digest;
        let block = vec![0x5au8; 1 << 20];
        (0..3)
            .map(|_| {
                let started = std::time::Instant::now();
                let mut hasher = sha2::Sha256::new();
                for _ in 0..32 {
                    hasher.update(&block);
                }
                std::hint::black_box(hasher.finalize());
                32.0 / started.elapsed().as_secs_f64()
            })
            .fold(0.0, f64::max)
    })
    .await
    .map_err(|error| super::BenchError::Other(format!("the SHA-256 probe: {error}")))?;
    let postgres = match admin {
        Some(pool) => {
            let mut best: f64 = 0.0;
            for _ in 0..3 {
                let started = std::time::Instant::now();
                sqlx::query("SELECT sum(i) FROM generate_series(1, 5000000) AS i")
                    .execute(pool)
                    .await?;
                best = best.max(5.0 / started.elapsed().as_secs_f64());
            }
            Some(best)
        }
        None => None,
    };
    Ok(Speed {
        sha256_mib_per_s: sha256,
        postgres_mrows_per_s: postgres,
    })
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
