//! A private PostgreSQL cluster in a directory (initdb + pg_ctl), for the demo and the tests.
//!
//! `initdb` and `postgres` refuse to run as root; as root, the cluster runs as an unprivileged
//! user (created if missing) through `runuser`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Why a local cluster could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LocalPgError {
    /// No PostgreSQL server binaries were found.
    #[error("PostgreSQL server binaries not found (initdb/pg_ctl on PATH or via pg_config --bindir); install the postgresql package")]
    NoBinaries,
    /// A command failed.
    #[error("{cmd} failed: {detail}")]
    Command {
        /// The command.
        cmd: String,
        /// Its stderr or I/O error.
        detail: String,
    },
}

/// Options of a local cluster.
#[derive(Debug, Clone)]
pub struct LocalPgOptions {
    /// Server settings appended to postgresql.conf.
    pub settings: Vec<(String, String)>,
    /// Password for the superuser `philotes` (SCRAM when set, else trust).
    pub password: Option<String>,
}

impl Default for LocalPgOptions {
    fn default() -> Self {
        Self {
            settings: vec![
                ("wal_level".into(), "logical".into()),
                ("max_replication_slots".into(), "20".into()),
                ("max_wal_senders".into(), "20".into()),
                ("fsync".into(), "off".into()),
                ("synchronous_commit".into(), "off".into()),
                ("full_page_writes".into(), "off".into()),
            ],
            password: None,
        }
    }
}

/// A running private cluster; stopped when dropped.
pub struct LocalPostgres {
    /// Data directory.
    pub data_dir: PathBuf,
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// Superuser.
    pub user: String,
    bindir: PathBuf,
    run_as: Option<String>,
    stopped: bool,
}

/// The directory holding `initdb` and `pg_ctl`.
pub fn find_bindir() -> Option<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if p.join("initdb").exists() {
                return Some(p);
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").exists() && dir.join("pg_ctl").exists() {
                return Some(dir);
            }
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop()
}

fn is_root() -> bool {
    // SAFETY-free check: /proc/self/status carries the effective uid.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl LocalPostgres {
    /// `initdb` in `data_dir` (must not exist yet) and start the server on a free port.
    pub fn start(data_dir: &Path, opts: &LocalPgOptions) -> Result<Self, LocalPgError> {
        let bindir = find_bindir().ok_or(LocalPgError::NoBinaries)?;
        let run_as = if is_root() {
            let user = "philotes-pg".to_string();
            ensure_user(&user)?;
            Some(user)
        } else {
            None
        };
        let parent = data_dir.parent().unwrap_or(Path::new("/tmp"));
        std::fs::create_dir_all(parent).map_err(|e| io_err("mkdir", e))?;
        std::fs::create_dir_all(data_dir).map_err(|e| io_err("mkdir", e))?;
        if let Some(u) = &run_as {
            run(Command::new("chown").args(["-R", u]).arg(data_dir), "chown")?;
            // The server user must be able to reach its data directory.
            let mut p = parent;
            loop {
                let _ = Command::new("chmod").arg("o+x").arg(p).status();
                match p.parent() {
                    Some(pp) if pp != p && pp != Path::new("/") => p = pp,
                    _ => break,
                }
            }
        }
        let port = free_port().map_err(|e| io_err("bind", e))?;
        let mut pg = Self {
            data_dir: data_dir.to_path_buf(),
            port,
            user: "philotes".into(),
            bindir,
            run_as,
            stopped: true,
        };
        let mut init = pg.cmd("initdb");
        init.arg("-D").arg(&pg.data_dir).args([
            "-U",
            "philotes",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        let pwfile = pg.data_dir.with_extension("pw");
        if let Some(pw) = &opts.password {
            std::fs::write(&pwfile, pw).map_err(|e| io_err("write pwfile", e))?;
            if let Some(u) = &pg.run_as {
                let _ = Command::new("chown").arg(u).arg(&pwfile).status();
            }
            init.arg(format!("--pwfile={}", pwfile.display()))
                .args(["--auth-host=scram-sha-256", "--auth-local=trust"]);
        } else {
            init.args(["-A", "trust"]);
        }
        run(&mut init, "initdb")?;
        let _ = std::fs::remove_file(&pwfile);
        let mut conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n",
            pg.data_dir.display()
        );
        for (k, v) in &opts.settings {
            conf.push_str(&format!("{k} = {v}\n"));
        }
        append(&pg.data_dir.join("postgresql.conf"), &conf)?;
        if opts.password.is_some() {
            append(
                &pg.data_dir.join("pg_hba.conf"),
                "host replication all 127.0.0.1/32 scram-sha-256\n",
            )?;
        } else {
            append(
                &pg.data_dir.join("pg_hba.conf"),
                "host replication all 127.0.0.1/32 trust\n",
            )?;
        }
        pg.pg_ctl("start")?;
        pg.stopped = false;
        Ok(pg)
    }

    fn cmd(&self, bin: &str) -> Command {
        let path = self.bindir.join(bin);
        match &self.run_as {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--"]).arg(path);
                c
            }
            None => Command::new(path),
        }
    }

    /// `pg_ctl start|stop|restart` (`-w`, fast shutdown).
    pub fn pg_ctl(&self, action: &str) -> Result<(), LocalPgError> {
        self.pg_ctl_mode(action, "fast")
    }

    /// `pg_ctl` with an explicit shutdown mode (`fast`, `immediate`).
    pub fn pg_ctl_mode(&self, action: &str, mode: &str) -> Result<(), LocalPgError> {
        let log = self.data_dir.join("server.log");
        let mut c = self.cmd("pg_ctl");
        c.arg("-D")
            .arg(&self.data_dir)
            .args(["-w", "-t", "60", "-m", mode, "-l"])
            .arg(&log)
            .arg(action);
        run(&mut c, "pg_ctl")
    }

    /// A URL for `db` as the superuser (password included when given).
    pub fn url(&self, db: &str, password: Option<&str>) -> String {
        match password {
            Some(pw) => format!(
                "postgres://{}:{pw}@127.0.0.1:{}/{db}?sslmode=disable",
                self.user, self.port
            ),
            None => format!(
                "postgres://{}@127.0.0.1:{}/{db}?sslmode=disable",
                self.user, self.port
            ),
        }
    }

    /// A libpq keyword/value string for `db` (psql, tokio-postgres).
    pub fn conninfo(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={} dbname={db}",
            self.port, self.user
        )
    }

    /// The OS user the server runs as, when not the current user.
    pub fn owner(&self) -> Option<&str> {
        self.run_as.as_deref()
    }

    /// Start a stopped server again (same data directory and port).
    pub fn start_again(&mut self) -> Result<(), LocalPgError> {
        self.pg_ctl("start")?;
        self.stopped = false;
        Ok(())
    }

    /// Stop the server now.
    pub fn stop(&mut self) {
        if !self.stopped {
            let _ = self.pg_ctl("stop");
            self.stopped = true;
        }
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.pg_ctl_mode("stop", "immediate");
        }
    }
}

fn io_err(cmd: &str, e: std::io::Error) -> LocalPgError {
    LocalPgError::Command {
        cmd: cmd.into(),
        detail: e.to_string(),
    }
}

fn append(path: &Path, text: &str) -> Result<(), LocalPgError> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| io_err("open config", e))?;
    f.write_all(text.as_bytes())
        .map_err(|e| io_err("write config", e))
}

fn run(c: &mut Command, name: &str) -> Result<(), LocalPgError> {
    let out = c
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io_err(name, e))?;
    if !out.status.success() {
        return Err(LocalPgError::Command {
            cmd: name.into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

fn ensure_user(user: &str) -> Result<(), LocalPgError> {
    // Clusters started at once on a fresh machine (the tests run two at a time) must not see
    // the user half made by another's `useradd`: one initdb failed to chmod its directory.
    static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _making = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    let exists = Command::new("id")
        .arg("-u")
        .arg(user)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !exists {
        run(
            Command::new("useradd").args(["--system", "--no-create-home", user]),
            "useradd",
        )?;
    }
    Ok(())
}
