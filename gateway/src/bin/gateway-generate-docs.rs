//! `gateway-generate-docs DIR`: the man pages and the shell completions of `gateway`, generated
//! from the very clap definition it parses with ([`gateway::cli`]), so they cannot drift from
//! `--help`; and the commented default configuration file, from the settings' own defaults and
//! help. `cargo xtask deb` runs it and packages what it writes; the package does not hold it.

use std::{fmt::Write as _, fs, path::Path};

use anyhow::{Context as _, Result};
use clap_complete::Shell;
use gateway::settings::Settings;

/// Section 8: system administration commands (the daemon needs root).
const MAN_SECTION: &str = "8";

fn main() -> std::process::ExitCode {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: gateway-generate-docs DIR");
        return std::process::ExitCode::FAILURE;
    };
    match generate(gateway::cli::command(), Path::new(&dir)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("gateway-generate-docs: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Writes `DIR/man8/gateway.8`, `gateway-run.8`, ... (one page per visible subcommand) and
/// `DIR/completions/gateway.bash`, `_gateway` (zsh) and `gateway.fish`, and `DIR/gateway.toml`.
fn generate(command: clap::Command, dir: &Path) -> Result<()> {
    let man = dir.join(format!("man{MAN_SECTION}"));
    let completions = dir.join("completions");
    for sub in [&man, &completions] {
        fs::create_dir_all(sub).with_context(|| format!("create {}", sub.display()))?;
    }
    let config = dir.join("gateway.toml");
    fs::write(&config, commented_defaults(&command))
        .with_context(|| format!("write {}", config.display()))?;
    let name = command.get_name().to_owned();
    for (shell, file) in [
        (Shell::Bash, format!("{name}.bash")),
        (Shell::Zsh, format!("_{name}")),
        (Shell::Fish, format!("{name}.fish")),
    ] {
        let path = completions.join(file);
        let mut out =
            fs::File::create(&path).with_context(|| format!("create {}", path.display()))?;
        clap_complete::generate(shell, &mut command.clone(), &name, &mut out);
    }
    // Built, the subcommands carry their page names (`gateway-run`).
    let mut command = command.disable_help_subcommand(true);
    command.build();
    let pages =
        std::iter::once(&command).chain(command.get_subcommands().filter(|s| !s.is_hide_set()));
    for page in pages {
        clap_mangen::Man::new(page.clone())
            .section(MAN_SECTION)
            .generate_to(&man)
            .with_context(|| format!("write the man page of {}", page.get_name()))?;
    }
    Ok(())
}

/// Where the unit reads its settings (packaging/gateway.service's `ExecStart`).
const CONFIG_PATH: &str = "/etc/gateway/gateway.toml";

/// Every setting of `gateway run` with its help and its default, commented out: the file the
/// package installs. Uncommented as it is, it reads as the defaults.
fn commented_defaults(command: &clap::Command) -> String {
    let mut out = format!(
        "# {CONFIG_PATH}: the settings of `gateway run --config {CONFIG_PATH}` (gateway.service).\n\
         # Keys are the flags of `gateway run` (`_` for `-`), each shown below with its default,\n\
         # commented out; a flag on the command line wins over this file. Set at least `external`,\n\
         # `internal` and a way to authenticate (`users` or `allow_anonymous`), check the file\n\
         # with `gateway check-config {CONFIG_PATH}`, then `systemctl enable --now gateway`.\n\
         # SIGHUP (`systemctl reload gateway`) rereads the users file and the policy.\n"
    );
    let run = command.find_subcommand("run");
    let defaults = Settings::defaults().to_toml();
    for line in defaults.lines() {
        let key = line.split_once(" = ").map_or(line, |(key, _)| key);
        let help = run
            .and_then(|run| run.get_arguments().find(|arg| arg.get_id() == key))
            .and_then(clap::Arg::get_help)
            .map(ToString::to_string)
            .unwrap_or_default();
        // The default is on the next line already.
        let help = help.split(" [default: ").next().unwrap_or_default();
        out.push('\n');
        for comment in wrap(help, 96) {
            let _ = writeln!(out, "# {comment}");
        }
        let _ = writeln!(out, "#{line}");
    }
    out
}

/// `text` in lines of at most `width` characters, broken between words.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split_whitespace() {
        match lines.last_mut() {
            Some(line) if line.len() + 1 + word.len() <= width => {
                line.push(' ');
                line.push_str(word);
            }
            _ => lines.push(word.to_owned()),
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use gateway::settings::{Settings, parse};

    #[test]
    fn the_commented_file_uncommented_is_the_defaults() {
        let text = super::commented_defaults(&gateway::cli::command());
        let settings: String = text
            .lines()
            .filter_map(|line| line.strip_prefix('#'))
            .filter(|line| line.contains(" = ") && !line.starts_with(' '))
            .flat_map(|line| [line, "\n"])
            .collect();
        assert_eq!(
            parse(&settings, "test").unwrap().resolve(),
            Settings::defaults()
        );
        assert!(
            text.contains("# Interface facing the untrusted side"),
            "{text}"
        );
        assert!(
            text.lines()
                .all(|line| line.is_empty() || line.starts_with('#')),
            "everything is commented out"
        );
    }
}
