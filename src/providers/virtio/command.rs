//! [`CommandInjector`]: finds the volume's block device by globbing a path pattern and runs
//! configured programs on it (no shell), with a timeout that kills the whole process group.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::io::AsyncReadExt;
use tokio::process::{ChildStderr, ChildStdout};

use super::{check_volume_id, serial_for, DriverInjector, InjectionReport};
use crate::providers::{ProviderError, Result};

/// How long the pipes may stay open once the tool itself has exited (or was killed): a
/// process that escaped the process group could keep them open forever.
const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// How much of stderr an error carries.
const ERROR_TAIL: usize = 2048;

/// How [`CommandInjector`] finds the disk and what it runs.
///
/// In command arguments, `{device}` (the resolved device path), `{volume_id}` and `{serial}`
/// (see [`super::serial_for`]) are replaced. The program is started directly, without a
/// shell, so nothing in a volume id or a device path is interpreted. The child inherits
/// Tern's environment plus [`CommandInjectorConfig::env`], gets `/dev/null` as stdin and runs
/// in its own process group, which is killed (SIGKILL) on timeout, when the call is
/// cancelled, and after the tool exits (so helpers it started, e.g. the libguestfs
/// appliance's qemu, are never left running with the disk open).
#[derive(Debug, Clone)]
pub struct CommandInjectorConfig {
    /// Injects the drivers. Default: `virt-v2v-in-place -i disk -if raw {device}`. `-if raw`
    /// because the replicated disk is a raw block device, and probing the format of a raw
    /// disk lets the guest decide how the host reads it (a guest can write a qcow2 header).
    pub inject_command: Vec<String>,
    /// Read-only check: exit 0 = the drivers are in the disk, exit 1 = they are not, anything
    /// else is an error. Default `None`: no check, [`DriverInjector::is_injected`] always
    /// answers `false`, so a re-run after a crash injects again (virt-v2v-in-place on an
    /// already converted guest re-installs the drivers; that is wasted time, not damage).
    /// A check can be a small script around `guestfish --ro -a {device} -i` testing
    /// `is-file` on the `case-sensitive-path` of `/Windows/System32/drivers/viostor.sys` and
    /// `virt-win-reg` for `HKLM\SYSTEM\ControlSet001\Services\viostor`.
    pub check_command: Option<Vec<String>>,
    /// Added to the inherited environment. Default: `VIRTIO_WIN=/usr/share/virtio-win/virtio-win.iso`
    /// (where virt-v2v looks for the drivers).
    pub env: Vec<(String, String)>,
    /// A glob pattern for the device; `{serial}` and `{volume_id}` are replaced (escaped).
    /// Exactly one device must match; several symlinks to the same device count as one.
    /// Default: `/dev/disk/by-id/*{serial}`, which matches `virtio-<serial>` (virtio-blk) and
    /// `scsi-0QEMU_QEMU_HARDDISK_<serial>` (virtio-scsi). No `*` after the serial: that would
    /// also match the disk's partition links (`…-part1`).
    pub device_pattern: String,
    /// How long `inject_command` may run before it is killed. Default 30 min.
    pub timeout: Duration,
    /// How long `check_command` may run before it is killed. Default 5 min.
    pub check_timeout: Duration,
    /// How many bytes of the combined output are kept (the tail). Default 16 KiB.
    pub max_output: usize,
}

impl Default for CommandInjectorConfig {
    fn default() -> Self {
        CommandInjectorConfig {
            inject_command: ["virt-v2v-in-place", "-i", "disk", "-if", "raw", "{device}"]
                .map(String::from)
                .to_vec(),
            check_command: None,
            env: vec![("VIRTIO_WIN".into(), "/usr/share/virtio-win/virtio-win.iso".into())],
            device_pattern: "/dev/disk/by-id/*{serial}".into(),
            timeout: Duration::from_secs(30 * 60),
            check_timeout: Duration::from_secs(5 * 60),
            max_output: 16 * 1024,
        }
    }
}

/// The real [`DriverInjector`]: runs configured programs on the block device.
#[derive(Debug, Clone)]
pub struct CommandInjector {
    config: CommandInjectorConfig,
}

#[derive(Debug, Clone, Copy)]
enum Role {
    Inject,
    Check,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Inject => "inject",
            Role::Check => "check",
        })
    }
}

impl CommandInjector {
    /// Checks the configuration: commands must not be empty and the device pattern must be a
    /// valid glob pattern ([`ProviderError::BadParameter`] otherwise).
    pub fn new(config: CommandInjectorConfig) -> Result<Self> {
        let bad = |errortext: String| ProviderError::BadParameter { code: 0, errortext };
        if config.inject_command.first().is_none_or(|p| p.is_empty()) {
            return Err(bad("inject_command is empty".into()));
        }
        if let Some(check) = &config.check_command {
            if check.first().is_none_or(|p| p.is_empty()) {
                return Err(bad("check_command is empty".into()));
            }
        }
        glob::Pattern::new(&substitute(
            &config.device_pattern,
            &[("serial", "x"), ("volume_id", "x")],
        ))
        .map_err(|e| bad(format!("device_pattern {:?}: {e}", config.device_pattern)))?;
        Ok(CommandInjector { config })
    }

    pub fn config(&self) -> &CommandInjectorConfig {
        &self.config
    }

    fn argv(&self, command: &[String], volume_id: &str, device: &str) -> Result<Vec<String>> {
        let serial = serial_for(volume_id)?;
        let vars = [
            ("device", device),
            ("volume_id", volume_id),
            ("serial", serial.as_str()),
        ];
        Ok(command.iter().map(|a| substitute(a, &vars)).collect())
    }

    /// Runs `argv` to completion or until `timeout`; a timeout kills the process group and is
    /// [`ProviderError::Unavailable`]. A non-zero exit is not an error here.
    async fn run(&self, role: Role, argv: &[String], timeout: Duration) -> Result<Finished> {
        let Some((program, args)) = argv.split_first() else {
            return Err(ProviderError::BadParameter {
                code: 0,
                errortext: format!("{role} command is empty"),
            });
        };
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .envs(self.config.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(|e| spawn_error(role, program, e))?;
        // From here on, dropping `group` (an error return or the caller cancelling this
        // future) kills everything the tool started.
        let mut group = ProcessGroup(child.id().and_then(|pid| libc::pid_t::try_from(pid).ok()));
        tracing::info!(%role, program, pid = child.id(), "started the VirtIO driver tool");

        let mut output = Tail::new(self.config.max_output);
        let mut stderr_tail = Tail::new(ERROR_TAIL);
        let ended = {
            let pump = pump(child.stdout.take(), child.stderr.take(), &mut output, &mut stderr_tail);
            tokio::pin!(pump);
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            let mut drained = false;
            let ended = loop {
                tokio::select! {
                    () = &mut pump, if !drained => drained = true,
                    status = child.wait() => break Ended::Exited(status),
                    () = &mut deadline => break Ended::TimedOut,
                }
            };
            // The tool is gone or must go; whatever is left in its group is a stray.
            group.kill();
            if !drained && tokio::time::timeout(DRAIN_GRACE, &mut pump).await.is_err() {
                tracing::warn!(%role, program, "output pipes still open after the tool ended; output may be cut");
            }
            ended
        };
        let elapsed = started.elapsed();
        match ended {
            Ended::Exited(Ok(status)) => Ok(Finished {
                status,
                output,
                stderr_tail,
                elapsed,
            }),
            Ended::Exited(Err(e)) => Err(ProviderError::Unavailable {
                detail: format!("{role} command `{program}`: waiting for it failed: {e}"),
            }),
            Ended::TimedOut => {
                // SIGKILL was sent to the group above; reap the child so it is really gone
                // before the caller retries.
                if tokio::time::timeout(DRAIN_GRACE, child.wait()).await.is_err() {
                    tracing::error!(%role, program, pid = child.id(), "the killed tool has not exited yet");
                }
                tracing::warn!(%role, program, ?timeout, "the VirtIO driver tool timed out and was killed");
                Err(ProviderError::Unavailable {
                    detail: format!(
                        "{role} command `{program}` timed out after {timeout:?} and was killed{}",
                        describe_tail(&mut stderr_tail, &mut output)
                    ),
                })
            }
        }
    }
}

#[async_trait]
impl DriverInjector for CommandInjector {
    async fn device_for(&self, volume_id: &str) -> Result<String> {
        let serial = serial_for(volume_id)?;
        let pattern = substitute(
            &self.config.device_pattern,
            &[
                ("serial", &glob::Pattern::escape(&serial)),
                ("volume_id", &glob::Pattern::escape(volume_id)),
            ],
        );
        let volume_id = volume_id.to_string();
        tokio::task::spawn_blocking(move || resolve_device(&pattern, &volume_id))
            .await
            .map_err(|e| ProviderError::Unavailable {
                detail: format!("resolving the device failed: {e}"),
            })?
    }

    async fn is_injected(&self, volume_id: &str, device: &str) -> Result<bool> {
        check_volume_id(volume_id)?;
        let Some(check) = &self.config.check_command else {
            return Ok(false);
        };
        let argv = self.argv(check, volume_id, device)?;
        let mut done = self.run(Role::Check, &argv, self.config.check_timeout).await?;
        match done.status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => Err(done.failure(Role::Check, &argv[0], "(expected 0 = injected or 1 = not injected)")),
        }
    }

    async fn inject(&self, volume_id: &str, device: &str) -> Result<InjectionReport> {
        check_volume_id(volume_id)?;
        let argv = self.argv(&self.config.inject_command, volume_id, device)?;
        let mut done = self.run(Role::Inject, &argv, self.config.timeout).await?;
        if !done.status.success() {
            return Err(done.failure(Role::Inject, &argv[0], ""));
        }
        Ok(InjectionReport {
            output: done.output.render(),
            duration_ms: u64::try_from(done.elapsed.as_millis()).unwrap_or(u64::MAX),
        })
    }
}

enum Ended {
    Exited(std::io::Result<ExitStatus>),
    TimedOut,
}

/// A tool that ran to its end.
struct Finished {
    status: ExitStatus,
    output: Tail,
    stderr_tail: Tail,
    elapsed: Duration,
}

impl Finished {
    /// The permanent error for an unexpected exit status.
    fn failure(&mut self, role: Role, program: &str, expectation: &str) -> ProviderError {
        let code = exit_code(self.status);
        let sep = if expectation.is_empty() { "" } else { " " };
        ProviderError::Refused {
            code,
            errortext: format!(
                "{role} command `{program}` {}{sep}{expectation}{}",
                describe_status(self.status),
                describe_tail(&mut self.stderr_tail, &mut self.output)
            ),
        }
    }
}

/// The shell's convention: the exit code, or 128 + the signal that killed the process.
fn exit_code(status: ExitStatus) -> u16 {
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(255);
    u16::try_from(code).unwrap_or(u16::MAX)
}

fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        (None, None) => format!("ended with {status}"),
    }
}

/// `": <stderr tail>"`, or the combined output's tail when stderr was empty.
fn describe_tail(stderr: &mut Tail, output: &mut Tail) -> String {
    let text = if stderr.total > 0 {
        stderr.render()
    } else {
        let mut t = output.render();
        if t.len() > ERROR_TAIL {
            let mut cut = t.len() - ERROR_TAIL;
            while !t.is_char_boundary(cut) {
                cut += 1;
            }
            t = t.split_off(cut);
        }
        t
    };
    let text = text.trim_end();
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

fn spawn_error(role: Role, program: &str, e: std::io::Error) -> ProviderError {
    let errortext = format!("{role} command `{program}` could not be started: {e}");
    match e.kind() {
        // The shell's codes for "not found" and "not executable": a configuration problem.
        std::io::ErrorKind::NotFound => ProviderError::Refused { code: 127, errortext },
        std::io::ErrorKind::PermissionDenied => ProviderError::Refused { code: 126, errortext },
        // Out of processes, memory, file descriptors: may pass.
        _ => ProviderError::Unavailable { detail: errortext },
    }
}

/// Kills (SIGKILL) a process group, once, at the latest when dropped.
struct ProcessGroup(Option<libc::pid_t>);

impl ProcessGroup {
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            // SAFETY: killpg(2) takes plain integers and has no memory-safety preconditions.
            // The group is the one `process_group(0)` created for our child (pgid = its pid).
            let rc = unsafe { libc::killpg(pgid, libc::SIGKILL) };
            if rc == 0 {
                tracing::debug!(pgid, "killed the tool's process group");
            }
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads both pipes until both are closed, appending every chunk to `output` (so the two
/// streams are interleaved by arrival) and stderr's chunks also to `stderr`. Memory stays
/// bounded by the tails' capacities.
async fn pump(mut out: Option<ChildStdout>, mut err: Option<ChildStderr>, output: &mut Tail, stderr: &mut Tail) {
    let mut out_buf = vec![0u8; 8192];
    let mut err_buf = vec![0u8; 8192];
    while out.is_some() || err.is_some() {
        tokio::select! {
            r = async { out.as_mut()?.read(&mut out_buf).await.ok() }, if out.is_some() => match r {
                Some(n) if n > 0 => output.push(&out_buf[..n]),
                _ => out = None,
            },
            r = async { err.as_mut()?.read(&mut err_buf).await.ok() }, if err.is_some() => match r {
                Some(n) if n > 0 => {
                    output.push(&err_buf[..n]);
                    stderr.push(&err_buf[..n]);
                }
                _ => err = None,
            },
        }
    }
}

/// The last `cap` bytes of a stream, and how many bytes it had in all.
#[derive(Debug)]
struct Tail {
    buf: VecDeque<u8>,
    cap: usize,
    total: u64,
}

impl Tail {
    fn new(cap: usize) -> Self {
        Tail {
            buf: VecDeque::with_capacity(cap.min(64 * 1024)),
            cap,
            total: 0,
        }
    }

    fn push(&mut self, data: &[u8]) {
        self.total += data.len() as u64;
        if data.len() >= self.cap {
            self.buf.clear();
            self.buf.extend(&data[data.len() - self.cap..]);
            return;
        }
        let overflow = (self.buf.len() + data.len()).saturating_sub(self.cap);
        self.buf.drain(..overflow);
        self.buf.extend(data);
    }

    /// The tail as text (invalid UTF-8 replaced), after a marker line if bytes were dropped.
    fn render(&mut self) -> String {
        let omitted = self.total - self.buf.len() as u64;
        let mut bytes: &[u8] = self.buf.make_contiguous();
        let mut text = String::new();
        if omitted > 0 {
            text.push_str(&format!("[... {omitted} earlier bytes of output omitted ...]\n"));
            // Do not start in the middle of a UTF-8 sequence.
            while let Some((&b, rest)) = bytes.split_first() {
                if b & 0b1100_0000 != 0b1000_0000 {
                    break;
                }
                bytes = rest;
            }
        }
        text.push_str(&String::from_utf8_lossy(bytes));
        text
    }
}

/// Replaces `{name}` for each `(name, value)` in one pass (a value containing `{…}` is not
/// expanded again); unknown `{…}` stay as they are.
fn substitute(template: &str, vars: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    'scan: while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        for (name, value) in vars {
            if let Some(tail) = after.strip_prefix(name).and_then(|t| t.strip_prefix('}')) {
                out.push_str(value);
                rest = tail;
                continue 'scan;
            }
        }
        out.push('{');
        rest = after;
    }
    out.push_str(rest);
    out
}

/// Exactly one device matching `pattern` (symlinks to the same device count once).
fn resolve_device(pattern: &str, volume_id: &str) -> Result<String> {
    let paths = glob::glob(pattern).map_err(|e| ProviderError::BadParameter {
        code: 0,
        errortext: format!("device pattern {pattern:?}: {e}"),
    })?;
    // canonical device -> the first (sorted) path naming it
    let mut devices: BTreeMap<PathBuf, PathBuf> = BTreeMap::new();
    for entry in paths {
        let path = match entry {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(pattern, error = %e, "unreadable path while looking for the device");
                continue;
            }
        };
        // A dangling link is a device that went away.
        let Ok(target) = std::fs::canonicalize(&path) else {
            continue;
        };
        devices.entry(target).or_insert(path);
    }
    let mut found: Vec<PathBuf> = devices.into_values().collect();
    found.sort();
    match found.len() {
        0 => Err(ProviderError::NotFound {
            what: format!("device of volume {volume_id} (nothing matches {pattern})"),
        }),
        1 => {
            let path = found.remove(0);
            path.into_os_string().into_string().map_err(|p| ProviderError::Refused {
                code: 0,
                errortext: format!("device path {p:?} of volume {volume_id} is not UTF-8"),
            })
        }
        n => Err(ProviderError::Refused {
            code: 0,
            errortext: format!(
                "{n} devices match {pattern} for volume {volume_id}: {}",
                found
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitution_is_one_pass_and_leaves_unknown_braces() {
        let vars = [("device", "/dev/{serial}"), ("serial", "S")];
        assert_eq!(substitute("{device}", &vars), "/dev/{serial}");
        assert_eq!(substitute("x{serial}y{other}{", &vars), "xSy{other}{");
        assert_eq!(substitute("--disk={device},{serial}", &vars), "--disk=/dev/{serial},S");
    }

    #[test]
    fn tail_keeps_the_last_bytes_and_counts_the_rest() {
        let mut t = Tail::new(4);
        t.push(b"ab");
        t.push(b"cdef");
        assert_eq!(t.render(), "[... 2 earlier bytes of output omitted ...]\ncdef");
        t.push(b"0123456789");
        assert_eq!(t.render(), "[... 12 earlier bytes of output omitted ...]\n6789");
        let mut whole = Tail::new(10);
        whole.push(b"abc");
        assert_eq!(whole.render(), "abc");
        // A cut inside a multi-byte character skips its remains.
        let mut utf = Tail::new(2);
        utf.push("xé!".as_bytes()); // 'é' is 2 bytes: the tail starts with its second one
        assert_eq!(utf.render(), "[... 2 earlier bytes of output omitted ...]\n!");
    }
}
