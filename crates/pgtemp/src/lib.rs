//! Throwaway PostgreSQL clusters, started from the locally installed server binaries.
//!
//! The demo, the test suite and the benchmarks run against a real PostgreSQL without any setup: a
//! cluster is created with `initdb` in a temporary directory, started with `pg_ctl` on a free loopback
//! port, and removed when the [`TempCluster`] is dropped. Because a process can die without running
//! destructors (SIGKILL, a panic in a static, the end of a test binary), a small watchdog process also
//! stops the server and removes the directory as soon as the owning process is gone.
//!
//! `initdb` refuses to run as root; when we are root, the server runs as the `postgres` system user
//! (or `nobody`), which owns the temporary directory.

#![warn(missing_docs, unreachable_pub)]

use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// How the throwaway cluster trades durability for speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `fsync`, `synchronous_commit` and full page writes off: for tests and the demo.
    Fast,
    /// PostgreSQL's defaults (synchronous commit on): for benchmarks that must be comparable.
    Durable,
}

/// Why a throwaway cluster could not be started.
#[derive(Debug, thiserror::Error)]
pub enum TempClusterError {
    /// No PostgreSQL server binaries were found; the message says how to install them.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl) were not found (looked in $PG_BIN_DIR, `pg_config --bindir`, \
         $PATH and /usr/lib/postgresql/*/bin).\n\
         Install them, for example:\n  \
         Debian/Ubuntu: sudo apt-get install -y postgresql\n  \
         Fedora:        sudo dnf install -y postgresql-server\n  \
         macOS:         brew install postgresql@16\n\
         or set PG_BIN_DIR to the directory holding initdb, or point DATABASE_URL at an existing server."
    )]
    BinariesNotFound,
    /// Running as root and no unprivileged user exists to run the server as.
    #[error(
        "running as root, and neither the `postgres` nor the `nobody` user exists to run PostgreSQL as (initdb refuses root)"
    )]
    NoUnprivilegedUser,
    /// A command failed; its output is included.
    #[error("{command} failed: {output}")]
    Command {
        /// The command that failed.
        command: String,
        /// What it printed, and the server log when there is one.
        output: String,
    },
    /// An I/O error while preparing the directory or spawning a process.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> TempClusterError {
    let context = context.into();
    move |source| TempClusterError::Io { context, source }
}

/// A running throwaway PostgreSQL cluster. Superuser `postgres`, trust authentication, loopback only.
#[derive(Debug)]
pub struct TempCluster {
    dir: tempfile::TempDir,
    bin_dir: PathBuf,
    port: u16,
    run_as: Option<(u32, u32)>,
    watchdog: Option<Child>,
    running: bool,
}

impl TempCluster {
    /// Creates and starts a cluster. Blocks for the second or two `initdb` and startup take.
    pub fn start(durability: Durability) -> Result<Self, TempClusterError> {
        let bin_dir = find_bin_dir().ok_or(TempClusterError::BinariesNotFound)?;
        let run_as = if is_root() {
            Some(unprivileged_user().ok_or(TempClusterError::NoUnprivilegedUser)?)
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("fhir-outbox-pg-")
            .tempdir()
            .map_err(io_error("cannot create a temporary directory"))?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).map_err(io_error(
                "cannot hand the temporary directory to the server's user",
            ))?;
        }
        let mut cluster = TempCluster {
            dir,
            bin_dir,
            port: 0,
            run_as,
            watchdog: None,
            running: false,
        };
        cluster.init()?;
        // Another process may take the free port between our probe and the server's bind: try again.
        let mut last_error = None;
        for _ in 0..5 {
            cluster.port = free_port()?;
            match cluster.start_server(durability) {
                Ok(()) => {
                    cluster.running = true;
                    cluster.watchdog = Some(cluster.spawn_watchdog()?);
                    return Ok(cluster);
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.expect("at least one attempt was made"))
    }

    /// The TCP port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL for `database` as the superuser.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The directory holding the server's binaries (`psql` is usually there too).
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Stops the server (fast shutdown: connections are cut) and starts it again on the same port,
    /// as an operator's restart or a failover would. For fault tests.
    pub fn restart(
        &mut self,
        down_for: std::time::Duration,
        durability: Durability,
    ) -> Result<(), TempClusterError> {
        self.stop_and_start("fast", down_for, durability)
    }

    /// Kills the server as a crash would (immediate shutdown: no checkpoint; the next start runs
    /// crash recovery, which empties unlogged tables) and starts it again on the same port.
    pub fn crash_and_restart(
        &mut self,
        down_for: std::time::Duration,
        durability: Durability,
    ) -> Result<(), TempClusterError> {
        self.stop_and_start("immediate", down_for, durability)
    }

    fn stop_and_start(
        &mut self,
        mode: &str,
        down_for: std::time::Duration,
        durability: Durability,
    ) -> Result<(), TempClusterError> {
        let mut stop = self.pg_command("pg_ctl");
        stop.arg("-D")
            .arg(self.data_dir())
            .args(["-m", mode, "-w", "stop"]);
        run(stop, "pg_ctl stop", Some(&self.log_file()))?;
        std::thread::sleep(down_for);
        self.start_server(durability)
    }

    /// Stops the server and waits for it (also done on drop).
    pub fn stop(&mut self) {
        if self.running {
            self.running = false;
            let _ = self
                .pg_command("pg_ctl")
                .arg("-D")
                .arg(self.data_dir())
                .args(["-m", "fast", "-w", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// A command for one of the server binaries, run as the unprivileged user when we are root.
    fn pg_command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin_dir.join(program));
        command.env("LC_ALL", "C").stdin(Stdio::null());
        if let Some((uid, gid)) = self.run_as {
            use std::os::unix::process::CommandExt;
            command.uid(uid).gid(gid);
        }
        command
    }

    fn init(&self) -> Result<(), TempClusterError> {
        let mut command = self.pg_command("initdb");
        command.arg("-D").arg(self.data_dir()).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        run(command, "initdb", None)
    }

    fn start_server(&self, durability: Durability) -> Result<(), TempClusterError> {
        let mut options = format!(
            "-c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{}' -c max_connections=300 -c max_prepared_transactions=16",
            self.port,
            self.dir.path().display()
        );
        if durability == Durability::Fast {
            options.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
        }
        let mut command = self.pg_command("pg_ctl");
        command
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_file())
            .args(["-w", "-t", "60", "-o", &options, "start"]);
        run(command, "pg_ctl start", Some(&self.log_file()))
    }

    /// Stops the server and removes the directory once this process is gone, however it ended. It runs
    /// in its own process group so that a Ctrl-C at the terminal, which we handle, does not kill it.
    fn spawn_watchdog(&self) -> Result<Child, TempClusterError> {
        use std::os::unix::process::CommandExt;
        let script = r#"
            while kill -0 "$1" 2>/dev/null; do sleep 1; done
            pid=$(head -n 1 "$2/postmaster.pid" 2>/dev/null)
            if [ -n "$pid" ]; then
                kill -INT "$pid" 2>/dev/null
                for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
                kill -KILL "$pid" 2>/dev/null
            fi
            rm -rf "$3"
        "#;
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("fhir-outbox-pg-watchdog")
            .arg(std::process::id().to_string())
            .arg(self.data_dir())
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(io_error("cannot start the cluster watchdog"))
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(mut command: Command, what: &str, log: Option<&Path>) -> Result<(), TempClusterError> {
    let output = command
        .output()
        .map_err(io_error(format!("cannot run {what}")))?;
    if output.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    if let Some(log) = log.and_then(|log| std::fs::read_to_string(log).ok()) {
        text.push_str("\nserver log:\n");
        text.push_str(&log);
    }
    Err(TempClusterError::Command {
        command: what.to_owned(),
        output: text.trim().to_owned(),
    })
}

fn is_root() -> bool {
    // The owner of /proc/self is the process's effective uid; this avoids `unsafe` libc calls.
    std::fs::metadata("/proc/self").is_ok_and(|meta| meta.uid() == 0)
}

/// The uid and gid of `postgres`, or else `nobody`.
fn unprivileged_user() -> Option<(u32, u32)> {
    let id = |flag: &str, user: &str| -> Option<u32> {
        let output = Command::new("id").args([flag, user]).output().ok()?;
        if !output.status.success() {
            return None;
        }
        String::from_utf8_lossy(&output.stdout).trim().parse().ok()
    };
    ["postgres", "nobody"]
        .into_iter()
        .find_map(|user| Some((id("-u", user)?, id("-g", user)?)))
}

fn free_port() -> Result<u16, TempClusterError> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(io_error("cannot find a free loopback port"))?;
    let port = listener
        .local_addr()
        .map_err(io_error("cannot find a free loopback port"))?
        .port();
    Ok(port)
}

/// Where `initdb` and `pg_ctl` are: `$PG_BIN_DIR`, `pg_config --bindir`, `$PATH`, then the newest
/// `/usr/lib/postgresql/<version>/bin` (Debian puts the server binaries there, off the `PATH`).
fn find_bin_dir() -> Option<PathBuf> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("PG_BIN_DIR").map(PathBuf::from) {
        return has_server(&dir).then_some(dir);
    }
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()));
    let from_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    debian.sort_by_key(|(version, _)| std::cmp::Reverse(*version));
    from_pg_config
        .into_iter()
        .chain(from_path)
        .chain(debian.into_iter().map(|(_, dir)| dir))
        .find(|dir| has_server(dir))
}
