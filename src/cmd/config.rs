//! The configuration file and what `tern config print` shows.
//!
//! The file (TOML; `--config FILE` or `TERN_CONFIG`) holds flags by their long name, with `_`
//! or `-` (`lease_ttl = "30s"`): at the top level for every command that has the flag, or in a
//! table named after a command (`[server]`, `[worker]`, `[dev]`, …) for that command only. A
//! file's value becomes the flag's default, so the environment and the command line still win:
//! flag > environment > file > built-in default. A key that is no flag of any command, or of
//! its table's command, is refused, naming it. Secrets are not taken from the file (they come
//! from the environment or a `_FILE`).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches};

use super::Cli;

/// The environment variable naming the file.
const ENV: &str = "TERN_CONFIG";

/// The values a configuration file set, by command (`None`: every command) and flag.
#[derive(Debug, Default)]
struct FileValues {
    path: Option<PathBuf>,
    /// (command, long flag name) → value.
    set: BTreeMap<(Option<String>, String), String>,
}

/// The file `args` or the environment name, if any: `--config FILE` or `--config=FILE`.
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        if a == "--" {
            break;
        }
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
    }
    std::env::var_os(ENV).filter(|v| !v.is_empty()).map(PathBuf::from)
}

fn scalar(path: &Path, key: &str, v: &toml::Value) -> Result<String> {
    Ok(match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        _ => bail!("{}: {key} must be a string, a number or true/false", path.display()),
    })
}

fn read(path: &Path) -> Result<FileValues> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading the configuration file {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("the configuration file {} is not valid TOML", path.display()))?;
    let mut set = BTreeMap::new();
    for (key, value) in &table {
        match value {
            toml::Value::Table(inner) => {
                for (k, v) in inner {
                    let name = k.replace('_', "-");
                    set.insert((Some(key.clone()), name), scalar(path, &format!("{key}.{k}"), v)?);
                }
            }
            v => {
                set.insert((None, key.replace('_', "-")), scalar(path, key, v)?);
            }
        }
    }
    Ok(FileValues {
        path: Some(path.to_path_buf()),
        set,
    })
}

/// Whether `cmd` has a flag `--long`.
fn has_flag(cmd: &clap::Command, long: &str) -> bool {
    cmd.get_arguments()
        .any(|a| a.get_long() == Some(long) && !a.is_hide_set())
}

/// Makes `value` the default of `--long` in `cmd`.
fn set_default(cmd: clap::Command, long: &str, value: &str) -> clap::Command {
    let Some(id) = cmd
        .get_arguments()
        .find(|a| a.get_long() == Some(long))
        .map(|a| a.get_id().clone())
    else {
        return cmd;
    };
    let value = value.to_string();
    cmd.mut_arg(id, move |a| a.default_value(value))
}

/// The command line definition with the file's values as defaults.
fn with_file(file: &FileValues) -> Result<clap::Command> {
    let mut cmd = Cli::command();
    let path = file.path.as_deref().unwrap_or(Path::new("?")).display().to_string();
    let commands: Vec<String> = cmd.get_subcommands().map(|s| s.get_name().to_string()).collect();
    for ((command, long), value) in &file.set {
        match command {
            None => {
                let top = has_flag(&cmd, long);
                let subs: Vec<String> = cmd
                    .get_subcommands()
                    .filter(|s| has_flag(s, long))
                    .map(|s| s.get_name().to_string())
                    .collect();
                if !top && subs.is_empty() {
                    bail!(
                        "{path}: {} is not a setting of any tern command",
                        long.replace('-', "_")
                    );
                }
                if top {
                    cmd = set_default(cmd, long, value);
                }
                for name in subs {
                    let (long, value) = (long.clone(), value.clone());
                    cmd = cmd.mut_subcommand(name, move |s| set_default(s, &long, &value));
                }
            }
            Some(command) => {
                let Some(sub) = cmd.find_subcommand(command) else {
                    bail!("{path}: [{command}] is not a tern command ({})", commands.join(", "));
                };
                if !has_flag(sub, long) {
                    bail!(
                        "{path}: {}.{} is not a setting of tern {command}",
                        command,
                        long.replace('-', "_")
                    );
                }
                let (long, value) = (long.clone(), value.clone());
                cmd = cmd.mut_subcommand(command, move |s| set_default(s, &long, &value));
            }
        }
    }
    Ok(cmd)
}

fn file_values(args: &[OsString]) -> Result<FileValues> {
    match config_path(args) {
        Some(path) => read(&path),
        None => Ok(FileValues::default()),
    }
}

/// Parses the command line over the configuration file; exits as clap does on `--help`, a
/// usage error, or a file that cannot be used.
pub(crate) fn parse() -> Cli {
    let args: Vec<OsString> = std::env::args_os().collect();
    let cmd = match file_values(&args).and_then(|f| with_file(&f)) {
        Ok(cmd) => cmd,
        Err(e) => {
            eprintln!("tern: {e:#}");
            std::process::exit(2);
        }
    };
    let matches = cmd.get_matches_from(args);
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// The flags whose values are credentials: shown as set or not, never their value.
const REDACTED: &[&str] = &["cloudstack-api-key"];

/// Secrets read from the environment or a file only.
const SECRETS: &[&str] = &["TERN_CLOUDSTACK_SECRET_KEY", "TERN_TOKEN"];

fn source(src: Option<ValueSource>, file_set: bool) -> &'static str {
    match src {
        Some(ValueSource::CommandLine) => "flag",
        Some(ValueSource::EnvVariable) => "environment",
        Some(ValueSource::DefaultValue) if file_set => "file",
        Some(ValueSource::DefaultValue) => "default",
        _ => "unset",
    }
}

fn toml_value(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// `tern config print COMMAND [ARGS…]`: the effective settings of `COMMAND` as it would run
/// with these arguments, this environment and the configuration file, each with where it came
/// from; credentials redacted.
pub(crate) fn print(command: &str, extra: &[String]) -> Result<()> {
    super::quiet_on_broken_pipe();
    let args: Vec<OsString> = std::env::args_os().collect();
    let file = file_values(&args)?;
    let cmd = with_file(&file)?;
    let mut argv: Vec<OsString> = vec!["tern".into()];
    if let Some(p) = &file.path {
        argv.push("--config".into());
        argv.push(p.clone().into());
    }
    argv.push(command.into());
    argv.extend(extra.iter().map(OsString::from));
    // The definitions in their own order (a default set from the file moves its flag last).
    let top_def = Cli::command();
    let sub_def = top_def
        .find_subcommand(command)
        .with_context(|| format!("tern {command} is not a command"))?
        .clone();
    let matches: ArgMatches = cmd.try_get_matches_from(argv)?;
    let Some((_, sub)) = matches.subcommand() else {
        bail!("tern {command} is not a command");
    };
    if let Some(p) = &file.path {
        println!("# configuration file: {}", p.display());
    }
    println!("# tern {command}: flag > environment > file > default");
    let mut seen = BTreeSet::new();
    let args = top_def
        .get_arguments()
        .filter(|a| a.is_global_set())
        .chain(sub_def.get_arguments());
    for arg in args {
        let (Some(long), false) = (arg.get_long(), arg.is_hide_set()) else {
            continue;
        };
        if !seen.insert(long.to_string()) || long == "config" {
            continue;
        }
        let id = arg.get_id().as_str();
        let values: Vec<String> = sub
            .try_get_raw(id)
            .ok()
            .flatten()
            .map(|vs| vs.map(|v| v.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let file_set = file.set.contains_key(&(Some(command.to_string()), long.to_string()))
            || file.set.contains_key(&(None, long.to_string()));
        let from = source(sub.value_source(id), file_set);
        let shown = match values.as_slice() {
            [] => "# (unset)".to_string(),
            _ if REDACTED.contains(&long) => toml_value("(redacted)"),
            [v] if long == "database" => toml_value(&tern::store::redact_url(v)),
            [v] => toml_value(v),
            vs => toml::Value::Array(vs.iter().map(|v| toml::Value::String(v.clone())).collect()).to_string(),
        };
        let key = long.replace('-', "_");
        if values.is_empty() {
            println!("# {key} {shown}");
        } else {
            println!("{key} = {shown}  # {from}");
        }
    }
    for name in SECRETS {
        let file_var = format!("{name}_FILE");
        let from = match (std::env::var_os(name).is_some(), std::env::var_os(&file_var)) {
            (true, _) => format!("set in {name}"),
            (false, Some(f)) => format!("read from {}", Path::new(&f).display()),
            (false, None) => "unset".to_string(),
        };
        println!("# {}: {from}", name.to_lowercase().trim_start_matches("tern_"));
    }
    Ok(())
}
