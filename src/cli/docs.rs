//! `hyrelay completions SHELL` and `hyrelay manpages DIR`: shell completions (clap_complete)
//! and man pages (clap_mangen), both generated from the command-line definitions, so they
//! cannot drift from the binary.

use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;

/// Shells that `hyrelay completions` writes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// Writes the completion script for `shell` to stdout.
pub fn completions(shell: Shell) -> anyhow::Result<()> {
    let mut cmd = super::Cli::command();
    let mut out = std::io::stdout();
    let kind = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(kind, &mut cmd, "hyrelay", &mut out);
    Ok(())
}

/// Writes `hyrelay.1` and one page per subcommand (`hyrelay-hc-create.1`, ...) into `dir`.
pub fn manpages(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cmd = super::Cli::command();
    cmd.build();
    let mut written = 0;
    write_page(&cmd, "hyrelay", dir, &mut written)?;
    println!("wrote {written} man pages to {}", dir.display());
    Ok(())
}

fn write_page(cmd: &clap::Command, name: &str, dir: &Path, written: &mut usize) -> anyhow::Result<()> {
    let page = cmd.clone().name(name.to_owned());
    let mut buf = Vec::new();
    clap_mangen::Man::new(page).render(&mut buf)?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
    *written += 1;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        write_page(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}
