//! `skyctl completions bash|zsh|fish|...`: prints a completion script
//! generated from the command grammar. Needs no coordinator.

use anyhow::Result;
use clap::CommandFactory;

use crate::cli::{Cli, CompletionsArgs};
use crate::output;

/// Runs `skyctl completions SHELL`.
pub(crate) fn run(args: &CompletionsArgs) -> Result<()> {
    let mut cmd = Cli::command();
    let mut buf = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "skyctl", &mut buf);
    output::emit(&String::from_utf8_lossy(&buf))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_mention_the_verbs() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "skyctl", &mut buf);
            let text = String::from_utf8(buf).unwrap();
            assert!(
                text.contains("create") && text.contains("num-endpoints"),
                "{shell}"
            );
        }
    }
}
